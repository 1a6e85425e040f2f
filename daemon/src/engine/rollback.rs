//! Restores: rollback, revert and undo, their plans, and applying a plan
//! (the `restore` checkpoint of the state it left: `record.rs`).

use super::*;

impl Engine {
    pub(super) fn rollback(&self, peer: &Peer, req: RollbackRequest) -> Result<RollbackReport> {
        let target = self.checkpoint_ref(peer, &req.checkpoint)?;
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox_by_id(&conn, peer, target.sandbox_id)?;
        let filter = rollback_filter(&sandbox, &req.paths)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        match req.dry_run {
            true => self.preview_restore(&mut conn, peer, &sandbox, &target, &filter),
            false => self.restore_to(&mut conn, Restoring::rollback(&sandbox, &target, &filter)),
        }
    }

    /// Brings a sandbox to `target` (within `filter`); the caller holds the
    /// sandbox's lock. Refused when the target belongs to an applied plan.
    /// Anything but a dry run is recorded as an intent first, so that a
    /// crash half way is finished at the next start.
    pub(super) fn restore_to(&self, conn: &mut Connection, to: Restoring<'_>) -> Result<RollbackReport> {
        let target = &self.restorable(conn, to.sandbox, to.target, to.filter)?;
        let (sandbox, filter) = (to.sandbox, to.filter);
        let intent = catalogue::begin_intent(conn, sandbox.id, to.kind, &target.info.id, filter, false, now_ms())?;
        let to = Restoring { target, ..to };
        let result = self.restore_intent(conn, &to, (intent, IntentEnd::WithTheRestore));
        self.close_intent(conn, intent, &result);
        result
    }

    /// Refuses a restore to `target` that must not run: the checkpoint is
    /// gone, broken, or part of an applied plan, or `filter` names what a
    /// rollback could do nothing with. Returns the checkpoint as it is now.
    pub(super) fn restorable(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
    ) -> Result<Checkpoint> {
        let target = still_there(conn, target)?;
        if let Some(plan) = &target.info.plan {
            refuse_if_applied(conn, plan)?;
        }
        refuse_if_broken(&target)?;
        self.check_filter(conn, sandbox, &target, filter)?;
        Ok(target)
    }

    /// Refuses a `--path` that a rollback could do nothing with, before
    /// anything is written: one that is excluded (a rollback never touches
    /// it), or that is neither in the target checkpoint nor in the live
    /// tree (a typo, most likely).
    pub(super) fn check_filter(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
    ) -> Result<()> {
        let excludes = Excludes::new(&sandbox.excludes)?;
        for path in filter.iter().filter(|p| !p.is_empty()) {
            let shown = capture::show(path);
            if excludes.covers(path) {
                return Err(Error::InvalidRequest(format!(
                    "{shown} is excluded from {}: a rollback never touches it",
                    sandbox.name
                )));
            }
            let root = self.open_root(sandbox)?;
            let live = sys::lstat_beneath(root.as_fd(), path).is_ok();
            if !live && !catalogue::holds_path_at(conn, sandbox.id, target.info.seq, path)? {
                return Err(Error::InvalidRequest(format!(
                    "{shown} is neither in checkpoint {} nor in the sandbox {}",
                    target.info.id, sandbox.name
                )));
            }
        }
        Ok(())
    }

    /// Counts the target paths a restore covers (for `unchanged`). `head`
    /// is the sandbox's newest checkpoint, `gone` the versions valid at the
    /// target and not at `head`, `new` those valid at `head` only.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn restore_total(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        head: u64,
        (gone, new): (&Manifest, &Manifest),
        filter: &[Vec<u8>],
        excludes: &Excludes,
    ) -> Result<u64> {
        if filter.is_empty() {
            // The target's versions are the head's, less the new ones, plus
            // the gone ones: no need to count the whole tree's rows.
            let at_head = match lock(&self.cache.manifests).get(&sandbox.id) {
                Some((seq, m)) if *seq == head => m.len() as u64,
                _ => catalogue::count_at(conn, sandbox.id, head)?,
            };
            return Ok((at_head + gone.len() as u64).saturating_sub(new.len() as u64));
        }
        Ok(catalogue::rows_at(conn, sandbox.id, target.info.seq)?
            .keys()
            .filter(|p| selected(p, filter, excludes))
            .count() as u64)
    }

    /// The body of a restore whose intent `intent` is recorded: a safety
    /// checkpoint, committed with the plan (recorded in the intent before
    /// anything is touched), then its application; only then is retention
    /// owed (earlier, the safety checkpoint could push the target out of
    /// the policy while it is being restored).
    pub(super) fn restore_intent(
        &self,
        conn: &mut Connection,
        &Restoring { sandbox, target, filter, kind }: &Restoring<'_>,
        (intent, end): (i64, IntentEnd),
    ) -> Result<RollbackReport> {
        let started = Instant::now();
        let excludes = Excludes::new(&sandbox.excludes)?;
        let store = self.store(&sandbox.store)?;
        let reason = format!("before {kind} to {}", target.info.id);
        let (safety, (plan, t_side, l_side)) =
            self.take_then(conn, sandbox.id, safety_checkpoint(reason), |tx, s| {
                let planned = restore_plan(tx, sandbox.id, target.info.seq, s.seq, filter, &excludes)?;
                catalogue::intent_applying(tx, intent, &s.id, now_ms())?;
                // Recorded first: a rollback that fails half way can still be
                // undone to the state before it.
                catalogue::record_rollback(tx, sandbox.id, kind, &target.info.id, &s.id, now_ms())?;
                Ok(planned)
            })?;
        self.stop_after_safety_hook();
        let safety_ms = ms_since(started);
        let total = self.restore_total(conn, sandbox, target, safety.seq, (&t_side, &l_side), filter, &excludes)?;
        let plan_ms = ms_since(started);
        let closes = (end == IntentEnd::WithTheRestore).then_some(intent);
        let applying = Applying { safety: &safety, closes };
        let report = self.apply_plan(conn, sandbox, &plan, &store, applying, (&target.info.id, total))?;
        self.retain(sandbox.id);
        tracing::info!(
            sandbox = %sandbox.name, target = %target.info.id, kind = kind.as_str(),
            restored = report.restored, created = report.created, deleted = report.deleted,
            safety_ms, plan_ms, ms = ms_since(started), "rollback"
        );
        Ok(report)
    }

    /// Ends a restore's intent once the request is answered. It is deleted
    /// when the restore succeeded (with the outcomes `status` reported of
    /// earlier ones), or failed before touching anything (a refused
    /// revert). One that failed half way is kept as `failed`, for
    /// `status`, and is not resumed at start: the client heard of the
    /// failure, and a second rollback finishes the job.
    pub(super) fn close_intent(&self, conn: &Connection, intent: i64, result: &Result<RollbackReport>) {
        let closed = match result {
            // The commit of its record, after the answer, ends it.
            Ok(_) if self.record_owed_for(intent) => Ok(()),
            Ok(_) => catalogue::finish_intent(conn, intent),
            Err(e) => catalogue::intent(conn, intent).and_then(|found| match found {
                Some(i) if i.state == IntentState::Applying => {
                    let note =
                        format!("the {} to {} failed half way: {e}; a second rollback finishes it", i.kind, i.target);
                    catalogue::settle_intent(conn, &i, IntentState::Failed, &note, now_ms())
                }
                _ => catalogue::end_intent(conn, intent),
            }),
        };
        if let Err(e) = closed {
            tracing::warn!(intent, "closing a restore intent: {e}");
        }
    }

    /// Applies a restore plan whose safety checkpoint is written, makes the
    /// record of the state it left and leaves it to write after the answer
    /// (see `record.rs`), and builds the report. `target_id` is the
    /// checkpoint restored to, and `total` the number of its paths the
    /// plan covers.
    pub(super) fn apply_plan(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        plan: &Plan,
        store: &Store,
        Applying { safety, closes }: Applying<'_>,
        (target_id, total): (&str, u64),
    ) -> Result<RollbackReport> {
        let started = Instant::now();
        let root = self.open_root(sandbox)?;
        let applied = plan.apply(root.as_fd(), store, &self.apply_options(sandbox))?;
        let apply_ms = ms_since(started);
        let done: std::collections::HashSet<&[u8]> = applied.skipped.iter().map(Vec::as_slice).collect();
        let desired = plan.desired().into_iter().filter(|(p, _)| !done.contains(p));
        let label = restore_label(&safety.reason);
        let reason = match label.ends_with(target_id) {
            // `revert of X` names its target already.
            true => format!("{label}, after {}", safety.id),
            false => format!("{label} to {target_id}, after {}", safety.id),
        };
        let linking = plan.linking();
        // Written after the answer: the state it records is the one the
        // plan wrote, whatever the agent does next (see `record.rs`).
        let recorded = restored_record(desired, &linking, root.as_fd(), safety.seq, (reason, closes));
        let restore_checkpoint = recorded.as_ref().map(|r| r.id().to_owned());
        if let Some(owed) = recorded {
            self.owe_record(conn, sandbox.id, owed);
        }
        tracing::debug!(sandbox = %sandbox.name, apply_ms, record_ms = ms_since(started) - apply_ms, "restore applied");
        if !applied.cloned.is_empty() {
            // After the answer, on a thread of its own: the answer does not
            // wait for what only the next checkpoint gains from.
            self.later(Later::Warm(root, applied.cloned));
        }
        let mut report = plan_report(sandbox, plan, target_id, total);
        report.dry_run = false;
        report.safety_checkpoint = Some(safety.id.clone());
        report.restore_checkpoint = restore_checkpoint;
        report.skipped = applied.skipped.into_iter().map(WirePath).collect();
        Ok(report)
    }

    pub(super) fn revert(&self, peer: &Peer, req: RevertRequest) -> Result<RollbackReport> {
        let step = self.checkpoint_ref(peer, &req.checkpoint)?;
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox_by_id(&conn, peer, step.sandbox_id)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        let step = still_there(&conn, &step)?;
        if let Some(plan) = &step.info.plan {
            refuse_if_applied(&conn, plan)?;
        }
        if req.dry_run {
            return self.preview_revert(&conn, peer, &sandbox, &step, req.force);
        }
        let intent =
            catalogue::begin_intent(&conn, sandbox.id, IntentKind::Revert, &step.info.id, &[], req.force, now_ms())?;
        let result = self.revert_intent(&mut conn, &sandbox, &step, req.force, (intent, IntentEnd::WithTheRestore));
        self.close_intent(&conn, intent, &result);
        result
    }

    /// The body of a revert whose intent `intent` is recorded; the caller
    /// holds the sandbox's lock.
    pub(super) fn revert_intent(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        step: &Checkpoint,
        force: bool,
        (intent, end): (i64, IntentEnd),
    ) -> Result<RollbackReport> {
        let parent = revertible(conn, sandbox, step)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let reason = format!("before revert of {}", step.info.id);
        // The plan is made in the safety checkpoint's transaction, from the
        // versions that changed between the step and now. A refused revert
        // rolls that transaction back: it leaves no checkpoint behind.
        let (safety, planned) = self.take_then(conn, sandbox.id, safety_checkpoint(reason), |tx, s| {
            let planned = revert_plan(tx, sandbox.id, (parent.info.seq, step.info.seq, s.seq), force, &excludes)?
                .map_err(|conflicts| revert_conflict(&step.info.id, conflicts))?;
            catalogue::intent_applying(tx, intent, &s.id, now_ms())?;
            catalogue::record_rollback(tx, sandbox.id, IntentKind::Revert, &step.info.id, &s.id, now_ms())?;
            Ok(planned)
        })?;
        self.stop_after_safety_hook();
        let Reverting { plan, conflicts, step_paths } = planned;
        let store = self.store(&sandbox.store)?;
        let total = step_paths as u64;
        let closes = (end == IntentEnd::WithTheRestore).then_some(intent);
        let applying = Applying { safety: &safety, closes };
        let mut report = self.apply_plan(conn, sandbox, &plan, &store, applying, (&step.info.id, total))?;
        self.retain(sandbox.id);
        report.unchanged = total.saturating_sub(report.restored + report.created + report.deleted);
        report.conflicts = conflicts.into_iter().map(WirePath).collect();
        Ok(report)
    }

    pub(super) fn undo(&self, peer: &Peer, req: UndoRequest) -> Result<RollbackReport> {
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        let (kind, target, safety) = catalogue::latest_rollback(&conn, sandbox.id)?.ok_or_else(|| {
            Error::NotFound(format!("nothing to undo: {} has had no rollback or revert", sandbox.name))
        })?;
        let back = catalogue::checkpoint_by_ref(&conn, &safety).map_err(|_| {
            Error::NotFound(format!("the safety checkpoint {safety} of the last {kind} (to {target}) is gone"))
        })?;
        if req.dry_run {
            return self.preview_restore(&mut conn, peer, &sandbox, &back, &[]);
        }
        self.restore_to(&mut conn, Restoring { sandbox: &sandbox, target: &back, filter: &[], kind: IntentKind::Undo })
    }
}

/// The plan of a rollback or undo to checkpoint `target` whose safety
/// checkpoint is `now`: the paths that differ between the two (within
/// `filter`) go back to their versions at `target`. Also returns the two
/// sides of the difference. Made in the safety checkpoint's transaction,
/// and again from the committed catalogue when a crash cut the restore
/// short (see [`intent_desired`]).
pub(super) fn restore_plan(
    conn: &Connection,
    sandbox_id: i64,
    target: u64,
    now: u64,
    filter: &[Vec<u8>],
    excludes: &Excludes,
) -> Result<(Plan, Manifest, Manifest)> {
    let (mut t_side, mut l_side) = catalogue::rows_between(conn, sandbox_id, target, now)?;
    let linked = catalogue::LinkedAt { conn, sandbox_id, target, live: now };
    let relinked = crate::links::relink(&linked, &mut t_side, &mut l_side, crate::links::Reach::Groups)?;
    let plan = Plan::new(&t_side, &l_side, filter, excludes, relinked);
    Ok((plan, t_side, l_side))
}

/// What a revert does.
pub(super) struct Reverting {
    pub(super) plan: Plan,
    /// Paths the step changed that were changed again after it.
    pub(super) conflicts: Vec<Vec<u8>>,
    /// How many paths the step changed.
    pub(super) step_paths: usize,
}

/// The plan of a revert of checkpoint `step` (`parent` is the checkpoint
/// before it) whose safety checkpoint is `now` (seqs, in that order): each
/// path the step changed goes back to its version at `parent`. Its live
/// version is its version at the step, unless it changed again later: those
/// paths conflict, and unless `force` the revert is refused (`Err`, with
/// them). Made like [`restore_plan`].
pub(super) fn revert_plan(
    conn: &Connection,
    sandbox_id: i64,
    (parent, step, now_seq): (u64, u64, u64),
    force: bool,
    excludes: &Excludes,
) -> Result<std::result::Result<Reverting, Vec<Vec<u8>>>> {
    let step_sides = catalogue::rows_between(conn, sandbox_id, parent, step)?;
    let later_sides = catalogue::rows_between(conn, sandbox_id, step, now_seq)?;
    let linked = catalogue::LinkedAt { conn, sandbox_id, target: parent, live: now_seq };
    plan_revert(step_sides, later_sides, &linked, force, excludes)
}

/// The plan of a revert from the versions its step changed (`before`:
/// the parent's, `after`: the step's) and those changed since
/// (`then`: the step's, `now`: the live ones), with the link groups of
/// the parent's state and the live one in `linked`.
pub(super) fn plan_revert(
    (before, after): (Manifest, Manifest),
    (then, now): (Manifest, Manifest),
    linked: &impl crate::links::Linked,
    force: bool,
    excludes: &Excludes,
) -> Result<std::result::Result<Reverting, Vec<Vec<u8>>>> {
    let step_paths = changed_paths(&before, &after);
    let later: std::collections::HashSet<Vec<u8>> = changed_paths(&then, &now).into_iter().collect();
    // A path to put back whose directory was removed (or became something
    // else) after the step conflicts too: putting it back would undo that
    // later change.
    let dir_gone_later = |p: &[u8]| {
        let mut up = p;
        while let Some(i) = up.iter().rposition(|&b| b == b'/') {
            up = &up[..i];
            let was_dir = then.get(up).is_some_and(|r| r.meta.kind == Kind::Dir);
            if was_dir && now.get(up).is_none_or(|r| r.meta.kind != Kind::Dir) {
                return true;
            }
        }
        false
    };
    let conflicts: Vec<Vec<u8>> = step_paths
        .iter()
        .filter(|p| later.contains(*p) || (before.contains_key(p.as_slice()) && dir_gone_later(p)))
        .cloned()
        .collect();
    if !conflicts.is_empty() && !force {
        return Ok(Err(conflicts));
    }
    let mut target = Manifest::default();
    let mut live = Manifest::default();
    for p in &step_paths {
        if let Some(row) = before.get(p.as_slice()) {
            target.insert(p[..].into(), row.clone());
        }
        let at_now = if later.contains(p) { now.get(p.as_slice()) } else { after.get(p.as_slice()) };
        if let Some(row) = at_now {
            live.insert(p[..].into(), row.clone());
        }
    }
    let relinked = crate::links::relink(linked, &mut target, &mut live, crate::links::Reach::Difference)?;
    let plan = Plan::new(&target, &live, &[], excludes, relinked);
    Ok(Ok(Reverting { plan, conflicts, step_paths: step_paths.len() }))
}

/// The checkpoint before `step`, whose versions a revert of it puts back:
/// refused for a first checkpoint, or a broken parent.
pub(super) fn revertible(conn: &Connection, sandbox: &Sandbox, step: &Checkpoint) -> Result<Checkpoint> {
    let parent = catalogue::previous_checkpoint(conn, sandbox.id, step.info.seq)?.ok_or_else(|| {
        Error::InvalidRequest(format!(
            "{} is the first checkpoint of {}: there is no earlier state to revert its changes to",
            step.info.id, sandbox.name
        ))
    })?;
    refuse_if_broken(&parent)?;
    Ok(parent)
}

/// The refusal of a revert whose step's paths were changed again later.
pub(super) fn revert_conflict(step_id: &str, conflicts: Vec<Vec<u8>>) -> Error {
    let shown: Vec<String> = conflicts.iter().take(10).map(|p| capture::show(p)).collect();
    Error::Conflict {
        message: format!(
            "{} path(s) changed by {step_id} were changed again later ({}{}); nothing was reverted",
            conflicts.len(),
            shown.join(", "),
            if conflicts.len() > shown.len() { ", ..." } else { "" }
        ),
        paths: conflicts,
        hint: format!("`snapback revert --force {step_id}` takes the step's parent version for them"),
    }
}

/// What a restore was, from its safety checkpoint's reason (`before
/// rollback to X`): `rollback`, `revert of X` or `undo`.
pub(super) fn restore_label(safety_reason: &Option<String>) -> &str {
    let reason = safety_reason.as_deref().unwrap_or("restore");
    let reason = reason.strip_prefix("before ").unwrap_or(reason);
    reason.split(" to ").next().unwrap_or(reason)
}

/// What a restore would do, as a dry run reports it: `total` is the number
/// of target paths the plan covers.
pub(super) fn plan_report(sandbox: &Sandbox, plan: &Plan, target_id: &str, total: u64) -> RollbackReport {
    let (restored, created, deleted) = plan.counts();
    let paths_of = |f: fn(&Step) -> bool| -> Vec<WirePath> {
        plan.steps.iter().filter(|(_, s)| f(s)).map(|(p, _)| WirePath(p.clone())).collect()
    };
    RollbackReport {
        checkpoint: target_id.to_owned(),
        sandbox: sandbox.name.clone(),
        safety_checkpoint: None,
        restore_checkpoint: None,
        created_paths: paths_of(|s| matches!(s, Step::Create(_))),
        restored_paths: paths_of(|s| matches!(s, Step::Restore { .. })),
        dry_run: true,
        restored,
        created,
        deleted,
        unchanged: total.saturating_sub(restored + created),
        changed: plan.steps.keys().map(|p| WirePath(p.clone())).collect(),
        removed: paths_of(|s| matches!(s, Step::Delete(_))),
        skipped: Vec::new(),
        conflicts: Vec::new(),
        preview: Vec::new(),
        preview_total: None,
    }
}

/// A restore to a checkpoint: of `sandbox` to `target`, within `filter`
/// (empty: everything).
#[derive(Clone, Copy)]
pub(super) struct Restoring<'a> {
    pub(super) sandbox: &'a Sandbox,
    pub(super) target: &'a Checkpoint,
    pub(super) filter: &'a [Vec<u8>],
    pub(super) kind: IntentKind,
}

impl<'a> Restoring<'a> {
    pub(super) fn rollback(sandbox: &'a Sandbox, target: &'a Checkpoint, filter: &'a [Vec<u8>]) -> Restoring<'a> {
        Restoring { sandbox, target, filter, kind: IntentKind::Rollback }
    }
}

/// A restore being applied (not a dry run): its safety checkpoint, and the
/// intent its restore checkpoint ends, if it is the one to.
pub(super) struct Applying<'a> {
    pub(super) safety: &'a CheckpointInfo,
    pub(super) closes: Option<i64>,
}

/// Who ends a restore's intent once the restore is done.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum IntentEnd {
    /// The commit of its restore checkpoint (one commit for both), after
    /// the answer; the request's own close leaves it to that commit, or
    /// finds it gone when the restore wrote nothing.
    WithTheRestore,
    /// The caller: a restore finished at start, whose outcome is kept for
    /// `status`.
    ByTheCaller,
}

/// A safety checkpoint's request: taken by the daemon before it changes a
/// sandbox.
pub(super) fn safety_checkpoint(reason: String) -> NewCheckpoint {
    NewCheckpoint { kind: CheckpointKind::Safety, reason: Some(reason), ..NewCheckpoint::default() }
}

/// Reads a checkpoint named by a request again, under the sandbox's lock:
/// retention may have pruned it since.
pub(super) fn still_there(conn: &Connection, c: &Checkpoint) -> Result<Checkpoint> {
    catalogue::checkpoint_by_ref(conn, &c.info.id).map_err(|e| match e {
        catalogue::CatalogueError::NotFound(_) => {
            Error::NotFound(format!("checkpoint {} was pruned before it could be restored", c.info.id))
        }
        e => e.into(),
    })
}

/// Refuses to restore from a checkpoint `verify` found broken.
pub(super) fn refuse_if_broken(target: &Checkpoint) -> Result<()> {
    match &target.info.broken {
        Some(why) => Err(Error::InvalidRequest(format!(
            "checkpoint {} is broken ({why}); it cannot be restored",
            target.info.id
        ))
        .hinted(format!("pick another with `snapback list {}`", target.info.sandbox))),
        None => Ok(()),
    }
}

/// Returns the paths whose versions differ between two sides of a
/// difference, sorted.
pub(super) fn changed_paths(a: &Manifest, b: &Manifest) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = a
        .iter()
        .filter(|(p, r)| b.get(*p).is_none_or(|o| o.meta != r.meta))
        .map(|(p, _)| p.to_vec())
        .chain(b.keys().filter(|p| !a.contains_key(*p)).map(|p| p.to_vec()))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub(super) fn rollback_filter(sandbox: &Sandbox, paths: &[WirePath]) -> Result<Vec<Vec<u8>>> {
    paths.iter().map(|p| relative_to_root(&sandbox.root, p.as_bytes())).collect()
}

/// Turns a `--path` argument into a clean sandbox-relative path: relative
/// paths are taken from the sandbox root, absolute ones must lie below it.
pub(super) fn relative_to_root(root: &[u8], p: &[u8]) -> Result<Vec<u8>> {
    let mut rel: &[u8] = if p.first() == Some(&b'/') {
        if !is_within(p, root) {
            return Err(Error::InvalidRequest(format!(
                "{} is outside the sandbox {}",
                WirePath(p.to_vec()).display(),
                path_of(root).display()
            )));
        }
        &p[root.len()..]
    } else {
        p
    };
    while let Some(r) = rel.strip_prefix(b"/").or_else(|| rel.strip_prefix(b"./")) {
        rel = r;
    }
    while let Some(r) = rel.strip_suffix(b"/") {
        rel = r;
    }
    if rel.is_empty() || rel == b"." {
        return Ok(Vec::new());
    }
    sys::check_relative(rel).map_err(|_| {
        Error::InvalidRequest(format!("{} is not a path inside the sandbox", WirePath(p.to_vec()).display()))
    })?;
    Ok(rel.to_vec())
}
