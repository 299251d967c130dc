//! EM on the user's own masked images through the command line: observed images and masks as
//! .npy files (grayscale with per-pixel masks and the truth; RGB with per-channel masks and no
//! truth), the run's saved copies, and the input errors.

use std::path::Path;

mod common;

use common::{emprior, run_dir};

use emprior::io::{read_npy, write_npy_f32};
use emprior::ops::Philox;

/// n smooth images h x w x c (sums of random sinusoids, in [-1.5, 1.5]) and Bernoulli masks
/// keeping half the values, per pixel or per channel; y = mask * (x + 0.01 z).
fn images(n: usize, h: usize, w: usize, c: usize, per_pixel: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut p = vec![0.0f32; n * 4];
    Philox::new(3, 1).fill_uniform(0, &mut p);
    let mut x = Vec::with_capacity(n * h * w * c);
    for i in 0..n {
        let (fx, fy, ph, tint) = (
            1.0 + 3.0 * p[4 * i],
            1.0 + 3.0 * p[4 * i + 1],
            6.0 * p[4 * i + 2],
            p[4 * i + 3],
        );
        for r in 0..h {
            for col in 0..w {
                let v = (fx * r as f32 / h as f32 * std::f32::consts::TAU + ph).sin()
                    * (fy * col as f32 / w as f32 * std::f32::consts::TAU).cos();
                for k in 0..c {
                    x.push(1.5 * v * (1.0 - 0.3 * k as f32 * tint));
                }
            }
        }
    }
    let width = if per_pixel { h * w } else { h * w * c };
    let mut u = vec![0.0f32; n * width];
    Philox::new(3, 2).fill_uniform(0, &mut u);
    let masks: Vec<f32> = u.iter().map(|&v| if v < 0.5 { 1.0 } else { 0.0 }).collect();
    let mut z = vec![0.0f32; x.len()];
    Philox::new(3, 3).fill_normal(0, &mut z);
    let channels = x.len() / masks.len();
    let y = x
        .iter()
        .zip(&z)
        .enumerate()
        .map(|(i, (&v, &e))| masks[i / channels] * (v + 0.01 * e))
        .collect();
    (x, masks, y)
}

const SMALL: &[&str] = &[
    "laps=1",
    "init_rounds=2",
    "init_steps=8",
    "init_rank=8",
    "estep_steps=8",
    "prior_steps=8",
    "mstep_epochs=2",
    "mstep_batch=8",
    "grid=16",
    "heldout=4",
    "heldout_samples=1",
    "sigma_y=0.01",
];

type Gray = (usize, usize, usize, Vec<f32>, Vec<f32>, Vec<f32>);

/// 32 grayscale 16 x 16 images with per-pixel masks: y.npy, m.npy and x.npy (the truth) in a
/// fresh folder, and (n, h, w, x, masks, y).
fn gray_data(name: &str) -> (std::path::PathBuf, Gray) {
    let data = run_dir("user-images", name);
    std::fs::create_dir_all(&data).unwrap();
    let (n, h, w) = (32, 16, 16);
    let (x, masks, y) = images(n, h, w, 1, true);
    write_npy_f32(&data.join("y.npy"), &[n, h, w], &y).unwrap();
    write_npy_f32(&data.join("m.npy"), &[n, h, w], &masks).unwrap();
    write_npy_f32(&data.join("x.npy"), &[n, h, w, 1], &x).unwrap();
    (data, (n, h, w, x, masks, y))
}

fn em_images(out: &Path, files: &[(&str, &Path)]) -> (bool, String) {
    em_images_with(out, files, &[])
}

fn em_images_with(out: &Path, files: &[(&str, &Path)], extra: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = ["em", "images", "--device", "cpu", "--out", out.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (flag, path) in files {
        args.push(format!("--{flag}"));
        args.push(path.to_str().unwrap().to_string());
    }
    for s in SMALL.iter().chain(extra) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    emprior(&args)
}

/// The whole lap under the bf16 policy on the CPU (its twins: bf16 operands, activations kept
/// in bf16): the Gaussian start, the M-step, MMPS posterior sampling, held-out evaluation and
/// the checkpoint all run, and the result is as good as f32's on this small problem.
#[test]
fn a_lap_runs_under_the_bf16_policy() {
    let (data, _) = gray_data("bf16-data");
    let files = [
        ("obs", data.join("y.npy")),
        ("mask", data.join("m.npy")),
        ("truth", data.join("x.npy")),
    ];
    let files: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
    let mut psnr = Vec::new();
    for precision in ["f32", "bf16"] {
        let out = run_dir("user-images", &format!("{precision}-run"));
        let set = format!("precision={precision}");
        let (ok, log) = em_images_with(&out, &files, &[set.as_str()]);
        assert!(ok, "{log}");
        assert!(log.contains(&format!("precision: {precision}")), "{log}");
        let samples = read_npy(&out.join("lap-001/samples.npy")).unwrap().to_f32();
        assert!(samples.iter().all(|v| v.is_finite()));
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        psnr.push(emprior::em::json_field(metrics.lines().last().unwrap(), "psnr").unwrap());
    }
    println!("PSNR f32 {} dB, bf16 {} dB", psnr[0], psnr[1]);
    // Close to f32 (15.3045 vs 15.3044 dB measured), and not the f32 run itself.
    assert!(
        psnr[1].is_finite() && psnr[1] > 5.0 && (psnr[1] - psnr[0]).abs() < 1.0,
        "{psnr:?}"
    );
    assert_ne!(psnr[0], psnr[1], "the bf16 run computed in f32");
}

#[test]
fn grayscale_images_with_pixel_masks_and_truth() {
    let (data, (n, h, w, _, masks, y)) = gray_data("gray-data");
    let out = run_dir("user-images", "gray-run");
    let (ok, log) = em_images(
        &out,
        &[
            ("obs", &data.join("y.npy")),
            ("mask", &data.join("m.npy")),
            ("truth", &data.join("x.npy")),
        ],
    );
    assert!(ok, "{log}");
    assert_eq!(
        read_npy(&out.join("lap-001/samples.npy")).unwrap().shape,
        vec![n, h * w]
    );
    assert_eq!(read_npy(&out.join("observations/obs.npy")).unwrap().to_f32(), y);
    assert_eq!(
        read_npy(&out.join("observations/mask.npy")).unwrap().to_f32(),
        masks
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = metrics.lines().last().unwrap();
    let psnr = emprior::em::json_field(last, "psnr").unwrap();
    assert!(
        psnr.is_finite() && psnr > 5.0,
        "PSNR against the given truth: {last}"
    );
    for f in [
        "observations.png",
        "posterior.png",
        "heldout.png",
        "prior.png",
        "checkpoint.safetensors",
    ] {
        assert!(out.join("lap-001").join(f).is_file(), "{f}");
    }
}

#[test]
fn rgb_images_with_channel_masks_and_no_truth() {
    let data = run_dir("user-images", "rgb-data");
    std::fs::create_dir_all(&data).unwrap();
    let (n, h, w, c) = (32, 8, 8, 3);
    let (_, masks, y) = images(n, h, w, c, false);
    write_npy_f32(&data.join("y.npy"), &[n, h, w, c], &y).unwrap();
    write_npy_f32(&data.join("m.npy"), &[n, h, w, c], &masks).unwrap();
    let out = run_dir("user-images", "rgb-run");
    let (ok, log) = em_images(
        &out,
        &[("obs", &data.join("y.npy")), ("mask", &data.join("m.npy"))],
    );
    assert!(ok, "{log}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"psnr\": null"), "no truth, no PSNR: {metrics}");
    assert_eq!(
        read_npy(&out.join("lap-001/samples.npy")).unwrap().shape,
        vec![n, h * w * c]
    );
}

#[test]
fn bad_image_inputs_are_named() {
    let data = run_dir("user-images", "bad");
    std::fs::create_dir_all(&data).unwrap();
    write_npy_f32(&data.join("y.npy"), &[4, 8, 8], &[0.5; 256]).unwrap();
    write_npy_f32(&data.join("m-wrong.npy"), &[4, 8, 7], &[1.0; 224]).unwrap();
    let mut half = vec![1.0f32; 256];
    half[9] = 0.5;
    write_npy_f32(&data.join("m-half.npy"), &[4, 8, 8], &half).unwrap();
    write_npy_f32(&data.join("odd.npy"), &[4, 9, 9], &[0.5; 324]).unwrap();
    write_npy_f32(&data.join("m-odd.npy"), &[4, 9, 9], &[1.0; 324]).unwrap();
    let cases: Vec<(Vec<(&str, std::path::PathBuf)>, &str)> = vec![
        (vec![("mask", data.join("m-half.npy"))], "needs obs"),
        (vec![("obs", data.join("y.npy"))], "needs mask"),
        (
            vec![("obs", data.join("y.npy")), ("mask", data.join("m-wrong.npy"))],
            "mask: expected [4, 8, 8] or [4, 8, 8, 1]",
        ),
        (
            vec![("obs", data.join("y.npy")), ("mask", data.join("m-half.npy"))],
            "mask: value 9 is 0.5",
        ),
        (
            vec![("obs", data.join("odd.npy")), ("mask", data.join("m-odd.npy"))],
            "resolution 9x9 must be divisible by 2",
        ),
    ];
    for (i, (files, want)) in cases.into_iter().enumerate() {
        let files: Vec<(&str, &Path)> = files.iter().map(|(f, p)| (*f, p.as_path())).collect();
        let (ok, log) = em_images(&data.join(format!("run{i}")), &files);
        assert!(!ok && log.contains(want), "wanted '{want}': {log}");
    }
}

/// A folder of grayscale PNGs with a folder of mask PNGs (0 = missing, 255 = observed): read in
/// name order into the model's range, copied into the run as .npy, a mask PNG of other values
/// refused by name.
#[test]
fn png_folders_of_images_and_masks() {
    use emprior::data::cifar10::{to_bytes, to_model};
    use emprior::io::plot::save_image;
    let data = run_dir("user-images", "png-data");
    let (imgs, msks) = (data.join("images"), data.join("masks"));
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::create_dir_all(&msks).unwrap();
    let (n, h, w) = (16, 16, 16);
    let (x, masks, _) = images(n, h, w, 1, true);
    let bytes = to_bytes(&x);
    for i in 0..n {
        let per = h * w;
        let observed: Vec<u8> = (0..per)
            .map(|p| {
                if masks[i * per + p] == 1.0 {
                    bytes[i * per + p]
                } else {
                    0
                }
            })
            .collect();
        save_image(&imgs.join(format!("{i:03}.png")), &observed, h, w, 1).unwrap();
        let m: Vec<u8> = masks[i * per..(i + 1) * per]
            .iter()
            .map(|&v| if v == 1.0 { 255 } else { 0 })
            .collect();
        save_image(&msks.join(format!("{i:03}.png")), &m, h, w, 1).unwrap();
    }
    let out = run_dir("user-images", "png-run");
    let (ok, log) = em_images(&out, &[("obs", &imgs), ("mask", &msks)]);
    assert!(ok, "{log}");
    let saved = read_npy(&out.join("observations/obs.npy")).unwrap();
    assert_eq!(saved.shape, vec![n, h, w, 1]);
    // The observed pixels arrive as the PNGs' bytes in the model's range.
    let i = masks.iter().position(|&v| v == 1.0).unwrap();
    assert_eq!(saved.data[i] as f32, to_model(&[bytes[i]])[0]);
    assert_eq!(
        read_npy(&out.join("observations/mask.npy")).unwrap().shape,
        vec![n, h, w]
    );

    save_image(&msks.join("000.png"), &vec![128u8; h * w], h, w, 1).unwrap();
    let (ok, log) = em_images(
        &run_dir("user-images", "png-bad"),
        &[("obs", &imgs), ("mask", &msks)],
    );
    assert!(!ok && log.contains("mask value 0 is 128"), "{log}");
}
