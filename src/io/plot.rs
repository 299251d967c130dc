//! Small raster plots written as PNG: the manifold pair plot (the paper's Figure 3) and the
//! distances over laps. The rasterising is plain Rust; the `png` crate encodes.

use std::path::Path;

use super::checkpoint::write_atomically;
use crate::error::{Error, Result};

const BACKGROUND: [u8; 3] = [255, 255, 255];
const FRAME: [u8; 3] = [200, 200, 200];
const MODEL: [u8; 3] = [31, 119, 180];
const TRUTH: [u8; 3] = [90, 90, 90];
const SECOND: [u8; 3] = [255, 127, 14];

/// An RGB canvas.
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    pixels: Vec<[u8; 3]>,
}

impl Canvas {
    /// A white canvas of `width` x `height` pixels.
    pub fn new(width: usize, height: usize) -> Self {
        Canvas {
            width,
            height,
            pixels: vec![BACKGROUND; width * height],
        }
    }

    /// Paints pixel (x, y) (origin top left) with colour `c`; points off the canvas are ignored.
    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    /// Blends `c` over the pixel with weight `alpha` (dense scatter plots read as densities).
    pub fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f32) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let p = &mut self.pixels[y as usize * self.width + x as usize];
            for k in 0..3 {
                p[k] = (p[k] as f32 * (1.0 - alpha) + c[k] as f32 * alpha).round() as u8;
            }
        }
    }

    /// The 1 px outline of the rectangle with corners (x0, y0) and (x1, y1), both inclusive.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for x in x0..=x1 {
            self.set(x, y0, c);
            self.set(x, y1, c);
        }
        for y in y0..=y1 {
            self.set(x0, y, c);
            self.set(x1, y, c);
        }
    }

    /// A line by linear interpolation (1 px).
    pub fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }

    /// Writes the canvas as an 8-bit RGB PNG, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let err = |e: png::EncodingError| Error::Other(format!("encoding {}: {e}", path.display()));
            let mut w = enc.write_header().map_err(err)?;
            w.write_image_data(bytemuck::cast_slice(&self.pixels))
                .map_err(err)?;
        }
        write_atomically(path, &bytes)
    }
}

/// The pair plot of d-dimensional samples (rows of `model` and `truth`, axes over `range`): panel
/// (i, j) below the diagonal scatters the model's (x_j, x_i), above it the ground truth's; the
/// diagonal overlays the two histograms of x_i (model blue, truth grey).
pub fn pair_plot(path: &Path, model: &[f32], truth: &[f64], d: usize, range: (f64, f64)) -> Result<()> {
    const PANEL: usize = 140;
    const GAP: usize = 6;
    let size = d * PANEL + (d + 1) * GAP;
    let mut c = Canvas::new(size, size);
    let (lo, hi) = range;
    let to_px = |v: f64| ((v - lo) / (hi - lo) * (PANEL - 1) as f64).round() as i64;
    let origin = |k: usize| (GAP + k * (PANEL + GAP)) as i64;
    let scatter = |c: &mut Canvas,
                   pts: &mut dyn Iterator<Item = (f64, f64)>,
                   col: [u8; 3],
                   ox: i64,
                   oy: i64,
                   n: usize| {
        let alpha = (600.0 / n.max(1) as f32).clamp(0.05, 0.6);
        for (x, y) in pts {
            c.blend(ox + to_px(x), oy + (PANEL as i64 - 1 - to_px(y)), col, alpha);
        }
    };
    let (nm, nt) = (model.len() / d, truth.len() / d);
    for i in 0..d {
        for j in 0..d {
            let (ox, oy) = (origin(j), origin(i));
            c.rect(ox - 1, oy - 1, ox + PANEL as i64, oy + PANEL as i64, FRAME);
            if i > j {
                let mut pts = (0..nm).map(|k| (model[k * d + j] as f64, model[k * d + i] as f64));
                scatter(&mut c, &mut pts, MODEL, ox, oy, nm);
            } else if i < j {
                let mut pts = (0..nt).map(|k| (truth[k * d + j], truth[k * d + i]));
                scatter(&mut c, &mut pts, TRUTH, ox, oy, nt);
            } else {
                let hist = |vals: &mut dyn Iterator<Item = f64>, count: usize| -> Vec<f64> {
                    let mut h = vec![0.0; PANEL];
                    for v in vals {
                        let b = to_px(v);
                        if (0..PANEL as i64).contains(&b) {
                            h[b as usize] += 1.0 / count.max(1) as f64;
                        }
                    }
                    h
                };
                let hm = hist(&mut (0..nm).map(|k| model[k * d + i] as f64), nm);
                let ht = hist(&mut (0..nt).map(|k| truth[k * d + i]), nt);
                let top = hm.iter().chain(&ht).copied().fold(1e-12, f64::max);
                for (h, col) in [(&ht, TRUTH), (&hm, MODEL)] {
                    for b in 1..PANEL {
                        let y = |v: f64| oy as f64 + (PANEL - 1) as f64 * (1.0 - v / top);
                        c.line(
                            (ox as f64 + (b - 1) as f64, y(h[b - 1])),
                            (ox as f64 + b as f64, y(h[b])),
                            col,
                        );
                    }
                }
            }
        }
    }
    c.save(path)
}

/// log10 of two distance series over laps (Sinkhorn blue, sliced W1 orange), with horizontal
/// grid lines at each power of ten.
pub fn curves(path: &Path, first: &[(usize, f64)], second: &[(usize, f64)]) -> Result<()> {
    let (w, h, m) = (640usize, 400usize, 30.0f64);
    let mut c = Canvas::new(w, h);
    let all: Vec<f64> = first
        .iter()
        .chain(second)
        .map(|p| p.1)
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::log10)
        .collect();
    if all.is_empty() {
        return c.save(path);
    }
    let (lo, hi) = (
        all.iter().copied().fold(f64::INFINITY, f64::min).floor(),
        all.iter().copied().fold(f64::NEG_INFINITY, f64::max).ceil(),
    );
    let hi = if hi <= lo { lo + 1.0 } else { hi };
    let last = first.iter().chain(second).map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let px = |lap: usize, v: f64| {
        (
            m + lap as f64 / last * (w as f64 - 2.0 * m),
            h as f64 - m - (v.log10() - lo) / (hi - lo) * (h as f64 - 2.0 * m),
        )
    };
    for decade in lo as i64..=hi as i64 {
        let y = h as f64 - m - (decade as f64 - lo) / (hi - lo) * (h as f64 - 2.0 * m);
        c.line((m, y), (w as f64 - m, y), FRAME);
    }
    c.rect(
        m as i64,
        m as i64,
        (w as f64 - m) as i64,
        (h as f64 - m) as i64,
        TRUTH,
    );
    for (series, col) in [(first, MODEL), (second, SECOND)] {
        let pts: Vec<(usize, f64)> = series
            .iter()
            .copied()
            .filter(|p| p.1.is_finite() && p.1 > 0.0)
            .collect();
        for pair in pts.windows(2) {
            c.line(px(pair[0].0, pair[0].1), px(pair[1].0, pair[1].1), col);
        }
        for &(lap, v) in &pts {
            let (x, y) = px(lap, v);
            for dx in -2..=2 {
                for dy in -2..=2 {
                    c.set(x.round() as i64 + dx, y.round() as i64 + dy, col);
                }
            }
        }
    }
    c.save(path)
}

/// A grid of images [n, h, w, c] (c = 1 or 3; values already as bytes), `cols` per row, each
/// scaled up `scale` times, with a 2-pixel white gap.
pub fn image_grid(
    path: &Path,
    images: &[u8],
    h: usize,
    w: usize,
    c: usize,
    cols: usize,
    scale: usize,
) -> Result<()> {
    let n = images.len() / (h * w * c);
    let cols = cols.max(1);
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (cw, ch) = (w * scale + gap, h * scale + gap);
    let mut canvas = Canvas::new(cols * cw + gap, rows * ch + gap);
    for i in 0..n {
        let (ox, oy) = (gap + (i % cols) * cw, gap + (i / cols) * ch);
        for y in 0..h * scale {
            for x in 0..w * scale {
                let base = ((i * h + y / scale) * w + x / scale) * c;
                let px = if c == 1 {
                    [images[base]; 3]
                } else {
                    [images[base], images[base + 1], images[base + 2]]
                };
                canvas.set((ox + x) as i64, (oy + y) as i64, px);
            }
        }
    }
    canvas.save(path)
}

/// One image [h, w, c] of bytes (c = 1 grayscale, c = 3 RGB) as a PNG of its own size: one file
/// per sample in a directory is the layout FID tools (torch-fidelity, pytorch-fid, clean-fid)
/// read.
pub fn save_image(path: &Path, image: &[u8], h: usize, w: usize, c: usize) -> Result<()> {
    let color = match c {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        _ => {
            return Err(Error::Other(format!(
                "{}: {c} channels cannot be a PNG here",
                path.display()
            )))
        }
    };
    if image.len() != h * w * c {
        return Err(Error::shape("save_image", "image", [h, w, c], image.len()));
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let err = |e: png::EncodingError| Error::Other(format!("encoding {}: {e}", path.display()));
        let mut wr = enc.write_header().map_err(err)?;
        wr.write_image_data(image).map_err(err)?;
    }
    write_atomically(path, &bytes)
}
