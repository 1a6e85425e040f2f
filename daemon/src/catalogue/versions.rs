//! Path versions: a state at a checkpoint, the difference between two,
//! multi-link versions by inode.

use super::*;

pub(super) const ENTRY_COLS: &str =
    "id, path, kind, mode, uid, gid, size, mtime_ns, target, object, ctime_ns, ino, racy, nlink";

pub(super) fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Box<[u8]>, Row)> {
    let kind = Kind::parse(r.get_ref(2)?.as_str()?).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, "unknown entry kind".into())
    })?;
    let object = match r.get_ref(9)?.as_blob_or_null()? {
        None => None,
        Some(b) => Some(ObjectId::from_slice(b).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                9,
                rusqlite::types::Type::Blob,
                "object id is not 32 bytes".into(),
            )
        })?),
    };
    let row = Row {
        id: r.get(0)?,
        meta: Meta {
            kind,
            mode: r.get(3)?,
            uid: r.get(4)?,
            gid: r.get(5)?,
            size: r.get::<_, i64>(6)? as u64,
            mtime_ns: r.get(7)?,
            target: r.get_ref(8)?.as_blob_or_null()?.map(crate::manifest::Target::from),
            object,
        },
        key: StatKey {
            ctime_ns: r.get(10)?,
            ino: r.get::<_, i64>(11)? as u64,
            racy: r.get(12)?,
            nlink: r.get::<_, i64>(13)?.clamp(1, u32::MAX as i64) as u32,
        },
    };
    Ok((Box::from(r.get_ref(1)?.as_blob()?), row))
}

/// Returns the current version of every path of a sandbox.
pub fn current_rows(conn: &Connection, sandbox_id: i64) -> Result<Manifest> {
    let sql = format!("SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND end_seq IS NULL");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut out = crate::manifest::Builder::default();
    for r in stmt.query_map([sandbox_id], entry_from_row)? {
        let (path, row) = r?;
        out.insert(path, row);
    }
    Ok(out.finish())
}

/// Returns the object of `path`'s version at checkpoint `seq`, if it is a
/// file's. Reads the sandbox's versions up to `seq` (there is no index by
/// path, see migration 0006): for a rare lookup only.
pub fn object_at(conn: &Connection, sandbox_id: i64, path: &[u8], seq: u64) -> Result<Option<ObjectId>> {
    let mut stmt = conn.prepare_cached(
        "SELECT object FROM entries WHERE sandbox_id = ?1 AND path = ?2 AND start_seq <= ?3
           AND (end_seq IS NULL OR end_seq > ?3)",
    )?;
    Ok(stmt.query_row(params![sandbox_id, path, seq as i64], |r| object_of(r, 0)).optional()?.flatten())
}

/// Returns the state of a sandbox at checkpoint `seq`.
pub fn rows_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Manifest> {
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2
         AND (end_seq IS NULL OR end_seq > ?2)"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut out = crate::manifest::Builder::default();
    for r in stmt.query_map(params![sandbox_id, seq as i64], entry_from_row)? {
        let (path, row) = r?;
        out.insert(path, row);
    }
    Ok(out.finish())
}

/// Returns the file versions recorded at checkpoint `seq` with inode
/// number `ino` and more than one link (see [`crate::links`]).
pub fn linked_at(conn: &Connection, sandbox_id: i64, seq: u64, ino: u64) -> Result<Manifest> {
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND ino = ?3 AND nlink > 1 AND kind = 'file'
         AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut out = Manifest::default();
    for r in stmt.query_map(params![sandbox_id, seq as i64, ino as i64], entry_from_row)? {
        let (path, row) = r?;
        out.insert(path, row);
    }
    Ok(out)
}

/// The link groups of two checkpoints of a sandbox, read from the
/// catalogue: a restore's target and its live state.
pub struct LinkedAt<'a> {
    pub conn: &'a Connection,
    pub sandbox_id: i64,
    pub target: u64,
    pub live: u64,
}

impl crate::links::Linked for LinkedAt<'_> {
    fn linked(&self, live: bool, ino: u64) -> crate::error::Result<Manifest> {
        Ok(linked_at(self.conn, self.sandbox_id, if live { self.live } else { self.target }, ino)?)
    }
}

/// Returns the number of paths recorded at checkpoint `seq`.
pub fn count_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<u64> {
    Ok(conn
        .prepare_cached(
            "SELECT count(*) FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)",
        )?
        .query_row(params![sandbox_id, seq as i64], |r| r.get::<_, i64>(0))? as u64)
}

/// Returns the version of the directory `path` at checkpoint `seq`, if it
/// was a directory then (through the index of directory versions).
pub fn dir_at(conn: &Connection, sandbox_id: i64, seq: u64, path: &[u8]) -> Result<Option<Row>> {
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND kind = 'dir' AND path = ?3
         AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let found = stmt.query_row(params![sandbox_id, seq as i64, path], entry_from_row).optional()?;
    Ok(found.map(|(_, row)| row))
}

/// Whether the checkpoint at `seq` holds `path` or anything below it. Reads
/// the sandbox's versions (there is no index by path): for the rare request
/// that names a path the live tree lacks.
pub fn holds_path_at(conn: &Connection, sandbox_id: i64, seq: u64, path: &[u8]) -> Result<bool> {
    let mut below = path.to_vec();
    below.push(b'/');
    let mut past = path.to_vec();
    past.push(b'/' + 1);
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)
             AND (path = ?3 OR (path >= ?4 AND path < ?5)) LIMIT 1",
        )?
        .query_row(params![sandbox_id, seq as i64, path, below, past], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Returns, for two checkpoints `a < b`, the versions valid at `a` but not
/// at `b` and those valid at `b` but not at `a`: only the rows that begin
/// or end between them are read.
pub fn rows_between(conn: &Connection, sandbox_id: i64, a: u64, b: u64) -> Result<(Manifest, Manifest)> {
    debug_assert!(a < b);
    let sql_old = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND end_seq > ?2 AND end_seq <= ?3 AND start_seq <= ?2"
    );
    let sql_new = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND start_seq > ?2 AND start_seq <= ?3
         AND (end_seq IS NULL OR end_seq > ?3)"
    );
    let mut sides = Vec::with_capacity(2);
    for sql in [sql_old, sql_new] {
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut m = Manifest::default();
        for r in stmt.query_map(params![sandbox_id, a as i64, b as i64], entry_from_row)? {
            let (path, row) = r?;
            m.insert(path, row);
        }
        sides.push(m);
    }
    let new = sides.pop().unwrap_or_default();
    let old = sides.pop().unwrap_or_default();
    Ok((old, new))
}

/// A new version to record in a checkpoint.
pub struct NewRow {
    pub path: Vec<u8>,
    pub meta: Meta,
    pub key: StatKey,
}

/// The object id in column `i` of a version's row, if it has one.
pub(super) fn object_of(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<ObjectId>> {
    Ok(match row.get_ref(i)? {
        rusqlite::types::ValueRef::Blob(b) => ObjectId::from_slice(b),
        _ => None,
    })
}

/// Returns (sandbox name, path) of every path with more than one current
/// version. A checkpoint ends the versions it replaces by id (there is no
/// unique index by path, see migration 0006), so this is `verify`'s check
/// that none ever added a second one. Reads every row.
pub fn paths_current_twice(conn: &Connection) -> Result<Vec<(String, Vec<u8>)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.name, e.path FROM entries e JOIN sandboxes s ON s.id = e.sandbox_id
         WHERE e.end_seq IS NULL GROUP BY e.sandbox_id, e.path HAVING count(*) > 1 ORDER BY s.name, e.path",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
