//! The object store: immutable content, named by its blake3 hash, shared
//! by every checkpoint and path that holds that content.
//!
//! Most objects are files of their own under `objects/`, made with a
//! reflink (`FICLONE`) where the filesystem allows it, else with a copy
//! (sparse-aware above [`SMALL_FILE`]). Such an object is written under a
//! temporary name (`.tmp-*`) in its final directory and renamed only when
//! complete, so an object's name always holds whole content.
//!
//! The small files that a watcher-driven checkpoint reads are instead
//! written into one pack per checkpoint (`packs/<ulid>`, see [`Pack`]):
//! making and renaming a file for each would cost more than their bytes. A
//! pack's objects become visible when it is sealed: its last write lists
//! them in a trailer at its end, and the store finds them in memory until
//! a thread of its own records them in the store's pack index (`packs.db`,
//! SQLite), once the request's answer is sent. A pack sealed but not yet
//! recorded when the daemon stopped is recorded from its trailer when the
//! store is next opened. A dead packed object's blocks are freed by
//! punching a hole over its slot; a pack with no live object left is
//! removed.
//!
//! Objects that no catalogue row references (left by a checkpoint that
//! never committed, or freed by a purge), packs never sealed, the blocks
//! of slots taken out of the index but never punched (the daemon stopped
//! in between) and leftover temporaries are collected by
//! [`Store::collect_garbage`].

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::manifest::ObjectId;
use crate::sys;
use crate::wal::WalCheckpointer;

/// An object store directory.
pub struct Store {
    /// How the store is named in messages.
    path: PathBuf,
    /// The store's directory, held open: the pack index is reached through
    /// it (see [`Store::open_in`]).
    _dir: OwnedFd,
    objects: OwnedFd,
    tmp: OwnedFd,
    packs: OwnedFd,
    /// Where each packed object lies.
    index: Arc<Mutex<Index>>,
    /// Records the sealed packs and copies the index's write-ahead log
    /// back when asked, after a request wrote to either (see
    /// [`Store::checkpoint_index_log`]).
    index_log: WalCheckpointer,
    index_written: AtomicBool,
    /// Held shared from a checkpoint's first object until its commit, and
    /// exclusively by garbage collection, so that an object a checkpoint
    /// found (and will reference) is never collected before the commit.
    pub gc_lock: std::sync::RwLock<()>,
    /// Packed objects read out lately (by a restore, mostly): when a scan
    /// meets their content again, it asks the index before packing it
    /// (see [`Store::put`]). At most [`RECENTLY_READ`] of them.
    recently_read: Mutex<HashSet<ObjectId>>,
}

/// The pack index, and the packs sealed since it was last written.
struct Index {
    /// `packed(object, pack, offset, length)`.
    conn: Connection,
    /// Packs sealed but not recorded in `conn` yet, oldest first.
    sealed: Vec<Sealed>,
    /// Where the objects of `sealed` lie: for each, its slot in the first
    /// of them that holds it, which recording keeps unless the index
    /// holds the object already (see [`record_sealed`]).
    sealed_slots: HashMap<ObjectId, (Arc<str>, u64, u64)>,
}

impl Index {
    /// Adds a sealed pack to find in memory and record later.
    fn add_sealed(&mut self, name: Arc<str>, slots: Vec<Slot>, trailer_at: u64) {
        for &(id, offset, len) in &slots {
            self.sealed_slots.entry(id).or_insert_with(|| (name.clone(), offset, len));
        }
        self.sealed.push(Sealed { name, slots, trailer_at });
    }

    /// Whether any object of `pack` is in the index.
    fn has_rows(&self, pack: &str) -> io::Result<bool> {
        let mut stmt = self.conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM packed WHERE pack = ?1)").map_err(db)?;
        stmt.query_row([pack], |r| r.get(0)).map_err(db)
    }
}

/// A packed object and where it lies in its pack: (id, offset, length).
type Slot = (ObjectId, u64, u64);

/// A sealed pack not recorded in the index yet.
struct Sealed {
    name: Arc<str>,
    slots: Vec<Slot>,
    /// Where its trailer starts.
    trailer_at: u64,
}

/// How many packed objects [`Store::recently_read`] remembers before it
/// starts over: 2 MiB or so of ids.
const RECENTLY_READ: usize = 1 << 16;

/// The result of putting a file into the store.
pub struct Put {
    pub hash: ObjectId,
    /// The stat of the source that the object's content matches.
    pub stat: libc::stat,
    /// A new object was made by a reflink clone.
    pub reflinked: bool,
    /// A new object was made by copying.
    pub copied: bool,
    /// The source kept changing while it was read; the object holds one
    /// complete state of it, but a later scan must read it again.
    pub unstable: bool,
}

/// Files up to this size may be stored by writing the bytes read to hash
/// them instead of cloning (see [`Store::put`]). Cloning a file whose pages
/// are still dirty makes the filesystem write them out first, which costs
/// several times the copy; a copy of a small file takes a block or a few.
pub const SMALL_FILE: u64 = 64 * 1024;

/// Packed objects start on multiples of this, so that the blocks of a dead
/// one can be freed by punching a hole over its slot.
const SLOT_ALIGN: u64 = 4096;

fn slot_len(len: u64) -> u64 {
    len.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// An object opened for reading: a file of its own, or a slot of a pack.
pub enum Object {
    Loose(OwnedFd),
    Packed { pack: OwnedFd, offset: u64, len: u64 },
}

impl Object {
    /// The object's length in bytes.
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Object::Loose(fd) => Ok(sys::fstat(fd.as_fd())?.st_size as u64),
            Object::Packed { len, .. } => Ok(*len),
        }
    }

    /// Writes the object's content into the empty file `dst`, by a clone
    /// where `reflink` is set and the pair allows it (loose objects only: a
    /// clone of a slot would leave a shared block to be copied at the
    /// truncation to its length), else by a copy. `size` is the length the
    /// catalogue records. Returns whether it cloned. A copy of a small
    /// object writes every byte from the start, so `dst` may also hold no
    /// more than that (see [`Object::write_over`]).
    pub fn write_into(&self, dst: BorrowedFd<'_>, size: u64, reflink: bool) -> io::Result<bool> {
        match self {
            Object::Loose(fd) => clone_or_copy(dst, fd.as_fd(), size, reflink),
            Object::Packed { .. } => {
                sys::pwrite_all(dst, &self.read()?, 0)?;
                Ok(false)
            }
        }
    }

    /// Writes the object's content over the regular file `dst`, now
    /// `dst_len` bytes long, which ends as long as [`Object::write_into`]
    /// makes an empty one. Returns whether it cloned.
    ///
    /// A copy of a small object (any packed one; a loose one of at most
    /// [`SMALL_FILE`] bytes, when not cloning) writes every byte it keeps,
    /// so only a longer file's tail is cut off first. Emptying the file
    /// first frees blocks that the write then allocates again, and on ext4
    /// arms a flush at its close: rewriting 100 files of 1-8 KiB took half
    /// the time without it on XFS, btrfs and ext4 (2.1-2.7 against
    /// 4.4-6.0 ms). A clone, or a copy that skips holes, goes into the file
    /// emptied first: a clone over the old extents took three times as long
    /// on XFS (level on btrfs).
    pub fn write_over(&self, dst: BorrowedFd<'_>, dst_len: u64, size: u64, reflink: bool) -> io::Result<bool> {
        let keep = match self {
            Object::Packed { len, .. } => *len,
            Object::Loose(_) if !reflink && size <= SMALL_FILE => size,
            Object::Loose(_) => 0,
        };
        if dst_len > keep {
            sys::ftruncate(dst, keep)?;
        }
        self.write_into(dst, size, reflink)
    }

    /// Reads the whole object; for packed (small) objects and tests.
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let (fd, offset, len) = match self {
            Object::Loose(fd) => (fd.as_fd(), 0, sys::fstat(fd.as_fd())?.st_size as u64),
            Object::Packed { pack, offset, len } => (pack.as_fd(), *offset, *len),
        };
        let bytes = read_at(fd, offset, len)?;
        if (bytes.len() as u64) < len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the object is shorter than recorded"));
        }
        Ok(bytes)
    }

    /// Hashes the object's content, whose length the caller has from
    /// [`Object::size`].
    pub fn hash(&self, size: u64) -> io::Result<ObjectId> {
        match self {
            Object::Loose(fd) => hash_fd(fd.as_fd(), size),
            Object::Packed { .. } => Ok(ObjectId(*blake3::hash(&self.read()?).as_bytes())),
        }
    }
}

/// Reads `len` bytes at `offset` (fewer if the file ends first).
fn read_at(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let n = read_at_into(fd, offset, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// The small objects of one capture, written into one pack file, each in
/// its own slot. None of them is visible until [`Pack::seal`]; a pack
/// dropped unsealed removes its file.
pub struct Pack<'a> {
    store: &'a Store,
    name: String,
    state: Mutex<PackState>,
}

/// Slots are gathered in memory and written [`PACK_BUFFER`] bytes at a time:
/// on btrfs every write reserves metadata space of its own, and 150 writes
/// of a few KiB each took 2.7 ms where one write of the same bytes took
/// 0.9 ms (on ext4, 1.0 ms either way). The thread whose slot fills the
/// buffer writes it while the other capture threads go on reading. With
/// 1 MiB, the 150 files (about 1 MiB) of a rollback's safety checkpoint
/// were all written at the seal, after the scan: the commit waited 3-4 ms
/// for that write on btrfs, and about 1 ms with 256 KiB. 128 KiB measured
/// the same as 256 KiB; 512 KiB, about 1 ms more.
const PACK_BUFFER: usize = 1 << 18;

#[derive(Default)]
struct PackState {
    file: Option<Arc<OwnedFd>>,
    end: u64,
    slots: Vec<Slot>,
    /// The slots not written yet, padded to their length: the bytes from
    /// offset `end - buffer.len()` to `end`.
    buffer: Vec<u8>,
    sealed: bool,
}

impl Pack<'_> {
    /// Whether nothing was written into the pack (sealing it is a no-op).
    pub fn is_empty(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).file.is_none()
    }

    /// Adds `bytes`, whose hash is `id`, in a new slot.
    fn add(&self, id: ObjectId, bytes: &[u8]) -> io::Result<()> {
        let (file, full, at) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let file = match &st.file {
                Some(f) => f.clone(),
                None => {
                    // Writable by its owner, unlike a loose object: dead
                    // slots are freed through a writable descriptor.
                    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_RDWR;
                    let f = Arc::new(sys::openat(self.store.packs.as_fd(), self.name.as_bytes(), flags, 0o600)?);
                    st.file = Some(f.clone());
                    f
                }
            };
            let (offset, len) = (st.end, bytes.len() as u64);
            st.end += slot_len(len);
            st.slots.push((id, offset, len));
            st.buffer.extend_from_slice(bytes);
            let padded = st.buffer.len() + (slot_len(len) - len) as usize;
            st.buffer.resize(padded, 0);
            if st.buffer.len() < PACK_BUFFER {
                return Ok(());
            }
            let at = st.end - st.buffer.len() as u64;
            let full = std::mem::replace(&mut st.buffer, Vec::with_capacity(PACK_BUFFER + SMALL_FILE as usize));
            (file, full, at)
        };
        // Written outside the lock: another thread fills the next buffer.
        sys::pwrite_all(file.as_fd(), &full, at)
    }

    /// Makes the pack's objects visible, once every [`Store::put`] into it
    /// has returned: writes the slots still buffered and the trailer that
    /// lists them all, in one write, and hands them to the store to find
    /// and record (see [`record_sealed`]). Writing the index here instead,
    /// a transaction of its own beside the catalogue's, took 3-4 ms of a
    /// rollback's 20-25 on btrfs.
    pub fn seal(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = st.file.clone() else { return Ok(()) };
        let mut rest = std::mem::take(&mut st.buffer);
        let at = st.end - rest.len() as u64;
        rest.extend_from_slice(&trailer(&st.slots));
        sys::pwrite_all(file.as_fd(), &rest, at)?;
        let slots = std::mem::take(&mut st.slots);
        self.store.index.lock().unwrap_or_else(|p| p.into_inner()).add_sealed(self.name.as_str().into(), slots, st.end);
        self.store.index_written.store(true, Ordering::Relaxed);
        st.sealed = true;
        Ok(())
    }
}

impl Drop for Pack<'_> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if st.file.is_some() && !st.sealed {
            let _ = sys::unlinkat(self.store.packs.as_fd(), self.name.as_bytes(), false);
        }
    }
}

/// Ends a pack's trailer, which lists its slots for [`recover_sealed`]: for
/// each slot, the object's id (32 bytes), offset and length (8 bytes each,
/// little-endian); then the number of slots (8 bytes), the blake3 hash of
/// the list (32 bytes) and these 8 bytes.
const TRAILER_MAGIC: &[u8; 8] = b"sbpack1\n";
const TRAILER_ENTRY: usize = 48;
const TRAILER_FOOTER: usize = 48;

fn trailer(slots: &[Slot]) -> Vec<u8> {
    let mut out = Vec::with_capacity(slots.len() * TRAILER_ENTRY + TRAILER_FOOTER);
    for (id, offset, len) in slots {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let hash = blake3::hash(&out);
    out.extend_from_slice(&(slots.len() as u64).to_le_bytes());
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(TRAILER_MAGIC);
    out
}

/// The slots listed by the trailer of the pack open at `fd`, and where the
/// trailer starts; `None` when it does not end with a whole trailer (it
/// was never sealed, or was recorded since).
fn read_trailer(fd: BorrowedFd<'_>) -> io::Result<Option<(Vec<Slot>, u64)>> {
    let size = sys::fstat(fd)?.st_size as u64;
    let Some(footer_at) = size.checked_sub(TRAILER_FOOTER as u64) else { return Ok(None) };
    let footer = read_at(fd, footer_at, TRAILER_FOOTER as u64)?;
    if footer.len() < TRAILER_FOOTER || footer[40..] != TRAILER_MAGIC[..] {
        return Ok(None);
    }
    let count = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    let Some(start) = count.checked_mul(TRAILER_ENTRY as u64).and_then(|n| footer_at.checked_sub(n)) else {
        return Ok(None);
    };
    let entries = read_at(fd, start, footer_at - start)?;
    if (entries.len() as u64) < footer_at - start || blake3::hash(&entries).as_bytes()[..] != footer[8..40] {
        return Ok(None);
    }
    let mut slots = Vec::with_capacity(count as usize);
    for e in entries.chunks_exact(TRAILER_ENTRY) {
        let id = ObjectId::from_slice(&e[..32]).expect("32 bytes");
        let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(e[40..].try_into().expect("8 bytes"));
        if offset % SLOT_ALIGN != 0 || len > SMALL_FILE || offset.checked_add(slot_len(len)).is_none_or(|e| e > start) {
            return Ok(None);
        }
        slots.push((id, offset, len));
    }
    Ok(Some((slots, start)))
}

/// Records the sealed packs in the index, in one transaction; returns
/// whether there were any. An object the index already holds (in another
/// pack, or twice in these) keeps the slot it has, and the other copy's
/// blocks are freed (a pack of nothing but such copies is removed), as
/// are the trailers' blocks, needed no more. The
/// slot [`Index::sealed_slots`] gave out for each object is the one kept:
/// [`Store::slot`] asks the index first, and the packs go in the order
/// they were sealed. If the transaction fails, the packs stay to be found
/// in memory and recorded later (or from their trailers after a restart).
fn record_sealed(index: &mut Index, packs: BorrowedFd<'_>) -> io::Result<bool> {
    if index.sealed.is_empty() {
        return Ok(false);
    }
    let Index { conn, sealed, sealed_slots } = index;
    let mut spare: Vec<Vec<(u64, u64)>> = Vec::with_capacity(sealed.len());
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
    {
        let mut insert = tx
            .prepare_cached("INSERT OR IGNORE INTO packed (object, pack, offset, length) VALUES (?1, ?2, ?3, ?4)")
            .map_err(db)?;
        let mut kept = tx.prepare_cached("SELECT pack, offset FROM packed WHERE object = ?1").map_err(db)?;
        for pack in sealed.iter() {
            let mut copies = Vec::new();
            for (id, offset, len) in &pack.slots {
                if insert.execute(params![&id.0[..], &*pack.name, *offset as i64, *len as i64]).map_err(db)? == 0 {
                    // Recorded already, by another process that opened the
                    // store (and recovered the pack), is not a copy.
                    let (p, o): (String, i64) =
                        kept.query_row([&id.0[..]], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db)?;
                    if (p.as_str(), o as u64) != (&*pack.name, *offset) {
                        copies.push((*offset, *len));
                    }
                }
            }
            spare.push(copies);
        }
    }
    tx.commit().map_err(db)?;
    sealed_slots.clear();
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
fn recover_sealed(index: &mut Index, packs: BorrowedFd<'_>) -> io::Result<usize> {
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
        index.add_sealed(name.into(), slots, trailer_at);
        recovered += 1;
    }
    record_sealed(index, packs)?;
    Ok(recovered)
}

/// Reads (pack, offset, length) from a row of the pack index.
fn slot_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, u64, u64)> {
    Ok((pack_name(r, 0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))
}

/// Whether `name` is a ULID, as a pack is named: only such a name is
/// opened or unlinked under `packs/`.
fn is_pack_name(name: &str) -> bool {
    name.len() == 26 && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Reads a pack's name from the index, refusing anything but a pack's
/// name (see [`is_pack_name`]).
fn pack_name(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<String> {
    let name: String = r.get(column)?;
    if is_pack_name(&name) {
        return Ok(name);
    }
    let why = io::Error::other(format!("{name:?} is not the name of a pack"));
    Err(rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(why)))
}

fn db(e: rusqlite::Error) -> io::Error {
    io::Error::other(format!("pack index: {e}"))
}

/// Frees a slot's blocks. Where holes cannot be punched, the space stays
/// taken until the whole pack is removed.
fn punch(pack: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    match sys::punch_hole(pack, offset, slot_len(len)) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        r => r,
    }
}

/// Hashes the content of an open file, reading only its data segments and
/// hashing holes as the zeros they read as.
pub fn hash_fd(fd: BorrowedFd<'_>, size: u64) -> io::Result<ObjectId> {
    thread_local! {
        // One read buffer per thread: most files are small, and allocating
        // (and zeroing) 256 KiB for each of them costs more than hashing.
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.is_empty() {
            buf.resize(256 * 1024, 0);
        }
        hash_with(fd, size, buf)
    })
}

fn hash_with(fd: BorrowedFd<'_>, size: u64, buf: &mut [u8]) -> io::Result<ObjectId> {
    // Holes are looked for only in files larger than one read: a small one
    // is read whole (its holes read as zeros).
    let segments = if size <= buf.len() as u64 { vec![(0, size)] } else { sys::data_segments(fd, size)? };
    if segments.iter().map(|(_, len)| len).sum::<u64>() < size {
        return hash_sparse(fd, size, &segments);
    }
    let mut hasher = blake3::Hasher::new();
    let mut off = 0u64;
    while off < size {
        let want = ((size - off) as usize).min(buf.len());
        let n = sys::pread(fd, &mut buf[..want], off)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    Ok(ObjectId(*hasher.finalize().as_bytes()))
}

/// The block a sparse file's identity is made of.
const SPARSE_BLOCK: u64 = 64 * 1024;

/// The identity of a file with holes, whose cost follows its data, not
/// its apparent size (hashing the holes of a 1 TiB file as zeros took
/// minutes): BLAKE3 in its key-derivation mode, over the size and, for each
/// 64 KiB block that holds anything but zeros, its index and its bytes.
/// Holes are not read, and a block of written zeros counts as a hole, so
/// the identity follows the content, not the layout the filesystem gave
/// its holes. It differs from the identity of the same bytes without holes
/// (plain BLAKE3), which only costs sharing between the two.
fn hash_sparse(fd: BorrowedFd<'_>, size: u64, segments: &[(u64, u64)]) -> io::Result<ObjectId> {
    let mut hasher = blake3::Hasher::new_derive_key("snapback 2026-12 sparse file identity v1");
    hasher.update(&size.to_le_bytes());
    let mut block = vec![0u8; SPARSE_BLOCK as usize];
    let mut next = 0u64; // the first block not fed yet
    for &(start, len) in segments {
        let first = (start / SPARSE_BLOCK).max(next);
        let last = (start + len).div_ceil(SPARSE_BLOCK);
        for index in first..last {
            let off = index * SPARSE_BLOCK;
            let want = (size - off).min(SPARSE_BLOCK) as usize;
            let n = read_at_into(fd, off, &mut block[..want])?;
            block[n..want].fill(0);
            if block[..want].iter().any(|&b| b != 0) {
                hasher.update(&index.to_le_bytes());
                hasher.update(&block[..want]);
            }
        }
        next = next.max(last);
    }
    Ok(ObjectId(*hasher.finalize().as_bytes()))
}

/// Reads up to `buf.len()` bytes at `offset`; returns how many (fewer only
/// at the end of the file).
fn read_at_into(fd: BorrowedFd<'_>, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = sys::pread(fd, &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// The file that marks a directory as a snapback store.
pub const MARKER: &[u8] = b"snapback-store";

const MARKER_TEXT: &str = "a snapback object store: written by snapbackd only\n";

/// Writes the store marker, if it is not there yet, naming `catalogue` (the
/// id of the catalogue the store belongs to) when given; a marker from
/// before stores named their catalogue gets the name added.
fn mark_as_store(dir: BorrowedFd<'_>, catalogue: Option<&str>) -> io::Result<()> {
    let text = match catalogue {
        Some(id) => format!("{MARKER_TEXT}catalogue {id}\n"),
        None => MARKER_TEXT.to_owned(),
    };
    match catalogue_of(dir)? {
        Some(Some(_)) => return Ok(()),
        Some(None) if catalogue.is_none() => return Ok(()),
        _ => {}
    }
    let mut tmp = MARKER.to_vec();
    tmp.extend_from_slice(b".tmp");
    let _ = sys::unlinkat(dir, &tmp, false);
    let f = sys::openat(dir, &tmp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
    sys::pwrite_all(f.as_fd(), text.as_bytes(), 0)?;
    sys::fsync(f.as_fd())?;
    sys::renameat(dir, &tmp, dir, MARKER, false)
}

/// What the store marker in `dir` says of the catalogue the store belongs
/// to: `None` without a marker, `Some(None)` for a marker that names none.
pub fn catalogue_of(dir: BorrowedFd<'_>) -> io::Result<Option<Option<String>>> {
    let f = match sys::openat(dir, MARKER, libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let text = read_at(f.as_fd(), 0, 4096)?;
    let id = String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix("catalogue ").map(|id| id.trim().to_owned()));
    Ok(Some(id))
}

/// Whether the store directory `dir` holds any object, loose or packed.
pub fn holds_objects(dir: BorrowedFd<'_>) -> io::Result<bool> {
    let open = |name: &[u8]| match sys::openat(dir, name, sys::DIR_FLAGS, 0) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    };
    if let Some(packs) = open(b"packs")?
        && !sys::read_dir(packs.as_fd())?.is_empty()
    {
        return Ok(true);
    }
    let Some(objects) = open(b"objects")? else { return Ok(false) };
    for fan in sys::read_dir(objects.as_fd())? {
        let sub = sys::openat(objects.as_fd(), &fan.name, sys::DIR_FLAGS, 0)?;
        if !sys::read_dir(sub.as_fd())?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether the directory `dir` is a snapback store: it has the marker, or
/// (a store from before the marker) a pack index.
pub fn is_store(dir: BorrowedFd<'_>) -> bool {
    sys::lstatat(dir, MARKER).is_ok() || sys::lstatat(dir, b"packs.db").is_ok()
}

fn same_version(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_ino == b.st_ino
        && a.st_size == b.st_size
        && sys::mtime_ns(a) == sys::mtime_ns(b)
        && sys::ctime_ns(a) == sys::ctime_ns(b)
}

impl Store {
    /// Opens the store at `path`, creating it (mode 0700) if needed. For
    /// tools and tests that own the path; the daemon opens its stores
    /// through a pinned directory with [`Store::open_in`].
    pub fn open(path: &Path) -> io::Result<Store> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
        let dir = OwnedFd::from(File::open(path)?);
        Store::open_in(dir, path, None)
    }

    /// Opens the store whose directory is `dir`, creating its layout in
    /// it if needed; `path` is only how it is named in messages. Nothing
    /// is looked up by `path`: the subdirectories are opened from `dir`
    /// with symlinks refused, and the pack index (which SQLite opens by
    /// name) through `/proc/self/fd`, which the kernel resolves from the
    /// open directory, not by walking `path` again. `catalogue`: the id of
    /// the catalogue the store belongs to, recorded in its marker if the
    /// marker names none yet (the caller checks that it names no other).
    pub fn open_in(dir: OwnedFd, path: &Path, catalogue: Option<&str>) -> io::Result<Store> {
        let subdir = |name: &[u8]| -> io::Result<OwnedFd> {
            match sys::mkdirat(dir.as_fd(), name, 0o700) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            sys::openat(dir.as_fd(), name, sys::DIR_FLAGS, 0)
        };
        let objects = subdir(b"objects")?;
        for i in 0..=255u8 {
            match sys::mkdirat(objects.as_fd(), format!("{i:02x}").as_bytes(), 0o700) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let tmp = subdir(b"tmp")?;
        let packs = subdir(b"packs")?;
        mark_as_store(dir.as_fd(), catalogue)?;
        let index_path = PathBuf::from(format!("/proc/self/fd/{}/packs.db", dir.as_raw_fd()));
        let mut index = Index { conn: open_index(&index_path)?, sealed: Vec::new(), sealed_slots: HashMap::new() };
        let recovered = recover_sealed(&mut index, packs.as_fd())?;
        if recovered > 0 {
            tracing::info!(store = %path.display(), packs = recovered, "recorded packs sealed before a stop");
        }
        let index = Arc::new(Mutex::new(index));
        // With `SNAPBACK_TEST_HOOKS=1` and `SNAPBACK_TEST_HOLD_PACKS=1`, the
        // thread leaves sealed packs unrecorded, for a test that kills the
        // daemon to see them recovered.
        let hold = crate::hooks::enabled() && std::env::var_os("SNAPBACK_TEST_HOLD_PACKS").is_some_and(|v| v == "1");
        let index_log = {
            let (index, packs) = (index.clone(), packs.try_clone()?);
            let what = index_path.display().to_string();
            WalCheckpointer::start_with(connect_index(&index_path)?, &what.clone(), move || {
                if hold {
                    return;
                }
                let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = record_sealed(&mut index, packs.as_fd()) {
                    tracing::warn!("recording sealed packs in {what}: {e}");
                }
            })?
        };
        Ok(Store {
            path: path.to_owned(),
            _dir: dir,
            objects,
            tmp,
            packs,
            index,
            index_log,
            index_written: AtomicBool::new(false),
            gc_lock: std::sync::RwLock::new(()),
            recently_read: Mutex::new(HashSet::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

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

    fn name(id: &ObjectId) -> Vec<u8> {
        let hex = id.to_string();
        format!("{}/{hex}", &hex[..2]).into_bytes()
    }

    /// Whether the object exists, loose or packed.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.has_loose(id) || self.slot(id).is_ok_and(|s| s.is_some())
    }

    fn has_loose(&self, id: &ObjectId) -> bool {
        sys::lstatat(self.objects.as_fd(), &Self::name(id)).is_ok()
    }

    /// Where a packed object lies: (pack, offset, length). The index is
    /// asked first: a sealed pack's copy of an object it already holds is
    /// freed when the pack is recorded.
    fn slot(&self, id: &ObjectId) -> io::Result<Option<(String, u64, u64)>> {
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt =
            index.conn.prepare_cached("SELECT pack, offset, length FROM packed WHERE object = ?1").map_err(db)?;
        if let Some(slot) = stmt.query_row([&id.0[..]], slot_of).optional().map_err(db)? {
            return Ok(Some(slot));
        }
        Ok(index.sealed_slots.get(id).map(|(pack, offset, len)| (pack.to_string(), *offset, *len)))
    }

    /// Records the sealed packs now (see [`record_sealed`]), for what reads
    /// or changes the index as a whole.
    fn record(&self) -> io::Result<()> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if record_sealed(&mut index, self.packs.as_fd())? {
            self.index_written.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Opens an object for reading. A missing one is a `NotFound` error.
    pub fn open_object(&self, id: &ObjectId) -> io::Result<Object> {
        match sys::openat(self.objects.as_fd(), &Self::name(id), libc::O_RDONLY, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            r => return r.map(Object::Loose),
        }
        let Some((pack, offset, len)) = self.slot(id)? else {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("object {id} is not in the store")));
        };
        let pack = sys::openat(self.packs.as_fd(), pack.as_bytes(), libc::O_RDONLY, 0)?;
        let mut recent = self.recently_read.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENTLY_READ {
            recent.clear();
        }
        recent.insert(*id);
        Ok(Object::Packed { pack, offset, len })
    }

    /// Whether `id` is a packed object read out lately that the index
    /// still holds. Only those are looked up: asking the index for every
    /// small file a scan reads cost a third of the scan's CPU time on ext4,
    /// and the content a scan meets again is mostly what a rollback just
    /// restored. The caller holds [`Store::gc_lock`] until its commit, so
    /// the object stays.
    fn packed_already(&self, id: &ObjectId) -> io::Result<bool> {
        if !self.recently_read.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
            return Ok(false);
        }
        Ok(self.slot(id)?.is_some())
    }

    /// Starts a pack for the small objects of one capture (see [`Pack`]).
    pub fn pack(&self) -> Pack<'_> {
        Pack { store: self, name: ulid::Ulid::new().to_string(), state: Mutex::new(PackState::default()) }
    }

    /// Stores the content of the open regular file `src`, whose `fstat`
    /// the caller took after opening it. Returns the object's hash and the
    /// stat its content corresponds to. Clones with `FICLONE` when
    /// `reflink` is set and the pair allows it, except that given a `pack`,
    /// a file of at most [`SMALL_FILE`] bytes goes into it, from the bytes
    /// read to hash it.
    pub fn put(
        &self,
        src: BorrowedFd<'_>,
        opened: libc::stat,
        reflink: bool,
        pack: Option<&Pack<'_>>,
    ) -> io::Result<Put> {
        const TRIES: usize = 3;
        for attempt in 1..=TRIES {
            let before = if attempt == 1 { opened } else { sys::fstat(src)? };
            let size = before.st_size as u64;
            if let Some(pack) = pack.filter(|_| size <= SMALL_FILE) {
                let bytes = read_at(src, 0, size)?;
                let hash = ObjectId(*blake3::hash(&bytes).as_bytes());
                let mut stat = sys::fstat(src)?;
                // The bytes read belong to `before` when nothing moved in
                // between; when the file keeps changing, they are still one
                // whole object named by its own content, and the next scan
                // reads the file again.
                let unstable = !same_version(&before, &stat);
                if unstable && attempt < TRIES {
                    continue;
                }
                if unstable {
                    stat.st_size = bytes.len() as i64;
                } else {
                    stat = before;
                }
                let made = !self.has_loose(&hash) && !self.packed_already(&hash)?;
                if made {
                    pack.add(hash, &bytes)?;
                }
                return Ok(Put { hash, stat, reflinked: false, copied: made, unstable });
            }
            let hash = hash_fd(src, size)?;
            if self.has_loose(&hash) {
                if same_version(&before, &sys::fstat(src)?) {
                    return Ok(Put { hash, stat: before, reflinked: false, copied: false, unstable: false });
                }
                continue;
            }
            // Written beside its final name and renamed within the same
            // directory: a rename across directories takes the filesystem's
            // rename lock, which concurrent readers then queue on.
            let tmp_name = format!("{}/.tmp-{}", &hash.to_string()[..2], ulid::Ulid::new()).into_bytes();
            let tmp = sys::openat(self.objects.as_fd(), &tmp_name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o400)?;
            let reflinked = match clone_or_copy(tmp.as_fd(), src, size, reflink) {
                Ok(r) => r,
                Err(e) => {
                    let _ = sys::unlinkat(self.objects.as_fd(), &tmp_name, false);
                    return Err(e);
                }
            };
            let after = sys::fstat(src)?;
            let (hash, stat, unstable) = if same_version(&before, &after) {
                (hash, before, false)
            } else if attempt < TRIES {
                let _ = sys::unlinkat(self.objects.as_fd(), &tmp_name, false);
                continue;
            } else {
                // The source keeps changing: keep what was cloned, named by
                // its own content, and have the next scan read it again.
                let st = sys::fstat(tmp.as_fd())?;
                (hash_fd(tmp.as_fd(), st.st_size as u64)?, after, true)
            };
            let mut stat = stat;
            if unstable {
                stat.st_size = sys::fstat(tmp.as_fd())?.st_size;
            }
            match sys::renameat(self.objects.as_fd(), &tmp_name, self.objects.as_fd(), &Self::name(&hash), true) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let _ = sys::unlinkat(self.objects.as_fd(), &tmp_name, false);
                }
                Err(e) => {
                    let _ = sys::unlinkat(self.objects.as_fd(), &tmp_name, false);
                    return Err(e);
                }
            }
            return Ok(Put { hash, stat, reflinked, copied: !reflinked, unstable });
        }
        Err(io::Error::other("the file kept changing while it was read"))
    }

    /// Makes every object written so far durable: one `syncfs` of the
    /// store's filesystem.
    pub fn sync(&self) -> io::Result<()> {
        sys::syncfs(self.objects.as_fd())
    }

    /// Returns whether this store's filesystem can make reflinks, by cloning
    /// a small file inside the store.
    pub fn probe_reflink(&self) -> bool {
        let a = ulid::Ulid::new().to_string().into_bytes();
        let b = ulid::Ulid::new().to_string().into_bytes();
        let result = (|| -> io::Result<()> {
            let fa = sys::openat(self.tmp.as_fd(), &a, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)?;
            let fb = sys::openat(self.tmp.as_fd(), &b, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)?;
            let data = [7u8; 4096];
            // SAFETY: data is readable for its length.
            if unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&fa), data.as_ptr().cast(), data.len()) } != 4096 {
                return Err(io::Error::last_os_error());
            }
            sys::ficlone(fb.as_fd(), fa.as_fd())
        })();
        let _ = sys::unlinkat(self.tmp.as_fd(), &a, false);
        let _ = sys::unlinkat(self.tmp.as_fd(), &b, false);
        result.is_ok()
    }

    /// Returns the device of the store's filesystem.
    pub fn device(&self) -> io::Result<u64> {
        Ok(sys::fstat(self.objects.as_fd())?.st_dev)
    }

    /// Deletes the given objects; returns the bytes freed. The caller holds
    /// `gc_lock` exclusively and has checked that nothing references them.
    /// An object that cannot be removed does not keep the others: the
    /// first error is returned once all were tried, and what it left is
    /// collected at the next start.
    pub fn remove_objects(&self, ids: &[ObjectId]) -> io::Result<u64> {
        self.record()?;
        let mut bytes = 0;
        let mut failed = None;
        for id in ids {
            let name = Self::name(id);
            let removed = sys::lstatat(self.objects.as_fd(), &name)
                .and_then(|st| sys::unlinkat(self.objects.as_fd(), &name, false).map(|()| st.st_size as u64));
            match removed {
                Ok(size) => bytes += size,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed.get_or_insert(io::Error::new(e.kind(), format!("removing object {id}: {e}")));
                }
            }
        }
        let slots = self.unindex(ids)?;
        bytes += self.free_slots(&slots)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }

    /// Deletes the index rows of `ids`, in one transaction, and returns the
    /// slots they named: from then on no reader finds them.
    fn unindex(&self, ids: &[ObjectId]) -> io::Result<Vec<(String, u64, u64)>> {
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

    /// Frees the blocks of slots already gone from the index (so no reader
    /// can find them), and removes the packs left with no live slot.
    /// Returns the bytes of the objects freed.
    fn free_slots(&self, slots: &[(String, u64, u64)]) -> io::Result<u64> {
        let mut by_pack: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for (pack, offset, len) in slots {
            by_pack.entry(pack).or_default().push((*offset, *len));
        }
        let mut bytes = 0;
        for (pack, dead) in by_pack {
            bytes += dead.iter().map(|&(_, len)| len).sum::<u64>();
            if self.live_in(pack)? {
                let fd = match sys::openat(self.packs.as_fd(), pack.as_bytes(), libc::O_WRONLY, 0) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    r => r?,
                };
                for (offset, len) in dead {
                    punch(fd.as_fd(), offset, len)?;
                }
            } else {
                self.remove_pack(pack.as_bytes())?;
            }
        }
        Ok(bytes)
    }

    fn remove_pack(&self, name: &[u8]) -> io::Result<()> {
        match sys::unlinkat(self.packs.as_fd(), name, false) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Frees the blocks of `pack` that none of its indexed `slots` covers:
    /// slots that a removal took out of the index but did not get to free,
    /// because the daemon stopped in between. Returns the bytes freed.
    fn free_unindexed(&self, pack: &str, slots: &mut [(u64, u64)]) -> io::Result<u64> {
        let fd = match sys::openat(self.packs.as_fd(), pack.as_bytes(), libc::O_RDWR, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            r => r?,
        };
        let size = sys::fstat(fd.as_fd())?.st_size as u64;
        slots.sort_unstable();
        // Exact ranges, not rounded up to slots: a data segment may start on
        // a block smaller than a slot, and must not reach a live one.
        let mut freed = 0;
        let mut free = |from: u64, to: u64| -> io::Result<()> {
            match sys::punch_hole(fd.as_fd(), from, to - from) {
                Ok(()) => freed += to - from,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => return Err(e),
            }
            Ok(())
        };
        for (start, len) in sys::data_segments(fd.as_fd(), size)? {
            // The last block, partly past the end of the file, is whole
            // free space only when the hole reaches its end.
            let end = if start + len >= size { slot_len(size) } else { start + len };
            let mut at = start;
            for &(offset, len) in slots.iter().skip_while(|&&(o, l)| o + slot_len(l) <= start) {
                if offset >= end {
                    break;
                }
                if offset > at {
                    free(at, offset)?;
                }
                at = at.max(offset + slot_len(len));
            }
            if at < end {
                free(at, end)?;
            }
        }
        Ok(freed)
    }

    /// Whether any object of `pack` is still in the index.
    fn live_in(&self, pack: &str) -> io::Result<bool> {
        self.index.lock().unwrap_or_else(|p| p.into_inner()).has_rows(pack)
    }

    /// Returns whether an object has the given size and its content still
    /// hashes to its name. A missing object is a `NotFound` error.
    pub fn check_object(&self, id: &ObjectId, size: u64) -> io::Result<bool> {
        let object = self.open_object(id)?;
        if object.size()? != size {
            return Ok(false);
        }
        Ok(object.hash(size)? == *id)
    }

    /// Lists the objects present in the store, loose and packed.
    pub fn list_objects(&self) -> io::Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let dir = sys::openat(self.objects.as_fd(), format!("{i:02x}").as_bytes(), sys::DIR_FLAGS, 0)?;
            out.extend(sys::read_dir(dir.as_fd())?.iter().filter_map(|e| ObjectId::from_hex(&e.name)));
        }
        self.record()?;
        {
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            let mut stmt = index.conn.prepare("SELECT object FROM packed").map_err(db)?;
            for id in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).map_err(db)? {
                out.push(indexed_id(&id.map_err(db)?)?);
            }
        }
        out.sort_unstable_by_key(|id| id.0);
        out.dedup();
        Ok(out)
    }

    /// Every row of the pack index: (object, pack, offset, length).
    fn packed(&self) -> io::Result<Vec<(ObjectId, String, u64, u64)>> {
        self.record()?;
        let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = index.conn.prepare("SELECT object, pack, offset, length FROM packed").map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, pack_name(r, 1)?, r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, pack, offset, len) = row.map_err(db)?;
            out.push((indexed_id(&id)?, pack, offset, len));
        }
        Ok(out)
    }

    /// Makes `name` in `dir` a hardlink to an object.
    pub fn link_object(&self, id: &ObjectId, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
        sys::linkat(self.objects.as_fd(), &Self::name(id), dir, name)
    }

    /// Deletes every object not in `referenced` and every leftover temporary
    /// file. Returns (objects removed, bytes freed). The caller guarantees no
    /// checkpoint into this store is in progress.
    pub fn collect_garbage(&self, referenced: &HashSet<ObjectId>) -> io::Result<(u64, u64)> {
        for entry in sys::read_dir(self.tmp.as_fd())? {
            let _ = sys::unlinkat(self.tmp.as_fd(), &entry.name, false);
        }
        let (mut count, mut bytes) = (0, 0);
        let mut failed = None;
        for i in 0..=255u8 {
            let sub = format!("{i:02x}");
            let dir = match sys::openat(self.objects.as_fd(), sub.as_bytes(), sys::DIR_FLAGS, 0) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in sys::read_dir(dir.as_fd())? {
                let keep = ObjectId::from_hex(&entry.name).is_some_and(|id| referenced.contains(&id));
                if !keep {
                    let size = sys::lstatat(dir.as_fd(), &entry.name).map(|st| st.st_size as u64).unwrap_or(0);
                    // One that cannot go does not keep the rest, nor the packs.
                    match sys::unlinkat(dir.as_fd(), &entry.name, false) {
                        Ok(()) => (count, bytes) = (count + 1, bytes + size),
                        Err(e) => {
                            let name = String::from_utf8_lossy(&entry.name);
                            failed
                                .get_or_insert(io::Error::new(e.kind(), format!("removing objects/{sub}/{name}: {e}")));
                        }
                    }
                }
            }
        }
        // The slots still live, by pack, and the objects to drop.
        let rows = self.packed()?;
        let mut live: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        let mut dead = Vec::new();
        for (id, pack, offset, len) in &rows {
            if referenced.contains(id) {
                live.entry(pack).or_default().push((*offset, *len));
            } else {
                dead.push(*id);
            }
        }
        let slots = self.unindex(&dead)?;
        count += slots.len() as u64;
        bytes += self.free_slots(&slots)?;
        for (pack, slots) in &mut live {
            bytes += self.free_unindexed(pack, slots)?;
        }
        // Packs that no live object is in: emptied above, or never sealed
        // (their checkpoint failed, or the daemon stopped in it).
        for entry in sys::read_dir(self.packs.as_fd())? {
            let name = String::from_utf8_lossy(&entry.name);
            if !live.contains_key(name.as_ref()) {
                self.remove_pack(&entry.name)?;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((count, bytes)),
        }
    }
}

impl Drop for Store {
    /// Records the packs still only sealed: they would be recorded from
    /// their trailers at the next open, but that reads them all again.
    fn drop(&mut self) {
        if let Err(e) = self.record() {
            tracing::warn!(store = %self.path.display(), "recording sealed packs: {e}");
        }
    }
}

/// An object id read from the pack index.
fn indexed_id(bytes: &[u8]) -> io::Result<ObjectId> {
    ObjectId::from_slice(bytes).ok_or_else(|| io::Error::other("pack index: an object id is not 32 bytes"))
}

/// The pack index's schema: step `i` takes it from version `i` (its
/// `user_version`) to `i + 1`.
const INDEX_SCHEMA: &[&str] = &[
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
fn open_index(path: &Path) -> io::Result<Connection> {
    let mut conn = connect_index(path)?;
    upgrade_index(&mut conn, path)?;
    Ok(conn)
}

/// Opens a further connection to a pack index that [`open_index`] has
/// already brought to the latest schema (as `catalogue::connect` does for
/// the catalogue).
fn connect_index(path: &Path) -> io::Result<Connection> {
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
fn upgrade_index(conn: &mut Connection, path: &Path) -> io::Result<()> {
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

/// Fills the empty file `dst` with `src`: a reflink when `reflink` is set
/// and the pair allows it, else a copy (sparse-aware above [`SMALL_FILE`]).
/// Returns whether it was a reflink.
pub fn clone_or_copy(dst: BorrowedFd<'_>, src: BorrowedFd<'_>, size: u64, reflink: bool) -> io::Result<bool> {
    if reflink {
        match sys::ficlone(dst, src) {
            Ok(()) => return Ok(true),
            Err(e) if sys::clone_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if size <= SMALL_FILE {
        // One read and one write: a file this small has no holes worth
        // searching for, and no copy to refuse half way for want of room
        // (restoring 100 small files on ext4, this spares five calls each).
        let bytes = read_at(src, 0, size)?;
        sys::pwrite_all(dst, &bytes, 0)?;
        if (bytes.len() as u64) < size {
            // The source shrank while read: the same length a full copy
            // gives (a capture compares its stat again and retries).
            sys::ftruncate(dst, size)?;
        }
        return Ok(false);
    }
    // A copy takes room: refuse at once, rather than half way, when the
    // destination's filesystem cannot hold the source's data.
    let needed = sys::fstat(src)?.st_blocks as u64 * 512;
    let free = sys::free_bytes(dst)?;
    if needed > free {
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!("no space left: copying takes {needed} bytes and the filesystem has {free} free"),
        ));
    }
    sys::copy_sparse(dst, src, size)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh store in a temporary directory, which holds the test's
    /// source files beside it.
    fn temp_store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        (t, store)
    }

    fn put_file(store: &Store, path: &Path, pack: Option<&Pack<'_>>) -> Put {
        let file = File::open(path).unwrap();
        store.put(file.as_fd(), sys::fstat(file.as_fd()).unwrap(), true, pack).unwrap()
    }

    /// The blocks a file takes on disk.
    fn allocated(path: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
    }

    fn packs(store: &Store) -> Vec<PathBuf> {
        std::fs::read_dir(store.path().join("packs")).unwrap().map(|e| e.unwrap().path()).collect()
    }

    #[test]
    fn equal_content_is_stored_once_and_reads_back() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("a"), b"same bytes").unwrap();
        std::fs::write(t.path().join("b"), b"same bytes").unwrap();
        let pa = put_file(&store, &t.path().join("a"), None);
        let pb = put_file(&store, &t.path().join("b"), None);
        assert_eq!(pa.hash, pb.hash);
        assert!(pa.reflinked || pa.copied);
        assert!(!pb.reflinked && !pb.copied, "the second put made a new object");
        assert_eq!(pa.hash.0, *blake3::hash(b"same bytes").as_bytes());
        assert_eq!(store.open_object(&pa.hash).unwrap().read().unwrap(), b"same bytes");
    }

    #[test]
    fn small_files_go_into_the_pack_and_are_found_once_it_is_sealed() {
        let (t, store) = temp_store();
        let small: Vec<u8> = (0..SMALL_FILE as usize).map(|i| (i * 7) as u8).collect();
        let large: Vec<u8> = (0..SMALL_FILE as usize + 1).map(|i| (i * 13) as u8).collect();
        std::fs::write(t.path().join("small"), &small).unwrap();
        std::fs::write(t.path().join("large"), &large).unwrap();
        std::fs::write(t.path().join("tiny"), b"tiny").unwrap();
        let pack = store.pack();
        let s = put_file(&store, &t.path().join("small"), Some(&pack));
        let tiny = put_file(&store, &t.path().join("tiny"), Some(&pack));
        let l = put_file(&store, &t.path().join("large"), Some(&pack));
        assert!(s.copied && !s.reflinked, "a file of SMALL_FILE bytes is packed");
        assert!(s.hash.0 == *blake3::hash(&small).as_bytes() && !s.unstable);
        assert!(l.reflinked || l.copied, "a larger file is stored the usual way");
        assert!(store.has_loose(&l.hash) && !store.has_loose(&s.hash) && !store.has_loose(&tiny.hash));
        assert!(!store.contains(&s.hash), "a packed object is invisible before the seal");
        pack.seal().unwrap();
        drop(pack);
        assert_eq!(packs(&store).len(), 1, "a sealed pack stays");
        for (id, bytes) in [(s.hash, &small[..]), (tiny.hash, b"tiny"), (l.hash, &large[..])] {
            assert!(store.contains(&id));
            let object = store.open_object(&id).unwrap();
            assert_eq!(object.size().unwrap(), bytes.len() as u64);
            assert!(object.read().unwrap() == bytes, "the object does not hold the file's bytes");
            assert!(store.check_object(&id, bytes.len() as u64).unwrap());
            let out = t.path().join(format!("out-{id}"));
            let f = File::create(&out).unwrap();
            object.write_into(f.as_fd(), bytes.len() as u64, true).unwrap();
            assert!(std::fs::read(&out).unwrap() == bytes);
        }
        let mut listed = store.list_objects().unwrap();
        listed.sort_unstable_by_key(|id| id.0);
        let mut want = vec![s.hash, tiny.hash, l.hash];
        want.sort_unstable_by_key(|id| id.0);
        assert_eq!(listed, want);
    }

    #[test]
    fn a_pack_written_out_in_several_parts_by_two_threads_reads_back() {
        let (t, store) = temp_store();
        // 400 slots of 8 KiB: more than three buffers' worth.
        let content = |i: usize| -> Vec<u8> { (0..5000).map(|k| (i * 31 + k) as u8).collect() };
        let paths: Vec<PathBuf> = (0..400)
            .map(|i| {
                let path = t.path().join(format!("f{i}"));
                std::fs::write(&path, content(i)).unwrap();
                path
            })
            .collect();
        let pack = store.pack();
        let ids: Vec<ObjectId> = std::thread::scope(|s| {
            let halves: Vec<_> = paths
                .chunks(200)
                .map(|half| s.spawn(|| half.iter().map(|p| put_file(&store, p, Some(&pack)).hash).collect::<Vec<_>>()))
                .collect();
            halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| !store.contains(id)), "visible before the seal");
        pack.seal().unwrap();
        let file = store.path().join("packs").join(&pack.name);
        let trailer = 400 * TRAILER_ENTRY + TRAILER_FOOTER;
        assert_eq!(std::fs::metadata(&file).unwrap().len(), (400 * 8192 + trailer) as u64);
        for (i, id) in ids.iter().enumerate() {
            assert!(store.open_object(id).unwrap().read().unwrap() == content(i), "object {i} does not read back");
        }
    }

    #[test]
    fn a_pack_dropped_unsealed_leaves_nothing() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("a"), b"never committed").unwrap();
        let pack = store.pack();
        let a = put_file(&store, &t.path().join("a"), Some(&pack));
        assert_eq!(packs(&store).len(), 1);
        drop(pack);
        assert!(packs(&store).is_empty());
        assert!(!store.contains(&a.hash));
        assert_eq!(store.open_object(&a.hash).err().map(|e| e.kind()), Some(io::ErrorKind::NotFound));
    }

    /// Packs `bodies` (from files `f0`, `f1`, ... beside the store) into
    /// one pack, sealed and not yet recorded; returns their ids and the
    /// pack's path.
    fn sealed_unrecorded(t: &tempfile::TempDir, store: &Store, bodies: &[Vec<u8>]) -> (Vec<ObjectId>, PathBuf) {
        let pack = store.pack();
        let ids = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let path = t.path().join(format!("f{i}"));
                std::fs::write(&path, b).unwrap();
                put_file(store, &path, Some(&pack)).hash
            })
            .collect();
        pack.seal().unwrap();
        (ids, store.path().join("packs").join(&pack.name))
    }

    fn recorded_rows(store: &Store) -> i64 {
        store.index.lock().unwrap().conn.query_row("SELECT count(*) FROM packed", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_sealed_pack_is_found_before_it_is_recorded_and_its_trailer_freed_after() {
        let (t, store) = temp_store();
        let bodies: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; 5000]).collect();
        let (ids, file) = sealed_unrecorded(&t, &store, &bodies);
        let (listed, trailer_at) = read_trailer(File::open(&file).unwrap().as_fd()).unwrap().expect("a trailer");
        assert_eq!(listed.iter().map(|s| s.0).collect::<Vec<_>>(), ids);
        assert_eq!(trailer_at, 3 * 8192);
        assert_eq!(recorded_rows(&store), 0, "the seal wrote the index");
        for (id, body) in ids.iter().zip(&bodies) {
            assert!(store.open_object(id).unwrap().read().unwrap() == *body, "not found before it was recorded");
        }
        store.record().unwrap();
        assert_eq!(recorded_rows(&store), 3);
        for (id, body) in ids.iter().zip(&bodies) {
            assert!(store.open_object(id).unwrap().read().unwrap() == *body, "not found once recorded");
        }
        File::open(&file).unwrap().sync_all().unwrap();
        assert!(read_trailer(File::open(&file).unwrap().as_fd()).unwrap().is_none(), "the trailer was kept");
        assert_eq!(allocated(&file), 3 * 8192, "the trailer's block was not freed");
    }

    #[test]
    fn a_pack_sealed_but_never_recorded_is_recorded_from_its_trailer_at_the_next_open() {
        let (t, store) = temp_store();
        let bodies: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 3000]).collect();
        let (ids, file) = sealed_unrecorded(&t, &store, &bodies);
        // One never sealed, as a daemon stopped in a checkpoint leaves.
        std::fs::write(t.path().join("unsealed"), b"never sealed").unwrap();
        let unsealed = store.pack();
        let lost = put_file(&store, &t.path().join("unsealed"), Some(&unsealed)).hash;
        std::mem::forget(unsealed);
        // The daemon stops before recording them: what it had in memory is gone.
        {
            let mut index = store.index.lock().unwrap();
            index.sealed.clear();
            index.sealed_slots.clear();
        }
        drop(store);
        // And the third object's slot lost its content (a power loss).
        let mut data = std::fs::read(&file).unwrap();
        data[2 * 4096..2 * 4096 + 3000].fill(0);
        std::fs::write(&file, &data).unwrap();

        let store = Store::open(&t.path().join("store")).unwrap();
        assert_eq!(recorded_rows(&store), 3, "the sealed pack's whole slots were not recorded at the open");
        for (i, (id, body)) in ids.iter().zip(&bodies).enumerate().filter(|(i, _)| *i != 2) {
            assert!(store.open_object(id).unwrap().read().unwrap() == *body, "object {i} was not recovered");
        }
        assert!(!store.contains(&ids[2]), "a slot whose content is lost was recorded");
        assert!(!store.contains(&lost), "an unsealed pack was recorded");
        // Recorded once: a second open finds nothing more to do.
        drop(store);
        let store = Store::open(&t.path().join("store")).unwrap();
        assert_eq!(recorded_rows(&store), 3);
        let (n, _) = store.collect_garbage(&ids.iter().copied().collect()).unwrap();
        assert_eq!(n, 0);
        assert_eq!(packs(&store), vec![file], "garbage collection left the unsealed pack");
    }

    #[test]
    fn a_pack_that_cannot_be_read_does_not_keep_the_store_from_opening() {
        let (t, store) = temp_store();
        drop(store);
        // Named as a pack, but a directory: reading its trailer fails.
        std::fs::create_dir(t.path().join("store/packs/01JAAAAAAAAAAAAAAAAAAAAAAA")).unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        assert_eq!(recorded_rows(&store), 0);
    }

    #[test]
    fn a_pack_another_process_recorded_first_keeps_its_slots() {
        let (t, store) = temp_store();
        let (ids, _) = sealed_unrecorded(&t, &store, &[b"recorded twice".to_vec()]);
        // A second process opens the store (as a test beside the daemon
        // does) and records the pack from its trailer.
        drop(Store::open(store.path()).unwrap());
        store.record().unwrap();
        assert_eq!(store.open_object(&ids[0]).unwrap().read().unwrap(), b"recorded twice");
    }

    #[test]
    fn content_already_stored_is_not_packed_again() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("a"), b"twice").unwrap();
        std::fs::write(t.path().join("b"), b"twice").unwrap();
        let first = store.pack();
        put_file(&store, &t.path().join("a"), Some(&first));
        first.seal().unwrap();
        // Packed twice, in one pack and in the next: one slot each, but the
        // index keeps the first, and the copies are freed when recorded.
        std::fs::write(t.path().join("c"), vec![b'c'; 8192]).unwrap();
        let second = store.pack();
        let c = put_file(&store, &t.path().join("c"), Some(&second));
        let b = put_file(&store, &t.path().join("b"), Some(&second));
        put_file(&store, &t.path().join("a"), Some(&second));
        second.seal().unwrap();
        let (pack, ..) = store.slot(&b.hash).unwrap().unwrap();
        assert_eq!(pack, first.name, "the first copy is the one found");
        store.record().unwrap();
        assert_eq!(store.slot(&b.hash).unwrap().unwrap().0, first.name, "and the one recorded");
        let file = store.path().join("packs").join(&second.name);
        File::open(&file).unwrap().sync_all().unwrap();
        assert_eq!(allocated(&file), 8192, "the copies were freed, the new object kept");
        assert_eq!(store.open_object(&b.hash).unwrap().read().unwrap(), b"twice");
        assert_eq!(store.open_object(&c.hash).unwrap().read().unwrap(), vec![b'c'; 8192]);
        // A pack of nothing but copies is removed when recorded.
        let third = store.pack();
        put_file(&store, &t.path().join("a"), Some(&third));
        third.seal().unwrap();
        store.record().unwrap();
        assert_eq!(packs(&store).len(), 2);
    }

    #[test]
    fn content_read_out_of_a_pack_is_not_packed_again() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("a"), b"restored").unwrap();
        let first = store.pack();
        let a = put_file(&store, &t.path().join("a"), Some(&first));
        first.seal().unwrap();
        // Met again before anything read it out: packed again (the seal
        // would find the first copy and free this one).
        let second = store.pack();
        assert!(put_file(&store, &t.path().join("a"), Some(&second)).copied);
        drop(second);
        // A restore reads it out of its pack; the next scan meets it again.
        assert_eq!(store.open_object(&a.hash).unwrap().read().unwrap(), b"restored");
        let third = store.pack();
        let again = put_file(&store, &t.path().join("a"), Some(&third));
        assert_eq!(again.hash, a.hash);
        assert!(!again.copied, "the restored content was packed again");
        assert!(third.is_empty());
        // Once it is gone from the index, it is packed again.
        store.record().unwrap();
        store.index.lock().unwrap().conn.execute("DELETE FROM packed", []).unwrap();
        assert!(put_file(&store, &t.path().join("a"), Some(&third)).copied);
    }

    /// Packs `n` objects of 10,000 bytes (object `i` all `i + 1`) into one
    /// sealed pack, written out; returns their ids and the pack's path.
    fn sealed_pack(t: &tempfile::TempDir, store: &Store, n: u8) -> (Vec<ObjectId>, PathBuf) {
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| vec![i + 1; 10_000]).collect();
        let (ids, file) = sealed_unrecorded(t, store, &bodies);
        store.record().unwrap();
        std::fs::File::open(&file).unwrap().sync_all().unwrap();
        let before = allocated(&file);
        assert!(before >= u64::from(n) * 12288, "{before} bytes allocated for {n} slots of 12 KiB");
        (ids, file)
    }

    #[test]
    fn removing_packed_objects_frees_their_slots_then_the_pack() {
        let (t, store) = temp_store();
        let (ids, file) = sealed_pack(&t, &store, 3);
        let before = allocated(&file);
        assert_eq!(store.remove_objects(&ids[..1]).unwrap(), 10_000);
        assert!(!store.contains(&ids[0]) && store.contains(&ids[1]));
        assert!(allocated(&file) <= before - 12288, "the dead slot's blocks were not freed");
        assert_eq!(store.open_object(&ids[2]).unwrap().read().unwrap(), vec![3u8; 10_000]);
        assert_eq!(store.remove_objects(&ids[1..]).unwrap(), 20_000);
        assert!(!file.exists(), "a pack with no live object is removed");
    }

    #[test]
    fn an_object_that_cannot_be_removed_does_not_keep_the_others() {
        let (t, store) = temp_store();
        let mut ids = Vec::new();
        for (name, data) in [("a", "first"), ("b", "second"), ("c", "third")] {
            std::fs::write(t.path().join(name), data).unwrap();
            ids.push(put_file(&store, &t.path().join(name), None).hash);
        }
        let pack = store.pack();
        std::fs::write(t.path().join("d"), "packed").unwrap();
        ids.push(put_file(&store, &t.path().join("d"), Some(&pack)).hash);
        pack.seal().unwrap();
        // The second object's name now holds a directory, which unlink
        // refuses (EISDIR), whoever runs the test.
        let second = store.path().join("objects").join(String::from_utf8(Store::name(&ids[1])).unwrap());
        std::fs::remove_file(&second).unwrap();
        std::fs::create_dir(&second).unwrap();
        let e = store.remove_objects(&ids).unwrap_err();
        assert!(e.to_string().contains(&ids[1].to_string()), "the error names the object: {e}");
        for id in [ids[0], ids[2], ids[3]] {
            assert!(!store.contains(&id), "object {id} was kept by another's failure");
        }
        assert!(second.is_dir());
        // Collection goes past it too, to the pack and the other names.
        // One whose directory comes after the directory's (they are walked
        // in order).
        let after =
            (0..).map(|i| format!("fifth {i}")).find(|c| blake3::hash(c.as_bytes()).as_bytes()[0] > ids[1].0[0]);
        std::fs::write(t.path().join("e"), after.unwrap()).unwrap();
        let fifth = put_file(&store, &t.path().join("e"), None).hash;
        let e = store.collect_garbage(&HashSet::new()).unwrap_err();
        assert!(e.to_string().contains(&ids[1].to_string()), "the error names the object: {e}");
        assert!(!store.contains(&fifth), "collection stopped at the directory");
    }

    #[test]
    fn garbage_collection_frees_slots_a_removal_left_unpunched() {
        let (t, store) = temp_store();
        let (ids, file) = sealed_pack(&t, &store, 4);
        let before = allocated(&file);
        // A removal that stopped between the index and the punch: the
        // second and the last slot are gone from the index, their blocks
        // are not.
        store.unindex(&[ids[1], ids[3]]).unwrap();
        assert_eq!(allocated(&file), before);
        let referenced = HashSet::from([ids[0], ids[2]]);
        let (objects, bytes) = store.collect_garbage(&referenced).unwrap();
        assert_eq!(objects, 0, "no object was left to remove");
        assert!(bytes >= 2 * 12288, "{bytes} bytes reported freed");
        assert!(allocated(&file) <= before - 2 * 12288, "the two unindexed slots' blocks were not freed");
        for (i, id) in [(0u8, ids[0]), (2, ids[2])] {
            assert_eq!(store.open_object(&id).unwrap().read().unwrap(), vec![i + 1; 10_000]);
        }
        // Nothing more to free the second time.
        assert_eq!(store.collect_garbage(&referenced).unwrap(), (0, 0));
    }

    #[test]
    fn a_sparse_files_identity_follows_its_data_not_its_hole_layout() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().unwrap();
        let write = |name: &str, zeros_written: bool| {
            let mut f = File::create(t.path().join(name)).unwrap();
            if zeros_written {
                f.write_all(&vec![0u8; 1 << 20]).unwrap(); // the first MiB written, as zeros
            }
            f.seek(SeekFrom::Start(3 << 20)).unwrap();
            f.write_all(b"x").unwrap();
            f.set_len(5 << 20).unwrap();
            File::open(t.path().join(name)).unwrap()
        };
        let a = write("a", false);
        let b = write("b", true);
        let id = |f: &File| hash_fd(f.as_fd(), 5 << 20).unwrap();
        if sys::data_segments(a.as_fd(), 5 << 20).unwrap().iter().map(|s| s.1).sum::<u64>() == 5 << 20 {
            eprintln!("this filesystem reports no holes: nothing to compare");
            return;
        }
        assert_eq!(id(&a), id(&b), "written zeros and holes are the same content");
        let dense = std::fs::read(t.path().join("a")).unwrap();
        assert_ne!(id(&a).0, *blake3::hash(&dense).as_bytes(), "a sparse identity is not the dense one");
        // A different byte anywhere changes it.
        let mut c = std::fs::OpenOptions::new().write(true).open(t.path().join("b")).unwrap();
        c.seek(SeekFrom::Start(3 << 20)).unwrap();
        c.write_all(b"y").unwrap();
        assert_ne!(id(&a), id(&File::open(t.path().join("b")).unwrap()));
        // A file without holes keeps the plain BLAKE3 of its bytes.
        std::fs::write(t.path().join("d"), &dense).unwrap();
        let d = File::open(t.path().join("d")).unwrap();
        assert_eq!(id(&d).0, *blake3::hash(&dense).as_bytes());
    }

    #[test]
    fn garbage_collection_keeps_only_referenced_objects() {
        let (t, store) = temp_store();
        for (name, data) in [("a", "keep"), ("b", "drop"), ("c", "keep packed"), ("d", "drop packed")] {
            std::fs::write(t.path().join(name), data).unwrap();
        }
        let keep = put_file(&store, &t.path().join("a"), None).hash;
        let drop_ = put_file(&store, &t.path().join("b"), None).hash;
        let pack = store.pack();
        let keep_packed = put_file(&store, &t.path().join("c"), Some(&pack)).hash;
        let drop_packed = put_file(&store, &t.path().join("d"), Some(&pack)).hash;
        pack.seal().unwrap();
        // A pack never sealed, as a daemon stopped in a checkpoint leaves.
        let unsealed = store.pack();
        put_file(&store, &t.path().join("d"), Some(&unsealed));
        std::mem::forget(unsealed);
        assert_eq!(packs(&store).len(), 2);
        let (n, bytes) = store.collect_garbage(&HashSet::from([keep, keep_packed])).unwrap();
        assert_eq!((n, bytes), (2, 4 + 11));
        assert!(store.contains(&keep) && store.contains(&keep_packed));
        assert!(!store.contains(&drop_) && !store.contains(&drop_packed));
        assert_eq!(packs(&store), vec![store.path().join("packs").join(&pack.name)], "the unsealed pack was removed");
        let (n, _) = store.collect_garbage(&HashSet::new()).unwrap();
        assert_eq!(n, 2);
        assert!(packs(&store).is_empty());
    }

    #[test]
    fn a_pack_name_in_the_index_that_is_not_a_ulid_is_never_opened() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("victim"), b"outside the store").unwrap();
        let id = ObjectId([7; 32]);
        let index = store.index.lock().unwrap();
        index.conn.execute("INSERT INTO packed VALUES (?1, '../../victim', 0, 17)", [&id.0[..]]).unwrap();
        drop(index);
        let err = store.open_object(&id).err().expect("refused");
        assert!(err.to_string().contains("not the name of a pack"), "{err}");
        assert!(store.remove_objects(&[id]).is_err());
        assert!(store.collect_garbage(&HashSet::new()).is_err());
        assert_eq!(std::fs::read(t.path().join("victim")).unwrap(), b"outside the store");
    }

    #[test]
    fn a_small_copy_is_whole_and_as_long_as_its_source_was() {
        let t = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(t.path().join("src"), &content).unwrap();
        let src = File::open(t.path().join("src")).unwrap();
        let copy = |name: &str, size: u64| {
            let dst = File::create(t.path().join(name)).unwrap();
            assert!(!clone_or_copy(dst.as_fd(), src.as_fd(), size, false).unwrap(), "copied, not cloned");
            std::fs::read(t.path().join(name)).unwrap()
        };
        assert_eq!(copy("whole", 5000), content);
        // Asked for more than the source holds (it shrank after its stat):
        // as long as asked, as the sparse-aware copy makes it.
        let longer = copy("longer", 6000);
        assert_eq!((&longer[..5000], longer.len()), (&content[..], 6000));
        assert!(longer[5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn an_object_written_over_a_file_leaves_exactly_its_content() {
        use std::io::{Seek, SeekFrom, Write};
        let (t, store) = temp_store();
        let small: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let other: Vec<u8> = small.iter().map(|b| b ^ 0x55).collect();
        std::fs::write(t.path().join("small"), &small).unwrap();
        std::fs::write(t.path().join("other"), &other).unwrap();
        // A large file with a hole in it: copied segment by segment, the
        // hole must not keep what the old file had there.
        let mut f = File::create(t.path().join("sparse")).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let sparse = std::fs::read(t.path().join("sparse")).unwrap();
        let pack = store.pack();
        let packed = put_file(&store, &t.path().join("small"), Some(&pack)).hash;
        pack.seal().unwrap();
        drop(pack);
        let loose = put_file(&store, &t.path().join("other"), None).hash;
        let big = put_file(&store, &t.path().join("sparse"), None).hash;
        for (id, want, packed) in [(packed, &small, true), (loose, &other, false), (big, &sparse, false)] {
            for reflink in [false, true] {
                for old_len in [0, 10, 4999, 5000, 5001, 4 << 20] {
                    let path = t.path().join("dst");
                    std::fs::write(&path, vec![0xEEu8; old_len]).unwrap();
                    let dst = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    let object = store.open_object(&id).unwrap();
                    assert_eq!(matches!(object, Object::Packed { .. }), packed, "{id}");
                    object.write_over(dst.as_fd(), old_len as u64, want.len() as u64, reflink).unwrap();
                    let got = std::fs::read(&path).unwrap();
                    assert!(
                        got == *want,
                        "{id} over {old_len} bytes (reflink {reflink}): {} bytes, not the object's {}",
                        got.len(),
                        want.len()
                    );
                }
            }
        }
    }

    #[test]
    fn a_pack_index_from_a_newer_snapback_is_refused() {
        let t = tempfile::tempdir().unwrap();
        drop(Store::open(&t.path().join("store")).unwrap());
        let conn = Connection::open(t.path().join("store/packs.db")).unwrap();
        conn.pragma_update(None, "user_version", INDEX_SCHEMA.len() as i64 + 1).unwrap();
        drop(conn);
        let err = Store::open(&t.path().join("store")).err().expect("refused");
        assert!(err.to_string().contains("newer snapback"), "{err}");
    }

    #[test]
    fn a_pack_index_of_version_1_is_upgraded_with_its_slots() {
        let (t, store) = temp_store();
        let path = t.path().join("small");
        std::fs::write(&path, b"packed before the upgrade").unwrap();
        let pack = store.pack();
        let id = put_file(&store, &path, Some(&pack)).hash;
        pack.seal().unwrap();
        drop(pack);
        drop(store);
        // Version 1, as the first release with packs wrote it.
        let conn = Connection::open(t.path().join("store/packs.db")).unwrap();
        conn.execute_batch("DROP TABLE log_generation; PRAGMA user_version = 1;").unwrap();
        drop(conn);
        let store = Store::open(&t.path().join("store")).unwrap();
        assert_eq!(store.open_object(&id).unwrap().read().unwrap(), b"packed before the upgrade");
        let index = store.index.lock().unwrap();
        let version: i64 = index.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, INDEX_SCHEMA.len() as i64);
        let n: i64 = index.conn.query_row("SELECT n FROM log_generation", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn the_pack_index_log_is_copied_back_once_asked_after_a_write() {
        let (t, store) = temp_store();
        let db = store.path().join("packs.db");
        let before = std::fs::metadata(&db).unwrap().len();
        // Past SQLite's automatic checkpoint threshold (1,000 pages).
        let index = store.index.lock().unwrap();
        index.conn.execute_batch("CREATE TABLE filler (v BLOB)").unwrap();
        for _ in 0..1100 {
            index.conn.execute("INSERT INTO filler (v) VALUES (zeroblob(4096))", []).unwrap();
        }
        drop(index);
        let path = t.path().join("small");
        std::fs::write(&path, b"one slot").unwrap();
        let pack = store.pack();
        put_file(&store, &path, Some(&pack));
        pack.seal().unwrap();
        // No automatic checkpoint: all of it is only in the log so far.
        assert_eq!(std::fs::metadata(&db).unwrap().len(), before);
        store.checkpoint_index_log();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&db).unwrap().len() < before + 1100 * 4096 {
            assert!(std::time::Instant::now() < deadline, "the log was never copied into the pack index");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
