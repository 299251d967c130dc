//! The pictures a person looks at, drawn with `plotters` into an RGB buffer and encoded as PNG
//! (written atomically): the manifold pair plot (the paper's Figure 3), metric curves over laps,
//! captioned image grids, and single images for FID tools. Text uses DejaVu Sans, embedded in the
//! binary, so nothing depends on the machine's fonts.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::checkpoint::write_atomically;
use crate::error::{Error, Result};

/// DejaVu Sans (Bitstream Vera licence, `assets/fonts/LICENSE`), registered as "sans-serif".
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// The colours of the model (EM samples), the ground truth and a second series.
const MODEL: RGBColor = RGBColor(31, 119, 180);
const TRUTH: RGBColor = RGBColor(60, 60, 60);
const SECOND: RGBColor = RGBColor(255, 127, 14);
const REFERENCE: RGBColor = RGBColor(150, 150, 150);

fn font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The embedded bytes are a valid TrueType font (a unit test parses them): registration
        // cannot fail at run time, and if it did, text would be missing rather than the run lost.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Other(format!("drawing {}: {e:?}", path.display()))
}

/// Renders `draw` on a white `width` x `height` canvas and writes it to `path` as a PNG.
fn render(
    path: &Path,
    width: usize,
    height: usize,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    font();
    let mut pixels = vec![255u8; width * height * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width as u32, height as u32)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(draw_err(path))?;
    }
    write_png(path, &pixels, width, height)
}

fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize) -> Result<()> {
    save_image(path, rgb, height, width, 3)
}

/// One series of a curve plot: a name for the legend and (lap, value) points.
pub struct Series<'a> {
    /// The legend's name.
    pub name: &'a str,
    /// (lap, value) points; non-finite values are skipped.
    pub points: Vec<(usize, f64)>,
}

/// What a curve plot shows: title, y axis label, log or linear y, and named horizontal
/// reference lines (for example the Gaussian initialisation's value).
pub struct CurvePlot<'a> {
    /// Drawn above the plot.
    pub title: &'a str,
    /// The y axis's label (the x axis is the lap).
    pub y_label: &'a str,
    /// A log-scaled y axis (distances spanning decades).
    pub log_y: bool,
    /// The curves, coloured blue, orange, grey in this order.
    pub series: Vec<Series<'a>>,
    /// Dashed horizontal lines with their legend names.
    pub references: Vec<(String, f64)>,
}

/// Metric curves against laps: lines with markers, a legend, labelled axes, and dashed
/// reference lines. Values that are not finite (or not positive on a log axis) are skipped.
pub fn curves(path: &Path, plot: &CurvePlot<'_>) -> Result<()> {
    let usable = |v: f64| v.is_finite() && (!plot.log_y || v > 0.0);
    let values: Vec<f64> = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(plot.references.iter().map(|r| r.1))
        .filter(|&v| usable(v))
        .collect();
    let last_lap = plot
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1);
    render(path, 800, 500, |root| {
        let err = draw_err(path);
        root.fill(&WHITE).map_err(&err)?;
        if values.is_empty() {
            root.draw(&Text::new(
                format!("{}: nothing measured yet", plot.title),
                (20, 20),
                (FAMILY, 18).into_font(),
            ))
            .map_err(&err)?;
            return Ok(());
        }
        let (mut lo, mut hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        if plot.log_y {
            (lo, hi) = (lo / 1.5, hi * 1.5);
        } else {
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-9);
            (lo, hi) = (lo - pad, hi + pad);
        }
        let x_range = -0.3f64..last_lap as f64 + 0.3;
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(plot.title, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(80);
        let lap_ticks = (last_lap + 1).min(12);
        let label_style = (FAMILY, 15);
        macro_rules! draw_on {
            ($chart:expr, $to_y:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_labels(lap_ticks)
                    .x_label_formatter(&|x| {
                        if (x - x.round()).abs() < 1e-6 {
                            format!("{}", x.round() as i64)
                        } else {
                            String::new()
                        }
                    })
                    .y_labels(12)
                    .y_label_formatter(&|y| axis_value(*y))
                    .x_desc("lap")
                    .y_desc(plot.y_label)
                    .label_style(label_style)
                    .axis_desc_style(label_style)
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(&err)?;
                for (name, value) in plot.references.iter().filter(|r| usable(r.1)) {
                    let v = $to_y(*value);
                    chart
                        .draw_series(DashedLineSeries::new(
                            [(x_range.start, v), (x_range.end, v)],
                            8,
                            5,
                            REFERENCE.stroke_width(2),
                        ))
                        .map_err(&err)?
                        .label(name.as_str())
                        .legend(|(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], REFERENCE.stroke_width(2))
                        });
                }
                for (s, color) in plot.series.iter().zip([MODEL, SECOND, TRUTH]) {
                    let pts: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .filter(|p| usable(p.1))
                        .map(|&(lap, v)| (lap as f64, $to_y(v)))
                        .collect();
                    chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(&err)?
                        .label(s.name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                        .map_err(&err)?;
                }
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font((FAMILY, 15))
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(&err)?;
            }};
        }
        if plot.log_y {
            // Ticks at 1, 2 and 5 of every decade in range (plotters' own log ticks skip
            // values below 1).
            // Over more than four decades, powers of ten alone stay readable.
            let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            let mantissas: &[f64] = if last - first > 4 {
                &[1.0]
            } else {
                &[1.0, 2.0, 5.0]
            };
            let ticks: Vec<f64> = (first..=last)
                .flat_map(|e| mantissas.iter().map(move |m| m * 10f64.powi(e)))
                .filter(|v| (lo..=hi).contains(v))
                .collect();
            let chart = builder
                .build_cartesian_2d(x_range.clone(), (lo..hi).log_scale().with_key_points(ticks))
                .map_err(&err)?;
            draw_on!(chart, |v: f64| v);
        } else {
            let chart = builder
                .build_cartesian_2d(x_range.clone(), lo..hi)
                .map_err(&err)?;
            draw_on!(chart, |v: f64| v);
        }
        Ok(())
    })
}

/// A number for an axis or a title: 3 significant digits, exponent form when very small or large.
pub fn format_value(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-2 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An axis label: [`format_value`] without trailing zeros ("3", "0.25", "1.5e-3").
fn axis_value(v: f64) -> String {
    let s = format_value(v);
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A tick value without trailing zeros ("-3", "0.5").
fn tick(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The pair plot of the first `d` coordinates of `samples` (rows of d, the model's) beside the
/// same of `truth` (empty when there is none): two lower-triangular grids in one orientation,
/// panel (i, j) scattering x_j (horizontal) against x_i (vertical), histograms of x_i on the
/// diagonal (the truth's histogram drawn as a grey outline over the model's too).
pub fn pair_plot(
    path: &Path,
    title: &str,
    samples: &[f32],
    truth: &[f64],
    d: usize,
    range: (f64, f64),
) -> Result<()> {
    const PANEL: usize = 150;
    const SPACING: usize = 14;
    let grids = if truth.is_empty() { 1 } else { 2 };
    let (head, axis, gap) = (86usize, 34usize, 40usize);
    let step = PANEL + SPACING;
    let grid_w = axis + d * step;
    let width = grids * grid_w + (grids - 1) * gap + 20;
    let height = head + d * step + axis + 10;
    let model: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
    let bins = 40;
    let hist = |x: &[f64], i: usize| -> Vec<f64> {
        let n = x.len() / d;
        let mut h = vec![0.0; bins];
        for k in 0..n {
            let t = (x[k * d + i] - range.0) / (range.1 - range.0);
            if (0.0..1.0).contains(&t) {
                h[(t * bins as f64) as usize] += 1.0;
            }
        }
        let width = (range.1 - range.0) / bins as f64;
        h.iter_mut().for_each(|v| *v /= n.max(1) as f64 * width);
        h
    };
    render(path, width, height, |root| {
        let err = draw_err(path);
        root.fill(&WHITE).map_err(&err)?;
        root.draw(&Text::new(title.to_string(), (12, 10), (FAMILY, 20).into_font()))
            .map_err(&err)?;
        let note = if truth.is_empty() {
            "panel (row i, column j): x_j across, x_i up; diagonal: histogram of x_i".to_string()
        } else {
            "panel (row i, column j): x_j across, x_i up; diagonal: histogram of x_i, \
             the ground truth's as a black outline over the samples'"
                .to_string()
        };
        root.draw(&Text::new(note, (12, 36), (FAMILY, 13).into_font()))
            .map_err(&err)?;
        let sets: Vec<(&str, &[f64], RGBColor)> = if truth.is_empty() {
            vec![("EM samples (no ground truth given)", &model[..], MODEL)]
        } else {
            vec![("EM samples", &model[..], MODEL), ("ground truth", truth, TRUTH)]
        };
        let truth_hists: Vec<Vec<f64>> = if truth.is_empty() {
            Vec::new()
        } else {
            (0..d).map(|i| hist(truth, i)).collect()
        };
        for (g, (name, points, color)) in sets.iter().enumerate() {
            let ox = 10 + g * (grid_w + gap);
            root.draw(&Text::new(
                format!("{name} ({} points)", points.len() / d),
                (ox as i32 + axis as i32, 60),
                (FAMILY, 16).into_font().color(color),
            ))
            .map_err(&err)?;
            let n = points.len() / d;
            let alpha = (800.0 / n.max(1) as f64).clamp(0.08, 0.7);
            for i in 0..d {
                for j in 0..=i {
                    let x0 = ox + axis + j * step;
                    let y0 = head + i * step;
                    let area = root
                        .clone()
                        .shrink((x0 as i32, y0 as i32), (PANEL as u32, PANEL as u32));
                    let left = j == 0;
                    let bottom = i == d - 1;
                    let mut chart = ChartBuilder::on(&area)
                        .margin(3)
                        .build_cartesian_2d(range.0..range.1, range.0..range.1)
                        .map_err(&err)?;
                    chart
                        .configure_mesh()
                        .disable_mesh()
                        .x_labels(0)
                        .y_labels(0)
                        .axis_style(RGBColor(190, 190, 190))
                        .draw()
                        .map_err(&err)?;
                    if i == j {
                        let h = hist(points, i);
                        let top = h
                            .iter()
                            .chain(truth_hists.get(i).into_iter().flatten())
                            .fold(0.0f64, |a, &b| a.max(b))
                            .max(1e-12);
                        let scale = |v: f64| range.0 + v / top * 0.95 * (range.1 - range.0);
                        let bw = (range.1 - range.0) / bins as f64;
                        chart
                            .draw_series(h.iter().enumerate().map(|(b, &v)| {
                                let xl = range.0 + b as f64 * bw;
                                Rectangle::new([(xl, range.0), (xl + bw, scale(v))], color.mix(0.55).filled())
                            }))
                            .map_err(&err)?;
                        if g == 0 {
                            if let Some(t) = truth_hists.get(i) {
                                let outline: Vec<(f64, f64)> = t
                                    .iter()
                                    .enumerate()
                                    .flat_map(|(b, &v)| {
                                        let xl = range.0 + b as f64 * bw;
                                        [(xl, scale(v)), (xl + bw, scale(v))]
                                    })
                                    .collect();
                                chart
                                    .draw_series(LineSeries::new(outline, TRUTH.stroke_width(1)))
                                    .map_err(&err)?;
                            }
                        }
                    } else {
                        chart
                            .draw_series((0..n).map(|k| {
                                Circle::new(
                                    (points[k * d + j], points[k * d + i]),
                                    1,
                                    color.mix(alpha).filled(),
                                )
                            }))
                            .map_err(&err)?;
                    }
                    let label =
                        |s: String, at: (i32, i32)| root.draw(&Text::new(s, at, (FAMILY, 13).into_font()));
                    if bottom {
                        let yb = (y0 + PANEL + 4) as i32;
                        label(tick(range.0), (x0 as i32 + 2, yb)).map_err(&err)?;
                        label(format!("x{}", j + 1), ((x0 + PANEL / 2 - 6) as i32, yb)).map_err(&err)?;
                        label(tick(range.1), ((x0 + PANEL - 16) as i32, yb)).map_err(&err)?;
                    }
                    if left && i > 0 {
                        let xl = (x0 - axis) as i32;
                        label(tick(range.1), (xl, y0 as i32 + 4)).map_err(&err)?;
                        label(format!("x{}", i + 1), (xl + 4, (y0 + PANEL / 2 - 6) as i32)).map_err(&err)?;
                        label(tick(range.0), (xl, (y0 + PANEL - 18) as i32)).map_err(&err)?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// A grid of images `[n, h, w, c]` (c = 1 or 3, bytes), `cols` per row, each scaled `scale`
/// times, under a title, with a caption over each column (`column_captions`, may be empty) and
/// before each row (`row_captions`, may be empty).
#[allow(clippy::too_many_arguments)]
pub fn image_grid(
    path: &Path,
    title: &str,
    images: &[u8],
    (h, w, c): (usize, usize, usize),
    cols: usize,
    scale: usize,
    column_captions: &[String],
    row_captions: &[String],
) -> Result<()> {
    let n = images.len() / (h * w * c);
    let cols = cols.max(1);
    let rows = n.div_ceil(cols).max(1);
    let gap = 4;
    // Captions are about 7 px a character at 13 px: a cell is as wide as its longest caption.
    let caption_px = column_captions
        .iter()
        .map(|c| c.chars().count() * 7 + 6)
        .max()
        .unwrap_or(0);
    let cell = (w * scale).max(caption_px);
    let (cw, ch) = (cell + gap, h * scale + gap);
    let head = 34 + if column_captions.is_empty() { 0 } else { 22 };
    // Row captions at 14 px: about 8 px a character, before the first column.
    let left = row_captions
        .iter()
        .map(|c| c.chars().count() * 8 + 14)
        .max()
        .unwrap_or(6);
    let width = (left + cols * cw + gap).max(title.len() * 9 + 24);
    let height = head + rows * ch + gap;
    let mut pixels = vec![255u8; width * height * 3];
    for i in 0..n {
        let (ox, oy) = (
            left + (i % cols) * cw + (cell - w * scale) / 2,
            head + (i / cols) * ch,
        );
        for y in 0..h * scale {
            for x in 0..w * scale {
                let src = ((i * h + y / scale) * w + x / scale) * c;
                let dst = ((oy + y) * width + ox + x) * 3;
                for k in 0..3 {
                    pixels[dst + k] = images[src + if c == 1 { 0 } else { k }];
                }
            }
        }
    }
    font();
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width as u32, height as u32)).into_drawing_area();
        let err = draw_err(path);
        root.draw(&Text::new(title.to_string(), (8, 8), (FAMILY, 18).into_font()))
            .map_err(&err)?;
        let caption: TextStyle = (FAMILY, 13).into();
        for (k, cap) in column_captions.iter().enumerate().take(cols) {
            let text_w = root.estimate_text_size(cap, &caption).map_or(0, |s| s.0 as usize);
            let x = left + k * cw + cell.saturating_sub(text_w) / 2;
            root.draw(&Text::new(cap.clone(), (x as i32, 36), caption.clone()))
                .map_err(&err)?;
        }
        for (r, cap) in row_captions.iter().enumerate().take(rows) {
            let y = head + r * ch + h * scale / 2 - 7;
            root.draw(&Text::new(cap.clone(), (6, y as i32), (FAMILY, 14).into_font()))
                .map_err(&err)?;
        }
        root.present().map_err(&err)?;
    }
    write_png(path, &pixels, width, height)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        let dir = std::env::temp_dir().join(format!("emprior-plot-font-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grid.png");
        // A white image under a title: any dark pixel in the title band is the font's.
        let white = vec![255u8; 8 * 8];
        image_grid(&path, "Title text", &white, (8, 8, 1), 1, 1, &[], &[]).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let row = info.line_size;
        let dark = (0..30)
            .flat_map(|y| buf[y * row..(y + 1) * row].chunks(3).map(|p| p[0]))
            .filter(|&v| v < 128)
            .count();
        assert!(dark > 20, "{dark} dark pixels in the title band");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ticks_and_values_read_well() {
        assert_eq!(tick(-3.0), "-3");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(format_value(0.0123), "0.01");
        assert_eq!(format_value(0.00123), "1.2e-3");
        assert_eq!(format_value(27.31), "27.3");
        assert_eq!(axis_value(3.0), "3");
        assert_eq!(axis_value(0.25), "0.25");
    }
}
