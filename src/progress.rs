//! Progress reporting. Library code reports through [`Reporter`]; only the CLI picks a
//! renderer (plain prefixed lines, JSON events, or nothing).

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Receives build events.
pub trait Reporter: Send + Sync {
    /// A step starts: `index` of `total`, in stage `stage`, with its text.
    fn step(&self, index: usize, total: usize, stage: &str, text: &str);
    /// The current step finished.
    fn done(&self, index: usize, elapsed: Duration, cached: bool);
    /// A line of output or information.
    fn log(&self, index: usize, line: &str);
    /// A warning the user should see.
    fn warn(&self, msg: &str);
    /// Why the current step missed the cache (it runs), against the last build of the same
    /// build file and target.
    fn miss(&self, index: usize, reason: &str) {
        self.log(index, &format!("cache miss: {}", reason));
    }
    /// A build check's finding in `file`.
    fn check(&self, file: &str, f: &crate::frontend::checks::Finding) {
        self.warn(&f.line_in(file));
    }
}

/// `#3 [stage-0 2/5] COPY . /app` lines on stderr.
pub struct PlainReporter {
    out: Mutex<std::io::Stderr>,
}

impl PlainReporter {
    pub fn new() -> Self {
        PlainReporter {
            out: Mutex::new(std::io::stderr()),
        }
    }
}

impl Default for PlainReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for PlainReporter {
    fn step(&self, index: usize, total: usize, stage: &str, text: &str) {
        if let Ok(mut o) = self.out.lock() {
            let text = crate::text::abbreviate(text, 300);
            let _ = writeln!(o, "#{} [{} {}/{}] {}", index, stage, index, total, text);
        }
    }
    fn done(&self, index: usize, elapsed: Duration, cached: bool) {
        if let Ok(mut o) = self.out.lock() {
            let _ = writeln!(
                o,
                "#{} {} {:.2}s",
                index,
                if cached { "CACHED" } else { "DONE" },
                elapsed.as_secs_f64()
            );
        }
    }
    fn log(&self, index: usize, line: &str) {
        if let Ok(mut o) = self.out.lock() {
            let _ = writeln!(o, "#{} {}", index, line);
        }
    }
    fn warn(&self, msg: &str) {
        if let Ok(mut o) = self.out.lock() {
            let _ = writeln!(o, "warning: {}", msg);
        }
    }
}

/// One JSON object per event on stderr.
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn step(&self, index: usize, total: usize, stage: &str, text: &str) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "step", "index": index, "total": total, "stage": stage, "text": text})
        );
    }
    fn done(&self, index: usize, elapsed: Duration, cached: bool) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "done", "index": index, "seconds": elapsed.as_secs_f64(), "cached": cached})
        );
    }
    fn log(&self, index: usize, line: &str) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "log", "index": index, "line": line})
        );
    }
    fn warn(&self, msg: &str) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "warning", "message": msg})
        );
    }
    fn miss(&self, index: usize, reason: &str) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "miss", "index": index, "miss": reason})
        );
    }
    fn check(&self, file: &str, f: &crate::frontend::checks::Finding) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "check", "rule": f.rule, "file": file,
                "line": f.line, "column": f.column, "message": f.message})
        );
    }
}

/// Only warnings.
pub struct QuietReporter;

impl Reporter for QuietReporter {
    fn step(&self, _: usize, _: usize, _: &str, _: &str) {}
    fn done(&self, _: usize, _: Duration, _: bool) {}
    fn log(&self, _: usize, _: &str) {}
    fn warn(&self, msg: &str) {
        eprintln!("warning: {}", msg);
    }
}

/// A live display for terminals: one spinner line per running step with its elapsed time;
/// step output scrolls above it; finished steps stay as one line each.
pub struct TtyReporter {
    bars: indicatif::MultiProgress,
    current: Mutex<std::collections::BTreeMap<usize, indicatif::ProgressBar>>,
    /// Finished bars stay on screen only while they are alive.
    finished: Mutex<Vec<indicatif::ProgressBar>>,
}

impl TtyReporter {
    pub fn new() -> Self {
        TtyReporter {
            bars: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::stderr(),
            ),
            current: Mutex::new(Default::default()),
            finished: Mutex::new(Vec::new()),
        }
    }
}

impl Default for TtyReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter for TtyReporter {
    fn step(&self, index: usize, total: usize, stage: &str, text: &str) {
        let pb = self.bars.add(indicatif::ProgressBar::new_spinner());
        let text = &*crate::text::abbreviate(text, 200);
        let style = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed:>4}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        pb.set_style(style);
        pb.set_message(format!("[{} {}/{}] {}", stage, index, total, text));
        pb.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut c) = self.current.lock() {
            c.insert(index, pb);
        }
    }
    fn done(&self, index: usize, elapsed: Duration, cached: bool) {
        if let Some(pb) = self.current.lock().ok().and_then(|mut c| c.remove(&index)) {
            let status = if cached {
                "CACHED".to_string()
            } else {
                format!("{:.1}s", elapsed.as_secs_f64())
            };
            pb.set_style(
                indicatif::ProgressStyle::with_template("  {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            pb.finish_with_message(format!("{} {}", pb.message(), status));
            if let Ok(mut f) = self.finished.lock() {
                f.push(pb);
            }
        }
    }
    fn log(&self, index: usize, line: &str) {
        let _ = self.bars.println(format!("#{} {}", index, line));
    }
    fn warn(&self, msg: &str) {
        let _ = self.bars.println(format!("warning: {}", msg));
    }
}
