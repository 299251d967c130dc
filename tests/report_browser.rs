//! The HTML report in a real browser: a report with two PNG figures (and one missing) is written
//! by `emprior::io::report::write_report` and opened in headless Chromium, which must count both
//! images as rendered (`data-rendered="2/2"` in the DOM it dumps) and paint them (the screenshot
//! holds each image's colour over about its area). The screenshot is kept as
//! target/report-screenshot.png, the page as target/report-sample.html, for a person to look at.
//!
//! Own harness (libtest-mimic): without a Chromium on PATH (`chromium`, `chromium-browser`,
//! `google-chrome`, `google-chrome-stable`, or the one EMPRIOR_CHROMIUM names) the trials are
//! reported as ignored, not passed; under CI (the variable `CI` set) they fail instead, since CI
//! installs Chromium.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use emprior::io::report::{write_report, Figure, Report};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The two figures' colours (matplotlib's first two): far from anything else on the page.
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];
/// The figures' sizes in pixels.
const BLUE_SIZE: (u32, u32) = (160, 120);
const ORANGE_SIZE: (u32, u32) = (120, 160);
/// The browser window, and so the screenshot (at a device scale factor of 1).
const WINDOW: (u32, u32) = (1200, 1600);
/// A browser that has not finished by then is killed (with everything it started): a hung
/// Chromium must not hang CI.
const TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let args = Arguments::from_args();
    let browser = find_browser();
    let required = std::env::var_os("CI").is_some();
    match (&browser, required) {
        (Some(b), _) => eprintln!("report_browser: using {}", b.display()),
        (None, true) => eprintln!("report_browser: CI is set and no Chromium was found: the trials fail"),
        (None, false) => eprintln!("report_browser: {NO_BROWSER}; the trials are ignored"),
    }
    let ignored = browser.is_none() && !required;
    let trial = |name: &str, check: fn(&Path, &Path) -> Result<(), String>| {
        let found = browser.clone();
        let name_owned = name.to_string();
        Trial::ignorable_test(name, move || match found {
            Some(b) => {
                let dir = scratch_dir(&name_owned);
                let result = check(&b, &dir);
                if result.is_ok() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                result.map(|()| Completion::Completed).map_err(Failed::from)
            }
            None if required => Err(format!(
                "CI is set but no Chromium was found ({NO_BROWSER}); CI installs it with \
                 `apt-get install -y chromium`"
            )
            .into()),
            // Run anyway (--include-ignored) without a browser: still counted as ignored.
            None => Ok(Completion::ignored_with(NO_BROWSER)),
        })
        .with_ignored_flag(ignored)
    };
    let trials = vec![
        trial("chromium::dom_counts_every_image_rendered", dom_counts_images),
        trial(
            "chromium::screenshot_paints_both_figures",
            screenshot_paints_figures,
        ),
        trial("chromium::a_real_runs_report_renders", real_run_report),
    ];
    libtest_mimic::run(&args, trials).exit()
}

const NO_BROWSER: &str = "needs a headless Chromium: none of chromium, chromium-browser, google-chrome, \
     google-chrome-stable is on PATH and EMPRIOR_CHROMIUM is not set (Debian: apt-get install chromium)";

/// The first Chromium found: EMPRIOR_CHROMIUM if set, else the usual names on PATH.
fn find_browser() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EMPRIOR_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh directory for one trial (removed first; kept after a failure, for a look).
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "emprior-report-browser-{}-{}",
        name.replace("::", "-"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where the files for a person go: target/ (the parent of Cargo's per-target temp directory,
/// so that CARGO_TARGET_DIR is respected).
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

/// An RGB PNG of `size` filled with `rgb`.
fn solid_png(path: &Path, size: (u32, u32), rgb: [u8; 3]) {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, size.0, size.1);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        let pixels: Vec<u8> = (0..size.0 * size.1).flat_map(|_| rgb).collect();
        w.write_image_data(&pixels).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

/// A report like a run's (two laps, two figures, one figure still missing, text that needs
/// escaping) written to `dir`/report.html; returns its path.
fn sample_report(dir: &Path) -> PathBuf {
    let blue = dir.join("curves.png");
    let orange = dir.join("grid.png");
    solid_png(&blue, BLUE_SIZE, BLUE);
    solid_png(&orange, ORANGE_SIZE, ORANGE);
    let s = |v: &str| v.to_string();
    let report = Report {
        title: s("emprior em manifold — runs/m1 <test>"),
        facts: vec![
            (s("experiment"), s("manifold")),
            (s("preset"), s("smoke")),
            (s("version"), s("0.1.0")),
            (s("commit"), s("0123abc")),
            (s("device"), s("cpu (2 threads)")),
            (s("started"), s("2025-01-01 12:00:00")),
            (s("laps"), s("2/4")),
        ],
        columns: vec![s("lap"), s("loss"), s("sinkhorn"), s("time (s)")],
        rows: vec![
            vec![s("1"), s("0.512"), s("0.0840"), s("12.3")],
            vec![s("2"), s("0.431"), s("0.0612"), s("11.9")],
        ],
        figures: vec![
            Figure {
                caption: s("Curves: loss & Sinkhorn distance per lap"),
                path: blue,
            },
            Figure {
                caption: s("Lap 2: samples"),
                path: orange,
            },
            Figure {
                caption: s("Lap 2: posterior grid (not written yet)"),
                path: dir.join("lap-002").join("posterior.png"),
            },
        ],
        config_toml: s("seed = 7\nname = \"a <b> & 'c'\"\n\n[em]\nlaps = 4\n"),
    };
    let html = dir.join("report.html");
    write_report(&html, &report).unwrap_or_else(|e| panic!("writing {}: {e}", html.display()));
    let _ = std::fs::copy(&html, target_dir().join("report-sample.html"));
    html
}

/// Runs the browser on `url` with the flags every run needs plus `extra`, stdout into
/// `dir`/`stdout_name`; kills it (its whole process group) after [`TIMEOUT`].
fn run_browser(
    browser: &Path,
    dir: &Path,
    extra: &[String],
    url: &str,
    stdout_name: &str,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let stdout = std::fs::File::create(dir.join(stdout_name)).map_err(|e| e.to_string())?;
    let stderr_path = dir.join(format!("{stdout_name}.stderr"));
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        // Root (CI, containers) cannot run Chromium's sandbox.
        "--no-sandbox",
        "--disable-gpu",
        // Containers often have a tiny /dev/shm.
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--force-device-scale-factor=1",
    ])
    .arg(format!("--user-data-dir={}", dir.join("profile").display()))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    // Files, not pipes: a full pipe nobody reads would block the browser until the timeout.
    .stdout(stdout)
    .stderr(stderr)
    // Its own process group, so that a kill reaches the renderer and GPU processes too.
    .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", browser.display()))?;
    let pgid = child.id() as libc::pid_t;
    let kill_group = || unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    };
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > TIMEOUT => {
                kill_group();
                let _ = child.wait();
                return Err(format!(
                    "{} did not finish within {TIMEOUT:?} and was killed; its stderr:\n{}",
                    browser.display(),
                    tail(&stderr_path)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for the browser: {e}")),
        }
    };
    // Helpers it left behind (none, normally) go with it.
    kill_group();
    if !status.success() {
        return Err(format!(
            "{} exited with {status}; its stderr:\n{}",
            browser.display(),
            tail(&stderr_path)
        ));
    }
    Ok(())
}

/// The last lines of a log file, for a failure message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// The DOM after `load`: the page's script found both images complete with a natural size.
fn dom_counts_images(browser: &Path, dir: &Path) -> Result<(), String> {
    let html = sample_report(dir);
    run_browser(browser, dir, &["--dump-dom".into()], &file_url(&html), "dom.html")?;
    let dom = std::fs::read_to_string(dir.join("dom.html")).map_err(|e| e.to_string())?;
    if !dom.contains("data-rendered=\"2/2\"") {
        let body = dom.find("<body").map_or("(no <body> in the dump)", |i| {
            &dom[i..dom[i..].find('>').map_or(dom.len(), |j| i + j + 1)]
        });
        return Err(format!(
            "expected data-rendered=\"2/2\" on <body>, the dumped DOM ({} bytes) has {body}",
            dom.len()
        ));
    }
    if !dom.contains("[images 2/2]</title>") {
        return Err("the title does not end in [images 2/2]".into());
    }
    // Escaped text stays text: the DOM holds no element the run's strings would have made.
    if dom.contains("<test>") || dom.contains("<b>") {
        return Err("text from the report was parsed as markup".into());
    }
    if !dom.contains("lap-002") || !dom.contains("does not exist") {
        return Err("the missing figure's note is not in the page".into());
    }
    Ok(())
}

/// The screenshot: both figures painted, each colour over about its image's area.
fn screenshot_paints_figures(browser: &Path, dir: &Path) -> Result<(), String> {
    let html = sample_report(dir);
    let shot = dir.join("screenshot.png");
    let extra = [
        "--hide-scrollbars".to_string(),
        format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        format!("--screenshot={}", shot.display()),
    ];
    run_browser(browser, dir, &extra, &file_url(&html), "screenshot.stdout")?;
    let _ = std::fs::copy(&shot, target_dir().join("report-screenshot.png"));
    let (width, height, rgb) = decode_rgb(&shot)?;
    if (width, height) != WINDOW {
        return Err(format!(
            "screenshot is {width}x{height}, expected {}x{}",
            WINDOW.0, WINDOW.1
        ));
    }
    for (name, colour, size) in [("blue", BLUE, BLUE_SIZE), ("orange", ORANGE, ORANGE_SIZE)] {
        let near = rgb
            .chunks_exact(3)
            .filter(|p| p.iter().zip(colour).all(|(&a, b)| a.abs_diff(b) <= 12))
            .count();
        let area = (size.0 * size.1) as usize;
        // Most of the image (scaling or colour management may touch its edges), and not much
        // more (nothing else on the page has that colour).
        if near < area * 9 / 10 || near > area * 11 / 10 {
            return Err(format!(
                "the {name} figure ({}x{} = {area} px of {colour:?}) shows as {near} px near that colour \
                 in the screenshot (kept in {})",
                size.0,
                size.1,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// A PNG as 8-bit RGB: (width, height, pixels).
fn decode_rgb(path: &Path) -> Result<(u32, u32, Vec<u8>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("no screenshot at {}: {e}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| format!("screenshot: {e}"))?;
    let size = reader.output_buffer_size().ok_or("screenshot too large")?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("screenshot: {e}"))?;
    buf.truncate(frame.buffer_size());
    let stride = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(format!("screenshot has colour type {other:?}")),
    };
    let rgb = buf
        .chunks_exact(stride)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    Ok((frame.width, frame.height, rgb))
}

/// A real run's report: a one-lap EM on a small ring seen through random projections (as
/// examples/em_from_code.rs, smaller), written by the engine itself; every figure it names
/// renders, and the screenshot shows the plots' blue (the samples' colour) over a good area.
fn real_run_report(browser: &Path, dir: &Path) -> Result<(), String> {
    use emprior::em::{run_vectors, Config};
    use emprior::io::write_npy_f32;
    let (n, d) = (512usize, 2usize);
    let x: Vec<f32> = (0..n)
        .flat_map(|i| {
            let a = i as f32 / n as f32 * std::f32::consts::TAU;
            [a.cos(), a.sin()]
        })
        .collect();
    let a: Vec<f32> = (0..n)
        .flat_map(|i| {
            let t = i as f32 * 2.399;
            [t.cos(), t.sin()]
        })
        .collect();
    let y: Vec<f32> = (0..n)
        .map(|i| a[2 * i] * x[2 * i] + a[2 * i + 1] * x[2 * i + 1])
        .collect();
    let err = |e: emprior::Error| e.to_string();
    write_npy_f32(&dir.join("y.npy"), &[n, 1], &y).map_err(err)?;
    write_npy_f32(&dir.join("a.npy"), &[n, 1, d], &a).map_err(err)?;
    write_npy_f32(&dir.join("x.npy"), &[n, d], &x).map_err(err)?;
    let mut cfg = Config::preset("vectors", "quick").map_err(err)?;
    let path = |f: &str| dir.join(f).display().to_string();
    for set in [
        format!("obs={}", path("y.npy")),
        format!("operator={}", path("a.npy")),
        format!("truth={}", path("x.npy")),
        "sigma_y=0.05".into(),
        "laps=1".into(),
        "init_rounds=2".into(),
        "estep_steps=8".into(),
        "mstep_steps=50".into(),
        "hidden=32,32".into(),
        "eval_samples=128".into(),
    ] {
        cfg.set(&set).map_err(err)?;
    }
    let run = dir.join("run");
    run_vectors(&cfg, &run, &emprior::Device::Cpu, false).map_err(err)?;
    let html = run.join("report.html");
    run_browser(browser, dir, &["--dump-dom".into()], &file_url(&html), "dom.html")?;
    let dom = std::fs::read_to_string(dir.join("dom.html")).map_err(|e| e.to_string())?;
    // divergence.png and lap-001/pairs.png.
    if !dom.contains("data-rendered=\"2/2\"") {
        return Err(format!(
            "the run's report did not render both figures (kept in {})",
            dir.display()
        ));
    }
    let shot = dir.join("run-screenshot.png");
    let extra = [
        "--hide-scrollbars".to_string(),
        format!("--window-size={},{}", WINDOW.0, WINDOW.1),
        format!("--screenshot={}", shot.display()),
    ];
    run_browser(browser, dir, &extra, &file_url(&html), "run-screenshot.stdout")?;
    let _ = std::fs::copy(&shot, target_dir().join("report-run-screenshot.png"));
    let (_, _, rgb) = decode_rgb(&shot)?;
    let blue = rgb
        .chunks_exact(3)
        .filter(|p| p.iter().zip(BLUE).all(|(&a, b)| a.abs_diff(b) <= 40))
        .count();
    if blue < 500 {
        return Err(format!(
            "only {blue} pixels of the samples' blue in the screenshot of the run's report (kept in {})",
            dir.display()
        ));
    }
    Ok(())
}
