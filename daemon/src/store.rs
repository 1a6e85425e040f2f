//! The object store: one immutable file per distinct content, named by its
//! blake3 hash, shared by every checkpoint and path that holds that content.
//!
//! Objects are made with a reflink (`FICLONE`) where the filesystem allows
//! it, else with a sparse-aware copy. An object is written under a
//! temporary name (`.tmp-*`) in its final directory and renamed only when
//! complete, so an object's name always holds whole content. Objects that
//! no catalogue row references (left by a checkpoint that never committed,
//! or freed by a purge) and leftover temporaries are collected by
//! [`Store::collect_garbage`].

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::manifest::ObjectId;
use crate::sys;

/// An object store directory.
pub struct Store {
    path: PathBuf,
    objects: OwnedFd,
    tmp: OwnedFd,
    /// Held shared from a checkpoint's first object until its commit, and
    /// exclusively by garbage collection, so that an object a checkpoint
    /// found (and will reference) is never collected before the commit.
    pub gc_lock: std::sync::RwLock<()>,
}

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

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Files up to this size may be stored by writing the bytes read to hash
/// them instead of cloning (see [`Store::put`]). Cloning a file whose pages
/// are still dirty makes the filesystem write them out first, which costs
/// several times the copy; a copy of a small file takes a block or a few.
pub const SMALL_FILE: u64 = 64 * 1024;

/// Reads a file of `size` bytes whole (less if it shrank meanwhile).
fn read_whole(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let mut done = 0;
    while done < buf.len() {
        let n = sys::pread(fd, &mut buf[done..], done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
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
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let feed_zeros = |hasher: &mut blake3::Hasher, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            hasher.update(&ZEROS[..k]);
            n -= k as u64;
        }
    };
    // Holes are looked for only in files larger than one read: a small one
    // is read whole (its holes read as the zeros they hash as).
    let segments = if size <= buf.len() as u64 { vec![(0, size)] } else { sys::data_segments(fd, size)? };
    for (start, len) in segments {
        feed_zeros(&mut hasher, start - pos);
        let mut off = start;
        let end = start + len;
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = sys::pread(fd, &mut buf[..want], off)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        pos = off;
    }
    if pos < size {
        feed_zeros(&mut hasher, size - pos);
    }
    Ok(ObjectId(*hasher.finalize().as_bytes()))
}

fn same_version(a: &libc::stat, b: &libc::stat) -> bool {
    a.st_ino == b.st_ino
        && a.st_size == b.st_size
        && sys::mtime_ns(a) == sys::mtime_ns(b)
        && sys::ctime_ns(a) == sys::ctime_ns(b)
}

impl Store {
    /// Opens the store at `path`, creating it (mode 0700) if needed.
    pub fn open(path: &Path) -> io::Result<Store> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(path.join("objects"))?;
        builder.create(path.join("tmp"))?;
        let objects = OwnedFd::from(File::open(path.join("objects"))?);
        for i in 0..=255u8 {
            match sys::mkdirat(objects.as_fd(), format!("{i:02x}").as_bytes(), 0o700) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let tmp = OwnedFd::from(File::open(path.join("tmp"))?);
        Ok(Store { path: path.to_owned(), objects, tmp, gc_lock: std::sync::RwLock::new(()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn name(id: &ObjectId) -> Vec<u8> {
        let hex = id.to_string();
        format!("{}/{hex}", &hex[..2]).into_bytes()
    }

    /// Whether the object exists.
    pub fn contains(&self, id: &ObjectId) -> bool {
        sys::lstatat(self.objects.as_fd(), &Self::name(id)).is_ok()
    }

    /// Opens an object for reading.
    pub fn open_object(&self, id: &ObjectId) -> io::Result<OwnedFd> {
        sys::openat(self.objects.as_fd(), &Self::name(id), libc::O_RDONLY, 0)
    }

    /// Stores the content of the open regular file `src`. Returns the
    /// object's hash and the stat its content corresponds to. Clones with
    /// `FICLONE` when `reflink` is set and the pair allows it, except that
    /// with `copy_small` a file of at most [`SMALL_FILE`] bytes is written
    /// from the bytes read to hash it.
    pub fn put(&self, src: BorrowedFd<'_>, reflink: bool, copy_small: bool) -> io::Result<Put> {
        const TRIES: usize = 3;
        for attempt in 1..=TRIES {
            let before = sys::fstat(src)?;
            let size = before.st_size as u64;
            let bytes = if copy_small && size <= SMALL_FILE { Some(read_whole(src, size)?) } else { None };
            let hash = match &bytes {
                Some(b) => ObjectId(*blake3::hash(b).as_bytes()),
                None => hash_fd(src, size)?,
            };
            if self.contains(&hash) {
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
            let result = match &bytes {
                Some(b) => sys::pwrite_all(tmp.as_fd(), b, 0).map(|()| false),
                None => clone_or_copy(tmp.as_fd(), src, size, reflink),
            };
            let reflinked = match result {
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
    pub fn remove_objects(&self, ids: &[ObjectId]) -> io::Result<u64> {
        let mut bytes = 0;
        for id in ids {
            let name = Self::name(id);
            match sys::lstatat(self.objects.as_fd(), &name) {
                Ok(st) => {
                    sys::unlinkat(self.objects.as_fd(), &name, false)?;
                    bytes += st.st_size as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(bytes)
    }

    /// Returns whether an object has the given size and its content still
    /// hashes to its name. A missing object is a `NotFound` error.
    pub fn check_object(&self, id: &ObjectId, size: u64) -> io::Result<bool> {
        let fd = self.open_object(id)?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_size as u64 != size {
            return Ok(false);
        }
        Ok(hash_fd(fd.as_fd(), size)? == *id)
    }

    /// Lists the objects present in the store.
    pub fn list_objects(&self) -> io::Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let dir = sys::openat(self.objects.as_fd(), format!("{i:02x}").as_bytes(), sys::DIR_FLAGS, 0)?;
            out.extend(sys::read_dir(dir.as_fd())?.iter().filter_map(|e| ObjectId::from_hex(&e.name)));
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
                    sys::unlinkat(dir.as_fd(), &entry.name, false)?;
                    count += 1;
                    bytes += size;
                }
            }
        }
        Ok((count, bytes))
    }
}

/// Fills the empty file `dst` with `src`: a reflink when `reflink` is set
/// and the pair allows it, else a sparse-aware copy. Returns whether it was
/// a reflink.
pub fn clone_or_copy(dst: BorrowedFd<'_>, src: BorrowedFd<'_>, size: u64, reflink: bool) -> io::Result<bool> {
    if reflink {
        match sys::ficlone(dst, src) {
            Ok(()) => return Ok(true),
            Err(e) if sys::clone_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
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

    #[test]
    fn equal_content_is_stored_once_and_reads_back() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        std::fs::write(t.path().join("a"), b"same bytes").unwrap();
        std::fs::write(t.path().join("b"), b"same bytes").unwrap();
        let a = File::open(t.path().join("a")).unwrap();
        let b = File::open(t.path().join("b")).unwrap();
        let pa = store.put(a.as_fd(), true, false).unwrap();
        let pb = store.put(b.as_fd(), true, false).unwrap();
        assert_eq!(pa.hash, pb.hash);
        assert!(pa.reflinked || pa.copied);
        assert!(!pb.reflinked && !pb.copied, "the second put made a new object");
        assert_eq!(pa.hash.0, *blake3::hash(b"same bytes").as_bytes());
        let obj = File::from(store.open_object(&pa.hash).unwrap());
        assert_eq!(std::io::read_to_string(obj).unwrap(), "same bytes");
    }

    #[test]
    fn small_files_are_copied_from_the_bytes_read_when_asked() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let small: Vec<u8> = (0..SMALL_FILE as usize).map(|i| (i * 7) as u8).collect();
        let large: Vec<u8> = (0..SMALL_FILE as usize + 1).map(|i| (i * 13) as u8).collect();
        std::fs::write(t.path().join("small"), &small).unwrap();
        std::fs::write(t.path().join("large"), &large).unwrap();
        let put = |name: &str| store.put(File::open(t.path().join(name)).unwrap().as_fd(), true, true).unwrap();
        let (s, l) = (put("small"), put("large"));
        assert!(s.copied && !s.reflinked, "a file of SMALL_FILE bytes is copied");
        assert!(s.hash.0 == *blake3::hash(&small).as_bytes() && !s.unstable);
        assert!(l.reflinked || l.copied, "a larger file is stored the usual way");
        assert_eq!(l.hash.0, *blake3::hash(&large).as_bytes());
        for (id, bytes) in [(s.hash, &small), (l.hash, &large)] {
            let mut obj = File::from(store.open_object(&id).unwrap());
            let mut back = Vec::new();
            std::io::Read::read_to_end(&mut obj, &mut back).unwrap();
            assert!(back == *bytes, "the object does not hold the file's bytes");
        }
    }

    #[test]
    fn hash_of_sparse_file_equals_hash_of_its_bytes() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().unwrap();
        let mut f = File::create(t.path().join("s")).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"x").unwrap();
        f.set_len(5 << 20).unwrap();
        let bytes = std::fs::read(t.path().join("s")).unwrap();
        let f = File::open(t.path().join("s")).unwrap();
        assert_eq!(hash_fd(f.as_fd(), 5 << 20).unwrap().0, *blake3::hash(&bytes).as_bytes());
    }

    #[test]
    fn garbage_collection_keeps_only_referenced_objects() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        std::fs::write(t.path().join("a"), b"keep").unwrap();
        std::fs::write(t.path().join("b"), b"drop").unwrap();
        let keep = store.put(File::open(t.path().join("a")).unwrap().as_fd(), false, false).unwrap().hash;
        let drop_ = store.put(File::open(t.path().join("b")).unwrap().as_fd(), false, false).unwrap().hash;
        let (n, bytes) = store.collect_garbage(&HashSet::from([keep])).unwrap();
        assert_eq!((n, bytes), (1, 4));
        assert!(store.contains(&keep));
        assert!(!store.contains(&drop_));
    }
}
