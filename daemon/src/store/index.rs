//! The pack index (`packs.db`): which slot of which pack holds an object,
//! its schema and upgrades, and recording sealed packs.

use super::*;

impl Store {
    /// Has the packs sealed since the last call recorded in the pack
    /// index, and the index's write-ahead log copied back, if anything was
    /// sealed or written to it since then. Called once a request is done:
    /// the writes (and their fsyncs) then do not compete with the
    /// request's own.
    pub fn checkpoint_index_log(&self) {
        if self.index_written.swap(false, Ordering::Relaxed) {
            self.index_log.kick();
        }
    }

    /// Where a packed object lies: (pack, offset, length). The index is
    /// asked first: a sealed pack's copy of an object it already holds is
    /// freed when the pack is recorded.
    pub(super) fn slot(&self, id: &ObjectId) -> io::Result<Option<(String, u64, u64)>> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt =
            index.conn.prepare_cached("SELECT pack, offset, length FROM packed WHERE object = ?1").map_err(db)?;
        if let Some(slot) = stmt.query_row([&id.0[..]], slot_of).optional().map_err(db)? {
            return Ok(Some(slot));
        }
        Ok(index.sealed_slot(id).map(|(pack, offset, len)| (pack.to_string(), offset, len)))
    }

    /// Records the sealed packs now (see [`record_sealed`]), for what reads
    /// or changes the index as a whole.
    pub(super) fn record(&self) -> io::Result<()> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if record_sealed(&mut index, self.packs.as_fd())? {
            self.index_written.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether `id` is a packed object read out lately that the index
    /// still holds. Only those are looked up: asking the index for every
    /// small file a scan reads cost a third of the scan's CPU time on ext4,
    /// and the content a scan meets again is mostly what a rollback just
    /// restored. The caller holds [`Store::gc_lock`] until its commit, so
    /// the object stays.
    pub(super) fn packed_already(&self, id: &ObjectId) -> io::Result<bool> {
        if !self.recently_read.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
            return Ok(false);
        }
        Ok(self.slot(id)?.is_some())
    }

    /// Deletes the index rows of `ids`, in one transaction, and returns the
    /// slots they named: from then on no reader finds them.
    pub(super) fn unindex(&self, ids: &[ObjectId]) -> io::Result<Vec<(String, u64, u64)>> {
        let mut slots = Vec::new();
        if ids.is_empty() {
            return Ok(slots);
        }
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let tx = index.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM packed WHERE object = ?1 RETURNING pack, offset, length").map_err(db)?;
            for id in ids {
                slots.extend(delete.query_row([&id.0[..]], slot_of).optional().map_err(db)?);
            }
        }
        tx.commit().map_err(db)?;
        self.index_written.store(true, Ordering::Relaxed);
        Ok(slots)
    }

    /// The packs the index names.
    pub(super) fn indexed_packs(&self) -> io::Result<Vec<String>> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = index.conn.prepare("SELECT DISTINCT pack FROM packed").map_err(db)?;
        let rows = stmt.query_map([], |r| pack_name(r, 0)).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    /// The index's rows of one pack: (object, offset, length).
    pub(super) fn rows_of(&self, pack: &str) -> io::Result<Vec<(ObjectId, u64, u64)>> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt =
            index.conn.prepare_cached("SELECT object, offset, length FROM packed WHERE pack = ?1").map_err(db)?;
        let rows = stmt
            .query_map([pack], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, offset, len) = row.map_err(db)?;
            out.push((indexed_id(&id)?, offset, len));
        }
        Ok(out)
    }
}

/// The pack index, and the packs sealed since it was last written.
pub(super) struct Index {
    /// `packed(object, pack, offset, length)`.
    pub(super) conn: Connection,
    /// Packs sealed but not recorded in `conn` yet, oldest first.
    pub(super) sealed: Vec<Sealed>,
}

impl Index {
    /// Where an object of the packs sealed but not recorded lies: its
    /// first slot in the first of them that holds it, the one recording
    /// keeps unless the index holds the object already (see
    /// [`record_sealed`]). A binary search in each: they are few (the
    /// store's thread records them as they are sealed), and a map of their
    /// slots, built by the capture thread that sealed each, took over 70
    /// bytes an object more, held by that thread's arena once freed.
    pub(super) fn sealed_slot(&self, id: &ObjectId) -> Option<(&str, u64, u64)> {
        self.sealed.iter().find_map(|pack| {
            let first = pack.slots.partition_point(|(other, ..)| other.0 < id.0);
            let &(found, offset, len) = pack.slots.get(first)?;
            (found == *id).then_some((&*pack.name, offset, len))
        })
    }

    /// Whether any object of `pack` is in the index.
    pub(super) fn has_rows(&self, pack: &str) -> io::Result<bool> {
        let mut stmt = self.conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM packed WHERE pack = ?1)").map_err(db)?;
        stmt.query_row([pack], |r| r.get(0)).map_err(db)
    }
}

/// A packed object and where it lies in its pack: (id, offset, length).
pub(super) type Slot = (ObjectId, u64, u64);

/// A sealed pack not recorded in the index yet.
pub(super) struct Sealed {
    pub(super) name: Arc<str>,
    /// Sorted by (object, offset).
    slots: Vec<Slot>,
    /// Where its trailer starts.
    pub(super) trailer_at: u64,
}

impl Sealed {
    /// The sealed pack `name` holding `slots`, sorted here: by (object,
    /// offset) they are found by a binary search, and recorded in the
    /// index's order (inserted at random places, the slots of a full pack,
    /// 65,536, took 14 us each at a million objects, a page read for nearly
    /// every row), a copy in one pack still finding its first slot kept.
    /// Sorted before the index is locked by the caller.
    pub(super) fn new(name: Arc<str>, mut slots: Vec<Slot>, trailer_at: u64) -> Sealed {
        slots.sort_unstable_by_key(|(id, offset, _)| (id.0, *offset));
        Sealed { name, slots, trailer_at }
    }
}

/// Records the sealed packs in the index, in one transaction; returns
/// whether there were any. An object the index already holds (in another
/// pack, or twice in these) keeps the slot it has, and the other copy's
/// blocks are freed (a pack of nothing but such copies is removed), as
/// are the trailers' blocks, needed no more. The
/// slot [`Index::sealed_slot`] gave out for each object is the one kept:
/// [`Store::slot`] asks the index first, and the packs go in the order
/// they were sealed. If the transaction fails, the packs stay to be found
/// in memory and recorded later (or from their trailers after a restart).
pub(super) fn record_sealed(index: &mut Index, packs: BorrowedFd<'_>) -> io::Result<bool> {
    if index.sealed.is_empty() {
        return Ok(false);
    }
    let started = std::time::Instant::now();
    let Index { conn, sealed } = index;
    let rows: usize = sealed.iter().map(|p| p.slots.len()).sum();
    let mut spare: Vec<Vec<(u64, u64)>> = Vec::with_capacity(sealed.len());
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
    {
        let mut insert = tx
            .prepare_cached("INSERT OR IGNORE INTO packed (object, pack, offset, length) VALUES (?1, ?2, ?3, ?4)")
            .map_err(db)?;
        let mut kept = tx.prepare_cached("SELECT pack, offset FROM packed WHERE object = ?1").map_err(db)?;
        for pack in sealed.iter() {
            let mut copies = Vec::new();
            // In the index's order (see `Sealed::new`).
            for &(id, offset, len) in &pack.slots {
                if insert.execute(params![&id.0[..], &*pack.name, offset as i64, len as i64]).map_err(db)? == 0 {
                    // Recorded already, by another process that opened the
                    // store (and recovered the pack), is not a copy.
                    let (p, o): (String, i64) =
                        kept.query_row([&id.0[..]], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db)?;
                    if (p.as_str(), o as u64) != (&*pack.name, offset) {
                        copies.push((offset, len));
                    }
                }
            }
            spare.push(copies);
        }
    }
    tx.commit().map_err(db)?;
    let ms = started.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(packs = sealed.len(), rows, ms, "recorded sealed packs in the pack index");
    // Only space is at stake from here: no reader finds these copies, and
    // a pack with rows in the index is never recovered from its trailer.
    for (pack, copies) in std::mem::take(sealed).into_iter().zip(spare) {
        if copies.len() == pack.slots.len() {
            let _ = sys::unlinkat(packs, pack.name.as_bytes(), false);
        } else if let Ok(fd) = sys::openat(packs, pack.name.as_bytes(), libc::O_WRONLY, 0) {
            for (offset, len) in copies {
                let _ = punch(fd.as_fd(), offset, len);
            }
            if let Ok(st) = sys::fstat(fd.as_fd()) {
                let _ = punch(fd.as_fd(), pack.trailer_at, (st.st_size as u64).saturating_sub(pack.trailer_at));
            }
        }
    }
    Ok(true)
}

/// Hands the packs under `packs` that were sealed but never recorded (the
/// daemon stopped first) to [`record_sealed`], with the slots their
/// trailers list whose content still hashes to the object named. A pack
/// without a whole trailer was never sealed, and is left to
/// [`Store::collect_garbage`]. Returns how many packs were recovered.
pub(super) fn recover_sealed(index: &mut Index, packs: BorrowedFd<'_>) -> io::Result<usize> {
    let mut recovered = 0;
    let mut entries = sys::read_dir(packs)?;
    // Oldest first, as they were most likely sealed (ULIDs sort by time).
    entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    for entry in entries {
        let Ok(name) = std::str::from_utf8(&entry.name) else { continue };
        if !is_pack_name(name) || index.has_rows(name)? {
            continue;
        }
        // One that cannot be read is not recovered (`verify` reports the
        // objects it held as missing), and the store still opens.
        let read =
            sys::openat(packs, name.as_bytes(), libc::O_RDONLY, 0).and_then(|fd| Ok((read_trailer(fd.as_fd())?, fd)));
        let (mut slots, trailer_at, fd) = match read {
            Ok((Some((slots, at)), fd)) => (slots, at, fd),
            Ok((None, _)) => continue,
            Err(e) => {
                tracing::warn!("reading the trailer of pack {name}: {e}");
                continue;
            }
        };
        slots.retain(|&(id, offset, len)| {
            read_at(fd.as_fd(), offset, len)
                .is_ok_and(|b| b.len() as u64 == len && blake3::hash(&b) == blake3::Hash::from(id.0))
        });
        index.sealed.push(Sealed::new(name.into(), slots, trailer_at));
        recovered += 1;
    }
    record_sealed(index, packs)?;
    Ok(recovered)
}

/// Reads (pack, offset, length) from a row of the pack index.
pub(super) fn slot_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, u64, u64)> {
    Ok((pack_name(r, 0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
}

/// Whether `name` is a ULID, as a pack is named: only such a name is
/// opened or unlinked under `packs/`.
pub(super) fn is_pack_name(name: &str) -> bool {
    name.len() == 26 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Reads a pack's name from the index, refusing anything but a pack's
/// name (see [`is_pack_name`]).
pub(super) fn pack_name(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<String> {
    let name: String = r.get(column)?;
    if is_pack_name(&name) {
        return Ok(name);
    }
    let why = io::Error::other(format!("{name:?} is not the name of a pack"));
    Err(rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(why)))
}

pub(super) fn db(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("pack index: {e}"))
}

/// An object id read from the pack index.
pub(super) fn indexed_id(bytes: &[u8]) -> io::Result<ObjectId> {
    ObjectId::from_slice(bytes).ok_or_else(|| io::Error::other("pack index: an object id is not 32 bytes"))
}

/// The pack index's schema: step `i` takes it from version `i` (its
/// `user_version`) to `i + 1`.
pub(super) const INDEX_SCHEMA: &[&str] = &[
    "CREATE TABLE packed (
         object BLOB    NOT NULL PRIMARY KEY,  -- blake3 of the content (32 bytes)
         pack   TEXT    NOT NULL,              -- file name under packs/
         offset INTEGER NOT NULL,              -- a multiple of 4096
         length INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX packed_pack ON packed(pack);",
    // A row for the log checkpointer to start the write-ahead log over
    // with (see `crate::wal`).
    "CREATE TABLE log_generation (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         n  INTEGER NOT NULL
     );
     INSERT INTO log_generation (id, n) VALUES (1, 0);",
];

/// Opens (creating or upgrading if needed) a store's pack index.
pub(super) fn open_index(path: &Path) -> io::Result<Connection> {
    let mut conn = connect_index(path)?;
    upgrade_index(&mut conn, path)?;
    Ok(conn)
}

/// Opens a further connection to a pack index that [`open_index`] has
/// already brought to the latest schema (as `catalogue::connect` does for
/// the catalogue).
pub(super) fn connect_index(path: &Path) -> io::Result<Connection> {
    let conn = Connection::open(path).map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
    conn.pragma_update(None, "journal_mode", "wal").map_err(db)?;
    // A sealed pack is made durable with the rest of the store, by the
    // syncfs before a commit that references it (durability "sync").
    conn.pragma_update(None, "synchronous", "normal").map_err(db)?;
    // Copied back by the store's log checkpointer, off the request path.
    conn.pragma_update(None, "wal_autocheckpoint", 0).map_err(db)?;
    Ok(conn)
}

/// Brings the pack index at `path` to the latest schema; refuses a newer one.
pub(super) fn upgrade_index(conn: &mut Connection, path: &Path) -> io::Result<()> {
    let latest = INDEX_SCHEMA.len() as i64;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db)?;
    if version > latest {
        return Err(io::Error::other(format!(
            "{}: pack index version {version} was written by a newer snapback (this one knows {latest})",
            path.display()
        )));
    }
    if version < latest {
        for step in &INDEX_SCHEMA[version as usize..] {
            tx.execute_batch(step).map_err(db)?;
        }
        tx.pragma_update(None, "user_version", latest).map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}
