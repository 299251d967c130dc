//! The first-contact guard of the bf16 policy: before anything computes in bf16 on a GPU, the
//! tensor-core kernels (the GEMM's three transposes and the convolution's three passes) run
//! once on small integer problems and must give the CPU twins' bits. Integer data makes every
//! order of f32 additions exact, so any difference is a wrong kernel, not rounding.

use super::conv::bf16 as conv_bf16;
use super::conv::ConvGeometry;
use crate::error::{Error, Result};
use crate::ops::precision::{to_bf16, Precision, PrecisionRequest};
use crate::ops::GemmSpec;
use crate::tensor::{AsViewMut, DType, Tensor};
use crate::Device;

/// `request` resolved on `device` ([`PrecisionRequest::resolve`]), and when that is bf16 on a
/// GPU, [`check`] first: a command never trains or samples with tensor-core kernels that
/// disagree with the CPU on this GPU.
pub fn resolve(request: PrecisionRequest, device: &Device) -> Result<Precision> {
    let precision = request.resolve(device);
    if precision == Precision::Bf16 {
        check(device)?;
    }
    Ok(precision)
}

/// Runs the tensor-core GEMM (the three transposes) and the three convolution passes once per
/// GPU on small problems with integer data, where any order of f32 additions is exact, and
/// requires the GPU's results to equal the CPU twins' exactly. Milliseconds; a no-op on the CPU
/// and for a GPU already checked. An error names what differs and says to run with
/// `--precision f32`. With [`wgmma_requested`] on an sm_90a GPU it then runs the same problems
/// on the wgmma kernels and turns them on only if they agree too (else it says why on stderr
/// and keeps mma.sync). A wgmma kernel that faults instead of disagreeing ends the process's
/// CUDA context: that is why they are opt-in until a device check has run them.
pub fn check(device: &Device) -> Result<()> {
    use std::sync::Mutex;
    static CHECKED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
    let Device::Cuda(dev) = device else { return Ok(()) };
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.contains(&dev.ordinal()) {
        return Ok(());
    }
    dev.set_wgmma(false)?;
    agree(device, &Device::Cpu)?;
    if wgmma_requested() {
        if !dev.has_wgmma() {
            eprintln!(
                "emprior: EMPRIOR_WGMMA=1 but {} has no sm_90a kernels loaded (compute capability {}.{}); \
                 the convolutions stay on mma.sync",
                dev.name(),
                dev.compute_capability().0,
                dev.compute_capability().1
            );
        } else if let Err(e) = try_wgmma(device) {
            // A fault, unlike a wrong value, leaves the context unusable: stop here, by name.
            if let Error::Cuda { .. } = e {
                return Err(Error::Other(format!(
                    "the wgmma kernels (EMPRIOR_WGMMA=1) failed on {}: {e}; run without \
                     EMPRIOR_WGMMA and report this GPU",
                    dev.name()
                )));
            }
            eprintln!(
                "emprior: the wgmma kernels (EMPRIOR_WGMMA=1) disagree with the CPU on {}: {e}; \
                 the convolutions stay on mma.sync. Please report this GPU.",
                dev.name()
            );
        }
    }
    checked.push(dev.ordinal());
    Ok(())
}

/// Turns the wgmma convolutions on for `device` (an sm_90a GPU) if they give the CPU's bits on
/// [`agree`]'s problems; on a disagreement turns them off again and says what differed.
pub fn try_wgmma(device: &Device) -> Result<()> {
    let Device::Cuda(dev) = device else {
        return Err(Error::GpuUnavailable("wgmma kernels run on a GPU only".into()));
    };
    dev.set_wgmma(true)?;
    agree(device, &Device::Cpu).inspect_err(|_| {
        // Cannot fail: turning off needs nothing.
        let _ = dev.set_wgmma(false);
    })
}

/// `EMPRIOR_WGMMA=1`: on an H100 or H200, run the convolutions' forward and input gradient on
/// the wgmma kernels (kernels/conv_sm90a.cu) once they pass [`check`]. Off by default until a
/// device check has run them on a GPU (benches/RESULTS.md).
pub fn wgmma_requested() -> bool {
    crate::device::env_flag("EMPRIOR_WGMMA")
}

/// The body of [`check`]: the small bf16 problems on `device` and on `reference`,
/// which must give the same bits (integer data: exact in any order). Public so a test can run
/// it with the CPU on both sides.
pub fn agree(device: &Device, reference: &Device) -> Result<()> {
    let cpu = reference.clone();
    // Values in {-2, ..., 2}: exact in bf16, every sum of their products exact in f32.
    let ints = |n: usize, seed: u32| -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)) >> 13) % 5) as f32 - 2.0
            })
            .collect()
    };
    let both = |v: &[f32], shape: &[usize]| -> Result<(Tensor, Tensor)> {
        let host = to_bf16(&Tensor::from_f32(v, shape, &cpu)?)?;
        Ok((host.to_device(device)?, host))
    };
    let same = |what: &str, gpu: &Tensor, cpu: &Tensor| -> Result<()> {
        let (g, c) = (gpu.to_vec_f32()?, cpu.to_vec_f32()?);
        match g.iter().zip(&c).position(|(a, b)| a.to_bits() != b.to_bits()) {
            None => Ok(()),
            Some(i) => Err(Error::Other(format!(
                "the bf16 tensor-core {what} on {device} disagrees with the CPU (value {i}: {} against {}); \
                 run with --precision f32 (the exact path) and report this GPU",
                g[i], c[i]
            ))),
        }
    };
    for (ta, tb, name) in [
        (false, false, "GEMM (nn)"),
        (false, true, "GEMM (nt)"),
        (true, false, "GEMM (tn)"),
    ] {
        let (m, n, k) = (40, 24, 48);
        let (ag, ac) = both(&ints(m * k, 1), &if ta { [k, m] } else { [m, k] })?;
        let (bg, bc) = both(&ints(k * n, 2), &if tb { [n, k] } else { [k, n] })?;
        let mut outs = Vec::new();
        for (a, b, dev) in [(&ag, &bg, device), (&ac, &bc, &cpu)] {
            let mut c = Tensor::zeros(&[m, n], DType::F32, dev)?;
            let spec = GemmSpec::new(ta, tb);
            crate::ops::gemm_bf16_into(a, b, None, Some(&mut c.as_view_mut()?), None, spec)?;
            outs.push(c);
        }
        same(name, &outs[0], &outs[1])?;
    }
    // Small ragged shapes (taps straddling a K tile, stride 2 by parity class), then shapes
    // of more than one block tile each way (M and N past 128: both of a block's warpgroups
    // and every accumulator column reach memory), at stride 1 and 2. Integer sums stay below
    // 2^24 (K at most 9 x 136), so any order of additions is exact.
    let cases = [
        (ConvGeometry::new(2, 5, 7, 24, 2), 40),
        (ConvGeometry::new(2, 5, 7, 24, 1), 40),
        (ConvGeometry::new(1, 12, 12, 136, 1), 136),
        (ConvGeometry::new(1, 24, 24, 136, 2), 136),
    ];
    for (case, (g, cout)) in cases.into_iter().enumerate() {
        let seed = 3 + 3 * case as u32;
        let cin = g.cin as usize;
        let p_in = (g.n * g.h * g.w) as usize;
        let p_out = (g.n * g.oh * g.ow) as usize;
        let (xg, xc) = both(&ints(p_in * cin, seed), &[p_in * cin])?;
        let (wg, wc) = both(&ints(9 * cin * cout, seed + 1), &[9 * cin * cout])?;
        let (dyg, dyc) = both(&ints(p_out * cout, seed + 2), &[p_out * cout])?;
        let mut outs: Vec<[Tensor; 3]> = Vec::new();
        for (x, w, dy, dev) in [(&xg, &wg, &dyg, device), (&xc, &wc, &dyc, &cpu)] {
            let mut y = Tensor::zeros(&[p_out * cout], DType::F32, dev)?;
            conv_bf16::forward(x, w, None, &g, cout, Some(&mut y.as_view_mut()?), None)?;
            let mut dx = Tensor::zeros(&[p_in * cin], DType::F32, dev)?;
            conv_bf16::input_grad(dy, w, &g, cout, &mut dx.as_view_mut()?, 0.0)?;
            let mut dw = Tensor::zeros(&[9 * cin * cout], DType::F32, dev)?;
            conv_bf16::weight_grad(x, dy, &g, cout, &mut dw.as_view_mut()?, 0.0)?;
            outs.push([y, dx, dw]);
        }
        for (i, pass) in ["forward", "input gradient", "weight gradient"]
            .iter()
            .enumerate()
        {
            let what = format!(
                "convolution ({pass}, {}x{}x{}x{cin} -> {cout}, stride {})",
                g.n, g.h, g.w, g.stride
            );
            same(&what, &outs[0][i], &outs[1][i])?;
        }
    }
    Ok(())
}
