//! Thin, safe wrappers over the Linux calls the engine needs, all of them
//! relative to a directory fd and all of them taking names as bytes.
//!
//! Architecture invariant: no path under a sandbox root is opened by name
//! from the filesystem root. Everything under a sandbox goes through a
//! directory fd and [`open_beneath`], which refuses symlinks and `..`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// Opens the directory `rel` below `root` (`rel` empty: `root` itself) so
/// that no symlink is followed and nothing outside `root` can be reached:
/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
/// RESOLVE_NO_MAGICLINKS`, or, on kernels without `openat2`, one
/// `O_NOFOLLOW | O_DIRECTORY` open per component.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    if rel.is_empty() {
        return openat(root, b".", DIR_FLAGS, 0);
    }
    check_relative(rel)?;
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

/// One directory entry: its name and `d_type` (may be `DT_UNKNOWN`).
pub struct DirEntry {
    pub name: Vec<u8>,
    pub d_type: u8,
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
            let d_type = buf[off + 18];
            let name_area = &buf[off + 19..off + reclen];
            let len = name_area.iter().position(|&b| b == 0).unwrap_or(name_area.len());
            let name = &name_area[..len];
            if name != b"." && name != b".." {
                out.push(DirEntry { name: name.to_vec(), d_type });
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

/// Returns this process's file mode creation mask, as `/proc/self/status`
/// shows it (read once: the daemon never changes it). Unknown: `0o777`,
/// which masks everything, so that callers set modes explicitly.
pub fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .unwrap_or(0o777)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn open_dir(p: &std::path::Path) -> OwnedFd {
        let fd = std::fs::File::open(p).unwrap();
        OwnedFd::from(fd)
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
