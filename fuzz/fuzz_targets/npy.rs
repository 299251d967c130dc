//! The .npy reader on arbitrary bytes: Ok or an error, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = emprior::io::parse_npy(bytes, std::path::Path::new("fuzz.npy"));
});
