//! Export: a checkpoint materialized as a read-only directory tree that a
//! person can browse with ordinary tools.
//!
//! Files are hardlinks to the store's objects where allowed (same
//! filesystem, and the caller owns the store), else clones or copies. The
//! tree is built under a temporary name beside the destination and renamed
//! into place when complete; directories are made read-only last.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::manifest::{Kind, Manifest};
use crate::store::Store;
use crate::sys;

#[derive(Default, Debug)]
pub struct Exported {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinked: u64,
}

/// Writes `rows` as a new directory `name` in `parent`. `link`: hardlink
/// objects where possible. `owner`: give what is created to this uid.
pub fn export(
    rows: &Manifest,
    parent: &Path,
    name: &[u8],
    store: &Store,
    link: bool,
    owner: Option<u32>,
) -> io::Result<Exported> {
    let parent_fd = OwnedFd::from(std::fs::File::open(parent)?);
    if sys::lstatat(parent_fd.as_fd(), name).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the destination already exists"));
    }
    let mut tmp = b".snapback-export.".to_vec();
    tmp.extend_from_slice(ulid::Ulid::new().to_string().as_bytes());
    sys::mkdirat(parent_fd.as_fd(), &tmp, 0o700)?;
    let result = (|| {
        let root = sys::openat(parent_fd.as_fd(), &tmp, sys::DIR_FLAGS, 0)?;
        let out = fill(rows, root.as_fd(), store, link, owner)?;
        sys::renameat(parent_fd.as_fd(), &tmp, parent_fd.as_fd(), name, true)?;
        if let Some(uid) = owner {
            sys::fchown(root.as_fd(), uid, u32::MAX)?;
        }
        sys::fchmod(root.as_fd(), 0o555)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = remove_tree(parent_fd.as_fd(), &tmp);
    }
    result
}

fn fill(rows: &Manifest, root: BorrowedFd<'_>, store: &Store, link: bool, owner: Option<u32>) -> io::Result<Exported> {
    let mut paths: Vec<&Vec<u8>> = rows.keys().collect();
    paths.sort();
    let mut out = Exported::default();
    let mut dirs = Vec::new();
    for path in paths {
        let meta = &rows[path].meta;
        let (parent, name) = sys::split_parent(path);
        let dir = sys::open_beneath(root, parent)?;
        let dir = dir.as_fd();
        match meta.kind {
            Kind::Dir => {
                sys::mkdirat(dir, name, 0o700)?;
                dirs.push((path.clone(), meta.mode));
                out.dirs += 1;
            }
            Kind::File => {
                let id = meta.object.as_ref().ok_or_else(|| io::Error::other("a file without an object"))?;
                if link && store.link_object(id, dir, name).is_ok() {
                    out.hardlinked += 1;
                } else {
                    let object = store.open_object(id)?;
                    let f = sys::openat(dir, name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, 0o600)?;
                    object.write_into(f.as_fd(), meta.size, true)?;
                    if let Some(uid) = owner {
                        sys::fchown(f.as_fd(), uid, u32::MAX)?;
                    }
                    sys::fchmod(f.as_fd(), meta.mode & 0o555)?;
                    sys::set_mtime(f.as_fd(), meta.mtime_ns)?;
                }
                out.files += 1;
            }
            Kind::Symlink => {
                let target = meta.target.as_deref().ok_or_else(|| io::Error::other("a symlink without a target"))?;
                sys::symlinkat(target, dir, name)?;
                if let Some(uid) = owner {
                    sys::lchownat(dir, name, uid, u32::MAX)?;
                }
                out.symlinks += 1;
            }
            Kind::Special => {}
        }
    }
    for (path, mode) in dirs.iter().rev() {
        let dir = sys::open_beneath(root, path)?;
        if let Some(uid) = owner {
            sys::fchown(dir.as_fd(), uid, u32::MAX)?;
        }
        sys::fchmod(dir.as_fd(), (mode & 0o555) | 0o500)?;
    }
    Ok(out)
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
