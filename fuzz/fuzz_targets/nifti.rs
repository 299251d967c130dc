//! The NIfTI-1 reader on arbitrary bytes (plain, and through the gzip path of `read`): Ok or an
//! error, never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = emprior::data::nifti::parse(bytes);
});
