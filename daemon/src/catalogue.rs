//! The SQLite catalogue: sandboxes, checkpoints and path versions.
//!
//! The schema changes only through the numbered files in `migrations/`,
//! embedded here and applied in order at open; `PRAGMA user_version` holds
//! the number of the last one applied. A database from a newer schema is
//! refused, never guessed at.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use snapback::proto::{CheckpointInfo, CheckpointKind, CloneMethod, PlanState};

use crate::error::{Error, Result};
use crate::manifest::{Kind, Manifest, Meta, ObjectId, Row, StatKey};
use crate::retention::Candidate;
use crate::sys::Identity;

/// The migrations, in order. Migration `i` (from 0) takes the schema from
/// version `i` to `i + 1`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init.sql", include_str!("../../migrations/0001_init.sql")),
    ("0002_plans_retention.sql", include_str!("../../migrations/0002_plans_retention.sql")),
    ("0003_restore_intents.sql", include_str!("../../migrations/0003_restore_intents.sql")),
    ("0004_broken_checkpoints.sql", include_str!("../../migrations/0004_broken_checkpoints.sql")),
    ("0005_log_generation.sql", include_str!("../../migrations/0005_log_generation.sql")),
    ("0006_no_current_path_index.sql", include_str!("../../migrations/0006_no_current_path_index.sql")),
    ("0007_no_object_index.sql", include_str!("../../migrations/0007_no_object_index.sql")),
    ("0008_pinned_roots.sql", include_str!("../../migrations/0008_pinned_roots.sql")),
    ("0009_catalogue_id.sql", include_str!("../../migrations/0009_catalogue_id.sql")),
    ("0010_restore_checkpoints.sql", include_str!("../../migrations/0010_restore_checkpoints.sql")),
    ("0011_pruned.sql", include_str!("../../migrations/0011_pruned.sql")),
    ("0012_link_counts.sql", include_str!("../../migrations/0012_link_counts.sql")),
    ("0013_link_index.sql", include_str!("../../migrations/0013_link_index.sql")),
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Opens (creating if needed) the catalogue at `path` and brings its schema
/// up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Whether the catalogue at `path` holds nothing yet: missing, empty (a
/// 0-byte file is an empty database to SQLite), or without any schema.
/// Read before [`open`] writes one.
pub fn is_new(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::Internal(format!("reading the catalogue: {e}"))),
        Ok(m) if m.len() == 0 => return Ok(true),
        Ok(_) => {}
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok(version == 0)
}

/// The catalogue's id, which its stores record.
pub fn catalogue_id(conn: &Connection) -> Result<String> {
    Ok(conn.query_row("SELECT id FROM catalogue_id", [], |r| r.get(0))?)
}

/// Opens a further connection to an already migrated catalogue.
pub fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    configure(&conn)?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // No memory map: every write by another connection (each request's,
    // and the log checkpointer's after it) makes SQLite unmap the whole
    // map at the next read transaction and fault the pages back in, which
    // cost more than the reads it saved (a checkpoint of 100 files on a
    // 100k-file tree: 11.8 -> 9.7 ms without it).
    conn.pragma_update(None, "mmap_size", 0i64)?;
    // The write-ahead log is copied back by a [`crate::wal::WalCheckpointer`],
    // off the request path, not inside whichever commit crosses 1,000 pages.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(())
}

/// Applies every migration past the database's version, each in its own
/// transaction together with the version bump.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(Error::Internal(format!(
            "the catalogue has schema version {current}, newer than this snapbackd understands \
             ({SCHEMA_VERSION}); run a newer snapbackd or restore an older state directory"
        )));
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| Error::Internal(format!("applying migration {name}: {e}")))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

/// A registered sandbox, as stored.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: i64,
    pub name: String,
    pub root: Vec<u8>,
    pub store: Vec<u8>,
    pub clone_method: CloneMethod,
    pub clone_note: String,
    pub excludes: Vec<String>,
    pub owner_uid: u32,
    pub state: String,
    pub head_seq: u64,
    pub created_ms: i64,
    /// The root's device and inode when it was registered; `None` for a
    /// sandbox registered before they were recorded.
    pub identity: Option<Identity>,
    /// Why the root is no longer the registered directory, once an
    /// operation found it so; cleared by registering it again.
    pub moved: Option<String>,
}

const SANDBOX_COLS: &str = "id, name, root, store, clone_method, clone_note, excludes, owner_uid, state, head_seq, \
     created_ms, root_dev, root_ino, moved";

fn sandbox_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Sandbox> {
    let method: String = r.get(4)?;
    let excludes: String = r.get(6)?;
    Ok(Sandbox {
        id: r.get(0)?,
        name: r.get(1)?,
        root: r.get(2)?,
        store: r.get(3)?,
        clone_method: CloneMethod::parse(&method).unwrap_or(CloneMethod::Copy),
        clone_note: r.get(5)?,
        excludes: serde_json::from_str(&excludes).unwrap_or_default(),
        owner_uid: r.get(7)?,
        state: r.get(8)?,
        head_seq: r.get::<_, i64>(9)? as u64,
        created_ms: r.get(10)?,
        identity: identity_from(r.get(11)?, r.get(12)?),
        moved: r.get(13)?,
    })
}

fn identity_from(dev: Option<i64>, ino: Option<i64>) -> Option<Identity> {
    Some(Identity { dev: dev? as u64, ino: ino? as u64 })
}

pub fn sandboxes(conn: &Connection) -> Result<Vec<Sandbox>> {
    let mut stmt = conn.prepare(&format!("SELECT {SANDBOX_COLS} FROM sandboxes ORDER BY name"))?;
    let rows = stmt.query_map([], sandbox_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Finds a sandbox by name, or by its root path given as an absolute path.
pub fn sandbox_by_ref(conn: &Connection, reference: &str) -> Result<Sandbox> {
    let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE name = ?1 OR root = ?2");
    conn.query_row(&sql, params![reference, reference.as_bytes()], sandbox_from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no sandbox named or rooted at {reference:?}")))
}

pub fn sandbox_by_id(conn: &Connection, id: i64) -> Result<Sandbox> {
    let sql = format!("SELECT {SANDBOX_COLS} FROM sandboxes WHERE id = ?1");
    conn.query_row(&sql, [id], sandbox_from_row)
        .optional()?
        .ok_or_else(|| Error::NotFound(format!("no sandbox with id {id}")))
}

/// Inserts a sandbox and returns its id.
pub fn insert_sandbox(conn: &Connection, s: &Sandbox) -> Result<i64> {
    conn.execute(
        "INSERT INTO sandboxes (name, root, store, clone_method, clone_note, excludes, owner_uid, state, head_seq,
                                created_ms, root_dev, root_ino)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', 0, ?8, ?9, ?10)",
        params![
            s.name,
            s.root,
            s.store,
            s.clone_method.as_str(),
            s.clone_note,
            serde_json::to_string(&s.excludes).map_err(|e| Error::Internal(e.to_string()))?,
            s.owner_uid,
            s.created_ms,
            s.identity.map(|i| i.dev as i64),
            s.identity.map(|i| i.ino as i64),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn set_sandbox_state(conn: &Connection, id: i64, state: &str) -> Result<()> {
    conn.execute("UPDATE sandboxes SET state = ?2 WHERE id = ?1", params![id, state])?;
    Ok(())
}

/// Records the directory a sandbox's root now is (registered again, or
/// adopted by a sandbox from before identities were recorded), and clears
/// its `moved` note.
pub fn set_sandbox_identity(conn: &Connection, id: i64, identity: Identity) -> Result<()> {
    conn.execute(
        "UPDATE sandboxes SET root_dev = ?2, root_ino = ?3, moved = NULL WHERE id = ?1",
        params![id, identity.dev as i64, identity.ino as i64],
    )?;
    Ok(())
}

/// Records why a sandbox's root is no longer the registered directory.
pub fn set_sandbox_moved(conn: &Connection, id: i64, why: &str) -> Result<()> {
    conn.execute("UPDATE sandboxes SET moved = ?2 WHERE id = ?1", params![id, why])?;
    Ok(())
}

/// The recorded identity of the store at `path`, if it was opened before.
pub fn store_identity(conn: &Connection, path: &[u8]) -> Result<Option<Identity>> {
    Ok(conn
        .query_row("SELECT dev, ino FROM stores WHERE path = ?1", [path], |r| {
            Ok(Identity { dev: r.get::<_, i64>(0)? as u64, ino: r.get::<_, i64>(1)? as u64 })
        })
        .optional()?)
}

/// Records the identity of a store opened for the first time.
pub fn insert_store(conn: &Connection, path: &[u8], identity: Identity) -> Result<()> {
    conn.execute(
        "INSERT INTO stores (path, dev, ino) VALUES (?1, ?2, ?3)",
        params![path, identity.dev as i64, identity.ino as i64],
    )?;
    Ok(())
}

pub fn delete_sandbox(conn: &Connection, id: i64) -> Result<()> {
    conn.execute("DELETE FROM sandboxes WHERE id = ?1", [id])?;
    Ok(())
}

const ENTRY_COLS: &str = "id, path, kind, mode, uid, gid, size, mtime_ns, target, object, ctime_ns, ino, racy, nlink";

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, Row)> {
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
            target: r.get(8)?,
            object,
        },
        key: StatKey {
            ctime_ns: r.get(10)?,
            ino: r.get::<_, i64>(11)? as u64,
            racy: r.get(12)?,
            nlink: r.get::<_, i64>(13)?.clamp(1, u32::MAX as i64) as u32,
        },
    };
    Ok((r.get(1)?, row))
}

/// Returns the current version of every path of a sandbox.
pub fn current_rows(conn: &Connection, sandbox_id: i64) -> Result<Manifest> {
    let sql = format!("SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND end_seq IS NULL");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut out = Manifest::default();
    for r in stmt.query_map([sandbox_id], entry_from_row)? {
        let (path, row) = r?;
        out.insert(path, row);
    }
    Ok(out)
}

/// Returns the state of a sandbox at checkpoint `seq`.
pub fn rows_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Manifest> {
    let sql = format!(
        "SELECT {ENTRY_COLS} FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2
         AND (end_seq IS NULL OR end_seq > ?2)"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut out = Manifest::default();
    for r in stmt.query_map(params![sandbox_id, seq as i64], entry_from_row)? {
        let (path, row) = r?;
        out.insert(path, row);
    }
    Ok(out)
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
    fn linked(&self, live: bool, ino: u64) -> Result<Manifest> {
        linked_at(self.conn, self.sandbox_id, if live { self.live } else { self.target }, ino)
    }
}

/// Returns the number of paths recorded at checkpoint `seq`.
pub fn count_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT count(*) FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)",
        params![sandbox_id, seq as i64],
        |r| r.get::<_, i64>(0),
    )? as u64)
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
        .query_row(
            "SELECT 1 FROM entries WHERE sandbox_id = ?1 AND start_seq <= ?2 AND (end_seq IS NULL OR end_seq > ?2)
             AND (path = ?3 OR (path >= ?4 AND path < ?5)) LIMIT 1",
            params![sandbox_id, seq as i64, path, below, past],
            |_| Ok(()),
        )
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
    let head: i64 = tx.query_row("SELECT head_seq FROM sandboxes WHERE id = ?1", [w.sandbox_id], |r| r.get(0))?;
    if head + 1 != seq {
        return Err(Error::Internal(format!("checkpoint seq {seq} does not follow head {head}")));
    }
    let i = w.info;
    tx.execute(
        "INSERT INTO checkpoints (id, sandbox_id, seq, parent, plan, reason, tool, phase, labels, kind, pinned,
                                  created_ms, scan_start_ns, files, dirs, symlinks, bytes, changed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
        params![
            i.id,
            w.sandbox_id,
            seq,
            i.parent,
            i.plan,
            i.reason,
            i.tool,
            i.phase,
            serde_json::to_string(&i.labels).map_err(|e| Error::Internal(e.to_string()))?,
            i.kind.as_str(),
            i.pinned,
            i.created_unix_ms,
            w.scan_start_ns,
            i.files as i64,
            i.dirs as i64,
            i.symlinks as i64,
            i.bytes as i64,
            i.changed as i64
        ],
    )?;
    let mut ids = Vec::with_capacity(w.added.len());
    {
        let mut end = tx.prepare_cached("UPDATE entries SET end_seq = ?2 WHERE id = ?1 AND end_seq IS NULL")?;
        for id in w.ended {
            // The guard of one current version per path: a version this
            // checkpoint replaces must still be current.
            if end.execute(params![id, seq])? != 1 {
                return Err(Error::Stale(format!(
                    "path version {id} is not current: the checkpoint is not written (the next one compares the whole tree with the catalogue)"
                )));
            }
        }
        let mut add = tx.prepare_cached(
            "INSERT INTO entries (sandbox_id, path, start_seq, kind, mode, uid, gid, size, mtime_ns, target, object,
                                  ctime_ns, ino, racy, nlink)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        for r in w.added {
            let m = &r.meta;
            add.insert(params![
                w.sandbox_id,
                r.path,
                seq,
                m.kind.as_str(),
                m.mode,
                m.uid,
                m.gid,
                m.size as i64,
                m.mtime_ns,
                m.target,
                m.object.as_ref().map(|o| o.0.as_slice()),
                r.key.ctime_ns,
                r.key.ino as i64,
                r.key.racy,
                r.key.nlink
            ])
            .map(|id| ids.push(id))?;
        }
        let mut rekey =
            tx.prepare_cached("UPDATE entries SET ctime_ns = ?2, ino = ?3, racy = ?4, nlink = ?5 WHERE id = ?1")?;
        for (_, id, key) in w.rekeyed {
            rekey.execute(params![id, key.ctime_ns, key.ino as i64, key.racy, key.nlink])?;
        }
    }
    tx.execute("UPDATE sandboxes SET head_seq = ?2 WHERE id = ?1", params![w.sandbox_id, seq])?;
    Ok(ids)
}

/// A checkpoint as stored, with the sandbox it belongs to.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub sandbox_id: i64,
    pub info: CheckpointInfo,
}

const CHECKPOINT_COLS: &str =
    "c.id, c.sandbox_id, s.name, c.seq, c.parent, c.plan, c.reason, c.tool, c.phase, c.labels,
     c.kind, c.pinned, c.created_ms, c.files, c.dirs, c.symlinks, c.bytes, c.changed, c.broken";

fn checkpoint_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    let labels: String = r.get(9)?;
    let kind: String = r.get(10)?;
    Ok(Checkpoint {
        sandbox_id: r.get(1)?,
        info: CheckpointInfo {
            id: r.get(0)?,
            sandbox: r.get(2)?,
            seq: r.get::<_, i64>(3)? as u64,
            parent: r.get(4)?,
            plan: r.get(5)?,
            reason: r.get(6)?,
            tool: r.get(7)?,
            phase: r.get(8)?,
            labels: serde_json::from_str::<BTreeMap<String, String>>(&labels).unwrap_or_default(),
            kind: CheckpointKind::parse(&kind).unwrap_or_default(),
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
        return Err(Error::InvalidRequest(format!("{reference:?} is not a checkpoint id or id prefix")));
    }
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.id GLOB ?1 ORDER BY c.id LIMIT 2"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let found: Vec<Checkpoint> =
        stmt.query_map([format!("{prefix}*")], checkpoint_from_row)?.collect::<rusqlite::Result<_>>()?;
    match found.len() {
        0 => Err(Error::NotFound(format!("no checkpoint {reference}"))),
        1 => Ok(found.into_iter().next().unwrap_or_else(|| unreachable!())),
        _ => Err(Error::Ambiguous(format!("{reference} matches more than one checkpoint; give more of the id"))),
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
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params![sandbox_id, plan], checkpoint_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Returns the checkpoint at `seq` of a sandbox, if it exists.
pub fn checkpoint_at(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Option<Checkpoint>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.sandbox_id = ?1 AND c.seq = ?2"
    );
    Ok(conn.query_row(&sql, params![sandbox_id, seq as i64], checkpoint_from_row).optional()?)
}

pub fn checkpoint_count(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn.query_row("SELECT count(*) FROM checkpoints WHERE sandbox_id = ?1", [sandbox_id], |r| r.get::<_, i64>(0))?
        as u64)
}

/// Returns the bytes of the distinct objects a sandbox's versions reference.
pub fn store_bytes(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn.query_row(
        "SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT object, size FROM entries
         WHERE sandbox_id = ?1 AND object IS NOT NULL)",
        [sandbox_id],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// Returns every object referenced by any sandbox whose store is `store`,
/// with its recorded size.
pub fn referenced_objects(conn: &Connection, store: &[u8]) -> Result<HashMap<ObjectId, u64>> {
    // An interrupted restore's desired versions count too: the restart
    // that finishes it needs their objects.
    let mut stmt = conn.prepare(
        "SELECT DISTINCT e.object, e.size FROM entries e JOIN sandboxes s ON s.id = e.sandbox_id
         WHERE s.store = ?1 AND e.object IS NOT NULL
         UNION
         SELECT DISTINCT p.object, p.size FROM intent_paths p JOIN intents i ON i.id = p.intent_id
         JOIN sandboxes s ON s.id = i.sandbox_id WHERE s.store = ?1 AND p.object IS NOT NULL",
    )?;
    let mut out = HashMap::new();
    for r in stmt.query_map([store], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))? {
        let (b, size) = r?;
        let id = ObjectId::from_slice(&b).ok_or_else(|| Error::Internal("an object id is not 32 bytes".into()))?;
        out.insert(id, size as u64);
    }
    Ok(out)
}

/// Returns the distinct object stores in use.
pub fn stores(conn: &Connection) -> Result<Vec<Vec<u8>>> {
    let mut stmt = conn.prepare("SELECT DISTINCT store FROM sandboxes")?;
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

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
        .query_row("SELECT id, sandbox_id, state, created_ms, updated_ms FROM plans WHERE id = ?1", [id], |r| {
            let state: String = r.get(2)?;
            Ok(Plan {
                id: r.get(0)?,
                sandbox_id: r.get(1)?,
                state: PlanState::parse(&state).unwrap_or(PlanState::Active),
                created_ms: r.get(3)?,
                updated_ms: r.get(4)?,
            })
        })
        .optional()?)
}

/// Creates the plan `id` for a sandbox if it does not exist yet.
pub fn ensure_plan(tx: &Transaction<'_>, id: &str, sandbox_id: i64, now_ms: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO plans (id, sandbox_id, state, created_ms, updated_ms) VALUES (?1, ?2, 'active', ?3, ?3)
         ON CONFLICT (id) DO UPDATE SET updated_ms = ?3",
        params![id, sandbox_id, now_ms],
    )?;
    Ok(())
}

/// Moves a plan from `active` to `state`, atomically: returns false when the
/// plan was not active (someone else moved it first).
pub fn close_plan(conn: &Connection, id: &str, state: PlanState, now_ms: i64) -> Result<bool> {
    let n = conn.execute(
        "UPDATE plans SET state = ?2, updated_ms = ?3 WHERE id = ?1 AND state = 'active'",
        params![id, state.as_str(), now_ms],
    )?;
    Ok(n == 1)
}

/// Records a rollback, revert or undo.
pub fn record_rollback(
    conn: &Connection,
    sandbox_id: i64,
    kind: &str,
    target: &str,
    safety: &str,
    now_ms: i64,
) -> Result<()> {
    conn.execute(
        "INSERT INTO rollbacks (sandbox_id, kind, target, safety, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![sandbox_id, kind, target, safety, now_ms],
    )?;
    Ok(())
}

/// Returns (kind, target, safety checkpoint) of a sandbox's latest
/// rollback, revert or undo.
pub fn latest_rollback(conn: &Connection, sandbox_id: i64) -> Result<Option<(String, String, String)>> {
    Ok(conn
        .query_row(
            "SELECT kind, target, safety FROM rollbacks WHERE sandbox_id = ?1 ORDER BY id DESC LIMIT 1",
            [sandbox_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

/// A restore in progress, or the outcome of one finished after a crash.
#[derive(Clone, Debug)]
pub struct Intent {
    pub id: i64,
    pub sandbox_id: i64,
    pub kind: String,
    pub target: String,
    pub filter: Vec<Vec<u8>>,
    pub force: bool,
    pub safety: Option<String>,
    pub state: String,
    pub note: Option<String>,
    pub updated_ms: i64,
}

const INTENT_COLS: &str = "id, sandbox_id, kind, target, filter, force, safety, state, note, updated_ms";

fn intent_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Intent> {
    let filter: Option<Vec<u8>> = r.get(4)?;
    Ok(Intent {
        id: r.get(0)?,
        sandbox_id: r.get(1)?,
        kind: r.get(2)?,
        target: r.get(3)?,
        filter: filter.map(|f| f.split(|&b| b == 0).map(<[u8]>::to_vec).collect()).unwrap_or_default(),
        force: r.get(5)?,
        safety: r.get(6)?,
        state: r.get(7)?,
        note: r.get(8)?,
        updated_ms: r.get(9)?,
    })
}

/// Records a restore about to start (state `pending`). Returns its id.
pub fn begin_intent(
    conn: &Connection,
    sandbox_id: i64,
    kind: &str,
    target: &str,
    filter: &[Vec<u8>],
    force: bool,
    now_ms: i64,
) -> Result<i64> {
    let filter = (!filter.is_empty()).then(|| filter.join(&0u8));
    conn.execute(
        "INSERT INTO intents (sandbox_id, kind, target, filter, force, state, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
        params![sandbox_id, kind, target, filter, force, now_ms],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Records a restore's safety checkpoint, in the caller's transaction (the
/// one that writes it). The target and the safety checkpoint determine the
/// version every touched path must end with (see
/// `Engine::resume_one`), so no path is written here.
pub fn intent_applying(tx: &Transaction<'_>, id: i64, safety: &str, now_ms: i64) -> Result<()> {
    tx.execute(
        "UPDATE intents SET state = 'applying', safety = ?2, updated_ms = ?3 WHERE id = ?1",
        params![id, safety, now_ms],
    )?;
    Ok(())
}

/// Returns the desired versions an `applying` intent recorded path by path,
/// as earlier daemons did (migration 3): those to exist, and the paths that
/// must not. Empty for an intent recorded since.
pub fn intent_paths(conn: &Connection, id: i64) -> Result<(Manifest, Vec<Vec<u8>>)> {
    let mut stmt = conn.prepare(
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

/// Deletes a finished restore's intent.
pub fn end_intent(conn: &Connection, id: i64) -> Result<()> {
    conn.execute("DELETE FROM intents WHERE id = ?1", [id])?;
    Ok(())
}

/// Deletes a restore's intent once it succeeded, together with the
/// sandbox's recorded outcomes of earlier ones: the sandbox is at a state
/// the client asked for, so `status` has nothing left to report.
pub fn finish_intent(conn: &Connection, id: i64) -> Result<()> {
    conn.execute(
        "DELETE FROM intents WHERE id = ?1
            OR (state IN ('resumed', 'failed') AND sandbox_id = (SELECT sandbox_id FROM intents WHERE id = ?1))",
        [id],
    )?;
    Ok(())
}

/// Records how an interrupted restore ended (`resumed` or `failed`) and
/// drops its paths; earlier outcomes of the sandbox are dropped.
pub fn settle_intent(conn: &Connection, intent: &Intent, state: &str, note: &str, now_ms: i64) -> Result<()> {
    conn.execute("DELETE FROM intent_paths WHERE intent_id = ?1", [intent.id])?;
    conn.execute(
        "DELETE FROM intents WHERE sandbox_id = ?1 AND id != ?2 AND state IN ('resumed', 'failed')",
        params![intent.sandbox_id, intent.id],
    )?;
    conn.execute(
        "UPDATE intents SET state = ?2, note = ?3, updated_ms = ?4 WHERE id = ?1",
        params![intent.id, state, note, now_ms],
    )?;
    Ok(())
}

/// Returns one intent, if it is still recorded.
pub fn intent(conn: &Connection, id: i64) -> Result<Option<Intent>> {
    let sql = format!("SELECT {INTENT_COLS} FROM intents WHERE id = ?1");
    Ok(conn.query_row(&sql, [id], intent_from_row).optional()?)
}

/// Returns the intents in `states`, oldest first.
pub fn intents(conn: &Connection, states: &[&str], sandbox_id: Option<i64>) -> Result<Vec<Intent>> {
    let list = states.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "SELECT {INTENT_COLS} FROM intents WHERE state IN ({list}) AND (?1 IS NULL OR sandbox_id = ?1) ORDER BY id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([sandbox_id], intent_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        let mut scan = tx.prepare(
            "SELECT sandbox_id, start_seq, end_seq, object FROM entries NOT INDEXED WHERE object IS NOT NULL",
        )?;
        let mut rows = scan.query([])?;
        while let Some(r) = rows.next()? {
            if let Some(&i) = object_of(r, 3)?.and_then(|o| order.get(&o)) {
                hits.push((i, r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<i64>>(2)?));
            }
        }
        hits.sort_unstable();
        let mut find = tx.prepare(
            "SELECT id FROM checkpoints WHERE sandbox_id = ?1 AND seq >= ?2 AND (?3 IS NULL OR seq < ?3)
               AND broken IS NULL",
        )?;
        let mut mark = tx.prepare("UPDATE checkpoints SET broken = ?2 WHERE id = ?1")?;
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

/// The object id in column `i` of a version's row, if it has one.
fn object_of(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Option<ObjectId>> {
    Ok(match row.get_ref(i)? {
        rusqlite::types::ValueRef::Blob(b) => ObjectId::from_slice(b),
        _ => None,
    })
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
    tx.execute(
        &format!(
            "UPDATE checkpoints SET parent = {nearest} WHERE sandbox_id = ?1 AND seq > ?2 AND parent IS NOT {nearest}"
        ),
        params![sandbox_id, lo],
    )?;
    // A version is needed while some remaining checkpoint lies in its
    // interval; only versions that overlapped a deleted seq can lose that,
    // and such a version ended at the latest at the first checkpoint kept
    // after `hi`. That bound keeps the search to the versions ended in the
    // window (through `entries_end`), not every version older than `hi`.
    let next: i64 = tx
        .query_row(
            "SELECT min(seq) FROM checkpoints WHERE sandbox_id = ?1 AND seq > ?2",
            params![sandbox_id, hi],
            |r| r.get::<_, Option<i64>>(0),
        )?
        .unwrap_or(i64::MAX);
    let orphan = "FROM entries INDEXED BY entries_end
         WHERE sandbox_id = ?1 AND end_seq IS NOT NULL AND end_seq > ?2 AND end_seq <= ?4 AND start_seq <= ?3
         AND NOT EXISTS (SELECT 1 FROM checkpoints c WHERE c.sandbox_id = entries.sandbox_id
                         AND c.seq >= entries.start_seq AND c.seq < entries.end_seq)";
    let mut objects = Vec::new();
    {
        let mut stmt = tx.prepare(&format!("SELECT DISTINCT object {orphan} AND object IS NOT NULL"))?;
        for b in stmt.query_map(params![sandbox_id, lo, hi, next], |r| r.get::<_, Vec<u8>>(0))? {
            objects.extend(ObjectId::from_slice(&b?));
        }
    }
    tx.execute(&format!("DELETE {orphan}"), params![sandbox_id, lo, hi, next])?;
    Ok(objects)
}

/// Returns (sandbox name, path) of every path with more than one current
/// version. A checkpoint ends the versions it replaces by id (there is no
/// unique index by path, see migration 0006), so this is `verify`'s check
/// that none ever added a second one. Reads every row.
pub fn paths_current_twice(conn: &Connection) -> Result<Vec<(String, Vec<u8>)>> {
    let mut stmt = conn.prepare(
        "SELECT s.name, e.path FROM entries e JOIN sandboxes s ON s.id = e.sandbox_id
         WHERE e.end_seq IS NULL GROUP BY e.sandbox_id, e.path HAVING count(*) > 1 ORDER BY s.name, e.path",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
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

/// Returns the newest checkpoint of a sandbox older than `seq`.
pub fn previous_checkpoint(conn: &Connection, sandbox_id: i64, seq: u64) -> Result<Option<Checkpoint>> {
    let sql = format!(
        "SELECT {CHECKPOINT_COLS} FROM checkpoints c JOIN sandboxes s ON s.id = c.sandbox_id
         WHERE c.sandbox_id = ?1 AND c.seq < ?2 ORDER BY c.seq DESC LIMIT 1"
    );
    Ok(conn.query_row(&sql, params![sandbox_id, seq as i64], checkpoint_from_row).optional()?)
}

pub fn add_budget_pruned(conn: &Connection, sandbox_id: i64, n: u64) -> Result<()> {
    conn.execute(
        "UPDATE sandboxes SET budget_pruned = budget_pruned + ?2 WHERE id = ?1",
        params![sandbox_id, n as i64],
    )?;
    Ok(())
}

pub fn budget_pruned(conn: &Connection, sandbox_id: i64) -> Result<u64> {
    Ok(conn.query_row("SELECT budget_pruned FROM sandboxes WHERE id = ?1", [sandbox_id], |r| r.get::<_, i64>(0))?
        as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_to_an_empty_database() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("c.db")).unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        for table in ["sandboxes", "checkpoints", "entries", "plans", "rollbacks"] {
            let n: i64 = conn
                .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(n, 1, "table {table} missing");
        }
        // Versions are indexed by checkpoint, and multi-link ones by inode
        // (migration 13): an index of every version by path or by object
        // puts each new version at a random page (migrations 6, 7).
        let mut stmt =
            conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries'").unwrap();
        let mut indexes: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        indexes.sort();
        assert_eq!(indexes, ["entries_end", "entries_links", "entries_start"]);
        drop(stmt);
        drop(conn);
        // Opening again applies nothing and keeps the version.
        let conn = open(&dir.path().join("c.db")).unwrap();
        let again: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(again, SCHEMA_VERSION);
    }

    /// Writes checkpoint `seq` of sandbox `sb`, adding `added` paths and
    /// ending the versions `ended`; returns the new versions' ids.
    fn write_seq(conn: &mut Connection, sb: i64, seq: u64, ended: &[i64], added: &[&[u8]]) -> Result<Vec<i64>> {
        let files: Vec<_> = added.iter().map(|&p| (p, None, 0)).collect();
        write_files(conn, sb, seq, ended, &files)
    }

    /// [`write_seq`] with each added file's object and size.
    fn write_files(
        conn: &mut Connection,
        sb: i64,
        seq: u64,
        ended: &[i64],
        added: &[(&[u8], Option<ObjectId>, u64)],
    ) -> Result<Vec<i64>> {
        let info = CheckpointInfo {
            id: checkpoint_id(sb, seq),
            sandbox: "s".into(),
            seq,
            parent: None,
            plan: None,
            reason: None,
            tool: None,
            phase: None,
            labels: BTreeMap::new(),
            kind: CheckpointKind::Manual,
            pinned: false,
            created_unix_ms: 0,
            files: 0,
            dirs: 0,
            symlinks: 0,
            bytes: 0,
            changed: 0,
            exclusive_bytes: None,
            scanned: None,
            full_scan: None,
            broken: None,
        };
        let key = StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 };
        let added: Vec<NewRow> = added
            .iter()
            .map(|&(path, object, size)| NewRow {
                path: path.to_vec(),
                meta: Meta { kind: Kind::File, mode: 0o644, uid: 0, gid: 0, size, mtime_ns: 0, target: None, object },
                key,
            })
            .collect();
        let tx = conn.transaction()?;
        let ids = write_checkpoint(
            &tx,
            &CheckpointWrite { info: &info, sandbox_id: sb, scan_start_ns: 0, ended, added: &added, rekeyed: &[] },
        )?;
        tx.commit()?;
        Ok(ids)
    }

    fn checkpoint_id(sb: i64, seq: u64) -> String {
        format!("01TEST{sb:04}{seq:016}")
    }

    /// A fresh catalogue in a temporary directory with one sandbox, `s`;
    /// returns the directory, a connection and the sandbox's id.
    fn with_sandbox() -> (tempfile::TempDir, Connection, i64) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("c.db")).unwrap();
        let sb = add_sandbox(&conn, "s");
        (dir, conn, sb)
    }

    /// Adds sandbox `name`, rooted at `/name`, with the store `/st`.
    fn add_sandbox(conn: &Connection, name: &str) -> i64 {
        let sandbox = Sandbox {
            id: 0,
            name: name.into(),
            root: format!("/{name}").into_bytes(),
            store: b"/st".to_vec(),
            clone_method: CloneMethod::Copy,
            clone_note: String::new(),
            excludes: vec![],
            owner_uid: 0,
            state: "active".into(),
            head_seq: 0,
            created_ms: 0,
            identity: None,
            moved: None,
        };
        insert_sandbox(conn, &sandbox).unwrap()
    }

    /// Sandbox `s` holds `x` (object 1, then 3) and `y` (object 2, shared
    /// with sandbox `t`), `t` also holds `w` (object 4); all share a store.
    /// What each query that looks objects up answers, now that it reads
    /// the versions instead of an index by object (migration 0007).
    #[test]
    fn objects_are_looked_up_in_every_version_of_every_sandbox_of_the_store() {
        let (_dir, mut conn, s) = with_sandbox();
        let t = add_sandbox(&conn, "t");
        let o = |n: u8| ObjectId([n; 32]);
        let first = write_files(&mut conn, s, 1, &[], &[(b"x", Some(o(1)), 10), (b"y", Some(o(2)), 20)]).unwrap();
        write_files(&mut conn, s, 2, &first[..1], &[(b"x", Some(o(3)), 30)]).unwrap();
        write_files(&mut conn, t, 1, &[], &[(b"z", Some(o(2)), 20), (b"w", Some(o(4)), 40)]).unwrap();
        write_seq(&mut conn, t, 2, &[], &[b"empty"]).unwrap();

        let unused = [o(5), o(1), o(2), o(3), o(4), o(5), o(6)];
        assert_eq!(unreferenced(&conn, b"/st", &unused).unwrap(), [o(5), o(6)]);
        assert_eq!(unreferenced(&conn, b"/elsewhere", &[o(2), o(1)]).unwrap(), [o(2), o(1)]);
        assert!(unreferenced(&conn, b"/st", &[]).unwrap().is_empty());

        // Object 2 is `t`'s too; objects 1 and 3 are `s`'s alone.
        assert_eq!(sandbox_exclusive_bytes(&conn, s, b"/st").unwrap(), 10 + 30);
        assert_eq!(sandbox_exclusive_bytes(&conn, t, b"/st").unwrap(), 40);
        assert_eq!(checkpoint_exclusive_bytes(&conn, s, 1, b"/st").unwrap(), 10);
        assert_eq!(checkpoint_exclusive_bytes(&conn, s, 2, b"/st").unwrap(), 30);
        assert_eq!(checkpoint_exclusive_bytes(&conn, t, 1, b"/st").unwrap(), 0, "t's seq 2 holds the same");

        // Each checkpoint holding one is marked, with the reason given
        // first among those it holds.
        let bad = [(o(4), "4 is corrupt".to_string()), (o(1), "1 is missing".into()), (o(2), "2 is missing".into())];
        let mut marked = mark_broken(&mut conn, &bad).unwrap();
        marked.sort();
        let mut expected = [checkpoint_id(s, 1), checkpoint_id(s, 2), checkpoint_id(t, 1), checkpoint_id(t, 2)];
        expected.sort();
        assert_eq!(marked, expected);
        let why = |sb, seq| checkpoint_by_ref(&conn, &checkpoint_id(sb, seq)).unwrap().info.broken.unwrap();
        assert_eq!(why(s, 1), "1 is missing");
        assert_eq!(why(s, 2), "2 is missing");
        assert_eq!(why(t, 1), "4 is corrupt");
        assert_eq!(why(t, 2), "4 is corrupt");
        assert!(mark_broken(&mut conn, &bad).unwrap().is_empty(), "marked once");
    }

    #[test]
    fn a_checkpoint_that_ends_a_version_no_longer_current_is_not_written() {
        let (_dir, mut conn, sb) = with_sandbox();
        let first = write_seq(&mut conn, sb, 1, &[], &[b"a"]).unwrap();
        write_seq(&mut conn, sb, 2, &first, &[b"a"]).unwrap();
        // A stale manifest would end version 1 of `a` again and add a
        // second current version beside version 2.
        let err = write_seq(&mut conn, sb, 3, &first, &[b"a"]).unwrap_err().to_string();
        assert!(err.contains("is not current"), "{err}");
        assert_eq!(sandbox_by_id(&conn, sb).unwrap().head_seq, 2);
        let current = current_rows(&conn, sb).unwrap();
        assert_eq!(current.keys().collect::<Vec<_>>(), [b"a"]);
        assert_eq!(count_at(&conn, sb, 2).unwrap(), 1);
    }

    #[test]
    fn a_path_with_two_current_versions_is_found() {
        let (_dir, mut conn, sb) = with_sandbox();
        let first = write_seq(&mut conn, sb, 1, &[], &[b"a", b"b\xff"]).unwrap();
        write_seq(&mut conn, sb, 2, &first[..1], &[b"a"]).unwrap();
        assert!(paths_current_twice(&conn).unwrap().is_empty());
        // What a manifest missing `b\xff` would write: a second current
        // version beside the first, which nothing in the write refuses.
        write_seq(&mut conn, sb, 3, &[], &[b"b\xff"]).unwrap();
        assert_eq!(paths_current_twice(&conn).unwrap(), [("s".to_string(), b"b\xff".to_vec())]);
    }

    #[test]
    fn the_log_checkpointer_copies_writes_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        for _ in 0..200 {
            conn.execute("INSERT INTO t (v) VALUES (zeroblob(4096))", []).unwrap();
        }
        // No automatic checkpoint: the writes are only in the log.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        let wal = crate::wal::WalCheckpointer::start(connect(&path).unwrap(), "c.db").unwrap();
        wal.kick();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&path).unwrap().len() < before + 200 * 4096 {
            assert!(std::time::Instant::now() < deadline, "the log was never copied into the database file");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn the_log_checkpointer_starts_the_next_log_generation_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = open(&path).unwrap();
        conn.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
        // Bytes 12..16 of the log's header count its generations; a write
        // that starts a generation rewrites (and fsyncs) the header.
        let generation = || {
            let header = std::fs::read(dir.path().join("c.db-wal")).unwrap();
            u32::from_be_bytes(header[12..16].try_into().unwrap())
        };
        let checkpointer = connect(&path).unwrap();
        for round in 0..3 {
            conn.execute("INSERT INTO t (v) VALUES (zeroblob(4096))", []).unwrap();
            let before = generation();
            crate::wal::checkpoint(&checkpointer).unwrap();
            let started = generation();
            assert_eq!(started, before + 1, "round {round}: the checkpointer did not start a new log");
            // The next commit appends to that generation instead of
            // starting (and syncing) one of its own.
            conn.execute("INSERT INTO t (v) VALUES (zeroblob(4096))", []).unwrap();
            assert_eq!(generation(), started, "round {round}: the commit started the log over");
        }
        let n: i64 = conn.query_row("SELECT n FROM log_generation", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 3);
    }

    /// SQLite 3.51.1 (rusqlite 0.38) could deadlock here: closing one
    /// connection took its VFS mutex and then the file's lock mutex, while
    /// a write on another took them in the other order. The daemon opens
    /// and closes connections to the catalogue on several threads.
    #[test]
    fn connections_opened_and_closed_on_several_threads_never_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(open(&path).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        const THREADS: usize = 4;
        for _ in 0..THREADS {
            let (path, done) = (path.clone(), done.clone());
            // Detached: a deadlocked thread must not keep the test waiting.
            std::thread::spawn(move || {
                let result = (0..300).try_for_each(|_| -> Result<()> {
                    let conn = connect(&path)?;
                    conn.execute("UPDATE log_generation SET n = n + 1", [])?;
                    Ok(())
                });
                let _ = done.send(result.map_err(|e| e.to_string()));
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        for _ in 0..THREADS {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let result = finished.recv_timeout(left);
            result.expect("a thread opening and closing connections never finished: deadlock").unwrap();
        }
    }

    #[test]
    fn migration_files_are_numbered_without_gaps() {
        for (i, (name, _)) in MIGRATIONS.iter().enumerate() {
            assert!(name.starts_with(&format!("{:04}_", i + 1)), "{name} is out of sequence");
        }
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
            .count();
        assert_eq!(on_disk, MIGRATIONS.len(), "a migration file is not embedded");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
        drop(conn);
        let err = open(&path).unwrap_err().to_string();
        assert!(err.contains("newer than this snapbackd"), "{err}");
    }
}
