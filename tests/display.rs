//! The terminal display, driven through a pty and read back as a terminal shows it (the
//! vt100 crate plays the terminal). Its final screen is compared with a golden file, times,
//! sizes and digests masked: finished stages folded into one line each, no internal counter
//! (chunks, segments, reuse), and the summary. `NO_COLOR` leaves no color on it, and a
//! narrow terminal gets its lines cut, not wrapped. `UPDATE_GOLDEN=1` writes the golden
//! files anew.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const BUILDFILE: &str = "FROM busybox:test AS build\n\
    RUN echo \"made-$((1+1))\" > /out\n\
    COPY a.txt /a.txt\n\
    FROM busybox:test\n\
    COPY --from=build /out /out\n\
    COPY b.txt /b.txt\n";

/// Run `cmd` with a pty of `cols` columns as its stdin and stderr (its stdout, the digest,
/// is a pipe); returns every byte it wrote on the terminal, and whether it succeeded.
fn on_terminal(cmd: &mut Command, cols: u16) -> (Vec<u8>, bool) {
    let (mut child, mut master) = spawn_on_pty(cmd, cols, Some(Stdio::piped()));
    let mut shown = Vec::new();
    let mut buf = [0u8; 65536];
    // Ends with EIO once the build and all it started are gone.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    let mut digest = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut digest).unwrap();
    }
    let ok = child.wait().unwrap().success();
    assert!(!ok || digest.starts_with("sha256:"), "{digest}");
    (shown, ok)
}

/// The rows a terminal of `cols` columns shows after `bytes`.
fn screen(bytes: &[u8], cols: u16) -> String {
    let mut parser = vt100::Parser::new(60, cols, 0);
    parser.process(bytes);
    let rows: Vec<String> = parser.screen().rows(0, cols).collect();
    rows.join("\n")
}

/// Times, sizes and digests masked; trailing blanks dropped.
fn masked(screen: &str) -> String {
    let lines: Vec<String> = screen.lines().map(mask_line).collect();
    lines.join("\n").trim_end().to_string() + "\n"
}

fn mask_line(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    // A step's number depends on which stage started first.
    if let Some(tail) = line.strip_prefix('#') {
        let n = tail.bytes().take_while(u8::is_ascii_digit).count();
        if n > 0 {
            out.push_str("#<n>");
            rest = &tail[n..];
        }
    }
    while let Some(c) = rest.chars().next() {
        if let Some(tail) = rest.strip_prefix("sha256:") {
            let hex = tail.bytes().take_while(u8::is_ascii_hexdigit).count();
            out.push_str("sha256:<digest>");
            rest = &tail[hex..];
            continue;
        }
        if c.is_ascii_digit() {
            // A number with its unit (0.3s, 729 B, 1.2 KiB) is masked; one without is kept.
            let n = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let after = &rest[n..];
            let unit = [" B", " KiB", " MiB", " GiB", "s"].into_iter().find(|u| {
                after
                    .strip_prefix(u)
                    .is_some_and(|t| t.is_empty() || t.starts_with([' ', ',', '…']))
            });
            match unit {
                Some(u) => {
                    out.push_str(if u == "s" { "<t>s" } else { "<size>" });
                    rest = &after[u.len()..];
                }
                // Cut at the width: a time or size whose unit is gone.
                None if after.starts_with('…') => {
                    out.push_str("<cut>");
                    rest = after;
                }
                None => {
                    out.push_str(&rest[..n]);
                    rest = after;
                }
            }
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.trim_end().to_string()
}

fn golden(name: &str, got: &str) {
    let path = testdata("golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "the display differs from {}", path.display());
}

fn build_on_terminal(root: &Path, ctx: &Path, cols: u16, color: bool) -> (Vec<u8>, bool) {
    let mut cmd = builder();
    cmd.args(["build", "-t", "app:golden", "--root"])
        .arg(root)
        .arg(ctx)
        .env("TERM", "xterm");
    if color {
        cmd.env_remove("NO_COLOR");
    } else {
        cmd.env("NO_COLOR", "1");
    }
    on_terminal(&mut cmd, cols)
}

fn has_color(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.split("\x1b[").skip(1).any(|seq| {
        let params = seq
            .find(|c: char| !(c.is_ascii_digit() || c == ';'))
            .map(|end| (&seq[..end], seq[end..].starts_with('m')));
        matches!(params, Some((p, true)) if !p.is_empty() && p != "0")
    })
}

#[test]
fn the_terminal_display_folds_stages_and_ends_with_a_summary() {
    let dir = busybox_dir();
    let root = dir.path().join("root");
    let ctx = dir.path().join("ctx");
    write(&ctx.join("Buildfile"), BUILDFILE);
    write(&ctx.join("a.txt"), "a");
    write(&ctx.join("b.txt"), "b");

    // Cold, without color.
    let (bytes, ok) = build_on_terminal(&root, &ctx, 100, false);
    let shown = screen(&bytes, 100);
    assert!(ok, "{shown}");
    assert!(
        !has_color(&bytes),
        "NO_COLOR: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    for counter in ["chunks", "segments", "reused", "compressed"] {
        assert!(!shown.contains(counter), "no internal counter: {shown}");
    }
    golden("tty-cold.txt", &masked(&shown));

    // An edit, on a narrow terminal: the miss is named, and no line wraps.
    write(&ctx.join("b.txt"), "b, edited");
    let (bytes, ok) = build_on_terminal(&root, &ctx, 40, false);
    let shown = screen(&bytes, 40);
    assert!(ok, "{shown}");
    // Long lines are cut, not wrapped: the golden rows below show no continuation row.
    assert!(shown.contains('…'), "{shown}");
    golden("tty-edit-narrow.txt", &masked(&shown));

    // With colors allowed, there are some: the check above can fail.
    let (bytes, ok) = build_on_terminal(&root, &ctx, 100, true);
    assert!(ok);
    assert!(has_color(&bytes));
}
