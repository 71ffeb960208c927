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
    /// An internal counter of step `index` (chunks, segments, reuse): shown by `--progress
    /// plain --debug` and json only.
    fn detail(&self, _index: usize, _line: &str) {}
    /// Bytes moving: `done` of `total` of `what` for step `index` (0: the build's own, a
    /// pull or a push).
    fn bytes(&self, _index: usize, _what: &str, _done: u64, _total: Option<u64>) {}
    /// Every step of the stage `stage` (as [`Reporter::step`] names it) is done.
    fn stage_done(&self, _stage: &str) {}
    /// The build is done.
    fn summary(&self, _summary: &Summary) {}
}

/// The bytes of several transfers of one kind (the blobs of a pull), summed for one
/// display.
#[derive(Default)]
pub struct Totals {
    by_kind: Mutex<std::collections::BTreeMap<String, TransferBytes>>,
}

/// Each transfer's (done, total) bytes, by its id.
type TransferBytes = std::collections::BTreeMap<String, (u64, u64)>;

impl Totals {
    /// Transfer `id` of `kind` is at `done` of `total`: returns the kind's sums.
    pub fn update(&self, kind: &str, id: &str, done: u64, total: u64) -> (u64, u64) {
        let Ok(mut all) = self.by_kind.lock() else {
            return (done, total);
        };
        let one = all.entry(kind.to_string()).or_default();
        one.insert(id.to_string(), (done, total));
        one.values()
            .fold((0, 0), |(d, t), (dd, tt)| (d + dd, t + tt))
    }
}

/// What a build made and what it took, as its display ends.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub digest: String,
    pub names: Vec<String>,
    /// The image's layers and manifest, as stored (compressed).
    pub image_bytes: u64,
    pub steps_run: usize,
    pub steps_cached: usize,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    pub seconds: f64,
}

impl Summary {
    /// The summary's lines, as a terminal shows them.
    pub fn lines(&self) -> Vec<String> {
        let built = if self.names.is_empty() {
            "built".to_string()
        } else {
            format!("built {}", self.names.join(", "))
        };
        vec![
            built,
            format!("  image {}", self.digest),
            format!(
                "  {} stored, {} built, {} from the cache, {} pulled, {} pushed, {:.1}s",
                indicatif::HumanBytes(self.image_bytes),
                count(self.steps_run, "layer"),
                self.steps_cached,
                indicatif::HumanBytes(self.bytes_pulled),
                indicatif::HumanBytes(self.bytes_pushed),
                self.seconds
            ),
        ]
    }
}

/// `#3 [stage-0 2/5] COPY . /app` lines on stderr.
pub struct PlainReporter {
    out: Mutex<std::io::Stderr>,
    /// `--debug`: internal counters too.
    debug: bool,
}

impl PlainReporter {
    pub fn new() -> Self {
        PlainReporter {
            out: Mutex::new(std::io::stderr()),
            debug: false,
        }
    }

    /// With internal counters (`--debug`).
    pub fn debug() -> Self {
        PlainReporter {
            debug: true,
            ..PlainReporter::new()
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
    fn detail(&self, index: usize, line: &str) {
        if self.debug {
            self.log(index, line);
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
    fn detail(&self, index: usize, line: &str) {
        eprintln!(
            "{}",
            serde_json::json!({"event": "debug", "index": index, "line": line})
        );
    }
    fn bytes(&self, index: usize, what: &str, done: u64, total: Option<u64>) {
        // Only a transfer's end: a progress event per read would flood the stream.
        if total == Some(done) {
            eprintln!(
                "{}",
                serde_json::json!({"event": "bytes", "index": index, "what": what, "bytes": done})
            );
        }
    }
    fn stage_done(&self, stage: &str) {
        eprintln!("{}", serde_json::json!({"event": "stage", "stage": stage}));
    }
    fn summary(&self, summary: &Summary) {
        let mut v = serde_json::json!(summary);
        v["event"] = "summary".into();
        eprintln!("{}", v);
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

/// A live display for terminals. A running step is a spinner line with its time (and the
/// bytes it moves); a finished one shows its result; when a stage is done its lines fold
/// into one. Transfers of the build's own (pulls, pushes) are bars with size, rate and
/// time left. Step output and warnings scroll above, cut to the terminal's width (the
/// whole of it is in `--progress plain`). It ends with a summary. `NO_COLOR` (or
/// `TERM=dumb`) turns colors off.
pub struct TtyReporter {
    bars: indicatif::MultiProgress,
    state: Mutex<TtyState>,
    color: bool,
}

#[derive(Default)]
struct TtyState {
    steps: std::collections::BTreeMap<usize, StepLine>,
    transfers: std::collections::BTreeMap<String, indicatif::ProgressBar>,
}

struct StepLine {
    bar: indicatif::ProgressBar,
    stage: String,
    message: String,
    started: std::time::Instant,
    /// `Some(cached)` once done.
    finished: Option<bool>,
    /// When its first bytes moved.
    bytes_since: Option<std::time::Instant>,
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    format!("{} {}{}", n, thing, if n == 1 { "" } else { "s" })
}

/// Whether a terminal display may use colors: not with `NO_COLOR` set, nor on a dumb one.
pub fn colors_wanted() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// The columns of the terminal on stderr (80 when it says nothing).
fn terminal_width() -> usize {
    crate::worker::terminal::window_size(2).map_or(80, |ws| ws.ws_col as usize)
}

/// `line` cut to `width` columns (characters), with an ellipsis where it was cut.
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut out: String = line.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

impl TtyReporter {
    pub fn new() -> Self {
        TtyReporter {
            bars: indicatif::MultiProgress::with_draw_target(
                indicatif::ProgressDrawTarget::stderr(),
            ),
            state: Mutex::new(TtyState::default()),
            color: colors_wanted(),
        }
    }

    fn style(&self, template: &str, plain: &str) -> indicatif::ProgressStyle {
        let t = if self.color { template } else { plain };
        indicatif::ProgressStyle::with_template(t)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{}m{}\x1b[0m", code, text)
        } else {
            text.to_string()
        }
    }

    fn print(&self, line: &str) {
        let _ = self.bars.println(fit(line, terminal_width()));
    }

    /// A line that starts with `mark`, painted with `code`: cut to width before painting.
    fn print_marked(&self, mark: &str, code: &str, text: &str) {
        let line = fit(&format!("{} {}", mark, text), terminal_width());
        let line = match line.strip_prefix(mark) {
            Some(rest) => format!("{}{}", self.paint(code, mark), rest),
            None => line,
        };
        let _ = self.bars.println(line);
    }
}

impl Default for TtyReporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TtyReporter {
    /// A build that failed leaves steps running: they stop drawing, shown as they ended, so
    /// that nothing redraws over what comes next (the error, a debug shell).
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            for (_, l) in std::mem::take(&mut s.steps) {
                if l.finished.is_none() {
                    l.bar.set_style(self.style("  {wide_msg}", "  {wide_msg}"));
                    l.bar.abandon_with_message(format!("{} ERROR", l.message));
                }
            }
            for (_, b) in std::mem::take(&mut s.transfers) {
                b.abandon();
            }
        }
    }
}

impl Reporter for TtyReporter {
    fn step(&self, index: usize, total: usize, stage: &str, text: &str) {
        let bar = self.bars.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(self.style(
            "{spinner:.cyan} {wide_msg} {elapsed:>4}",
            "{spinner} {wide_msg} {elapsed:>4}",
        ));
        let message = format!(
            "[{} {}/{}] {}",
            stage,
            index,
            total,
            crate::text::abbreviate(text, 200)
        );
        bar.set_message(message.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut s) = self.state.lock() {
            s.steps.insert(
                index,
                StepLine {
                    bar,
                    stage: stage.to_string(),
                    message,
                    started: std::time::Instant::now(),
                    finished: None,
                    bytes_since: None,
                },
            );
        }
    }

    fn done(&self, index: usize, elapsed: Duration, cached: bool) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let Some(line) = s.steps.get_mut(&index) else {
            return;
        };
        let status = if cached {
            self.paint("34", "CACHED")
        } else {
            format!("{:.1}s", elapsed.as_secs_f64())
        };
        line.bar
            .set_style(self.style("  {wide_msg}", "  {wide_msg}"));
        line.bar
            .finish_with_message(format!("{} {}", line.message, status));
        line.finished = Some(cached);
    }

    fn log(&self, index: usize, line: &str) {
        self.print(&format!("#{} {}", index, line));
    }

    fn warn(&self, msg: &str) {
        self.print_marked("warning:", "33", msg);
    }

    fn bytes(&self, index: usize, what: &str, done: u64, total: Option<u64>) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if let Some(line) = s.steps.get_mut(&index).filter(|l| l.finished.is_none()) {
            let since = *line.bytes_since.get_or_insert_with(std::time::Instant::now);
            let rate = done as f64 / since.elapsed().as_secs_f64().max(0.001);
            let size = match total {
                Some(t) => format!(
                    "{} / {}",
                    indicatif::HumanBytes(done),
                    indicatif::HumanBytes(t)
                ),
                None => indicatif::HumanBytes(done).to_string(),
            };
            line.bar.set_message(format!(
                "{} {} {} {}/s",
                line.message,
                what,
                size,
                indicatif::HumanBytes(rate as u64)
            ));
            return;
        }
        let bar = s.transfers.entry(what.to_string()).or_insert_with(|| {
            let bar = self.bars.add(indicatif::ProgressBar::new(total.unwrap_or(0)));
            bar.set_style(self.style(
                "{prefix:.cyan} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {wide_bar:.cyan/blue}",
                "{prefix} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {wide_bar}",
            ));
            bar.set_prefix(what.to_string());
            bar
        });
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
        if total == Some(done) {
            bar.finish_and_clear();
            s.transfers.remove(what);
        }
    }

    fn stage_done(&self, stage: &str) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let ours: Vec<usize> = s
            .steps
            .iter()
            .filter(|(_, l)| l.stage == stage && l.finished.is_some())
            .map(|(i, _)| *i)
            .collect();
        if ours.is_empty() {
            return;
        }
        let mut cached = 0;
        let mut started = std::time::Instant::now();
        for i in &ours {
            if let Some(l) = s.steps.remove(i) {
                cached += usize::from(l.finished == Some(true));
                started = started.min(l.started);
                l.bar.finish_and_clear();
                self.bars.remove(&l.bar);
            }
        }
        let line = format!(
            "[{}] {}, {} cached {:.1}s",
            stage,
            count(ours.len(), "instruction"),
            cached,
            started.elapsed().as_secs_f64()
        );
        drop(s);
        self.print_marked("✔", "32", &line);
    }

    fn summary(&self, summary: &Summary) {
        if let Ok(mut s) = self.state.lock() {
            for (_, l) in std::mem::take(&mut s.steps) {
                l.bar.finish_and_clear();
            }
            for (_, b) in std::mem::take(&mut s.transfers) {
                b.finish_and_clear();
            }
        }
        let lines = summary.lines();
        if let Some((first, rest)) = lines.split_first() {
            self.print_marked("✔", "1;32", first);
            for l in rest {
                self.print(l);
            }
        }
    }
}
