//! Objects cloned before they were read (migration 16): the checkpoints
//! whose versions hold them, for the daemon's hasher, and how it points
//! those versions at their hash.

use super::*;

/// A checkpoint that added versions holding unhashed objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnhashedCheckpoint {
    pub sandbox_id: i64,
    pub seq: u64,
    /// Its sandbox's store.
    pub store: Vec<u8>,
}

/// Lists checkpoint `seq` of `sandbox_id` as one whose versions hold
/// unhashed objects. Called in the transaction that writes it.
pub fn list_unhashed(tx: &Transaction<'_>, sandbox_id: i64, seq: u64) -> Result<()> {
    tx.prepare_cached("INSERT OR IGNORE INTO unhashed_checkpoints (sandbox_id, seq) VALUES (?1, ?2)")?
        .execute(params![sandbox_id, seq as i64])?;
    Ok(())
}

/// The checkpoints listed by [`list_unhashed`], oldest first.
pub fn unhashed_checkpoints(conn: &Connection) -> Result<Vec<UnhashedCheckpoint>> {
    let mut stmt = conn.prepare_cached(
        "SELECT u.sandbox_id, u.seq, s.store FROM unhashed_checkpoints u JOIN sandboxes s ON s.id = u.sandbox_id
         ORDER BY u.sandbox_id, u.seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(UnhashedCheckpoint { sandbox_id: r.get(0)?, seq: r.get::<_, i64>(1)? as u64, store: r.get(2)? })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Up to `limit` versions that checkpoint `c` added and that hold an
/// unhashed object, with ids above `after`, in id order: (id, object).
pub fn unhashed_versions(
    conn: &Connection,
    c: &UnhashedCheckpoint,
    after: i64,
    limit: usize,
) -> Result<Vec<(i64, ObjectId)>> {
    // x'736e61706261636b3a756e6861736864' is 'snapback:unhashd', the end
    // of every unhashed object's id (`ObjectId::unhashed`).
    let mut stmt = conn.prepare_cached(
        "SELECT id, object FROM entries
         WHERE sandbox_id = ?1 AND start_seq = ?2 AND id > ?3
           AND substr(object, 17) = x'736e61706261636b3a756e6861736864'
         ORDER BY id LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![c.sandbox_id, c.seq as i64, after, limit as i64], |r| {
        Ok((r.get::<_, i64>(0)?, object_of(r, 1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, object) = row?;
        out.push((
            id,
            object.ok_or_else(|| CatalogueError::Damaged(format!("version {id}'s object is not 32 bytes")))?,
        ));
    }
    Ok(out)
}

/// Takes checkpoint `c` off the list: none of its versions holds an
/// unhashed object any more.
pub fn unlist_unhashed(conn: &Connection, c: &UnhashedCheckpoint) -> Result<()> {
    conn.prepare_cached("DELETE FROM unhashed_checkpoints WHERE sandbox_id = ?1 AND seq = ?2")?
        .execute(params![c.sandbox_id, c.seq as i64])?;
    Ok(())
}

/// Points version `id`, if it still holds the unhashed `object`, at
/// `hash`, the hash of its content; returns its path if it did. The
/// trigger of migration 16 moves what the sandbox holds from one object to
/// the other.
pub fn name_unhashed(tx: &Transaction<'_>, id: i64, object: &ObjectId, hash: &ObjectId) -> Result<Option<Vec<u8>>> {
    let mut stmt = tx.prepare_cached("UPDATE entries SET object = ?3 WHERE id = ?1 AND object = ?2 RETURNING path")?;
    Ok(stmt.query_row(params![id, object.0.as_slice(), hash.0.as_slice()], |r| r.get(0)).optional()?)
}
