//! Recovery: restores a crash cut short, finished at start from their
//! intents.

use super::*;

impl Engine {
    /// Finishes every restore a crash interrupted, before the daemon
    /// serves: one that had not yet touched the sandbox is run from the
    /// beginning; one that had is brought, path by path, to the versions
    /// its intent recorded (each step is idempotent). The outcome is kept
    /// for `status`.
    pub fn resume_interrupted(&self) -> Result<()> {
        let mut conn = self.db()?;
        for intent in catalogue::intents(&conn, &[IntentState::Pending, IntentState::Applying], None)? {
            let guard = self.sandbox_lock(intent.sandbox_id);
            let _held = self.hold(intent.sandbox_id, &guard);
            if let Some(record) = &intent.record {
                // Applied and answered: only its record was still to write.
                match self.record_applied(&mut conn, &intent, record) {
                    Ok(true) => {
                        tracing::info!(intent = intent.id, "the {} to {} recorded at start", intent.kind, intent.target)
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        intent = intent.id,
                        "recording the {} to {} at start: {e}",
                        intent.kind,
                        intent.target
                    ),
                }
                catalogue::finish_intent(&conn, intent.id)?;
                continue;
            }
            let outcome = self.resume_one(&mut conn, &intent);
            let (state, note) = match &outcome {
                Ok(n) => (
                    IntentState::Resumed,
                    format!(
                        "the {} to {} interrupted by a daemon stop was finished at start ({n} paths)",
                        intent.kind, intent.target
                    ),
                ),
                Err(e) => (
                    IntentState::Failed,
                    format!(
                        "the {} to {} interrupted by a daemon stop could not be finished: {e}",
                        intent.kind, intent.target
                    ),
                ),
            };
            tracing::warn!(intent = intent.id, "{note}");
            catalogue::settle_intent(&conn, &intent, state, &note, now_ms())?;
        }
        Ok(())
    }

    /// Writes the `restore` checkpoint of a restore that was applied and
    /// answered, but whose record a stop cut off: the versions its plan
    /// wrote, made again from its intent, under the id its answer gave,
    /// if its safety checkpoint is still the newest. Nothing is applied
    /// again (the agent may have written to those paths since): they are
    /// recorded racy, and the next checkpoint, a comparison of the whole
    /// tree after a start, reads them again.
    /// Returns whether it was written (a failure is logged).
    fn record_applied(&self, conn: &mut Connection, intent: &catalogue::Intent, record: &str) -> Result<bool> {
        let sandbox = catalogue::sandbox_by_id(conn, intent.sandbox_id)?;
        let Desired { present, absent, relinked } = intent_desired(conn, &sandbox, intent)?;
        let safety = intent.safety.as_deref().unwrap_or_default();
        let after = catalogue::checkpoint_by_ref(conn, safety)?.info.seq;
        let root = self.open_root(&sandbox)?;
        let linking: std::collections::HashSet<&[u8]> = present
            .iter()
            .filter(|(_, r)| r.key.nlink > 1)
            .map(|(p, _)| &p[..])
            .chain(relinked.iter().map(Vec::as_slice))
            .collect();
        let desired = Desired::versions(&present, &absent);
        let reason = format!("{} to {}, recorded at start", intent.kind, intent.target);
        let Some(owed) = restored_record(desired, &linking, root.as_fd(), after, (reason, None)) else {
            return Ok(false);
        };
        Ok(self.write_record(conn, sandbox.id, owed.named(record.to_owned())).is_some())
    }

    /// Finishes one interrupted restore; returns the number of paths it
    /// touched.
    pub(super) fn resume_one(&self, conn: &mut Connection, intent: &catalogue::Intent) -> Result<u64> {
        let sandbox = catalogue::sandbox_by_id(conn, intent.sandbox_id)?;
        if intent.state == IntentState::Pending {
            // Nothing was touched yet: run it again under the same intent.
            let target = catalogue::checkpoint_by_ref(conn, &intent.target)?;
            let report = if intent.kind == IntentKind::Revert {
                self.revert_intent(conn, &sandbox, &target, intent.force, (intent.id, IntentEnd::ByTheCaller))?
            } else {
                let to = Restoring { sandbox: &sandbox, target: &target, filter: &intent.filter, kind: intent.kind };
                self.restore_intent(conn, &to, (intent.id, IntentEnd::ByTheCaller))?
            };
            return Ok(report.restored + report.created + report.deleted);
        }
        let Desired { present, absent, relinked } = intent_desired(conn, &sandbox, intent)?;
        let live = self.live_state(conn, &sandbox)?;
        let wanted: std::collections::HashSet<&[u8]> =
            present.keys().map(|p| &p[..]).chain(absent.iter().map(Vec::as_slice)).collect();
        let live_side: Manifest = live.into_iter().filter(|(p, _)| wanted.contains(&p[..])).collect();
        let excludes = Excludes::new(&sandbox.excludes)?;
        let plan = Plan::new(&present, &live_side, &[], &excludes, relinked);
        let store = self.store(&sandbox.store)?;
        let root = self.open_root(&sandbox)?;
        let applied = plan.apply(root.as_fd(), &store, &self.apply_options(&sandbox))?;
        let touched: Vec<&[u8]> = wanted.into_iter().collect();
        crate::restore::remove_leftover_temps(root.as_fd(), &touched)?;
        // The state it restored becomes the head, as after a restore that
        // was not interrupted (nothing is written if that was done already).
        let skipped: std::collections::HashSet<&[u8]> = applied.skipped.iter().map(Vec::as_slice).collect();
        let desired = Desired::versions(&present, &absent).filter(|(p, _)| !skipped.contains(p));
        let reason = format!("{} to {}, finished at start", intent.kind, intent.target);
        // Nothing was checkpointed since the stop: the head is the restore's
        // safety checkpoint.
        if let Some(owed) = restored_record(desired, &plan.linking(), root.as_fd(), sandbox.head_seq, (reason, None)) {
            self.write_record(conn, sandbox.id, owed);
        }
        Ok(plan.steps.len() as u64)
    }
}

/// What an interrupted restore must still bring about.
pub(super) struct Desired {
    /// The version each path must end with.
    pub(super) present: Manifest,
    /// The paths that must not exist.
    pub(super) absent: Vec<Vec<u8>>,
    /// Paths written for their links alone (see [`Plan::new`]).
    pub(super) relinked: std::collections::BTreeSet<Vec<u8>>,
}

impl Desired {
    /// Each path of `present` and `absent` with the version it must end
    /// with (`None`: it must not exist), as a restore's record takes them.
    fn versions<'a>(
        present: &'a Manifest,
        absent: &'a [Vec<u8>],
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a crate::manifest::Meta>)> {
        present.iter().map(|(p, r)| (&p[..], Some(&r.meta))).chain(absent.iter().map(|p| (p.as_slice(), None)))
    }
}

/// The version every path an `applying` intent touches must end with, and
/// the paths that must not exist: made again from its target and safety
/// checkpoint, as the interrupted request made them (nothing in the
/// sandbox's history changes while a restore holds its lock, and neither
/// checkpoint can be pruned before the restore is finished), or read as an
/// earlier daemon recorded them.
pub(super) fn intent_desired(conn: &Connection, sandbox: &Sandbox, intent: &catalogue::Intent) -> Result<Desired> {
    let recorded = catalogue::intent_paths(conn, intent.id)?;
    if !recorded.0.is_empty() || !recorded.1.is_empty() {
        return Ok(Desired { present: recorded.0, absent: recorded.1, relinked: Default::default() });
    }
    let safety = intent
        .safety
        .as_deref()
        .ok_or_else(|| Error::Internal(format!("the applying intent {} names no safety checkpoint", intent.id)))?;
    let now = catalogue::checkpoint_by_ref(conn, safety)?.info.seq;
    let target = catalogue::checkpoint_by_ref(conn, &intent.target)?;
    let excludes = Excludes::new(&sandbox.excludes)?;
    let plan = if intent.kind == IntentKind::Revert {
        let parent = catalogue::previous_checkpoint(conn, sandbox.id, target.info.seq)?
            .ok_or_else(|| Error::Internal(format!("the checkpoint before {} is gone", target.info.id)))?;
        revert_plan(conn, sandbox.id, (parent.info.seq, target.info.seq, now), intent.force, &excludes)?
            .map_err(|_| Error::Internal(format!("the revert of {} now conflicts", target.info.id)))?
            .plan
    } else {
        restore_plan(conn, sandbox.id, target.info.seq, now, &intent.filter, &excludes)?.0
    };
    let mut present = Manifest::default();
    let mut absent = Vec::new();
    for (path, meta) in plan.desired() {
        match meta {
            Some(meta) => {
                let key = crate::manifest::StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 };
                present.insert(path.into(), crate::manifest::Row { id: 0, meta: meta.clone(), key });
            }
            None => absent.push(path.to_vec()),
        }
    }
    // Names of one file keep a key of their own, so that the plan made
    // again from these finds the same groups.
    for (i, group) in plan.links.iter().enumerate() {
        for path in group {
            if let Some(row) = present.get_mut(path.as_slice()) {
                row.key = crate::manifest::StatKey { ctime_ns: 0, ino: i as u64 + 1, racy: false, nlink: 2 };
            }
        }
    }
    Ok(Desired { present, absent, relinked: plan.relinked })
}
