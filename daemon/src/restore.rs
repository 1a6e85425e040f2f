//! Restore: brings the live tree to a recorded state, touching only the
//! paths that differ.
//!
//! A [`Plan`] is computed from the two sides of a difference (the target's
//! versions and the live versions of the paths that differ). Applying it
//! removes what must go (files and links on a few threads, then directories
//! deepest first), then creates and replaces what must come back
//! (directories shallowest first, then the rest on a few threads), then sets
//! directory modes (deepest first, so a read-only directory is filled before
//! it is closed). A file over a regular file with one name is truncated
//! and rewritten in place (see `overwrite`); other files, and symlinks,
//! are written to a temporary name in their directory and renamed into
//! place. Every call is relative to a directory fd opened beneath the
//! sandbox root with symlinks refused.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::capture::{Excludes, TEMP_PREFIX, show};
use crate::error::{IoContext, Result};
use crate::manifest::{Kind, Manifest, Meta, is_within};
use crate::store::{Object, SMALL_FILE, Store};
use crate::sys;

/// What to do with one path.
#[derive(Clone, Debug)]
pub enum Step {
    /// Missing live: create it.
    Create(Meta),
    /// Present live with other content or metadata: replace it.
    Restore { live: Meta, target: Meta },
    /// Present live, absent from the target: remove it.
    Delete(Meta),
}

/// The steps of a restore, by path.
#[derive(Default, Debug)]
pub struct Plan {
    pub steps: BTreeMap<Vec<u8>, Step>,
    /// Planned files that must end as names of one file, each group
    /// sorted: the first is written, the others are linked to it.
    pub links: Vec<Vec<Vec<u8>>>,
    /// Paths planned although their version holds, for their links alone.
    pub relinked: std::collections::BTreeSet<Vec<u8>>,
}

/// Outcome counters of an applied (or planned) restore.
#[derive(Default, Debug)]
pub struct Applied {
    /// Paths that could not be brought back or removed.
    pub skipped: Vec<Vec<u8>>,
    /// Small files whose content was cloned, with their sizes: none of it
    /// is in the page cache, and the next checkpoint reads them again (see
    /// [`warm`]).
    pub cloned: Vec<(Vec<u8>, u64)>,
}

/// Returns whether a restore covers `path`: selected by `filter` (empty:
/// everything) and not excluded.
pub fn selected(path: &[u8], filter: &[Vec<u8>], excludes: &Excludes) -> bool {
    (filter.is_empty() || filter.iter().any(|f| is_within(path, f))) && !excludes.covers(path)
}

impl Plan {
    /// Builds a plan from the paths that differ: `target` holds their
    /// versions in the state to restore, `live` their live versions. A path
    /// in neither side is left alone. Only paths selected by `filter` are
    /// planned, plus the missing ancestors of selected paths; excluded
    /// paths never are. `relinked`: paths planned even where their version
    /// holds, because their links differ (see [`crate::links::relink`]).
    pub fn new(
        target: &Manifest,
        live: &Manifest,
        filter: &[Vec<u8>],
        excludes: &Excludes,
        relinked: std::collections::BTreeSet<Vec<u8>>,
    ) -> Plan {
        let mut steps = BTreeMap::new();
        let wanted = |p: &[u8]| selected(p, filter, excludes);
        for (path, t) in target {
            let step = match live.get(path) {
                None => Step::Create(t.meta.clone()),
                Some(l) if l.meta == t.meta && !relinked.contains(&path[..]) => continue,
                Some(l) => Step::Restore { live: l.meta.clone(), target: t.meta.clone() },
            };
            if wanted(path) {
                steps.insert(path.to_vec(), step);
            }
        }
        for (path, l) in live {
            if !target.contains_key(path) && wanted(path) {
                steps.insert(path.to_vec(), Step::Delete(l.meta.clone()));
            }
        }
        if !filter.is_empty() {
            // A selected path needs its ancestors: create those missing live.
            let creating: Vec<Vec<u8>> =
                steps.iter().filter(|(_, s)| matches!(s, Step::Create(_))).map(|(p, _)| p.clone()).collect();
            for path in creating {
                let mut p = path.as_slice();
                while let Some(i) = p.iter().rposition(|&b| b == b'/') {
                    p = &p[..i];
                    if let (Some(t), None) = (target.get(p), live.get(p)) {
                        steps.entry(p.to_vec()).or_insert_with(|| Step::Create(t.meta.clone()));
                    }
                }
            }
        }
        let written =
            target.iter().filter(|(p, _)| matches!(steps.get(&p[..]), Some(Step::Create(_) | Step::Restore { .. })));
        let links = crate::links::groups(written);
        let relinked = relinked.into_iter().filter(|p| steps.contains_key(p)).collect();
        Plan { steps, links, relinked }
    }

    /// The planned paths written for their links: the members of a group
    /// and the paths parted from one.
    pub fn linking(&self) -> std::collections::HashSet<&[u8]> {
        self.links.iter().flatten().chain(&self.relinked).map(Vec::as_slice).collect()
    }

    /// Returns the version each planned path must end with (`None`: it
    /// must not exist), as a restore intent records it.
    pub fn desired(&self) -> Vec<(&[u8], Option<&Meta>)> {
        self.steps
            .iter()
            .map(|(p, s)| {
                let meta = match s {
                    Step::Create(t) | Step::Restore { target: t, .. } => Some(t),
                    Step::Delete(_) => None,
                };
                (p.as_slice(), meta)
            })
            .collect()
    }

    pub fn counts(&self) -> (u64, u64, u64) {
        let (mut restored, mut created, mut deleted) = (0, 0, 0);
        for s in self.steps.values() {
            match s {
                Step::Create(_) => created += 1,
                Step::Restore { .. } => restored += 1,
                Step::Delete(_) => deleted += 1,
            }
        }
        (restored, created, deleted)
    }

    /// Applies the plan under `root`, reading content from `store`.
    pub fn apply(&self, root: BorrowedFd<'_>, store: &Store, options: &ApplyOptions) -> Result<Applied> {
        let progress = crate::progress::current();
        if let Some(p) = &progress {
            p.start(crate::progress::Phase::Restoring, Some(self.steps.len() as u64));
        }
        let run = Run { root, store, options: *options, as_root: sys::euid() == 0, progress };
        // Directories whose entries changed, to fsync at the end (durable).
        let mut touched = std::collections::BTreeSet::new();
        // 1. Removals: deleted paths, and the live side of a type change
        //    that involves a directory.
        let mut skipped = run.removals(self, &mut touched)?;
        // 2. Creations and replacements: directories shallowest first, then
        //    everything else (nothing lives below those) on a few threads,
        //    and the later names of each group linked to its first.
        let made = run.directories(self, &mut skipped, &mut touched)?;
        let (not_put, cloned) = run.leaves(&made.leaves, &made.followers)?;
        skipped.extend(not_put);
        // 3. Directory owners and modes, deepest first: a read-only
        //    directory is filled before it is closed.
        run.set_dir_modes(&made.dir_modes)?;
        // 4. Durable: the renames and removals themselves, one fsync per
        //    directory touched (file contents were synced before renaming).
        run.sync_dirs(&touched)?;
        Ok(Applied { skipped, cloned })
    }
}

/// One application of a plan: what its phases share.
struct Run<'a> {
    root: BorrowedFd<'a>,
    store: &'a Store,
    options: ApplyOptions,
    as_root: bool,
    progress: Option<std::sync::Arc<crate::progress::Progress>>,
}

/// What the creation phase leaves for the others.
struct Made<'p> {
    /// Directories made or kept, with the owner and mode they end with.
    dir_modes: Vec<(Vec<u8>, Meta)>,
    /// Everything else to write, with whether it goes over a live file.
    leaves: Vec<(&'p Vec<u8>, Leaf<'p>)>,
    /// Later names of a group, to link to its first.
    followers: Vec<(&'p Vec<u8>, Follower<'p>)>,
}

impl<'a> Run<'a> {
    fn tick(&self) {
        if let Some(p) = &self.progress {
            p.tick(1);
        }
    }

    /// Removes what must go: files and links first, on a few threads
    /// (nothing depends on their order), then directories, deepest first,
    /// once what was in them is gone. Returns the paths it could not
    /// remove (a directory that still holds what the plan does not own).
    fn removals(&self, plan: &Plan, touched: &mut std::collections::BTreeSet<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let mut removals = Vec::new();
        for (path, step) in plan.steps.iter().rev() {
            let live = match step {
                Step::Delete(live) => live,
                Step::Restore { live, target }
                    if live.kind != target.kind && (live.kind == Kind::Dir || target.kind == Kind::Dir) =>
                {
                    live
                }
                _ => continue,
            };
            if self.options.durable {
                touched.insert(sys::split_parent(path).0.to_vec());
            }
            removals.push((path, (live.kind == Kind::Dir, matches!(step, Step::Delete(_)))));
        }
        let (dirs, leaves): (Vec<_>, Vec<_>) = removals.into_iter().partition(|(_, (dir, _))| *dir);
        let remove_one = |&(path, (_, deleted)): &(&Vec<u8>, (bool, bool))| -> Result<bool> {
            let removed = remove(self.root, path).ctx(|| format!("removing {}", show(path)))?;
            if deleted {
                self.tick();
            }
            Ok(removed)
        };
        let mut not_removed = on_threads(&leaves, remove_one)?;
        for d in &dirs {
            if !remove_one(d)? {
                not_removed.push(d.0.clone());
            }
        }
        not_removed.sort();
        Ok(not_removed)
    }

    /// Makes the directories to create, shallowest first, and sorts the
    /// rest of what the plan writes into leaves and followers. A path below
    /// one that was `skipped` is skipped too.
    fn directories<'p>(
        &self,
        plan: &'p Plan,
        skipped: &mut Vec<Vec<u8>>,
        touched: &mut std::collections::BTreeSet<Vec<u8>>,
    ) -> Result<Made<'p>> {
        let owner = self.options.owner;
        let mut made = Made { dir_modes: Vec::new(), leaves: Vec::new(), followers: Vec::new() };
        // Each name of a group but its first is linked to the first, once
        // that is written.
        let leader_of: std::collections::HashMap<&[u8], &Vec<u8>> =
            plan.links.iter().flat_map(|g| g[1..].iter().map(move |p| (p.as_slice(), &g[0]))).collect();
        for (path, step) in &plan.steps {
            let (target, live_dir) = match step {
                Step::Delete(_) => continue,
                Step::Create(t) => (t, false),
                Step::Restore { live, target } => (target, live.kind == Kind::Dir && target.kind == Kind::Dir),
            };
            if skipped.iter().any(|s| is_within(path, s)) {
                skipped.push(path.clone());
                continue;
            }
            if self.options.durable {
                touched.insert(sys::split_parent(path).0.to_vec());
            }
            if target.kind != Kind::Dir {
                // A file over a file is rewritten in place where it may be.
                let over_file = matches!(step, Step::Restore { live, .. } if live.kind == Kind::File);
                match leader_of.get(path.as_slice()) {
                    Some(leader) => made.followers.push((path, (restorable(target, owner), over_file, *leader))),
                    None => made.leaves.push((path, (restorable(target, owner), over_file))),
                }
                continue;
            }
            self.tick();
            if !live_dir {
                let (parent, name) = sys::split_parent(path);
                let dir =
                    sys::open_beneath(self.root, parent).ctx(|| format!("opening the directory of {}", show(path)))?;
                match sys::mkdirat(dir.as_fd(), name, 0o700) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                        return Err(e).ctx(|| format!("creating {}", show(path)));
                    }
                    _ => {}
                }
            }
            made.dir_modes.push((path.clone(), restorable(target, owner).into_owned()));
        }
        Ok(made)
    }

    /// Writes one file, symlink or FIFO; `false` for what a restore does
    /// not make (sockets, devices). Records in `cloned` the small files
    /// whose content was cloned.
    fn put(
        &self,
        path: &[u8],
        target: &Meta,
        over_file: bool,
        cloned: &std::sync::Mutex<Vec<(Vec<u8>, u64)>>,
    ) -> Result<bool> {
        self.tick();
        let ApplyOptions { reflink, durable, .. } = self.options;
        let file = FileOptions { reflink, as_root: self.as_root, durable };
        let (parent, name) = sys::split_parent(path);
        let dir = sys::open_beneath(self.root, parent).ctx(|| format!("opening the directory of {}", show(path)))?;
        match target.kind {
            Kind::File => put_file(dir.as_fd(), name, target, self.store, file, over_file).map(|was_cloned| {
                if was_cloned && target.size <= SMALL_FILE {
                    cloned.lock().unwrap_or_else(|p| p.into_inner()).push((path.to_vec(), target.size));
                }
            }),
            Kind::Symlink => put_symlink(dir.as_fd(), name, target, self.as_root),
            Kind::Special if target.mode & libc::S_IFMT == libc::S_IFIFO => {
                put_fifo(dir.as_fd(), name, target, self.as_root)
            }
            Kind::Special | Kind::Dir => return Ok(false),
        }
        .ctx(|| format!("restoring {}", show(path)))?;
        Ok(true)
    }

    /// Writes the leaves on a few threads, then links each follower to its
    /// group's first name (or writes it on its own where it cannot be
    /// linked). Returns the paths not written, sorted, and the small files
    /// cloned.
    #[allow(clippy::type_complexity)]
    fn leaves(
        &self,
        leaves: &[(&Vec<u8>, Leaf<'_>)],
        followers: &[(&Vec<u8>, Follower<'_>)],
    ) -> Result<(Vec<Vec<u8>>, Vec<(Vec<u8>, u64)>)> {
        let cloned = std::sync::Mutex::new(Vec::new());
        let mut not_put =
            on_threads(leaves, |(path, (target, over_file))| self.put(path, target, *over_file, &cloned))?;
        not_put.sort();
        let linked = |(path, (target, over_file, leader)): &(&Vec<u8>, Follower<'_>)| {
            if not_put.binary_search(*leader).is_err() {
                self.tick();
                match put_link(self.root, leader, path) {
                    Ok(()) => return Ok(true),
                    // Another filesystem, too many links, a file the caller
                    // may not link to: written on its own instead.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EMLINK | libc::EPERM)) => {}
                    Err(e) => return Err(e).ctx(|| format!("linking {} to {}", show(path), show(leader))),
                }
            }
            self.put(path, target, *over_file, &cloned)
        };
        let not_linked = on_threads(followers, linked)?;
        not_put.extend(not_linked);
        not_put.sort();
        Ok((not_put, cloned.into_inner().unwrap_or_else(|p| p.into_inner())))
    }

    /// Gives directories their owners and modes, deepest first.
    fn set_dir_modes(&self, dir_modes: &[(Vec<u8>, Meta)]) -> Result<()> {
        for (path, meta) in dir_modes.iter().rev() {
            let dir = sys::open_beneath(self.root, path).ctx(|| format!("opening {}", show(path)))?;
            if self.as_root {
                sys::fchown(dir.as_fd(), meta.uid, meta.gid).ctx(|| format!("setting the owner of {}", show(path)))?;
            }
            sys::fchmod(dir.as_fd(), meta.mode).ctx(|| format!("setting the mode of {}", show(path)))?;
        }
        Ok(())
    }

    /// Fsyncs each directory whose entries the restore changed.
    fn sync_dirs(&self, touched: &std::collections::BTreeSet<Vec<u8>>) -> Result<()> {
        for dir in touched {
            match sys::open_beneath(self.root, dir) {
                Ok(fd) => sys::fsync(fd.as_fd()).ctx(|| format!("syncing the directory {}", show(dir)))?,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {} // removed by this restore
                Err(e) => return Err(e).ctx(|| format!("opening {}", show(dir))),
            }
        }
        Ok(())
    }
}

/// What to write at a path, and whether it goes over a live file.
type Leaf<'a> = (std::borrow::Cow<'a, Meta>, bool);

/// A path to link to the first of its group (its leader), with what to
/// write there instead if it cannot be.
type Follower<'a> = (std::borrow::Cow<'a, Meta>, bool, &'a Vec<u8>);

/// Runs `work` on every `(path, _)` item, on one thread per core (at most
/// four) when there are 16 items or more. Returns the paths of the items it
/// returned `false` for, or the first error (the other threads then stop
/// early).
fn on_threads<T: Sync>(
    items: &[(&Vec<u8>, T)],
    work: impl Fn(&(&Vec<u8>, T)) -> Result<bool> + Sync,
) -> Result<Vec<Vec<u8>>> {
    let threads = if items.len() < 16 { 1 } else { crate::capture::threads() };
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let (work, failed) = (&work, &failed);
                s.spawn(move || -> Result<Vec<Vec<u8>>> {
                    let mut not_done = Vec::new();
                    for item in items.iter().skip(k).step_by(threads) {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        match work(item) {
                            Ok(true) => {}
                            Ok(false) => not_done.push(item.0.clone()),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(not_done)
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            match w.join() {
                Ok(r) => all.extend(r?),
                Err(_) => return Err(crate::error::Error::Internal("a restore thread panicked".into())),
            }
        }
        Ok(all)
    })
}

/// How a restore plan is applied.
#[derive(Clone, Copy, Debug)]
pub struct ApplyOptions {
    /// Clone file content from the store (else copy it).
    pub reflink: bool,
    /// The sandbox owner's uid when it is not root: entries it does not own
    /// are then restored without set-user-ID and set-group-ID bits (a
    /// user's sandbox must never yield, say, a root-owned setuid file).
    pub owner: Option<u32>,
    /// Fsync each file before renaming it into place, and each directory
    /// touched once at the end (`durability = "sync"`).
    pub durable: bool,
}

/// Returns `meta` as it may be restored in a sandbox owned by `owner`
/// (`None`: root's, restored as recorded).
fn restorable(meta: &Meta, owner: Option<u32>) -> std::borrow::Cow<'_, Meta> {
    match owner {
        Some(uid) if meta.uid != uid && meta.kind != Kind::Special && meta.mode & 0o6000 != 0 => {
            let mut m = meta.clone();
            m.mode &= !0o6000;
            std::borrow::Cow::Owned(m)
        }
        _ => std::borrow::Cow::Borrowed(meta),
    }
}

/// Removes the temporary files a restore killed half way left in the
/// directories of `paths` (their parents: the only places a restore writes
/// them). Returns how many it removed.
pub fn remove_leftover_temps(root: BorrowedFd<'_>, paths: &[&[u8]]) -> Result<u64> {
    let parents: std::collections::BTreeSet<&[u8]> = paths.iter().map(|p| sys::split_parent(p).0).collect();
    let mut removed = 0;
    for parent in parents {
        let dir = match sys::open_beneath(root, parent) {
            Ok(d) => d,
            // Gone, or no longer a directory: nothing of ours is inside.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)) => continue,
            Err(e) => return Err(e).ctx(|| format!("opening {}", show(parent))),
        };
        let entries = match sys::read_dir(dir.as_fd()) {
            Ok(entries) => entries,
            // Removed since the open (getdents then fails with ENOENT).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e).ctx(|| format!("listing {}", show(parent))),
        };
        for entry in entries {
            if entry.name.starts_with(TEMP_PREFIX) {
                match sys::unlinkat(dir.as_fd(), &entry.name, false) {
                    Ok(()) => removed += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).ctx(|| format!("removing a temporary file in {}", show(parent))),
                }
            }
        }
    }
    Ok(removed)
}

/// Asks the kernel to read the files `cloned` (paths under `root` as a
/// restore left them, with their sizes) into the page cache, the first
/// [`WARM_BYTES`] of them, without waiting for the reads. A cloned file
/// starts with none of its pages there, and the next checkpoint reads
/// every restored file again (its ctime changed): from memory once this
/// has run, from the disk otherwise (100 small files cloned back, the
/// checkpoint 300 ms later: 11.5-15.2 against 7.6-7.8 ms on XFS, 10.6-10.8
/// against 6.9-7.5 ms on btrfs). A hint: a path that cannot be opened as a
/// regular file is passed over.
pub fn warm(root: BorrowedFd<'_>, cloned: &[(Vec<u8>, u64)]) {
    let mut budget = WARM_BYTES;
    for (path, size) in cloned {
        budget = match budget.checked_sub(*size) {
            Some(left) => left,
            None => break,
        };
        let (parent, name) = sys::split_parent(path);
        let Ok(dir) = sys::open_beneath(root, parent) else { continue };
        // Opened only as a regular file, as a scan opens one: never a device
        // put there since, never blocking on a FIFO, never through a symlink.
        if !sys::lstatat(dir.as_fd(), name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG) {
            continue;
        }
        let Ok(fd) = sys::openat(dir.as_fd(), name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0) else {
            continue;
        };
        if sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG) {
            let _ = sys::fadvise_willneed(fd.as_fd());
        }
    }
}

/// At most this much restored content is read in by [`warm`]: past it, a
/// restore of a whole tree would fill memory ahead of a checkpoint that
/// may never come.
const WARM_BYTES: u64 = 64 << 20;

/// Removes `path` (a directory only when empty). Returns false when it
/// could not be removed because it still holds entries (excluded files).
fn remove(root: BorrowedFd<'_>, path: &[u8]) -> io::Result<bool> {
    let (parent, name) = sys::split_parent(path);
    let dir = match sys::open_beneath(root, parent) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(true),
        Err(e) => return Err(e),
    };
    let st = match sys::lstatat(dir.as_fd(), name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let is_dir = Kind::of_mode(st.st_mode) == Kind::Dir;
    match sys::unlinkat(dir.as_fd(), name, is_dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if is_dir && e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
        Err(e) => Err(e),
    }
}

fn temp_name() -> Vec<u8> {
    let mut name = TEMP_PREFIX.to_vec();
    name.extend_from_slice(ulid::Ulid::new().to_string().as_bytes());
    name
}

/// Runs `fill` on a fresh temporary name in `dir`, then renames it over
/// `name`; the temporary is removed if anything fails.
fn via_temp(dir: BorrowedFd<'_>, name: &[u8], fill: impl FnOnce(&[u8]) -> io::Result<()>) -> io::Result<()> {
    let tmp = temp_name();
    let result = fill(&tmp).and_then(|()| sys::renameat(dir, &tmp, dir, name, false));
    if result.is_err() {
        let _ = sys::unlinkat(dir, &tmp, false);
    }
    result
}

/// How file content is written by a restore.
#[derive(Clone, Copy)]
struct FileOptions {
    reflink: bool,
    as_root: bool,
    durable: bool,
}

/// Brings the file `name` in `dir` to `meta`. `over_file`: the live entry
/// was a regular file when the plan was made, which is then rewritten in
/// place where [`overwrite`] may; anything else is replaced by a new file.
/// Returns whether the content was cloned.
fn put_file(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    store: &Store,
    options: FileOptions,
    over_file: bool,
) -> io::Result<bool> {
    let id = meta.object.as_ref().ok_or_else(|| io::Error::other("the catalogue has no object for this file"))?;
    let object = match meta.size <= SMALL_FILE && !options.reflink {
        true => store.open_likely_packed(id)?,
        false => store.open_object(id)?,
    };
    if over_file && let Some(cloned) = overwrite(dir, name, meta, &object, options)? {
        return Ok(cloned);
    }
    let mut cloned = false;
    via_temp(dir, name, |tmp| {
        // Created with its permission bits, so that most files need neither
        // fchmod nor fchown: each is one more inode update, and one more
        // event for the watcher to read. (The temporary is as readable as
        // the file it becomes.)
        let bits = meta.mode & 0o777;
        let fd: OwnedFd = sys::openat(dir, tmp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, bits)?;
        let st = sys::fstat(fd.as_fd())?;
        cloned = fill(fd.as_fd(), &st, meta, &object, options)?;
        Ok(())
    })?;
    Ok(cloned)
}

/// Rewrites the regular file `name` in `dir` in place (see
/// [`Object::write_over`]). That keeps its inode and spares a new one and a
/// rename over the old (100 small files on trees of 100,000: cloned, 2.4
/// against 4.5 ms on XFS and 3.5 against 9 on btrfs; copied, 3 against
/// 5.7 on ext4, 6.4 against 14 on btrfs, level on XFS; measured when a
/// copy still emptied the file first). Returns whether it cloned the
/// content; or `None`, having changed nothing, when `name` is not a file
/// with a single link that the daemon may write to and, unless root, owns
/// (another link would see the new content; a running program's file
/// cannot be opened for writing; only its owner may set another's mode and
/// mtime): the caller then replaces it.
///
/// Unlike a rename, this is not atomic: a reader may see the file empty,
/// or part old and part new, while it is restored, and a daemon killed
/// half way leaves it so, until the restore's intent finishes it at the
/// next start.
fn overwrite(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    object: &Object,
    options: FileOptions,
) -> io::Result<Option<bool>> {
    // Never blocks (a FIFO put there since the plan opens with no reader,
    // or fails), and never follows a symlink (sys::openat adds O_NOFOLLOW).
    let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = match sys::openat(dir, name, flags, 0) {
        Ok(fd) => fd,
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::EACCES
                        | libc::EPERM
                        | libc::ETXTBSY
                        | libc::ELOOP
                        | libc::EISDIR
                        | libc::ENXIO
                        | libc::EROFS
                        | libc::EWOULDBLOCK
                )
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let st = sys::fstat(fd.as_fd())?;
    let lone_file = st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_nlink == 1;
    if !lone_file || (!options.as_root && st.st_uid != sys::euid()) {
        return Ok(None);
    }
    fill(fd.as_fd(), &st, meta, object, options).map(Some)
}

/// Writes `object` over the regular file `fd` (whose stat was `st`), and
/// gives it `meta`'s owner, mode and mtime. Returns whether it cloned the
/// content.
fn fill(fd: BorrowedFd<'_>, st: &libc::stat, meta: &Meta, object: &Object, options: FileOptions) -> io::Result<bool> {
    let cloned = object.write_over(fd, st.st_size as u64, meta.size, options.reflink)?;
    let owner_differs = (st.st_uid, st.st_gid) != (meta.uid, meta.gid);
    if options.as_root && owner_differs {
        sys::fchown(fd, meta.uid, meta.gid)?;
    }
    // Set-id and sticky bits are set after the owner (fchown and writes
    // clear set-id bits); other bits only when they differ (the umask may
    // have taken some off a new file).
    if meta.mode & 0o7000 != 0 || st.st_mode & 0o7777 != meta.mode {
        sys::fchmod(fd, meta.mode)?;
    }
    sys::set_mtime(fd, meta.mtime_ns)?;
    if options.durable {
        // On disk before a rename can make it visible, or the restore's
        // end is acknowledged.
        sys::fsync(fd)?;
    }
    Ok(cloned)
}

/// Makes `path` another name of the file at `leader` (both relative to
/// `root`), replacing what `path` was.
fn put_link(root: BorrowedFd<'_>, leader: &[u8], path: &[u8]) -> io::Result<()> {
    let (leader_dir, leader_name) = sys::split_parent(leader);
    let from = sys::open_beneath(root, leader_dir)?;
    let (parent, name) = sys::split_parent(path);
    let dir = sys::open_beneath(root, parent)?;
    let mut tmp_name = Vec::new();
    via_temp(dir.as_fd(), name, |tmp| {
        tmp_name = tmp.to_vec();
        sys::linkat(from.as_fd(), leader_name, dir.as_fd(), tmp)
    })?;
    // A rename between two names of one file does nothing, and leaves the
    // temporary name behind.
    match sys::unlinkat(dir.as_fd(), &tmp_name, false) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn put_symlink(dir: BorrowedFd<'_>, name: &[u8], meta: &Meta, as_root: bool) -> io::Result<()> {
    let target =
        meta.target.as_deref().ok_or_else(|| io::Error::other("the catalogue has no target for this symlink"))?;
    via_temp(dir, name, |tmp| {
        sys::symlinkat(target, dir, tmp)?;
        if as_root {
            sys::lchownat(dir, tmp, meta.uid, meta.gid)?;
        }
        Ok(())
    })
}

fn put_fifo(dir: BorrowedFd<'_>, name: &[u8], meta: &Meta, as_root: bool) -> io::Result<()> {
    via_temp(dir, name, |tmp| {
        sys::mkfifoat(dir, tmp, 0o600)?;
        if as_root {
            sys::lchownat(dir, tmp, meta.uid, meta.gid)?;
        }
        sys::fchmodat(dir, tmp, meta.mode & 0o7777)
    })
}
