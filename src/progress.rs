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
