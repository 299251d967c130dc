//! Every subcommand and every argument of the `emprior` command line has help text. The CLI is
//! defined in the binary, so the test reads what the built binary prints: `emprior --help`
//! lists the subcommands, and `emprior <cmd> --help` (recursively) their arguments and options.

use std::process::Command;

/// The help `emprior <path...> --help` prints on stdout.
fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_emprior"))
        .args(path)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "emprior {} --help failed: {}",
        path.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One entry of a help section: its name as printed ("--data <DATA>", "<EXPERIMENT>", "train")
/// and its help text with clap's own annotations ("[default: ...]" and the like) removed.
#[derive(Debug)]
struct Entry {
    section: String,
    name: String,
    help: String,
}

/// Entries start this little indented (2 columns, 6 for a long option without a short one);
/// help wrapped onto later lines, or put under its entry when the help is long, is indented
/// deeper (10 columns and more).
const ENTRY_INDENT: usize = 8;

/// The annotations clap appends to a help text; an entry with only these has no help.
const ANNOTATIONS: [&str; 5] = [
    "[default:",
    "[possible values:",
    "[env:",
    "[aliases:",
    "[short aliases:",
];

fn strip_annotations(text: &str) -> String {
    let mut text = text.to_string();
    for start in ANNOTATIONS {
        while let Some(i) = text.find(start) {
            let end = text[i..].find(']').map_or(text.len(), |j| i + j + 1);
            text.replace_range(i..end, "");
        }
    }
    text.trim().to_string()
}

/// The entries of every section after the usage line ("Commands:", "Arguments:", "Options:"
/// and any custom heading). A section runs to the next unindented line; blank lines (clap puts
/// them between entries when some help is long) and whitespace-only lines (an empty help put
/// under its entry) do not end it.
fn entries(text: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    let mut section: Option<String> = None;
    let mut after_usage = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            if trimmed.starts_with("Usage:") {
                after_usage = true;
                section = None;
            } else if after_usage && trimmed.ends_with(':') {
                section = Some(trimmed.trim_end_matches(':').to_string());
            } else {
                section = None;
            }
            continue;
        }
        let Some(section) = &section else { continue };
        if indent < ENTRY_INDENT {
            // "--name <VALUE>" then two or more spaces before the help on the same line.
            let (name, rest) = match trimmed.find("  ") {
                Some(i) => (&trimmed[..i], &trimmed[i..]),
                None => (trimmed, ""),
            };
            out.push(Entry {
                section: section.clone(),
                name: name.to_string(),
                help: rest.trim().to_string(),
            });
        } else if let Some(last) = out.last_mut() {
            // A continuation: the rest of the previous entry's help.
            if !last.help.is_empty() {
                last.help.push(' ');
            }
            last.help.push_str(trimmed);
        }
    }
    for e in &mut out {
        e.help = strip_annotations(&e.help);
    }
    out
}

/// clap's own entries, which document themselves.
fn is_clap_builtin(e: &Entry) -> bool {
    matches!(
        e.name.as_str(),
        "-h, --help" | "-V, --version" | "--help" | "--version"
    ) || (e.section == "Commands" && e.name == "help")
}

/// The entries without help under `emprior <path...>` and its subcommands, as
/// "emprior train: --data <DATA>", and the subcommands visited.
fn missing_help(path: &[&str], missing: &mut Vec<String>, visited: &mut Vec<String>) {
    let text = help(path);
    let here = std::iter::once("emprior")
        .chain(path.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    visited.push(here.clone());
    // The about line comes first; without one the help starts with the usage.
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if first.starts_with("Usage:") {
        missing.push(format!("{here}: no about line"));
    }
    for e in entries(&text) {
        if is_clap_builtin(&e) {
            continue;
        }
        if e.help.is_empty() {
            missing.push(format!("{here}: {} {}", e.section, e.name));
        }
        if e.section == "Commands" {
            let mut sub = path.to_vec();
            sub.push(&e.name);
            missing_help(&sub, missing, visited);
        }
    }
}

#[test]
fn every_subcommand_and_argument_has_help() {
    let (mut missing, mut visited) = (Vec::new(), Vec::new());
    missing_help(&[], &mut missing, &mut visited);
    // The walk saw the command tree (a parser that found nothing would pass vacuously).
    for cmd in [
        "train",
        "sample",
        "posterior",
        "em",
        "info",
        "model",
        "bench",
        "keys",
    ] {
        assert!(
            visited.contains(&format!("emprior {cmd}")),
            "`emprior --help` did not list {cmd}: visited {visited:?}"
        );
    }
    assert!(
        missing.is_empty(),
        "{} entries without help text:\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}

#[test]
fn every_option_of_the_data_commands_is_found() {
    // The parser sees each option of `posterior` (whose help clap lays out under each option,
    // the long layout), with its text.
    let e = entries(&help(&["posterior"]));
    for name in [
        "--obs <OBS>",
        "--out <OUT>",
        "--mask <MASK>",
        "--dps-zeta <DPS_ZETA>",
        "--device <DEVICE>",
    ] {
        let found = e.iter().find(|e| e.name == name);
        assert!(found.is_some_and(|e| !e.help.is_empty()), "{name}: {found:?}");
    }
}

#[test]
fn the_parser_finds_missing_help_in_both_layouts() {
    // The short layout: help on the option's line, long help wrapped with deep indentation.
    let short = "About\n\nUsage: emprior x [OPTIONS] <A>\n\nArguments:\n  <A>  \n\nOptions:\n      \
                 --data <DATA>        \n      --steps <STEPS>      [default: 10]\n      --lr <LR>            \
                 The rate,\n                           wrapped\n      --quick              \n  -h, --help           \
                 Print help\n";
    let e = entries(short);
    let names: Vec<_> = e
        .iter()
        .filter(|e| e.help.is_empty())
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["<A>", "--data <DATA>", "--steps <STEPS>", "--quick"]);
    assert_eq!(
        e.iter().find(|e| e.name == "--lr <LR>").unwrap().help,
        "The rate, wrapped"
    );

    // The long layout: help on the lines under each option; an empty help is a blank line.
    let long = "About\n\nUsage: emprior x [OPTIONS]\n\nOptions:\n      --obs <OBS>\n          Observations\n      \
                --out <OUT>\n          \n      --steps <STEPS>\n          [default: 256]\n\n      \
                --seed <SEED>\n          The seed\n\n          More about it\n  -h, --help\n          Print help\n";
    let e = entries(long);
    let names: Vec<_> = e
        .iter()
        .filter(|e| e.help.is_empty())
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["--out <OUT>", "--steps <STEPS>"]);
    assert_eq!(
        e.iter().find(|e| e.name == "--seed <SEED>").unwrap().help,
        "The seed More about it"
    );

    // A subcommand listed without its about line.
    let top = "About\n\nUsage: emprior <COMMAND>\n\nCommands:\n  info  Print the build\n  keys\n  help  \
               Print this message\n";
    let e = entries(top);
    let names: Vec<_> = e
        .iter()
        .filter(|e| e.help.is_empty())
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["keys"]);
}
