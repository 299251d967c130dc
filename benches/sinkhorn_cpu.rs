//! Entropic OT (POT's log-domain Sinkhorn, method.md §9.1 settings) on the manifold experiment's
//! two ground-truth sets (seed 0, latent streams 1 and 2), the reference OT(u1, u2) every lap of
//! `emprior em` computes: one timed solve per size, wall seconds, value, iterations.
//!
//! `cargo bench --bench sinkhorn_cpu -- [SIZES...] [--threads T] [--dump DIR]`: sizes default to
//! 1024 4096; `--dump DIR` writes u1.npy and u2.npy at the largest size for
//! benches/baselines/sinkhorn_fixtures.py (POT's values for the same points) and times nothing.

use std::path::PathBuf;
use std::time::Instant;

use emprior::data::manifold::{Manifold, DIM};
use emprior::metrics::Sinkhorn;

fn main() {
    let mut sizes = Vec::new();
    let (mut threads, mut dump) = (0usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => threads = args.next().and_then(|t| t.parse().ok()).expect("--threads N"),
            "--dump" => dump = Some(PathBuf::from(args.next().expect("--dump DIR"))),
            // cargo bench passes --bench; criterion-style filters are not used here.
            "--bench" => {}
            // What criterion benches answer to --list (scripts/device-check.sh asks every bench).
            "--list" => {
                println!("sinkhorn_cpu: bench");
                return;
            }
            s => sizes.push(s.parse::<usize>().expect("sizes are point counts")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1024, 4096];
    }
    let manifold = Manifold::new(0);
    if let Some(dir) = dump {
        let n = *sizes.iter().max().unwrap();
        for (stream, name) in [(1, "u1.npy"), (2, "u2.npy")] {
            let x = manifold.sample(0, stream, n);
            emprior::io::write_npy_f64(&dir.join(name), &[n, DIM], &x).expect("write the points");
        }
        println!("wrote u1.npy, u2.npy ({n} x {DIM}) to {}", dir.display());
        return;
    }
    for n in sizes {
        let (u1, u2) = (manifold.sample(0, 1, n), manifold.sample(0, 2, n));
        let start = Instant::now();
        let r = Sinkhorn::PAPER.with_threads(threads).solve(&u1, &u2, DIM);
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "sinkhorn n={n} threads={threads} seconds={seconds:.3} value={:.9e} iterations={} converged={} marginal_error={:.4e}",
            r.value, r.iterations, r.converged, r.marginal_error
        );
    }
}
