//! Both cores for the CPU backend's row-wise loops (LayerNorm, SiLU, bias, elementwise updates):
//! the work is split into chunks of a fixed number of elements, never by the number of threads,
//! and every row is computed by one thread from its own inputs only, so results are the same bits
//! on a pool of any size (`RAYON_NUM_THREADS=1` included). Below one chunk the loop runs inline:
//! a fork costs a few microseconds, more than a small op.

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

thread_local! {
    /// Set while this thread runs one part of [`map_parts`]: its loops then run inline.
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// Whether loops on this thread should run inline (inside a [`map_parts`] part, where the
/// parallelism is already spent on the parts).
pub fn inline() -> bool {
    INLINE.with(Cell::get)
}

/// `f(rows)` for consecutive parts of `part_rows` rows (the last one shorter) of `0..rows`, the
/// parts in parallel and each one's own loops inline on its thread: a batch of independent rows
/// cut into parts small enough that each part's activations stay in its core's cache. The
/// results come back in order. `part_rows` must not depend on the thread count when the bits of
/// the result should not.
pub fn map_parts<R: Send>(rows: usize, part_rows: usize, f: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    let part_rows = part_rows.max(1);
    let parts: Vec<Range<usize>> = (0..rows)
        .step_by(part_rows)
        .map(|s| s..(s + part_rows).min(rows))
        .collect();
    // A single part keeps its loops parallel (both cores on it); inline or not, the bits are
    // the same.
    if parts.len() <= 1 || inline() {
        return parts.into_iter().map(f).collect();
    }
    let run = |r: Range<usize>| {
        let before = INLINE.with(|c| c.replace(true));
        let out = f(r);
        INLINE.with(|c| c.set(before));
        out
    };
    parts.into_par_iter().map(run).collect()
}

/// Elements per parallel task: large enough that scheduling is noise (a few microseconds against
/// tens), small enough that two cores share a [1024, 256] activation evenly.
pub const CHUNK: usize = 1 << 14;

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Runs `f` on one of the pool's worker threads and waits for it. A parallel loop started from a
/// thread outside the pool hands its work to the pool and sleeps until a worker wakes it, two
/// context switches per op (12% of a small-batch E-step on one core); started from a worker, the
/// loop runs on that worker and the others steal from it. The binary runs every command this way;
/// a program embedding the library can do the same around its own calls.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("rayon::scope ran its body")
}

/// `f(rows, out_rows)` over row chunks of `out` ([rows, width]), in parallel when it is large.
pub fn for_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let width = width.max(1);
    let rows = out.len() / width;
    let per = rows_per_task(width);
    if rows <= per || inline() {
        return f(0..rows, out);
    }
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(i, o)| f(i * per..i * per + o.len() / width, o));
}

/// As [`for_rows`] with two outputs sharing the row split (`a` [rows, wa], `b` [rows, wb]).
pub fn for_rows2<T: Send, U: Send>(
    a: &mut [T],
    wa: usize,
    b: &mut [U],
    wb: usize,
    f: impl Fn(Range<usize>, &mut [T], &mut [U]) + Sync,
) {
    let (wa, wb) = (wa.max(1), wb.max(1));
    let rows = a.len() / wa;
    debug_assert_eq!(rows, b.len() / wb);
    let per = rows_per_task(wa.max(wb));
    if rows <= per || inline() {
        return f(0..rows, a, b);
    }
    a.par_chunks_mut(per * wa)
        .zip(b.par_chunks_mut(per * wb))
        .enumerate()
        .for_each(|(i, (ca, cb))| f(i * per..i * per + ca.len() / wa, ca, cb));
}

/// `f(range, out_chunk)` over flat chunks of `out`, in parallel when it is large.
pub fn for_chunks<T: Send>(out: &mut [T], f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    for_rows(out, 1, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_visited_once_with_its_index() {
        for rows in [0, 1, 7, 300, 5000] {
            let width = 37;
            let mut out = vec![0usize; rows * width];
            for_rows(&mut out, width, |r, o| {
                for (i, row) in r.zip(o.chunks_exact_mut(width)) {
                    row.iter_mut().for_each(|v| *v += i + 1);
                }
            });
            for (i, row) in out.chunks_exact(width).enumerate() {
                assert!(row.iter().all(|&v| v == i + 1), "rows {rows}: row {i}");
            }
            let mut a = vec![0usize; rows * 3];
            let mut b = vec![0usize; rows];
            for_rows2(&mut a, 3, &mut b, 1, |r, ca, cb| {
                assert_eq!(ca.len(), 3 * r.len());
                assert_eq!(cb.len(), r.len());
                for (k, i) in r.enumerate() {
                    cb[k] = i;
                    ca[3 * k..3 * k + 3].iter_mut().for_each(|v| *v = i);
                }
            });
            assert!(b.iter().enumerate().all(|(i, &v)| v == i));
            assert!(a
                .chunks_exact(3)
                .enumerate()
                .all(|(i, r)| r.iter().all(|&v| v == i)));
        }
    }
}
