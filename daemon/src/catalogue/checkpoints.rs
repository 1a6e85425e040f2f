//! Checkpoints: writing one (its versions in one transaction), finding
//! them, marking them broken, deleting them.

use super::*;

/// Everything one checkpoint writes.
pub struct CheckpointWrite<'a> {
    pub info: &'a CheckpointInfo,
    pub sandbox_id: i64,
    pub scan_start_ns: i64,
    /// Ids of current rows whose version ends at this checkpoint.
    pub ended: &'a [i64],
    pub added: &'a [NewRow],
    /// Current rows whose content is unchanged but whose live stat moved.
    pub rekeyed: &'a [(Vec<u8>, i64, StatKey)],
}

/// Writes a checkpoint in the caller's transaction and returns the ids of
/// the added rows, in order. The checkpoint's seq must be the sandbox's
/// head + 1.
pub fn write_checkpoint(tx: &Transaction<'_>, w: &CheckpointWrite<'_>) -> Result<Vec<i64>> {
    let seq = w.info.seq as i64;
    let head: i64 =
        tx.prepare_cached("SELECT head_seq FROM sandboxes WHERE id = ?1")?.query_row([w.sandbox_id], |r| r.get(0))?;
    if head + 1 != seq {
        return Err(CatalogueError::Damaged(format!("checkpoint seq {seq} does not follow head {head}")));
    }
    let i = w.info;
    tx.prepare_cached(
        "INSERT INTO checkpoints (id, sandbox_id, seq, parent, plan, reason, tool, phase, labels, kind, pinned,
                                  created_ms, scan_start_ns, files, dirs, symlinks, bytes, changed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
    )?
    .execute(params![
        i.id,
        w.sandbox_id,
        seq,
        i.parent,
        i.plan,
        i.reason,
        i.tool,
        i.phase,
        serde_json::to_string(&i.labels).map_err(|e| CatalogueError::Damaged(e.to_string()))?,
        Stored(i.kind),
        i.pinned,
        i.created_unix_ms,
        w.scan_start_ns,
        i.files as i64,
        i.dirs as i64,
        i.symlinks as i64,
        i.bytes as i64,
        i.changed as i64
    ])?;
    in_batches(
        tx,
        w.ended,
        |n| format!("UPDATE entries SET end_seq = ? WHERE end_seq IS NULL AND id IN ({})", placeholders(n)),
        |st, (i, _), id| {
            st.raw_bind_parameter(1, seq)?;
            st.raw_bind_parameter(2 + i, id)
        },
        |batch, changed| match changed == batch.len() {
            true => Ok(()),
            // The guard of one current version per path: a version this
            // checkpoint replaces must still be current.
            false => Err(CatalogueError::Stale(format!(
                "a path version it ends is not current ({} of the batch from id {}): the checkpoint is not written (the next one compares the whole tree with the catalogue)",
                batch.len() - changed,
                batch[0]
            ))),
        },
    )?;
    // The ids are given, not left to SQLite: the ones it would give (one
    // more than the largest, row after row; the write lock is held), known
    // without asking after each row.
    let first: i64 = tx.prepare_cached("SELECT coalesce(max(id), 0) + 1 FROM entries")?.query_row([], |r| r.get(0))?;
    const ADD_COLUMNS: usize = 16;
    in_batches(
        tx,
        w.added,
        |n| {
            format!(
                "INSERT INTO entries (id, sandbox_id, path, start_seq, kind, mode, uid, gid, size, mtime_ns, target,
                                      object, ctime_ns, ino, racy, nlink)
                 VALUES {}",
                vec![format!("({})", placeholders(ADD_COLUMNS)); n].join(", ")
            )
        },
        |st, (i, index), r| {
            let at = 1 + i * ADD_COLUMNS;
            let m = &r.meta;
            st.raw_bind_parameter(at, first + index as i64)?;
            st.raw_bind_parameter(at + 1, w.sandbox_id)?;
            st.raw_bind_parameter(at + 2, &r.path)?;
            st.raw_bind_parameter(at + 3, seq)?;
            st.raw_bind_parameter(at + 4, m.kind.as_str())?;
            st.raw_bind_parameter(at + 5, m.mode)?;
            st.raw_bind_parameter(at + 6, m.uid)?;
            st.raw_bind_parameter(at + 7, m.gid)?;
            st.raw_bind_parameter(at + 8, m.size as i64)?;
            st.raw_bind_parameter(at + 9, m.mtime_ns)?;
            st.raw_bind_parameter(at + 10, m.target.as_deref())?;
            st.raw_bind_parameter(at + 11, m.object.as_ref().map(|o| o.0.as_slice()))?;
            st.raw_bind_parameter(at + 12, r.key.ctime_ns)?;
            st.raw_bind_parameter(at + 13, r.key.ino as i64)?;
            st.raw_bind_parameter(at + 14, r.key.racy)?;
            st.raw_bind_parameter(at + 15, r.key.nlink)
        },
        |_, _| Ok(()),
    )?;
    let ids: Vec<i64> = (first..).take(w.added.len()).collect();
    const REKEY_COLUMNS: usize = 5;
    in_batches(
        tx,
        w.rekeyed,
        |n| {
            format!(
                "UPDATE entries SET ctime_ns = v.column2, ino = v.column3, racy = v.column4, nlink = v.column5
                 FROM (VALUES {}) AS v WHERE entries.id = v.column1",
                vec![format!("({})", placeholders(REKEY_COLUMNS)); n].join(", ")
            )
        },
        |st, (i, _), (_, id, key)| {
            let at = 1 + i * REKEY_COLUMNS;
            st.raw_bind_parameter(at, id)?;
            st.raw_bind_parameter(at + 1, key.ctime_ns)?;
            st.raw_bind_parameter(at + 2, key.ino as i64)?;
            st.raw_bind_parameter(at + 3, key.racy)?;
            st.raw_bind_parameter(at + 4, key.nlink)
        },
        |_, _| Ok(()),
    )?;
    if w.added.iter().any(|r| r.meta.object.is_some_and(|o| o.is_unhashed())) {
        list_unhashed(tx, w.sandbox_id, seq as u64)?;
    }
    tx.prepare_cached("UPDATE sandboxes SET head_seq = ?2 WHERE id = ?1")?.execute(params![w.sandbox_id, seq])?;
    Ok(ids)
}

/// Runs a statement for each batch of `items`: `sql(n)` is the statement
/// for a batch of `n` (64 at most, then 8, then 1 for the rest),
/// `bind(statement, (i, index), item)` binds an item, the `i`th of its
/// batch and the `index`th of `items`, and
/// `done(batch, changes)` checks what the statement changed. Each
/// statement run in a transaction on a table with triggers opens and
/// closes a statement journal, which cost as much as the row it writes:
/// 300,000 new versions took 2.4-2.6 s one at a time and 1.4 s in
/// batches; 150 new, 100 ended and 20 re-keyed 1.8-2.3 ms and 1.2-1.9 ms.
fn in_batches<T>(
    tx: &Transaction<'_>,
    items: &[T],
    sql: impl Fn(usize) -> String,
    mut bind: impl FnMut(&mut rusqlite::Statement<'_>, (usize, usize), &T) -> rusqlite::Result<()>,
    mut done: impl FnMut(&[T], usize) -> Result<()>,
) -> Result<()> {
    let mut rest = items;
    let mut index = 0;
    for n in [64, 8, 1] {
        if rest.len() < n {
            continue;
        }
        let mut statement = tx.prepare_cached(&sql(n))?;
        while rest.len() >= n {
            let (batch, after) = rest.split_at(n);
            for (i, item) in batch.iter().enumerate() {
                bind(&mut statement, (i, index + i), item)?;
            }
            let changed = statement.raw_execute()?;
            done(batch, changed)?;
            (rest, index) = (after, index + n);
        }
    }
    Ok(())
}

/// `n` parameters, separated by commas: numbered by their place in the
/// statement.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// A checkpoint as stored, with the sandbox it belongs to.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub sandbox_id: i64,
    pub info: CheckpointInfo,
}

pub(super) const CHECKPOINT_COLS: &str =
    "c.id, c.sandbox_id, s.name, c.seq, c.parent, c.plan, c.reason, c.tool, c.phase, c.labels,
     c.kind, c.pinned, c.created_ms, c.files, c.dirs, c.symlinks, c.bytes, c.changed, c.broken";

pub(super) fn checkpoint_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    let id: String = r.get(0)?;
    let labels: String = r.get(9)?;
    let bad = |column: &str, why: String| {
        let message = format!("the catalogue's checkpoint {id} has an unreadable {column}: {why}");
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, message.into())
    };
    let labels = serde_json::from_str::<BTreeMap<String, String>>(&labels).map_err(|e| bad("labels", e.to_string()))?;
    let kind = column::<Stored<CheckpointKind>>(r, 10, "checkpoints", &id, "kind")?.0;
    Ok(Checkpoint {
        sandbox_id: r.get(1)?,
        info: CheckpointInfo {
            id,
            sandbox: r.get(2)?,
            seq: r.get::<_, i64>(3)? as u64,
            parent: r.get(4)?,
            plan: r.get(5)?,
            reason: r.get(6)?,
            tool: r.get(7)?,
            phase: r.get(8)?,
            labels,
            kind,
            pinned: r.get(11)?,
            created_unix_ms: r.get(12)?,
            files: r.get::<_, i64>(13)? as u64,
            dirs: r.get::<_, i64>(14)? as u64,
            symlinks: r.get::<_, i64>(15)? as u64,
            bytes: r.get::<_, i64>(16)? as u64,
            changed: r.get::<_, i64>(17)? as u64,
            exclusive_bytes: None,
            scanned: None,
            full_scan: None,
            broken: r.get(18)?,
        },
    })
}

/// Finds a checkpoint by its ULID or a unique prefix of one.
pub fn checkpoint_by_ref(conn: &Connection, reference: &str) -> Result<Checkpoint> {
    let prefix = reference.to_ascii_uppercase();
    let crockford = |c: char| c.is_ascii_digit() || (c.is_ascii_uppercase() && !"ILOU".contains(c));
    if prefix.is_empty() || prefix.len() > 26 || !prefix.chars().all(crockford) {
        return Err(CatalogueError::NotAnId(format!("{reference:?} is not a checkpoint id or id prefix")));
    }
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.id GLOB ?1 ORDER BY c.id LIMIT 2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let found: Vec<Checkpoint> =
        stmt.query_map([format!("{prefix}*")], checkpoint_from_row)?.collect::<rusqlite::Result<_>>()?;
    match found.len() {
        0 => Err(CatalogueError::NotFound(format!("no checkpoint {reference}"))),
        1 => Ok(found.into_iter().next().unwrap_or_else(|| unreachable!())),
        _ => {
            Err(CatalogueError::Ambiguous(format!("{reference} matches more than one checkpoint; give more of the id")))
        }
    }
}

/// A pruned checkpoint that `reference` (an id or a prefix) names alone:
/// its id, sandbox, when it was pruned and by what.
pub fn pruned(conn: &Connection, reference: &str) -> Result<Option<(String, i64, i64, String)>> {
    let mut stmt = conn.prepare_cached("SELECT id, sandbox_id, pruned_ms, why FROM pruned WHERE id GLOB ?1 LIMIT 2")?;
    let found: Vec<(String, i64, i64, String)> = stmt
        .query_map([format!("{}*", reference.to_ascii_uppercase())], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(if found.len() == 1 { found.into_iter().next() } else { None })
}

/// Lists checkpoints, oldest first, optionally of one sandbox and/or plan.
pub fn checkpoints(conn: &Connection, sandbox_id: Option<i64>, plan: Option<&str>) -> Result<Vec<Checkpoint>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE (?1 IS NULL OR c.sandbox_id = ?1) AND (?2 IS NULL OR c.plan = ?2)
         ORDER BY s.name, c.seq"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![sandbox_id, plan], checkpoint_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Which checkpoints a log shows.
#[derive(Clone, Copy)]
pub struct LogScope<'a> {
    /// One sandbox, else every sandbox of `owner`.
    pub sandbox_id: Option<i64>,
    /// Only sandboxes of this uid (`None`: everyone's).
    pub owner: Option<u32>,
    pub plan: Option<&'a str>,
}

/// Returns the newest `limit` checkpoints in `scope` (`None`: all), newest
/// first, and how many there are in all. Of one sandbox, the newest are
/// read through its (sandbox, seq) index, not sorted from all of them.
pub fn recent_checkpoints(
    conn: &Connection,
    scope: LogScope<'_>,
    limit: Option<u64>,
) -> Result<(Vec<Checkpoint>, u64)> {
    let filter =
        "(?1 IS NULL OR c.sandbox_id = ?1) AND (?2 IS NULL OR s.owner_uid = ?2) AND (?3 IS NULL OR c.plan = ?3)";
    let order = match scope.sandbox_id {
        Some(_) => "c.seq DESC",
        None => "c.created_ms DESC, c.id DESC",
    };
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE {filter} ORDER BY {order} LIMIT ?4"
    );
    let limit = limit.map_or(-1, |n| n.min(i64::MAX as u64) as i64);
    let args = params![scope.sandbox_id, scope.owner, scope.plan, limit];
    let mut stmt = conn.prepare_cached(&sql)?;
    let shown: Vec<Checkpoint> = stmt.query_map(args, checkpoint_from_row)?.collect::<rusqlite::Result<_>>()?;
    let count = format!("SELECT count(*) FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id WHERE {filter}");
    let total: i64 =
        conn.prepare_cached(&count)?.query_row(params![scope.sandbox_id, scope.owner, scope.plan], |r| r.get(0))?;
    Ok((shown, total as u64))
}

/// Returns the checkpoint at `seq` of a sandbox, if it exists.
pub fn checkpoint_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Option<Checkpoint>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.sandbox_id = ?1 AND c.seq = ?2"
    );
    Ok(conn.prepare_cached(&sql)?.query_row(params![sandbox_id, seq as i64], checkpoint_from_row).optional()?)
}

pub fn checkpoint_count(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT count(*) FROM checkpoints WHERE sandbox_id = ?1")?
        .query_row([sandbox_id], |r| r.get::<_, i64>(0))? as u64)
}

/// Marks broken every checkpoint whose state holds a version of a file
/// with one of `objects` (missing or corrupt in its store), with the reason
/// given for the first of them it holds. Returns the ids newly marked.
pub fn mark_broken(conn: &mut Connection, objects: &[(ObjectId, String)]) -> Result<Vec<String>> {
    let order: HashMap<ObjectId, usize> = objects.iter().enumerate().rev().map(|(i, (o, _))| (*o, i)).collect();
    // Immediate, as every transaction that reads before it writes: a
    // deferred one fails (SQLITE_BUSY_SNAPSHOT) when another connection
    // commits between its first read and its first write.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut marked = Vec::new();
    {
        // The versions holding them, found in one pass (there is no index
        // by object: see migration 0007).
        let mut hits = Vec::new();
        let mut scan = tx.prepare_cached(
            "SELECT sandbox_id, start_seq, end_seq, object FROM entries NOT INDEXED WHERE object IS NOT NULL",
        )?;
        let mut rows = scan.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(&i) = object_of(r, 3)?.and_then(|o| order.get(&o)) {
                hits.push((i, r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?));
            }
        }
        hits.sort_unstable();
        let mut find = tx.prepare_cached(
            "SELECT id FROM checkpoints WHERE sandbox_id = ?1 AND seq >= ?2 AND (?3 IS NULL OR seq < ?3)
               AND broken IS NULL",
        )?;
        let mut mark = tx.prepare_cached("UPDATE checkpoints SET broken = ?2 WHERE id = ?1")?;
        for (i, sandbox_id, start, end) in hits {
            let ids: Vec<String> =
                find.query_map(params![sandbox_id, start, end], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
            for id in ids {
                mark.execute(params![id, objects[i].1])?;
                marked.push(id);
            }
        }
    }
    tx.commit()?;
    Ok(marked)
}

/// Returns a sandbox's checkpoints as retention sees them, by seq.
pub fn retention_candidates(conn: &Connection, sandbox_id: i64) -> Result<Vec<Candidate>> {
    let mut stmt =
        conn.prepare_cached("SELECT id, seq, created_ms, pinned FROM checkpoints WHERE sandbox_id = ?1 ORDER BY seq")?;
    let rows = stmt.query_map([sandbox_id], |r| {
        Ok(Candidate { id: r.get(0)?, seq: r.get::<_, i64>(1)? as u64, created_ms: r.get(2)?, pinned: r.get(3)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes checkpoints of one sandbox, the versions no remaining checkpoint
/// needs, and re-points parents at the nearest remaining older checkpoint.
/// Returns the objects the deleted versions referenced (to collect those no
/// longer referenced anywhere).
pub fn delete_checkpoints(
    tx: &Transaction<'_>,
    sandbox_id: i64,
    ids: &[String],
    why: &str,
    now_ms: i64,
) -> Result<Vec<ObjectId>> {
    let mut seqs = Vec::with_capacity(ids.len());
    {
        let mut get = tx.prepare_cached("SELECT seq FROM checkpoints WHERE id = ?1 AND sandbox_id = ?2")?;
        let mut del = tx.prepare_cached("DELETE FROM checkpoints WHERE id = ?1 AND sandbox_id = ?2")?;
        let mut remember = tx
            .prepare_cached("INSERT OR REPLACE INTO pruned (id, sandbox_id, pruned_ms, why) VALUES (?1, ?2, ?3, ?4)")?;
        for id in ids {
            if let Some(seq) = get.query_row(params![id, sandbox_id], |r| r.get::<_, i64>(0)).optional()? {
                del.execute(params![id, sandbox_id])?;
                remember.execute(params![id, sandbox_id, now_ms, why])?;
                seqs.push(seq);
            }
        }
    }
    let (Some(&lo), Some(&hi)) = (seqs.iter().min(), seqs.iter().max()) else {
        return Ok(Vec::new());
    };
    // Only the checkpoints that followed a deleted one change parent: the
    // rest are read, not rewritten (each rewrite is a page in the log, and
    // with the default policy every checkpoint prunes one).
    let nearest = "(SELECT c2.id FROM checkpoints c2 WHERE c2.sandbox_id = checkpoints.sandbox_id
                    AND c2.seq < checkpoints.seq ORDER BY c2.seq DESC LIMIT 1)";
    tx.prepare_cached(&format!(
        "UPDATE checkpoints SET parent = {nearest} WHERE sandbox_id = ?1 AND seq > ?2 AND parent IS NOT {nearest}"
    ))?
    .execute(params![sandbox_id, lo])?;
    // A version is needed while some remaining checkpoint lies in its
    // interval; only versions that overlapped a deleted seq can lose that,
    // and such a version ended at the latest at the first checkpoint kept
    // after `hi`. That bound keeps the search to the versions ended in the
    // window (through `entries_end`), not every version older than `hi`.
    let next: i64 = tx
        .prepare_cached("SELECT min(seq) FROM checkpoints WHERE sandbox_id = ?1 AND seq > ?2")?
        .query_row(params![sandbox_id, hi], |r| r.get::<_, Option<i64>>(0))?
        .unwrap_or(i64::MAX);
    let orphan = "FROM entries INDEXED BY entries_end
         WHERE sandbox_id = ?1 AND end_seq IS NOT NULL AND end_seq > ?2 AND end_seq <= ?4 AND start_seq <= ?3
         AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.sandbox_id = entries.sandbox_id
                         AND c.seq >= entries.start_seq AND c.seq < entries.end_seq)";
    let mut objects = Vec::new();
    {
        let mut stmt = tx.prepare_cached(&format!("SELECT DISTINCT object {orphan} AND object IS NOT NULL"))?;
        for b in stmt.query_map(params![sandbox_id, lo, hi, next], |r| r.get::<_, Vec<u8>>(0))? {
            objects.extend(ObjectId::from_slice(&b?));
        }
    }
    tx.prepare_cached(&format!("DELETE {orphan}"))?.execute(params![sandbox_id, lo, hi, next])?;
    Ok(objects)
}

/// Returns the newest checkpoint of a sandbox older than `seq`.
pub fn previous_checkpoint(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Option<Checkpoint>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.sandbox_id = ?1 AND c.seq < ?2 ORDER BY c.seq DESC LIMIT 1"
    );
    Ok(conn.prepare_cached(&sql)?.query_row(params![sandbox_id, seq as i64], checkpoint_from_row).optional()?)
}
