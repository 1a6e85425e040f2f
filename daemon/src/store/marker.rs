//! The marker file that says a directory is a snapback store, and which
//! catalogue it belongs to.

use super::*;

/// The file that marks a directory as a snapback store.
pub const MARKER: &[u8] = b"snapback-store";

pub(super) const MARKER_TEXT: &str = "a snapback object store: written by snapbackd only\n";

/// Writes the store marker, if it is not there yet, naming `catalogue` (the
/// id of the catalogue the store belongs to) when given; a marker from
/// before stores named their catalogue gets the name added.
pub(super) fn mark_as_store(dir: BorrowedFd<'_>, catalogue: Option<&str>) -> io::Result<()> {
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
    // One an earlier daemon left, killed half way.
    let _ = sys::unlinkat(dir, &tmp, false);
    let f = Temp::create(dir, tmp, 0o600)?;
    sys::pwrite_all(f.fd.as_fd(), text.as_bytes(), 0)?;
    sys::fsync(f.fd.as_fd())?;
    f.persist(MARKER, false).map(drop)
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
    if let Some(packs) = open(super::PACKS.as_bytes())?
        && !sys::read_dir(packs.as_fd())?.is_empty()
    {
        return Ok(true);
    }
    let Some(objects) = open(super::OBJECTS.as_bytes())? else { return Ok(false) };
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
