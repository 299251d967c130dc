//! The kernel interface, read from the CUDA sources: the one declaration of a kernel is its
//! `extern "C" __global__` signature in `kernels/<module>.cu`. From it the build generates
//! - a typed Rust launcher per kernel (argument count, order and types fixed by the signature, so a
//!   drifted call site fails to compile), and the `Kernels` table that loads them;
//! - a `#[repr(C)]` Rust mirror of every struct a kernel takes by value, with size and field-offset
//!   assertions on both sides: const assertions in Rust and `static_assert`s in CUDA
//!   (`CHECK_LAYOUT(Name);` after the struct, from the generated `kernel_layouts.cuh`), all with
//!   the numbers of the C layout computed here, so nvcc and rustc must agree with each other.
//!
//! The parser understands the small C subset our kernels use: scalar parameters (`int`, `float`,
//! `double`, `i64`, `u64`, `uint32_t`, ...), pointers to `float`, `double` or `__nv_bfloat16`
//! (const = read-only, `NULLABLE` = may be null), and structs of scalars and fixed arrays. Anything else is a build
//! error naming the kernel and parameter.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
    /// bfloat16 (`__nv_bfloat16`): tensor-core operands; pointers only.
    BF16,
}

impl Scalar {
    fn parse(c_type: &str) -> Option<Scalar> {
        Some(match c_type {
            "int" | "int32_t" | "signed int" | "signed" => Scalar::I32,
            "unsigned" | "unsigned int" | "uint32_t" => Scalar::U32,
            "i64" | "int64_t" | "long long" | "long long int" => Scalar::I64,
            "u64" | "uint64_t" | "unsigned long long" | "unsigned long long int" => Scalar::U64,
            "float" => Scalar::F32,
            "double" => Scalar::F64,
            "__nv_bfloat16" | "bf16" => Scalar::BF16,
            _ => return None,
        })
    }

    fn rust(self) -> &'static str {
        match self {
            Scalar::I32 => "i32",
            Scalar::U32 => "u32",
            Scalar::I64 => "i64",
            Scalar::U64 => "u64",
            Scalar::F32 => "f32",
            Scalar::F64 => "f64",
            Scalar::BF16 => "half::bf16",
        }
    }

    /// The C spelling, for documentation.
    fn c(self) -> &'static str {
        match self {
            Scalar::I32 => "int",
            Scalar::U32 => "unsigned",
            Scalar::I64 => "int64_t",
            Scalar::U64 => "uint64_t",
            Scalar::F32 => "float",
            Scalar::F64 => "double",
            Scalar::BF16 => "__nv_bfloat16",
        }
    }

    /// Size and alignment on every CUDA target (LP64 host ABI).
    fn size(self) -> usize {
        match self {
            Scalar::I32 | Scalar::U32 | Scalar::F32 => 4,
            Scalar::I64 | Scalar::U64 | Scalar::F64 => 8,
            Scalar::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ParamKind {
    /// A device pointer to `elem`: `mutable` unless declared `const`, `nullable` when `NULLABLE`.
    Pointer {
        elem: Scalar,
        mutable: bool,
        nullable: bool,
    },
    Scalar(Scalar),
    /// A struct passed by value (one of `Interface::structs`).
    Struct(String),
}

#[derive(Clone, Debug)]
pub struct Param {
    pub c_name: String,
    pub kind: ParamKind,
}

#[derive(Clone, Debug)]
pub struct Kernel {
    pub module: String,
    /// `Some("sm_90a")` when the module is built for that architecture alone
    /// ([`module_target`]): it loads only on such a GPU, and its kernels are optional.
    pub target: Option<String>,
    pub name: String,
    pub params: Vec<Param>,
    /// The signature as written (whitespace normalised), for the launcher's documentation.
    pub signature: String,
}

#[derive(Clone, Debug)]
pub struct Field {
    pub name: String,
    pub ty: Scalar,
    /// `Some(n)` for a fixed array `ty name[n]`.
    pub len: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct Struct {
    pub module: String,
    pub name: String,
    pub fields: Vec<Field>,
}

impl Struct {
    /// (offset of each field, size) under the C layout rules.
    pub fn layout(&self) -> (Vec<usize>, usize) {
        let mut offset = 0usize;
        let mut align = 1usize;
        let mut offsets = Vec::new();
        for f in &self.fields {
            let a = f.ty.size();
            offset = offset.div_ceil(a) * a;
            offsets.push(offset);
            offset += a * f.len.unwrap_or(1);
            align = align.max(a);
        }
        (offsets, offset.div_ceil(align) * align)
    }
}

pub struct Interface {
    pub kernels: Vec<Kernel>,
    pub structs: Vec<Struct>,
}

/// Reads every kernel and every by-value parameter struct from `sources` (sorted `.cu` files).
pub fn read(sources: &[PathBuf]) -> Result<Interface, String> {
    let mut kernels = Vec::new();
    let mut all_structs = Vec::new();
    let mut texts = Vec::new();
    for src in sources {
        let module = src.file_stem().unwrap().to_string_lossy().to_string();
        let raw = fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let text = strip_launch_bounds(&strip_comments(&raw));
        all_structs.extend(structs_in(&module, &text).map_err(|e| format!("{}: {e}", src.display()))?);
        texts.push((src.clone(), module, text, module_target(&raw)));
    }
    let struct_names: Vec<String> = all_structs.iter().map(|s| s.name.clone()).collect();
    for (src, module, text, target) in &texts {
        let found = kernels_in(module, text, &struct_names).map_err(|e| format!("{}: {e}", src.display()))?;
        kernels.extend(found.into_iter().map(|k| Kernel {
            target: target.clone(),
            ..k
        }));
    }
    // Only the structs kernels take by value cross the boundary.
    let used: Vec<String> = kernels
        .iter()
        .flat_map(|k| k.params.iter())
        .filter_map(|p| match &p.kind {
            ParamKind::Struct(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let used_structs: Vec<Struct> = all_structs
        .into_iter()
        .filter(|s| used.contains(&s.name))
        .collect();
    for s in &used_structs {
        let (_, _, text, _) = texts.iter().find(|(_, m, _, _)| *m == s.module).unwrap();
        if !text.contains(&format!("CHECK_LAYOUT({})", s.name)) {
            return Err(format!(
                "kernels/{}.cu: struct {} is passed to a kernel by value but has no `CHECK_LAYOUT({});` \
                 after its definition (the static_asserts that pin its layout to the Rust mirror)",
                s.module, s.name, s.name
            ));
        }
    }
    // A struct shared by two modules (each compiled alone, so each defines it) must be defined
    // the same way in both; it crosses once.
    let mut structs: Vec<Struct> = Vec::new();
    for s in used_structs {
        match structs.iter().find(|t| t.name == s.name) {
            Some(t) if format!("{:?}", t.fields) != format!("{:?}", s.fields) => {
                return Err(format!(
                    "struct {} is defined differently in kernels/{}.cu and kernels/{}.cu",
                    s.name, t.module, s.module
                ))
            }
            Some(_) => {}
            None => structs.push(s),
        }
    }
    let mut names: Vec<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("kernel {} is defined twice", w[0]));
    }
    Ok(Interface { kernels, structs })
}

fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            let end = r.find('\n').unwrap_or(r.len());
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("/*") {
            let end = r.find("*/").map(|e| e + 2).unwrap_or(r.len());
            out.push(' ');
            rest = &r[end..];
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Removes `__launch_bounds__(...)` (it sits between `void` and the kernel's name).
fn strip_launch_bounds(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("__launch_bounds__") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "__launch_bounds__".len()..];
        match after
            .find('(')
            .and_then(|open| matching(after, open).map(|close| close + 1))
        {
            Some(end) => rest = &after[end..],
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Index of the bracket closing the one at `open`.
fn matching(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let (o, c) = match bytes[open] {
        b'(' => (b'(', b')'),
        b'{' => (b'{', b'}'),
        _ => return None,
    };
    let mut depth = 0;
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        if b == o {
            depth += 1;
        } else if b == c {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// The architecture a module is built for alone, from its first line `// build: sm_XXa only`
/// (build.rs compiles it for that target only; the runtime loads it only where it runs). Only
/// an architecture-specific target ("a": sm_90a) qualifies, as in scripts/kernel-resources.sh.
pub fn module_target(source: &str) -> Option<String> {
    let first = source.lines().next()?.trim();
    let arch = first
        .strip_prefix("// build:")?
        .trim()
        .strip_suffix("only")?
        .trim();
    let digits = arch.strip_prefix("sm_")?.strip_suffix('a')?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| arch.to_string())
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn structs_in(module: &str, text: &str) -> Result<Vec<Struct>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("struct") {
        let at = from + i;
        from = at + 6;
        let before_ok = at == 0 || !is_ident_char(text[..at].chars().last().unwrap());
        let after = &text[at + 6..];
        if !before_ok || !after.starts_with(char::is_whitespace) {
            continue;
        }
        let after = after.trim_start();
        let name: String = after.chars().take_while(|&c| is_ident_char(c)).collect();
        let rest = after[name.len()..].trim_start();
        if name.is_empty() || !rest.starts_with('{') {
            continue;
        }
        let close = matching(rest, 0).ok_or_else(|| format!("struct {name}: unbalanced braces"))?;
        let body = &rest[1..close];
        // Structs with member functions (the functors of elementwise.cu) never cross to Rust.
        if body.contains('(') {
            continue;
        }
        let mut fields = Vec::new();
        for decl in body.split(';').map(str::trim).filter(|d| !d.is_empty()) {
            let (ty, declarators) = split_type(decl)
                .ok_or_else(|| format!("struct {name}: cannot read the field declaration `{decl}`"))?;
            let ty = Scalar::parse(&ty)
                .filter(|s| *s != Scalar::BF16)
                .ok_or_else(|| format!("struct {name}: field type `{ty}` is not a supported scalar"))?;
            for d in declarators.split(',').map(str::trim) {
                let (fname, len) = match d.find('[') {
                    Some(b) => {
                        let n = d[b + 1..d.len() - 1]
                            .trim()
                            .parse::<usize>()
                            .map_err(|_| format!("struct {name}: array length of `{d}` must be a literal"))?;
                        (d[..b].trim().to_string(), Some(n))
                    }
                    None => (d.to_string(), None),
                };
                fields.push(Field { name: fname, ty, len });
            }
        }
        out.push(Struct {
            module: module.into(),
            name,
            fields,
        });
    }
    Ok(out)
}

/// Splits `unsigned int a, b[4]` into (`unsigned int`, `a, b[4]`).
fn split_type(decl: &str) -> Option<(String, String)> {
    const TYPE_WORDS: &[&str] = &[
        "unsigned", "signed", "long", "int", "short", "char", "float", "double", "i64", "u64", "uint32_t",
        "int32_t", "uint64_t", "int64_t",
    ];
    let words: Vec<&str> = decl.split_whitespace().collect();
    let n = words.iter().take_while(|w| TYPE_WORDS.contains(w)).count();
    if n == 0 || n == words.len() {
        return None;
    }
    Some((words[..n].join(" "), words[n..].join(" ")))
}

fn kernels_in(module: &str, text: &str, structs: &[String]) -> Result<Vec<Kernel>, String> {
    let mut out = Vec::new();
    let marker = "__global__";
    let mut from = 0;
    while let Some(i) = text[from..].find(marker) {
        let at = from + i;
        from = at + marker.len();
        let head = text[..at].trim_end();
        if !head.ends_with("extern \"C\"") {
            return Err(format!(
                "a __global__ function near `{}` is not extern \"C\" (every kernel is, so the \
                 runtime can load it by name)",
                text[at..].chars().take(60).collect::<String>()
            ));
        }
        let rest = text[from..].trim_start();
        let rest = rest
            .strip_prefix("void")
            .ok_or_else(|| "a kernel does not return void".to_string())?
            .trim_start();
        let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
        let open = rest
            .find('(')
            .ok_or_else(|| format!("kernel {name}: no parameter list"))?;
        let close = matching(rest, open).ok_or_else(|| format!("kernel {name}: unbalanced parentheses"))?;
        let list = &rest[open + 1..close];
        let mut params = Vec::new();
        for p in list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "void")
        {
            params.push(parse_param(&name, p, structs)?);
        }
        let signature = format!(
            "{}({})",
            name,
            list.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        out.push(Kernel {
            module: module.into(),
            target: None,
            name,
            params,
            signature,
        });
    }
    Ok(out)
}

fn parse_param(kernel: &str, p: &str, structs: &[String]) -> Result<Param, String> {
    let spaced = p.replace('*', " * ");
    let mut words: Vec<&str> = spaced
        .split_whitespace()
        .filter(|w| *w != "__restrict__" && *w != "__restrict")
        .collect();
    let c_name = words
        .pop()
        .filter(|w| w.chars().all(is_ident_char))
        .ok_or_else(|| format!("kernel {kernel}: cannot read the parameter `{p}`"))?
        .to_string();
    let nullable = words.contains(&"NULLABLE");
    let stars = words.iter().filter(|w| **w == "*").count();
    let star_at = words.iter().position(|w| *w == "*");
    let is_const = words[..star_at.unwrap_or(words.len())].contains(&"const");
    let base: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !matches!(*w, "const" | "NULLABLE" | "*"))
        .collect();
    let base = base.join(" ");
    let bad = |what: &str| format!("kernel {kernel}: parameter `{p}`: {what}");
    let kind = match stars {
        0 => {
            if nullable {
                return Err(bad("NULLABLE applies to pointers only"));
            }
            if let Some(s) = Scalar::parse(&base).filter(|s| *s != Scalar::BF16) {
                ParamKind::Scalar(s)
            } else if structs.contains(&base) {
                ParamKind::Struct(base)
            } else {
                return Err(bad(&format!(
                    "type `{base}` is neither a supported scalar nor a parameter struct"
                )));
            }
        }
        1 => {
            let elem =
                Scalar::parse(&base).ok_or_else(|| bad(&format!("pointer to unsupported type `{base}`")))?;
            ParamKind::Pointer {
                elem,
                mutable: !is_const,
                nullable,
            }
        }
        _ => return Err(bad("pointers to pointers are not supported")),
    };
    Ok(Param { c_name, kind })
}

/// A Rust identifier for a C parameter name: lower case (the GEMM's `A`, `B`, `C`), and clear
/// of keywords and of the launcher's own `cfg` and builder `l`.
fn rust_ident(c_name: &str, taken: &[String]) -> String {
    let mut id = c_name.to_ascii_lowercase();
    const RESERVED: &[&str] = &[
        "as", "break", "const", "continue", "crate", "else", "enum", "extern", "fn", "for", "if", "impl",
        "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "self", "static",
        "struct", "super", "trait", "type", "unsafe", "use", "where", "while", "cfg", "l",
    ];
    while RESERVED.contains(&id.as_str()) || taken.contains(&id) {
        id.push('_');
    }
    id
}

/// The Rust side: parameter structs, the `Kernels` table and one launcher per kernel.
pub fn rust_code(iface: &Interface) -> String {
    let mut o = String::new();
    let w = &mut o;
    writeln!(
        w,
        "// Generated by build.rs (build/interface.rs) from kernels/*.cu. Do not edit."
    )
    .unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "/// The structs kernels take by value: `#[repr(C)]` mirrors generated from their CUDA definitions."
    )
    .unwrap();
    writeln!(w, "pub mod params {{").unwrap();
    for s in &iface.structs {
        let (offsets, size) = s.layout();
        writeln!(
            w,
            "    /// Generated from `struct {}` in `kernels/{}.cu` (C layout: {} bytes).",
            s.name, s.module, size
        )
        .unwrap();
        writeln!(w, "    #[repr(C)]").unwrap();
        let integral = s
            .fields
            .iter()
            .all(|f| !matches!(f.ty, Scalar::F32 | Scalar::F64));
        let eq = if integral { ", Eq, Hash" } else { "" };
        writeln!(w, "    #[derive(Clone, Copy, Debug, Default, PartialEq{eq})]").unwrap();
        writeln!(w, "    pub struct {} {{", s.name).unwrap();
        for (f, offset) in s.fields.iter().zip(&offsets) {
            let ty = match f.len {
                Some(n) => format!("[{}; {n}]", f.ty.rust()),
                None => f.ty.rust().to_string(),
            };
            let c_len = f.len.map(|n| format!("[{n}]")).unwrap_or_default();
            writeln!(
                w,
                "        /// `{} {}{c_len}` at byte {offset} (its meaning is documented at the CUDA definition).",
                f.ty.c(),
                f.name
            )
            .unwrap();
            writeln!(w, "        pub {}: {ty},", f.name).unwrap();
        }
        writeln!(w, "    }}").unwrap();
        writeln!(
            w,
            "    // SAFETY: plain old data with the C layout asserted below."
        )
        .unwrap();
        writeln!(
            w,
            "    unsafe impl cudarc::driver::DeviceRepr for {} {{}}",
            s.name
        )
        .unwrap();
        writeln!(w, "    const _: () = {{").unwrap();
        writeln!(w, "        assert!(std::mem::size_of::<{}>() == {size});", s.name).unwrap();
        for (f, off) in s.fields.iter().zip(&offsets) {
            writeln!(
                w,
                "        assert!(std::mem::offset_of!({}, {}) == {off});",
                s.name, f.name
            )
            .unwrap();
        }
        writeln!(w, "    }};").unwrap();
    }
    writeln!(w, "}}").unwrap();
    writeln!(w).unwrap();

    writeln!(
        w,
        "/// The functions of every kernel module, resolved once when the device opens."
    )
    .unwrap();
    writeln!(w, "struct KernelFunctions {{").unwrap();
    for k in &iface.kernels {
        match &k.target {
            None => writeln!(w, "    {}: cudarc::driver::CudaFunction,", k.name).unwrap(),
            Some(t) => writeln!(w, "    /// Built for {t} alone: `None` where its module did not load.\n    {}: Option<cudarc::driver::CudaFunction>,", k.name).unwrap(),
        }
    }
    writeln!(w, "}}").unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "/// Every kernel of `kernels/*.cu`, with a typed launcher each, generated from its CUDA"
    )
    .unwrap();
    writeln!(
        w,
        "/// signature: a call that disagrees with the kernel in argument count, order or types does"
    )
    .unwrap();
    writeln!(w, "/// not compile. All launches go to the device's one stream.").unwrap();
    writeln!(w, "pub struct Kernels {{").unwrap();
    writeln!(w, "    stream: std::sync::Arc<cudarc::driver::CudaStream>,").unwrap();
    writeln!(w, "    functions: KernelFunctions,").unwrap();
    writeln!(w, "}}").unwrap();
    writeln!(w).unwrap();
    writeln!(w, "impl Kernels {{").unwrap();
    writeln!(
        w,
        "    /// (module, kernel) names of every kernel, in source order."
    )
    .unwrap();
    writeln!(
        w,
        "    pub fn names() -> &'static [(&'static str, &'static str)] {{"
    )
    .unwrap();
    writeln!(w, "        &[").unwrap();
    for k in &iface.kernels {
        writeln!(w, "            ({:?}, {:?}),", k.module, k.name).unwrap();
    }
    writeln!(w, "        ]").unwrap();
    writeln!(w, "    }}").unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "    /// Whether `module` (a `kernels/*.cu` stem) is loaded on this device: always for a module"
    )
    .unwrap();
    writeln!(
        w,
        "    /// built for every architecture, only on its architecture for one built for one alone."
    )
    .unwrap();
    writeln!(w, "    pub fn module_loaded(&self, module: &str) -> bool {{").unwrap();
    writeln!(w, "        match module {{").unwrap();
    let mut seen: Vec<&str> = Vec::new();
    for k in &iface.kernels {
        if seen.contains(&k.module.as_str()) {
            continue;
        }
        seen.push(&k.module);
        match &k.target {
            None => writeln!(w, "            {:?} => true,", k.module).unwrap(),
            Some(_) => writeln!(
                w,
                "            {:?} => self.functions.{}.is_some(),",
                k.module, k.name
            )
            .unwrap(),
        }
    }
    writeln!(w, "            _ => false,").unwrap();
    writeln!(w, "        }}").unwrap();
    writeln!(w, "    }}").unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "    /// Loads every module through `load_module` and resolves every kernel in it. `load_module`"
    )
    .unwrap();
    writeln!(
        w,
        "    /// answers `None` for a module built for another architecture alone (its kernels are then"
    )
    .unwrap();
    writeln!(w, "    /// `None`); any other module must load.").unwrap();
    writeln!(w, "    pub(crate) fn load(").unwrap();
    writeln!(w, "        stream: std::sync::Arc<cudarc::driver::CudaStream>,").unwrap();
    writeln!(w, "        load_module: impl Fn(&str, Option<&str>) -> crate::error::Result<Option<std::sync::Arc<cudarc::driver::CudaModule>>>,").unwrap();
    writeln!(w, "    ) -> crate::error::Result<Kernels> {{").unwrap();
    let mut modules: Vec<(&str, Option<&str>)> = iface
        .kernels
        .iter()
        .map(|k| (k.module.as_str(), k.target.as_deref()))
        .collect();
    modules.dedup();
    for (m, target) in &modules {
        writeln!(w, "        let module = load_module({m:?}, {target:?})?;").unwrap();
        if target.is_none() {
            writeln!(w, "        let module = module.ok_or_else(|| crate::error::Error::GpuUnavailable(\"kernel module {m} did not load\".into()))?;").unwrap();
        }
        for k in iface.kernels.iter().filter(|k| k.module == *m) {
            let resolve = format!(
                "load_function({0:?}).map_err(|e| crate::error::Error::cuda(\"loading kernel {0} from kernels/{1}.cu\", e))",
                k.name, m
            );
            if target.is_none() {
                writeln!(w, "        let {} = module.{resolve}?;", k.name).unwrap();
            } else {
                writeln!(
                    w,
                    "        let {} = module.as_ref().map(|module| module.{resolve}).transpose()?;",
                    k.name
                )
                .unwrap();
            }
        }
    }
    writeln!(w, "        Ok(Kernels {{").unwrap();
    writeln!(w, "            stream,").unwrap();
    writeln!(w, "            functions: KernelFunctions {{").unwrap();
    for k in &iface.kernels {
        writeln!(w, "                {},", k.name).unwrap();
    }
    writeln!(w, "            }},").unwrap();
    writeln!(w, "        }})").unwrap();
    writeln!(w, "    }}").unwrap();

    for k in &iface.kernels {
        let mut taken = Vec::new();
        let mut args = Vec::new();
        let mut pushes = Vec::new();
        for p in &k.params {
            let id = rust_ident(&p.c_name, &taken);
            taken.push(id.clone());
            let (ty, push) = match &p.kind {
                ParamKind::Scalar(s) => (s.rust().to_string(), format!("l.arg(&{id});")),
                ParamKind::Struct(s) => (format!("params::{s}"), format!("l.arg(&{id});")),
                ParamKind::Pointer {
                    elem,
                    mutable,
                    nullable,
                } => {
                    let view = if *mutable {
                        format!("&mut cudarc::driver::CudaViewMut<'_, {}>", elem.rust())
                    } else {
                        format!("&cudarc::driver::CudaView<'_, {}>", elem.rust())
                    };
                    if *nullable {
                        (
                            format!("Option<{view}>"),
                            format!("match {id} {{ Some(v) => l.arg(v), None => l.arg(&NULL) }};"),
                        )
                    } else {
                        (view, format!("l.arg({id});"))
                    }
                }
            };
            args.push(format!("{id}: {ty}"));
            pushes.push(push);
        }
        writeln!(w).unwrap();
        writeln!(
            w,
            "    /// Launches `{}` from `kernels/{}.cu` on the device's stream.",
            k.signature, k.module
        )
        .unwrap();
        writeln!(w, "    ///").unwrap();
        writeln!(w, "    /// # Safety").unwrap();
        writeln!(w, "    /// `cfg` and the sizes passed must keep every access of the kernel inside the buffers given").unwrap();
        writeln!(w, "    /// (the kernel's launch contract, in its source file).").unwrap();
        writeln!(w, "    #[allow(clippy::too_many_arguments)]").unwrap();
        writeln!(
            w,
            "    pub unsafe fn {}(&self, cfg: cudarc::driver::LaunchConfig{}{}) -> crate::error::Result<()> {{",
            k.name,
            if args.is_empty() { "" } else { ", " },
            args.join(", ")
        )
        .unwrap();
        writeln!(w, "        use cudarc::driver::PushKernelArg;").unwrap();
        if k.params
            .iter()
            .any(|p| matches!(p.kind, ParamKind::Pointer { nullable: true, .. }))
        {
            writeln!(w, "        const NULL: u64 = 0; // a null device pointer").unwrap();
        }
        match &k.target {
            None => writeln!(
                w,
                "        let mut l = self.stream.launch_builder(&self.functions.{});",
                k.name
            )
            .unwrap(),
            Some(t) => writeln!(
                w,
                "        let f = self.functions.{0}.as_ref().ok_or_else(|| crate::error::Error::GpuUnavailable(\"kernel {0} (kernels/{1}.cu) is built for {t} alone and is not loaded on this GPU\".into()))?;\n        let mut l = self.stream.launch_builder(f);",
                k.name, k.module
            )
            .unwrap(),
        }
        for push in &pushes {
            writeln!(w, "        {push}").unwrap();
        }
        writeln!(
            w,
            "        unsafe {{ l.launch(cfg) }}.map_err(|e| crate::error::Error::cuda(\"launching {} (kernels/{}.cu)\", e))?;",
            k.name, k.module
        )
        .unwrap();
        writeln!(w, "        self.after_launch({:?}, {:?})", k.name, k.module).unwrap();
        writeln!(w, "    }}").unwrap();
    }
    writeln!(w, "}}").unwrap();
    o
}

/// The CUDA side of the layout check: `CHECK_LAYOUT(Name)` expands to `static_assert`s of the
/// size and every field offset computed here, the same numbers the Rust mirror asserts.
pub fn cuda_layout_header(iface: &Interface) -> String {
    let mut o = String::new();
    let w = &mut o;
    writeln!(w, "// Generated by build.rs (build/interface.rs). Do not edit.").unwrap();
    writeln!(w, "#pragma once").unwrap();
    for s in &iface.structs {
        let (offsets, size) = s.layout();
        let mut asserts = vec![format!(
            "static_assert(sizeof({0}) == {size}, \"{0}: size differs from its Rust mirror ({size} bytes)\")",
            s.name
        )];
        for (f, off) in s.fields.iter().zip(&offsets) {
            asserts.push(format!(
                "static_assert(offsetof({0}, {1}) == {off}, \"{0}.{1}: offset differs from its Rust mirror ({off})\")",
                s.name, f.name
            ));
        }
        writeln!(
            w,
            "#define EMPRIOR_LAYOUT_{} \\\n    {}",
            s.name,
            asserts.join("; \\\n    ")
        )
        .unwrap();
    }
    o
}

/// Writes the generated files into `out_dir` (only when they changed, so nvcc and rustc are not
/// rerun for nothing).
pub fn write(iface: &Interface, out_dir: &Path) {
    for (name, text) in [
        ("launchers.rs", rust_code(iface)),
        ("kernel_layouts.cuh", cuda_layout_header(iface)),
    ] {
        let path = out_dir.join(name);
        if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
}
