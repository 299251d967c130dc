//! A NIfTI-1 reader for 3-D volumes (MRI), from bytes or from a `.nii` / `.nii.gz` file.
//!
//! The 348-byte header is read in either byte order (detected from `sizeof_hdr`, which must be
//! 348), the single-file magic `n+1` is required (a `.hdr`/`.img` pair, magic `ni1`, is refused
//! with a message that says so), and the volume must be 3-D (`dim[0]` = 3, or 4 with `dim[4]` =
//! 1). The voxel types read are u8, i8, i16, u16, i32, u32, f32 and f64; `bitpix` must agree with
//! the type. Sizes from the header are checked against the data with checked arithmetic before
//! anything is allocated, so a forged header gives an error, never an allocator abort. Values are
//! scaled by `scl_slope`/`scl_inter` when the slope is finite and non-zero, and NaN or infinite
//! values are refused. Nothing is reoriented: the data stay in the file's voxel order, x fastest
//! (the qform/sform orientation is not applied).

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Bytes in a NIfTI-1 header.
pub const HEADER_BYTES: usize = 348;

/// The most deflate can expand its input (as in `png_images`).
const MAX_DEFLATE_RATIO: usize = 1032;

/// A 3-D volume: its size, its voxels as f32 (after `scl_slope`/`scl_inter`), voxel sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    /// The number of voxels along x, y and z (`dim[1..4]`).
    pub dims: [usize; 3],
    /// The voxels, `dims[0] * dims[1] * dims[2]` of them in NIfTI's order: x fastest, then y,
    /// then z; voxel (x, y, z) is at `x + dims[0] * (y + dims[1] * z)`.
    pub data: Vec<f32>,
    /// The voxel sizes along x, y and z (`pixdim[1..4]`, in the file's spatial unit, usually mm).
    pub pixdim: [f32; 3],
}

impl Volume {
    /// The voxel at (x, y, z); panics when out of range, like slice indexing.
    pub fn at(&self, x: usize, y: usize, z: usize) -> f32 {
        let [nx, ny, _] = self.dims;
        self.data[x + nx * (y + ny * z)]
    }

    /// The largest voxel value (NEG_INFINITY for an empty volume).
    pub fn max(&self) -> f32 {
        self.data.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// The voxel types read, by NIfTI datatype code.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Kind {
    fn from_code(code: i16) -> std::result::Result<Kind, String> {
        Ok(match code {
            2 => Kind::U8,
            256 => Kind::I8,
            4 => Kind::I16,
            512 => Kind::U16,
            8 => Kind::I32,
            768 => Kind::U32,
            16 => Kind::F32,
            64 => Kind::F64,
            other => {
                let name = match other {
                    0 => "unknown",
                    1 => "binary (1 bit)",
                    32 => "complex64",
                    128 => "rgb24",
                    1024 => "int64",
                    1280 => "uint64",
                    1536 => "float128",
                    1792 => "complex128",
                    2048 => "complex256",
                    2304 => "rgba32",
                    _ => "not a NIfTI-1 datatype",
                };
                return Err(format!(
                    "unsupported datatype {other} ({name}); read are uint8 (2), int8 (256), \
                     int16 (4), uint16 (512), int32 (8), uint32 (768), float32 (16) and float64 (64)"
                ));
            }
        })
    }

    fn bytes(self) -> usize {
        match self {
            Kind::U8 | Kind::I8 => 1,
            Kind::I16 | Kind::U16 => 2,
            Kind::I32 | Kind::U32 | Kind::F32 => 4,
            Kind::F64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::U8 => "uint8",
            Kind::I8 => "int8",
            Kind::I16 => "int16",
            Kind::U16 => "uint16",
            Kind::I32 => "int32",
            Kind::U32 => "uint32",
            Kind::F32 => "float32",
            Kind::F64 => "float64",
        }
    }
}

/// What the header says, checked: enough to size and decode the data.
struct Header {
    big_endian: bool,
    dims: [usize; 3],
    kind: Kind,
    offset: usize,
    /// `offset + voxels * kind.bytes()`: the file's exact length.
    total: usize,
    slope: f32,
    inter: f32,
    pixdim: [f32; 3],
}

fn header(bytes: &[u8]) -> std::result::Result<Header, String> {
    if bytes.len() < HEADER_BYTES {
        return Err(format!(
            "{} bytes, too short for a NIfTI-1 header ({HEADER_BYTES} bytes)",
            bytes.len()
        ));
    }
    let le = i32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let be = i32::from_be_bytes(bytes[0..4].try_into().unwrap());
    let big_endian = match (le, be) {
        (348, _) => false,
        (_, 348) => true,
        (540, _) | (_, 540) => return Err("sizeof_hdr is 540: a NIfTI-2 file, only NIfTI-1 is read".into()),
        _ => {
            return Err(format!(
                "sizeof_hdr is {le} (little-endian) / {be} (big-endian), expected 348: not a \
                 NIfTI-1 file"
            ))
        }
    };
    let i16_at = |o: usize| {
        let b = [bytes[o], bytes[o + 1]];
        if big_endian {
            i16::from_be_bytes(b)
        } else {
            i16::from_le_bytes(b)
        }
    };
    let f32_at = |o: usize| {
        let b: [u8; 4] = bytes[o..o + 4].try_into().unwrap();
        if big_endian {
            f32::from_be_bytes(b)
        } else {
            f32::from_le_bytes(b)
        }
    };
    let magic = &bytes[344..348];
    match magic {
        b"n+1\0" => {}
        b"ni1\0" => {
            return Err("magic \"ni1\": a NIfTI-1 header/image pair (.hdr + .img); only \
                        single-file NIfTI (.nii or .nii.gz, magic \"n+1\") is read: convert the \
                        pair to one .nii file first"
                .into())
        }
        _ => {
            return Err(format!(
                "magic {:?}, expected \"n+1\" (a single-file NIfTI-1; ANALYZE 7.5 is not read)",
                String::from_utf8_lossy(magic)
            ))
        }
    }
    let dim: Vec<i16> = (0..8).map(|i| i16_at(40 + 2 * i)).collect();
    let rank = dim[0];
    if !(rank == 3 || (rank == 4 && dim[4] == 1)) {
        return Err(format!(
            "dim[0] = {rank} with dim = {:?}: only 3-D volumes are read (dim[0] = 3, or 4 with \
             dim[4] = 1)",
            &dim[1..]
        ));
    }
    if dim[1..4].iter().any(|&d| d < 1) {
        return Err(format!(
            "dims {} x {} x {}: each must be at least 1",
            dim[1], dim[2], dim[3]
        ));
    }
    let dims = [dim[1] as usize, dim[2] as usize, dim[3] as usize];
    let kind = Kind::from_code(i16_at(70))?;
    let bitpix = i16_at(72);
    if bitpix as i64 != 8 * kind.bytes() as i64 {
        return Err(format!(
            "bitpix {bitpix} disagrees with datatype {} ({} bits)",
            kind.name(),
            8 * kind.bytes()
        ));
    }
    let vox_offset = f32_at(108);
    if !(vox_offset.is_finite()
        && vox_offset >= HEADER_BYTES as f32
        && vox_offset.fract() == 0.0
        && vox_offset <= 1e9)
    {
        return Err(format!(
            "vox_offset {vox_offset}: the data offset must be a whole number of bytes, at least \
             {HEADER_BYTES}"
        ));
    }
    let offset = vox_offset as usize;
    let too_large = || {
        format!(
            "the header declares {} x {} x {} voxels of {}: more than memory can address",
            dims[0],
            dims[1],
            dims[2],
            kind.name()
        )
    };
    let total = dims[0]
        .checked_mul(dims[1])
        .and_then(|n| n.checked_mul(dims[2]))
        .and_then(|n| n.checked_mul(kind.bytes()))
        .and_then(|n| n.checked_add(offset))
        .ok_or_else(too_large)?;
    let pixdim = [f32_at(80), f32_at(84), f32_at(88)];
    Ok(Header {
        big_endian,
        dims,
        kind,
        offset,
        total,
        slope: f32_at(112),
        inter: f32_at(116),
        pixdim,
    })
}

/// The volume in a single-file NIfTI-1's bytes (uncompressed: [`read`] gunzips `.nii.gz`).
pub fn parse(bytes: &[u8]) -> Result<Volume> {
    parse_inner(bytes).map_err(Error::Other)
}

fn parse_inner(bytes: &[u8]) -> std::result::Result<Volume, String> {
    let h = header(bytes)?;
    let [nx, ny, nz] = h.dims;
    if bytes.len() < h.total {
        return Err(format!(
            "truncated: the header declares {nx} x {ny} x {nz} voxels of {} from byte {}, \
             {} bytes in all, and the data has {} bytes",
            h.kind.name(),
            h.offset,
            h.total,
            bytes.len()
        ));
    }
    if bytes.len() > h.total {
        return Err(format!(
            "{} bytes after the {nx} x {ny} x {nz} {} voxels the header declares: a wrong \
             datatype or dims, or more than one volume",
            bytes.len() - h.total,
            h.kind.name()
        ));
    }
    let raw = &bytes[h.offset..h.total];
    crate::host_pool::ensure_available("a NIfTI volume", raw.len() / h.kind.bytes() * 4)
        .map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(raw.len() / h.kind.bytes());
    let be = h.big_endian;
    macro_rules! decode {
        ($t:ty, $n:literal) => {
            data.extend(raw.chunks_exact($n).map(|c| {
                let b: [u8; $n] = c.try_into().unwrap();
                (if be {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                }) as f32
            }))
        };
    }
    match h.kind {
        Kind::U8 => data.extend(raw.iter().map(|&v| v as f32)),
        Kind::I8 => data.extend(raw.iter().map(|&v| v as i8 as f32)),
        Kind::I16 => decode!(i16, 2),
        Kind::U16 => decode!(u16, 2),
        Kind::I32 => decode!(i32, 4),
        Kind::U32 => decode!(u32, 4),
        Kind::F32 => decode!(f32, 4),
        Kind::F64 => decode!(f64, 8),
    }
    let float = matches!(h.kind, Kind::F32 | Kind::F64);
    if float {
        check_finite(&data, h.dims, "")?;
    }
    // A slope of 0 (or a NaN one, as some writers store) means "no scaling".
    if h.slope.is_finite() && h.slope != 0.0 {
        let inter = if h.inter.is_finite() { h.inter } else { 0.0 };
        if h.slope != 1.0 || inter != 0.0 {
            for v in data.iter_mut() {
                *v = *v * h.slope + inter;
            }
            check_finite(
                &data,
                h.dims,
                &format!(" after scl_slope {} and scl_inter {inter}", h.slope),
            )?;
        }
    }
    Ok(Volume {
        dims: h.dims,
        data,
        pixdim: h.pixdim,
    })
}

/// An error naming the first NaN or infinite voxel (a float64 beyond f32's range is infinite).
fn check_finite(data: &[f32], [nx, ny, _]: [usize; 3], when: &str) -> std::result::Result<(), String> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => {
            let v = data[i];
            let what = if v.is_nan() {
                "NaN".to_string()
            } else {
                format!("{v} (infinite or beyond the f32 range)")
            };
            let count = data.iter().filter(|v| !v.is_finite()).count();
            Err(format!(
                "voxel ({}, {}, {}) is {what}{when}; {count} voxel(s) are NaN or infinite, and \
                 the volume must be finite",
                i % nx,
                (i / nx) % ny,
                i / (nx * ny)
            ))
        }
    }
}

/// The volume in a `.nii` or `.nii.gz` file (gzip is recognised by its magic bytes, whatever the
/// name says); errors name the file. A gzip stream is decompressed only as far as its header
/// declares, after checking that the compressed file could hold that much.
pub fn read(path: &Path) -> Result<Volume> {
    let err = |what: String| Error::Other(format!("{}: {what}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let raw = gunzip(&bytes).map_err(err)?;
        parse_inner(&raw).map_err(err)
    } else {
        parse_inner(&bytes).map_err(err)
    }
}

/// A gzip NIfTI's uncompressed bytes: the header first, then as many bytes as it declares (and
/// one more, to notice extra data), refusing a header that declares more than deflate's
/// 1032:1 could expand the compressed bytes into.
fn gunzip(compressed: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut gz = flate2::read::MultiGzDecoder::new(compressed);
    let mut head = Vec::with_capacity(HEADER_BYTES);
    let gz_err = |e: std::io::Error, at: usize| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            format!("truncated: the gzip stream ends early, after {at} uncompressed bytes")
        }
        _ => format!("not a readable gzip stream ({e})"),
    };
    gz.by_ref()
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| gz_err(e, 0))?;
    let h = header(&head)?;
    let limit = MAX_DEFLATE_RATIO
        .saturating_mul(compressed.len())
        .saturating_add(1 << 16);
    if h.total > limit {
        let [nx, ny, nz] = h.dims;
        return Err(format!(
            "the header declares {nx} x {ny} x {nz} voxels of {} ({} bytes), more than the \
             file's {} compressed bytes can hold",
            h.kind.name(),
            h.total,
            compressed.len()
        ));
    }
    // The uncompressed bytes, then the f32 voxels.
    let voxels = (h.total - h.offset) / h.kind.bytes();
    crate::host_pool::ensure_available("a NIfTI volume", h.total.saturating_add(voxels.saturating_mul(4)))
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::with_capacity(h.total + 1);
    raw.extend_from_slice(&head);
    let rest = (h.total + 1 - raw.len()) as u64;
    if let Err(e) = gz.take(rest).read_to_end(&mut raw) {
        return Err(gz_err(e, raw.len()));
    }
    Ok(raw)
}
