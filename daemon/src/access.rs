//! The access model in one place. A shared root daemon is a privileged
//! helper, so every request that hands out content, or places a directory
//! the daemon will later write, goes through the rules here:
//!
//! - [`Peer`]: who is asking, as the kernel says (`SO_PEERCRED` and
//!   `SO_PEERGROUPS`), never as the request says.
//! - [`Peer::withheld`]: the content of a captured file goes to a caller
//!   only if that caller could have read it at capture time, by the
//!   recorded owner, group and mode of the file and of every directory
//!   above it in the sandbox. Export uses it today; anything that returns
//!   content tomorrow (patches, forks, MCP answers) must too.
//! - [`check_placement`]: where a sandbox and its store may be: never `/`,
//!   never over the state directory, another sandbox or another store.
//!
//! What a rollback may put back for a non-root caller is decided in
//! [`crate::restore`] (`ApplyOptions::owner`): entries of other uids come
//! back as recorded, but never with setuid or setgid bits.

use std::io;
use std::sync::Arc;

use crate::manifest::{Kind, Manifest, Meta, is_within};
use crate::sys;

/// Who sent a request, from the kernel's record of the connecting process.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, from `SO_PEERGROUPS`.
    pub groups: Arc<[u32]>,
}

impl Peer {
    /// The daemon itself (configured registrations, tests).
    pub fn daemon() -> Peer {
        // SAFETY: getegid cannot fail.
        let gid = unsafe { libc::getegid() };
        let groups = sys::FsCreds::current().map(|c| c.groups).unwrap_or_default();
        Peer { uid: sys::euid(), gid, groups: groups.into() }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The permission bits (`r`, `w`, `x` as 4, 2, 1) this caller had on an
    /// entry with this owner, group and mode: the owner's if it is the
    /// owner, else the group's if it is in the group, else the others'
    /// (the kernel's order, where a matching class decides alone). Root
    /// has all of them.
    fn bits(&self, meta: &Meta) -> u32 {
        if self.is_root() {
            7
        } else if meta.uid == self.uid {
            (meta.mode >> 6) & 7
        } else if self.in_group(meta.gid) {
            (meta.mode >> 3) & 7
        } else {
            meta.mode & 7
        }
    }

    /// Why this caller may not be given the content of `path` in `rows`,
    /// or `None` if it may. The path must be a file of `rows`; the
    /// directories above it that `rows` holds must each be searchable and
    /// the file readable, as recorded at capture time.
    pub fn withheld(&self, rows: &Manifest, path: &[u8]) -> Option<String> {
        let meta = &rows.get(path)?.meta;
        self.withheld_in(|dir| rows.get(dir).map(|r| r.meta.clone()), path, meta)
    }

    /// Like [`Peer::withheld`], for the file `path` recorded as `meta`,
    /// with the version of each directory above it from `dir_at` (`None`
    /// where the state holds no directory there).
    pub fn withheld_in(
        &self,
        mut dir_at: impl FnMut(&[u8]) -> Option<Meta>,
        path: &[u8],
        meta: &Meta,
    ) -> Option<String> {
        if self.is_root() {
            return None;
        }
        let mut dir = sys::split_parent(path).0;
        while !dir.is_empty() {
            if let Some(e) = dir_at(dir)
                && e.kind == Kind::Dir
                && self.bits(&e) & 1 == 0
            {
                return Some(format!(
                    "uid {} could not search the directory {} (owner {}, group {}, mode {:04o})",
                    self.uid,
                    String::from_utf8_lossy(dir),
                    e.uid,
                    e.gid,
                    e.mode & 0o7777
                ));
            }
            dir = sys::split_parent(dir).0;
        }
        (self.bits(meta) & 4 == 0).then(|| {
            format!(
                "uid {} could not read it (owner {}, group {}, mode {:04o})",
                self.uid,
                meta.uid,
                meta.gid,
                meta.mode & 0o7777
            )
        })
    }
}

/// A thread acting with a caller's filesystem credentials, which can step
/// back to the daemon's for a moment (to read the store).
pub struct Acting {
    caller: sys::FsCreds,
    daemon: sys::FsCreds,
}

impl Acting {
    /// Runs `f` with the daemon's credentials, then acts as the caller
    /// again.
    pub fn as_daemon<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.daemon.assume()?;
        let result = f();
        self.caller.assume()?;
        result
    }
}

/// Runs `f` so that whatever it creates, opens or removes by name is done
/// with `peer`'s filesystem uid, gid and groups: the kernel then lets it do
/// exactly what the caller could do itself, and what it creates belongs
/// to the caller. When the daemon is root and the caller is not, `f` runs
/// on a thread of its own, which takes the caller's credentials (given to
/// `f` to step back to the daemon's) and ends with them, so no other work
/// ever runs with them. A caller with the daemon's own uid, or root, is
/// served as the daemon on this thread; any other caller of a daemon that
/// is not root is refused, since such a daemon cannot act as it.
pub fn with_caller_creds<T: Send>(
    peer: &Peer,
    f: impl FnOnce(Option<&Acting>) -> io::Result<T> + Send,
) -> io::Result<T> {
    let daemon_uid = sys::euid();
    if peer.uid == daemon_uid || peer.is_root() {
        return f(None);
    }
    if daemon_uid != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("this daemon runs as uid {daemon_uid} and cannot write as uid {}", peer.uid),
        ));
    }
    let mut groups: Vec<u32> = peer.groups.to_vec();
    if !groups.contains(&peer.gid) {
        groups.push(peer.gid);
    }
    let caller = sys::FsCreds { uid: peer.uid, gid: peer.gid, groups };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let acting = Acting { daemon: sys::FsCreds::current()?, caller };
                acting.caller.assume()?;
                f(Some(&acting))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread acting as the caller panicked")))
    })
}

/// A sandbox root and a store, as the placement rule sees them.
pub struct Placed<'a> {
    pub name: &'a str,
    pub root: &'a [u8],
    pub store: &'a [u8],
}

/// Checks where a new sandbox (`root`, with its objects in `store`) may be
/// registered, given the daemon's state directory, its default store and
/// the sandboxes already registered (whose roots all differ from `root`).
/// All paths are clean and absolute (see [`sys::clean_components`]) and
/// were opened without following a symlink, so comparing their bytes
/// compares places. Returns why not, in a sentence.
pub fn check_placement(
    root: &[u8],
    store: &[u8],
    state_dir: &[u8],
    default_store: &[u8],
    others: &[Placed<'_>],
) -> Result<(), String> {
    let overlaps = |a: &[u8], b: &[u8]| is_within(a, b) || is_within(b, a) || a == b;
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    if root == b"/" {
        return Err("/ cannot be a sandbox: it holds the daemon's state, every store and every other sandbox".into());
    }
    if store == b"/" {
        return Err("/ cannot be a store: choose a directory of its own".into());
    }
    if overlaps(root, state_dir) {
        return Err(format!("{} overlaps the daemon's state directory {}", show(root), show(state_dir)));
    }
    if overlaps(root, store) {
        return Err(format!("{} overlaps its store {}; put the store outside the sandbox", show(root), show(store)));
    }
    if store != default_store && overlaps(store, state_dir) {
        return Err(format!("the store {} overlaps the daemon's state directory {}", show(store), show(state_dir)));
    }
    for other in others {
        if overlaps(root, other.root) {
            return Err(format!("{} overlaps the sandbox {} at {}", show(root), other.name, show(other.root)));
        }
        if overlaps(root, other.store) {
            return Err(format!(
                "{} overlaps the store {} of the sandbox {}",
                show(root),
                show(other.store),
                other.name
            ));
        }
        if overlaps(store, other.root) {
            return Err(format!("the store {} overlaps the sandbox {}", show(store), other.name));
        }
        if store != other.store && overlaps(store, other.store) {
            return Err(format!(
                "the store {} is nested with the store {} of the sandbox {}",
                show(store),
                show(other.store),
                other.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Row, StatKey};

    #[test]
    fn placement_rules_over_a_table_of_cases() {
        let state = b"/var/lib/snapback".as_slice();
        let default = b"/var/lib/snapback/store".as_slice();
        let others = [Placed { name: "a", root: b"/home/u/a", store: b"/home/u/.a-store" }];
        // (root, store, allowed, a word of the reason)
        let cases: &[(&str, &str, bool, &str)] = &[
            ("/home/u/b", "/var/lib/snapback/store", true, ""),
            ("/home/u/b", "/home/u/.a-store", true, ""), // sharing a store is fine
            ("/home/u/b", "/home/u/.b-store", true, ""),
            ("/", "/var/lib/snapback/store", false, "/ cannot be a sandbox"),
            ("/var", "/var/lib/snapback/store", false, "state directory"),
            ("/var/lib/snapback", "/var/lib/snapback/store", false, "state directory"),
            ("/var/lib/snapback/x", "/var/lib/snapback/store", false, "state directory"),
            ("/home/u/b", "/", false, "/ cannot be a store"),
            ("/home/u/b", "/home/u/b/.store", false, "its store"),
            ("/home/u/b/in", "/home/u/b", false, "its store"),
            ("/home/u/b", "/var/lib/snapback/other", false, "state directory"),
            ("/home/u/b", "/var/lib", false, "state directory"),
            ("/home/u", "/srv/store", false, "sandbox a"),
            ("/home/u/a/sub", "/srv/store", false, "sandbox a"),
            ("/home/u/.a-store/x", "/srv/store", false, "store /home/u/.a-store"),
            ("/home/v", "/home/u/a/store", false, "overlaps the sandbox a"),
            ("/home/v", "/home/u/.a-store/inner", false, "nested"),
            ("/home/v", "/home/u", false, "sandbox a"),
            // A sibling whose name shares a prefix is not inside.
            ("/home/u/ab", "/home/u/.a-store2", true, ""),
        ];
        for (root, store, allowed, why) in cases {
            let got = check_placement(root.as_bytes(), store.as_bytes(), state, default, &others);
            match got {
                Ok(()) => assert!(allowed, "{root} with {store} should be refused ({why})"),
                Err(e) => {
                    assert!(!allowed, "{root} with {store} refused: {e}");
                    assert!(e.contains(why), "{root} with {store}: {e:?} should say {why:?}");
                }
            }
        }
    }

    fn entry(kind: Kind, mode: u32, uid: u32, gid: u32) -> Row {
        let meta = Meta { kind, mode, uid, gid, size: 0, mtime_ns: 0, target: None, object: None };
        Row { id: 0, meta, key: StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 } }
    }

    #[test]
    fn content_goes_only_to_a_caller_that_could_read_it() {
        let mut rows = Manifest::new();
        rows.insert(b"own"[..].into(), entry(Kind::File, 0o600, 1000, 1000));
        rows.insert(b"root-600"[..].into(), entry(Kind::File, 0o600, 0, 0));
        rows.insert(b"root-000"[..].into(), entry(Kind::File, 0o000, 0, 0));
        rows.insert(b"root-644"[..].into(), entry(Kind::File, 0o644, 0, 0));
        rows.insert(b"group-640"[..].into(), entry(Kind::File, 0o640, 0, 50));
        rows.insert(b"own-but-004"[..].into(), entry(Kind::File, 0o004, 1000, 1000)); // owner class decides
        rows.insert(b"closed"[..].into(), entry(Kind::Dir, 0o700, 0, 0));
        rows.insert(b"closed/open"[..].into(), entry(Kind::File, 0o644, 0, 0));
        rows.insert(b"closed/deeper"[..].into(), entry(Kind::Dir, 0o755, 0, 0));
        rows.insert(b"closed/deeper/f"[..].into(), entry(Kind::File, 0o644, 1000, 1000));
        let user = Peer { uid: 1000, gid: 1000, groups: vec![50].into() };
        let stranger = Peer { uid: 2000, gid: 2000, groups: Vec::new().into() };
        let root = Peer { uid: 0, gid: 0, groups: Vec::new().into() };
        let given = |p: &Peer, path: &str| p.withheld(&rows, path.as_bytes()).is_none();
        assert!(given(&user, "own"));
        assert!(!given(&user, "root-600"));
        assert!(!given(&user, "root-000"));
        assert!(given(&user, "root-644"));
        assert!(given(&user, "group-640"), "a supplementary group counts");
        assert!(!given(&stranger, "group-640"));
        assert!(!given(&user, "own-but-004"));
        assert!(!given(&user, "closed/open"), "a directory it could not search hides what is below");
        assert!(!given(&user, "closed/deeper/f"));
        for path in ["root-000", "closed/deeper/f", "own-but-004"] {
            assert!(given(&root, path));
        }
        let why = user.withheld(&rows, b"root-600").unwrap();
        assert!(why.contains("uid 1000") && why.contains("0600"), "{why}");
        let why = user.withheld(&rows, b"closed/deeper/f").unwrap();
        assert!(why.contains("directory closed"), "{why}");
    }
}
