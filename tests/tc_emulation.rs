//! The tensor-core kernels' index logic and pipeline, run on the CPU: tests/tc_emulator.cpp is
//! compiled against kernels/tc_index.cuh (the very functions the kernels use for tile orders, the
//! swizzle, the ldmatrix addressing, the epilogue's mapping, the im2col gathers, the split-K
//! ranges, and `tc_pipeline`, the order of copies, waits and barriers) and runs whole GEMMs and
//! convolutions through a model of cp.async (a copy lands at the wait that retires its group and
//! is seen by other threads after the next barrier), ldmatrix and mma.sync built from their PTX
//! definitions, with exact integer arithmetic. The Hopper kernels (kernels/conv_sm90a.cu) run
//! through it too, their stage MMAs as wgmma reading shared memory through their descriptors
//! (the 64-byte swizzle's canonical K-major layout, as the PTX ISA defines it). It flags a read of data not yet landed and
//! published or of the wrong K tile, and a stage overwritten while another warp may read it. It needs a C++17 compiler (`$CXX`, else
//! `c++`), which the Rust toolchain's linker already requires.

use std::path::Path;
use std::process::Command;

#[test]
fn tensor_core_index_logic_matches_exactly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("tests/tc_emulator.cpp");
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tc_emulator");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-Wall", "-Werror"])
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler '{cxx}' (set CXX): {e}"));
    assert!(
        build.status.success(),
        "{cxx} failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().expect("running the emulator");
    let out = String::from_utf8_lossy(&run.stdout);
    println!("{out}");
    assert!(
        run.status.success() && out.contains("all cases match"),
        "the emulation failed:\n{out}"
    );
    // Every case ran: 3 GEMMs, 7 convolutions in 3 passes, and the input gradients of the 4 at
    // stride 2 by parity class; then on wgmma the 7 forwards and input gradients and the 4 by
    // parity class.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        28 + 18,
        "{out}"
    );
}
