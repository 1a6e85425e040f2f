//! Packs: the small files of one checkpoint, written 256 KiB at a time
//! into one file, and made visible when sealed.

use super::*;

/// Packed objects start on multiples of this, so that the blocks of a dead
/// one can be freed by punching a hole over its slot.
pub(super) const SLOT_ALIGN: u64 = 4096;

pub(super) fn slot_len(len: u64) -> u64 {
    len.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// The small objects of one capture, written into pack files, each object
/// in its own slot. None of them is visible until [`Pack::seal`], except
/// that a pack reaching [`PACK_SLOTS`] slots or [`PACK_BYTES`] bytes is
/// sealed there and a new file begun (see [`Pack::add`]). A pack dropped
/// unsealed removes the file it was filling.
pub struct Pack<'a> {
    pub(super) store: &'a Store,
    /// Slots in one file before it is sealed and another begun.
    pub(super) slots_per_file: usize,
    pub(super) state: Mutex<PackState>,
    /// Buffers written out, kept to fill again rather than one allocated
    /// for each of the thousands a scan of a whole tree fills where the
    /// store cannot clone.
    pub(super) spare: Mutex<Vec<Vec<u8>>>,
}

/// The most slots one pack file holds. A scan of a whole tree on a
/// filesystem that cannot clone packs every small file it meets (as does
/// a watched checkpoint of a tree changed as a whole): with no bound, its
/// slot list would grow with the tree until the answer. Sealed at this
/// size, each file's slots are recorded in the index while the scan goes
/// on, and a garbage collection reads one file's rows at a time.
pub(super) const PACK_SLOTS: usize = 1 << 16;

/// The most bytes of slots one pack file holds, for the same reason.
pub(super) const PACK_BYTES: u64 = 1 << 30;

/// Slots are gathered in memory and written [`PACK_BUFFER`] bytes at a time:
/// on btrfs every write reserves metadata space of its own, and 150 writes
/// of a few KiB each took 2.7 ms where one write of the same bytes took
/// 0.9 ms (on ext4, 1.0 ms either way). The thread whose slot fills the
/// buffer writes it while the other capture threads go on reading. With
/// 1 MiB, the 150 files (about 1 MiB) of a rollback's safety checkpoint
/// were all written at the seal, after the scan: the commit waited 3-4 ms
/// for that write on btrfs, and about 1 ms with 256 KiB. 128 KiB measured
/// the same as 256 KiB; 512 KiB, about 1 ms more.
pub(super) const PACK_BUFFER: usize = 1 << 18;

pub(super) struct PackState {
    /// The file being filled, once anything was added.
    pub(super) file: Option<Arc<PackFile>>,
    pub(super) end: u64,
    pub(super) slots: Vec<Slot>,
    /// The slots not written yet, padded to their length: the bytes from
    /// offset `end - buffer.len()` to `end`.
    pub(super) buffer: Vec<u8>,
    pub(super) sealed: bool,
}

impl PackState {
    pub(super) fn new() -> PackState {
        PackState { file: None, end: 0, slots: Vec::new(), buffer: Vec::new(), sealed: false }
    }
}

/// One file of a pack, under `packs/<name>`.
pub(super) struct PackFile {
    pub(super) name: Arc<str>,
    fd: OwnedFd,
    /// How many of its buffers are being written outside the pack's lock:
    /// a full file is sealed once none is (see [`Pack::add`]).
    writing: Mutex<usize>,
    written: std::sync::Condvar,
    /// Whether one of those writes failed (the disk full, say): such a
    /// file is never sealed, or its slots would name bytes never written.
    failed: AtomicBool,
}

impl PackFile {
    fn create(store: &Store) -> io::Result<PackFile> {
        let name: Arc<str> = ulid::Ulid::new().to_string().into();
        // Writable by its owner, unlike a loose object: dead slots are
        // freed through a writable descriptor.
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_RDWR;
        let fd = sys::openat(store.packs.as_fd(), name.as_bytes(), flags, 0o600)?;
        Ok(PackFile {
            name,
            fd,
            writing: Mutex::new(0),
            written: std::sync::Condvar::new(),
            failed: AtomicBool::new(false),
        })
    }

    /// Writes `bytes` at `at`, a buffer counted in `writing` when handed out.
    fn write_counted(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        let r = sys::pwrite_all(self.fd.as_fd(), bytes, at);
        #[cfg(test)]
        let r = match tests::FAIL_BUFFER_WRITES.get() {
            true => Err(io::Error::other("a buffer write failed, as the test asked")),
            false => r,
        };
        if r.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        let mut writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        *writing -= 1;
        if *writing == 0 {
            self.written.notify_all();
        }
        r
    }

    /// Waits until no buffer handed out is being written; an error if one
    /// of them failed.
    fn wait_written(&self) -> io::Result<()> {
        let mut writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        while *writing > 0 {
            writing = self.written.wait(writing).unwrap_or_else(|p| p.into_inner());
        }
        match self.failed.load(Ordering::Relaxed) {
            true => Err(io::Error::other(format!("a write into the pack {} failed", self.name))),
            false => Ok(()),
        }
    }
}

impl Pack<'_> {
    /// Whether nothing was written into the pack (sealing it is a no-op).
    pub fn is_empty(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).file.is_none()
    }

    /// The name under `packs/` of the file being filled.
    #[cfg(test)]
    pub(super) fn name(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.file.as_ref().map(|f| f.name.to_string()).unwrap_or_default()
    }

    /// Adds `bytes`, whose hash is `id`, in a new slot.
    pub(super) fn add(&self, id: ObjectId, bytes: &[u8]) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let file = match &st.file {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(PackFile::create(self.store)?);
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
        if st.slots.len() >= self.slots_per_file || st.end >= PACK_BYTES {
            // Full: the other threads go on into a new file while this one
            // seals it, once the buffers handed out before are written (a
            // sealed slot can be read), and the store's thread records it.
            let full = std::mem::replace(&mut *st, PackState::new());
            st.buffer = self.buffer();
            drop(st);
            let sealed = file.wait_written().and_then(|()| self.seal_file(&file, full.end, full.slots, full.buffer));
            if let Err(e) = sealed {
                let _ = self.store.remove_pack(file.name.as_bytes());
                return Err(e);
            }
            self.store.index_log.kick();
            return Ok(());
        }
        if st.buffer.len() < PACK_BUFFER {
            return Ok(());
        }
        let at = st.end - st.buffer.len() as u64;
        let mut full = std::mem::replace(&mut st.buffer, self.buffer());
        *file.writing.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        drop(st);
        // Written outside the lock: another thread fills the next buffer.
        let written = file.write_counted(&full, at);
        full.clear();
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).push(full);
        written
    }

    /// An empty buffer to fill, a spare one if there is one.
    fn buffer(&self) -> Vec<u8> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).pop();
        spare.unwrap_or_else(|| Vec::with_capacity(PACK_BUFFER + SMALL_FILE as usize))
    }

    /// Makes the pack's objects visible, once every [`Store::put`] into it
    /// has returned: writes the slots still buffered and the trailer that
    /// lists them all (one write unless they are many), and hands them to
    /// the store to find and record (see [`record_sealed`]). Writing the
    /// index here instead, a transaction of its own beside the
    /// catalogue's, took 3-4 ms of a rollback's 20-25 on btrfs.
    pub fn seal(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(file) = st.file.clone().filter(|_| !st.sealed) else { return Ok(()) };
        file.wait_written()?;
        let (slots, rest) = (std::mem::take(&mut st.slots), std::mem::take(&mut st.buffer));
        self.seal_file(&file, st.end, slots, rest)?;
        st.sealed = true;
        Ok(())
    }

    /// Writes the last `rest` bytes of `file`'s slots, which end at `end`,
    /// and the trailer listing `slots`, and hands them to the store.
    fn seal_file(&self, file: &PackFile, end: u64, slots: Vec<Slot>, rest: Vec<u8>) -> io::Result<()> {
        let at = end - rest.len() as u64;
        let emptied = write_with_trailer(file.fd.as_fd(), rest, at, &slots)?;
        self.spare.lock().unwrap_or_else(|p| p.into_inner()).push(emptied);
        let sealed = Sealed::new(file.name.clone(), slots, end);
        self.store.index.lock().unwrap_or_else(|p| p.into_inner()).sealed.push(sealed);
        self.store.index_written.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Pack<'_> {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = st.file.as_ref().filter(|_| !st.sealed) {
            let _ = sys::unlinkat(self.store.packs.as_fd(), file.name.as_bytes(), false);
        }
    }
}

/// Frees a slot's blocks. Where holes cannot be punched, the space stays
/// taken until the whole pack is removed.
pub(super) fn punch(pack: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        // An empty file's slot: no blocks, and a hole of no length is EINVAL.
        return Ok(());
    }
    match sys::punch_hole(pack, offset, slot_len(len)) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
pub(super) mod tests {
    std::thread_local! {
        /// Makes this thread's writes of full buffers fail, as a full disk
        /// would.
        pub(in crate::store) static FAIL_BUFFER_WRITES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
}
