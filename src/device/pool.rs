//! A caching allocator for device memory: buffers are rounded to a size class and, when dropped,
//! go back to a free list of that class instead of to the driver. After the first iteration of
//! a fixed-shape loop every allocation is a free-list hit, so hot loops never call cuMemAlloc.
//!
//! All work runs on the device's one stream, so a buffer released while kernels that read it are
//! still queued can be handed to the next op at once: stream order makes that op run after them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{Error, Result};

/// What the pool has done so far; `device_allocations` staying flat across iterations is the
/// check that a loop does not allocate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Calls to the driver's allocator (cache misses).
    pub device_allocations: u64,
    /// Allocations served from the free lists.
    pub reuses: u64,
    /// Bytes (by size class) currently handed out.
    pub bytes_in_use: usize,
    /// Bytes held in the free lists.
    pub bytes_cached: usize,
    /// The largest `bytes_in_use` seen.
    pub peak_bytes_in_use: usize,
}

pub struct DevicePool {
    stream: Arc<CudaStream>,
    inner: Mutex<PoolInner>,
}

#[derive(Default)]
struct PoolInner {
    free: BTreeMap<usize, Vec<CudaSlice<u8>>>,
    stats: PoolStats,
}

/// Rounds a request up to its size class: 256-byte steps up to 64 KiB, then sixteenths of the
/// next power of two (at most 12.5% slack), so loops with slightly varying sizes still hit the
/// cache.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= 64 << 10 {
        return bytes.div_ceil(256) * 256;
    }
    let step = (bytes.next_power_of_two() / 16).max(256);
    bytes.div_ceil(step) * step
}

impl DevicePool {
    pub fn new(stream: Arc<CudaStream>) -> Self {
        DevicePool {
            stream,
            inner: Mutex::new(PoolInner::default()),
        }
    }

    /// A buffer of at least `bytes` bytes, contents undefined (all bytes 0xFF in poison mode).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<PooledBuffer> {
        let class = size_class(bytes);
        let cached = {
            let mut inner = self.inner.lock().unwrap();
            let hit = inner.free.get_mut(&class).and_then(Vec::pop);
            if hit.is_some() {
                inner.stats.reuses += 1;
                inner.stats.bytes_cached -= class;
            }
            hit
        };
        let mut slice = match cached {
            Some(s) => s,
            None => self.alloc_from_driver(class)?,
        };
        if super::poison_enabled() {
            self.poison(&mut slice)?;
        }
        let mut inner = self.inner.lock().unwrap();
        inner.stats.bytes_in_use += class;
        inner.stats.peak_bytes_in_use = inner.stats.peak_bytes_in_use.max(inner.stats.bytes_in_use);
        Ok(PooledBuffer {
            slice: Some(slice),
            bytes,
            pool: self.clone(),
        })
    }

    fn alloc_from_driver(&self, class: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the pool hands out uninitialised memory by contract; every op writes its output
        // before anything reads it (poison mode checks that contract).
        let first = unsafe { self.stream.alloc::<u8>(class) };
        let slice = match first {
            Ok(s) => s,
            Err(_) => {
                // Out of memory with buffers parked in the cache: give them back and retry once.
                // cudarc frees with cuMemFreeAsync into the driver's stream-ordered pool, which
                // releases the memory only at a synchronisation: wait for it before retrying.
                self.trim();
                super::note_sync();
                self.stream
                    .synchronize()
                    .map_err(|e| Error::cuda("synchronizing after trimming the memory pool", e))?;
                unsafe { self.stream.alloc::<u8>(class) }
                    .map_err(|e| Error::cuda(format!("allocating {class} bytes of device memory"), e))?
            }
        };
        self.inner.lock().unwrap().stats.device_allocations += 1;
        Ok(slice)
    }

    /// Fills a buffer with the poison pattern (all bits set: NaN for every float type), queued on
    /// the stream, so an op that reads its output before writing it yields NaN.
    fn poison(&self, slice: &mut CudaSlice<u8>) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::cuda("binding the context to poison a buffer", e))?;
        let bytes = slice.num_bytes();
        let (ptr, _record) = slice.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` is a live allocation of `bytes` bytes owned by this pool, on our stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(ptr, super::POISON_BYTE, bytes, self.stream.cu_stream())
        }
        .map_err(|e| Error::cuda(format!("poisoning {bytes} bytes of device memory"), e))
    }

    fn release(&self, slice: CudaSlice<u8>) {
        let class = slice.len();
        let mut inner = self.inner.lock().unwrap();
        inner.stats.bytes_in_use -= class;
        inner.stats.bytes_cached += class;
        inner.free.entry(class).or_default().push(slice);
    }

    /// Returns every cached buffer to the driver.
    pub fn trim(&self) {
        // cudarc frees without making the context current; this may run on any thread.
        let _ = self.stream.context().bind_to_thread();
        let freed = {
            let mut inner = self.inner.lock().unwrap();
            inner.stats.bytes_cached = 0;
            std::mem::take(&mut inner.free)
        };
        drop(freed);
    }

    pub fn stats(&self) -> PoolStats {
        self.inner.lock().unwrap().stats
    }
}

/// Device memory on loan from a [`DevicePool`]; goes back to the pool's free list when dropped.
pub struct PooledBuffer {
    slice: Option<CudaSlice<u8>>,
    bytes: usize,
    pool: Arc<DevicePool>,
}

impl PooledBuffer {
    /// The requested size in bytes (the allocation may be larger).
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    pub fn slice(&self) -> &CudaSlice<u8> {
        self.slice.as_ref().expect("live buffer")
    }

    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        self.slice.as_mut().expect("live buffer")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.pool.release(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_bounded_slack() {
        for bytes in [
            1usize,
            255,
            256,
            257,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            3_000_000,
            1 << 30,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c % 256 == 0, "{bytes} -> {c}");
            assert!(
                (c - bytes) as f64 <= (bytes as f64 * 0.125).max(255.0),
                "{bytes} -> {c}"
            );
        }
        assert_eq!(size_class(1000), size_class(1024));
    }
}
