//! The trailer at a sealed pack's end: the slots it holds, so that a
//! pack sealed but not yet indexed is found again at the next open.

use super::*;

/// Ends a pack's trailer, which lists its slots for [`recover_sealed`]: for
/// each slot, the object's id (32 bytes), offset and length (8 bytes each,
/// little-endian); then the number of slots (8 bytes), the blake3 hash of
/// the list (32 bytes) and these 8 bytes.
pub(super) const TRAILER_MAGIC: &[u8; 8] = b"sbpack1\n";
pub(super) const TRAILER_ENTRY: usize = 48;
pub(super) const TRAILER_FOOTER: usize = 48;

/// Writes at `at` the bytes in `buffer`, then the trailer listing `slots`:
/// through `buffer`, written out whenever it holds [`PACK_BUFFER`] bytes,
/// so that a full pack's trailer (3 MiB) is never whole in memory (built
/// whole, it and the buffer grown to hold it were left free at the top of
/// the sealing thread's heap). A pack's last buffer and a trailer of a few
/// hundred slots go in one write. Returns the buffer, emptied.
pub(super) fn write_with_trailer(
    fd: BorrowedFd<'_>,
    mut buffer: Vec<u8>,
    mut at: u64,
    slots: &[Slot],
) -> io::Result<Vec<u8>> {
    let mut hash = blake3::Hasher::new();
    // Where the entries start in the buffer: after the pack's last bytes.
    let mut entries_at = buffer.len();
    for (id, offset, len) in slots {
        buffer.extend_from_slice(&id.0);
        buffer.extend_from_slice(&offset.to_le_bytes());
        buffer.extend_from_slice(&len.to_le_bytes());
        if buffer.len() >= PACK_BUFFER {
            hash.update(&buffer[entries_at..]);
            sys::pwrite_all(fd, &buffer, at)?;
            at += buffer.len() as u64;
            buffer.clear();
            entries_at = 0;
        }
    }
    hash.update(&buffer[entries_at..]);
    buffer.extend_from_slice(&(slots.len() as u64).to_le_bytes());
    buffer.extend_from_slice(hash.finalize().as_bytes());
    buffer.extend_from_slice(TRAILER_MAGIC);
    sys::pwrite_all(fd, &buffer, at)?;
    buffer.clear();
    Ok(buffer)
}

/// The slots listed by the trailer of the pack open at `fd`, and where the
/// trailer starts; `None` when it does not end with a whole trailer (it
/// was never sealed, or was recorded since).
pub(super) fn read_trailer(fd: BorrowedFd<'_>) -> io::Result<Option<(Vec<Slot>, u64)>> {
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
