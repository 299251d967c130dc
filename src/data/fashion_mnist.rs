//! Fashion-MNIST (Zalando SE, MIT): 60,000 train and 10,000 test 28x28 grayscale images, from the
//! Debian bookworm package `dataset-fashion-mnist` 0.0~git20200523.55506a9-1, fetched and
//! sha256-verified by scripts/fetch-fashion-mnist.sh into a cache outside the repository. The
//! files are the standard gzip IDX files (`{train,t10k}-images-idx3-ubyte.gz`): a big-endian u32
//! magic 0x00000803 (unsigned bytes, 3 dims), the dims n, 28, 28 as big-endian u32, then n * 784
//! pixel bytes, row-major, 0 = background.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{Error, Result};

/// Image height and width in pixels.
pub const SIDE: usize = 28;
/// Channels per pixel (grayscale).
pub const CHANNELS: usize = 1;
/// Pixels per image (28 x 28); one mask value each.
pub const PIXELS: usize = SIDE * SIDE;
/// Values per image, `[28, 28, 1]` in HWC order.
pub const IMAGE: usize = PIXELS * CHANNELS;

/// The IDX magic of an unsigned-byte array with 3 dims.
const MAGIC_U8_3D: u32 = 0x0000_0803;

/// The cache directory the fetch script fills: $EMPRIOR_DATA/fashion-mnist, else
/// ~/.cache/emprior/fashion-mnist.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("EMPRIOR_DATA") {
        Some(d) => PathBuf::from(d).join("fashion-mnist"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/emprior/fashion-mnist"),
    }
}

/// A gzip IDX image file as [n, 28, 28] bytes (n from its header).
pub fn read_idx_images(path: &Path) -> Result<Vec<u8>> {
    let err = |what: String| Error::Other(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            err("missing: run scripts/fetch-fashion-mnist.sh first".into())
        } else {
            err(format!("cannot open: {e}"))
        }
    })?;
    let mut gz = GzDecoder::new(BufReader::new(file));
    let mut header = [0u8; 16];
    read_full(&mut gz, &mut header).map_err(|e| err(format!("reading the IDX header: {e}")))?;
    let word = |i: usize| u32::from_be_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
    let magic = word(0);
    if magic != MAGIC_U8_3D {
        return Err(err(format!(
            "bad IDX magic {magic:#010x}, expected {MAGIC_U8_3D:#010x} (unsigned bytes, 3 dims)"
        )));
    }
    let (n, rows, cols) = (word(1) as usize, word(2) as usize, word(3) as usize);
    if (rows, cols) != (SIDE, SIDE) {
        return Err(err(format!(
            "dims ({n}, {rows}, {cols}), expected (n, {SIDE}, {SIDE})"
        )));
    }
    let want = n * IMAGE;
    // A corrupt header may claim billions of images: reserve at most the train split up front.
    let mut data = Vec::with_capacity(want.min(60_000 * IMAGE));
    gz.by_ref()
        .take(want as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| match e.kind() {
            // A cut gzip stream ends without its trailer.
            std::io::ErrorKind::UnexpectedEof => err(format!(
                "truncated: the gzip stream ends early, after {} of the header's {want} pixel bytes",
                data.len()
            )),
            _ => err(format!("reading the pixels: {e}")),
        })?;
    if data.len() < want {
        return Err(err(format!(
            "truncated: {} pixel bytes, the header says {n} images = {want}",
            data.len()
        )));
    }
    if data.len() > want {
        return Err(err(format!(
            "more data than the header's {n} images ({want} bytes)"
        )));
    }
    Ok(data)
}

/// `read_exact`, with an end of data reported as a truncated file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => std::io::Error::new(e.kind(), "truncated (the file ends early)"),
        _ => e,
    })
}

/// The training images (60,000) or the test images (10,000), [n, 28, 28] bytes.
pub fn read_split(dir: &Path, train: bool) -> Result<Vec<u8>> {
    let (name, n) = if train {
        ("train-images-idx3-ubyte.gz", 60_000)
    } else {
        ("t10k-images-idx3-ubyte.gz", 10_000)
    };
    let path = dir.join(name);
    let bytes = read_idx_images(&path)?;
    if bytes.len() != n * IMAGE {
        return Err(Error::Other(format!(
            "{}: {} images, expected {n}",
            path.display(),
            bytes.len() / IMAGE
        )));
    }
    Ok(bytes)
}
