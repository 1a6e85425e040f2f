//! Export: a checkpoint materialized as a read-only directory tree that a
//! person can browse with ordinary tools.
//!
//! Files are clones of the store's objects where the filesystem can clone,
//! else copies; never hardlinks, which would share the object's inode (its
//! mode, its mtime, and the store itself) with the export. Each file gets
//! its recorded mode less the write bits, and its recorded mtime. The tree
//! is built under a temporary name beside the destination and renamed into
//! place when complete; directories are made read-only last.
//!
//! The caller of [`export`] runs it with the requesting user's filesystem
//! credentials (see [`crate::access::with_caller_creds`]): everything is
//! created as that user, where that user could create it. Only the store's
//! objects are opened as the daemon. Content the user could not have read
//! at capture time is withheld, and FIFOs, sockets and devices are left
//! out; both are reported, path by path. Names of one recorded file are
//! names of one exported file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::access::{Acting, Peer};
use crate::manifest::{Kind, Manifest};
use crate::store::Store;
use crate::sys;

#[derive(Default, Debug)]
pub struct Exported {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files whose content was cloned, not copied.
    pub cloned: u64,
    /// Files left out because the caller could not have read them, and why.
    pub withheld: Vec<(Vec<u8>, String)>,
    /// Entries left out because an export holds only directories, files and
    /// symlinks, and what they were.
    pub skipped: Vec<(Vec<u8>, String)>,
}

/// Writes `rows` as a new directory `name` in `parent`, for `peer`.
/// `acting`: the thread acts as the caller, and steps back to the daemon
/// to open store objects.
pub fn export(
    rows: &Manifest,
    parent: BorrowedFd<'_>,
    name: &[u8],
    store: &Store,
    peer: &Peer,
    acting: Option<&Acting>,
) -> io::Result<Exported> {
    if sys::lstatat(parent, name).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the destination already exists"));
    }
    let mut tmp = b".snapback-export.".to_vec();
    tmp.extend_from_slice(ulid::Ulid::new().to_string().as_bytes());
    sys::mkdirat(parent, &tmp, 0o700)?;
    let result = (|| {
        let root = sys::openat(parent, &tmp, sys::DIR_FLAGS, 0)?;
        let out = fill(rows, root.as_fd(), store, peer, acting)?;
        sys::renameat(parent, &tmp, parent, name, true)?;
        sys::fchmod(root.as_fd(), 0o555)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = remove_tree(parent, &tmp);
    }
    result
}

fn fill(
    rows: &Manifest,
    root: BorrowedFd<'_>,
    store: &Store,
    peer: &Peer,
    acting: Option<&Acting>,
) -> io::Result<Exported> {
    let mut out = Exported::default();
    let mut dirs = Vec::new();
    // Names of one recorded file become names of one exported file: the
    // first written of each group, by group.
    let groups = crate::links::groups(rows);
    let group_of: std::collections::HashMap<&[u8], usize> =
        groups.iter().enumerate().flat_map(|(i, g)| g.iter().map(move |p| (p.as_slice(), i))).collect();
    let mut written: std::collections::HashMap<usize, &[u8]> = Default::default();
    // A manifest is sorted, so a directory comes before what it holds.
    for (path, row) in rows {
        let meta = &row.meta;
        let (parent, name) = sys::split_parent(path);
        let dir = sys::open_beneath(root, parent)?;
        let dir = dir.as_fd();
        match meta.kind {
            Kind::Dir => {
                sys::mkdirat(dir, name, 0o700)?;
                dirs.push((path, meta.mode));
                out.dirs += 1;
            }
            Kind::File => {
                if let Some(why) = peer.withheld(rows, path) {
                    out.withheld.push((path.to_vec(), why));
                    continue;
                }
                let group = group_of.get(&path[..]).copied();
                if let Some(first) = group.and_then(|g| written.get(&g)) {
                    let (first_dir, first_name) = sys::split_parent(first);
                    let from = sys::open_beneath(root, first_dir)?;
                    sys::linkat(from.as_fd(), first_name, dir, name)?;
                    out.files += 1;
                    continue;
                }
                let id = meta.object.as_ref().ok_or_else(|| io::Error::other("a file without an object"))?;
                let object = match acting {
                    Some(a) => a.as_daemon(|| store.open_object(id))?,
                    None => store.open_object(id)?,
                };
                let f = sys::openat(dir, name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
                if object.write_into(f.as_fd(), meta.size, true)? {
                    out.cloned += 1;
                }
                sys::fchmod(f.as_fd(), meta.mode & 0o7555)?;
                sys::set_mtime(f.as_fd(), meta.mtime_ns)?;
                out.files += 1;
                if let Some(g) = group {
                    written.insert(g, path);
                }
            }
            Kind::Symlink => {
                let target = meta.target.as_deref().ok_or_else(|| io::Error::other("a symlink without a target"))?;
                sys::symlinkat(target, dir, name)?;
                out.symlinks += 1;
            }
            Kind::Special => {
                out.skipped.push((path.to_vec(), special_kind(meta.mode).into()));
            }
        }
    }
    for (path, mode) in dirs.iter().rev() {
        let dir = sys::open_beneath(root, path)?;
        sys::fchmod(dir.as_fd(), (mode & 0o7555) | 0o500)?;
    }
    Ok(out)
}

/// Names what kind of special file a recorded `st_mode` is.
fn special_kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        _ => "a special file",
    }
}

/// Removes `name` in `dir` and everything below it, never following a
/// symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let st = sys::lstatat(dir, name)?;
    if Kind::of_mode(st.st_mode) == Kind::Dir {
        let sub = sys::openat(dir, name, sys::DIR_FLAGS, 0)?;
        sys::fchmod(sub.as_fd(), 0o700)?;
        for e in sys::read_dir(sub.as_fd())? {
            remove_tree(sub.as_fd(), &e.name)?;
        }
        sys::unlinkat(dir, name, true)
    } else {
        sys::unlinkat(dir, name, false)
    }
}
