//! The accelerated-MRI EM (method.md §7.3, issue 15) end to end on the real Colin27 head
//! (scripts/fetch-mri.sh; skipped without it, a failure under EMPRIOR_REQUIRE_DATA=1 as in CI):
//! the held-out posterior means' PSNR rises over the laps and beats the zero-filled inverse Aᵀy;
//! every picture and metric of a lap is written, and a resumed run continues where it stopped;
//! bad MRI configurations stop before any work with a message that names the cause.

mod common;

use std::path::PathBuf;

use common::{data_or_skip, run_dir};
use emprior::data::mri;
use emprior::em::{run_images, Config, ImageLapMetrics};
use emprior::io::read_npy;
use emprior::Device;

fn dir(name: &str) -> PathBuf {
    run_dir("mri", name)
}

fn ch2_or_skip(test: &str) -> bool {
    let path = mri::default_dir().join(mri::DEFAULT_FILE);
    let what = path.display().to_string();
    data_or_skip(test, path.is_file(), &what, "scripts/fetch-mri.sh")
}

/// The quick preset with `changes` applied.
fn quick(changes: &[&str]) -> Config {
    let mut cfg = Config::preset("mri", "quick").unwrap();
    for c in changes {
        cfg.set(c).unwrap();
    }
    cfg
}

/// A smaller run than the quick preset: 32×32 slices (R = 6: about 5 of 32 k-space columns),
/// 96 observed and 8 held out, the quick preset's U-Net with 100 epochs per lap, 3 laps (about
/// 2 minutes on 2 cores).
const SMALL: &[&str] = &[
    "slice_size=32",
    "observations=96",
    "init_observations=96",
    "heldout=8",
    "heldout_samples=4",
    "init_rounds=3",
    "init_steps=16",
    "init_rank=16",
    "estep_steps=16",
    "prior_steps=8",
    "estep_batch=48",
    "mstep_epochs=100",
    "grid=9",
    "laps=3",
];

fn summaries(laps: &[ImageLapMetrics]) -> String {
    laps.iter().map(|m| m.summary()).collect::<Vec<_>>().join("\n")
}

#[test]
fn em_from_undersampled_k_space_beats_the_zero_filled_inverse_and_improves_over_laps() {
    if !ch2_or_skip("em_from_undersampled_k_space_beats_the_zero_filled_inverse_and_improves_over_laps") {
        return;
    }
    let run = dir("small");
    let laps = run_images(&quick(SMALL), &run, &Device::Cpu, false).unwrap();
    let table = summaries(&laps);
    println!("{table}");
    assert_eq!(laps.len(), 4, "{table}");
    let (gauss, first, last) = (&laps[0], &laps[1], &laps[3]);
    let zero_filled = gauss.zero_filled_psnr;
    assert!(zero_filled.is_finite() && zero_filled > 10.0, "{table}");
    assert!(
        laps.iter().all(|m| m.zero_filled_psnr == zero_filled),
        "the baseline is the same held-out set every lap\n{table}"
    );
    assert!(
        last.psnr > first.psnr && last.psnr > gauss.psnr,
        "held-out PSNR must rise over the laps\n{table}"
    );
    assert!(
        laps.iter().all(|m| m.outside_bound == 0),
        "no posterior sample diverged (CG's curvature guard)\n{table}"
    );
    assert!(
        last.psnr > zero_filled + 1.0,
        "posterior means must beat the zero-filled inverse\n{table}"
    );
    assert!(last.ssim > gauss.zero_filled_ssim, "{table}");
    assert!(last.sample_psnr > first.sample_psnr, "{table}");

    // What a person looks at, and what a resume reads.
    for file in [
        "config.toml",
        "metrics.jsonl",
        "report.html",
        "psnr.png",
        "masks.npy",
        "heldout-masks.npy",
        "observations/kspace.npy",
        "observations/columns.npy",
        "lap-000/masks.png",
        "lap-003/heldout.png",
        "lap-003/observations.png",
        "lap-003/posterior.png",
        "lap-003/prior.png",
        "lap-003/checkpoint.safetensors",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    // Two posterior samples per observation, all kept for the M-step.
    let samples = read_npy(&run.join("lap-003/samples.npy")).unwrap();
    assert_eq!(samples.shape, [2 * 96, 32 * 32]);
    let kspace = read_npy(&run.join("observations/kspace.npy")).unwrap();
    assert_eq!(kspace.shape, [96, 32, 32, 2]);
    let columns = read_npy(&run.join("observations/columns.npy")).unwrap();
    assert_eq!(columns.shape, [96, 32]);
    // The centre band (round(32 · 0.0625) = 2 columns at 15, 16) is kept in every mask.
    for mask in columns.data.chunks_exact(32) {
        assert!(mask[15] == 1.0 && mask[16] == 1.0, "{mask:?}");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.lines().all(|l| l.contains("\"zero_filled_psnr\"")),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn a_resumed_mri_run_continues_with_its_saved_masks_and_samples() {
    if !ch2_or_skip("a_resumed_mri_run_continues_with_its_saved_masks_and_samples") {
        return;
    }
    let tiny: Vec<&str> = SMALL
        .iter()
        .copied()
        .chain([
            "observations=24",
            "init_observations=24",
            "heldout=4",
            "init_rounds=1",
            "init_steps=4",
            "estep_steps=4",
            "prior_steps=4",
            "mstep_epochs=2",
            "mstep_batch=16",
            "laps=1",
        ])
        .collect();
    let run = dir("resume");
    let first = run_images(&quick(&tiny), &run, &Device::Cpu, false).unwrap();
    assert_eq!(first.len(), 2);
    let masks = std::fs::read(run.join("masks.npy")).unwrap();
    // One more lap on resume (laps may grow); the saved masks and lap-1 samples are read back.
    let mut more = tiny.clone();
    more.push("laps=2");
    let all = run_images(&quick(&more), &run, &Device::Cpu, true).unwrap();
    assert_eq!(all.len(), 3, "{}", summaries(&all));
    for (kept, was) in all.iter().zip(&first) {
        assert_eq!(kept.lap, was.lap);
        assert!(
            (kept.psnr - was.psnr).abs() < 1e-6,
            "the finished laps are kept as they were"
        );
    }
    assert_eq!(std::fs::read(run.join("masks.npy")).unwrap(), masks);
    assert!(run.join("lap-002/DONE").is_file());
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn bad_mri_configurations_are_named_before_any_work() {
    let fails = |changes: &[&str]| -> String {
        let run = dir(&format!("bad{}", changes.len()));
        let e = run_images(&quick(changes), &run, &Device::Cpu, false)
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_dir_all(&run);
        e
    };
    let e = fails(&["data_dir=/nonexistent/mri"]);
    assert!(
        e.contains("/nonexistent/mri") && e.contains("scripts/fetch-mri.sh"),
        "{e}"
    );
    let e = fails(&["acceleration=0.5"]);
    assert!(e.contains("'acceleration' = 0.5 must be a number >= 1"), "{e}");
    let e = fails(&["center_fraction=1.5"]);
    assert!(e.contains("'center_fraction' = 1.5 must be in [0, 1]"), "{e}");
    let e = fails(&["slice_size=30"]);
    assert!(e.contains("resolution 30x30 must be divisible by 8"), "{e}");
    assert!(Config::preset("mri", "huge")
        .unwrap_err()
        .to_string()
        .contains("quick, smoke or paper"));
    if ch2_or_skip("bad_mri_configurations_are_named_before_any_work") {
        let e = fails(&["observations=150", "heldout=16"]);
        assert!(
            e.contains("give 154 axial slices") && e.contains("observations + heldout = 166"),
            "{e}"
        );
    }
}
