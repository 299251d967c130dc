//! A caching allocator for device memory: buffers are rounded to a size class and, when dropped,
//! go back to a free list of that class instead of to the driver. After the first iteration of
//! a fixed-shape loop every allocation is a free-list hit, so hot loops never call cuMemAlloc.
//!
//! All work runs on the device's one stream, so a buffer released while kernels that read it are
//! still queued can be handed to the next op at once: stream order makes that op run after them.
//!
//! A free list serves only its own class, so a pool that only grows keeps, per class, the most
//! buffers that were ever out at once: after one MRI training step at batch 256, 56 GiB of
//! activation buffers of which at most 45 GiB are out at once (102 and 65 GiB before the
//! convolutions built their columns in chunks; `emprior model --preset mri --batch 256`). Hence
//! a limit on the bytes the pool holds (out plus cached), by default the device memory free
//! when the pool starts less some headroom: a new buffer that would pass it first releases
//! cached buffers, least recently returned first. cudarc frees them stream-ordered, so the
//! driver can hand their memory to the allocation that follows on the same stream without a
//! synchronisation.
//!
//! Phases label parts of a run (an E-step, an M-step): each keeps its own peaks, and entering one
//! releases the cache the previous one built, so the two do not each hold their own buffers for
//! the whole run.
//!
//! While a CUDA graph is captured (device/graph.rs) the pool is frozen: every buffer must come
//! from the cache (a miss is an error: the step is run once eagerly first, so it should find
//! all it needs), nothing is given back to the driver, and what comes back goes to the capture's
//! own arena. At the end the arena belongs to the graph, whose replays write those addresses:
//! eager code never gets them until the graph is dropped. A buffer lent during the capture and
//! still out at its end would be written by every replay behind its holder's back, so it makes
//! the capture fail.
//!
//! The bookkeeping ([`PoolBook`]) is apart from the driver calls: it decides, the pool allocates
//! and frees. Tests and [`PoolStats::replay`] run it without a GPU.

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
    /// The largest `bytes_in_use + bytes_cached` seen: the most device memory the pool held.
    pub peak_bytes_held: usize,
    /// Cached buffers given back to the driver (to stay under the limit, on entering a phase,
    /// or by a trim).
    pub releases: u64,
}

/// One phase's figures, over every time it was entered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseStats {
    /// The phase's label, as given to `set_pool_phase` (e.g. `"e-step"`).
    pub name: &'static str,
    /// The most bytes (by size class) handed out at once while the phase was current.
    pub peak_bytes_in_use: usize,
    /// The most bytes held (handed out plus cached) while the phase was current.
    pub peak_bytes_held: usize,
    /// Driver allocations (cache misses) in the phase.
    pub device_allocations: u64,
    /// Allocations served from the free lists in the phase.
    pub reuses: u64,
}

/// A pool's bookkeeping, over buffers of any kind `B` (device slices in the pool; markers in
/// tests and replays): the free lists, the statistics, the limit and the phases.
pub struct PoolBook<B> {
    /// Size class -> cached buffers with the order they came back in, oldest first.
    free: BTreeMap<usize, Vec<(u64, B)>>,
    returned: u64,
    limit: Option<usize>,
    stats: PoolStats,
    /// The largest `bytes_in_use` since the last `reset_peak`.
    peak_since_reset: usize,
    phases: Vec<PhaseStats>,
    phase: Option<usize>,
    capture: Option<Capture<B>>,
    captures: u64,
}

/// A capture in progress: its number (tags the buffers lent in it), its arena (what came back
/// during it, served first to its own requests) and the buffers it lent that are still out.
struct Capture<B> {
    id: u64,
    arena: BTreeMap<usize, Vec<B>>,
    outstanding: i64,
}

/// What a capture leaves: the arena the graph keeps, and how many buffers lent during the capture
/// were still out at its end (a capture with any is refused).
pub struct CaptureEnd<B> {
    /// Every buffer the graph's replays may touch.
    pub arena: Vec<B>,
    /// Buffers lent during the capture and not given back.
    pub escaped: i64,
}

impl<B> PoolBook<B> {
    /// With `limit`, the bytes held (out plus cached) that a new buffer may not push past while
    /// cached buffers can be released instead.
    pub fn new(limit: Option<usize>) -> Self {
        PoolBook {
            free: BTreeMap::new(),
            returned: 0,
            limit,
            stats: PoolStats::default(),
            peak_since_reset: 0,
            phases: Vec::new(),
            phase: None,
            capture: None,
            captures: 0,
        }
    }

    /// Starts a capture: returns its tag for the buffers lent in it (never 0), or None when one
    /// is already in progress.
    pub fn begin_capture(&mut self) -> Option<u64> {
        if self.capture.is_some() {
            return None;
        }
        self.captures += 1;
        self.capture = Some(Capture {
            id: self.captures,
            arena: BTreeMap::new(),
            outstanding: 0,
        });
        Some(self.captures)
    }

    /// The tag of the capture in progress (0: none).
    pub fn capturing(&self) -> u64 {
        self.capture.as_ref().map_or(0, |c| c.id)
    }

    /// Ends the capture in progress: its arena, now counted as handed out (to the graph).
    pub fn end_capture(&mut self) -> CaptureEnd<B> {
        let Some(c) = self.capture.take() else {
            return CaptureEnd {
                arena: Vec::new(),
                escaped: 0,
            };
        };
        let mut arena = Vec::new();
        for (class, list) in c.arena {
            for b in list {
                self.stats.bytes_cached -= class;
                self.stats.bytes_in_use += class;
                arena.push(b);
            }
        }
        CaptureEnd {
            arena,
            escaped: c.outstanding,
        }
    }

    fn held(&self) -> usize {
        self.stats.bytes_in_use + self.stats.bytes_cached
    }

    fn lent(&mut self, class: usize, new: bool) {
        let s = &mut self.stats;
        s.bytes_in_use += class;
        s.peak_bytes_in_use = s.peak_bytes_in_use.max(s.bytes_in_use);
        let held = s.bytes_in_use + s.bytes_cached;
        s.peak_bytes_held = s.peak_bytes_held.max(held);
        self.peak_since_reset = self.peak_since_reset.max(s.bytes_in_use);
        if let Some(p) = self.phase.map(|i| &mut self.phases[i]) {
            p.peak_bytes_in_use = p.peak_bytes_in_use.max(s.bytes_in_use);
            p.peak_bytes_held = p.peak_bytes_held.max(held);
            if new {
                p.device_allocations += 1;
            } else {
                p.reuses += 1;
            }
        }
    }

    /// A cached buffer of `class`, now counted as handed out; None on a miss. During a capture,
    /// from its arena first.
    pub fn take(&mut self, class: usize) -> Option<B> {
        let Some(c) = self.capture.as_mut() else {
            return self.take_shared(class);
        };
        let buf = match c.arena.get_mut(&class).and_then(|l| l.pop()) {
            Some(b) => {
                self.reused(class);
                b
            }
            None => self.take_shared(class)?,
        };
        self.capture.as_mut().expect("capturing").outstanding += 1;
        Some(buf)
    }

    fn take_shared(&mut self, class: usize) -> Option<B> {
        let list = self.free.get_mut(&class)?;
        let (_, buf) = list.pop()?;
        if list.is_empty() {
            self.free.remove(&class);
        }
        self.reused(class);
        Some(buf)
    }

    /// A cached buffer of `class` is handed out again.
    fn reused(&mut self, class: usize) {
        self.stats.reuses += 1;
        self.stats.bytes_cached -= class;
        self.lent(class, false);
    }

    /// Before a new buffer of `class`: the cached buffers to give back to the driver, least
    /// recently returned first, so that the pool stays within its limit.
    pub fn make_room(&mut self, class: usize) -> Vec<B> {
        let mut out = Vec::new();
        let Some(limit) = self.limit.filter(|_| self.capture.is_none()) else {
            return out;
        };
        while self.held() + class > limit {
            // The class whose oldest buffer came back first.
            let oldest = self
                .free
                .iter()
                .min_by_key(|(_, list)| list[0].0)
                .map(|(&c, _)| c);
            let Some(c) = oldest else { break };
            let list = self.free.get_mut(&c).expect("a cached class");
            out.push(list.remove(0).1);
            if list.is_empty() {
                self.free.remove(&c);
            }
            self.stats.bytes_cached -= c;
            self.stats.releases += 1;
        }
        out
    }

    /// A new buffer of `class` from the driver is handed out.
    pub fn lent_new(&mut self, class: usize) {
        self.stats.device_allocations += 1;
        self.lent(class, true);
    }

    /// A buffer of `class` comes back to the cache (during a capture, to its arena). `tag` is
    /// the capture it was lent in (0: none).
    pub fn give_back(&mut self, class: usize, buf: B, tag: u64) {
        self.stats.bytes_in_use -= class;
        self.stats.bytes_cached += class;
        if let Some(c) = self.capture.as_mut() {
            if tag == c.id {
                c.outstanding -= 1;
            }
            c.arena.entry(class).or_default().push(buf);
            return;
        }
        self.returned += 1;
        self.free.entry(class).or_default().push((self.returned, buf));
    }

    /// Every cached buffer, to give back to the driver (none during a capture: a free would be
    /// captured too).
    pub fn drain(&mut self) -> Vec<B> {
        if self.capture.is_some() {
            return Vec::new();
        }
        let free = std::mem::take(&mut self.free);
        self.stats.bytes_cached = 0;
        let out: Vec<B> = free.into_values().flatten().map(|(_, b)| b).collect();
        self.stats.releases += out.len() as u64;
        out
    }

    /// The counters so far.
    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// The most bytes handed out at once since the last `reset_peak` (or the start).
    pub fn peak_bytes(&self) -> usize {
        self.peak_since_reset
    }

    /// Starts a new peak from what is handed out now.
    pub fn reset_peak(&mut self) {
        self.peak_since_reset = self.stats.bytes_in_use;
    }

    /// Enters phase `name` (a name seen before continues its figures) and returns the cache the
    /// previous phase built, to give back to the driver.
    pub fn enter_phase(&mut self, name: &'static str) -> Vec<B> {
        let released = self.drain();
        let i = match self.phases.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                self.phases.push(PhaseStats {
                    name,
                    peak_bytes_in_use: 0,
                    peak_bytes_held: 0,
                    device_allocations: 0,
                    reuses: 0,
                });
                self.phases.len() - 1
            }
        };
        let (in_use, held) = (self.stats.bytes_in_use, self.held());
        let p = &mut self.phases[i];
        p.peak_bytes_in_use = p.peak_bytes_in_use.max(in_use);
        p.peak_bytes_held = p.peak_bytes_held.max(held);
        self.phase = Some(i);
        released
    }

    /// The phases entered so far, in first-entry order.
    pub fn phases(&self) -> &[PhaseStats] {
        &self.phases
    }
}

impl PoolStats {
    /// The figures a pool with `limit` ends with after `events`, each a request size in bytes
    /// and whether it is handed out (true) or comes back (false); buffers of one size class are
    /// interchangeable to the pool. The device pool's own bookkeeping, without a device (for
    /// memory estimates and tests).
    pub fn replay(events: &[(usize, bool)], limit: Option<usize>) -> PoolStats {
        let mut book = PoolBook::<()>::new(limit);
        for &(bytes, out) in events {
            let class = size_class(bytes);
            if !out {
                book.give_back(class, (), 0);
            } else if book.take(class).is_none() {
                book.make_room(class);
                book.lent_new(class);
            }
        }
        book.stats()
    }
}

/// The caching allocator of one GPU: a [`PoolBook`] of `CudaSlice<u8>` behind a mutex, and the
/// stream its buffers are allocated, poisoned and freed on.
pub struct DevicePool {
    stream: Arc<CudaStream>,
    inner: Mutex<PoolBook<CudaSlice<u8>>>,
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

/// Device memory left outside the pool's limit for what does not come from the pool (driver
/// workspaces, modules loaded later, other processes): a 32nd of the device, at least 512 MiB.
pub fn headroom(total: usize) -> usize {
    (total / 32).max(512 << 20)
}

impl DevicePool {
    /// A pool limited to the device memory free now less the headroom (unlimited when the
    /// driver cannot say).
    pub fn new(stream: Arc<CudaStream>) -> Self {
        let limit = stream
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| free.saturating_sub(headroom(total)));
        DevicePool {
            stream,
            inner: Mutex::new(PoolBook::new(limit)),
        }
    }

    /// A buffer of at least `bytes` bytes, contents undefined (all bytes 0xFF in poison mode).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<PooledBuffer> {
        let class = size_class(bytes);
        let (cached, released, capture) = {
            let mut book = self.inner.lock().unwrap();
            let capture = book.capturing();
            match book.take(class) {
                Some(s) => (Some(s), Vec::new(), capture),
                None if capture != 0 => {
                    return Err(Error::Other(format!(
                        "a buffer of {bytes} bytes was requested while a CUDA graph was being \
                         captured and none was cached (the step run before the capture did not \
                         need it): the capture is abandoned"
                    )))
                }
                None => (None, book.make_room(class), 0),
            }
        };
        if !released.is_empty() {
            self.free_to_driver(released);
        }
        let mut slice = match cached {
            Some(s) => s,
            None => self.alloc_from_driver(class)?,
        };
        if super::poison_enabled() {
            self.poison(&mut slice)?;
        }
        Ok(PooledBuffer {
            slice: Some(slice),
            bytes,
            pool: self.clone(),
            capture,
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
        self.inner.lock().unwrap().lent_new(class);
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

    fn release(&self, slice: CudaSlice<u8>, tag: u64) {
        let class = slice.len();
        self.inner.lock().unwrap().give_back(class, slice, tag);
    }

    /// Freezes the pool for a capture (see the module notes); an error when one is in progress.
    pub fn begin_capture(&self) -> Result<()> {
        self.inner
            .lock()
            .unwrap()
            .begin_capture()
            .map(drop)
            .ok_or_else(|| Error::Other("a CUDA graph capture is already in progress".into()))
    }

    /// Ends the capture: the arena the graph keeps (given back to the pool when the graph is
    /// dropped), or an error when buffers lent during it are still out.
    pub fn end_capture(self: &Arc<Self>) -> Result<GraphArena> {
        let end = self.inner.lock().unwrap().end_capture();
        let arena = GraphArena {
            buffers: end.arena,
            pool: self.clone(),
        };
        if end.escaped != 0 {
            return Err(Error::Other(format!(
                "{} buffer(s) lent during the CUDA graph capture were still held at its end (every \
                 replay would write them behind their holders): the capture is abandoned",
                end.escaped
            )));
        }
        Ok(arena)
    }

    /// Frees buffers (outside the lock; cudarc frees without making the context current, and
    /// this may run on any thread).
    fn free_to_driver(&self, buffers: Vec<CudaSlice<u8>>) {
        let _ = self.stream.context().bind_to_thread();
        drop(buffers);
    }

    /// Returns every cached buffer to the driver.
    pub fn trim(&self) {
        let freed = self.inner.lock().unwrap().drain();
        self.free_to_driver(freed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        self.inner.lock().unwrap().stats()
    }

    // Per-phase reporting, forwarded by CudaDevice (device/cuda.rs).

    /// The most bytes handed out at once since the last `reset_peak`.
    pub fn peak_bytes(&self) -> usize {
        self.inner.lock().unwrap().peak_bytes()
    }

    /// Restarts [`DevicePool::peak_bytes`] from the bytes handed out now.
    pub fn reset_peak(&self) {
        self.inner.lock().unwrap().reset_peak()
    }

    /// Enters phase `name`, giving the previous phase's cached buffers back to the driver.
    pub fn set_phase(&self, name: &'static str) {
        let freed = self.inner.lock().unwrap().enter_phase(name);
        self.free_to_driver(freed);
    }

    /// Every phase's figures so far, in first-entry order.
    pub fn phases(&self) -> Vec<PhaseStats> {
        self.inner.lock().unwrap().phases().to_vec()
    }
}

/// The buffers a captured graph's replays use: held apart from the pool while the graph lives,
/// given back to it when dropped.
pub struct GraphArena {
    buffers: Vec<CudaSlice<u8>>,
    pool: Arc<DevicePool>,
}

impl Drop for GraphArena {
    fn drop(&mut self) {
        for b in self.buffers.drain(..) {
            self.pool.release(b, 0);
        }
    }
}

/// Device memory on loan from a `DevicePool`; goes back to the pool's free list when dropped.
pub struct PooledBuffer {
    slice: Option<CudaSlice<u8>>,
    bytes: usize,
    pool: Arc<DevicePool>,
    /// The capture it was lent in (0: none).
    capture: u64,
}

impl PooledBuffer {
    /// The requested size in bytes (the allocation may be larger).
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// The whole allocation as bytes: its size class, at least [`PooledBuffer::len_bytes`].
    pub fn slice(&self) -> &CudaSlice<u8> {
        self.slice.as_ref().expect("live buffer")
    }

    /// The whole allocation as bytes, mutably (see [`PooledBuffer::slice`]).
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        self.slice.as_mut().expect("live buffer")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.pool.release(s, self.capture);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{size_class, PoolBook, PoolStats};

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

    /// What DevicePool::alloc does, with numbered markers for buffers; returns (class, marker).
    fn alloc(book: &mut PoolBook<u32>, next: &mut u32, bytes: usize) -> (usize, u32, Vec<u32>) {
        let class = size_class(bytes);
        match book.take(class) {
            Some(b) => (class, b, Vec::new()),
            None => {
                let released = book.make_room(class);
                book.lent_new(class);
                *next += 1;
                (class, *next, released)
            }
        }
    }

    #[test]
    fn a_repeated_loop_allocates_only_the_first_time() {
        let mut book = PoolBook::new(None);
        let mut next = 0;
        for pass in 0..3 {
            let a = alloc(&mut book, &mut next, 1000);
            let b = alloc(&mut book, &mut next, 5 << 20);
            book.give_back(a.0, a.1, 0);
            let c = alloc(&mut book, &mut next, 900); // same class as a: reuses it
            assert_eq!(c.1, a.1, "pass {pass}");
            book.give_back(b.0, b.1, 0);
            book.give_back(c.0, c.1, 0);
        }
        let s = book.stats();
        assert_eq!((s.device_allocations, s.reuses), (2, 7));
        assert_eq!(s.bytes_in_use, 0);
        assert_eq!(s.bytes_cached, size_class(1000) + size_class(5 << 20));
        assert_eq!(s.peak_bytes_in_use, size_class(1000) + size_class(5 << 20));
        assert_eq!(s.peak_bytes_held, s.bytes_cached);
    }

    #[test]
    fn the_limit_releases_the_least_recently_returned_first() {
        let mb = 1 << 20;
        let mut book = PoolBook::new(Some(10 * mb));
        let mut next = 0;
        let a = alloc(&mut book, &mut next, 3 * mb);
        let b = alloc(&mut book, &mut next, 2 * mb);
        let c = alloc(&mut book, &mut next, 4 * mb);
        book.give_back(b.0, b.1, 0); // oldest in the cache
        book.give_back(a.0, a.1, 0);
        book.give_back(c.0, c.1, 0);
        // 9 MiB cached; a 5 MiB buffer must release 4 MiB or more: b (2) then a (3).
        let d = alloc(&mut book, &mut next, 5 * mb);
        assert_eq!(d.2, vec![b.1, a.1]);
        let s = book.stats();
        assert_eq!(s.bytes_cached, 4 * mb);
        assert_eq!(s.bytes_in_use, 5 * mb);
        assert_eq!(s.releases, 2);
        assert!(s.peak_bytes_held <= 10 * mb);
        // c is still cached and still served.
        assert_eq!(alloc(&mut book, &mut next, 4 * mb).1, c.1);
        // Past the limit with nothing cached to release: the driver decides.
        let e = alloc(&mut book, &mut next, 6 * mb);
        assert!(e.2.is_empty());
        assert_eq!(book.stats().bytes_in_use, 15 * mb);
    }

    #[test]
    fn peaks_reset_and_phases_keep_their_own() {
        let mb = 1 << 20;
        let mut book = PoolBook::new(None);
        let mut next = 0;
        assert!(book.enter_phase("m-step").is_empty());
        let a = alloc(&mut book, &mut next, 8 * mb);
        let b = alloc(&mut book, &mut next, 4 * mb);
        book.give_back(b.0, b.1, 0);
        assert_eq!(book.peak_bytes(), 12 * mb);
        book.reset_peak();
        assert_eq!(book.peak_bytes(), 8 * mb);
        // Entering the E-step gives the M-step's cache back (b), not what is still out (a).
        assert_eq!(book.enter_phase("e-step"), vec![b.1]);
        let c = alloc(&mut book, &mut next, 2 * mb);
        book.give_back(c.0, c.1, 0);
        book.give_back(a.0, a.1, 0);
        assert_eq!(book.peak_bytes(), 10 * mb);
        book.enter_phase("m-step");
        let d = alloc(&mut book, &mut next, 16 * mb);
        book.give_back(d.0, d.1, 0);
        let p = book.phases();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].name, p[0].peak_bytes_in_use), ("m-step", 16 * mb));
        assert_eq!((p[0].device_allocations, p[0].reuses), (3, 0));
        assert_eq!((p[1].name, p[1].peak_bytes_in_use), ("e-step", 10 * mb));
        assert_eq!(p[1].peak_bytes_held, 10 * mb);
        assert_eq!(book.stats().releases, 3);
    }

    #[test]
    fn a_capture_takes_only_cached_buffers_and_keeps_its_arena() {
        let mb = 1 << 20;
        let mut book = PoolBook::new(Some(64 * mb));
        let mut next = 0;
        // The eager warm-up: two classes cached.
        let a = alloc(&mut book, &mut next, 3 * mb);
        let b = alloc(&mut book, &mut next, mb);
        let kept = alloc(&mut book, &mut next, 2 * mb); // lent before, dropped inside the capture
        book.give_back(a.0, a.1, 0);
        book.give_back(b.0, b.1, 0);
        let id = book.begin_capture().expect("none in progress");
        assert!(book.begin_capture().is_none(), "one capture at a time");
        assert_eq!(book.capturing(), id);
        // Hits come from the cache; a class never seen is a miss (the pool refuses it) and
        // nothing is released to make room or drained.
        let x = book.take(a.0).expect("cached");
        assert_eq!(x, a.1);
        assert!(book.take(size_class(7 * mb)).is_none());
        assert!(book.make_room(60 * mb).is_empty() && book.drain().is_empty());
        // What comes back goes to the arena and serves the capture's next request of its class.
        book.give_back(a.0, x, id);
        assert_eq!(book.take(a.0), Some(a.1));
        book.give_back(a.0, a.1, id);
        book.give_back(kept.0, kept.1, 0);
        let end = book.end_capture();
        assert_eq!(end.escaped, 0);
        let mut arena = end.arena;
        arena.sort();
        assert_eq!(arena, vec![a.1, kept.1]);
        // The arena is the graph's (in use); b stays cached for eager work, a is not served.
        let s = book.stats();
        assert_eq!((s.bytes_in_use, s.bytes_cached), (a.0 + kept.0, b.0));
        assert!(book.take(a.0).is_none());
        // A buffer lent during a capture and still out at its end is counted.
        let id = book.begin_capture().unwrap();
        let y = book.take(b.0).unwrap();
        assert_eq!(book.end_capture().escaped, 1);
        book.give_back(b.0, y, id);
        assert_eq!(book.capturing(), 0);
    }

    #[test]
    fn replay_is_the_pools_bookkeeping() {
        let mb = 1 << 20;
        let step = [
            (6 * mb, true),
            (3 * mb, true),
            (6 * mb, false),
            (5 * mb, true),
            (3 * mb, false),
            (5 * mb, false),
        ];
        let twice: Vec<(usize, bool)> = step.iter().chain(&step).copied().collect();
        // Unlimited: three classes, each allocated once, held for good.
        let s = PoolStats::replay(&twice, None);
        assert_eq!((s.device_allocations, s.reuses), (3, 3));
        assert_eq!(s.peak_bytes_held, 14 * mb);
        // Within 9 MiB: never more held than that, at the price of allocating again.
        let s = PoolStats::replay(&twice, Some(9 * mb));
        assert!(s.peak_bytes_held <= 9 * mb, "{s:?}");
        assert_eq!(s.peak_bytes_in_use, 9 * mb);
        assert_eq!((s.device_allocations, s.releases), (6, 4));
    }
}
