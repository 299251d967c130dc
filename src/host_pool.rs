//! Recycled host buffers for the CPU backend's tensors. Every op allocates its output, and a
//! fresh buffer costs a memset (an uninitialised tensor is zero-filled: Rust has no safe
//! uninitialised float buffer) plus allocator work: 10-15% of a manifold E-step. A dropped
//! tensor's buffer goes to a cache keyed by its length, and `Tensor::uninit` of the same length
//! takes it back with its stale (initialised, meaningless) contents, which ops overwrite; in
//! poison mode it is refilled with NaN as before. Only buffers of at least `MIN_BYTES` are kept,
//! at most `PER_LENGTH` per length and `MAX_BYTES` in all, so the cache never holds more than a
//! step's worth of activations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};

const MIN_BYTES: usize = 64 << 10;
const PER_LENGTH: usize = 16;
const MAX_BYTES: usize = 1 << 30;

/// The free buffers by length, per float type.
#[derive(Default)]
pub struct Cache {
    f32: HashMap<usize, Vec<Vec<f32>>>,
    f64: HashMap<usize, Vec<Vec<f64>>>,
    bytes: usize,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Default::default);
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns recycling on or off for the whole process; off also empties the cache. For measuring
/// what the ops themselves allocate (tests/memory_peak.rs counts real allocations).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    if !on {
        let mut cache = lock();
        *cache = Cache::default();
    }
}

/// A float type whose buffers are cached.
pub trait Recycled: Sized + Copy {
    /// The cache's free buffers of this type, keyed by length in elements.
    fn shelf(cache: &mut Cache) -> &mut HashMap<usize, Vec<Vec<Self>>>;
}

impl Recycled for f32 {
    fn shelf(cache: &mut Cache) -> &mut HashMap<usize, Vec<Vec<f32>>> {
        &mut cache.f32
    }
}

impl Recycled for f64 {
    fn shelf(cache: &mut Cache) -> &mut HashMap<usize, Vec<Vec<f64>>> {
        &mut cache.f64
    }
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    // A panic elsewhere while holding the lock leaves the cache consistent (every update is one
    // push or pop with its byte count), so a poisoned lock is still usable.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A cached buffer of exactly `n` elements, if one is free.
pub fn take<T: Recycled>(n: usize) -> Option<Vec<T>> {
    if n * size_of::<T>() < MIN_BYTES || !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let mut cache = lock();
    let v = T::shelf(&mut cache).get_mut(&n)?.pop()?;
    cache.bytes -= n * size_of::<T>();
    Some(v)
}

/// Hands a buffer back; dropped instead when it is small or the cache is full.
pub fn give<T: Recycled>(v: Vec<T>) {
    let bytes = v.len() * size_of::<T>();
    if bytes < MIN_BYTES || !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let mut cache = lock();
    if cache.bytes + bytes > MAX_BYTES {
        return;
    }
    let shelf = T::shelf(&mut cache).entry(v.len()).or_default();
    if shelf.len() < PER_LENGTH {
        shelf.push(v);
        cache.bytes += bytes;
    }
}

/// Bytes held by the cache now.
pub fn cached_bytes() -> usize {
    lock().bytes
}

/// MemAvailable from /proc/meminfo (None where it cannot be read).
pub fn available_bytes() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// An error that names `what`, the bytes it needs and the bytes available, when the host has
/// less memory left than that: checked before a large allocation, so a size from a
/// configuration or a file never reaches the allocator's abort.
pub fn ensure_available(what: &str, bytes: usize) -> crate::error::Result<()> {
    match available_bytes() {
        Some(a) if bytes > a => Err(crate::error::Error::Other(format!(
            "{what} needs {:.2} GB of host memory and {:.2} GB is available",
            bytes as f64 / 1e9,
            a as f64 / 1e9
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_by_length_and_small_ones_are_not_kept() {
        let n = (MIN_BYTES / 4) * 3 + 1;
        let mut v = vec![0.0f32; n];
        v[0] = 7.0;
        let ptr = v.as_ptr();
        give(v);
        assert!(take::<f32>(n + 1).is_none());
        assert!(take::<f64>(n).is_none());
        let back = take::<f32>(n).expect("the buffer given back");
        assert_eq!((back.as_ptr(), back.len(), back[0]), (ptr, n, 7.0));
        give(vec![1.0f32; 8]);
        assert!(take::<f32>(8).is_none());
    }
}
