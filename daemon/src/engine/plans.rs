//! Plans: a group of checkpoints an agent opens, shows, closes and rolls
//! back as one.

use super::*;

impl Engine {
    pub(super) fn plan_ref(&self, conn: &Connection, peer: &Peer, id: &str) -> Result<(catalogue::Plan, Sandbox)> {
        let missing = || Error::NotFound(format!("no plan {id:?}"));
        let plan = catalogue::plan(conn, id)?.ok_or_else(missing)?;
        let sandbox = catalogue::sandbox_by_id(conn, plan.sandbox_id)?;
        if !may_use(peer, &sandbox) {
            return Err(missing());
        }
        Ok((plan, sandbox))
    }

    pub(super) fn plan_info(&self, conn: &Connection, plan: &catalogue::Plan, sandbox: &Sandbox) -> Result<PlanInfo> {
        Ok(PlanInfo {
            id: plan.id.clone(),
            sandbox: sandbox.name.clone(),
            state: plan.state,
            created_unix_ms: plan.created_ms,
            updated_unix_ms: plan.updated_ms,
            checkpoints: catalogue::checkpoints(conn, Some(sandbox.id), Some(&plan.id))?
                .into_iter()
                .map(|c| c.info)
                .collect(),
        })
    }

    pub(super) fn plan_show(&self, peer: &Peer, id: &str) -> Result<PlanInfo> {
        let conn = self.db()?;
        let (plan, sandbox) = self.plan_ref(&conn, peer, id)?;
        self.plan_info(&conn, &plan, &sandbox)
    }

    /// Applies or abandons an active plan. Holds the sandbox's lock, so no
    /// rollback of the plan is between its guard and its work meanwhile.
    pub(super) fn plan_close(&self, peer: &Peer, id: &str, state: PlanState) -> Result<PlanInfo> {
        let conn = self.db()?;
        let (_, sandbox) = self.plan_ref(&conn, peer, id)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        if !catalogue::close_plan(&conn, id, state, now_ns() / 1_000_000)? {
            let (plan, _) = self.plan_ref(&conn, peer, id)?;
            return Err(Error::InvalidRequest(format!(
                "plan {id} is {}, not active: it cannot become {}",
                plan.state.as_str(),
                state.as_str()
            )));
        }
        let (plan, sandbox) = self.plan_ref(&conn, peer, id)?;
        tracing::info!(plan = id, state = state.as_str(), "plan closed");
        self.plan_info(&conn, &plan, &sandbox)
    }

    pub(super) fn plan_rollback(&self, peer: &Peer, req: PlanRollbackRequest) -> Result<RollbackReport> {
        let mut conn = self.db()?;
        let (_, sandbox) = self.plan_ref(&conn, peer, &req.plan)?;
        let target = self.checkpoint_ref(peer, &req.checkpoint)?;
        if target.info.plan.as_deref() != Some(req.plan.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "checkpoint {} is not part of plan {}",
                target.info.id, req.plan
            )));
        }
        let sandbox = self.active_sandbox(&conn, peer, &sandbox.name)?;
        let filter = rollback_filter(&sandbox, &req.paths)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        // The guard reads the catalogue under the sandbox's lock.
        refuse_if_applied(&conn, &req.plan)?;
        match req.dry_run {
            true => self.preview_restore(&mut conn, peer, &sandbox, &target, &filter),
            false => self.restore_to(&mut conn, Restoring::rollback(&sandbox, &target, &filter)),
        }
    }
}

/// Refuses when `plan` is applied: the guard reads the catalogue.
pub(super) fn refuse_if_applied(conn: &Connection, plan: &str) -> Result<()> {
    match catalogue::plan(conn, plan)? {
        Some(p) if p.state == PlanState::Applied => Err(Error::PlanApplied(format!(
            "plan {plan} was applied: its checkpoints can no longer be rolled back or reverted"
        ))),
        _ => Ok(()),
    }
}

/// Checks that a checkpoint may join `plan`: it is new, or active and of
/// the same sandbox.
pub(super) fn check_plan_open(conn: &Connection, plan: &str, sandbox: &Sandbox) -> Result<()> {
    match catalogue::plan(conn, plan)? {
        None => Ok(()),
        Some(p) if p.sandbox_id != sandbox.id => {
            Err(Error::InvalidRequest(format!("plan {plan} belongs to another sandbox")))
        }
        Some(p) => match p.state {
            PlanState::Active => Ok(()),
            PlanState::Applied => {
                Err(Error::PlanApplied(format!("plan {plan} was applied: it takes no more checkpoints")))
            }
            PlanState::Abandoned => {
                Err(Error::InvalidRequest(format!("plan {plan} was abandoned: it takes no more checkpoints")))
            }
        },
    }
}
