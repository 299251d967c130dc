//! The image experiments' data (used by `super::images`): the clean images of a run
//! ([`Dataset`]: CIFAR-10, Fashion-MNIST, a folder of PNGs or MRI slices), how their masks are
//! drawn ([`MaskDraw`]) and the noisy, incomplete observations made of them ([`Observations`],
//! through pixel masks or column-masked k-space, [`Observe`]).

use std::fs;
use std::path::PathBuf;

use super::Config;
use crate::data::{cifar10, mri};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::Philox;
use crate::posterior::{column_masks, FourierOperator, LinearOperator, MaskOperator};
use crate::tensor::{AsView, DType, Tensor};

/// How the images are observed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Observe {
    /// y = mask ⊙ x + noise, a 0/1 mask per pixel (shared by the channels) or per value.
    Pixels,
    /// y = A x + noise with A the column-masked, centred, orthonormal 2-D DFT of one-channel
    /// `h`×`w` images (method.md §7.3, [`FourierOperator`]): y is k-space `[h, w, 2]` and each
    /// observation has a mask over its `w` k-space columns.
    KSpace { h: usize, w: usize },
}

/// Noisy, incomplete observations of a set of images.
pub(super) struct Observations {
    /// Pixels: y = mask * x + sigma_y * noise, [n, h * w * c]; k-space: y = A x + sigma_y *
    /// noise, [n, h * w * 2].
    pub(super) y: Vec<f32>,
    /// 1 = observed: one per pixel (shared by the channels), [n, h * w], or per value; for
    /// k-space one per column, [n, w].
    pub(super) masks: Vec<f32>,
    /// The clean images (for evaluation only), [n, h * w * c].
    pub(super) clean: Vec<f32>,
    pub(super) n: usize,
    pub(super) observe: Observe,
}

impl Observations {
    pub(super) fn new(clean: Vec<f32>, masks: Vec<f32>, per: usize, sigma_y: f64, noise_seed: u64) -> Self {
        let n = clean.len() / per;
        let pixels = masks.len() / n;
        let channels = per / pixels;
        let mut noise = vec![0.0f32; clean.len()];
        Philox::new(noise_seed, 0).fill_normal(0, &mut noise);
        let y = clean
            .iter()
            .zip(&noise)
            .enumerate()
            .map(|(i, (&x, &z))| masks[i / channels] * x + sigma_y as f32 * z)
            .collect();
        Observations {
            y,
            masks,
            clean,
            n,
            observe: Observe::Pixels,
        }
    }

    /// Undersampled k-space of one-channel `h`×`w` images `clean` [n, h * w] through their
    /// column masks `columns` [n, w]: y = A x + sigma_y * noise on the kept columns, 0 in the
    /// dropped ones. (The paper's data puts noise there too; those entries are outside A's
    /// range, so the posterior is the same, but MMPS's few CG iterations would spend themselves
    /// on that noise: it is a block of M = Σ_y + A V Aᵀ with eigenvalue σ_y² alone, which pulls
    /// CG's step sizes far from what the observed block needs.)
    pub(super) fn kspace(
        clean: Vec<f32>,
        columns: Vec<f32>,
        (h, w): (usize, usize),
        sigma_y: f64,
        noise_seed: u64,
    ) -> Result<Self> {
        let n = clean.len() / (h * w);
        let op = FourierOperator::new(&columns, n, h, w)?;
        let x = Tensor::from_f32(&clean, &[n, h * w], &Device::Cpu)?;
        let mut y = op.apply(&x.as_view()?)?.to_vec_f32()?;
        let mut noise = vec![0.0f32; y.len()];
        Philox::new(noise_seed, 0).fill_normal(0, &mut noise);
        for (k, (v, z)) in y.iter_mut().zip(&noise).enumerate() {
            // Entry k is (image, row, column, re/im) of [n, h, w, 2].
            let (image, column) = (k / (2 * h * w), (k / 2) % w);
            *v += columns[image * w + column] * sigma_y as f32 * z;
        }
        Ok(Observations {
            y,
            masks: columns,
            clean,
            n,
            observe: Observe::KSpace { h, w },
        })
    }

    /// The values of one observation (m: `per` for pixel masks, 2·h·w for k-space).
    pub(super) fn width(&self) -> usize {
        self.y.len() / self.n.max(1)
    }

    /// The share of values removed, in percent, as the masks have it (of the pixels, or of the
    /// k-space columns).
    pub(super) fn removed_percent(&self) -> f64 {
        100.0 * self.masks.iter().filter(|&&v| v == 0.0).count() as f64 / self.masks.len().max(1) as f64
    }

    /// The first `count` observations (images of `per` values).
    pub(super) fn first(&self, count: usize, per: usize) -> Observations {
        let (m, width) = (self.width(), self.masks.len() / self.n.max(1));
        Observations {
            y: self.y[..count * m].to_vec(),
            masks: self.masks[..count * width].to_vec(),
            clean: self.clean.get(..count * per).map_or(Vec::new(), <[f32]>::to_vec),
            n: count,
            observe: self.observe,
        }
    }

    /// The observations `times` times over, one copy after another: an E-step over them draws
    /// `times` independent posterior samples of each (the paper's MRI draws 2).
    pub(super) fn repeated(&self, times: usize) -> Observations {
        Observations {
            y: self.y.repeat(times),
            masks: self.masks.repeat(times),
            clean: self.clean.repeat(times),
            n: self.n * times,
            observe: self.observe,
        }
    }

    /// The observation operator of observations `lo..hi`, as MMPS takes it.
    pub(super) fn operator(
        &self,
        (lo, hi): (usize, usize),
        per: usize,
        device: &Device,
    ) -> Result<Box<dyn LinearOperator>> {
        let width = self.masks.len() / self.n.max(1);
        let masks = &self.masks[lo * width..hi * width];
        Ok(match self.observe {
            Observe::Pixels => Box::new(MaskOperator::from_pixel_mask(
                masks,
                hi - lo,
                width,
                per / width.max(1),
                DType::F32,
                device,
            )?),
            Observe::KSpace { h, w } => Box::new(FourierOperator::new(masks, hi - lo, h, w)?),
        })
    }

    /// The observations as images to look at: for pixel masks the noisy values where observed,
    /// 0 (mid grey) where not; for k-space the zero-filled inverse Aᵀy.
    pub(super) fn shown(&self, count: usize, per: usize) -> Result<Vec<f32>> {
        match self.observe {
            Observe::Pixels => {
                let channels = per / (self.masks.len() / self.n);
                Ok(self.y[..count * per]
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v * self.masks[i / channels])
                    .collect())
            }
            Observe::KSpace { h, w } => {
                let op = FourierOperator::new(&self.masks[..count * w], count, h, w)?;
                let y = Tensor::from_f32(&self.y[..count * 2 * h * w], &[count, 2 * h * w], &Device::Cpu)?;
                op.zero_filled(&y.as_view()?)?.to_vec_f32()
            }
        }
    }
}

/// How a run's masks are drawn.
pub(super) enum MaskDraw {
    /// Bernoulli pixel masks [n, h, w], each pixel removed with probability `removed`.
    Pixels { removed: f64 },
    /// k-space column masks [n, w]: about one column in `acceleration` kept, and the fully
    /// sampled centre band of `center_fraction` of the columns (posterior::column_masks).
    Columns { acceleration: f64, center_fraction: f64 },
}

impl MaskDraw {
    /// The shape of one observation's mask for h x w images.
    pub(super) fn shape(&self, h: usize, w: usize) -> Vec<usize> {
        match self {
            MaskDraw::Pixels { .. } => vec![h, w],
            MaskDraw::Columns { .. } => vec![w],
        }
    }

    /// `n` masks of h x w images from `seed`.
    pub(super) fn draw(&self, n: usize, (h, w): (usize, usize), seed: u64) -> Result<Vec<f32>> {
        match *self {
            MaskDraw::Pixels { removed } => Ok(cifar10::bernoulli_masks(n, h * w, removed, seed)),
            MaskDraw::Columns {
                acceleration,
                center_fraction,
            } => column_masks(n, w, acceleration, center_fraction, seed),
        }
    }
}

/// The clean images of a run: [n, h, w, c] in the model's range, and the held-out ones (moved
/// into the observations once those are made).
pub(super) struct Dataset {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    pub(super) train: Vec<f32>,
    pub(super) heldout: Vec<f32>,
}

impl Dataset {
    pub(super) fn per(&self) -> usize {
        self.h * self.w * self.c
    }

    pub(super) fn load(cfg: &Config) -> Result<Self> {
        let n = cfg.count("observations")?;
        let held = cfg.count("heldout")?;
        let dir = cfg.string("data_dir")?;
        let dataset = cfg.string("dataset")?;
        let pick = |bytes: Vec<u8>, count: usize, per: usize, what: &str| -> Result<Vec<f32>> {
            let have = bytes.len() / per;
            if have < count {
                return Err(Error::Other(format!(
                    "{dataset}: {count} {what} images asked for, the split has {have}"
                )));
            }
            Ok(cifar10::to_model(&bytes[..count * per]))
        };
        match dataset.as_str() {
            "cifar10" => {
                let dir = if dir.is_empty() {
                    cifar10::default_dir()
                } else {
                    PathBuf::from(dir)
                };
                let per = cifar10::IMAGE;
                Ok(Dataset {
                    h: cifar10::SIDE,
                    w: cifar10::SIDE,
                    c: cifar10::CHANNELS,
                    train: pick(cifar10::read_split_prefix(&dir, true, n)?, n, per, "training")?,
                    heldout: pick(cifar10::read_split_prefix(&dir, false, held)?, held, per, "test")?,
                })
            }
            "fashion-mnist" => {
                use crate::data::fashion_mnist as fm;
                let dir = if dir.is_empty() {
                    fm::default_dir()
                } else {
                    PathBuf::from(dir)
                };
                Ok(Dataset {
                    h: fm::SIDE,
                    w: fm::SIDE,
                    c: fm::CHANNELS,
                    train: pick(fm::read_split(&dir, true)?, n, fm::IMAGE, "training")?,
                    heldout: pick(fm::read_split(&dir, false)?, held, fm::IMAGE, "test")?,
                })
            }
            // A directory of 32 x 32 RGB PNGs (such as tests/fixtures/cifar10): the first
            // `observations` files in name order are observed, the next `heldout` held out.
            "png-dir" => {
                let mut files: Vec<PathBuf> = fs::read_dir(&dir)
                    .map_err(|e| Error::Other(format!("data_dir {dir}: {e}")))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "png"))
                    .collect();
                files.sort();
                if files.len() < n + held {
                    return Err(Error::Other(format!(
                        "data_dir {dir} holds {} PNGs; observations + heldout = {}",
                        files.len(),
                        n + held
                    )));
                }
                Ok(Dataset {
                    h: cifar10::SIDE,
                    w: cifar10::SIDE,
                    c: cifar10::CHANNELS,
                    train: cifar10::to_model(&cifar10::read_images(&files[..n])?),
                    heldout: cifar10::to_model(&cifar10::read_images(&files[n..n + held])?),
                })
            }
            "mri" => {
                let dir = if dir.is_empty() {
                    mri::default_dir()
                } else {
                    PathBuf::from(dir)
                };
                let size = cfg.count("slice_size")?;
                let slices = mri::load_dir(&dir, size, cfg.float("min_tissue")? as f32)?;
                let per = size * size;
                let total = slices.len() / per;
                if n + held > total {
                    return Err(Error::Other(format!(
                        "{}: its volumes give {total} axial slices with tissue; observations + heldout = {} (lower them, or add volumes)",
                        dir.display(),
                        n + held
                    )));
                }
                // Held-out slices evenly spaced through the volumes (neighbouring slices are
                // alike, so a block at one end would score one part of the anatomy only);
                // the first `observations` of the others are observed.
                let held_index: Vec<usize> = (0..held).map(|i| (2 * i + 1) * total / (2 * held)).collect();
                let (mut train, mut heldout) = (Vec::new(), Vec::new());
                for (i, slice) in slices.chunks_exact(per).enumerate() {
                    if held_index.contains(&i) {
                        heldout.extend_from_slice(slice);
                    } else if train.len() < n * per {
                        train.extend_from_slice(slice);
                    }
                }
                Ok(Dataset {
                    h: size,
                    w: size,
                    c: 1,
                    train,
                    heldout,
                })
            }
            other => Err(Error::Other(format!(
                "dataset = '{other}' (expected cifar10, fashion-mnist, png-dir or mri)"
            ))),
        }
    }
}
