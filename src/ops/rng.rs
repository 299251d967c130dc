//! Counter-based random numbers: Philox4x32-10, keyed by (seed, stream) and indexed by an
//! element offset, identical on the CPU and the GPU. Because any element can be computed on its
//! own, a resumed run or a GPU run draws exactly the noise of an uninterrupted CPU run.
//!
//! Layout: key = seed (64 bits); counter = (block lo, block hi, stream lo, stream hi); element i
//! of a stream is lane i % 4 of counter block i / 4. Uniforms are the top 23 bits, centred in
//! their bin: ((u >> 9) + 0.5) / 2^23, in the open interval (0, 1) and exact in f32. Normals are
//! Box-Muller on lanes (0, 1) and (2, 3), in f64, rounded once to f32.
//! CUDA: kernels/rng.cu and common.cuh.

use crate::device::launch::grid_stride;
use crate::device::{ClockLink, Device};
use crate::error::Result;
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// The Philox4x32 bijection with 10 rounds (Salmon et al., SC'11).
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = M0 as u64 * c0 as u64;
        let p1 = M1 as u64 * c2 as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    [c0, c1, c2, c3]
}

/// (top 23 bits + 0.5) / 2^23: exact in f32, in (0, 1), largest value 1 - 2^-24.
pub fn uniform_from_bits(x: u32) -> f32 {
    ((x >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

fn normal_pair(a: u32, b: u32) -> (f32, f32) {
    const INV_2_32: f64 = 1.0 / 4_294_967_296.0;
    let u1 = (a as f64 + 0.5) * INV_2_32;
    let u2 = (b as f64 + 0.5) * INV_2_32;
    let r = (-2.0 * u1.ln()).sqrt();
    // TAU is the f64 literal 6.283185307179586 of kernels/common.cuh: both sides take sin/cos
    // of the same f64 product.
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    ((r * c) as f32, (r * s) as f32)
}

/// One random stream: a seed and a stream index. Elements are addressed by offset.
///
/// ```
/// use emprior::ops::{self, Philox};
/// use emprior::Device;
///
/// let rng = Philox::new(42, 0);
/// let mut u = [0.0f32; 8];
/// rng.fill_uniform(0, &mut u);
/// assert!(u.iter().all(|&x| x > 0.0 && x < 1.0));
/// // Any element can be drawn on its own: elements 5, 6, 7 of the same stream.
/// let mut tail = [0.0f32; 3];
/// rng.fill_uniform(5, &mut tail);
/// assert_eq!(&tail[..], &u[5..]);
/// // A tensor on any device gets the same numbers.
/// let t = ops::uniform(&[2, 4], rng, 0, &Device::Cpu)?;
/// assert_eq!(t.to_vec_f32()?, u);
/// // Another stream of the same seed is another sequence.
/// let other = ops::uniform(&[8], Philox::new(42, 1), 0, &Device::Cpu)?;
/// assert_ne!(other.to_vec_f32()?, u);
/// let z = ops::normal(&[4096], rng, 0, &Device::Cpu)?.to_vec_f32()?;
/// let mean = z.iter().sum::<f32>() / z.len() as f32;
/// assert!(mean.abs() < 0.1);
/// # Ok::<(), emprior::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Philox {
    /// The 64-bit Philox key: runs with different seeds draw unrelated numbers.
    pub seed: u64,
    /// The stream index (the high half of the counter): independent sequences under one seed.
    pub stream: u64,
    /// A step clock the stream and the element offsets move with (None: fixed; see
    /// [`Philox::moving`]).
    pub clock: Option<ClockLink>,
}

impl Philox {
    /// The stream `stream` of generator `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        Philox {
            seed,
            stream,
            clock: None,
        }
    }

    /// This stream moving with a step clock: at the clock's step s it is stream
    /// `stream + s * link.stream_per_step`, and element offsets given to it are moved by
    /// `s * link.offset_per_step`. The kernels read s on the device when they run, so a captured
    /// step replays with the next step's numbers; the CPU bodies use the step the link was made
    /// at. The same numbers either way as the fixed stream at that step.
    pub fn moving(self, link: ClockLink) -> Self {
        Philox {
            clock: Some(link),
            ..self
        }
    }

    /// The fixed stream and offset this one draws at its clock's step (itself when fixed).
    pub fn at_step(&self, offset: u64) -> (Philox, u64) {
        match self.clock {
            None => (*self, offset),
            Some(l) => (
                Philox::new(self.seed, self.stream + l.step * l.stream_per_step),
                offset + l.step * l.offset_per_step,
            ),
        }
    }

    /// The kernels' clock arguments (address, stream per step, offset per step; zeros: fixed).
    pub(crate) fn clock_args(&self) -> (u64, u64, u64) {
        self.clock
            .map_or((0, 0, 0), |l| (l.address, l.stream_per_step, l.offset_per_step))
    }

    /// An error for a kernel that has no clock arguments when this stream moves with one.
    pub(crate) fn fixed(&self, op: &str) -> Result<()> {
        match self.clock {
            None => Ok(()),
            Some(_) => Err(crate::error::Error::Other(format!(
                "{op}: its kernel draws from fixed streams only, not one moving with a step clock"
            ))),
        }
    }

    /// The four 32-bit words of counter block `block` (of the stream as fixed: a clock link is
    /// applied by the fill methods).
    pub fn block(&self, block: u64) -> [u32; 4] {
        philox4x32_10(
            [
                block as u32,
                (block >> 32) as u32,
                self.stream as u32,
                (self.stream >> 32) as u32,
            ],
            [self.seed as u32, (self.seed >> 32) as u32],
        )
    }

    /// Fills `out` with elements `offset .. offset + out.len()` of the stream, each computed from
    /// its counter block by `lanes`.
    fn fill_with(&self, offset: u64, out: &mut [f32], lanes: impl Fn([u32; 4]) -> [f32; 4]) {
        let (rng, offset) = self.at_step(offset);
        let n = out.len() as u64;
        if n == 0 {
            return;
        }
        for blk in offset / 4..=(offset + n - 1) / 4 {
            let v = lanes(rng.block(blk));
            for (lane, &value) in v.iter().enumerate() {
                let e = blk * 4 + lane as u64;
                if e >= offset && e < offset + n {
                    out[(e - offset) as usize] = value;
                }
            }
        }
    }

    /// Uniforms in (0, 1): elements `offset ..` of the stream (CPU body of rng_uniform_f32).
    pub fn fill_uniform(&self, offset: u64, out: &mut [f32]) {
        self.fill_with(offset, out, |r| r.map(uniform_from_bits));
    }

    /// Standard normals: elements `offset ..` of the stream (CPU body of rng_normal_f32).
    pub fn fill_normal(&self, offset: u64, out: &mut [f32]) {
        self.fill_with(offset, out, |r| {
            let (a, b) = normal_pair(r[0], r[1]);
            let (c, d) = normal_pair(r[2], r[3]);
            [a, b, c, d]
        });
    }

    /// Writes uniforms into `out` on whichever device it lives (f64 on the CPU: the f32 values,
    /// widened, so both precisions see the same numbers).
    pub fn uniform_into(&self, out: &mut impl AsViewMut, offset: u64) -> Result<()> {
        self.launch(out, offset, false)
    }

    /// Writes standard normals into `out` on whichever device it lives.
    pub fn normal_into(&self, out: &mut impl AsViewMut, offset: u64) -> Result<()> {
        self.launch(out, offset, true)
    }

    fn fill_real<T: Real>(&self, offset: u64, out: &mut [T], normal: bool) {
        let mut tmp = vec![0.0f32; out.len()];
        if normal {
            self.fill_normal(offset, &mut tmp)
        } else {
            self.fill_uniform(offset, &mut tmp)
        }
        out.iter_mut().zip(tmp).for_each(|(o, v)| *o = T::from_f32(v));
    }

    fn launch(&self, out: &mut impl AsViewMut, offset: u64, normal: bool) -> Result<()> {
        let mut out = out.as_view_mut()?;
        let n = out.numel();
        match &mut out.data {
            DataMut::F32(o) => {
                if normal {
                    self.fill_normal(offset, o)
                } else {
                    self.fill_uniform(offset, o)
                }
            }
            DataMut::F64(o) => self.fill_real(offset, o, normal),
            DataMut::Cuda(o, dev) => {
                if n == 0 {
                    return Ok(());
                }
                let blocks = (offset + n as u64 - 1) / 4 - offset / 4 + 1;
                let (k, cfg, n64) = (dev.kernels(), grid_stride(dev, blocks as usize), n as i64);
                let (clock, sps, ops) = self.clock_args();
                // SAFETY: the view holds n values; the grid-stride loop covers every Philox block
                // of 4 the (possibly clock-moved) range touches; the clock address, when given,
                // is a live StepClock's (links are made per step).
                unsafe {
                    if normal {
                        k.rng_normal_f32(cfg, o, n64, self.seed, self.stream, offset, clock, sps, ops)
                    } else {
                        k.rng_uniform_f32(cfg, o, n64, self.seed, self.stream, offset, clock, sps, ops)
                    }
                }?;
            }
        }
        Ok(())
    }
}

/// A new tensor of uniforms in (0, 1) from elements `offset ..` of (seed, stream).
pub fn uniform(shape: &[usize], rng: Philox, offset: u64, device: &Device) -> Result<Tensor> {
    let mut t = Tensor::uninit(shape, DType::F32, device)?;
    rng.uniform_into(&mut t, offset)?;
    Ok(t)
}

/// A new tensor of standard normals from elements `offset ..` of (seed, stream).
pub fn normal(shape: &[usize], rng: Philox, offset: u64, device: &Device) -> Result<Tensor> {
    let mut t = Tensor::uninit(shape, DType::F32, device)?;
    rng.normal_into(&mut t, offset)?;
    Ok(t)
}

/// A training batch drawn with replacement: row k of the result is row
/// `min(floor(u_k * rows), rows - 1)` of `pool` ([rows, ..]), u_k = uniform element `offset + k`
/// of `rng`. On a GPU the pool stays on the device for a whole M-step and the indices are drawn
/// in the kernel (kernels/rng.cu), so a step uploads nothing.
pub fn gather_rows_uniform(pool: &impl AsView, batch: usize, rng: Philox, offset: u64) -> Result<Tensor> {
    rng.fixed("gather_rows_uniform")?;
    let pool = pool.as_view()?;
    let rows = pool.shape().first().copied().unwrap_or(0);
    if rows == 0 {
        return Err(crate::error::Error::shape(
            "gather_rows_uniform",
            "pool",
            "[rows > 0, ..]",
            pool.shape(),
        ));
    }
    gather_rows(
        "gather_rows_uniform",
        &pool,
        batch,
        |dev, src, dst, per| {
            let (r64, b64, p32) = (rows as i64, batch as i64, per as i32);
            // SAFETY: src holds rows * per values, dst batch * per; indices are clamped to rows.
            unsafe {
                dev.kernels().rng_gather_rows_uniform_f32(
                    grid_stride(dev, batch * per),
                    src,
                    dst,
                    r64,
                    p32,
                    b64,
                    rng.seed,
                    rng.stream,
                    offset,
                )
            }
        },
        || {
            let mut u = vec![0.0f32; batch];
            rng.fill_uniform(offset, &mut u);
            move |k: usize| ((u[k] * rows as f32) as usize).min(rows - 1)
        },
    )
}

/// A new [batch, ..] tensor whose row k is row `index(k)` of `pool` ([rows, ..]): on the CPU by
/// the index function `cpu_index()` returns, on a GPU by `launch`, a kernel that computes the
/// same indices (rng_gather_rows_*: the gathers of the M-steps).
fn gather_rows<F: Fn(usize) -> usize>(
    op: &'static str,
    pool: &crate::tensor::View,
    batch: usize,
    launch: impl FnOnce(
        &crate::device::CudaDevice,
        &cudarc::driver::CudaView<f32>,
        &mut cudarc::driver::CudaViewMut<f32>,
        usize,
    ) -> std::result::Result<(), crate::error::Error>,
    cpu_index: impl FnOnce() -> F,
) -> Result<Tensor> {
    let rows = pool.shape().first().copied().unwrap_or(0).max(1);
    let per = pool.numel() / rows;
    let mut shape = pool.shape().to_vec();
    shape[0] = batch;
    let mut out = Tensor::uninit(&shape, pool.dtype(), &pool.device())?;
    {
        let mut ov = out.as_view_mut()?;
        match (&pool.data, &mut ov.data) {
            (Data::Cuda(src, dev), DataMut::Cuda(dst, _)) => launch(dev, src, dst, per)?,
            (Data::Cuda(..), _) => return Err(super::mismatch(op, &[pool], &[])),
            _ => host_real!(pool, T => {
                let (src, dst) = (pool.cpu::<T>()?, ov.cpu_mut::<T>()?);
                let index = cpu_index();
                for (k, d) in dst.chunks_exact_mut(per.max(1)).enumerate() {
                    let i = index(k);
                    d.copy_from_slice(&src[i * per..(i + 1) * per]);
                }
                Ok::<(), crate::error::Error>(())
            })?,
        }
    }
    Ok(out)
}

/// Position `i` of a random permutation of `0..rows` (rows < 2^32), keyed by `rng` and `key`
/// (an epoch): a 4-round Feistel network over the smallest even power of two >= rows, walked
/// until it lands inside 0..rows (at most 4 walks expected). Computed per index, so a device
/// gathers a shuffled epoch's batches with no sort and no index upload; kernels/rng.cu repeats
/// it in the same integer operations.
pub fn permuted_index(rng: Philox, key: u64, rows: u64, i: u64) -> u64 {
    let bits = (64 - rows.saturating_sub(1).leading_zeros()).max(2);
    let half = bits.div_ceil(2);
    let mask = (1u64 << half) - 1;
    let mut x = i;
    loop {
        let (mut l, mut r) = (x >> half, x & mask);
        for round in 0..4u64 {
            let f = rng.block(((key * 4 + round) << 32) | r)[0] as u64 & mask;
            (l, r) = (r, l ^ f);
        }
        x = (l << half) | r;
        if x < rows {
            return x;
        }
    }
}

/// One epoch's batch without replacement: row k of the result is row
/// `permuted_index(rng, epoch, rows, start + k)` of `pool` ([rows, ..]). The batches
/// `start = 0, b, 2b, ..` of one epoch visit every row once. On a GPU the pool stays on the
/// device for a whole M-step and the indices are computed in the kernel (kernels/rng.cu).
pub fn gather_rows_permuted(
    pool: &impl AsView,
    batch: usize,
    rng: Philox,
    epoch: u64,
    start: usize,
) -> Result<Tensor> {
    rng.fixed("gather_rows_permuted")?;
    let pool = pool.as_view()?;
    let rows = pool.shape().first().copied().unwrap_or(0);
    if rows == 0 || rows > u32::MAX as usize || start + batch > rows {
        return Err(crate::error::Error::shape(
            "gather_rows_permuted",
            "pool",
            format!("[rows, ..] with 0 < rows < 2^32 and rows >= {}", start + batch),
            pool.shape(),
        ));
    }
    gather_rows(
        "gather_rows_permuted",
        &pool,
        batch,
        |dev, src, dst, per| {
            let (r64, p64, b64, s64) = (rows as i64, per as i64, batch as i64, start as i64);
            let cfg = crate::device::launch::blocks((batch.clamp(1, 65_535) as u32, 1, 1), 256);
            // SAFETY: src holds rows * per values, dst batch * per; every index the kernel
            // computes lies in 0..rows (the walk ends only there).
            unsafe {
                dev.kernels().rng_gather_rows_permuted_f32(
                    cfg, src, dst, r64, p64, b64, s64, rng.seed, rng.stream, epoch,
                )
            }
        },
        || move |k: usize| permuted_index(rng, epoch, rows as u64, (start + k) as u64) as usize,
    )
}
