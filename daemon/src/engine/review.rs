//! Review: what changed between two states (`diff`), what one step
//! recorded against its parent (`diff` with `step`, which `show` uses),
//! and the timeline of steps (`log`).

use snapback::proto::{DiffDetail, LOG_LIMIT, LogEntry, LogReport, LogRequest};

use super::compare::{Comparing, Side};
use super::*;
use crate::catalogue::LogScope;

/// A log counts the lines of a step that changed at most this many paths;
/// past it (an install, a branch switch) the entry says how many paths
/// changed, and `show --stat` counts the lines.
const LOG_COUNT_LIMIT: u64 = 5_000;

/// A log entry with `stat` lists at most this many of its step's changes.
const LOG_STAT_LIMIT: usize = 1_000;

impl Engine {
    pub(super) fn diff(&self, peer: &Peer, req: DiffRequest) -> Result<DiffReport> {
        let from = self.checkpoint_ref(peer, &req.from)?;
        let conn = self.db()?;
        let sandbox = catalogue::sandbox_by_id(&conn, from.sandbox_id)?;
        let filter = rollback_filter(&sandbox, &req.paths)?;
        let store = self.store(&sandbox.store)?;
        let compare = |old, new| Comparing::new((peer, &*conn, sandbox.id), old, new, req.detail, self.diff_max_bytes);
        let stored = |seq| Side::Stored { store: &store, seq };
        let (from_id, to_id, compared) = match (req.step, &req.to) {
            (true, Some(_)) => {
                return Err(Error::InvalidRequest(
                    "a step is compared with its parent: give no second checkpoint".into(),
                ));
            }
            (true, None) => {
                let parent = catalogue::previous_checkpoint(&conn, sandbox.id, from.info.seq)?;
                let (old, new) = step_sides(&conn, sandbox.id, parent.as_ref(), from.info.seq)?;
                let before = parent.as_ref().map_or(Side::Empty, |p| stored(p.info.seq));
                let compared = compare(before, stored(from.info.seq)).stream(&old, &new, &filter)?;
                (parent.map(|p| p.info.id).unwrap_or_default(), Some(from.info.id), compared)
            }
            (false, Some(to_ref)) => {
                let to = self.checkpoint_ref(peer, to_ref)?;
                if to.sandbox_id != from.sandbox_id {
                    return Err(Error::InvalidRequest(format!(
                        "{} and {} belong to different sandboxes",
                        from.info.id, to.info.id
                    )));
                }
                let (a, b) = (from.info.seq, to.info.seq);
                let (old, new) = match a.cmp(&b) {
                    std::cmp::Ordering::Equal => Default::default(),
                    std::cmp::Ordering::Less => catalogue::rows_between(&conn, sandbox.id, a, b)?,
                    std::cmp::Ordering::Greater => {
                        let (at_b, at_a) = catalogue::rows_between(&conn, sandbox.id, b, a)?;
                        (at_a, at_b)
                    }
                };
                let compared = compare(stored(a), stored(b)).stream(&old, &new, &filter)?;
                (from.info.id, Some(to.info.id), compared)
            }
            (false, None) => {
                let live = self.live_state(&conn, &sandbox)?;
                let then = catalogue::rows_at(&conn, sandbox.id, from.info.seq)?;
                let (old, new) = differences(&then, &live);
                let root = self.open_root(&sandbox)?;
                let now = Side::Live { root: root.as_fd(), rows: &live };
                let compared = compare(stored(from.info.seq), now).stream(&old, &new, &filter)?;
                (from.info.id, None, compared)
            }
        };
        Ok(DiffReport {
            from: from_id,
            to: to_id,
            changes: compared.changes,
            patch: compared.patch,
            total: compared.total,
        })
    }

    pub(super) fn log(&self, peer: &Peer, req: LogRequest) -> Result<LogReport> {
        let conn = self.db()?;
        let sandbox = req.sandbox.as_deref().map(|s| self.sandbox_ref(&conn, peer, s)).transpose()?;
        let scope = LogScope {
            sandbox_id: sandbox.as_ref().map(|s| s.id),
            owner: (!peer.is_root()).then_some(peer.uid),
            plan: req.plan.as_deref(),
        };
        let limit = Some(req.limit.unwrap_or(LOG_LIMIT)).filter(|&n| n > 0);
        let (shown, total) = catalogue::recent_checkpoints(&conn, scope, limit)?;
        let more = total.saturating_sub(shown.len() as u64);
        let mut stores: HashMap<i64, Arc<Store>> = HashMap::new();
        let mut entries = Vec::with_capacity(shown.len());
        for c in shown {
            let store = match stores.get(&c.sandbox_id) {
                Some(s) => s.clone(),
                None => {
                    let sb = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
                    let s = self.store(&sb.store)?;
                    stores.insert(c.sandbox_id, s.clone());
                    s
                }
            };
            entries.push(self.log_entry(&conn, peer, &store, c, req.stat)?);
        }
        Ok(LogReport { entries, more })
    }

    /// One checkpoint of the log, with its step's line counts.
    fn log_entry(&self, conn: &Connection, peer: &Peer, store: &Store, c: Checkpoint, stat: bool) -> Result<LogEntry> {
        let parent = catalogue::previous_checkpoint(conn, c.sandbox_id, c.info.seq)?;
        let pre = parent.as_ref().filter(|p| one_call(&p.info, &c.info)).map(|p| p.info.id.clone());
        let mut entry = LogEntry {
            restore: restore_of(&c.info),
            pre,
            total: None,
            changes: Vec::new(),
            more_changes: 0,
            checkpoint: c.info,
        };
        if entry.checkpoint.changed > LOG_COUNT_LIMIT {
            return Ok(entry);
        }
        let (old, new) = step_sides(conn, c.sandbox_id, parent.as_ref(), entry.checkpoint.seq)?;
        let before = parent.as_ref().map_or(Side::Empty, |p| Side::Stored { store, seq: p.info.seq });
        let after = Side::Stored { store, seq: entry.checkpoint.seq };
        let compare = Comparing::new((peer, conn, c.sandbox_id), before, after, DiffDetail::Stat, self.diff_max_bytes);
        let (mut changes, total) = compare.collect(&old, &new)?;
        entry.total = Some(total);
        if stat {
            entry.more_changes = changes.len().saturating_sub(LOG_STAT_LIMIT) as u64;
            changes.truncate(LOG_STAT_LIMIT);
            entry.changes = changes;
        }
        Ok(entry)
    }
}

/// The versions a step changed: those of its parent (none for a first
/// checkpoint) and its own.
pub(super) fn step_sides(
    conn: &Connection,
    sandbox_id: i64,
    parent: Option<&Checkpoint>,
    seq: u64,
) -> Result<(Manifest, Manifest)> {
    Ok(match parent {
        Some(p) => catalogue::rows_between(conn, sandbox_id, p.info.seq, seq)?,
        None => (Manifest::default(), catalogue::rows_at(conn, sandbox_id, seq)?),
    })
}

/// For a safety or restore checkpoint: the restore it belongs to, from the
/// reason the daemon gave it (`before rollback to X`, `rollback to X,
/// after S`).
fn restore_of(c: &CheckpointInfo) -> Option<String> {
    let reason = c.reason.as_deref()?;
    match c.kind {
        CheckpointKind::Safety => Some(reason.strip_prefix("before ").unwrap_or(reason).to_owned()),
        CheckpointKind::Restore => Some(reason.split(", after ").next().unwrap_or(reason).to_owned()),
        _ => None,
    }
}

/// Whether `pre` and `post` were taken before and after one tool call:
/// the same `tool_use_id` label, or, for agents that send none, the same
/// tool and reason with a "before" and an "after" phase.
fn one_call(pre: &CheckpointInfo, post: &CheckpointInfo) -> bool {
    let phase = |c: &CheckpointInfo| c.phase.as_deref().and_then(before_call);
    if pre.kind != CheckpointKind::Tool || post.kind != CheckpointKind::Tool {
        return false;
    }
    if phase(pre) != Some(true) || phase(post) != Some(false) {
        return false;
    }
    match (pre.labels.get("tool_use_id"), post.labels.get("tool_use_id")) {
        (Some(a), Some(b)) => a == b,
        (None, None) => pre.tool == post.tool && pre.reason == post.reason,
        _ => false,
    }
}

/// Whether a hook's phase comes before a tool call (`Some(true)`) or after
/// it (`Some(false)`), by the event names of the agents that send them.
fn before_call(phase: &str) -> Option<bool> {
    match phase {
        "PreToolUse" | "BeforeTool" | "pre" | "beforeShellExecution" | "beforeMCPExecution" => Some(true),
        "PostToolUse" | "AfterTool" | "post" | "afterShellExecution" | "afterMCPExecution" | "afterFileEdit" => {
            Some(false)
        }
        _ => None,
    }
}
