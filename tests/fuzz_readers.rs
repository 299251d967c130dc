//! A deterministic mutation run over every reader of untrusted bytes (issue 16): valid seed files
//! of each format (.npy, a safetensors checkpoint, a configuration, a PNG) are mutated thousands
//! of times (bit flips, interesting bytes, truncations, insertions, forged length fields, most of
//! them in the header) and each reader must answer Ok or an error, never panic. Bounded in time
//! (a few seconds) so it runs in CI; a panic names the iteration and leaves its input on disk
//! for a regression test.

mod common;

use std::path::{Path, PathBuf};

use common::Rng;
use emprior::data::cifar10::read_images;
use emprior::diffusion::Network;
use emprior::em::Config;
use emprior::io::{load_checkpoint, read_npy, save_checkpoint, write_npy_f32};
use emprior::nn::TimeMlp;
use emprior::{DType, Device};

const ITERATIONS: usize = 20_000;

const INTERESTING: &[u8] = b"\x00\xff\x7f\x80()[]{},:'\"9-.eE \n\\";

/// One to four mutations, 80% of them within the first `hot` bytes (the header).
fn mutate(rng: &mut Rng, seed: &[u8], hot: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len().max(1);
        let at = if rng.below(10) < 8 {
            rng.below(hot.min(len))
        } else {
            rng.below(len)
        };
        let last = b.len().saturating_sub(1);
        match rng.below(7) {
            0 if !b.is_empty() => b[at.min(last)] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at.min(last)] = INTERESTING[rng.below(INTERESTING.len())],
            2 => b.truncate(at),
            3 => {
                let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
                let at = at.min(b.len());
                b.splice(at..at, bytes);
            }
            4 if b.len() >= 8 => {
                // A forged little-endian length or size field.
                let v: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40, rng.next()][rng.below(6)];
                let at = at.min(b.len() - 8);
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            5 if !b.is_empty() => {
                let at = at.min(b.len() - 1);
                let end = (at + 1 + rng.below(16)).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            _ if b.len() > 1 => {
                let at = at.min(b.len() - 1);
                b.remove(at);
            }
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("emprior-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `read` on ITERATIONS mutations of `seed`; a panic fails with the iteration and the path
/// of its input.
fn fuzz(name: &str, seed: &[u8], hot: usize, salt: u64, read: impl Fn(&Path)) {
    let d = dir();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ salt);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for i in 0..ITERATIONS {
        let bytes = mutate(&mut rng, seed, hot);
        let path = d.join(format!("{name}-{i}"));
        std::fs::write(&path, &bytes).unwrap();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(&path))).is_ok();
        if !ok {
            failure = Some((i, path));
            break;
        }
        let _ = std::fs::remove_file(&path);
    }
    std::panic::set_hook(previous);
    if let Some((i, path)) = failure {
        panic!("{name}: iteration {i} panicked; its input is {}", path.display());
    }
}

#[test]
fn npy_reader_never_panics() {
    let p = dir().join("seed.npy");
    write_npy_f32(&p, &[3, 4], &[1.5; 12]).unwrap();
    let seed = std::fs::read(&p).unwrap();
    fuzz("npy", &seed, 128, 1, |path| {
        let _ = read_npy(path);
    });
}

#[test]
fn checkpoint_reader_never_panics() {
    let net = Network::Mlp(TimeMlp::new(2, &[4], 4));
    let params = net.layout().init(1, DType::F32, &Device::Cpu).unwrap();
    let p = dir().join("seed.safetensors");
    save_checkpoint(&p, &net, &params, &Default::default()).unwrap();
    let seed = std::fs::read(&p).unwrap();
    let header = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    fuzz("checkpoint", &seed, header, 2, |path| {
        let _ = load_checkpoint(path, DType::F32);
    });
}

#[test]
fn configuration_parser_never_panics() {
    let seed = Config::preset("cifar10", "quick").unwrap().to_toml().into_bytes();
    let hot = seed.len();
    fuzz("config", &seed, hot, 3, |path| {
        let text = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
        if let Ok(cfg) = Config::parse(&text, "fuzz") {
            let _ = cfg.validate();
        }
    });
}

#[test]
fn png_reader_never_panics() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar10/cifar10_00_3.png");
    let seed = std::fs::read(fixture).unwrap();
    fuzz("png", &seed, 64, 4, |path| {
        let _ = read_images(&[path.to_path_buf()]);
    });
}

/// Found by scripts/fuzz.sh (libFuzzer): a 2.4 KB PNG whose header declares an image of 5.4 GB
/// reached the allocator. It is refused before any allocation, naming the declared size.
#[test]
fn a_png_header_declaring_more_than_its_file_can_hold_is_refused() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-png-forged-size.png");
    let e = read_images(&[fixture]).expect_err("refused").to_string();
    assert!(e.contains("more than the file's 2397 bytes can hold"), "{e}");
}
