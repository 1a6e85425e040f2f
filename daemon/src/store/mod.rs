//! The object store: immutable content, named by its blake3 hash, shared
//! by every checkpoint and path that holds that content.
//!
//! Most objects are files of their own under `objects/`, made with a
//! reflink (`FICLONE`) where the filesystem allows it, else with a copy
//! (sparse-aware above [`SMALL_FILE`]). Such an object is written under a
//! temporary name (`.tmp-*`) in its final directory and renamed only when
//! complete, so an object's name always holds whole content.
//!
//! The small files that a watcher-driven checkpoint reads, and those any
//! checkpoint copies into a store that cannot clone, are instead written
//! into packs (`packs/<ulid>`, see [`Pack`]), one per checkpoint but for
//! the largest: making and renaming a file for each would cost more than
//! their bytes. A pack's objects become visible when it is sealed: its
//! last write lists them in a trailer at its end, and the store finds them
//! in memory until a thread of its own records them in the store's pack
//! index (`packs.db`, SQLite), once the request's answer is sent. A pack
//! sealed but not yet recorded when the daemon stopped is recorded from
//! its trailer when the store is next opened. A dead packed object's
//! blocks are freed by punching a hole over its slot; a pack with no live
//! object left is removed.
//!
//! Objects that no catalogue row references (left by a checkpoint that
//! never committed, or freed by a purge), packs never sealed, the blocks
//! of slots taken out of the index but never punched (the daemon stopped
//! in between) and leftover temporaries are collected by
//! [`Store::collect_garbage`], or a slice at a time by
//! [`Store::collect_slice`] while checkpoints go on (see
//! [`Store::track_uses`]).

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

mod gc;
pub use gc::SLICES;
mod index;
mod marker;
mod object;
mod pack;
mod temp;
mod trailer;

use index::*;
pub use marker::*;
pub use object::*;
pub use pack::*;
use temp::Temp;
use trailer::*;

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
    /// While a collection goes through the store in slices (see
    /// [`Store::track_uses`]): the objects put, opened or linked since it
    /// began, which it keeps.
    used: Mutex<Option<HashSet<ObjectId>>>,
    tracking: AtomicBool,
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

fn same_version(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_ino == b.st_ino
        && a.st_size == b.st_size
        && sys::mtime_ns(a) == sys::mtime_ns(b)
        && sys::ctime_ns(a) == sys::ctime_ns(b)
}

/// The store's subdirectories: loose objects (in [`fanout`] directories
/// below), temporary files, packs.
const OBJECTS: &str = "objects";
const TMP: &str = "tmp";
const PACKS: &str = "packs";

/// The name of the directory under `objects/` of objects whose
/// distributing byte is `i`.
fn fanout(i: u8) -> String {
    format!("{i:02x}")
}

/// The directories of the store at `path` that the daemon writes in:
/// the store's own and those of its layout (see [`Store::open_in`]).
pub fn directories(path: &Path) -> Vec<PathBuf> {
    let objects = path.join(OBJECTS);
    let mut dirs = vec![path.to_owned(), objects.clone(), path.join(TMP), path.join(PACKS)];
    dirs.extend((0..=255u8).map(|i| objects.join(fanout(i))));
    dirs
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
        let objects = subdir(OBJECTS.as_bytes())?;
        for i in 0..=255u8 {
            match sys::mkdirat(objects.as_fd(), fanout(i).as_bytes(), 0o700) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let tmp = subdir(TMP.as_bytes())?;
        let packs = subdir(PACKS.as_bytes())?;
        mark_as_store(dir.as_fd(), catalogue)?;
        let index_path = PathBuf::from(format!("/proc/self/fd/{}/packs.db", dir.as_raw_fd()));
        let mut index = Index { conn: open_index(&index_path)?, sealed: Vec::new() };
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
            used: Mutex::new(None),
            tracking: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An object's name under `objects/`: in the directory of its first
    /// byte, or for an unhashed one (whose first bytes are a time), of the
    /// last byte of its ULID, which is random.
    fn name(id: &ObjectId) -> Vec<u8> {
        let dir = if id.is_unhashed() { id.0[15] } else { id.0[0] };
        format!("{}/{id}", fanout(dir)).into_bytes()
    }

    /// Whether the object exists, loose or packed.
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.has_loose(id) || self.slot(id).is_ok_and(|s| s.is_some())
    }

    fn has_loose(&self, id: &ObjectId) -> bool {
        sys::lstatat(self.objects.as_fd(), &Self::name(id)).is_ok()
    }

    /// Opens an object for reading. A missing one is a `NotFound` error.
    pub fn open_object(&self, id: &ObjectId) -> io::Result<Object> {
        self.note_use(id);
        match self.open_loose(id)? {
            Some(object) => Ok(object),
            None => self.open_packed(id)?.ok_or_else(|| not_in_store(id)),
        }
    }

    /// [`Store::open_object`] of an object most likely packed (a small
    /// file's, in a store that cannot clone: see [`Store::put`]): the pack
    /// index is asked first, sparing a lookup among loose objects that
    /// fails (restoring 100 such files at a million on ext4, the path
    /// lookups, that one and the pack's, took 1.2 ms; the index's answers
    /// 1.8 ms).
    pub fn open_likely_packed(&self, id: &ObjectId) -> io::Result<Object> {
        self.note_use(id);
        match self.open_packed(id)? {
            Some(object) => Ok(object),
            None => self.open_loose(id)?.ok_or_else(|| not_in_store(id)),
        }
    }

    /// Opens a loose object, if the store has it loose.
    fn open_loose(&self, id: &ObjectId) -> io::Result<Option<Object>> {
        match sys::openat(self.objects.as_fd(), &Self::name(id), libc::O_RDONLY, 0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            r => r.map(|fd| Some(Object::Loose(fd))),
        }
    }

    /// Opens a packed object, if the store has it packed.
    fn open_packed(&self, id: &ObjectId) -> io::Result<Option<Object>> {
        let Some((pack, offset, len)) = self.slot(id)? else { return Ok(None) };
        let pack = sys::openat(self.packs.as_fd(), pack.as_bytes(), libc::O_RDONLY, 0)?;
        let mut recent = self.recently_read.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENTLY_READ {
            recent.clear();
        }
        recent.insert(*id);
        Ok(Some(Object::Packed { pack, offset, len }))
    }

    /// Starts a pack for the small objects of one capture (see [`Pack`]).
    pub fn pack(&self) -> Pack<'_> {
        self.pack_of(PACK_SLOTS)
    }

    /// [`Store::pack`] with files of at most `slots_per_file` slots.
    pub(super) fn pack_of(&self, slots_per_file: usize) -> Pack<'_> {
        Pack { store: self, slots_per_file, state: Mutex::new(PackState::new()), spare: Mutex::new(Vec::new()) }
    }

    /// Stores the content of the open regular file `src`, whose `fstat`
    /// the caller took after opening it. Returns the object's hash and the
    /// stat its content corresponds to. Clones with `FICLONE` when
    /// `reflink` is set and the pair allows it, except that given a `pack`,
    /// a file of at most [`SMALL_FILE`] bytes goes into it, from the bytes
    /// read to hash it. `new_path`: the file is at a path with no recorded
    /// version (made, or moved there), whose content is looked for among
    /// the objects the store holds before it is packed again; a small
    /// file's content is not looked for otherwise (see `put_read`).
    pub fn put(
        &self,
        src: BorrowedFd<'_>,
        opened: libc::stat,
        reflink: bool,
        (pack, new_path): (Option<&Pack<'_>>, bool),
    ) -> io::Result<Put> {
        const TRIES: usize = 3;
        for attempt in 1..=TRIES {
            let before = if attempt == 1 { opened } else { sys::fstat(src)? };
            let last = attempt == TRIES;
            let put = match pack.filter(|_| before.st_size as u64 <= SMALL_FILE) {
                Some(pack) => self.put_packed(src, before, (pack, reflink, new_path), last)?,
                None => self.put_loose(src, before, reflink, last)?,
            };
            if let Some(put) = put {
                self.note_use(&put.hash);
                return Ok(put);
            }
        }
        Err(io::Error::other("the file kept changing while it was read"))
    }

    /// Stores the open regular file `src` (whose `fstat` the caller took
    /// after opening it) by cloning it under a new unhashed name (see
    /// [`ObjectId::unhashed`]), without reading it: a first checkpoint
    /// would otherwise read every file of the tree before it answers. The
    /// clone is whole when this returns and holds the content of the stat
    /// returned; [`Store::name_unhashed`] later gives it its hash.
    /// `Ok(None)` when the two files' filesystems cannot clone between
    /// them: the caller stores the file with [`Store::put`] instead.
    pub fn put_unhashed(&self, src: BorrowedFd<'_>, opened: libc::stat) -> io::Result<Option<Put>> {
        const TRIES: usize = 3;
        let mut attempt = 1;
        loop {
            let before = if attempt == 1 { opened } else { sys::fstat(src)? };
            let (id, object) = match self.clone_into_unhashed(src) {
                Ok(made) => made,
                Err(e) if sys::clone_unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let after = sys::fstat(src)?;
            let stable = same_version(&before, &after);
            if !stable && attempt < TRIES {
                attempt += 1;
                continue; // the clone is removed as `object` drops
            }
            let mut stat = before;
            if !stable {
                // It keeps changing: the clone is one whole state of it, of
                // its own length, and the next scan reads the file again.
                stat = after;
                stat.st_size = sys::fstat(object.fd.as_fd())?.st_size;
            }
            object.keep();
            return Ok(Some(Put { hash: id, stat, reflinked: true, copied: false, unstable: !stable }));
        }
    }

    /// Clones `src` under a new unhashed name, noted as used; removed
    /// unless the caller keeps it. Made under its own name, with no
    /// temporary and no rename: nothing refers to the name before the
    /// commit holding it, and the object of one that never commits is
    /// collected as any unreferenced object is. A clone is made whole or
    /// not at all.
    fn clone_into_unhashed(&self, src: BorrowedFd<'_>) -> io::Result<(ObjectId, Temp<'_>)> {
        let id = ObjectId::unhashed();
        let object = Temp::create(self.objects.as_fd(), Self::name(&id), 0o400)?;
        sys::ficlone(object.fd.as_fd(), src)?;
        self.note_use(&id);
        Ok((id, object))
    }

    /// Clones the unhashed object `id` under a new unhashed name, which
    /// it returns: each unhashed object is held by one version (see
    /// `Store::put_unhashed`), so a second version of the same content
    /// takes a clone. The caller holds [`Store::gc_lock`] shared until its
    /// catalogue commit, as a checkpoint does.
    pub fn clone_unhashed(&self, id: &ObjectId) -> io::Result<ObjectId> {
        let source = sys::openat(self.objects.as_fd(), &Self::name(id), libc::O_RDONLY, 0)?;
        let (new, object) = self.clone_into_unhashed(source.as_fd())?;
        object.keep();
        Ok(new)
    }

    /// Reads the unhashed object `id` (see [`Store::put_unhashed`]) and
    /// returns the hash of its content. A missing object is a `NotFound`
    /// error.
    pub fn hash_unhashed(&self, id: &ObjectId) -> io::Result<ObjectId> {
        let object = sys::openat(self.objects.as_fd(), &Self::name(id), libc::O_RDONLY, 0)?;
        let size = sys::fstat(object.as_fd())?.st_size as u64;
        hash_fd(object.as_fd(), size)
    }

    /// Makes the object named `hash` hold the content of the unhashed
    /// object `id`, whose content hashes to it: a second name of the same
    /// file (a hardlink within `objects/`, so that the content is under a
    /// name at every moment), unless the store has that content already.
    /// The caller then points the catalogue at `hash`, and removes the
    /// unhashed name with [`Store::remove_unhashed`]. It holds
    /// [`Store::gc_lock`] shared until that commit, as a checkpoint does.
    pub fn name_unhashed(&self, id: &ObjectId, hash: &ObjectId) -> io::Result<()> {
        self.note_use(hash);
        if hash == id || self.contains(hash) {
            return Ok(());
        }
        match sys::linkat(self.objects.as_fd(), &Self::name(id), self.objects.as_fd(), &Self::name(hash)) {
            // Made meanwhile by a checkpoint that stored the same content.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }

    /// Removes the unhashed names that [`Store::name_unhashed`] gave
    /// their hash, once the catalogue refers to the hash instead. Needs no
    /// [`Store::gc_lock`]: no checkpoint finds an unhashed object by its
    /// content, and no new version can take one once the catalogue has
    /// none. A name already gone is not an error.
    pub fn remove_unhashed(&self, ids: &[ObjectId]) -> io::Result<()> {
        let mut failed = None;
        for id in ids.iter().filter(|id| id.is_unhashed()) {
            match sys::unlinkat(self.objects.as_fd(), &Self::name(id), false) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => failed = failed.or(Some(e)),
                _ => {}
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// [`Store::put`] of a small file into `pack`; `None` when the file
    /// changed while it was read, unless this is the `last` try.
    fn put_packed(
        &self,
        src: BorrowedFd<'_>,
        before: libc::stat,
        how: (&Pack<'_>, bool, bool),
        last: bool,
    ) -> io::Result<Option<Put>> {
        thread_local! {
            // One buffer per thread: a scan of a whole tree on a store that
            // cannot clone packs every small file it meets.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.resize(before.st_size as usize, 0);
            let n = read_at_into(src, 0, buf)?;
            buf.truncate(n);
            self.put_read(src, before, how, last, buf)
        })
    }

    /// [`Store::put_packed`] of `bytes`, read from `src`.
    fn put_read(
        &self,
        src: BorrowedFd<'_>,
        before: libc::stat,
        (pack, reflink, new_path): (&Pack<'_>, bool, bool),
        last: bool,
        bytes: &[u8],
    ) -> io::Result<Option<Put>> {
        let hash = ObjectId(*blake3::hash(bytes).as_bytes());
        let mut stat = sys::fstat(src)?;
        // The bytes read belong to `before` when nothing moved in between;
        // when the file keeps changing, they are still one whole object
        // named by its own content, and the next scan reads the file again.
        let unstable = !same_version(&before, &stat);
        if unstable && !last {
            return Ok(None);
        }
        if unstable {
            stat.st_size = bytes.len() as i64;
        } else {
            stat = before;
        }
        // Looked for only at a path with no recorded version, where a
        // directory moved puts content the store holds: among loose objects
        // where the store clones (a whole tree's files are cloned), and in
        // the pack index too where it does not (they are packed). A file
        // whose recorded version changed most likely holds new content, and
        // a lookup per file (about 13 us among loose objects at a million
        // files, on ext4 and on XFS) was 1.3-2 ms of a rollback's safety
        // checkpoint. Content equal to an object stored already is then
        // packed again: at most 64 KiB a file, freed with its versions.
        let stored = new_path
            && match reflink {
                true => self.has_loose(&hash),
                false => self.contains(&hash),
            };
        let made = !stored && !self.packed_already(&hash)?;
        if made {
            pack.add(hash, bytes)?;
        }
        Ok(Some(Put { hash, stat, reflinked: false, copied: made, unstable }))
    }

    /// [`Store::put`] of a file as an object of its own, cloned or copied;
    /// `None` when the file changed while it was read, unless this is the
    /// `last` try.
    fn put_loose(&self, src: BorrowedFd<'_>, before: libc::stat, reflink: bool, last: bool) -> io::Result<Option<Put>> {
        let size = before.st_size as u64;
        let hash = hash_fd(src, size)?;
        if self.has_loose(&hash) {
            let unchanged = same_version(&before, &sys::fstat(src)?);
            return Ok(unchanged.then_some(Put {
                hash,
                stat: before,
                reflinked: false,
                copied: false,
                unstable: false,
            }));
        }
        // Written beside its final name and renamed within the same
        // directory: a rename across directories takes the filesystem's
        // rename lock, which concurrent readers then queue on.
        let tmp_name = format!("{}/.tmp-{}", &hash.to_string()[..2], ulid::Ulid::new()).into_bytes();
        let tmp = Temp::create(self.objects.as_fd(), tmp_name, 0o400)?;
        let reflinked = clone_or_copy(tmp.fd.as_fd(), src, size, reflink)?;
        let after = sys::fstat(src)?;
        let (hash, mut stat, unstable) = if same_version(&before, &after) {
            (hash, before, false)
        } else if !last {
            return Ok(None);
        } else {
            // The source keeps changing: keep what was cloned, named by its
            // own content, and have the next scan read it again.
            let st = sys::fstat(tmp.fd.as_fd())?;
            (hash_fd(tmp.fd.as_fd(), st.st_size as u64)?, after, true)
        };
        if unstable {
            stat.st_size = sys::fstat(tmp.fd.as_fd())?.st_size;
        }
        // Another thread may have stored the same content meanwhile.
        tmp.persist(&Self::name(&hash), true)?;
        Ok(Some(Put { hash, stat, reflinked, copied: !reflinked, unstable }))
    }

    /// Makes every object written so far durable: one `syncfs` of the
    /// store's filesystem.
    pub fn sync(&self) -> io::Result<()> {
        sys::syncfs(self.objects.as_fd())
    }

    /// Returns whether this store's filesystem can make reflinks, by cloning
    /// a small file inside the store.
    pub fn probe_reflink(&self) -> bool {
        let result = (|| -> io::Result<()> {
            let name = || ulid::Ulid::new().to_string().into_bytes();
            let a = Temp::create(self.tmp.as_fd(), name(), 0o600)?;
            let b = Temp::create(self.tmp.as_fd(), name(), 0o600)?;
            sys::pwrite_all(a.fd.as_fd(), &[7u8; 4096], 0)?;
            sys::ficlone(b.fd.as_fd(), a.fd.as_fd())
        })();
        result.is_ok()
    }

    /// Returns the device of the store's filesystem.
    pub fn device(&self) -> io::Result<u64> {
        Ok(sys::fstat(self.objects.as_fd())?.st_dev)
    }

    /// Returns whether an object has the given size and its content still
    /// hashes to its name (for an unhashed object: the size alone). A
    /// missing object is a `NotFound` error.
    pub fn check_object(&self, id: &ObjectId, size: u64) -> io::Result<bool> {
        let object = self.open_object(id)?;
        if object.size()? != size {
            return Ok(false);
        }
        // An unhashed object's name says nothing of its content.
        Ok(id.is_unhashed() || object.hash(size)? == *id)
    }

    /// Lists the objects present in the store, loose and packed.
    pub fn list_objects(&self) -> io::Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let dir = sys::openat(self.objects.as_fd(), fanout(i).as_bytes(), sys::DIR_FLAGS, 0)?;
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

    /// Starts (or ends) noting the objects put, opened or linked, for a
    /// collection that goes through the store in slices while checkpoints
    /// and restores go on. The caller holds [`Store::gc_lock`] exclusively
    /// when it starts, so every checkpoint that stores or finds an object
    /// after that is seen; what the collection read from the catalogue
    /// after that and what is noted here is kept.
    pub fn track_uses(&self, on: bool) {
        *self.used.lock().unwrap_or_else(|p| p.into_inner()) = on.then(HashSet::new);
        self.tracking.store(on, Ordering::Relaxed);
    }

    /// The objects noted since [`Store::track_uses`] started.
    pub fn used_since_tracked(&self) -> HashSet<ObjectId> {
        self.used.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
    }

    fn note_use(&self, id: &ObjectId) {
        // Set under the exclusive `gc_lock` that every checkpoint's shared
        // hold comes after, so a checkpoint reads it as set.
        if self.tracking.load(Ordering::Relaxed)
            && let Some(used) = self.used.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
        {
            used.insert(*id);
        }
    }

    /// Makes `name` in `dir` a hardlink to an object.
    pub fn link_object(&self, id: &ObjectId, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
        self.note_use(id);
        sys::linkat(self.objects.as_fd(), &Self::name(id), dir, name)
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

/// The error for an object the store holds neither loose nor packed.
fn not_in_store(id: &ObjectId) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("object {id} is not in the store"))
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
        store.put(file.as_fd(), sys::fstat(file.as_fd()).unwrap(), true, (pack, false)).unwrap()
    }

    /// Writes `bodies` to files `f0`, `f1`, ... beside the store and puts
    /// them into `pack`, the first half from one thread and the second from
    /// another; returns their ids in order.
    fn put_by_two_threads(t: &tempfile::TempDir, store: &Store, pack: &Pack<'_>, bodies: &[Vec<u8>]) -> Vec<ObjectId> {
        let paths: Vec<PathBuf> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let path = t.path().join(format!("f{i}"));
                std::fs::write(&path, body).unwrap();
                path
            })
            .collect();
        std::thread::scope(|s| {
            let halves: Vec<_> = paths
                .chunks(paths.len().div_ceil(2))
                .map(|half| s.spawn(|| half.iter().map(|p| put_file(store, p, Some(pack)).hash).collect::<Vec<_>>()))
                .collect();
            halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
        })
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
        let pack = store.pack();
        let ids = put_by_two_threads(&t, &store, &pack, &(0..400).map(content).collect::<Vec<_>>());
        assert!(ids.iter().all(|id| !store.contains(id)), "visible before the seal");
        pack.seal().unwrap();
        let file = store.path().join("packs").join(pack.name());
        let trailer = 400 * TRAILER_ENTRY + TRAILER_FOOTER;
        assert_eq!(std::fs::metadata(&file).unwrap().len(), (400 * 8192 + trailer) as u64);
        for (i, id) in ids.iter().enumerate() {
            assert!(store.open_object(id).unwrap().read().unwrap() == content(i), "object {i} does not read back");
        }
    }

    #[test]
    fn small_content_is_looked_for_only_at_a_path_with_no_version() {
        let (t, store) = temp_store();
        std::fs::write(t.path().join("a"), b"small content").unwrap();
        std::fs::write(t.path().join("b"), b"only loose").unwrap();
        let open = |name: &str| File::open(t.path().join(name)).unwrap();
        let (a, b) = (open("a"), open("b"));
        let (st_a, st_b) = (sys::fstat(a.as_fd()).unwrap(), sys::fstat(b.as_fd()).unwrap());
        let loose = store.put(a.as_fd(), st_a, false, (None, false)).unwrap();
        let only_loose = store.put(b.as_fd(), st_b, false, (None, false)).unwrap();
        assert!(store.has_loose(&loose.hash) && store.has_loose(&only_loose.hash));
        let pack = store.pack();
        for reflink in [true, false] {
            let moved = store.put(a.as_fd(), st_a, reflink, (Some(&pack), true)).unwrap();
            assert!(!moved.copied, "content at a path with no recorded version is looked for (reflink: {reflink})");
            let modified = store.put(a.as_fd(), st_a, reflink, (Some(&pack), false)).unwrap();
            assert!(modified.copied && modified.hash == loose.hash, "a modified file's is packed (reflink: {reflink})");
        }
        pack.seal().unwrap();
        let packed_first = store.open_likely_packed(&loose.hash).unwrap();
        assert!(matches!(packed_first, Object::Packed { .. }), "the index is asked first");
        assert_eq!(packed_first.read().unwrap(), b"small content");
        assert!(matches!(store.open_object(&loose.hash).unwrap(), Object::Loose(_)), "else the loose object");
        let falls_back = store.open_likely_packed(&only_loose.hash).unwrap();
        assert!(matches!(falls_back, Object::Loose(_)), "an object not packed is found loose");
        assert_eq!(falls_back.read().unwrap(), b"only loose");
        let missing = ObjectId(*blake3::hash(b"never stored").as_bytes());
        assert_eq!(store.open_likely_packed(&missing).err().map(|e| e.kind()), Some(io::ErrorKind::NotFound));
    }

    #[test]
    fn a_full_pack_file_is_sealed_as_the_capture_goes_on_into_another() {
        let (t, store) = temp_store();
        let body = |i: usize| -> Vec<u8> { format!("small file {i}").into_bytes() };
        let put = |pack: &Pack<'_>, i: usize| {
            let path = t.path().join(format!("f{i}"));
            std::fs::write(&path, body(i)).unwrap();
            put_file(&store, &path, Some(pack)).hash
        };
        let pack = store.pack_of(3);
        let ids: Vec<ObjectId> = (0..7).map(|i| put(&pack, i)).collect();
        assert_eq!(packs(&store).len(), 3, "two full files and the one being filled");
        assert!(ids[..6].iter().all(|id| store.contains(id)), "a full file's objects are found at once");
        assert!(!store.contains(&ids[6]), "the file being filled is not sealed");
        pack.seal().unwrap();
        drop(pack);
        store.record().unwrap();
        assert_eq!(recorded_rows(&store), 7);
        for (i, id) in ids.iter().enumerate() {
            assert!(store.open_object(id).unwrap().read().unwrap() == body(i), "object {i} does not read back");
        }
        // Collected one pack's rows at a time: the file with a live object
        // stays, the others go.
        let (n, _) = store.collect_garbage(&HashSet::from([ids[4]])).unwrap();
        assert_eq!((n, packs(&store).len(), recorded_rows(&store)), (6, 1, 1));
        assert!(store.open_object(&ids[4]).unwrap().read().unwrap() == body(4));

        // A capture that fails after a file filled leaves only that sealed
        // file, whose objects nothing references: collected as any such.
        let pack = store.pack_of(2);
        let more: Vec<ObjectId> = (10..13).map(|i| put(&pack, i)).collect();
        drop(pack);
        assert_eq!(packs(&store).len(), 2, "the unsealed file is removed, the sealed one stays");
        assert!(store.contains(&more[0]) && !store.contains(&more[2]));
        let (n, _) = store.collect_garbage(&HashSet::from([ids[4]])).unwrap();
        assert_eq!((n, packs(&store).len()), (2, 1));
    }

    #[test]
    fn a_full_pack_file_one_of_whose_writes_failed_is_never_sealed() {
        let (t, store) = temp_store();
        // Slots of 8 KiB: the 32nd fills a buffer, written out of the lock.
        let put = |pack: &Pack<'_>, i: usize| {
            let path = t.path().join(format!("f{i}"));
            std::fs::write(&path, [&(i as u64).to_le_bytes()[..], &[7u8; 4992]].concat()).unwrap();
            let file = File::open(&path).unwrap();
            store.put(file.as_fd(), sys::fstat(file.as_fd()).unwrap(), false, (Some(pack), false))
        };
        let pack = store.pack_of(40);
        let mut ids: Vec<ObjectId> = (0..31).map(|i| put(&pack, i).unwrap().hash).collect();
        pack::tests::FAIL_BUFFER_WRITES.set(true);
        assert!(put(&pack, 31).is_err(), "the buffer's write was to fail");
        pack::tests::FAIL_BUFFER_WRITES.set(false);
        // Another capture thread goes on, and fills the file.
        ids.extend((32..39).map(|i| put(&pack, i).unwrap().hash));
        let full = put(&pack, 39).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(full.contains("a write into the pack"), "sealed anyway: {full:?}");
        assert!(ids.iter().all(|id| !store.contains(id)), "a slot names bytes never written");
        drop(pack);
        assert!(packs(&store).is_empty(), "the file was left behind");
    }

    #[test]
    fn a_pack_filled_by_two_threads_across_many_files_reads_back() {
        let (t, store) = temp_store();
        // 8 KiB slots: a buffer is written out every 32 of them, by the
        // thread that fills it, while the other may fill and seal the file.
        let content = |i: usize| -> Vec<u8> {
            let mut bytes: Vec<u8> = (0..5000).map(|k| (i * 31 + k) as u8).collect();
            bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
            bytes
        };
        let pack = store.pack_of(50);
        let ids = put_by_two_threads(&t, &store, &pack, &(0..600).map(content).collect::<Vec<_>>());
        pack.seal().unwrap();
        assert_eq!(packs(&store).len(), 12);
        for (i, id) in ids.iter().enumerate() {
            assert!(store.open_object(id).unwrap().read().unwrap() == content(i), "object {i} does not read back");
        }
        store.record().unwrap();
        for (i, id) in ids.iter().enumerate() {
            assert!(store.check_object(id, 5000).unwrap(), "object {i} does not hash to its name once recorded");
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
        (ids, store.path().join("packs").join(pack.name()))
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
    fn each_object_of_a_sealed_pack_is_found_at_its_first_slot_before_and_after_it_is_recorded() {
        let (t, store) = temp_store();
        // Many, so that a slot found by anything but its object shows; each
        // packed twice, so that which of two slots is found shows.
        let bodies: Vec<Vec<u8>> = (0..300u32).map(|i| format!("body {i} ").repeat(20).into_bytes()).collect();
        let pack = store.pack();
        let mut ids = Vec::new();
        for round in 0..2 {
            for (i, body) in bodies.iter().enumerate() {
                let path = t.path().join(format!("f{round}-{i}"));
                std::fs::write(&path, body).unwrap();
                ids.push(put_file(&store, &path, Some(&pack)).hash);
            }
        }
        assert_eq!(ids[..300], ids[300..]);
        pack.seal().unwrap();
        let name = pack.name();
        let check = |when: &str| {
            for (i, (id, body)) in ids.iter().zip(&bodies).enumerate() {
                let (found, offset, len) =
                    store.slot(id).unwrap().unwrap_or_else(|| panic!("object {i} not found {when}"));
                assert_eq!(
                    (found.as_str(), offset, len),
                    (name.as_str(), i as u64 * 4096, body.len() as u64),
                    "{when}"
                );
                assert!(store.open_object(id).unwrap().read().unwrap() == *body, "object {i} misread {when}");
            }
        };
        assert_eq!(recorded_rows(&store), 0, "the seal wrote the index");
        check("before it was recorded");
        store.record().unwrap();
        assert_eq!(recorded_rows(&store), 300);
        check("once recorded");
    }

    #[test]
    fn a_trailer_longer_than_a_buffer_is_written_in_pieces_and_read_back_whole() {
        let t = tempfile::tempdir().unwrap();
        let file = File::options().read(true).write(true).create_new(true).open(t.path().join("pack")).unwrap();
        // 20,000 slots: a trailer of 960,000 bytes, nearly four buffers.
        let n = 20_000u64;
        let slots: Vec<Slot> =
            (0..n).map(|i| (ObjectId(*blake3::hash(&i.to_le_bytes()).as_bytes()), i * 4096, 100 + i % 3000)).collect();
        let last_slot = vec![7u8; 4096];
        // A pack's buffer, holding its last slot.
        let mut buffer = Vec::with_capacity(PACK_BUFFER + SMALL_FILE as usize);
        buffer.extend_from_slice(&last_slot);
        let capacity = buffer.capacity();
        let emptied = write_with_trailer(file.as_fd(), buffer, (n - 1) * 4096, &slots).unwrap();
        assert!(emptied.is_empty() && emptied.capacity() == capacity, "the buffer grew to hold the trailer");
        let (listed, trailer_at) = read_trailer(file.as_fd()).unwrap().expect("a whole trailer");
        assert_eq!(trailer_at, n * 4096);
        assert!(listed == slots, "the trailer read back lists other slots");
        assert_eq!(read_at(file.as_fd(), (n - 1) * 4096, 4096).unwrap(), last_slot, "the buffer's bytes were not kept");
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
        assert_eq!(pack, first.name(), "the first copy is the one found");
        store.record().unwrap();
        assert_eq!(store.slot(&b.hash).unwrap().unwrap().0, first.name(), "and the one recorded");
        let file = store.path().join("packs").join(second.name());
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

    /// Slots freed together are punched as runs of adjoining slots: the
    /// slots between and after them, still live, keep their content.
    #[test]
    fn adjoining_dead_slots_are_freed_as_one_run_and_no_live_slot_with_them() {
        let (t, store) = temp_store();
        let (ids, file) = sealed_pack(&t, &store, 6);
        let before = allocated(&file);
        let dead = [ids[4], ids[0], ids[1], ids[3]];
        assert_eq!(store.remove_objects(&dead).unwrap(), 40_000);
        assert!(allocated(&file) <= before - 4 * 12288, "the dead slots' blocks were not all freed");
        for (i, id) in ids.iter().enumerate() {
            match dead.contains(id) {
                true => assert!(!store.contains(id), "object {i} is still indexed"),
                false => {
                    let content = store.open_object(id).unwrap().read().unwrap();
                    assert!(content == vec![i as u8 + 1; 10_000], "live object {i} lost its content");
                }
            }
        }
        assert_eq!(gc::runs(vec![(0, 10), (4096, 5000), (12288, 1), (20480, 7)]), [(0, 12288 + 1), (20480, 7)]);
        assert_eq!(gc::runs(vec![(8192, 3), (0, 4096)]), [(0, 4096), (8192, 3)], "a live slot lies between");
    }

    /// An empty file's slot takes no bytes: freeing it, alone or beside
    /// live slots, punches nothing (a hole of no length is an error).
    #[test]
    fn an_empty_packed_object_is_freed_with_nothing_to_punch() {
        let (t, store) = temp_store();
        let (ids, _file) = sealed_unrecorded(&t, &store, &[Vec::new(), vec![7; 100]]);
        store.record().unwrap();
        assert_eq!(store.remove_objects(&ids[..1]).unwrap(), 0);
        assert!(!store.contains(&ids[0]));
        assert_eq!(store.open_object(&ids[1]).unwrap().read().unwrap(), vec![7; 100]);
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
        assert_eq!(packs(&store), vec![store.path().join("packs").join(pack.name())], "the unsealed pack was removed");
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
