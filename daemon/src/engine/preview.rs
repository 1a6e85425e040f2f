//! Dry runs of rollback, revert and undo: the plan the real run would
//! make, from the live tree as it is now, reported with what `diff --stat`
//! says of each path it would change. Nothing is written: no safety
//! checkpoint, no intent, no object.

use snapback::proto::{DiffDetail, DiffTotal};

use super::compare::{Comparing, Side};
use super::*;
use crate::manifest::Meta;

impl Engine {
    /// What [`Engine::restore_to`] would do, changing nothing.
    pub(super) fn preview_restore(
        &self,
        conn: &mut Connection,
        peer: &Peer,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
    ) -> Result<RollbackReport> {
        let target = &self.restorable(conn, sandbox, target, filter)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let sb = catalogue::sandbox_by_id(conn, sandbox.id)?;
        let live = self.live_state(conn, &sb)?;
        let then = catalogue::rows_at(conn, sandbox.id, target.info.seq)?;
        let (mut t_side, mut l_side) = differences(&then, &live);
        let relinked = crate::links::relink(
            &crate::links::InMemory::new(&then, &live),
            &mut t_side,
            &mut l_side,
            crate::links::Reach::Groups,
        )?;
        let plan = Plan::new(&t_side, &l_side, filter, &excludes, relinked);
        let total = match filter {
            [] => then.len(),
            _ => then.keys().filter(|p| selected(p, filter, &excludes)).count(),
        } as u64;
        let mut report = plan_report(sandbox, &plan, &target.info.id, total);
        let to = Seen { conn, peer, sandbox, live: &live, target: target.info.seq };
        self.preview(&mut report, &plan, to)?;
        Ok(report)
    }

    /// What a revert of `step` would do, changing nothing: refused as the
    /// real one would be when later changes conflict and `force` is off.
    pub(super) fn preview_revert(
        &self,
        conn: &Connection,
        peer: &Peer,
        sandbox: &Sandbox,
        step: &Checkpoint,
        force: bool,
    ) -> Result<RollbackReport> {
        let parent = revertible(conn, sandbox, step)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let sb = catalogue::sandbox_by_id(conn, sandbox.id)?;
        let live = self.live_state(conn, &sb)?;
        let at_step = catalogue::rows_at(conn, sandbox.id, step.info.seq)?;
        let at_parent = catalogue::rows_at(conn, sandbox.id, parent.info.seq)?;
        let step_sides = catalogue::rows_between(conn, sandbox.id, parent.info.seq, step.info.seq)?;
        let linked = crate::links::InMemory::new(&at_parent, &live);
        let Reverting { plan, conflicts, step_paths } =
            plan_revert(step_sides, differences(&at_step, &live), &linked, force, &excludes)?
                .map_err(|conflicts| revert_conflict(&step.info.id, conflicts))?;
        let total = step_paths as u64;
        let mut report = plan_report(sandbox, &plan, &step.info.id, total);
        // As the real run counts them.
        report.unchanged = total.saturating_sub(report.restored + report.created + report.deleted);
        report.conflicts = conflicts.into_iter().map(WirePath).collect();
        let to = Seen { conn, peer, sandbox, live: &live, target: parent.info.seq };
        self.preview(&mut report, &plan, to)?;
        Ok(report)
    }

    /// Adds to a dry run's report each planned path as `diff --stat` from
    /// the live tree to the state the plan would leave.
    fn preview(&self, report: &mut RollbackReport, plan: &Plan, seen: Seen<'_>) -> Result<()> {
        let Seen { conn, peer, sandbox, live, target } = seen;
        let root = self.open_root(sandbox)?;
        let store = self.store(&sandbox.store)?;
        let now = Side::Live { root: root.as_fd(), rows: live };
        let then = Side::Stored { store: &store, seq: target };
        let compare = Comparing::new((peer, conn, sandbox.id), now, then, DiffDetail::Stat, self.diff_max_bytes);
        let mut total = DiffTotal::default();
        for (path, step) in &plan.steps {
            let (old, new): (Option<&Meta>, Option<&Meta>) = match step {
                Step::Create(m) => (None, Some(m)),
                Step::Restore { live, target } => (Some(live), Some(target)),
                Step::Delete(m) => (Some(m), None),
            };
            if let Some(change) = compare.change(path, old, new, None)? {
                if let Some(stat) = &change.stat {
                    total.add(stat);
                }
                report.preview.push(change);
            }
        }
        report.preview_total = Some(total);
        Ok(())
    }
}

/// What a preview compares: the live tree of `sandbox` (its whole state
/// `live`) with the checkpoint at seq `target`, for `peer`.
#[derive(Clone, Copy)]
struct Seen<'a> {
    conn: &'a Connection,
    peer: &'a Peer,
    sandbox: &'a Sandbox,
    live: &'a Manifest,
    target: u64,
}
