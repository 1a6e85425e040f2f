//! fanotify with directory handles and names (`FAN_REPORT_DFID_NAME`,
//! Linux 5.9): one mark covers a whole filesystem, so a tree of any number
//! of directories is watched without a watch per directory. Only root may
//! use it (`CAP_SYS_ADMIN` for the mark, `CAP_DAC_READ_SEARCH` to open a
//! directory by its handle).
//!
//! Each event names a directory by its file handle, and the entry in it
//! that changed. [`Paths`] turns a handle into the directory's path
//! (`open_by_handle_at`, then the path the kernel gives the descriptor in
//! `/proc/self/fd`), and remembers it until a directory is moved or
//! removed anywhere on the filesystem. A handle it cannot turn into a path
//! is said as such: the caller must then compare everything.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The changes asked for: every change to an entry or its content or
/// metadata, on files and directories alike. A close after writing counts
/// (a write through a shared mapping raises no modify event); opens and
/// reads are not asked for.
const CHANGES: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_ONDIR;

/// A directory moved or removed: the paths remembered for directories may
/// be wrong from here on.
const RENAMES_DIRS: u64 =
    libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO | libc::FAN_RENAME | libc::FAN_DELETE | libc::FAN_MOVE_SELF;

/// At most this many directory paths are remembered.
const REMEMBERED: usize = 1 << 16;

/// A fanotify group reporting directory handles and names.
pub struct Group {
    fd: OwnedFd,
    /// What [`Group::read`] reads into, made once.
    buf: Vec<u8>,
}

/// A file handle, with the filesystem it belongs to: `fsid`, then the
/// handle's type and bytes.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Handle(Vec<u8>);

/// One event: what happened (`FAN_*` bits), to the entry `name` of the
/// directory `dir` (`name` is empty for an event on the directory itself).
#[derive(Debug)]
pub struct Event {
    pub mask: u64,
    pub dir: Handle,
    pub name: Vec<u8>,
    /// For a rename (`FAN_RENAME`), the directory and name moved to; `dir`
    /// and `name` are then the ones moved from.
    pub to: Option<(Handle, Vec<u8>)>,
    /// For a change to a file's content or metadata, the file's own handle
    /// (`FAN_REPORT_FID`): which file it was, whatever its names.
    pub file: Option<Handle>,
}

/// What [`Group::read`] found.
pub enum Read {
    Events(Vec<Event>),
    /// The kernel's queue overflowed: events were lost.
    Overflow(Vec<Event>),
    /// Nothing within the timeout.
    Nothing,
}

impl Group {
    /// Makes a group. Fails without `CAP_SYS_ADMIN`, or before Linux 5.9.
    pub fn new() -> io::Result<Group> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME
            | libc::FAN_REPORT_FID;
        // SAFETY: fanotify_init takes flags only.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned, owned by nothing else.
        Ok(Group { fd: unsafe { OwnedFd::from_raw_fd(fd) }, buf: vec![0; 64 * 1024] })
    }

    /// Reports every change on the filesystem that `dir` is on, and each
    /// rename as one event with both names (`FAN_RENAME`) where the kernel
    /// has it (Linux 5.17; then `true`); before, a rename is its two halves
    /// only.
    pub fn mark_filesystem(&self, dir: BorrowedFd<'_>) -> io::Result<bool> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM;
        match self.mark(flags, CHANGES | libc::FAN_RENAME, dir) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.mark(flags, CHANGES, dir).map(|()| false),
            Err(e) => Err(e),
        }
    }

    /// Reports nothing that happens in the directory `dir`, to it, or to
    /// its entries (Linux 6.0: `FAN_MARK_IGNORE`; before, an error). For
    /// the daemon's own directories (its state, its stores), which no
    /// sandbox overlaps: with the filesystem marked, every write the daemon
    /// makes there (each page of the catalogue's log, each object) would be
    /// an event, made by the writing thread and read by the watcher's.
    pub fn ignore_directory(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORE_SURV;
        self.mark(flags, CHANGES | libc::FAN_RENAME | libc::FAN_EVENT_ON_CHILD, dir)
    }

    /// Reports the entries created in the directory `dir`.
    pub fn mark_directory(&self, dir: BorrowedFd<'_>) -> io::Result<()> {
        self.mark(libc::FAN_MARK_ADD | libc::FAN_MARK_ONLYDIR, libc::FAN_CREATE, dir)
    }

    fn mark(&self, flags: libc::c_uint, mask: u64, dir: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: valid descriptors; a null path marks `dir` itself.
        let r = unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), flags, mask, dir.as_raw_fd(), std::ptr::null()) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Waits up to `timeout` for events, and returns those queued.
    pub fn read(&mut self, timeout: Duration) -> io::Result<Read> {
        let mut poll = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Read::Nothing) } else { Err(e) };
        }
        if ready == 0 {
            return Ok(Read::Nothing);
        }
        // SAFETY: reading into a buffer of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(Read::Nothing),
                _ => Err(e),
            };
        }
        let (events, overflow) = parse(&self.buf[..n as usize]);
        Ok(if overflow { Read::Overflow(events) } else { Read::Events(events) })
    }
}

/// Reads the events of a buffer the kernel filled; returns them, and
/// whether the queue overflowed.
fn parse(mut buf: &[u8]) -> (Vec<Event>, bool) {
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]) as usize;
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let mut events = Vec::new();
    let mut overflow = false;
    // struct fanotify_event_metadata: event_len u32, vers u8, reserved u8,
    // metadata_len u16, mask u64, fd i32, pid i32.
    while buf.len() >= 24 {
        let len = u32_at(buf, 0);
        if len < 24 || len > buf.len() {
            break;
        }
        let (event, rest) = buf.split_at(len);
        buf = rest;
        let mask = u64::from_ne_bytes(event[8..16].try_into().unwrap());
        let fd = i32::from_ne_bytes(event[16..20].try_into().unwrap());
        if fd >= 0 {
            // Not asked for with handles, but never left open.
            // SAFETY: the kernel gave this descriptor to us.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            overflow = true;
            continue;
        }
        // The information records: header (type u8, pad u8, len u16),
        // fsid (8 bytes), struct file_handle (handle_bytes u32, handle_type
        // i32, the bytes), then for a name record the name, NUL-ended. The
        // kernel gives the directory's (or a rename's two) first, then the
        // file's own.
        let mut info = &event[u16_at(event, 6).min(len)..];
        let (mut named, mut from, mut to, mut file) = (None, None, None, None);
        while info.len() >= 4 {
            let (kind, info_len) = (info[0], u16_at(info, 2));
            if info_len < 4 || info_len > info.len() {
                break;
            }
            let record = &info[..info_len];
            info = &info[info_len..];
            if record.len() < 20 {
                continue;
            }
            let bytes = u32_at(record, 12);
            let Some(handle_end) = 20usize.checked_add(bytes).filter(|&e| e <= record.len()) else { continue };
            let handle = Handle(record[4..handle_end].to_vec());
            let name = &record[handle_end..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let place = (handle, if name == b"." { Vec::new() } else { name.to_vec() });
            match kind {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME => named = Some(place),
                libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME => from = Some(place),
                libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => to = Some(place),
                libc::FAN_EVENT_INFO_TYPE_FID => file = Some(place.0),
                _ => {}
            }
        }
        // An event with no directory (a link count's change, say) names
        // no path: it is not one the watch can use.
        if let Some((dir, name)) = named {
            events.push(Event { mask, dir, name, to: None, file: file.clone() });
        }
        if let (Some((dir, name)), Some(to)) = (from, to) {
            events.push(Event { mask, dir, name, to: Some(to), file });
        }
    }
    (events, overflow)
}

/// The handle of the directory `dir`, as events name it.
pub fn handle_of(dir: BorrowedFd<'_>) -> io::Result<Handle> {
    let fsid = fsid(dir)?;
    let mut buf = vec![0u32; (8 + 128) / 4];
    buf[0] = 128; // handle_bytes: room for MAX_HANDLE_SZ
    let mut mount_id = 0;
    // SAFETY: a file_handle with room for 128 bytes; AT_EMPTY_PATH with an
    // empty path names `dir` itself.
    let r = unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let len = 8 + buf[0] as usize;
    let mut handle = fsid.to_vec();
    handle.extend_from_slice(&bytes[..len]);
    Ok(Handle(handle))
}

/// The filesystem id that events carry (`statfs`'s `f_fsid`).
fn fsid(fd: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    // SAFETY: statfs fills the struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fsid_t is two ints, as the kernel's __kernel_fsid_t.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [u8; 8]>(st.f_fsid) })
}

/// Where a directory named by a handle is.
#[derive(Clone, Debug, PartialEq)]
pub enum Place {
    /// Below the root, at this relative path (empty: the root itself).
    Inside(Vec<u8>),
    /// Elsewhere on the filesystem.
    Outside,
    /// Removed since the event (its removal is an event of its parent's);
    /// where it was cannot be told.
    Removed,
}

/// Turns directory handles into paths below one root, remembering them.
pub struct Paths {
    /// The root, held open: handles are opened on its filesystem.
    root: OwnedFd,
    /// The root's path as the kernel reports it, with a trailing `/`.
    prefix: Vec<u8>,
    fsid: [u8; 8],
    known: HashMap<Handle, Place>,
}

impl Paths {
    pub fn new(root: OwnedFd) -> io::Result<Paths> {
        let mut prefix = fd_path(root.as_fd())?;
        prefix.push(b'/');
        Ok(Paths { fsid: fsid(root.as_fd())?, root, prefix, known: HashMap::new() })
    }

    /// Notes that an event happened: one that moved or removed a directory
    /// makes every remembered path suspect.
    pub fn saw(&mut self, event: &Event) {
        if event.mask & libc::FAN_ONDIR != 0 && event.mask & RENAMES_DIRS != 0 {
            self.known.clear();
        }
    }

    /// Where the directory `dir` is. An error: it may be inside, but its
    /// path cannot be had (longer than the kernel reports, say).
    pub fn place(&mut self, dir: &Handle) -> io::Result<Place> {
        if let Some(p) = self.known.get(dir) {
            return Ok(p.clone());
        }
        let place = self.find(dir)?;
        if self.known.len() >= REMEMBERED {
            self.known.clear();
        }
        self.known.insert(dir.clone(), place.clone());
        Ok(place)
    }

    fn find(&self, dir: &Handle) -> io::Result<Place> {
        if dir.0.len() < 16 || dir.0[..8] != self.fsid {
            return Ok(Place::Outside);
        }
        let Some(fd) = open_by_handle(self.root.as_fd(), dir)? else { return Ok(Place::Removed) };
        // Removed, but held open somewhere: the kernel would give its old
        // path with " (deleted)" after it.
        if crate::sys::fstat(fd.as_fd())?.st_nlink == 0 {
            return Ok(Place::Removed);
        }
        let path = fd_path(fd.as_fd())?;
        let mut with_slash = path.clone();
        with_slash.push(b'/');
        Ok(match with_slash.strip_prefix(self.prefix.as_slice()) {
            Some(rel) => Place::Inside(rel.strip_suffix(b"/").unwrap_or(rel).to_vec()),
            None => Place::Outside,
        })
    }
}

/// Opens what `handle` names (`O_PATH`: nothing is read) on the filesystem
/// `on` is on; `None` when it is gone (its inode freed). An error too when
/// the handle is of another filesystem.
pub fn open_handle(on: BorrowedFd<'_>, handle: &Handle) -> io::Result<Option<OwnedFd>> {
    if handle.0.len() < 16 || handle.0[..8] != fsid(on)? {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    open_by_handle(on, handle)
}

/// [`open_handle`], with the handle's filesystem checked by the caller.
fn open_by_handle(on: BorrowedFd<'_>, handle: &Handle) -> io::Result<Option<OwnedFd>> {
    let h = &handle.0;
    // The handle without its fsid, as a struct file_handle, aligned.
    let mut buf = vec![0u32; (h.len() - 8).div_ceil(4)];
    // SAFETY: copying the bytes into a buffer at least as long.
    unsafe { std::ptr::copy_nonoverlapping(h[8..].as_ptr(), buf.as_mut_ptr().cast::<u8>(), h.len() - 8) };
    // SAFETY: a file_handle as the kernel gave it; O_PATH opens nothing for
    // reading.
    let fd =
        unsafe { libc::open_by_handle_at(on.as_raw_fd(), buf.as_mut_ptr().cast(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESTALE) { Ok(None) } else { Err(e) };
    }
    // SAFETY: a descriptor just returned, owned by nothing else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The path the kernel gives an open descriptor.
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    Ok(std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.into_os_string().into_vec())
}
