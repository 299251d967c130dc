//! The kernel interface generated from the CUDA sources (build/interface.rs): the parser reads
//! every kernel, rejects what it cannot map to Rust, and computes the C layouts that both
//! compilers are made to assert.

#[path = "../build/interface.rs"]
#[allow(dead_code)]
mod interface;

use std::path::PathBuf;

use emprior::device::{params, Kernels};

fn sources() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

fn write_cu(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("emprior-iface-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.cu"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn every_global_function_gets_a_launcher() {
    let iface = interface::read(&sources()).unwrap();
    let globals: usize = sources()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().matches("__global__").count())
        .sum();
    assert_eq!(iface.kernels.len(), globals);
    let names: Vec<&str> = Kernels::names().iter().map(|(_, k)| *k).collect();
    let parsed: Vec<&str> = iface.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, parsed, "the compiled table and a fresh parse disagree");
}

#[test]
fn computed_layouts_are_the_rust_mirrors_layouts() {
    let iface = interface::read(&sources()).unwrap();
    let size_of = |name: &str| iface.structs.iter().find(|s| s.name == name).unwrap().layout().1;
    assert_eq!(size_of("GemmParams"), std::mem::size_of::<params::GemmParams>());
    assert_eq!(
        size_of("GemmParams"),
        64,
        "6 ints, 3 i64 (aligned to 24), int, 2 floats, padded to 8"
    );
    assert_eq!(
        size_of("PermuteParams"),
        std::mem::size_of::<params::PermuteParams>()
    );
    assert_eq!(
        size_of("ConvGeometry"),
        std::mem::size_of::<params::ConvGeometry>()
    );
    assert_eq!(
        size_of("AdamKernelParams"),
        std::mem::size_of::<params::AdamKernelParams>()
    );
}

#[test]
fn signatures_map_to_typed_parameters() {
    let p = write_cu(
        "sig",
        "#include \"common.cuh\"\nstruct P { int a; double b; float c[3]; };\nCHECK_LAYOUT(P);\n\
         // a comment with __global__ in it is ignored\n\
         extern \"C\" __global__ void __launch_bounds__(128) k(const float* __restrict__ x, float* y,\n\
             NULLABLE const double* z, i64 n, unsigned int u, P p) {}\n",
    );
    let iface = interface::read(&[p]).unwrap();
    let k = &iface.kernels[0];
    assert_eq!(k.name, "k");
    use interface::{ParamKind, Scalar};
    let kinds: Vec<&ParamKind> = k.params.iter().map(|p| &p.kind).collect();
    assert_eq!(
        kinds,
        vec![
            &ParamKind::Pointer {
                elem: Scalar::F32,
                mutable: false,
                nullable: false
            },
            &ParamKind::Pointer {
                elem: Scalar::F32,
                mutable: true,
                nullable: false
            },
            &ParamKind::Pointer {
                elem: Scalar::F64,
                mutable: false,
                nullable: true
            },
            &ParamKind::Scalar(Scalar::I64),
            &ParamKind::Scalar(Scalar::U32),
            &ParamKind::Struct("P".into()),
        ]
    );
    // int at 0, double at 8, float[3] at 16..28, padded to 32.
    let (offsets, size) = iface.structs[0].layout();
    assert_eq!((offsets, size), (vec![0, 8, 16], 32));
    let code = interface::rust_code(&iface);
    assert!(code.contains("pub c: [f32; 3]"), "{code}");
    assert!(
        code.contains("z: Option<&cudarc::driver::CudaView<'_, f64>>"),
        "{code}"
    );
}

#[test]
fn bf16_pointers_map_to_half_bf16_views() {
    let p = write_cu(
        "bf16",
        "extern \"C\" __global__ void k(const __nv_bfloat16* a, NULLABLE __nv_bfloat16* c) {}\n",
    );
    let iface = interface::read(&[p]).unwrap();
    use interface::{ParamKind, Scalar};
    let kinds: Vec<&ParamKind> = iface.kernels[0].params.iter().map(|p| &p.kind).collect();
    assert_eq!(
        kinds,
        vec![
            &ParamKind::Pointer {
                elem: Scalar::BF16,
                mutable: false,
                nullable: false
            },
            &ParamKind::Pointer {
                elem: Scalar::BF16,
                mutable: true,
                nullable: true
            },
        ]
    );
    let code = interface::rust_code(&iface);
    assert!(
        code.contains("a: &cudarc::driver::CudaView<'_, half::bf16>"),
        "{code}"
    );
    assert!(
        code.contains("c: Option<&mut cudarc::driver::CudaViewMut<'_, half::bf16>>"),
        "{code}"
    );
}

#[test]
fn what_cannot_be_mapped_is_refused_with_its_name() {
    let cases = [
        (
            "extern \"C\" __global__ void k(half* x) {}",
            "pointer to unsupported type `half`",
        ),
        (
            "extern \"C\" __global__ void k(float** x) {}",
            "pointers to pointers",
        ),
        ("extern \"C\" __global__ void k(Q q) {}", "type `Q`"),
        ("__global__ void k(float* x) {}", "not extern \"C\""),
        (
            "struct S { int a; };\nextern \"C\" __global__ void k(S s) {}",
            "no `CHECK_LAYOUT(S);`",
        ),
        (
            "extern \"C\" __global__ void k(NULLABLE int n) {}",
            "NULLABLE applies to pointers only",
        ),
        // bf16 crosses only behind a pointer (tensor-core operands), never by value.
        (
            "extern \"C\" __global__ void k(__nv_bfloat16 v) {}",
            "neither a supported scalar nor a parameter struct",
        ),
        (
            "struct S { __nv_bfloat16 a; };\nCHECK_LAYOUT(S);\nextern \"C\" __global__ void k(S s) {}",
            "struct S: ",
        ),
    ];
    for (i, (src, expected)) in cases.iter().enumerate() {
        let p = write_cu(&format!("bad{i}"), src);
        let err = interface::read(&[p])
            .err()
            .unwrap_or_else(|| panic!("accepted: {src}"));
        assert!(err.contains(expected), "{src}: {err}");
    }
}

#[test]
fn a_module_built_for_one_architecture_is_marked_and_its_structs_shared() {
    assert_eq!(
        interface::module_target("// build: sm_90a only\n#include \"common.cuh\"\n").as_deref(),
        Some("sm_90a")
    );
    assert_eq!(interface::module_target("// build sm_90a\n"), None);
    assert_eq!(interface::module_target("// build: sm_90 only\n"), None);
    assert_eq!(interface::module_target("#include \"common.cuh\"\n"), None);
    // The wgmma kernels: their module alone is sm_90a, and ConvGeometry crosses once.
    let iface = interface::read(&sources()).unwrap();
    let hopper: Vec<&str> = iface
        .kernels
        .iter()
        .filter(|k| k.target.as_deref() == Some("sm_90a"))
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(
        hopper,
        [
            "conv3x3_fprop_wgmma",
            "conv3x3_dgrad_wgmma",
            "conv3x3_dgrad_s2_wgmma"
        ]
    );
    assert!(iface
        .kernels
        .iter()
        .all(|k| (k.module == "conv_sm90a") == k.target.is_some()));
    assert_eq!(
        iface.structs.iter().filter(|s| s.name == "ConvGeometry").count(),
        1
    );
    // The same struct defined two ways in two modules is refused, by name.
    let body = |fields: &str| {
        format!(
            "#include \"common.cuh\"\nstruct G {{ {fields} }};\nCHECK_LAYOUT(G);\n\
             extern \"C\" __global__ void k_{}(G g) {{}}\n",
            fields.len()
        )
    };
    let a = write_cu("shared_a", &body("int n;"));
    let b = write_cu("shared_b", &body("int n; int h;"));
    let err = interface::read(&[a.clone(), b]).err().unwrap();
    assert!(err.contains("struct G is defined differently"), "{err}");
    let c = write_cu("shared_c", &body("int n; "));
    assert_eq!(interface::read(&[a, c]).unwrap().structs.len(), 1);
}
