//! Space: the objects a store's versions reference, and the bytes a
//! sandbox or a checkpoint holds alone.

use super::*;

/// Returns the bytes of the distinct objects a sandbox's versions reference.
pub fn store_bytes(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT object, size FROM entries
         WHERE sandbox_id = ?1 AND object IS NOT NULL)",
        [sandbox_id],
        |r| r.get::<_, i64>(0),
    )? as u64)
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
    let mut stmt = conn.prepare(REFERENCED)?;
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
/// [`referenced_objects`]). Reads the store's versions once, in table
/// order: there is no index by object (see migration 0007).
pub fn unreferenced(conn: &Connection, store: &[u8], objects: &[ObjectId]) -> Result<Vec<ObjectId>> {
    let mut unseen: HashSet<ObjectId> = objects.iter().copied().collect();
    if unseen.is_empty() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT object FROM entries NOT INDEXED
         WHERE object IS NOT NULL AND sandbox_id IN (SELECT id FROM sandboxes WHERE store = ?1)
         UNION ALL
         SELECT p.object FROM intent_paths p JOIN intents i ON i.id = p.intent_id
         JOIN sandboxes s ON s.id = i.sandbox_id WHERE s.store = ?1 AND p.object IS NOT NULL",
    )?;
    let mut rows = stmt.query([store])?;
    while let Some(r) = rows.next()? {
        if let Some(o) = object_of(r, 0)? {
            unseen.remove(&o);
            if unseen.is_empty() {
                break;
            }
        }
    }
    Ok(objects.iter().filter(|o| unseen.remove(o)).copied().collect())
}

/// Returns the bytes of the objects that this sandbox references and no
/// other sandbox of the same store does.
pub fn sandbox_exclusive_bytes(conn: &Connection, sandbox_id: i64, store: &[u8]) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT e.object, e.size FROM entries e
         WHERE e.sandbox_id = ?1 AND e.object IS NOT NULL
           AND e.object NOT IN (SELECT o.object FROM entries o JOIN sandboxes s ON s.id = o.sandbox_id
                                WHERE o.sandbox_id != ?1 AND s.store = ?2 AND o.object IS NOT NULL))",
        params![sandbox_id, store],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// Returns the bytes of the objects that only checkpoint `seq` references:
/// what pruning it alone would free.
pub fn checkpoint_exclusive_bytes(conn: &Connection, sandbox_id: i64, seq: u64, store: &[u8]) -> Result<u64> {
    Ok(conn.query_row(
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
        params![sandbox_id, seq as i64, store],
        |r| r.get::<_, i64>(0),
    )? as u64)
}
