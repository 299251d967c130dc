//! emprior's C ABI: the embedding API (`emprior::api`) behind `extern "C"` functions for C, C++
//! and Fortran codes. Conventions:
//! - every object is opaque and owned by the caller once created: free it with its `_free`
//!   function (freeing NULL is a no-op);
//! - arrays are caller-owned, row-major, with their sizes passed beside them; results are written
//!   into caller-owned buffers whose length is checked;
//! - every fallible call returns an [`EmpriorStatus`]; on anything but `EMPRIOR_STATUS_OK`,
//!   `emprior_last_error()` gives the message (per thread, valid until that thread's next call);
//! - no Rust panic crosses the boundary: one is caught and reported as
//!   `EMPRIOR_STATUS_INTERNAL`.

#![allow(clippy::missing_safety_doc)] // each function's doc says what the pointers must be

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use emprior::api::{sample_posterior, Operator, PosteriorOptions, Prior};
use emprior::diffusion::SamplerKind;
use emprior::{Device, DeviceRequest};

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmpriorStatus {
    /// Success.
    Ok = 0,
    /// A NULL pointer, a size that does not match, a string that is not UTF-8.
    InvalidArgument = 1,
    /// The engine refused or failed (a missing file, a bad checkpoint, no GPU, a diverged
    /// sampler): see `emprior_last_error()`.
    Failed = 2,
    /// A bug in emprior (a caught panic): please report the message.
    Internal = 3,
}

/// The sampler of a posterior run: ancestral sampling (DDIM with eta = 1).
pub const EMPRIOR_SAMPLER_DDPM: u32 = 0;
/// Deterministic DDIM (eta = 0).
pub const EMPRIOR_SAMPLER_DDIM: u32 = 1;
/// A DDIM predictor and one Langevin correction (tau 0.1) per step.
pub const EMPRIOR_SAMPLER_PC: u32 = 2;

/// How `emprior_sample_posterior` samples; start from `emprior_posterior_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmpriorPosteriorOptions {
    /// The sampler: EMPRIOR_SAMPLER_DDPM, _DDIM or _PC.
    pub sampler: u32,
    /// Sampler steps (at least 1).
    pub steps: usize,
    /// Conjugate-gradient iterations per denoiser call.
    pub cg_iters: usize,
    /// Stop CG once every residual is below this fraction of its start; 0 or less: never early.
    pub cg_rtol: f64,
    /// Every random draw: the same seed gives the same samples on the same device.
    pub seed: u64,
    /// The noise range; 0 or less for either: the checkpoint's training range (a Gaussian prior:
    /// 1e-3 to 1e2).
    pub sigma_min: f64,
    /// See `sigma_min`.
    pub sigma_max: f64,
}

/// A compute device (the CPU or a GPU).
pub struct EmpriorDevice(Device);

/// A prior: a trained checkpoint or a Gaussian.
pub struct EmpriorPrior(Prior);

/// An observation operator over a batch of observations.
pub struct EmpriorOperator(Operator);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: String) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs `f`, turning its error or a panic into a status and the thread's message.
fn guard(f: impl FnOnce() -> Result<(), (EmpriorStatus, String)>) -> EmpriorStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_error(String::new());
            EmpriorStatus::Ok
        }
        Ok(Err((status, message))) => {
            set_error(message);
            status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown".into());
            set_error(format!("internal error (a panic in emprior): {what}"));
            EmpriorStatus::Internal
        }
    }
}

fn failed(e: emprior::Error) -> (EmpriorStatus, String) {
    (EmpriorStatus::Failed, e.to_string())
}

fn invalid(message: impl Into<String>) -> (EmpriorStatus, String) {
    (EmpriorStatus::InvalidArgument, message.into())
}

/// A caller's array as a slice, refusing NULL with a non-zero length.
unsafe fn slice<'a, T>(what: &str, ptr: *const T, len: usize) -> Result<&'a [T], (EmpriorStatus, String)> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller promises `len` readable values at `ptr` (each function's doc).
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

unsafe fn string<'a>(what: &str, ptr: *const c_char) -> Result<&'a str, (EmpriorStatus, String)> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

unsafe fn out<T>(what: &str, ptr: *mut *mut T, value: T) -> Result<(), (EmpriorStatus, String)> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} (the result pointer) is NULL")));
    }
    // SAFETY: the caller gives a writable pointer to a pointer.
    unsafe { *ptr = Box::into_raw(Box::new(value)) };
    Ok(())
}

unsafe fn get<'a, T>(what: &str, ptr: *const T) -> Result<&'a T, (EmpriorStatus, String)> {
    // SAFETY: a pointer this library returned and the caller has not freed.
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

/// The message of this thread's last failed call ("" after a success). Valid until this thread's
/// next emprior call; never NULL.
#[no_mangle]
pub extern "C" fn emprior_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, e.g. "0.1.0" (static; never NULL).
#[no_mangle]
pub extern "C" fn emprior_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Opens a device: "auto" (the first GPU, else the CPU), "cpu", "cuda" or "cuda:N" (which
/// fail without a usable GPU). `spec` is a NUL-terminated string; `*out` receives the device.
#[no_mangle]
pub unsafe extern "C" fn emprior_device_open(
    spec: *const c_char,
    out_device: *mut *mut EmpriorDevice,
) -> EmpriorStatus {
    guard(|| {
        let spec = unsafe { string("spec", spec) }?;
        let request: DeviceRequest = spec.parse().map_err(invalid)?;
        let device = Device::open(request).map_err(failed)?;
        unsafe { out("out_device", out_device, EmpriorDevice(device)) }
    })
}

/// 1 when the device is a GPU, 0 when it is the CPU (or NULL).
#[no_mangle]
pub unsafe extern "C" fn emprior_device_is_gpu(device: *const EmpriorDevice) -> i32 {
    // SAFETY: NULL or a device from emprior_device_open.
    unsafe { device.as_ref() }.map_or(0, |d| d.0.is_cuda() as i32)
}

/// Frees an object this library boxed and handed out (NULL: nothing).
///
/// # Safety
/// `p` is NULL or a pointer from `Box::into_raw` in this library, not freed before.
unsafe fn free_boxed<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: the caller's contract.
        drop(unsafe { Box::from_raw(p) });
    }
}

/// Frees a device (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn emprior_device_free(device: *mut EmpriorDevice) {
    // SAFETY: NULL or a pointer from this library, freed once.
    unsafe { free_boxed(device) }
}

/// Loads a checkpoint (from `emprior train` or an EM lap: `DIR/lap-XXX/checkpoint.safetensors`)
/// onto `device`. `path` is NUL-terminated; `*out_prior` receives the prior.
#[no_mangle]
pub unsafe extern "C" fn emprior_prior_load(
    device: *const EmpriorDevice,
    path: *const c_char,
    out_prior: *mut *mut EmpriorPrior,
) -> EmpriorStatus {
    guard(|| {
        let device = unsafe { get("device", device) }?;
        let path = unsafe { string("path", path) }?;
        let prior = Prior::load(Path::new(path), &device.0).map_err(failed)?;
        unsafe { out("out_prior", out_prior, EmpriorPrior(prior)) }
    })
}

/// A Gaussian prior N(mean, cov): `mean` [d], `cov` [d, d] row-major, positive definite. With it
/// the posterior samples are exact (MMPS with the prior's own covariance).
#[no_mangle]
pub unsafe extern "C" fn emprior_prior_gaussian(
    mean: *const f64,
    cov: *const f64,
    d: usize,
    out_prior: *mut *mut EmpriorPrior,
) -> EmpriorStatus {
    guard(|| {
        let mean = unsafe { slice("mean", mean, d) }?;
        let cov = unsafe {
            slice(
                "cov",
                cov,
                d.checked_mul(d).ok_or_else(|| invalid("d * d overflows"))?,
            )
        }?;
        let prior = Prior::gaussian(mean, cov).map_err(failed)?;
        unsafe { out("out_prior", out_prior, EmpriorPrior(prior)) }
    })
}

/// Values per signal of a prior (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn emprior_prior_dim(prior: *const EmpriorPrior) -> usize {
    // SAFETY: NULL or a prior from this library.
    unsafe { prior.as_ref() }.map_or(0, |p| p.0.dim())
}

/// Frees a prior (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn emprior_prior_free(prior: *mut EmpriorPrior) {
    // SAFETY: NULL or a pointer from this library, freed once.
    unsafe { free_boxed(prior) }
}

/// One operator per observation: `a` [n, m, d] row-major (copied to the device).
#[no_mangle]
pub unsafe extern "C" fn emprior_operator_per_observation(
    device: *const EmpriorDevice,
    a: *const f32,
    n: usize,
    m: usize,
    d: usize,
    out_operator: *mut *mut EmpriorOperator,
) -> EmpriorStatus {
    guard(|| {
        let device = unsafe { get("device", device) }?;
        let len = n
            .checked_mul(m)
            .and_then(|v| v.checked_mul(d))
            .ok_or_else(|| invalid("n * m * d overflows"))?;
        let a = unsafe { slice("a", a, len) }?;
        let op = Operator::per_observation(a, n, m, d, &device.0).map_err(failed)?;
        unsafe { out("out_operator", out_operator, EmpriorOperator(op)) }
    })
}

/// One operator `a` [m, d] row-major shared by every observation (copied to the device).
#[no_mangle]
pub unsafe extern "C" fn emprior_operator_shared(
    device: *const EmpriorDevice,
    a: *const f32,
    m: usize,
    d: usize,
    out_operator: *mut *mut EmpriorOperator,
) -> EmpriorStatus {
    guard(|| {
        let device = unsafe { get("device", device) }?;
        let len = m.checked_mul(d).ok_or_else(|| invalid("m * d overflows"))?;
        let a = unsafe { slice("a", a, len) }?;
        let op = Operator::shared(a, m, d, &device.0).map_err(failed)?;
        unsafe { out("out_operator", out_operator, EmpriorOperator(op)) }
    })
}

/// A 0/1 mask per observation: `mask` [n, pixels], each value shared by `channels` consecutive
/// signal values (d = m = pixels * channels; unobserved values of y are 0).
#[no_mangle]
pub unsafe extern "C" fn emprior_operator_mask(
    device: *const EmpriorDevice,
    mask: *const f32,
    n: usize,
    pixels: usize,
    channels: usize,
    out_operator: *mut *mut EmpriorOperator,
) -> EmpriorStatus {
    guard(|| {
        let device = unsafe { get("device", device) }?;
        let len = n
            .checked_mul(pixels)
            .ok_or_else(|| invalid("n * pixels overflows"))?;
        let mask = unsafe { slice("mask", mask, len) }?;
        let op = Operator::mask(mask, n, pixels, channels, &device.0).map_err(failed)?;
        unsafe { out("out_operator", out_operator, EmpriorOperator(op)) }
    })
}

/// Frees an operator (NULL: nothing).
#[no_mangle]
pub unsafe extern "C" fn emprior_operator_free(operator: *mut EmpriorOperator) {
    // SAFETY: NULL or a pointer from this library, freed once.
    unsafe { free_boxed(operator) }
}

/// The default options: DDPM, 256 steps, 3 CG iterations, no early stop, seed 0, the prior's
/// noise range.
#[no_mangle]
pub extern "C" fn emprior_posterior_options_default() -> EmpriorPosteriorOptions {
    EmpriorPosteriorOptions {
        sampler: EMPRIOR_SAMPLER_DDPM,
        steps: 256,
        cg_iters: 3,
        cg_rtol: 0.0,
        seed: 0,
        sigma_min: 0.0,
        sigma_max: 0.0,
    }
}

/// One posterior sample per observation: `y` [n, m] row-major observed through `op` with noise
/// standard deviation `sigma_y`, written into `out` [n, d] (`out_len` must be n * d). For K
/// samples per observation, repeat the rows of y (and of a per-observation operator) K times.
/// `options` NULL: the defaults.
#[no_mangle]
pub unsafe extern "C" fn emprior_sample_posterior(
    device: *const EmpriorDevice,
    prior: *const EmpriorPrior,
    op: *const EmpriorOperator,
    y: *const f32,
    n: usize,
    sigma_y: f64,
    options: *const EmpriorPosteriorOptions,
    out: *mut f32,
    out_len: usize,
) -> EmpriorStatus {
    guard(|| {
        let device = unsafe { get("device", device) }?;
        let prior = unsafe { get("prior", prior) }?;
        let op = unsafe { get("op", op) }?;
        // SAFETY: NULL or the caller's options.
        let o = unsafe { options.as_ref() }
            .copied()
            .unwrap_or_else(|| emprior_posterior_options_default());
        let m = op.0.obs_dim();
        let y = unsafe {
            slice(
                "y",
                y,
                n.checked_mul(m).ok_or_else(|| invalid("n * m overflows"))?,
            )
        }?;
        let want = n
            .checked_mul(prior.0.dim())
            .ok_or_else(|| invalid("n * d overflows"))?;
        if out_len != want {
            return Err(invalid(format!(
                "out_len = {out_len}, but {n} samples of {} values need {want}",
                prior.0.dim()
            )));
        }
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let opts = PosteriorOptions {
            sampler: match o.sampler {
                EMPRIOR_SAMPLER_DDPM => SamplerKind::Ddpm,
                EMPRIOR_SAMPLER_DDIM => SamplerKind::Ddim,
                EMPRIOR_SAMPLER_PC => SamplerKind::Pc {
                    corrections: 1,
                    tau: 0.1,
                },
                other => {
                    return Err(invalid(format!(
                        "sampler = {other} (expected 0: DDPM, 1: DDIM, 2: PC)"
                    )))
                }
            },
            steps: o.steps,
            cg_iters: o.cg_iters,
            cg_rtol: (o.cg_rtol > 0.0).then_some(o.cg_rtol),
            seed: o.seed,
            sigma_range: (o.sigma_min > 0.0 && o.sigma_max > 0.0).then_some((o.sigma_min, o.sigma_max)),
        };
        let x = sample_posterior(&prior.0, &op.0, y, sigma_y, &opts, &device.0).map_err(failed)?;
        // SAFETY: the caller gives `out_len` writable values at `out`, checked equal to x's length.
        unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), out, x.len()) };
        Ok(())
    })
}
