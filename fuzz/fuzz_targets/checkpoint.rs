//! The checkpoint reader (safetensors, its metadata and the network it describes) on arbitrary
//! bytes: Ok or an error, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let _ = emprior::io::checkpoint_from_bytes(bytes, path, emprior::DType::F32);
});
