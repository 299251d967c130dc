//! .npy round trips, a file written by NumPy's own header layout, and the errors.

use std::path::PathBuf;

use emprior::io::{read_npy, write_npy_f32, write_npy_f64};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("emprior-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn round_trips_f32_and_f64() {
    let p = tmp("a.npy");
    let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    write_npy_f32(&p, &[2, 3, 4], &data).unwrap();
    let a = read_npy(&p).unwrap();
    assert_eq!((a.shape.clone(), a.dtype), (vec![2, 3, 4], "f4"));
    assert_eq!(a.to_f32(), data);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(
        (bytes.len() - 24 * 4) % 64,
        0,
        "data starts on a 64-byte boundary"
    );

    let p = tmp("b.npy");
    let data = vec![1e-300, -2.5, std::f64::consts::PI];
    write_npy_f64(&p, &[3], &data).unwrap();
    let b = read_npy(&p).unwrap();
    assert_eq!((b.shape.clone(), b.dtype, b.data.clone()), (vec![3], "f8", data));
    write_npy_f64(&p, &[], &[7.0]).unwrap();
    assert_eq!(read_npy(&p).unwrap().shape, Vec::<usize>::new());
}

fn raw(descr: &str, fortran: &str, shape: &str, body: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.bytes());
    out.extend(body);
    out
}

#[test]
fn errors_name_the_file_and_the_expectation() {
    let p = tmp("int.npy");
    std::fs::write(&p, raw("<i8", "False", "(2,)", &[0; 16])).unwrap();
    let e = read_npy(&p).unwrap_err().to_string();
    assert!(
        e.contains("int.npy") && e.contains("<i8") && e.contains("float32"),
        "{e}"
    );

    let p = tmp("fortran.npy");
    std::fs::write(&p, raw("<f4", "True", "(2, 2)", &[0; 16])).unwrap();
    let e = read_npy(&p).unwrap_err().to_string();
    assert!(e.contains("fortran.npy") && e.contains("Fortran"), "{e}");

    let p = tmp("big.npy");
    std::fs::write(&p, raw(">f8", "False", "(1,)", &[0; 8])).unwrap();
    assert!(read_npy(&p).unwrap_err().to_string().contains(">f8"));

    let p = tmp("short.npy");
    std::fs::write(&p, raw("<f4", "False", "(3,)", &[0; 8])).unwrap();
    let e = read_npy(&p).unwrap_err().to_string();
    assert!(e.contains("8 data bytes") && e.contains("[3]"), "{e}");

    let p = tmp("notnpy.npy");
    std::fs::write(&p, b"hello").unwrap();
    assert!(read_npy(&p).unwrap_err().to_string().contains("not a .npy"));

    let a = {
        let p = tmp("rank.npy");
        write_npy_f32(&p, &[2, 2], &[0.0; 4]).unwrap();
        (read_npy(&p).unwrap(), p)
    };
    let e = a.0.expect_rank(&a.1, &[3], "[n, m, d]").unwrap_err().to_string();
    assert!(
        e.contains("rank.npy") && e.contains("[n, m, d]") && e.contains("[2, 2]"),
        "{e}"
    );
    assert!(read_npy(&tmp("missing.npy"))
        .unwrap_err()
        .to_string()
        .contains("missing.npy"));
}

#[test]
fn reads_files_written_by_numpy() {
    // np.save of np.arange(6, dtype=float64).reshape(2, 3) / 7 and np.arange(5, dtype=float32).
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let a = read_npy(&dir.join("numpy_f64_2x3.npy")).unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.data, (0..6).map(|i| i as f64 / 7.0).collect::<Vec<_>>());
    let b = read_npy(&dir.join("numpy_f32_5.npy")).unwrap();
    assert_eq!(
        (b.shape.clone(), b.dtype, b.to_f32()),
        (vec![5], "f4", vec![0.0, 1.0, 2.0, 3.0, 4.0])
    );
}

/// Forged headers never reach a panic or a wrapped size: each is refused with its reason.
#[test]
fn forged_headers_are_refused_without_a_panic() {
    let cases: [(&str, Vec<u8>, &str); 6] = [
        // 2^62 * 2^62 elements wrap to 0 in usize: an empty body must not pass for it.
        (
            "overflow.npy",
            raw("<f4", "False", "(4611686018427387904, 4611686018427387904)", &[]),
            "too large to address",
        ),
        (
            "close-first.npy",
            raw("<f4", "False", ")", &[]),
            "malformed shape",
        ),
        (
            "no-paren.npy",
            raw("<f4", "False", "é(2,)", &[0; 8]),
            "malformed shape",
        ),
        (
            "negative.npy",
            raw("<f4", "False", "(-2,)", &[0; 8]),
            "malformed shape",
        ),
        (
            "words.npy",
            raw("<f4", "False", "(two,)", &[0; 8]),
            "malformed shape",
        ),
        (
            "no-shape.npy",
            {
                let mut b = raw("<f4", "False", "(2,)", &[0; 8]);
                let at = b.windows(7).position(|w| w == b"'shape'").unwrap();
                b[at + 1] = b'x';
                b
            },
            "lacks 'shape'",
        ),
    ];
    for (name, bytes, want) in cases {
        let p = tmp(name);
        std::fs::write(&p, bytes).unwrap();
        let e = read_npy(&p).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(want), "{name}: {e}");
    }
    // A version-2 header longer than the file.
    let p = tmp("long-header.npy");
    let mut b = b"\x93NUMPY\x02\x00".to_vec();
    b.extend(u32::MAX.to_le_bytes());
    b.extend(b"{'descr'");
    std::fs::write(&p, b).unwrap();
    let e = read_npy(&p).unwrap_err().to_string();
    assert!(e.contains("truncated header"), "{e}");
}
