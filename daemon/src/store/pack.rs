//! Packs: the small files of one checkpoint, written 256 KiB at a time
//! into one file, and made visible when sealed.

use super::*;

/// Packed objects start on multiples of this, so that the blocks of a dead
/// one can be freed by punching a hole over its slot.
pub(super) const SLOT_ALIGN: u64 = 4096;

pub(super) fn slot_len(len: u64) -> u64 {
    len.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// The small objects of one capture, written into one pack file, each in
/// its own slot. None of them is visible until [`Pack::seal`]; a pack
/// dropped unsealed removes its file.
pub struct Pack<'a> {
    pub(super) store: &'a Store,
    pub(super) name: String,
    pub(super) state: Mutex<PackState>,
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
pub(super) const PACK_BUFFER: usize = 1 << 18;

#[derive(Default)]
pub(super) struct PackState {
    pub(super) file: Option<Arc<OwnedFd>>,
    pub(super) end: u64,
    pub(super) slots: Vec<Slot>,
    /// The slots not written yet, padded to their length: the bytes from
    /// offset `end - buffer.len()` to `end`.
    pub(super) buffer: Vec<u8>,
    pub(super) sealed: bool,
}

impl Pack<'_> {
    /// Whether nothing was written into the pack (sealing it is a no-op).
    pub fn is_empty(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).file.is_none()
    }

    /// Adds `bytes`, whose hash is `id`, in a new slot.
    pub(super) fn add(&self, id: ObjectId, bytes: &[u8]) -> io::Result<()> {
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
