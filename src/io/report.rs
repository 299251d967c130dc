//! A run's report as one self-contained HTML file: facts, the metrics table, the figures and the
//! configuration. Everything is inline (CSS, a small script, PNGs as data URIs), so the file can
//! be copied off a machine, attached or opened offline and still show everything; a
//! Content-Security-Policy forbids the browser to fetch anything else.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::error::Result;

/// One figure of the report: a caption and a PNG file (embedded as a data URI; a missing file is
/// shown as a note, not an error).
pub struct Figure {
    /// The text under the image.
    pub caption: String,
    /// The PNG file, read when the report is written.
    pub path: PathBuf,
}

/// What a report shows.
pub struct Report {
    /// The page's title and heading, e.g. `"emprior em manifold — runs/m1"`.
    pub title: String,
    /// The header table, one (name, value) pair a row: experiment, preset, version, commit,
    /// device, started, laps done/total, ...
    pub facts: Vec<(String, String)>,
    /// The metrics table's header.
    pub columns: Vec<String>,
    /// The metrics table's rows, one per lap, already formatted.
    pub rows: Vec<Vec<String>>,
    /// The figures in order: curves first, then the latest lap's grids and plots.
    pub figures: Vec<Figure>,
    /// The run's config.toml text, shown as is.
    pub config_toml: String,
}

/// Writes `report` to `path` as one self-contained HTML file (atomically: a reader sees the old
/// report or the new one, never half of one). Figure files that are missing or unreadable become
/// a note in the page; only failing to write the page is an error.
pub fn write_report(path: &Path, report: &Report) -> Result<()> {
    crate::io::write_atomically(path, render(report).as_bytes())
}

/// The 8 bytes every PNG file starts with.
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Plain and readable; no web fonts (nothing may be fetched), the system's sans-serif instead.
const STYLE: &str = "
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif;
  max-width: 1100px; margin: 0 auto; padding: 1.5rem 1rem 3rem; color: #1f2328; background: #fff;
  line-height: 1.45; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; overflow-wrap: anywhere; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.6rem; padding-bottom: 0.2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
tbody tr:nth-child(even) { background: #f6f8fa; }
table.facts th { white-space: nowrap; }
table.metrics td { font-variant-numeric: tabular-nums; white-space: nowrap; text-align: right; }
.scroll { overflow-x: auto; }
figure { margin: 0 0 1.5rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { font-size: 0.9rem; color: #57606a; margin-top: 0.3rem; }
.note { color: #9a6700; background: #fff8c5; border: 1px solid #d4a72c; padding: 0.4rem 0.6rem;
  font-size: 0.9rem; overflow-wrap: anywhere; }
.empty { color: #57606a; font-style: italic; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 0.75rem; overflow-x: auto;
  font-size: 0.85rem; }
";

/// Counts the images that really rendered, for a person (the title) and for the browser test
/// (`data-rendered` on `<body>`): a broken data URI shows as a count short of the total.
const SCRIPT: &str = "
window.addEventListener('load', function () {
  var imgs = document.images, k = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (imgs[i].complete && imgs[i].naturalWidth > 0) k++;
  }
  document.body.dataset.rendered = k + '/' + imgs.length;
  document.title += ' [images ' + k + '/' + imgs.length + ']';
});
";

/// The page as a string.
fn render(report: &Report) -> String {
    let mut h = String::with_capacity(1 << 16);
    let title = escape(&report.title);
    // Writing to a String cannot fail: the `fmt::Result`s below are ignored on purpose.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; \
         style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n<script>{SCRIPT}</script>\n</head>\n<body>\n\
         <h1>{title}</h1>\n"
    );

    h.push_str("<section>\n<h2>Run</h2>\n");
    if report.facts.is_empty() {
        h.push_str("<p class=\"empty\">No facts recorded.</p>\n");
    } else {
        h.push_str("<table class=\"facts\">\n<tbody>\n");
        for (name, value) in &report.facts {
            let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(name), escape(value));
        }
        h.push_str("</tbody>\n</table>\n");
    }
    h.push_str("</section>\n");

    h.push_str("<section>\n<h2>Metrics</h2>\n");
    if report.rows.is_empty() {
        h.push_str("<p class=\"empty\">No lap finished yet.</p>\n");
    } else {
        h.push_str("<div class=\"scroll\">\n<table class=\"metrics\">\n");
        if !report.columns.is_empty() {
            h.push_str("<thead><tr>");
            for c in &report.columns {
                let _ = write!(h, "<th>{}</th>", escape(c));
            }
            h.push_str("</tr></thead>\n");
        }
        h.push_str("<tbody>\n");
        for row in &report.rows {
            h.push_str("<tr>");
            for cell in row {
                let _ = write!(h, "<td>{}</td>", escape(cell));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody>\n</table>\n</div>\n");
    }
    h.push_str("</section>\n");

    h.push_str("<section>\n<h2>Figures</h2>\n");
    if report.figures.is_empty() {
        h.push_str("<p class=\"empty\">No figures yet.</p>\n");
    }
    for fig in &report.figures {
        let caption = escape(&fig.caption);
        h.push_str("<figure>\n");
        match png_data_uri(&fig.path) {
            Ok(uri) => {
                let _ = writeln!(h, "<img src=\"{uri}\" alt=\"{caption}\">");
            }
            Err(why) => {
                let _ = writeln!(h, "<p class=\"note\">{}</p>", escape(&why));
            }
        }
        let _ = writeln!(h, "<figcaption>{caption}</figcaption>\n</figure>");
    }
    h.push_str("</section>\n");

    h.push_str("<section>\n<h2>Configuration</h2>\n");
    if report.config_toml.trim().is_empty() {
        h.push_str("<p class=\"empty\">No config.toml.</p>\n");
    } else {
        let _ = writeln!(h, "<pre>{}</pre>", escape(&report.config_toml));
    }
    h.push_str("</section>\n</body>\n</html>\n");
    h
}

/// The PNG at `path` as a `data:` URI, or the sentence the page shows instead. A figure may be
/// missing for good reasons (a lap still being written, a plot that failed): the report is still
/// worth writing, so this is a note, not an error.
fn png_data_uri(path: &Path) -> std::result::Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("Figure not available: {} does not exist.", path.display())
        } else {
            format!("Figure not available: cannot read {}: {e}.", path.display())
        }
    })?;
    // Anything else under an image/png label would show as a broken image without a word why.
    if !bytes.starts_with(PNG_SIGNATURE) {
        return Err(format!(
            "Figure not available: {} is not a PNG file.",
            path.display()
        ));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
    Ok(format!("data:image/png;base64,{b64}"))
}

/// `text` with the five characters that are special in HTML text and attribute values replaced
/// by entities.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test (removed first).
    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("emprior-report-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A small RGB PNG filled with one colour.
    fn png_bytes(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, w, h);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut wr = enc.write_header().unwrap();
            let pixels: Vec<u8> = (0..w * h).flat_map(|_| rgb).collect();
            wr.write_image_data(&pixels).unwrap();
        }
        bytes
    }

    fn report(figures: Vec<Figure>) -> Report {
        Report {
            title: "emprior em manifold — runs/m1".into(),
            facts: vec![
                ("preset".into(), "manifold".into()),
                ("laps".into(), "2/4".into()),
            ],
            columns: vec!["lap".into(), "loss".into()],
            rows: vec![vec!["1".into(), "0.5".into()], vec!["2".into(), "0.25".into()]],
            figures,
            config_toml: "seed = 1\n[em]\nlaps = 4\n".into(),
        }
    }

    #[test]
    fn escapes_the_five_special_characters() {
        assert_eq!(
            escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
        assert_eq!(escape("plain — ünïcode"), "plain — ünïcode");
    }

    #[test]
    fn text_from_the_run_is_escaped_everywhere() {
        let evil = "<script>alert('x')</script>";
        let mut r = report(vec![Figure {
            caption: evil.into(),
            path: PathBuf::from("/nonexistent/a.png"),
        }]);
        r.title = evil.into();
        r.facts.push((evil.into(), evil.into()));
        r.columns.push(evil.into());
        r.rows[0].push(evil.into());
        r.config_toml = format!("name = \"{evil}\"\n");
        let html = render(&r);
        assert!(!html.contains(evil), "unescaped text in the page");
        // The page's own script is the only one.
        assert_eq!(html.matches("<script>").count(), 1);
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    }

    #[test]
    fn a_missing_figure_is_a_note_not_an_error() {
        let dir = temp_dir("missing");
        let present = dir.join("present.png");
        std::fs::write(&present, png_bytes(4, 3, [31, 119, 180])).unwrap();
        let not_png = dir.join("not-a.png");
        std::fs::write(&not_png, b"hello").unwrap();
        let r = report(vec![
            Figure {
                caption: "present".into(),
                path: present,
            },
            Figure {
                caption: "gone".into(),
                path: dir.join("gone.png"),
            },
            Figure {
                caption: "text".into(),
                path: not_png,
            },
        ]);
        let out = dir.join("report.html");
        write_report(&out, &r).unwrap();
        let html = std::fs::read_to_string(&out).unwrap();
        assert_eq!(html, render(&r));
        assert_eq!(
            html.matches("<img ").count(),
            1,
            "only the readable PNG is an image"
        );
        assert_eq!(html.matches("<p class=\"note\">").count(), 2);
        assert!(html.contains("gone.png does not exist"));
        assert!(html.contains("not-a.png is not a PNG file"));
        assert!(html.contains("<figcaption>gone</figcaption>"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn self_contained_no_urls() {
        let dir = temp_dir("urls");
        let p = dir.join("a.png");
        std::fs::write(&p, png_bytes(8, 8, [255, 127, 14])).unwrap();
        let html = render(&report(vec![Figure {
            caption: "a".into(),
            path: p,
        }]));
        let lower = html.to_ascii_lowercase();
        for bad in ["http://", "https://", "//fonts", "@import", " src=\"http", "url("] {
            assert!(!lower.contains(bad), "the page holds {bad:?}");
        }
        assert!(lower.contains("<meta charset=\"utf-8\">"));
        // Every src is a data URI.
        for (i, _) in html.match_indices(" src=\"") {
            assert!(html[i + 6..].starts_with("data:image/png;base64,"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn data_uri_round_trips_the_png_bytes() {
        let dir = temp_dir("roundtrip");
        let bytes = png_bytes(5, 7, [44, 160, 44]);
        let p = dir.join("g.png");
        std::fs::write(&p, &bytes).unwrap();
        let html = render(&report(vec![Figure {
            caption: "g".into(),
            path: p,
        }]));
        let prefix = "src=\"data:image/png;base64,";
        let start = html.find(prefix).unwrap() + prefix.len();
        let len = html[start..].find('"').unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(&html[start..start + len])
            .unwrap();
        assert_eq!(decoded, bytes);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn empty_report_still_renders() {
        let r = Report {
            title: String::new(),
            facts: vec![],
            columns: vec![],
            rows: vec![],
            figures: vec![],
            config_toml: String::new(),
        };
        let html = render(&r);
        assert!(html.contains("No lap finished yet."));
        assert!(html.contains("No figures yet."));
        assert!(html.ends_with("</html>\n"));
    }
}
