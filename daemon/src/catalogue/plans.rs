//! Plans, and the rollbacks that `undo` follows.

use super::*;

/// A plan, as stored.
#[derive(Clone, Debug)]
pub struct Plan {
    pub id: String,
    pub sandbox_id: i64,
    pub state: PlanState,
    pub created_ms: i64,
    pub updated_ms: i64,
}

pub fn plan(conn: &Connection, id: &str) -> Result<Option<Plan>> {
    Ok(conn
        .prepare_cached("SELECT id, sandbox_id, state, created_ms, updated_ms FROM plans WHERE id = ?1")?
        .query_row([id], |r| {
            let plan: String = r.get(0)?;
            let state = column::<Stored<PlanState>>(r, 2, "plans", &plan, "state")?.0;
            Ok(Plan { id: plan, sandbox_id: r.get(1)?, state, created_ms: r.get(3)?, updated_ms: r.get(4)? })
        })
        .optional()?)
}

/// Creates the plan `id` for a sandbox if it does not exist yet.
pub fn ensure_plan(tx: &Transaction<'_>, id: &str, sandbox_id: i64, now_ms: i64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO plans (id, sandbox_id, state, created_ms, updated_ms) VALUES (?1, ?2, 'active', ?3, ?3)
         ON CONFLICT (id) DO UPDATE SET updated_ms = ?3",
    )?
    .execute(params![id, sandbox_id, now_ms])?;
    Ok(())
}

/// Moves a plan from `active` to `state`, atomically: returns false when the
/// plan was not active (someone else moved it first).
pub fn close_plan(conn: &Connection, id: &str, state: PlanState, now_ms: i64) -> Result<bool> {
    let n = conn
        .prepare_cached("UPDATE plans SET state = ?2, updated_ms = ?3 WHERE id = ?1 AND state = 'active'")?
        .execute(params![id, Stored(state), now_ms])?;
    Ok(n == 1)
}

/// Records a rollback, revert or undo.
pub fn record_rollback(
    conn: &Connection,
    sandbox_id: i64,
    kind: IntentKind,
    target: &str,
    safety: &str,
    now_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO rollbacks (sandbox_id, kind, target, safety, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![sandbox_id, kind, target, safety, now_ms])?;
    Ok(())
}

/// Returns (kind, target, safety checkpoint) of a sandbox's latest
/// rollback, revert or undo.
pub fn latest_rollback(conn: &Connection, sandbox_id: i64) -> Result<Option<(String, String, String)>> {
    Ok(conn
        .prepare_cached("SELECT kind, target, safety FROM rollbacks WHERE sandbox_id = ?1 ORDER BY id DESC LIMIT 1")?
        .query_row([sandbox_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}
