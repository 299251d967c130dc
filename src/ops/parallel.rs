//! Both cores for the CPU backend's row-wise loops (LayerNorm, SiLU, bias, elementwise updates):
//! the work is split into chunks of a fixed number of elements, never by the number of threads,
//! and every row is computed by one thread from its own inputs only, so results are the same bits
//! on a pool of any size (`RAYON_NUM_THREADS=1` included). Below one chunk the loop runs inline:
//! a fork costs a few microseconds, more than a small op.

use std::ops::Range;

use rayon::prelude::*;

/// Elements per parallel task: large enough that scheduling is noise (a few microseconds against
/// tens), small enough that two cores share a [1024, 256] activation evenly.
pub const CHUNK: usize = 1 << 14;

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// `f(rows, out_rows)` over row chunks of `out` ([rows, width]), in parallel when it is large.
pub fn for_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let width = width.max(1);
    let rows = out.len() / width;
    let per = rows_per_task(width);
    if rows <= per {
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
    if rows <= per {
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
