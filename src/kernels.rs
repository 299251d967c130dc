//! The CUDA kernels embedded by build.rs, and what the build knows about them.

/// One compiled `kernels/<name>.cu`: a fatbin (SASS per architecture plus PTX for the newest)
/// and a stand-alone PTX for the JIT fallback.
pub struct KernelModule {
    /// The file stem, e.g. `"adam"` for `kernels/adam.cu`; the key [`module`] looks up.
    pub name: &'static str,
    /// `Some("sm_90a")` for a module built for that architecture alone (its first line says
    /// `// build: sm_90a only`): the device loads it only on a GPU of that architecture.
    pub target: Option<&'static str>,
    /// The PTX ISA version of `ptx` (its `.version` line, e.g. `"9.0"`); quoted in load errors,
    /// since a driver older than this ISA cannot JIT it.
    pub ptx_isa: &'static str,
    /// The module as PTX source for one virtual architecture (`EMPRIOR_PTX_ARCH`, default
    /// `compute_80`), JIT-compiled by the driver when the fatbin does not load.
    pub ptx: &'static str,
    /// The fatbin image: SASS for each architecture in the build, plus PTX for the newest.
    pub fatbin: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// True when this binary carries compiled CUDA kernels.
pub fn kernels_embedded() -> bool {
    !KERNEL_MODULES.is_empty()
}

/// The embedded module called `name`.
pub fn module(name: &str) -> Option<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.name == name)
}

/// A one-paragraph description of the build, as `emprior info` prints it.
pub fn build_summary() -> String {
    if kernels_embedded() {
        let isa = KERNEL_MODULES.first().map(|m| m.ptx_isa).unwrap_or("?");
        format!(
            "kernels embedded: yes ({} modules: {}); nvcc {}; SASS for {}; PTX ISA {}",
            KERNEL_MODULES.len(),
            KERNEL_MODULES
                .iter()
                .map(|m| match m.target {
                    Some(t) => format!("{} ({t} only)", m.name),
                    None => m.name.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", "),
            NVCC_VERSION.unwrap_or("?"),
            SASS_ARCHS.join(", "),
            isa
        )
    } else {
        format!(
            "kernels embedded: no (CPU-only build: {}; {} kernel sources not compiled: {}). \
             Run scripts/install-cuda-toolkit.sh and rebuild for the GPU path.",
            CPU_ONLY_REASON.unwrap_or("no toolkit"),
            KERNEL_SOURCE_NAMES.len(),
            KERNEL_SOURCE_NAMES.join(", ")
        )
    }
}

/// One line for a command's header: what the binary carries for a GPU.
pub fn kernels_line() -> String {
    if kernels_embedded() {
        format!(
            "{} CUDA modules (nvcc {}, SASS for {})",
            KERNEL_MODULES.len(),
            NVCC_VERSION.unwrap_or("?"),
            SASS_ARCHS.join(", ")
        )
    } else {
        format!(
            "none (CPU-only build: {})",
            CPU_ONLY_REASON.unwrap_or("no toolkit")
        )
    }
}

/// The git commit this binary was built from (12 hex digits), when it was built in a checkout.
pub const COMMIT: Option<&str> = match env!("EMPRIOR_COMMIT").as_bytes() {
    [] => None,
    _ => Some(env!("EMPRIOR_COMMIT")),
};

/// "emprior 0.1.0 (commit abc123def456)", or without the commit when unknown.
pub fn version_line() -> String {
    match COMMIT {
        Some(c) => format!("emprior {} (commit {c})", env!("CARGO_PKG_VERSION")),
        None => format!("emprior {}", env!("CARGO_PKG_VERSION")),
    }
}
