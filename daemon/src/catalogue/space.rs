//! Space: the objects a store's versions reference, and the bytes a
//! sandbox or a checkpoint holds alone.

use super::*;

/// Returns the bytes of the distinct objects a sandbox's versions
/// reference: a counter the catalogue keeps (see migration 0015), up to
/// date once [`fold_held`] has run.
pub fn store_bytes(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn
        .prepare_cached("SELECT stored_bytes FROM sandboxes WHERE id = ?1")?
        .query_row([sandbox_id], |r| r.get::<_, i64>(0))? as u64)
}

/// Brings the sandboxes' objects and stored bytes (migration 0015) up to
/// date with the versions added and deleted since the last call. One read
/// when nothing is pending; else [`FOLD_CHUNK`] changes per transaction,
/// so that a checkpoint of a million files, folded after it, neither holds
/// the catalogue's write lock against the next checkpoint for long nor
/// the whole of it in memory. The caller is in no transaction.
pub fn fold_held(conn: &Connection) -> Result<()> {
    while fold_chunk(conn)? {}
    Ok(())
}

/// Changes folded per transaction by [`fold_held`].
const FOLD_CHUNK: i64 = 16 * 1024;

/// Folds the oldest [`FOLD_CHUNK`] pending changes; returns whether there
/// were any.
fn fold_chunk(conn: &Connection) -> Result<bool> {
    let pending: bool =
        conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM held_changes)")?.query_row([], |r| r.get(0))?;
    if !pending {
        return Ok(false);
    }
    let tx = Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    // Net changes by sandbox and object: the order of additions and
    // deletions does not matter to what is held at the end.
    let mut net: HashMap<(i64, ObjectId), (i64, i64)> = HashMap::new();
    let mut last = 0i64;
    {
        let mut stmt =
            tx.prepare_cached("SELECT id, sandbox_id, object, size, delta FROM held_changes ORDER BY id LIMIT ?1")?;
        let mut rows = stmt.query([FOLD_CHUNK])?;
        while let Some(r) = rows.next()? {
            last = r.get(0)?;
            let object =
                object_of(r, 2)?.ok_or_else(|| CatalogueError::Damaged("a held change has no object".into()))?;
            let change = net.entry((r.get(1)?, object)).or_insert((r.get(3)?, 0));
            change.1 += r.get::<_, i64>(4)?;
        }
    }
    let live: HashSet<i64> = {
        let mut stmt = tx.prepare_cached("SELECT id FROM sandboxes")?;
        stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?
    };
    let mut bytes: HashMap<i64, i64> = HashMap::new();
    {
        let mut held =
            tx.prepare_cached("SELECT versions FROM sandbox_objects WHERE sandbox_id = ?1 AND object = ?2")?;
        let mut put = tx.prepare_cached(
            "INSERT INTO sandbox_objects (sandbox_id, object, size, versions) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO UPDATE SET versions = excluded.versions",
        )?;
        let mut gone = tx.prepare_cached("DELETE FROM sandbox_objects WHERE sandbox_id = ?1 AND object = ?2")?;
        // In key order: neighbouring objects share pages. A purged
        // sandbox's changes have nothing left to count.
        let mut net: Vec<_> = net.into_iter().filter(|((s, _), (_, d))| *d != 0 && live.contains(s)).collect();
        net.sort_unstable_by_key(|(key, _)| *key);
        for ((sandbox, object), (size, delta)) in net {
            let key = params![sandbox, &object.0[..]];
            let was: i64 = held.query_row(key, |r| r.get(0)).optional()?.unwrap_or(0);
            let now = was + delta;
            if now > 0 {
                put.execute(params![sandbox, &object.0[..], size, now])?;
            } else {
                gone.execute(key)?;
            }
            match (was > 0, now > 0) {
                (false, true) => *bytes.entry(sandbox).or_default() += size,
                (true, false) => *bytes.entry(sandbox).or_default() -= size,
                _ => {}
            }
        }
    }
    for (sandbox, delta) in bytes {
        tx.prepare_cached("UPDATE sandboxes SET stored_bytes = stored_bytes + ?2 WHERE id = ?1")?
            .execute(params![sandbox, delta])?;
    }
    tx.prepare_cached("DELETE FROM held_changes WHERE id <= ?1")?.execute([last])?;
    tx.commit()?;
    Ok(true)
}

/// The objects, with their recorded sizes, that the versions of every
/// sandbox whose store is `?1` reference. An interrupted restore's desired
/// versions count too: the restart that finishes it needs their objects.
const REFERENCED: &str = "SELECT DISTINCT e.object, e.size FROM entries e JOIN sandboxes s ON s.id = e.sandbox_id
     WHERE s.store = ?1 AND e.object IS NOT NULL
     UNION
     SELECT DISTINCT p.object, p.size FROM intent_paths p JOIN intents i ON i.id = p.intent_id
     JOIN sandboxes s ON s.id = i.sandbox_id WHERE s.store = ?1 AND p.object IS NOT NULL";

/// Calls `each` with every object referenced by any sandbox whose store is
/// `store`, and its recorded size (an object may come more than once).
fn each_referenced(conn: &Connection, store: &[u8], mut each: impl FnMut(ObjectId, u64)) -> Result<()> {
    let mut stmt = conn.prepare_cached(REFERENCED)?;
    for r in stmt.query_map([store], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))? {
        let (b, size) = r?;
        let id =
            ObjectId::from_slice(&b).ok_or_else(|| CatalogueError::Damaged("an object id is not 32 bytes".into()))?;
        each(id, size as u64);
    }
    Ok(())
}

/// Returns every object referenced by any sandbox whose store is `store`,
/// with its recorded size.
pub fn referenced_objects(conn: &Connection, store: &[u8]) -> Result<HashMap<ObjectId, u64>> {
    let mut out = HashMap::new();
    each_referenced(conn, store, |id, size| {
        out.insert(id, size);
    })?;
    Ok(out)
}

/// The objects of [`referenced_objects`], sorted, without their sizes: a
/// third of the memory, for a garbage collection of a large store.
pub fn referenced_ids(conn: &Connection, store: &[u8]) -> Result<Vec<ObjectId>> {
    let mut out = Vec::new();
    each_referenced(conn, store, |id, _| out.push(id))?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Returns those of `objects` that no version of any sandbox using `store`
/// references, nor an interrupted restore's desired version (see
/// [`referenced_objects`]): a lookup of each in the sandboxes' objects
/// (see migration 0015, brought up to date first), and a read of the
/// interrupted restores' paths. The caller is in no transaction.
pub fn unreferenced(conn: &Connection, store: &[u8], objects: &[ObjectId]) -> Result<Vec<ObjectId>> {
    let mut unseen: HashSet<ObjectId> = objects.iter().copied().collect();
    if unseen.is_empty() {
        return Ok(Vec::new());
    }
    fold_held(conn)?;
    let mut restoring = conn.prepare_cached(
        "SELECT p.object FROM intent_paths p JOIN intents i ON i.id = p.intent_id
         JOIN sandboxes s ON s.id = i.sandbox_id WHERE s.store = ?1 AND p.object IS NOT NULL",
    )?;
    let mut rows = restoring.query([store])?;
    while let Some(r) = rows.next()? {
        if let Some(o) = object_of(r, 0)? {
            unseen.remove(&o);
        }
    }
    let mut held = conn.prepare_cached(HELD_IN_STORE)?;
    let mut out = Vec::new();
    for o in objects {
        if unseen.remove(o) && !held.query_row(params![store, &o.0[..]], |r| r.get::<_, bool>(0))? {
            out.push(*o);
        }
    }
    Ok(out)
}

/// Returns the bytes of the objects that this sandbox references and no
/// other sandbox of the same store does. The caller is in no transaction.
pub fn sandbox_exclusive_bytes(conn: &Connection, sandbox_id: i64, store: &[u8]) -> Result<u64> {
    fold_held(conn)?;
    Ok(conn.prepare_cached(EXCLUSIVE_BYTES)?.query_row(params![sandbox_id, store], |r| r.get::<_, i64>(0))? as u64)
}

// The two lookups of an object among the sandboxes of a store name those
// sandboxes in a list, so that each object is found through the primary
// key (sandbox, object). Written as a join, SQLite read every row of
// `sandbox_objects` for each object instead: pruning a checkpoint of
// 10,000 files on a 100,000-file sandbox took 140 s, with the sandbox and
// its store's collection locked (see the test of their plans).

/// Whether any sandbox of store `?1` holds object `?2`.
pub(super) const HELD_IN_STORE: &str = "SELECT EXISTS (SELECT 1 FROM sandbox_objects o
     WHERE o.sandbox_id IN (SELECT id FROM sandboxes WHERE store = ?1) AND o.object = ?2)";

/// The bytes of the objects sandbox `?1` holds and no other sandbox of
/// store `?2` does.
pub(super) const EXCLUSIVE_BYTES: &str =
    "SELECT coalesce(sum(a.size), 0) FROM sandbox_objects a WHERE a.sandbox_id = ?1
     AND NOT EXISTS (SELECT 1 FROM sandbox_objects b
                     WHERE b.sandbox_id IN (SELECT id FROM sandboxes WHERE store = ?2 AND id != ?1)
                       AND b.object = a.object)";

/// Returns the bytes of the objects that only checkpoint `seq` references:
/// what pruning it alone would free.
pub fn checkpoint_exclusive_bytes(conn: &Connection, sandbox_id: i64, seq: u64, store: &[u8]) -> Result<u64> {
    Ok(conn
        .prepare_cached(
            "WITH only_here AS MATERIALIZED (
             SELECT e.id, e.object, e.size FROM entries e
             WHERE e.sandbox_id = ?1 AND e.object IS NOT NULL AND e.start_seq <= ?2
               AND (e.end_seq IS NULL OR e.end_seq > ?2)
               AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.sandbox_id = ?1 AND c.seq != ?2
                               AND c.seq >= e.start_seq AND (e.end_seq IS NULL OR c.seq < e.end_seq)))
         SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT h.object, h.size FROM only_here h
             WHERE h.object NOT IN (SELECT x.object FROM entries x JOIN sandboxes s ON s.id = x.sandbox_id
                                    WHERE s.store = ?3 AND x.object IS NOT NULL
                                      AND x.id NOT IN (SELECT id FROM only_here)))",
        )?
        .query_row(params![sandbox_id, seq as i64, store], |r| r.get::<_, i64>(0))? as u64)
}
