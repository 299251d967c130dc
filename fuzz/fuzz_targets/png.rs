//! The PNG decoder path of the image datasets on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = std::path::Path::new("fuzz.png");
    let _ = emprior::data::cifar10::decode_png_bytes(bytes, path);
});
