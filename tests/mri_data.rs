//! MRI data (issue 15): the NIfTI-1 reader on synthetic files the test writes (every voxel type
//! read, both byte orders, gzip or not) and on forged or broken ones (each error names the
//! problem, none panics), the axial slices (shape, range, tissue filter, orientation), the
//! directory loader, and the real Colin27 head `ch2.nii.gz` when scripts/fetch-mri.sh has
//! fetched it (skipped with a message otherwise, a failure when EMPRIOR_REQUIRE_DATA=1, as CI
//! sets after fetching). The real test writes target/mri-slices.png for a person to look at.

mod common;

use std::io::Write;
use std::path::PathBuf;

use common::Rng;
use emprior::data::mri::{self, axial_slices, load_dir, load_file, nifti_files};
use emprior::data::nifti::{self, parse, Volume};

/// A single-file NIfTI-1 (magic `n+1`, data at byte 352) in either byte order.
struct Nifti {
    dims: Vec<i16>,
    datatype: i16,
    bitpix: i16,
    big_endian: bool,
    slope: f32,
    inter: f32,
    magic: [u8; 4],
    sizeof_hdr: i32,
    vox_offset: f32,
}

impl Nifti {
    fn new(dims: [i16; 3], datatype: i16, bitpix: i16) -> Nifti {
        Nifti {
            dims: vec![3, dims[0], dims[1], dims[2], 1, 1, 1, 1],
            datatype,
            bitpix,
            big_endian: false,
            slope: 0.0,
            inter: 0.0,
            magic: *b"n+1\0",
            sizeof_hdr: 348,
            vox_offset: 352.0,
        }
    }

    /// The file's bytes with `data` (already in the file's byte order) after the header.
    fn bytes(&self, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 352];
        let be = self.big_endian;
        let put_i16 = |h: &mut Vec<u8>, at: usize, v: i16| {
            h[at..at + 2].copy_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() })
        };
        let put_f32 = |h: &mut Vec<u8>, at: usize, v: f32| {
            h[at..at + 4].copy_from_slice(&if be { v.to_be_bytes() } else { v.to_le_bytes() })
        };
        let s = self.sizeof_hdr;
        h[0..4].copy_from_slice(&if be { s.to_be_bytes() } else { s.to_le_bytes() });
        for (i, &d) in self.dims.iter().enumerate() {
            put_i16(&mut h, 40 + 2 * i, d);
        }
        put_i16(&mut h, 70, self.datatype);
        put_i16(&mut h, 72, self.bitpix);
        for (i, p) in [1.0f32, 1.0, 1.5, 2.0].into_iter().enumerate() {
            put_f32(&mut h, 76 + 4 * i, p);
        }
        put_f32(&mut h, 108, self.vox_offset);
        put_f32(&mut h, 112, self.slope);
        put_f32(&mut h, 116, self.inter);
        h[344..348].copy_from_slice(&self.magic);
        h.extend_from_slice(data);
        h
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emprior-mri-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The error text of parsing `bytes`, which must fail.
fn parse_error(bytes: &[u8]) -> String {
    match parse(bytes) {
        Ok(v) => panic!("expected an error, got a volume of {:?}", v.dims),
        Err(e) => e.to_string(),
    }
}

/// A 3 x 2 x 2 ramp: voxel (x, y, z) = x + 3y + 6z - 4 (negative values for the signed types).
fn ramp() -> Vec<f64> {
    (0..12).map(|i| i as f64 - 4.0).collect()
}

#[test]
fn every_voxel_type_reads_in_either_byte_order() {
    let values = ramp();
    for big in [false, true] {
        macro_rules! case {
            ($t:ty, $code:expr, $bits:expr) => {{
                let data: Vec<u8> = values
                    .iter()
                    .flat_map(|&v| {
                        let v = v as $t;
                        if big {
                            v.to_be_bytes().to_vec()
                        } else {
                            v.to_le_bytes().to_vec()
                        }
                    })
                    .collect();
                let mut n = Nifti::new([3, 2, 2], $code, $bits);
                n.big_endian = big;
                let vol = parse(&n.bytes(&data))
                    .unwrap_or_else(|e| panic!("{} big_endian={big}: {e}", stringify!($t)));
                assert_eq!(vol.dims, [3, 2, 2]);
                assert_eq!(vol.pixdim, [1.0, 1.5, 2.0]);
                let want: Vec<f32> = values.iter().map(|&v| v as $t as f32).collect();
                assert_eq!(vol.data, want, "{} big_endian={big}", stringify!($t));
                vol
            }};
        }
        case!(u8, 2, 8);
        case!(i8, 256, 8);
        let v = case!(i16, 4, 16);
        assert_eq!(v.at(0, 0, 0), -4.0);
        assert_eq!(v.at(2, 1, 1), 7.0, "x fastest, then y, then z");
        case!(u16, 512, 16);
        case!(i32, 8, 32);
        case!(u32, 768, 32);
        case!(f32, 16, 32);
        case!(f64, 64, 64);
    }
    // The same int16 volume from both byte orders.
    let data_le: Vec<u8> = values.iter().flat_map(|&v| (v as i16).to_le_bytes()).collect();
    let data_be: Vec<u8> = values.iter().flat_map(|&v| (v as i16).to_be_bytes()).collect();
    let le = Nifti::new([3, 2, 2], 4, 16);
    let mut be = Nifti::new([3, 2, 2], 4, 16);
    be.big_endian = true;
    assert_eq!(
        parse(&le.bytes(&data_le)).unwrap(),
        parse(&be.bytes(&data_be)).unwrap()
    );
}

#[test]
fn scaling_and_a_singleton_fourth_dimension_are_applied() {
    let data: Vec<u8> = (0..12u8).collect();
    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.slope = 0.5;
    n.inter = -1.0;
    let v = parse(&n.bytes(&data)).unwrap();
    assert_eq!(v.data[0], -1.0);
    assert_eq!(v.data[11], 4.5, "11 * 0.5 - 1");
    // A slope of 0 means no scaling, whatever the intercept.
    n.slope = 0.0;
    n.inter = 100.0;
    assert_eq!(parse(&n.bytes(&data)).unwrap().data[11], 11.0);
    // 4-D with dim[4] = 1 is a 3-D volume; dim[4] = 2 is refused.
    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.dims[0] = 4;
    assert_eq!(parse(&n.bytes(&data)).unwrap().dims, [3, 2, 2]);
    n.dims[4] = 2;
    let e = parse_error(&n.bytes(&data));
    assert!(e.contains("only 3-D volumes"), "{e}");
}

#[test]
fn files_read_gzipped_or_not_and_errors_name_the_file() {
    let dir = temp_dir("files");
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.25).collect();
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = Nifti::new([4, 3, 2], 16, 32).bytes(&data);
    let plain = dir.join("a.nii");
    let packed = dir.join("b.nii.gz");
    let misnamed = dir.join("c.nii");
    std::fs::write(&plain, &bytes).unwrap();
    std::fs::write(&packed, gzip(&bytes)).unwrap();
    std::fs::write(&misnamed, gzip(&bytes)).unwrap();
    for p in [&plain, &packed, &misnamed] {
        let v = nifti::read(p).unwrap();
        assert_eq!(v.dims, [4, 3, 2]);
        assert_eq!(v.data, values, "{}", p.display());
    }
    // A cut gzip stream, a gzip stream with extra data, a missing file: each names the file.
    let gz = gzip(&bytes);
    let cut = dir.join("cut.nii.gz");
    std::fs::write(&cut, &gz[..gz.len() - 30]).unwrap();
    let e = nifti::read(&cut).unwrap_err().to_string();
    assert!(e.contains("cut.nii.gz") && e.contains("truncated"), "{e}");
    let mut long = bytes.clone();
    long.extend_from_slice(&[0; 8]);
    let extra = dir.join("extra.nii.gz");
    std::fs::write(&extra, gzip(&long)).unwrap();
    let e = nifti::read(&extra).unwrap_err().to_string();
    assert!(e.contains("extra.nii.gz") && e.contains("bytes after"), "{e}");
    let e = nifti::read(&dir.join("absent.nii")).unwrap_err().to_string();
    assert!(e.contains("absent.nii") && e.contains("cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broken_and_forged_headers_give_errors_that_name_the_problem() {
    let data = vec![7u8; 12];
    let good = Nifti::new([3, 2, 2], 2, 8);
    assert!(parse(&good.bytes(&data)).is_ok());

    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.sizeof_hdr = 347;
    let e = parse_error(&n.bytes(&data));
    assert!(e.contains("sizeof_hdr") && e.contains("348"), "{e}");
    n.sizeof_hdr = 540;
    assert!(parse_error(&n.bytes(&data)).contains("NIfTI-2"));

    let e = parse_error(&good.bytes(&data)[..200]);
    assert!(e.contains("too short"), "{e}");
    let e = parse_error(&good.bytes(&data[..11]));
    assert!(e.contains("truncated"), "{e}");

    // Forged dims: 32767^3 voxels of float64 (2.8e14 bytes) in a 352-byte file.
    let mut n = Nifti::new([32767, 32767, 32767], 64, 64);
    let e = parse_error(&n.bytes(&data));
    assert!(
        e.contains("truncated") && e.contains("32767 x 32767 x 32767"),
        "{e}"
    );
    n.dims[1] = -5;
    let e = parse_error(&n.bytes(&data));
    assert!(e.contains("at least 1"), "{e}");
    // The same forged header gzipped: refused before decompressing or allocating.
    let dir = temp_dir("forged");
    let p = dir.join("forged.nii.gz");
    std::fs::write(&p, gzip(&Nifti::new([32767, 32767, 32767], 64, 64).bytes(&data))).unwrap();
    let e = nifti::read(&p).unwrap_err().to_string();
    assert!(e.contains("more than the file's"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);

    let e = parse_error(&Nifti::new([3, 2, 2], 32, 64).bytes(&data));
    assert!(
        e.contains("unsupported datatype 32") && e.contains("complex64"),
        "{e}"
    );
    let e = parse_error(&Nifti::new([3, 2, 2], 2, 16).bytes(&data));
    assert!(e.contains("bitpix 16"), "{e}");

    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.magic = *b"ni1\0";
    let e = parse_error(&n.bytes(&data));
    assert!(e.contains("ni1") && e.contains(".hdr + .img"), "{e}");
    n.magic = *b"abc\0";
    assert!(parse_error(&n.bytes(&data)).contains("magic"));

    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.vox_offset = 100.0;
    assert!(parse_error(&n.bytes(&data)).contains("vox_offset"));
    n.vox_offset = f32::NAN;
    assert!(parse_error(&n.bytes(&data)).contains("vox_offset"));

    let mut f = [1.0f32; 12];
    f[5] = f32::NAN;
    let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    let e = parse_error(&Nifti::new([3, 2, 2], 16, 32).bytes(&bytes));
    assert!(e.contains("NaN") && e.contains("voxel (2, 1, 0)"), "{e}");
    f[5] = f32::INFINITY;
    let bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(parse_error(&Nifti::new([3, 2, 2], 16, 32).bytes(&bytes)).contains("infinite"));
    // float64 beyond f32's range, and a scaling that overflows.
    let d: Vec<u8> = [1e300f64; 12].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(parse_error(&Nifti::new([3, 2, 2], 64, 64).bytes(&d)).contains("f32 range"));
    let mut n = Nifti::new([3, 2, 2], 2, 8);
    n.slope = 3e38;
    let e = parse_error(&n.bytes(&data));
    assert!(e.contains("after scl_slope"), "{e}");
}

#[test]
fn mutated_files_give_ok_or_an_error_never_a_panic() {
    let data: Vec<u8> = (0..60u8).flat_map(|v| (v as i16 * 3).to_le_bytes()).collect();
    let seed = Nifti::new([5, 4, 3], 4, 16).bytes(&data);
    let seed_gz = gzip(&seed);
    let dir = temp_dir("mutate");
    let mut rng = Rng(0x6d72_6921);
    let interesting: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, 0x5c, 0x01, 0x40];
    for it in 0..4000 {
        let gz = it % 8 == 7;
        let mut b = if gz { seed_gz.clone() } else { seed.clone() };
        for _ in 0..1 + rng.below(4) {
            let hot = if gz { b.len() } else { 352 };
            let span = if rng.below(10) < 8 { hot } else { b.len() };
            let at = rng.below(span).min(b.len() - 1);
            match rng.below(5) {
                0 => b[at] ^= 1 << rng.below(8),
                1 => b[at] = interesting[rng.below(interesting.len())],
                2 => b.truncate(at.max(1)),
                3 if b.len() > at + 2 => {
                    // A forged i16 field (dims, datatype, bitpix).
                    let v: i16 = [0, 1, -1, i16::MAX, i16::MIN, 16, 64][rng.below(7)];
                    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
                _ if b.len() > at + 4 => {
                    let v: f32 = [f32::NAN, f32::INFINITY, 1e30, -1.0, 0.0, 352.5][rng.below(6)];
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                _ => {}
            }
        }
        if gz {
            let p = dir.join("m.nii.gz");
            std::fs::write(&p, &b).unwrap();
            let _ = nifti::read(&p);
        } else if let Ok(v) = parse(&b) {
            assert_eq!(v.data.len(), v.dims.iter().product::<usize>(), "iteration {it}");
            assert!(v.data.iter().all(|x| x.is_finite()), "iteration {it}");
            let _ = axial_slices(&v, 7, 0.0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 24 x 16 x 6 volume: slices 0 and 5 empty, slice 1 a small bright spot, slices 2-4 a wide
/// block (x 4..20, y 2..14) of value 10 + z with one voxel of 50 in slice 3 at (5, 12).
fn phantom() -> Volume {
    let (nx, ny, nz) = (24, 16, 6);
    let mut data = vec![0.0f32; nx * ny * nz];
    data[nx * ny + 8 * nx + 12] = 30.0;
    for z in 2..5 {
        for y in 2..14 {
            for x in 4..20 {
                data[x + nx * (y + ny * z)] = 10.0 + z as f32;
            }
        }
    }
    data[5 + nx * (12 + ny * 3)] = 50.0;
    data[nx * ny * 2] = -3.0; // ringing: clamped to 0
    Volume {
        dims: [nx, ny, nz],
        data,
        pixdim: [1.0; 3],
    }
}

#[test]
fn slices_are_square_in_range_and_filtered_by_tissue() {
    let v = phantom();
    // Tissue is above 5 (10% of 50): slices 2-4 hold 16 * 12 / 384 = 50% tissue, slice 1 one voxel.
    for (frac, want) in [(0.0, 6), (0.001, 4), (0.3, 3), (0.6, 0)] {
        let s = axial_slices(&v, 24, frac);
        assert_eq!(s.len(), want * 24 * 24, "min_tissue_fraction {frac}");
    }
    for size in [8, 24, 40] {
        let s = axial_slices(&v, size, 0.3);
        assert_eq!(s.len(), 3 * size * size, "three [size, size] slices");
        let lo = s.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!((lo, hi), (-2.0, 2.0), "size {size}: the range is exactly [-2, 2]");
    }
    // At the padded side (24) resampling is the identity: the 16 rows sit in rows 4..20, y
    // flipped (row 4 is y = 15), so voxel (5, 12) of slice 3 is at row 4 + 15 - 12 = 7, column 5.
    let s = axial_slices(&v, 24, 0.3);
    let slice3 = &s[24 * 24..2 * 24 * 24];
    assert_eq!(slice3[7 * 24 + 5], 2.0, "the brightest voxel maps to 2");
    assert_eq!(slice3[8 * 24 + 5], 13.0 / 50.0 * 4.0 - 2.0, "x / max * 4 - 2");
    assert_eq!(slice3[0], -2.0, "padding and background map to -2");
    let first = &s[..24 * 24];
    assert_eq!(first[(4 + 15 - 2) * 24 + 4], 12.0 / 50.0 * 4.0 - 2.0);
    assert!(
        s.iter().all(|&x| x >= -2.0),
        "the negative voxel is clamped to -2"
    );
    // Nothing to slice.
    assert!(axial_slices(&v, 0, 0.0).is_empty());
    let zero = Volume {
        dims: [4, 4, 2],
        data: vec![0.0; 32],
        pixdim: [1.0; 3],
    };
    assert!(axial_slices(&zero, 8, 0.0).is_empty());
    assert_eq!(mri::to_bytes(&[-2.0, 0.0, 2.0]), vec![0, 128, 255]);
}

#[test]
fn a_directory_of_volumes_loads_in_name_order_and_errors_name_the_file() {
    let dir = temp_dir("dir");
    let v = phantom();
    let u8_bytes = |v: &Volume| -> Vec<u8> { v.data.iter().map(|&x| x.max(0.0) as u8).collect() };
    let [nx, ny, nz] = v.dims;
    let header = Nifti::new([nx as i16, ny as i16, nz as i16], 2, 8);
    std::fs::write(dir.join("b.nii"), header.bytes(&u8_bytes(&v))).unwrap();
    let mut w = v.clone();
    w.data.iter_mut().for_each(|x| *x = (*x * 2.0).min(255.0));
    std::fs::write(dir.join("a.nii.gz"), gzip(&header.bytes(&u8_bytes(&w)))).unwrap();
    std::fs::write(dir.join("notes.txt"), "not a volume").unwrap();
    let files = nifti_files(&dir).unwrap();
    let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap()).collect();
    assert_eq!(names, ["a.nii.gz", "b.nii"]);
    let all = load_dir(&dir, 16, 0.3).unwrap();
    let a = load_file(&dir.join("a.nii.gz"), 16, 0.3).unwrap();
    let b = load_file(&dir.join("b.nii"), 16, 0.3).unwrap();
    assert_eq!(all, [a.clone(), b].concat(), "a's slices, then b's");
    assert_eq!(all.len(), 6 * 16 * 16);
    // Each volume is scaled by its own max.
    assert_eq!(a.iter().copied().fold(f32::MIN, f32::max), 2.0);

    let e = load_dir(&dir, 16, 0.9).unwrap_err().to_string();
    assert!(e.contains("no axial slice"), "{e}");
    std::fs::write(dir.join("c.nii"), b"garbage").unwrap();
    let e = load_dir(&dir, 16, 0.3).unwrap_err().to_string();
    assert!(e.contains("c.nii") && e.contains("too short"), "{e}");
    let e = load_dir(&dir.join("absent"), 16, 0.3).unwrap_err().to_string();
    assert!(e.contains("scripts/fetch-mri.sh"), "{e}");
    let empty = temp_dir("empty");
    let e = load_dir(&empty, 16, 0.3).unwrap_err().to_string();
    assert!(e.contains("no .nii") && e.contains("scripts/fetch-mri.sh"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

/// The real volume (scripts/fetch-mri.sh); CI fetches it and sets EMPRIOR_REQUIRE_DATA=1 so that
/// its absence fails there instead of skipping.
fn ch2_or_skip(test: &str) -> Option<PathBuf> {
    let path = mri::default_dir().join(mri::DEFAULT_FILE);
    let what = path.display().to_string();
    common::data_or_skip(test, path.is_file(), &what, "scripts/fetch-mri.sh").then_some(path)
}

#[test]
fn the_real_colin27_head_gives_axial_slices_at_64_and_320() {
    let Some(path) = ch2_or_skip("the_real_colin27_head_gives_axial_slices_at_64_and_320") else {
        return;
    };
    let vol = nifti::read(&path).unwrap();
    assert_eq!(vol.dims, [181, 217, 181]);
    assert_eq!(vol.pixdim, [1.0, 1.0, 1.0]);
    assert!(
        vol.data
            .iter()
            .all(|&v| v == v.round() && (0.0..=255.0).contains(&v)),
        "uint8"
    );
    let max = vol.max();
    let mean = vol.data.iter().map(|&v| v as f64).sum::<f64>() / vol.data.len() as f64;
    println!("ch2.nii.gz: max {max}, mean {mean:.1}");
    assert!(
        max > 200.0 && (10.0..80.0).contains(&mean),
        "a T1 head: max {max}, mean {mean}"
    );

    // The default directory holds ch2.nii.gz alone (the extras are in extra/).
    let s64 = load_dir(&mri::default_dir(), 64, mri::MIN_TISSUE_FRACTION).unwrap();
    let n = s64.len() / (64 * 64);
    let s320 = axial_slices(&vol, 320, mri::MIN_TISSUE_FRACTION);
    assert_eq!(s320.len(), n * 320 * 320, "the same slices at both sizes");
    println!("ch2.nii.gz: {n} of 181 axial slices hold tissue");
    assert!((100..=181).contains(&n), "{n} slices");
    for s in [&s64, &s320] {
        let lo = s.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!((lo, hi), (-2.0, 2.0));
    }
    // A middle slice: head in the centre, background in the corners.
    let mid = &s320[(n / 2) * 320 * 320..(n / 2 + 1) * 320 * 320];
    assert_eq!(mid[0], -2.0);
    assert!(mid[160 * 320 + 160] > -1.5, "tissue at the centre");

    // 16 slices spread over the kept ones, at 64 x 64 and (the middle 4) at 320 x 320.
    let picks: Vec<usize> = (0..16).map(|i| i * (n - 1) / 15).collect();
    let bytes: Vec<u8> = picks
        .iter()
        .flat_map(|&i| mri::to_bytes(&s64[i * 64 * 64..(i + 1) * 64 * 64]))
        .collect();
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let out = target.join("mri-slices.png");
    emprior::io::plot::image_grid(
        &out,
        &format!("ch2.nii.gz: 16 of {n} axial slices, 64x64"),
        &bytes,
        (64, 64, 1),
        8,
        3,
        &[],
        &[],
    )
    .unwrap();
    let big: Vec<u8> = picks[6..10]
        .iter()
        .flat_map(|&i| mri::to_bytes(&s320[i * 320 * 320..(i + 1) * 320 * 320]))
        .collect();
    let out320 = target.join("mri-slices-320.png");
    emprior::io::plot::image_grid(
        &out320,
        "ch2.nii.gz: 4 axial slices, 320x320",
        &big,
        (320, 320, 1),
        4,
        1,
        &[],
        &[],
    )
    .unwrap();
    println!("wrote {} and {}", out.display(), out320.display());

    // The extra volumes, when fetched: real files in other types and sizes.
    let extra = mri::default_dir().join("extra");
    for (name, dims) in [
        ("ch2bet.nii.gz", [181, 217, 181]),
        ("ch2better.nii.gz", [301, 370, 316]),
        ("inia19-t1-brain.nii.gz", [168, 206, 128]),
    ] {
        let p = extra.join(name);
        if p.is_file() {
            let v = nifti::read(&p).unwrap();
            assert_eq!(v.dims, dims, "{name}");
            let s = axial_slices(&v, 64, mri::MIN_TISSUE_FRACTION);
            println!("{name}: {:?}, {} slices at 64x64", v.dims, s.len() / 4096);
            assert!(!s.is_empty(), "{name}");
        }
    }
}
