//! Comparing versions of paths between two states of a sandbox, for one
//! caller: how each path changed, its line counts and its patch. The
//! content of each side is read from the store (a checkpoint) or from the
//! live tree, and only through the access rule: a file the caller could
//! not have read is `withheld`, never diffed.

use std::cell::RefCell;
use std::io::Read;
use std::os::fd::BorrowedFd;

use snapback::proto::{Aspect, DiffDetail, DiffTotal, FileStat, WireBytes};

use super::*;
use crate::manifest::{Meta, Row};
use crate::parts::Streamed;
use crate::patch::{self, Version};

/// A patch goes out in pieces of at most this many bytes: even written
/// as JSON escapes, a piece stays far below a protocol line.
const PIECE: usize = 64 * 1024;

/// Where one side of a comparison is.
#[derive(Clone, Copy)]
pub(super) enum Side<'a> {
    /// Nothing: the state before a sandbox's first checkpoint.
    Empty,
    /// A checkpoint's state, at this seq: its files are objects of `store`.
    Stored { store: &'a Store, seq: u64 },
    /// The live tree, whose whole state is `rows`.
    Live { root: BorrowedFd<'a>, rows: &'a Manifest },
}

/// Two sides of a sandbox compared for one caller.
pub(super) struct Comparing<'a> {
    pub(super) peer: &'a Peer,
    pub(super) conn: &'a Connection,
    pub(super) sandbox_id: i64,
    pub(super) old: Side<'a>,
    pub(super) new: Side<'a>,
    pub(super) detail: DiffDetail,
    /// Files larger than this are summarised, not diffed.
    pub(super) max_bytes: u64,
    dirs: Dirs,
}

/// Directory versions looked up for the access rule, by side (`true`:
/// new) and path.
type Dirs = RefCell<HashMap<(bool, Vec<u8>), Option<Meta>>>;

/// What a comparison sent, or kept for the answer when nothing streams.
pub(super) struct Compared {
    pub(super) changes: Vec<Change>,
    pub(super) patch: Vec<WireBytes>,
    pub(super) total: Option<DiffTotal>,
}

impl<'a> Comparing<'a> {
    pub(super) fn new(
        (peer, conn, sandbox_id): (&'a Peer, &'a Connection, i64),
        old: Side<'a>,
        new: Side<'a>,
        detail: DiffDetail,
        max_bytes: u64,
    ) -> Comparing<'a> {
        Comparing { peer, conn, sandbox_id, old, new, detail, max_bytes, dirs: RefCell::default() }
    }

    /// Compares every path of `old` and `new` (each side's versions of the
    /// paths that differ) within `filter`, sorted by path, sending the
    /// changes (and the patch) as they are made.
    pub(super) fn stream(&self, old: &Manifest, new: &Manifest, filter: &[Vec<u8>]) -> Result<Compared> {
        let mut changes = Streamed::new("changes");
        let mut pieces = Streamed::new("patch");
        let mut total = (self.detail != DiffDetail::Paths).then(DiffTotal::default);
        let mut pending = Vec::new();
        let wants_patch = self.detail == DiffDetail::Patch;
        for (path, o, n) in pairs(old, new) {
            if !filter.is_empty() && !filter.iter().any(|f| is_within(path, f)) {
                continue;
            }
            let out = wants_patch.then_some(&mut pending);
            let Some(change) = self.change(path, o.map(|r| &r.meta), n.map(|r| &r.meta), out)? else { continue };
            if let (Some(t), Some(stat)) = (total.as_mut(), change.stat.as_ref()) {
                t.add(stat);
            }
            changes.push(change).ctx(|| "sending a diff".into())?;
            while pending.len() >= PIECE {
                let cut = pending[..PIECE].iter().rposition(|&b| b == b'\n').map_or(PIECE, |i| i + 1);
                let rest = pending.split_off(cut);
                pieces.push(WireBytes(std::mem::replace(&mut pending, rest))).ctx(|| "sending a patch".into())?;
            }
        }
        if !pending.is_empty() {
            pieces.push(WireBytes(pending)).ctx(|| "sending a patch".into())?;
        }
        let changes = changes.finish().ctx(|| "sending a diff".into())?;
        let patch = pieces.finish().ctx(|| "sending a patch".into())?;
        Ok(Compared { changes, patch, total })
    }

    /// Compares every path of `old` and `new` like [`Comparing::stream`],
    /// keeping the changes (for an answer that holds them in a list of its
    /// own, such as a log entry's) and writing no patch.
    pub(super) fn collect(&self, old: &Manifest, new: &Manifest) -> Result<(Vec<Change>, DiffTotal)> {
        let mut total = DiffTotal::default();
        let mut changes = Vec::new();
        for (path, o, n) in pairs(old, new) {
            if let Some(change) = self.change(path, o.map(|r| &r.meta), n.map(|r| &r.meta), None)? {
                if let Some(stat) = &change.stat {
                    total.add(stat);
                }
                changes.push(change);
            }
        }
        Ok((changes, total))
    }

    /// How `path` changed from `old` to `new` (`None` for a side where it
    /// does not exist; `None` returned when it did not change), with its
    /// line counts when asked, and its patch appended to `out`.
    pub(super) fn change(
        &self,
        path: &[u8],
        old: Option<&Meta>,
        new: Option<&Meta>,
        out: Option<&mut Vec<u8>>,
    ) -> Result<Option<Change>> {
        let kind = match (old, new) {
            (None, None) => return Ok(None),
            (None, Some(_)) => ChangeKind::Added,
            (Some(_), None) => ChangeKind::Deleted,
            (Some(o), Some(n)) if o.kind != n.kind => ChangeKind::TypeChanged,
            (Some(o), Some(n)) if o == n => return Ok(None),
            (Some(_), Some(_)) => ChangeKind::Modified,
        };
        let mut change = Change::new(WirePath(path.to_vec()), kind);
        if let (Some(o), Some(n), ChangeKind::Modified) = (old, new, kind) {
            change.what = aspects(o, n);
        }
        if self.detail != DiffDetail::Paths {
            let has_content = |m: &&Meta| matches!(m.kind, Kind::File | Kind::Symlink);
            change.stat = self.stat(path, old.filter(has_content), new.filter(has_content), out)?;
        }
        Ok(Some(change))
    }

    /// The line counts of a file or symlink (`None` when neither side is
    /// one), and its patch appended to `out`.
    fn stat(
        &self,
        path: &[u8],
        old: Option<&Meta>,
        new: Option<&Meta>,
        out: Option<&mut Vec<u8>>,
    ) -> Result<Option<FileStat>> {
        if old.is_none() && new.is_none() {
            return Ok(None);
        }
        for (side, meta) in [(false, old), (true, new)] {
            if let Some(why) = meta.and_then(|m| self.withheld(side, path, m)) {
                note(out, path, "withheld", &why);
                return Ok(Some(FileStat { withheld: Some(why), ..FileStat::default() }));
            }
        }
        let sizes = (old.map_or(0, |m| m.size), new.map_or(0, |m| m.size));
        // Equal objects are equal content: only the modes can differ.
        let same = matches!((old, new), (Some(o), Some(n)) if o.kind == Kind::File && o.object.is_some() && o.object == n.object);
        let read = |side: bool, meta: Option<&Meta>| match (same, meta) {
            (_, None) => Ok(None),
            (true, Some(m)) => Ok(Some((git_mode(m), Vec::new()))),
            (false, Some(m)) => self.content(side, path, m).map(|c| Some((git_mode(m), c))),
        };
        let (old_c, new_c) = match read(false, old).and_then(|o| read(true, new).map(|n| (o, n))) {
            Ok(both) => both,
            Err(why) => {
                note(out, path, "not diffed", &why);
                let (old_size, new_size) = sizes;
                return Ok(Some(FileStat { not_diffed: Some(why), old_size, new_size, ..FileStat::default() }));
            }
        };
        fn version(c: &Option<(u32, Vec<u8>)>) -> Option<Version<'_>> {
            c.as_ref().map(|(mode, content)| Version { mode: *mode, content })
        }
        let mut stat = patch::diff(path, version(&old_c), version(&new_c), out);
        (stat.old_size, stat.new_size) = sizes;
        Ok(Some(stat))
    }

    /// Why the caller may not see the content of `path` on one side.
    fn withheld(&self, new: bool, path: &[u8], meta: &Meta) -> Option<String> {
        if self.peer.is_root() {
            return None;
        }
        self.peer.withheld_in(|dir| self.dir_meta(new, dir), path, meta)
    }

    /// The version of the directory `dir` on one side, for the access
    /// rule. A catalogue that cannot say withholds (a directory no one may
    /// search).
    fn dir_meta(&self, new: bool, dir: &[u8]) -> Option<Meta> {
        let key = (new, dir.to_vec());
        if let Some(known) = self.dirs.borrow().get(&key) {
            return known.clone();
        }
        let found = match if new { self.new } else { self.old } {
            Side::Empty => None,
            Side::Live { rows, .. } => rows.get(dir).map(|r| r.meta.clone()),
            Side::Stored { seq, .. } => match catalogue::dir_at(self.conn, self.sandbox_id, seq, dir) {
                Ok(row) => row.map(|r| r.meta),
                Err(e) => {
                    tracing::warn!("reading a directory's version for the access rule: {e}");
                    Some(unreadable())
                }
            },
        };
        self.dirs.borrow_mut().insert(key, found.clone());
        found
    }

    /// The content of a file (or a symlink's target) on one side, or why
    /// it is not diffed.
    fn content(&self, new: bool, path: &[u8], meta: &Meta) -> std::result::Result<Vec<u8>, String> {
        if meta.kind == Kind::Symlink {
            return Ok(meta.target.as_deref().unwrap_or_default().to_vec());
        }
        let over = |size: u64| format!("{size} bytes, over diff_max_bytes ({})", self.max_bytes);
        if meta.size > self.max_bytes {
            return Err(over(meta.size));
        }
        match if new { self.new } else { self.old } {
            Side::Empty => Err("no such version".into()),
            Side::Stored { store, seq } => {
                let id = meta.object.as_ref().ok_or("a file version without an object")?;
                let read = |id: &ObjectId| store.open_object(id).and_then(|o| o.read());
                match read(id) {
                    // Named by its content since this comparison read its
                    // versions (see `hasher.rs`): the version holds the
                    // hash now. A rare race, so a lookup that reads the
                    // sandbox's versions will do.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && id.is_unhashed() => {
                        match catalogue::object_at(self.conn, self.sandbox_id, path, seq) {
                            Ok(Some(named)) if named != *id => read(&named),
                            _ => Err(e),
                        }
                    }
                    r => r,
                }
                .map_err(|e| format!("its stored copy cannot be read: {e}"))
            }
            Side::Live { root, .. } => match read_live(root, path, self.max_bytes) {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err(over(self.max_bytes + 1)),
                Err(e) => Err(format!("it cannot be read in the live tree: {e}")),
            },
        }
    }
}

/// A directory's version for a catalogue that could not be read: one no
/// caller may search.
fn unreadable() -> Meta {
    Meta { kind: Kind::Dir, mode: 0, uid: u32::MAX, gid: u32::MAX, size: 0, mtime_ns: 0, target: None, object: None }
}

/// Each path of either side, sorted, with its version on each.
fn pairs<'m>(
    old: &'m Manifest,
    new: &'m Manifest,
) -> impl Iterator<Item = (&'m [u8], Option<&'m Row>, Option<&'m Row>)> {
    let mut paths: Vec<&'m [u8]> = old.keys().chain(new.keys()).map(|p| &p[..]).collect();
    paths.sort_unstable();
    paths.dedup();
    paths.into_iter().map(|p| (p, old.get(p), new.get(p)))
}

/// What differs between two versions of one kind.
fn aspects(old: &Meta, new: &Meta) -> Vec<Aspect> {
    let mut what = Vec::new();
    if old.object != new.object || old.size != new.size {
        what.push(Aspect::Content);
    }
    if old.target != new.target {
        what.push(Aspect::Target);
    }
    if old.mode != new.mode {
        what.push(Aspect::Mode);
    }
    if (old.uid, old.gid) != (new.uid, new.gid) {
        what.push(Aspect::Owner);
    }
    if old.mtime_ns != new.mtime_ns {
        what.push(Aspect::Mtime);
    }
    what
}

/// git's mode of a file or symlink version.
fn git_mode(meta: &Meta) -> u32 {
    match meta.kind {
        Kind::Symlink => patch::MODE_SYMLINK,
        _ if meta.mode & 0o111 != 0 => patch::MODE_EXEC,
        _ => patch::MODE_FILE,
    }
}

/// A line of the patch that `git apply` and `patch` pass over: what was
/// left out of it, and why.
fn note(out: Option<&mut Vec<u8>>, path: &[u8], what: &str, why: &str) {
    if let Some(out) = out {
        out.extend_from_slice(b"# snapback: ");
        out.extend_from_slice(&patch::quoted(path));
        out.extend_from_slice(format!(" {what}: {}\n", why.replace('\n', " ")).as_bytes());
    }
}

/// Reads a live file of at most `max` bytes, never following a symlink
/// nor blocking on a FIFO swapped in; `None` when it is longer.
fn read_live(root: BorrowedFd<'_>, path: &[u8], max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let (dir, name) = sys::split_parent(path);
    let dir = sys::open_beneath(root, dir)?;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = sys::openat(dir.as_fd(), name, flags, 0)?;
    if Kind::of_mode(sys::fstat(fd.as_fd())?.st_mode) != Kind::File {
        return Err(std::io::Error::other("it is no longer a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd).take(max + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= max).then_some(bytes))
}
