//! The CLI's side of review: `diff`, `show --stat/--patch`, `log`, and
//! the previews of dry runs, printed for a person. `--json` prints the
//! answers themselves (see `main.rs`).

use std::io::Write;

use snapback::proto::{Change, ChangeKind, CheckpointKind, DiffReport, DiffTotal, FileStat, LogEntry};
use snapback::utc;

/// Writes raw bytes (a piece of a patch) on stdout; a closed stdout is a
/// quiet exit, as for [`outln`].
pub fn out_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("snapback: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// One line of the default diff: a mark and the path, and for a change of
/// metadata alone, what changed.
pub fn print_change(c: &Change) {
    let mark = match c.change {
        ChangeKind::Added => "A",
        ChangeKind::Modified => "M",
        ChangeKind::Deleted => "D",
        ChangeKind::TypeChanged => "T",
    };
    if c.metadata_only() {
        let what: Vec<&str> = c.what.iter().map(|a| a.as_str()).collect();
        outln!("{mark}  {}  (metadata only: {})", c.path.display(), what.join(", "));
    } else {
        outln!("{mark}  {}", c.path.display());
    }
}

pub fn print_diff_summary(d: &DiffReport, changes: u64) {
    let to = d.to.clone().unwrap_or_else(|| "the live tree".into());
    let from = if d.from.is_empty() { "nothing" } else { &d.from };
    outln!("{changes} changes from {from} to {to}");
}

/// The widest a `--stat` line gets, as git's default.
const STAT_WIDTH: usize = 80;

/// `git diff --stat`: a line per file (directories have no lines, and are
/// left out) and the total.
pub fn print_stat(changes: &[Change], total: Option<&DiffTotal>, indent: &str) {
    let files: Vec<(&Change, &FileStat)> = changes.iter().filter_map(|c| c.stat.as_ref().map(|s| (c, s))).collect();
    let names: Vec<String> = files.iter().map(|(c, _)| c.path.display()).collect();
    let name_width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let most = files.iter().map(|(_, s)| s.added + s.removed).max().unwrap_or(0);
    let count_width = most.to_string().len();
    let room = STAT_WIDTH.saturating_sub(indent.len() + name_width + count_width + 4).max(10) as u64;
    let scale = |n: u64| match most > room {
        true if n > 0 => ((n * room) / most).max(1),
        _ => n,
    };
    for ((_, s), name) in files.iter().zip(&names) {
        let detail = if let Some(why) = &s.withheld {
            format!("withheld: {why}")
        } else if let Some(why) = &s.not_diffed {
            format!("not diffed: {why}")
        } else if s.binary {
            format!("Bin {} -> {} bytes", s.old_size, s.new_size)
        } else {
            let (plus, minus) = (scale(s.added) as usize, scale(s.removed) as usize);
            format!("{:>count_width$} {}{}", s.added + s.removed, "+".repeat(plus), "-".repeat(minus))
        };
        outln!("{indent}{name:<name_width$} | {}", detail.trim_end());
    }
    if let Some(t) = total {
        outln!("{indent}{}", total_line(t));
    }
}

/// `3 files changed, 10 insertions(+), 2 deletions(-)`, as git words it.
pub fn total_line(t: &DiffTotal) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!("{} changed", plural(t.files, "file", "files"));
    if t.added > 0 || t.files == 0 {
        line.push_str(&format!(", {}(+)", plural(t.added, "insertion", "insertions")));
    }
    if t.removed > 0 || t.files == 0 {
        line.push_str(&format!(", {}(-)", plural(t.removed, "deletion", "deletions")));
    }
    line
}

/// How many characters of an id the log shows: the 10 of its time and 6
/// random ones, which any command takes as a prefix.
const SHORT_ID: usize = 16;

/// `snapback log`: one line per step, newest first, with what it
/// changed; with `--stat`, its files below it. The checkpoints taken
/// before and after one tool call are one step: the one before is folded
/// into the one after, unless something changed between the two calls.
pub fn print_log(entries: &[LogEntry], more: u64) {
    if entries.is_empty() {
        outln!("no checkpoints");
    }
    let mut folded = None;
    for (i, e) in entries.iter().enumerate() {
        let c = &e.checkpoint;
        if folded.take() == Some(c.id.as_str()) && e.total.as_ref().is_some_and(|t| t.files == 0) {
            continue;
        }
        if e.pre.is_some() && entries.get(i + 1).is_some_and(|next| Some(&next.checkpoint.id) == e.pre.as_ref()) {
            folded = e.pre.as_deref();
        }
        let counts = match &e.total {
            Some(t) if t.files == 0 => "no change".to_owned(),
            Some(t) => format!("{} file{}, +{} -{}", t.files, if t.files == 1 { "" } else { "s" }, t.added, t.removed),
            None => format!("{} paths: snapback show {} --stat", c.changed, short(&c.id)),
        };
        let label = match c.kind {
            CheckpointKind::Tool => "tool",
            other => other.as_str(),
        };
        outln!("{}  {}  {label:<8} {}  ({counts})", short(&c.id), utc(c.created_unix_ms), step_name(e));
        if !e.changes.is_empty() {
            print_stat(&e.changes, None, "    ");
            if e.more_changes > 0 {
                outln!("    ... and {} more (snapback show {} --stat)", e.more_changes, short(&c.id));
            }
        }
    }
    if more > 0 {
        outln!("... {more} older checkpoints (snapback log -n 0 shows them all)");
    }
}

/// What a log entry's step was, in words: the tool call, or the restore a
/// checkpoint the daemon took belongs to.
fn step_name(e: &LogEntry) -> String {
    let c = &e.checkpoint;
    match (c.kind, &e.restore) {
        (CheckpointKind::Safety, Some(r)) => format!("before {r}"),
        (CheckpointKind::Restore, Some(r)) => format!("after {r}"),
        _ => {
            let phase = match (&e.pre, c.phase.as_deref()) {
                (Some(_), _) | (None, None) => String::new(),
                (None, Some(p)) => format!(" [{p}]"),
            };
            match (&c.tool, &c.reason) {
                (Some(t), Some(r)) => format!("{t}: {r}{phase}"),
                (Some(t), None) => format!("{t}{phase}"),
                (None, Some(r)) => format!("{r}{phase}"),
                (None, None) => format!("-{phase}"),
            }
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..SHORT_ID).unwrap_or(id)
}
