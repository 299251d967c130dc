//! Fashion-MNIST data layer: the real 16-image fixture (the first 16 test images, as a gzip IDX
//! file), the full dataset when scripts/fetch-fashion-mnist.sh has fetched it (the test says
//! "skipped" when it has not), and the errors for broken files, which must name the file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use emprior::data::fashion_mnist::{default_dir, read_idx_images, read_split, CHANNELS, IMAGE, PIXELS, SIDE};
use flate2::write::GzEncoder;
use flate2::Compression;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fashion-mnist/t10k-images-16-idx3-ubyte.gz")
}

/// A fresh, empty directory under the system temp dir, unique to this process and call.
fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "emprior-fashion-mnist-{name}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_header(magic: u32, dims: &[u32]) -> Vec<u8> {
    let mut h = magic.to_be_bytes().to_vec();
    for d in dims {
        h.extend(d.to_be_bytes());
    }
    h
}

/// The error `read_idx_images` gives for `path`, checked to name the file and to mention `what`.
fn expect_error(path: &Path, what: &str) -> String {
    let msg = read_idx_images(path)
        .expect_err("a broken file must be an error")
        .to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    assert!(msg.contains(what), "the error says '{what}': {msg}");
    // Shown with --nocapture only.
    eprintln!("expected error: {msg}");
    msg
}

fn skip_unless_fetched(what: &str) -> bool {
    let fetched = default_dir().join("t10k-images-idx3-ubyte.gz").is_file()
        && default_dir().join("train-images-idx3-ubyte.gz").is_file();
    if !fetched {
        let _ = writeln!(
            std::io::stderr(),
            "{what} skipped: run scripts/fetch-fashion-mnist.sh (no data in {})",
            default_dir().display()
        );
    }
    fetched
}

#[test]
fn the_real_fixture_reads_as_16_grayscale_images() {
    assert_eq!((SIDE, CHANNELS, PIXELS, IMAGE), (28, 1, 784, 784));
    let bytes = read_idx_images(&fixture_path()).unwrap();
    assert_eq!(bytes.len(), 16 * IMAGE, "[16, 28, 28] bytes");
    // Pinned from the real data: the pixel sum of the first 16 test images and of the first one.
    let sum = |b: &[u8]| b.iter().map(|&p| p as u64).sum::<u64>();
    assert_eq!(sum(&bytes), 757_029);
    assert_eq!(sum(&bytes[..IMAGE]), 33_456);
    // Fashion-MNIST items sit on a black background: the image corners are 0.
    for img in bytes.chunks_exact(IMAGE) {
        assert_eq!(img[0], 0, "top-left corner is background");
    }

    // The full test split, when fetched: the fixture is its first 16 images, bit for bit.
    if !skip_unless_fetched("full Fashion-MNIST test-split check") {
        return;
    }
    let test = read_split(&default_dir(), false).unwrap();
    assert_eq!(test.len(), 10_000 * IMAGE);
    assert!(
        test[..16 * IMAGE] == bytes[..],
        "fixture = the first 16 test images"
    );
}

#[test]
fn the_train_split_has_the_known_fashion_mnist_mean() {
    if !skip_unless_fetched("full Fashion-MNIST train-split check") {
        return;
    }
    let train = read_split(&default_dir(), true).unwrap();
    assert_eq!(train.len(), 60_000 * IMAGE, "60,000 images of 28 x 28");
    let mean = train.iter().map(|&p| p as u64).sum::<u64>() as f64 / train.len() as f64;
    let _ = writeln!(
        std::io::stderr(),
        "Fashion-MNIST train mean pixel: {mean:.4} of 255 = {:.4}",
        mean / 255.0
    );
    assert!(
        (mean / 255.0 - 0.2860).abs() < 5e-4,
        "the known Fashion-MNIST mean 0.2860 (72.94 of 255), got {:.4}",
        mean / 255.0
    );
    assert!((mean - 72.94).abs() < 5e-3, "72.94 of 255, got {mean:.4}");
}

#[test]
fn broken_files_give_errors_that_name_the_file() {
    let dir = temp_dir("broken");
    let real = std::fs::read(fixture_path()).unwrap();
    let mut raw = idx_header(0x803, &[16, 28, 28]);
    raw.extend(read_idx_images(&fixture_path()).unwrap());

    // Missing: the message points at the fetch script.
    let missing = dir.join("no-such-images-idx3-ubyte.gz");
    expect_error(&missing, "scripts/fetch-fashion-mnist.sh");
    let msg = read_split(&dir, false).unwrap_err().to_string();
    assert!(
        msg.contains("t10k-images-idx3-ubyte.gz") && msg.contains("fetch-fashion-mnist.sh"),
        "{msg}"
    );

    // Truncated, two ways: the gzip stream cut in the middle, and a whole gzip stream whose IDX
    // data stop before the header's 16 images.
    let cut = dir.join("cut-gzip.gz");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    expect_error(&cut, "truncated");
    let short = dir.join("short-data.gz");
    std::fs::write(&short, gzip(&raw[..raw.len() - 100])).unwrap();
    expect_error(&short, "truncated");
    let header_only = dir.join("header-only.gz");
    std::fs::write(&header_only, gzip(&raw[..10])).unwrap();
    expect_error(&header_only, "truncated");

    // Bad magic: a labels file (0x801) and an int32 array (0x0c03).
    for (name, magic) in [("labels.gz", 0x801u32), ("int32.gz", 0xc03)] {
        let mut bad = idx_header(magic, &[16, 28, 28]);
        bad.extend(&raw[16..]);
        let path = dir.join(name);
        std::fs::write(&path, gzip(&bad)).unwrap();
        expect_error(&path, "magic");
    }

    // Wrong dims: 32 x 32 images.
    let mut wide = idx_header(0x803, &[1, 32, 32]);
    wide.extend(vec![0u8; 32 * 32]);
    let path = dir.join("wide.gz");
    std::fs::write(&path, gzip(&wide)).unwrap();
    expect_error(&path, "dims");

    // Not gzip at all.
    let plain = dir.join("plain.gz");
    std::fs::write(&plain, &raw).unwrap();
    expect_error(&plain, "header");

    // And the well-formed copy of the fixture reads.
    let good = dir.join("good.gz");
    std::fs::write(&good, gzip(&raw)).unwrap();
    assert_eq!(read_idx_images(&good).unwrap(), raw[16..]);

    std::fs::remove_dir_all(&dir).unwrap();
}
