//! Progress bars, one per node, on a terminal; nothing otherwise (the log lines suffice).
//!
//! Log lines and bars share the terminal: [`ProgressWriter`] suspends the bars while a log
//! line is written, so neither garbles the other.

use std::collections::BTreeMap;
use std::io::Write;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bars of one run.
pub struct Progress {
    bars: BTreeMap<String, ProgressBar>,
}

impl Progress {
    /// One bar per node name, each of `total` subjects, drawn on `multi` when given.
    pub fn new(multi: Option<&MultiProgress>, nodes: &[String], total: u64) -> Progress {
        let Some(multi) = multi else {
            return Progress {
                bars: BTreeMap::new(),
            };
        };
        let width = nodes.iter().map(String::len).max().unwrap_or(4);
        let template = format!("{{prefix:>{width}}} [{{bar:32}}] {{pos}}/{{len}} {{msg}}");
        let style = ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bars = nodes
            .iter()
            .map(|name| {
                let bar = multi.add(ProgressBar::new(total).with_style(style.clone()));
                bar.set_prefix(name.clone());
                (name.clone(), bar)
            })
            .collect();
        Progress { bars }
    }

    /// Node `node` is done with `subject`.
    pub fn advance(&self, node: &str, subject: &str, failed: bool) {
        if let Some(bar) = self.bars.get(node) {
            bar.inc(1);
            let note = if failed {
                format!("{subject} (failed)")
            } else {
                subject.to_string()
            };
            bar.set_message(note);
        }
    }

    /// Leaves the bars drawn as they are.
    pub fn finish(&self) {
        for bar in self.bars.values() {
            bar.finish();
        }
    }
}

/// A `tracing` writer to stderr that keeps progress bars intact.
#[derive(Clone)]
pub struct ProgressWriter {
    multi: Option<MultiProgress>,
}

impl ProgressWriter {
    /// Writes through `multi` (suspending its bars) when given, else straight to stderr.
    pub fn new(multi: Option<MultiProgress>) -> ProgressWriter {
        ProgressWriter { multi }
    }

    /// A multi-bar that draws on stderr when it is a terminal, and nowhere otherwise.
    pub fn terminal_bars() -> Option<MultiProgress> {
        use std::io::IsTerminal;
        std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
    }
}

impl Write for ProgressWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.multi {
            Some(m) => m
                .suspend(|| std::io::stderr().write_all(buf))
                .map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ProgressWriter {
    type Writer = ProgressWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
