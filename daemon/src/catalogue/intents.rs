//! Restore intents: what a rollback, revert or undo set out to do, so a
//! crash in the middle is finished at the next start.

use super::*;

/// A restore in progress, or the outcome of one finished after a crash.
#[derive(Clone, Debug)]
pub struct Intent {
    pub id: i64,
    pub sandbox_id: i64,
    pub kind: IntentKind,
    pub target: String,
    pub filter: Vec<Vec<u8>>,
    pub force: bool,
    pub safety: Option<String>,
    pub state: IntentState,
    pub note: Option<String>,
    /// Set once its plan was applied and answered: the id of its
    /// `restore` checkpoint, which is all that is still to write.
    pub record: Option<String>,
}

pub(super) const INTENT_COLS: &str = "id, sandbox_id, kind, target, filter, force, safety, state, note, record";

pub(super) fn intent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Intent> {
    let id: i64 = r.get(0)?;
    let filter: Option<Vec<u8>> = r.get(4)?;
    Ok(Intent {
        id,
        sandbox_id: r.get(1)?,
        kind: column(r, 2, "intents", id, "kind")?,
        target: r.get(3)?,
        filter: filter.map(|f| f.split(|&b| b == 0).map(<[u8]>::to_vec).collect()).unwrap_or_default(),
        force: r.get(5)?,
        safety: r.get(6)?,
        state: column(r, 7, "intents", id, "state")?,
        note: r.get(8)?,
        record: r.get(9)?,
    })
}

/// Records a restore about to start (state `pending`). Returns its id.
pub fn begin_intent(
    conn: &Connection,
    sandbox_id: i64,
    kind: IntentKind,
    target: &str,
    filter: &[Vec<u8>],
    force: bool,
    now_ms: i64,
) -> Result<i64> {
    let filter = (!filter.is_empty()).then(|| filter.join(&0u8));
    conn.prepare_cached(
        "INSERT INTO intents (sandbox_id, kind, target, filter, force, state, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
    )?
    .execute(params![sandbox_id, kind, target, filter, force, now_ms])?;
    Ok(conn.last_insert_rowid())
}

/// Records a restore's safety checkpoint, in the caller's transaction (the
/// one that writes it). The target and the safety checkpoint determine the
/// version every touched path must end with (see
/// `Engine::resume_one`), so no path is written here.
pub fn intent_applying(tx: &Transaction<'_>, id: i64, safety: &str, now_ms: i64) -> Result<()> {
    tx.prepare_cached("UPDATE intents SET state = 'applying', safety = ?2, updated_ms = ?3 WHERE id = ?1")?
        .execute(params![id, safety, now_ms])?;
    Ok(())
}

/// Returns the desired versions an `applying` intent recorded path by path,
/// as earlier daemons did (migration 3): those to exist, and the paths that
/// must not. Empty for an intent recorded since.
pub fn intent_paths(conn: &Connection, id: i64) -> Result<(Manifest, Vec<Vec<u8>>)> {
    let mut stmt = conn.prepare_cached(
        "SELECT 0, path, kind, mode, uid, gid, size, mtime_ns, target, object, 0, 0, 0
         FROM intent_paths WHERE intent_id = ?1",
    )?;
    let mut present = Manifest::default();
    let mut absent = Vec::new();
    let mut rows = stmt.query([id])?;
    while let Some(r) = rows.next()? {
        if r.get_ref(2)?.data_type() == rusqlite::types::Type::Null {
            absent.push(r.get(1)?);
        } else {
            let (path, row) = entry_from_row(r)?;
            present.insert(path, row);
        }
    }
    Ok((present, absent))
}

/// Marks an applying restore's plan as applied, its state to be recorded
/// as checkpoint `record`: at the next start it is recorded, not applied
/// again (see migration 0017).
pub fn intent_applied(conn: &Connection, id: i64, record: &str, now_ms: i64) -> Result<()> {
    conn.prepare_cached("UPDATE intents SET record = ?2, updated_ms = ?3 WHERE id = ?1")?
        .execute(params![id, record, now_ms])?;
    Ok(())
}

/// Deletes a finished restore's intent.
pub fn end_intent(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM intents WHERE id = ?1")?.execute([id])?;
    Ok(())
}

/// Deletes a restore's intent once it succeeded, together with the
/// sandbox's recorded outcomes of earlier ones: the sandbox is at a state
/// the client asked for, so `status` has nothing left to report.
pub fn finish_intent(conn: &Connection, id: i64) -> Result<()> {
    conn.prepare_cached(
        "DELETE FROM intents WHERE id = ?1
            OR (state IN ('resumed', 'failed') AND sandbox_id = (SELECT sandbox_id FROM intents WHERE id = ?1))",
    )?
    .execute([id])?;
    Ok(())
}

/// Records how an interrupted restore ended (`resumed` or `failed`) and
/// drops its paths; earlier outcomes of the sandbox are dropped.
pub fn settle_intent(conn: &Connection, intent: &Intent, state: IntentState, note: &str, now_ms: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM intent_paths WHERE intent_id = ?1")?.execute([intent.id])?;
    conn.prepare_cached("DELETE FROM intents WHERE sandbox_id = ?1 AND id != ?2 AND state IN ('resumed', 'failed')")?
        .execute(params![intent.sandbox_id, intent.id])?;
    conn.prepare_cached("UPDATE intents SET state = ?2, note = ?3, updated_ms = ?4 WHERE id = ?1")?
        .execute(params![intent.id, state, note, now_ms])?;
    Ok(())
}

/// Returns one intent, if it is still recorded.
pub fn intent(conn: &Connection, id: i64) -> Result<Option<Intent>> {
    let sql = format!("SELECT {INTENT_COLS} FROM intents WHERE id = ?1");
    Ok(conn.prepare_cached(&sql)?.query_row([id], intent_from_row).optional()?)
}

/// Returns the intents in `states`, oldest first.
pub fn intents(conn: &Connection, states: &[IntentState], sandbox_id: Option<i64>) -> Result<Vec<Intent>> {
    let list = states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "SELECT {INTENT_COLS} FROM intents WHERE state IN ({list}) AND (?1 IS NULL OR sandbox_id = ?1) ORDER BY id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([sandbox_id], intent_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
