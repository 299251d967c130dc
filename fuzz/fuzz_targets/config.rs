//! The configuration parser and its validation on arbitrary text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    if let Ok(cfg) = emprior::em::Config::parse(&text, "fuzz") {
        let _ = cfg.validate();
    }
});
