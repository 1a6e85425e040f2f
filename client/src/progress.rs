//! The progress bar the CLI draws on a terminal while the daemon scans or
//! restores: one line on stderr, redrawn in place, erased at the end. It
//! draws nothing when stderr is not a terminal or `--json` is given.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use snapback::ProgressFn;
use snapback::proto::ProgressReport;

const WIDTH: usize = 30;

pub struct Bar {
    /// Whether this bar draws at all.
    enabled: bool,
    /// Whether a line is on the screen that `finish` must erase.
    drawn: Arc<AtomicBool>,
}

impl Bar {
    /// A bar on stderr, drawn only when `wanted` and stderr is a terminal.
    pub fn for_stderr(wanted: bool) -> Bar {
        Bar { enabled: wanted && std::io::stderr().is_terminal(), drawn: Arc::new(AtomicBool::new(false)) }
    }

    /// The callback to give the client, when this bar draws.
    pub fn callback(&self) -> Option<ProgressFn> {
        if !self.enabled {
            return None;
        }
        let drawn = self.drawn.clone();
        Some(Box::new(move |report: &ProgressReport| {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\x1b[K", render(report));
            let _ = err.flush();
            drawn.store(true, Ordering::Relaxed);
        }))
    }

    /// Erases the bar, if one was drawn.
    pub fn finish(&self) {
        if self.drawn.swap(false, Ordering::Relaxed) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

/// Renders one progress line: a bar when the total is known, a count
/// otherwise.
pub fn render(r: &ProgressReport) -> String {
    match r.total {
        Some(total) if total > 0 => {
            let done = r.done.min(total);
            let filled = (done as u128 * WIDTH as u128 / total as u128) as usize;
            let percent = done as u128 * 100 / total as u128;
            format!(
                "{:<9} [{}{}] {percent:>3}% {done}/{total}",
                r.phase,
                "#".repeat(filled),
                " ".repeat(WIDTH - filled)
            )
        }
        _ => format!("{:<9} {} entries", r.phase, r.done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_bar_with_a_total_and_a_count_without() {
        let r = |done, total| ProgressReport { phase: "scanning".into(), done, total };
        assert_eq!(render(&r(5, Some(10))), format!("scanning  [{}{}]  50% 5/10", "#".repeat(15), " ".repeat(15)));
        assert_eq!(render(&r(12, Some(10))), format!("scanning  [{}] 100% 10/10", "#".repeat(30)));
        assert_eq!(render(&r(7, None)), "scanning  7 entries");
    }
}
