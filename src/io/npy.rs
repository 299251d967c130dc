//! NumPy `.npy` files (format 1.0 and 2.0), f32, f64 and u8 (masks), C order: what users already have for
//! observations, operators, masks and samples. Anything else (another dtype, Fortran order, a
//! big-endian array, a wrong rank) is an error that names the file and what was expected.

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};
use crate::io::checkpoint::write_atomically;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An array read from a `.npy` file, widened to f64.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The array's shape as stored (`[]` for a scalar).
    pub shape: Vec<usize>,
    /// The values in C (row-major) order, widened to f64 exactly; `shape`'s product of them.
    pub data: Vec<f64>,
    /// The dtype in the file: "f4", "f8" or "u1".
    pub dtype: &'static str,
}

impl NpyArray {
    /// Checks the rank, naming the file and the expected layout on failure.
    pub fn expect_rank(&self, path: &Path, ranks: &[usize], what: &str) -> Result<()> {
        if ranks.contains(&self.shape.len()) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "{}: expected {what}, got an array of shape {:?}",
                path.display(),
                self.shape
            )))
        }
    }

    /// The values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Other(format!("{}: {why}", path.display()))
}

/// Reads a `.npy` file of f32, f64 or u8 values in C order.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = fs::read(path).map_err(|e| bad(path, format!("cannot read: {e}")))?;
    parse_npy(&bytes, path)
}

/// The array in the bytes of a `.npy` file; `path` names it in errors (the fuzz targets call
/// this directly).
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(path, format!("unsupported .npy format version {v}"))),
    };
    let header = start
        .checked_add(header_len)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| {
            bad(
                path,
                format!(
                    "truncated header ({header_len} bytes declared, {} in the file)",
                    bytes.len() - start
                ),
            )
        })?;
    let header = std::str::from_utf8(header).map_err(|_| bad(path, "header is not text"))?;
    let field = |key: &str| -> Result<&str> {
        let quoted = format!("'{key}'");
        let at = header
            .find(&quoted)
            .ok_or_else(|| bad(path, format!("header lacks '{key}'")))?;
        // `quoted` is ASCII, so the byte after it is a character boundary.
        let rest = header[at + quoted.len()..].trim_start();
        Ok(rest.strip_prefix(':').unwrap_or(rest).trim_start())
    };
    let descr = field("descr")?;
    let (dtype, width) = if descr.starts_with("'<f4'") || descr.starts_with("'=f4'") {
        ("f4", 4)
    } else if descr.starts_with("'<f8'") || descr.starts_with("'=f8'") {
        ("f8", 8)
    } else if descr.starts_with("'|u1'") {
        ("u1", 1)
    } else {
        let shown: String = descr.chars().take_while(|&c| c != ',').collect();
        return Err(bad(
            path,
            format!("dtype {shown} is not supported (expected little-endian float32 '<f4', float64 '<f8' or uint8 '|u1')"),
        ));
    };
    if field("fortran_order")?.starts_with("True") {
        return Err(bad(
            path,
            "Fortran-order arrays are not supported (save with np.ascontiguousarray)",
        ));
    }
    let shape_text = field("shape")?;
    let malformed = || {
        let tuple = shape_text.find(')').map_or(shape_text, |end| &shape_text[..=end]);
        let shown: String = tuple.chars().take(40).collect();
        bad(
            path,
            format!("malformed shape {shown} (expected a tuple of sizes such as (3, 4))"),
        )
    };
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|t| t.find(')').map(|close| &t[..close]))
        .ok_or_else(malformed)?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| malformed()))
        .collect::<Result<Vec<_>>>()?;
    // Sizes come from the file: multiply with checks, so a forged shape is an error, never a
    // wrapped count that happens to match the data.
    let bytes_needed = shape
        .iter()
        .try_fold(width as usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            bad(
                path,
                format!("shape {shape:?} of {dtype} is too large to address"),
            )
        })?;
    let body = &bytes[start + header_len..];
    if body.len() != bytes_needed {
        return Err(bad(
            path,
            format!(
                "{} data bytes for shape {shape:?} of {dtype}, expected {bytes_needed}",
                body.len(),
            ),
        ));
    }
    let data = match width {
        1 => body.iter().map(|&b| b as f64).collect(),
        4 => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        _ => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
    };
    Ok(NpyArray { shape, data, dtype })
}

fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut text = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    // Pad so the data starts on a 64-byte boundary, ending the header with a newline.
    let total = 10 + text.len() + 1;
    text.push_str(&" ".repeat(total.next_multiple_of(64) - total));
    text.push('\n');
    let mut out = MAGIC.to_vec();
    out.extend([1u8, 0]);
    out.extend((text.len() as u16).to_le_bytes());
    out.extend(text.into_bytes());
    out
}

/// Writes f32 values (C order) atomically; an error when `data.len()` is not the product of
/// `shape` or the file cannot be written.
///
/// ```
/// use emprior::io::{read_npy, write_npy_f32};
///
/// let path = std::env::temp_dir().join(format!("emprior-doc-{}.npy", std::process::id()));
/// write_npy_f32(&path, &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5])?;
/// let a = read_npy(&path)?;
/// assert_eq!(a.shape, vec![2, 3]);
/// assert_eq!(a.dtype, "f4");
/// assert_eq!(a.data[5], 6.5);
/// assert_eq!(a.to_f32(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
/// // Values that do not fill the shape are refused.
/// assert!(write_npy_f32(&path, &[4], &[1.0]).is_err());
/// std::fs::remove_file(&path).unwrap();
/// # Ok::<(), emprior::Error>(())
/// ```
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    check_len(path, shape, data.len())?;
    let mut out = header("<f4", shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    write_atomically(path, &out)
}

/// Writes bytes (C order, dtype uint8) atomically: masks.
pub fn write_npy_u8(path: &Path, shape: &[usize], data: &[u8]) -> Result<()> {
    check_len(path, shape, data.len())?;
    let mut out = header("|u1", shape);
    out.extend_from_slice(data);
    write_atomically(path, &out)
}

/// Writes f64 values (C order) atomically.
pub fn write_npy_f64(path: &Path, shape: &[usize], data: &[f64]) -> Result<()> {
    check_len(path, shape, data.len())?;
    let mut out = header("<f8", shape);
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    write_atomically(path, &out)
}

fn check_len(path: &Path, shape: &[usize], len: usize) -> Result<()> {
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(len) {
        return Err(bad(path, format!("{len} values do not fill shape {shape:?}")));
    }
    Ok(())
}
