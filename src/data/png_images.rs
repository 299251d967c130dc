//! PNG images of any size as 8-bit values with 1 (grayscale) or 3 (RGB) channels: palette and
//! low-bit-depth images expanded, 16-bit ones stripped to 8, an alpha channel dropped. Sizes from
//! a file's header are checked before anything is allocated. The readers of the image datasets
//! (CIFAR-10's batch PNGs, a folder of PNGs, the user's images and masks) go through here.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The most deflate can expand its input.
const MAX_DEFLATE_RATIO: usize = 1032;

/// An image: width, height, channels (1 or 3) and its bytes, HWC.
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Channels per pixel: 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// The 8-bit values, `[height, width, channels]` row-major.
    pub bytes: Vec<u8>,
}

/// The image in a PNG file's bytes; `path` names it in errors (the fuzz targets call this).
pub fn decode(bytes: &[u8], path: &Path) -> Result<Image> {
    let err = |e: &dyn std::fmt::Display| Error::Other(format!("{}: {e}", path.display()));
    let unreadable = |e: png::DecodingError| err(&format!("not a readable PNG ({e})"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(unreadable)?;
    // The size comes from the file's header: checked before it reaches the allocator. Deflate
    // expands at most 1032:1, so a header that declares more pixels than the file's compressed
    // bytes could hold is a forged one (found by scripts/fuzz.sh: a 5.4 GB buffer for a small
    // file).
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| err(&"image too large"))?;
    let info = reader.info();
    if size
        > MAX_DEFLATE_RATIO
            .saturating_mul(bytes.len())
            .saturating_add(1 << 16)
    {
        return Err(err(&format!(
            "the header declares a {} x {} image, more than the file's {} bytes can hold",
            info.width,
            info.height,
            bytes.len()
        )));
    }
    crate::host_pool::ensure_available(&path.display().to_string(), size)?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(unreadable)?;
    buf.truncate(frame.buffer_size());
    let (width, height) = (frame.width as usize, frame.height as usize);
    let (stored, channels) = match frame.color_type {
        png::ColorType::Grayscale => (1, 1),
        png::ColorType::GrayscaleAlpha => (2, 1),
        png::ColorType::Rgb => (3, 3),
        png::ColorType::Rgba => (4, 3),
        other => return Err(err(&format!("unsupported PNG color type {other:?}"))),
    };
    if frame.bit_depth != png::BitDepth::Eight || buf.len() != width * height * stored {
        return Err(err(&format!(
            "expected 8-bit values after expansion, got {:?} ({} bytes for {width} x {height})",
            frame.bit_depth,
            buf.len()
        )));
    }
    let bytes = if stored == channels {
        buf
    } else {
        buf.chunks_exact(stored)
            .flat_map(|p| p[..channels].iter().copied())
            .collect()
    };
    Ok(Image {
        width,
        height,
        channels,
        bytes,
    })
}

/// Reads one PNG file.
pub fn read(path: &Path) -> Result<Image> {
    let bytes = std::fs::read(path).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    decode(&bytes, path)
}

/// The PNG files of a directory, in name order.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    Ok(files)
}

/// Every PNG of a directory, all of one size and channel count: ([n, H, W, C], bytes HWC).
pub fn read_folder(dir: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let files = list(dir)?;
    if files.is_empty() {
        return Err(Error::Other(format!("{}: no PNG files", dir.display())));
    }
    let mut all = Vec::new();
    let mut shape: Option<(usize, usize, usize)> = None;
    for f in &files {
        let img = read(f)?;
        let this = (img.height, img.width, img.channels);
        match shape {
            None => shape = Some(this),
            Some(first) if first != this => {
                return Err(Error::Other(format!(
                    "{}: {} x {} with {} channel(s), but {} is {} x {} with {}: the images of a folder share one size",
                    f.display(),
                    this.0,
                    this.1,
                    this.2,
                    files[0].display(),
                    first.0,
                    first.1,
                    first.2
                )))
            }
            Some(_) => {}
        }
        all.extend(img.bytes);
    }
    let (h, w, c) = shape.unwrap_or((0, 0, 0));
    Ok((vec![files.len(), h, w, c], all))
}
