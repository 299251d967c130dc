//! 2-D MRI slices for the accelerated-MRI experiment (method.md §7.3), from real NIfTI-1 head
//! volumes: by default the Colin27 T1 head `ch2.nii.gz` of the Debian package `mricron-data`,
//! fetched and sha256-verified by scripts/fetch-mri.sh into a cache outside the repository (no
//! reachable registry ships fastMRI; see docs/data.md §3). The user's own `.nii`/`.nii.gz`
//! volumes are read the same way ([`load_dir`](crate::data::mri::load_dir),
//! [`load_file`](crate::data::mri::load_file)).
//!
//! Each volume gives its axial slices (along z) that hold enough tissue, each zero-padded to a
//! square and resampled to `[size, size]`, then scaled as the paper scales each fastMRI volume:
//! divided by the volume's max and mapped to `[-2, 2]` (x / max * 4 - 2).

use std::path::{Path, PathBuf};

use super::nifti::{self, Volume};
use crate::error::{Error, Result};

/// A voxel counts as tissue when it is above this fraction of its volume's max.
pub const TISSUE_LEVEL: f32 = 0.1;

/// The default `min_tissue_fraction`: a slice is kept when at least this fraction of its voxels
/// is tissue. For `ch2.nii.gz` (181 axial slices, head with skull, 1 mm) it keeps the 154 slices
/// from the bottom of the volume (jaw and neck) to about 2.5 cm below the vertex, dropping the
/// top slices that hold little more than a ring of scalp.
pub const MIN_TISSUE_FRACTION: f32 = 0.25;

/// The volume [`load_dir`] finds in [`default_dir`] once scripts/fetch-mri.sh has run.
pub const DEFAULT_FILE: &str = "ch2.nii.gz";

/// The cache directory the fetch script fills: $EMPRIOR_DATA/mri, else ~/.cache/emprior/mri. It
/// holds `ch2.nii.gz`; further volumes (the same head skull-stripped, at 1 mm and 0.5 mm, and a
/// macaque template) are in its `extra/` folder, which [`load_dir`] does not read.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("EMPRIOR_DATA") {
        Some(d) => PathBuf::from(d).join("mri"),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(".cache/emprior/mri")
        }
    }
}

/// The weights of a 1-D resampling from `from` samples to `to`: for each output sample, the
/// first input index and the normalised weights from there. Bilinear interpolation between
/// pixel centres when enlarging; when shrinking, the triangle widens to the reduction factor
/// (antialiased bilinear, as PIL's and torchvision's `BILINEAR` resize with antialiasing), so
/// each output pixel averages the whole footprint it covers instead of aliasing fine edges.
fn weights(from: usize, to: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = from as f64 / to as f64;
    let support = scale.max(1.0);
    (0..to)
        .map(|i| {
            let centre = (i as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0) as usize).min(from - 1);
            let hi = ((centre + support).ceil() as usize).min(from);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// The axial slices (along z) of `volume` with at least `min_tissue_fraction` of their voxels
/// above [`TISSUE_LEVEL`] times the volume's max, as `[n, size, size]` row-major values in
/// `[-2, 2]`, slices in z order (inferior first for volumes stored like `ch2.nii.gz`).
///
/// - Orientation: column = x as stored, row 0 = the largest y (for RAS-stored volumes such as
///   `ch2.nii.gz`, the front of the head at the top). The file's qform/sform is not applied.
/// - Resampling: the shorter in-plane side is zero-padded (centred) to a square, then the square
///   is resampled to `size` by antialiased bilinear interpolation (see `weights`): exact
///   bilinear when enlarging (217 to 320), a triangle filter as wide as the reduction when
///   shrinking (217 to 64), so the small slices average their footprint rather than alias. The
///   weights are non-negative and sum to 1, so values stay within the slice's range.
/// - Scaling: negative voxels (interpolation ringing in magnitude volumes) are clamped to 0
///   (NaN or infinite ones, which [`nifti::read`] never gives, count as 0 too);
///   the kept slices are divided by their largest resampled value and mapped by x * 4 - 2, so
///   background is exactly -2 and the brightest value exactly 2.
///
/// Empty when no slice qualifies, when the volume's max is not positive and finite, when
/// `data` does not hold `dims` voxels, or when `size` is 0.
pub fn axial_slices(volume: &Volume, size: usize, min_tissue_fraction: f32) -> Vec<f32> {
    let [nx, ny, nz] = volume.dims;
    let plane = nx.saturating_mul(ny);
    let vmax = volume.max();
    let holds_dims = plane.checked_mul(nz) == Some(volume.data.len());
    if size == 0 || plane == 0 || !holds_dims || !vmax.is_finite() || vmax <= 0.0 {
        return Vec::new();
    }
    let level = TISSUE_LEVEL * vmax;
    let side = nx.max(ny);
    let (px, py) = ((side - nx) / 2, (side - ny) / 2);
    let table = weights(side, size);
    let mut out = Vec::new();
    let mut square = vec![0.0f32; side * side];
    let mut rows = vec![0.0f32; side * size];
    for z in 0..nz {
        let slice = &volume.data[z * plane..(z + 1) * plane];
        let tissue = slice.iter().filter(|&&v| v > level).count();
        if (tissue as f64) < min_tissue_fraction as f64 * plane as f64 {
            continue;
        }
        // The padded square: row r holds y = ny - 1 - (r - py), column c holds x = c - px.
        for y in 0..ny {
            let r = py + ny - 1 - y;
            let dst = &mut square[r * side + px..r * side + px + nx];
            for (d, &v) in dst.iter_mut().zip(&slice[y * nx..(y + 1) * nx]) {
                *d = if v.is_finite() { v.max(0.0) } else { 0.0 };
            }
        }
        // Along the columns of every row, then along the rows.
        for r in 0..side {
            let src = &square[r * side..(r + 1) * side];
            for (i, (lo, w)) in table.iter().enumerate() {
                rows[r * size + i] = w.iter().zip(&src[*lo..]).map(|(a, b)| a * b).sum();
            }
        }
        for (lo, w) in &table {
            for i in 0..size {
                out.push(
                    w.iter()
                        .enumerate()
                        .map(|(k, a)| a * rows[(lo + k) * size + i])
                        .sum(),
                );
            }
        }
    }
    let m = out.iter().copied().fold(0.0f32, f32::max);
    if m <= 0.0 {
        return Vec::new();
    }
    for v in out.iter_mut() {
        *v = (*v / m * 4.0 - 2.0).clamp(-2.0, 2.0);
    }
    out
}

/// The `.nii` and `.nii.gz` files directly in `dir`, sorted by name; an error that says to run
/// scripts/fetch-mri.sh when the directory is missing or holds none.
pub fn nifti_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Other(format!(
                "{} is missing: run scripts/fetch-mri.sh first (or point at a directory of your \
                 own .nii/.nii.gz volumes)",
                dir.display()
            ))
        } else {
            Error::Other(format!("{}: cannot list: {e}", dir.display()))
        }
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".nii") || n.ends_with(".nii.gz"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Other(format!(
            "{} holds no .nii or .nii.gz volume: run scripts/fetch-mri.sh first (or put your \
             own NIfTI-1 volumes there)",
            dir.display()
        )));
    }
    Ok(files)
}

/// The slices of one NIfTI file as [`axial_slices`] makes them, `[n, size, size]`; errors name
/// the file.
pub fn load_file(path: &Path, size: usize, min_tissue_fraction: f32) -> Result<Vec<f32>> {
    let volume = nifti::read(path)?;
    Ok(axial_slices(&volume, size, min_tissue_fraction))
}

/// The slices of every volume in `dir` ([`nifti_files`], in name order), each volume scaled by
/// its own max, concatenated as `[n, size, size]`. An error names the file that failed, and
/// says so when no volume gave a slice.
pub fn load_dir(dir: &Path, size: usize, min_tissue_fraction: f32) -> Result<Vec<f32>> {
    if size == 0 {
        return Err(Error::Other("MRI slices need a size of at least 1".into()));
    }
    let mut all = Vec::new();
    for path in nifti_files(dir)? {
        all.extend(load_file(&path, size, min_tissue_fraction)?);
    }
    if all.is_empty() {
        return Err(Error::Other(format!(
            "no axial slice in {} has at least {min_tissue_fraction} of its voxels above \
             {TISSUE_LEVEL} of its volume's max",
            dir.display()
        )));
    }
    Ok(all)
}

/// Slices in `[-2, 2]` to bytes (0 at -2, 255 at 2, rounded and clamped): for looking at them.
pub fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .map(|&v| ((v + 2.0) * (255.0 / 4.0)).round().clamp(0.0, 255.0) as u8)
        .collect()
}
