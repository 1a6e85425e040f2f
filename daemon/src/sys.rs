//! Thin, safe wrappers over the Linux calls the engine needs, all of them
//! relative to a directory fd and all of them taking names as bytes.
//!
//! Architecture invariant: no path under a sandbox root is opened by name
//! from the filesystem root. Everything under a sandbox goes through a
//! directory fd and [`open_beneath`], which refuses symlinks and `..`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use libc::c_int;

/// Converts a name to a C string; a NUL byte inside is an invalid input.
pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn check_fd(ret: c_int) -> io::Result<OwnedFd> {
    // SAFETY: a non-negative return of an fd-creating call is a new fd we own.
    check(ret).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Flags for opening a directory to work under.
pub const DIR_FLAGS: c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// Opens `name` (one component) in `dir`. `O_NOFOLLOW` and `O_CLOEXEC` are
/// always added.
pub fn openat(dir: BorrowedFd<'_>, name: &[u8], flags: c_int, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: c is a valid C string; the flags ask for a new fd.
    check_fd(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode) })
}

/// Checks that `rel` is a clean relative path: no leading `/`, no empty,
/// `.` or `..` component.
pub fn check_relative(rel: &[u8]) -> io::Result<()> {
    let bad = rel.first() == Some(&b'/') || rel.split(|&b| b == b'/').any(|c| c.is_empty() || c == b"." || c == b"..");
    if bad || rel.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a clean relative path"));
    }
    Ok(())
}

/// The longest path handed to one `openat2` by [`open_beneath`]: well
/// under `PATH_MAX`, so that any depth the filesystem holds can be opened.
const BENEATH_CHUNK: usize = 2048;

/// Opens the directory `rel` below `root` (`rel` empty: `root` itself) so
/// that no symlink is followed and nothing outside `root` can be reached:
/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS`, or, on kernels without `openat2`, one
/// `O_NOFOLLOW | O_DIRECTORY` open per component. A path longer than
/// [`BENEATH_CHUNK`] is opened a run of components at a time, each run
/// beneath the directory the last one opened: no call is handed more than
/// that, whatever the depth.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    if rel.is_empty() {
        return openat(root, b".", DIR_FLAGS, 0);
    }
    check_relative(rel)?;
    if rel.len() <= BENEATH_CHUNK {
        return open_beneath_once(root, rel);
    }
    let mut dir: Option<OwnedFd> = None;
    let mut rest = rel;
    while !rest.is_empty() {
        // The longest run of whole components that fits, or one component.
        let cut = if rest.len() <= BENEATH_CHUNK {
            rest.len()
        } else {
            match rest[..=BENEATH_CHUNK].iter().rposition(|&b| b == b'/') {
                Some(i) => i,
                None => rest.iter().position(|&b| b == b'/').unwrap_or(rest.len()),
            }
        };
        let from = dir.as_ref().map_or(root, |d| d.as_fd());
        dir = Some(open_beneath_once(from, &rest[..cut])?);
        rest = rest.get(cut + 1..).unwrap_or_default();
    }
    dir.ok_or_else(|| io::Error::other("an empty path"))
}

/// [`open_beneath`] for a clean relative path short enough for one call.
fn open_beneath_once(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let c = cstr(rel)?;
    // SAFETY: open_how is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = DIR_FLAGS as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `how` of the given size and the C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if ret >= 0 {
        // SAFETY: a non-negative return is a new fd we own.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as c_int) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let mut dir = openat(root, b".", DIR_FLAGS, 0)?;
    for component in rel.split(|&b| b == b'/') {
        dir = openat(dir.as_fd(), component, DIR_FLAGS, 0)?;
    }
    Ok(dir)
}

/// The components of an absolute path, which must be clean: it starts
/// with `/` and has no empty (`//`), `.` or `..` component and no NUL; a
/// trailing `/` is allowed. `/` itself has no component. Clean paths are
/// what the daemon stores and compares, so that a prefix test on bytes
/// means what it says.
pub fn clean_components(path: &[u8]) -> Option<Vec<&[u8]>> {
    let rest = path.strip_prefix(b"/")?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    if rest.is_empty() {
        return None; // `//`
    }
    let parts: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
    let bad = |c: &&[u8]| c.is_empty() || *c == b"." || *c == b".." || c.contains(&0);
    if parts.iter().any(bad) {
        return None;
    }
    Some(parts)
}

/// Why a directory could not be opened by [`open_dir_pinned`]: which
/// prefix of the path failed, and how.
#[derive(Debug)]
pub struct PinError {
    /// The prefix of the path at which the walk stopped.
    pub at: Vec<u8>,
    pub source: io::Error,
}

impl PinError {
    /// Whether the walk met a symlink (or a magic link) at `at`.
    pub fn is_symlink(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ELOOP)
    }

    pub fn is_not_found(&self) -> bool {
        self.source.kind() == io::ErrorKind::NotFound
    }
}

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = std::path::Path::new(std::ffi::OsStr::from_bytes(&self.at)).display();
        if self.is_symlink() {
            write!(f, "{at} is a symbolic link, which is never followed")
        } else if self.source.raw_os_error() == Some(libc::ENOTDIR) {
            write!(f, "{at} is not a directory")
        } else {
            write!(f, "{at}: {}", self.source)
        }
    }
}

/// Opens the directory at the absolute, clean `path` from `/`, one
/// component at a time with `O_NOFOLLOW | O_DIRECTORY`: a symlink (or
/// `/proc` magic link) anywhere on the way is refused, not followed, and no
/// call is handed more than one name, so any depth can be opened. The
/// permission checks are those of the calling thread's filesystem
/// credentials (see [`FsCreds`]).
pub fn open_dir_pinned(path: &[u8]) -> Result<OwnedFd, PinError> {
    walk_from_root(path, step)
}

/// Walks the absolute, clean `path` from `/`, one component at a time:
/// `next` opens each component in the directory the last one opened.
fn walk_from_root(
    path: &[u8],
    next: impl Fn(BorrowedFd<'_>, &[u8]) -> io::Result<OwnedFd>,
) -> Result<OwnedFd, PinError> {
    let fail = |at: &[u8], source| PinError { at: at.to_vec(), source };
    let Some(parts) = clean_components(path) else {
        return Err(fail(path, io::Error::new(io::ErrorKind::InvalidInput, "not a clean absolute path")));
    };
    let c = c"/";
    // SAFETY: open with a valid C string; the result is checked.
    let mut dir = check_fd(unsafe { libc::open(c.as_ptr(), DIR_FLAGS) }).map_err(|e| fail(b"/", e))?;
    let mut end = 0;
    for part in parts {
        end += 1 + part.len();
        dir = next(dir.as_fd(), part).map_err(|e| fail(&path[..end], e))?;
    }
    Ok(dir)
}

/// The supplementary groups of the process at the other end of a Unix
/// socket, as the kernel recorded them when it connected
/// (`SO_PEERGROUPS`).
pub fn peer_groups(socket: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = (groups.len() * 4) as libc::socklen_t;
        // SAFETY: getsockopt writes at most len bytes into groups and sets
        // len to the size it needs or wrote.
        let ret = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if ret == 0 {
            groups.truncate(len as usize / 4);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || len as usize <= groups.len() * 4 {
            return Err(err);
        }
        groups.resize(len as usize / 4, 0);
    }
}

/// Opens the directory `name` in `dir`, not following a symlink. With
/// `O_DIRECTORY`, the kernel answers a symlink with `ENOTDIR`; it is told
/// apart (as `ELOOP`) so that the error says what was met.
fn step(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    openat(dir, name, DIR_FLAGS, 0).map_err(|e| {
        let symlink = e.raw_os_error() == Some(libc::ENOTDIR)
            && lstatat(dir, name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
        if symlink { io::Error::from_raw_os_error(libc::ELOOP) } else { e }
    })
}

/// Opens the directory at the absolute, clean `path` like
/// [`open_dir_pinned`], creating each missing component (with `mode`) on
/// the way: still one name per call, and never through a symlink.
pub fn make_dir_pinned(path: &[u8], mode: u32) -> Result<OwnedFd, PinError> {
    walk_from_root(path, |dir, part| {
        match mkdirat(dir, part, mode) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        step(dir, part)
    })
}

/// The kind of filesystem `fd` is on, by `statfs`'s magic number: its
/// name, and whether it can clone files (reflinks).
pub fn filesystem(fd: BorrowedFd<'_>) -> io::Result<(&'static str, bool)> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a full statfs on success.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful call above.
    let magic = unsafe { st.assume_init() }.f_type as u64;
    Ok(match magic {
        0x5846_5342 => ("xfs", true),
        0x9123_683e => ("btrfs", true),
        0xca45_1a4e => ("bcachefs", true),
        0x2fc1_2fc1 => ("zfs", true),
        0x7461_636f => ("ocfs2", true),
        0xef53 => ("ext4", false),
        0x0102_1994 => ("tmpfs", false),
        0x794c_7630 => ("overlayfs", false),
        0xf2f5_2010 => ("f2fs", false),
        0x6969 => ("nfs", false),
        0x6573_5546 => ("fuse", false),
        _ => ("this filesystem", false),
    })
}

/// What a directory is, whatever it is called: its device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
}

impl Identity {
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<Identity> {
        let st = fstat(fd)?;
        Ok(Identity { dev: st.st_dev, ino: st.st_ino })
    }
}

/// A set of filesystem credentials: the uid and gids the kernel checks
/// permissions against when this thread opens, creates or removes files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsCreds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl FsCreds {
    /// The calling thread's filesystem credentials.
    pub fn current() -> io::Result<FsCreds> {
        // SAFETY: setfsuid(-1) and setfsgid(-1) change nothing and return
        // the current values; getgroups with a null buffer returns the count.
        let (uid, gid, n) = unsafe {
            (
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
                libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<libc::gid_t>()),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        // SAFETY: groups has room for n entries.
        let n = unsafe { libc::syscall(libc::SYS_getgroups, groups.len(), groups.as_mut_ptr()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        groups.truncate(n as usize);
        Ok(FsCreds { uid, gid, groups })
    }

    /// Makes these the calling thread's, and only this thread's,
    /// filesystem credentials: the raw system calls, not the C library's
    /// wrappers, which would change every thread of the process. Changing
    /// the filesystem uid away from 0 also clears the filesystem
    /// capabilities (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, ...) from the
    /// thread's effective set, and changing it back to 0 restores them.
    /// Needs `CAP_SETUID` and `CAP_SETGID` (root) unless nothing changes.
    pub fn assume(&self) -> io::Result<()> {
        // SAFETY: per-thread credential calls with plain integer arguments
        // and a buffer of groups.len() gids.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_setfsgid, self.gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
        }
        // setfsuid and setfsgid report failure only by leaving the value.
        let now = FsCreds::current()?;
        if now.uid != self.uid || now.gid != self.gid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("cannot act as uid {} gid {}", self.uid, self.gid),
            ));
        }
        Ok(())
    }
}

/// Splits `a/b/c` into (`a/b`, `c`); a name without `/` has parent ``.
pub fn split_parent(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

/// Returns `lstat` of `name` in `dir` (never follows a symlink).
pub fn lstatat(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstatat writes a full stat on success.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), st.as_mut_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
    // SAFETY: initialised by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// Returns `lstat` of the sandbox-relative `rel` beneath `root` (see
/// [`open_beneath`]: no symlink followed on the way, nothing outside).
pub fn lstat_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<libc::stat> {
    let (parent, name) = split_parent(rel);
    lstatat(open_beneath(root, parent)?.as_fd(), name)
}

/// Returns `fstat` of an open fd.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a full stat on success.
    check(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful call above.
    Ok(unsafe { st.assume_init() })
}

/// Asks for the whole of `fd`'s content to be read into the page cache
/// (`POSIX_FADV_WILLNEED`); starts the reads and returns.
pub fn fadvise_willneed(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its arguments; it returns the error
    // number instead of setting errno.
    match unsafe { libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Reads the target of the symlink `name` in `dir`.
pub fn readlinkat(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: buf is writable for buf.len() bytes.
        let n = unsafe { libc::readlinkat(dir.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(buf.len() * 2, 0);
    }
}

/// One directory entry: its name.
pub struct DirEntry {
    pub name: Vec<u8>,
}

/// Lists a directory through its fd, without `.` and `..`.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    // SAFETY: rewinding a directory fd we borrow; getdents continues from the offset.
    check(unsafe { libc::lseek(dir.as_raw_fd(), 0, libc::SEEK_SET) } as c_int)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        // SAFETY: getdents64 writes at most buf.len() bytes of records.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(out);
        }
        let mut off = 0usize;
        while off < n as usize {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name_area = &buf[off + 19..off + reclen];
            let len = name_area.iter().position(|&b| b == 0).unwrap_or(name_area.len());
            let name = &name_area[..len];
            if name != b"." && name != b".." {
                out.push(DirEntry { name: name.to_vec() });
            }
            off += reclen;
        }
    }
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: plain syscall on a valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// Makes `to` in `to_dir` a new name of `from` in `from_dir` (no symlink
/// followed).
pub fn linkat(from_dir: BorrowedFd<'_>, from: &[u8], to_dir: BorrowedFd<'_>, to: &[u8]) -> io::Result<()> {
    let f = cstr(from)?;
    let t = cstr(to)?;
    // SAFETY: plain syscall on valid C strings.
    check(unsafe { libc::linkat(from_dir.as_raw_fd(), f.as_ptr(), to_dir.as_raw_fd(), t.as_ptr(), 0) }).map(drop)
}

pub fn symlinkat(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let t = cstr(target)?;
    let c = cstr(name)?;
    // SAFETY: plain syscall on valid C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

pub fn mkfifoat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: plain syscall on a valid C string.
    check(unsafe { libc::mkfifoat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// Removes `name` from `dir`: a directory with `dir_too`, else a non-directory.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &[u8], is_dir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: plain syscall on a valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

/// Renames within or across directory fds; `noreplace` refuses to overwrite.
pub fn renameat(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
    noreplace: bool,
) -> io::Result<()> {
    let f = cstr(from)?;
    let t = cstr(to)?;
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: plain syscall on valid C strings.
    check(unsafe { libc::renameat2(from_dir.as_raw_fd(), f.as_ptr(), to_dir.as_raw_fd(), t.as_ptr(), flags) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// Sets the mode of `name` in `dir` (which must not be a symlink).
pub fn fchmodat(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: plain syscall on a valid C string.
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), mode, 0) }).map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

/// Changes the owner of `name` in `dir` without following a symlink.
pub fn lchownat(dir: BorrowedFd<'_>, name: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: plain syscall on a valid C string.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

fn timespec(ns: i64) -> libc::timespec {
    libc::timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) }
}

/// Sets the modification time of an open file, leaving its access time.
pub fn set_mtime(fd: BorrowedFd<'_>, mtime_ns: i64) -> io::Result<()> {
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, timespec(mtime_ns)];
    // SAFETY: times points to two timespecs.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// Clones `src` into `dst` (`FICLONE`): both share extents afterwards.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(drop)
}

/// Frees the blocks of `len` bytes at `off` (`FALLOC_FL_PUNCH_HOLE`), which
/// then read as zeros; the file keeps its size. A filesystem that cannot
/// punch holes answers `EOPNOTSUPP`.
pub fn punch_hole(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a borrowed fd.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

/// Whether an error from `FICLONE` means "this pair cannot be cloned" (as
/// opposed to a real I/O failure).
pub fn clone_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EPERM)
    )
}

/// Returns the data segments of a file as (offset, length), from
/// `SEEK_DATA`/`SEEK_HOLE`. A file system without hole reporting yields
/// one segment covering the whole file.
pub fn data_segments(fd: BorrowedFd<'_>, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut off: i64 = 0;
    let size = size as i64;
    while off < size {
        // SAFETY: lseek on a borrowed fd.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL | libc::EOPNOTSUPP) if off == 0 => Ok(vec![(0, size as u64)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = hole.min(size);
        if end > data {
            out.push((data as u64, (end - data) as u64));
        }
        off = hole;
    }
    Ok(out)
}

/// Reads up to `buf.len()` bytes at `off`.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off as i64) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is readable for its length.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

/// Copies `src` into the empty file `dst`, only the data segments, then sets
/// the length: holes stay holes.
pub fn copy_sparse(dst: BorrowedFd<'_>, src: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    for (start, len) in data_segments(src, size)? {
        let mut done = 0u64;
        let mut in_kernel = true;
        while done < len {
            let remaining = len - done;
            if in_kernel {
                let mut off_in = (start + done) as i64;
                let mut off_out = off_in;
                // SAFETY: the offsets are valid pointers; the kernel copies between fds.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        &mut off_in,
                        dst.as_raw_fd(),
                        &mut off_out,
                        remaining as usize,
                        0,
                    )
                };
                if n > 0 {
                    done += n as u64;
                    continue;
                }
                if n == 0 {
                    break; // the source shrank under us; the caller re-checks it
                }
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => in_kernel = false,
                    Some(libc::EINTR) => {}
                    _ => return Err(e),
                }
            } else {
                if buf.is_empty() {
                    buf = vec![0; 256 * 1024];
                }
                let want = remaining.min(buf.len() as u64) as usize;
                let n = pread(src, &mut buf[..want], start + done)?;
                if n == 0 {
                    break;
                }
                pwrite_all(dst, &buf[..n], start + done)?;
                done += n as u64;
            }
        }
    }
    ftruncate(dst, size)
}

/// Sets the size of the open file `fd`.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate on a borrowed fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// Returns the free bytes available to this process on the filesystem of `fd`.
pub fn free_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs writes a full statvfs on success.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: initialised above.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail * st.f_frsize)
}

/// Writes every dirty page and inode of the filesystem holding `fd` to
/// disk: one call instead of an fsync per file.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    check(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

/// Nanoseconds since the epoch of a stat's mtime.
pub fn mtime_ns(st: &libc::stat) -> i64 {
    st.st_mtime * 1_000_000_000 + st.st_mtime_nsec
}

/// Nanoseconds since the epoch of a stat's ctime.
pub fn ctime_ns(st: &libc::stat) -> i64 {
    st.st_ctime * 1_000_000_000 + st.st_ctime_nsec
}

/// Returns this process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn open_dir(p: &std::path::Path) -> OwnedFd {
        let fd = std::fs::File::open(p).unwrap();
        OwnedFd::from(fd)
    }

    #[test]
    fn only_clean_absolute_paths_have_components() {
        assert_eq!(clean_components(b"/"), Some(vec![]));
        assert_eq!(clean_components(b"/a/b/"), Some(vec![&b"a"[..], b"b"]));
        for bad in [&b""[..], b"a/b", b"//", b"/a//b", b"/a/./b", b"/a/../b", b"/a/\0"] {
            assert_eq!(clean_components(bad), None, "{:?}", bad.escape_ascii().to_string());
        }
    }

    #[test]
    fn a_pinned_walk_refuses_a_symlink_anywhere_and_reaches_any_depth() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().as_os_str().as_bytes().to_vec();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        symlink(t.path().join("a"), t.path().join("l")).unwrap();
        let id = |p: &str| Identity::of(open_dir_pinned(&[&base[..], p.as_bytes()].concat()).unwrap().as_fd()).unwrap();
        let b = std::fs::metadata(t.path().join("a/b")).unwrap();
        assert_eq!(id("/a/b"), Identity { dev: b.dev(), ino: b.ino() });
        for through in ["/l/b", "/l"] {
            let e = open_dir_pinned(&[&base[..], through.as_bytes()].concat()).unwrap_err();
            assert!(e.is_symlink(), "{through}: {e}");
            assert!(e.at.ends_with(b"/l"), "{through}: {e}");
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        let e = open_dir_pinned(&[&base[..], b"/a/missing"].concat()).unwrap_err();
        assert!(e.is_not_found());
        // Deeper than PATH_MAX: one name per call.
        let mut deep = [&base[..], b"/a"].concat();
        while deep.len() < 6000 {
            deep.extend_from_slice(b"/");
            deep.extend_from_slice(&[b'd'; 200]);
        }
        let made = make_dir_pinned(&deep, 0o700).unwrap();
        assert_eq!(Identity::of(made.as_fd()).unwrap(), Identity::of(open_dir_pinned(&deep).unwrap().as_fd()).unwrap());
    }

    #[test]
    fn open_beneath_reaches_below_path_max() {
        let t = tempfile::tempdir().unwrap();
        let root = open_dir(t.path());
        let name = [b'n'; 250];
        let mut rel = Vec::new();
        let mut dir = open_dir(t.path());
        for _ in 0..30 {
            mkdirat(dir.as_fd(), &name, 0o755).unwrap();
            dir = openat(dir.as_fd(), &name, DIR_FLAGS, 0).unwrap();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(&name);
        }
        assert!(rel.len() > 7000);
        let deep = open_beneath(root.as_fd(), &rel).unwrap();
        assert_eq!(Identity::of(deep.as_fd()).unwrap(), Identity::of(dir.as_fd()).unwrap());
        // A symlink deep down is still refused.
        let (parent, _) = split_parent(&rel);
        let up = open_beneath(root.as_fd(), parent).unwrap();
        symlinkat(b"/", up.as_fd(), b"link").unwrap();
        let through = [parent, b"/link"].concat();
        assert!(open_beneath(root.as_fd(), &through).is_err());
    }

    #[test]
    fn open_beneath_refuses_symlinks_and_dotdot() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        symlink("/", t.path().join("a/up")).unwrap();
        let root = open_dir(t.path());
        assert!(open_beneath(root.as_fd(), b"a/b").is_ok());
        assert!(open_beneath(root.as_fd(), b"a/up").is_err());
        assert!(open_beneath(root.as_fd(), b"a/up/etc").is_err());
        assert!(open_beneath(root.as_fd(), b"a/../a").is_err());
        assert!(open_beneath(root.as_fd(), b"/etc").is_err());
    }

    #[test]
    fn read_dir_lists_every_name_as_bytes() {
        let t = tempfile::tempdir().unwrap();
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9");
        std::fs::write(t.path().join(odd), b"x").unwrap();
        for i in 0..2000 {
            std::fs::write(t.path().join(format!("f{i:04}")), b"").unwrap();
        }
        let root = open_dir(t.path());
        let mut names: Vec<Vec<u8>> = read_dir(root.as_fd()).unwrap().into_iter().map(|e| e.name).collect();
        names.sort();
        assert_eq!(names.len(), 2001);
        assert_eq!(names[0], b"caf\xe9");
        assert_eq!(names[2000], b"f1999");
    }

    #[test]
    fn copy_sparse_keeps_holes_and_content() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().unwrap();
        let mut f = std::fs::File::create(t.path().join("src")).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        let src = std::fs::File::open(t.path().join("src")).unwrap();
        let dst = std::fs::File::options().create_new(true).write(true).read(true).open(t.path().join("dst")).unwrap();
        copy_sparse(dst.as_fd(), src.as_fd(), (64 << 20) + 4).unwrap();
        let a = std::fs::read(t.path().join("src")).unwrap();
        let b = std::fs::read(t.path().join("dst")).unwrap();
        assert_eq!(a, b);
        let blocks = fstat(dst.as_fd()).unwrap().st_blocks;
        assert!(blocks < 1024, "the copy allocated {blocks} blocks: holes were filled");
    }

    use std::os::unix::ffi::OsStrExt;
}
