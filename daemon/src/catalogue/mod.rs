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

use crate::error::Error;

/// What the catalogue's functions return.
pub type Result<T, E = CatalogueError> = std::result::Result<T, E>;
use crate::manifest::{Kind, Manifest, Meta, ObjectId, Row, StatKey};
use crate::retention::Candidate;
use crate::sys::Identity;

mod checkpoints;
mod error;
mod intents;
mod plans;
mod sandboxes;
mod space;
mod states;
mod unhashed;
mod versions;

pub use checkpoints::*;
pub use error::CatalogueError;
pub use intents::*;
pub use plans::*;
pub use sandboxes::*;
pub use space::*;
pub use states::{IntentKind, IntentState, SandboxState};
use states::{Stored, column, undecodable};
pub use unhashed::*;
pub use versions::*;

/// The migrations, in order. Migration `i` (from 0) takes the schema from
/// version `i` to `i + 1`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_init.sql", include_str!("../../../migrations/0001_init.sql")),
    ("0002_plans_retention.sql", include_str!("../../../migrations/0002_plans_retention.sql")),
    ("0003_restore_intents.sql", include_str!("../../../migrations/0003_restore_intents.sql")),
    ("0004_broken_checkpoints.sql", include_str!("../../../migrations/0004_broken_checkpoints.sql")),
    ("0005_log_generation.sql", include_str!("../../../migrations/0005_log_generation.sql")),
    ("0006_no_current_path_index.sql", include_str!("../../../migrations/0006_no_current_path_index.sql")),
    ("0007_no_object_index.sql", include_str!("../../../migrations/0007_no_object_index.sql")),
    ("0008_pinned_roots.sql", include_str!("../../../migrations/0008_pinned_roots.sql")),
    ("0009_catalogue_id.sql", include_str!("../../../migrations/0009_catalogue_id.sql")),
    ("0010_restore_checkpoints.sql", include_str!("../../../migrations/0010_restore_checkpoints.sql")),
    ("0011_pruned.sql", include_str!("../../../migrations/0011_pruned.sql")),
    ("0012_link_counts.sql", include_str!("../../../migrations/0012_link_counts.sql")),
    ("0013_link_index.sql", include_str!("../../../migrations/0013_link_index.sql")),
    ("0014_directory_index.sql", include_str!("../../../migrations/0014_directory_index.sql")),
    ("0015_stored_bytes.sql", include_str!("../../../migrations/0015_stored_bytes.sql")),
    ("0016_unhashed_objects.sql", include_str!("../../../migrations/0016_unhashed_objects.sql")),
    ("0017_applied_intents.sql", include_str!("../../../migrations/0017_applied_intents.sql")),
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
        Err(e) => return Err(CatalogueError::Damaged(format!("reading the catalogue: {e}"))),
        Ok(m) if m.len() == 0 => return Ok(true),
        Ok(_) => {}
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok(version == 0)
}

/// The catalogue's id, which its stores record.
pub fn catalogue_id(conn: &Connection) -> Result<String> {
    Ok(conn.prepare_cached("SELECT id FROM catalogue_id")?.query_row([], |r| r.get(0))?)
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
    // Every statement of this module is prepared once per connection and
    // kept: parsing one cost more than running it (the module has about 90,
    // the checkpoints' batches counted; rusqlite keeps 16 by default).
    conn.set_prepared_statement_cache_capacity(STATEMENTS_KEPT);
    Ok(())
}

/// How many prepared statements a connection keeps (see [`configure`]).
const STATEMENTS_KEPT: usize = 128;

/// Applies every migration past the database's version, each in its own
/// transaction together with the version bump.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        return Err(CatalogueError::Damaged(format!(
            "the catalogue has schema version {current}, newer than this snapbackd understands \
             ({SCHEMA_VERSION}); run a newer snapbackd or restore an older state directory"
        )));
    }
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql).map_err(|e| CatalogueError::Damaged(format!("applying migration {name}: {e}")))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
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
        // Versions are indexed by checkpoint, multi-link ones by inode
        // (migration 13) and directories by path (14): an index of every
        // version by path or by object puts each new version at a random
        // page (migrations 6, 7).
        let mut stmt =
            conn.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'entries'").unwrap();
        let mut indexes: Vec<String> = stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect();
        indexes.sort();
        assert_eq!(indexes, ["entries_dirs", "entries_end", "entries_links", "entries_start"]);
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
        let info = info_of(sb, seq);
        let added = file_rows(added, StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 });
        let tx = conn.transaction()?;
        let ids = write_checkpoint(
            &tx,
            &CheckpointWrite { info: &info, sandbox_id: sb, scan_start_ns: 0, ended, added: &added, rekeyed: &[] },
        )?;
        tx.commit()?;
        Ok(ids)
    }

    /// New versions of files (path, object, size), each with `key`.
    fn file_rows(files: &[(&[u8], Option<ObjectId>, u64)], key: StatKey) -> Vec<NewRow> {
        files
            .iter()
            .map(|&(path, object, size)| NewRow {
                path: path.to_vec(),
                meta: Meta { kind: Kind::File, mode: 0o644, uid: 0, gid: 0, size, mtime_ns: 0, target: None, object },
                key,
            })
            .collect()
    }

    /// A manual checkpoint `seq` of sandbox `sb`, counting nothing.
    fn info_of(sb: i64, seq: u64) -> CheckpointInfo {
        CheckpointInfo {
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
        }
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
            state: SandboxState::Active,
            head_seq: 0,
            created_ms: 0,
            identity: None,
            moved: None,
        };
        insert_sandbox(conn, &sandbox).unwrap()
    }

    /// Sandbox `s` holds `x` (object 1, then 3) and `y` (object 2, shared
    /// with sandbox `t`), `t` also holds `w` (object 4); all share a store.
    /// What each query that looks objects up answers: from the objects the
    /// catalogue keeps by sandbox (migration 0015), or by reading the
    /// versions (there is no index of versions by object, migration 0007).
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

        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, s).unwrap(), 10 + 20 + 30);
        assert_eq!(store_bytes(&conn, t).unwrap(), 20 + 40);
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

    /// Looking an object up among a store's sandboxes goes through the
    /// primary key of `sandbox_objects`: a plan that reads the whole table
    /// for each object makes pruning a large checkpoint quadratic.
    #[test]
    fn objects_are_looked_up_by_key_not_by_reading_every_sandbox_object() {
        let (_dir, conn, _) = with_sandbox();
        for sql in [HELD_IN_STORE, EXCLUSIVE_BYTES] {
            let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let steps: Vec<String> =
                plan.query_map(params![1, b"/st"], |r| r.get::<_, String>(3)).unwrap().map(Result::unwrap).collect();
            let reads_all =
                |step: &String| step.starts_with("SCAN ") && !matches!(&step[5..], "sandboxes" | "CONSTANT ROW");
            assert!(!steps.iter().any(reads_all), "{sql}\nreads a whole table for each object: {steps:?}");
            assert!(steps.iter().any(|s| s.contains("PRIMARY KEY (sandbox_id=? AND object=?)")), "{steps:?}");
        }
    }

    /// A catalogue written before the sandboxes' objects were kept (schema
    /// 14) has them counted by the migration, and kept from then on.
    #[test]
    fn migration_15_counts_what_each_sandbox_held_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("c.db")).unwrap();
        configure(&conn).unwrap();
        for (i, (_, sql)) in MIGRATIONS.iter().enumerate().take(14) {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as i64).unwrap();
        }
        let (s, t) = (add_sandbox(&conn, "s"), add_sandbox(&conn, "t"));
        let o = |n: u8| ObjectId([n; 32]);
        let first = write_files(&mut conn, s, 1, &[], &[(b"x", Some(o(1)), 10), (b"y", Some(o(1)), 10)]).unwrap();
        write_files(&mut conn, s, 2, &first[..1], &[(b"x", Some(o(2)), 20)]).unwrap();
        write_files(&mut conn, t, 1, &[], &[(b"z", Some(o(2)), 20)]).unwrap();
        migrate(&mut conn).unwrap();
        fold_held(&conn).unwrap();
        assert_eq!((store_bytes(&conn, s).unwrap(), store_bytes(&conn, t).unwrap()), (10 + 20, 20));
        let versions: i64 = conn
            .query_row(
                "SELECT versions FROM sandbox_objects WHERE sandbox_id = ?1 AND object = ?2",
                params![s, &o(1).0[..]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(versions, 2, "x's first version and y hold object 1");
        // Pruning checkpoint 1 deletes x's first version: y still holds 1.
        let tx = conn.transaction().unwrap();
        delete_checkpoints(&tx, s, &[checkpoint_id(s, 1)], "test", 0).unwrap();
        tx.commit().unwrap();
        assert_eq!(unreferenced(&conn, b"/st", &[o(1), o(2), o(3)]).unwrap(), [o(3)]);
        assert_eq!(store_bytes(&conn, s).unwrap(), 10 + 20);
        write_files(&mut conn, t, 2, &[], &[(b"w", Some(o(3)), 30)]).unwrap();
        assert_eq!(store_bytes(&conn, t).unwrap(), 20, "counted once folded");
        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, t).unwrap(), 20 + 30);
    }

    /// The checkpoints whose versions hold unhashed objects are listed, and
    /// naming an object moves what the sandbox holds from the unhashed
    /// name to the hash: two copies of equal content become one object.
    #[test]
    fn naming_unhashed_objects_moves_what_the_sandbox_holds_to_their_hash() {
        let (_dir, mut conn, s) = with_sandbox();
        let (p, q, h) = (ObjectId::unhashed(), ObjectId::unhashed(), ObjectId([7; 32]));
        assert!(p.is_unhashed() && p != q && !h.is_unhashed());
        let ids = write_files(&mut conn, s, 1, &[], &[(b"a", Some(p), 10), (b"b", Some(q), 10)]).unwrap();
        write_files(&mut conn, s, 2, &[], &[(b"c", Some(h), 10)]).unwrap();
        let listed = unhashed_checkpoints(&conn).unwrap();
        assert_eq!(listed, [UnhashedCheckpoint { sandbox_id: s, seq: 1, store: b"/st".to_vec() }]);
        let c = &listed[0];
        assert_eq!(unhashed_versions(&conn, c, 0, 10).unwrap(), [(ids[0], p), (ids[1], q)]);
        assert_eq!(unhashed_versions(&conn, c, ids[0], 10).unwrap(), [(ids[1], q)], "a batch starts after the last");
        assert_eq!(unhashed_versions(&conn, c, 0, 1).unwrap(), [(ids[0], p)]);
        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, s).unwrap(), 30);
        assert_eq!(object_at(&conn, s, b"a", 1).unwrap(), Some(p));
        assert_eq!(object_at(&conn, s, b"c", 1).unwrap(), None, "c is added at 2");

        let tx = conn.transaction().unwrap();
        assert_eq!(name_unhashed(&tx, ids[0], &p, &h).unwrap(), Some(b"a".to_vec()));
        assert_eq!(name_unhashed(&tx, ids[1], &q, &h).unwrap(), Some(b"b".to_vec()));
        assert_eq!(name_unhashed(&tx, ids[1], &q, &h).unwrap(), None, "b no longer holds q");
        tx.commit().unwrap();
        assert!(unhashed_versions(&conn, c, 0, 10).unwrap().is_empty());
        assert_eq!(object_at(&conn, s, b"a", 2).unwrap(), Some(h), "what a diff that met p gone reads instead");
        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, s).unwrap(), 10, "one object of 10 bytes, held three times");
        let held: Vec<(Vec<u8>, i64)> = conn
            .prepare("SELECT object, versions FROM sandbox_objects WHERE sandbox_id = ?1")
            .unwrap()
            .query_map([s], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(held, [(h.0.to_vec(), 3)]);
        assert_eq!(unreferenced(&conn, b"/st", &[p, q, h]).unwrap().len(), 2, "p and q are held no more");
        unlist_unhashed(&conn, c).unwrap();
        assert!(unhashed_checkpoints(&conn).unwrap().is_empty());
    }

    /// More changes than one transaction of `fold_held` takes, with objects
    /// held by versions folded in different chunks.
    #[test]
    fn changes_are_folded_a_chunk_at_a_time_to_the_same_counts() {
        let (_dir, mut conn, s) = with_sandbox();
        let o = |n: u32| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&n.to_be_bytes());
            ObjectId(id)
        };
        let paths: Vec<Vec<u8>> = (0..40_000).map(|i| format!("f{i}").into_bytes()).collect();
        // 40,000 versions of 25,000 objects: 15,000 of them held twice, by
        // versions far apart in the order they were written.
        let files: Vec<_> = paths.iter().enumerate().map(|(i, p)| (&p[..], Some(o(i as u32 % 25_000)), 7)).collect();
        let ids = write_files(&mut conn, s, 1, &[], &files).unwrap();
        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, s).unwrap(), 25_000 * 7);
        // Pruning the first checkpoint's versions of the first 30,000 paths
        // (ended at 2) leaves 10,000 objects held.
        write_files(&mut conn, s, 2, &ids[..30_000], &[]).unwrap();
        let tx = conn.transaction().unwrap();
        delete_checkpoints(&tx, s, &[checkpoint_id(s, 1)], "test", 0).unwrap();
        tx.commit().unwrap();
        fold_held(&conn).unwrap();
        assert_eq!(store_bytes(&conn, s).unwrap(), 10_000 * 7);
        let pending: i64 = conn.query_row("SELECT count(*) FROM held_changes", [], |r| r.get(0)).unwrap();
        assert_eq!(pending, 0);
    }

    #[test]
    fn versions_written_in_batches_are_each_where_they_belong() {
        // 147 = 2 x 64 + 2 x 8 + 3: every size of batch, each more than once.
        let (_dir, mut conn, sb) = with_sandbox();
        let paths: Vec<Vec<u8>> = (0..147).map(|i| format!("d/f{i:03}").into_bytes()).collect();
        let o = |i: usize, v: u8| {
            let mut id = [0; 32];
            (id[0], id[1]) = (i as u8, v);
            ObjectId(id)
        };
        let files: Vec<_> = paths.iter().enumerate().map(|(i, p)| (&p[..], Some(o(i, 1)), i as u64)).collect();
        let first = write_files(&mut conn, sb, 1, &[], &files).unwrap();
        let current = current_rows(&conn, sb).unwrap();
        assert_eq!(current.len(), 147);
        for (i, (path, id)) in paths.iter().zip(&first).enumerate() {
            let row = &current[&path[..]];
            assert_eq!((row.id, row.meta.object, row.meta.size), (*id, Some(o(i, 1)), i as u64), "{i}");
        }
        // A batch with one version no longer current writes nothing.
        let mut ended = first[..100].to_vec();
        ended[70] = first[0];
        let err = write_files(&mut conn, sb, 2, &ended, &[]).unwrap_err().to_string();
        assert!(err.contains("is not current"), "{err}");
        assert_eq!(sandbox_by_id(&conn, sb).unwrap().head_seq, 1);
        // Ending and adding 147, and re-keying 147 others.
        let others: Vec<Vec<u8>> = (0..147).map(|i| format!("e/g{i:03}").into_bytes()).collect();
        let more: Vec<_> = others.iter().enumerate().map(|(i, p)| (&p[..], Some(o(i, 2)), 0)).collect();
        let second = write_files(&mut conn, sb, 2, &[], &more).unwrap();
        let again: Vec<_> = paths.iter().enumerate().map(|(i, p)| (&p[..], Some(o(i, 3)), 1)).collect();
        let key = |i: usize| StatKey {
            ctime_ns: 1_000 + i as i64,
            ino: 5_000 + i as u64,
            racy: i.is_multiple_of(2),
            nlink: 1,
        };
        let rekeyed: Vec<_> =
            others.iter().zip(&second).enumerate().map(|(i, (p, id))| (p.clone(), *id, key(i))).collect();
        let added = file_rows(&again, key(0));
        let tx = conn.transaction().unwrap();
        let write = CheckpointWrite {
            info: &info_of(sb, 3),
            sandbox_id: sb,
            scan_start_ns: 0,
            ended: &first,
            added: &added,
            rekeyed: &rekeyed,
        };
        let third = write_checkpoint(&tx, &write).unwrap();
        tx.commit().unwrap();
        let current = current_rows(&conn, sb).unwrap();
        assert_eq!(current.len(), 294);
        for (i, (path, id)) in paths.iter().zip(&third).enumerate() {
            let row = &current[&path[..]];
            assert_eq!((row.id, row.meta.object, row.meta.size), (*id, Some(o(i, 3)), 1), "{i}");
        }
        for (i, (path, id)) in others.iter().zip(&second).enumerate() {
            let row = &current[&path[..]];
            assert_eq!((row.id, row.meta.object, row.key), (*id, Some(o(i, 2)), key(i)), "{i}");
        }
        assert_eq!(count_at(&conn, sb, 1).unwrap(), 147);
        assert_eq!(count_at(&conn, sb, 3).unwrap(), 294);
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
        assert_eq!(current.keys().map(|p| &p[..]).collect::<Vec<_>>(), [b"a"]);
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
    fn a_damaged_row_is_an_error_naming_it_never_a_default() {
        let (_t, conn, sb) = with_sandbox();
        assert_eq!(sandbox_by_id(&conn, sb).unwrap().state, SandboxState::Active);
        // An excludes column that is no list: capturing the excluded paths
        // instead would be the quiet default this refuses.
        conn.execute("UPDATE sandboxes SET excludes = '[\"target\"' WHERE id = ?1", [sb]).unwrap();
        let e = sandbox_by_id(&conn, sb).unwrap_err().to_string();
        assert!(e.contains(&format!("sandboxes row {sb}")) && e.contains("excludes"), "{e}");
        // Damage the schema's checks would refuse, as a disk could do.
        conn.pragma_update(None, "ignore_check_constraints", true).unwrap();
        conn.execute("UPDATE sandboxes SET excludes = '[]', clone_method = 'teleport' WHERE id = ?1", [sb]).unwrap();
        let e = sandbox_by_id(&conn, sb).unwrap_err().to_string();
        assert!(e.contains("clone_method") && e.contains("teleport"), "{e}");
        conn.execute("UPDATE sandboxes SET clone_method = 'copy', state = 'gone' WHERE id = ?1", [sb]).unwrap();
        let e = sandbox_by_id(&conn, sb).unwrap_err().to_string();
        assert!(e.contains(&format!("sandboxes row {sb}")) && e.contains("state") && e.contains("gone"), "{e}");
        // A wire state stored by name: a plan's.
        let mut conn = conn;
        let tx = conn.transaction().unwrap();
        ensure_plan(&tx, "p1", sb, 0).unwrap();
        tx.commit().unwrap();
        assert_eq!(plan(&conn, "p1").unwrap().unwrap().state, PlanState::Active);
        conn.execute("UPDATE plans SET state = 'halfway' WHERE id = 'p1'", []).unwrap();
        let e = plan(&conn, "p1").unwrap_err().to_string();
        assert!(e.contains("plans row p1") && e.contains("halfway") && e.contains("plan state"), "{e}");
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
