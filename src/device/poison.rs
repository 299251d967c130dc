//! Poison mode: every buffer an op receives uninitialised is filled with a pattern no correct op
//! can leave behind, so a read before a write shows up as NaN in the result, on the CPU as on the
//! GPU, instead of passing on zeros (the CPU) or on whatever the pool recycled (the GPU).
//!
//! The pattern is all bits set: NaN for f32, f64 and bf16, the largest value for unsigned
//! integers and -1 for signed ones (an index nothing can use). On the CPU the float tensors are
//! filled with that NaN; on the GPU every buffer the pool hands out, fresh from the driver or
//! recycled, is memset to 0xFF first.
//!
//! Off by default. `EMPRIOR_POISON=1` turns it on for a process (the repository's
//! `.cargo/config.toml` sets it for every cargo command, so every test run and CI is poisoned);
//! `EMPRIOR_POISON=0` or [`set_poison`] turn it off, as the benchmarks do (on the GPU it costs a
//! memset per allocation).

use std::sync::atomic::{AtomicU8, Ordering};

const UNREAD: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNREAD);

/// The byte every poisoned buffer is filled with.
pub const POISON_BYTE: u8 = 0xFF;

/// True when uninitialised buffers are poisoned (first call reads `EMPRIOR_POISON`).
pub fn poison_enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = super::env_flag("EMPRIOR_POISON");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns poison mode on or off for the rest of the process (overrides `EMPRIOR_POISON`).
pub fn set_poison(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}
