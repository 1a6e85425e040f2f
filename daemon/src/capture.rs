//! Capture: compares the live tree with the current manifest and returns
//! the new versions a checkpoint must record.
//!
//! A scan lstat-s every path in its scope and compares type, mode, owner,
//! size, mtime, ctime and inode with the current version; only paths that
//! differ are read (hashed, and cloned or copied into the store), except
//! that a scan of a whole tree clones the files of new paths without
//! reading them, leaving them to be hashed after the checkpoint's answer
//! (see [`Options::unhashed`]). The scope's own paths, split between a few
//! threads, are read by the thread that compares them; files found by
//! walking a directory go to worker threads through a bounded channel
//! while the walk goes on (or, cloned unread, are stored by the walker).
//! Symlinks are never followed; FIFOs, sockets and devices are recorded and
//! never opened.
//!
//! The scope is a value, not a log line: [`Scope::Everything`] compares the
//! whole tree, [`Scope::Paths`] only the given subtrees (what a watcher
//! marked dirty).

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::catalogue::NewRow;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Kind, Live, Manifest, Meta, Row, StatKey, is_within, join, subtree};
use crate::store::{Pack, Store, hash_fd};
use crate::sys;

/// Names starting with this are the daemon's own temporary files (written
/// during a rollback and renamed into place); they are never captured.
pub const TEMP_PREFIX: &[u8] = b".snapback-tmp.";

/// What to compare with the manifest.
#[derive(Clone, Debug)]
pub enum Scope {
    /// The whole tree.
    Everything,
    /// These sandbox-relative paths and everything below them.
    Paths(Vec<Vec<u8>>),
}

impl Scope {
    /// Returns the scope as a list of disjoint path prefixes (`""`: all).
    pub fn prefixes(&self) -> Vec<Vec<u8>> {
        match self {
            Scope::Everything => vec![Vec::new()],
            Scope::Paths(paths) => {
                // By component, so that what is below a path follows it:
                // bytewise, `d.txt` and `d (1)` fall between `d` and `d/x`.
                let mut sorted = paths.clone();
                sorted.sort_by(|a, b| a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/')));
                let mut out: Vec<Vec<u8>> = Vec::new();
                for p in sorted {
                    if !out.last().is_some_and(|last| is_within(&p, last)) {
                        out.push(p);
                    }
                }
                out
            }
        }
    }
}

/// A sandbox's exclude patterns. A pattern containing `/` is matched
/// against the whole sandbox-relative path; one without `/` against every
/// path's last component, at any depth. `*` never crosses a `/`.
pub struct Excludes {
    full: GlobSet,
    base: GlobSet,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Result<Excludes> {
        let mut full = GlobSetBuilder::new();
        let mut base = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p.trim_start_matches('/'))
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| Error::InvalidRequest(format!("exclude pattern {p:?}: {e}")))?;
            if p.contains('/') {
                full.add(glob)
            } else {
                base.add(glob)
            };
        }
        let build = |b: GlobSetBuilder| b.build().map_err(|e| Error::InvalidRequest(format!("exclude patterns: {e}")));
        Ok(Excludes { full: build(full)?, base: build(base)? })
    }

    /// Whether the relative `path`, whose last component is `name`, is excluded.
    pub fn is_excluded(&self, path: &[u8], name: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let as_path = |b: &[u8]| std::path::Path::new(std::ffi::OsStr::from_bytes(b)).to_owned();
        (!self.base.is_empty() && self.base.is_match(as_path(name)))
            || (!self.full.is_empty() && self.full.is_match(as_path(path)))
    }

    /// Whether `path` or any of its ancestors is excluded.
    pub fn covers(&self, path: &[u8]) -> bool {
        let mut end = 0;
        loop {
            let next = path[end..].iter().position(|&b| b == b'/').map(|i| end + i);
            let prefix = &path[..next.unwrap_or(path.len())];
            let name = &prefix[prefix.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1)..];
            if self.is_excluded(prefix, name) {
                return true;
            }
            match next {
                Some(i) => end = i + 1,
                None => return false,
            }
        }
    }
}

/// Settings of one capture.
pub struct Options<'a> {
    pub root: BorrowedFd<'a>,
    pub excludes: &'a Excludes,
    /// Where to put new content; `None` only hashes (a dry run).
    pub store: Option<&'a Store>,
    pub reflink: bool,
    /// Where small files go (see [`Store::put`]): given for captures of the
    /// paths a watcher marked, which were written moments ago (a clone
    /// would first write their dirty pages out).
    pub pack: Option<&'a Pack<'a>>,
    /// Clone the files of new paths into the store without reading them
    /// (see [`Store::put_unhashed`]): set for a scan of a whole tree with a
    /// store that clones, such as a first checkpoint. A file with a
    /// version is still read, so that equal content keeps its version, and
    /// so is a file with other names, whose names hold one object.
    pub unhashed: bool,
    /// Look for the content of a file at a path with no version among the
    /// objects stored before storing it again (see [`Store::put`]): where
    /// a directory was moved, its files' content is there. Not set for a
    /// sandbox with no versions at all (a first checkpoint), whose content
    /// the store cannot hold yet but for another sandbox's: a lookup that
    /// fails for each of a million files would cost more than the copies
    /// it might spare.
    pub seek_moved: bool,
    /// A path whose mtime or ctime is at or after this instant is racy.
    pub racy_after_ns: i64,
    /// Counts visited entries for a client watching the request.
    pub progress: Option<&'a crate::progress::Progress>,
}

/// Counters of one capture.
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub scanned: u64,
    pub read: u64,
    pub reflinked: u64,
    /// Of those cloned, how many without being read (see
    /// [`Options::unhashed`]).
    pub unhashed: u64,
    pub copied: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.scanned += other.scanned;
        self.read += other.read;
        self.reflinked += other.reflinked;
        self.unhashed += other.unhashed;
        self.copied += other.copied;
    }
}

/// What a capture found.
#[derive(Default)]
pub struct Captured {
    /// New versions.
    pub added: Vec<NewRow>,
    /// Current versions that end here (replaced or deleted), with their paths.
    pub ended: Vec<(Vec<u8>, Row)>,
    /// Current versions whose content holds but whose live stat moved.
    pub rekeyed: Vec<(Vec<u8>, i64, StatKey)>,
    pub stats: Stats,
    /// Objects stored for versions a later round replaced (see
    /// [`Captured::then`]): nothing may reference them once committed.
    pub dropped: Vec<crate::manifest::ObjectId>,
}

impl Captured {
    /// Number of distinct paths that are new, changed or gone.
    pub fn changed_paths(&self) -> u64 {
        let ended: std::collections::HashSet<&[u8]> = self.ended.iter().map(|(p, _)| p.as_slice()).collect();
        let replaced = self.added.iter().filter(|a| ended.contains(a.path.as_slice())).count();
        (self.added.len() + self.ended.len() - replaced) as u64
    }

    /// Applies this capture to `current` (the manifest it was compared
    /// with), giving the live state. `ids` are the catalogue ids of the
    /// added rows, in order, once they are written; 0 before.
    pub fn apply_to(&self, current: &mut Manifest, ids: Option<&[i64]>) {
        self.apply_within(current, ids, |_| true);
    }

    /// [`Captured::apply_to`], for the paths `within` accepts only.
    pub fn apply_within(&self, current: &mut Manifest, ids: Option<&[i64]>, within: impl Fn(&[u8]) -> bool) {
        for (path, _) in self.ended.iter().filter(|(p, _)| within(p)) {
            current.remove(path.as_slice());
        }
        for (i, a) in self.added.iter().enumerate().filter(|(_, a)| within(&a.path)) {
            let id = ids.and_then(|ids| ids.get(i).copied()).unwrap_or(0);
            current.insert(a.path[..].into(), Row { id, meta: a.meta.clone(), key: a.key });
        }
        // A dry run's live state needs them too: a new link changes the
        // link count of the file's other names, which decides what a
        // restore must write.
        for (path, id, key) in self.rekeyed.iter().filter(|(p, ..)| within(p)) {
            rekey(current, path, *id, *key);
        }
    }
}

/// Where [`Captured::move_into`] puts versions.
enum Sink<'a> {
    Current(&'a mut Manifest),
    Built(crate::manifest::Builder),
}

/// Gives the version `id` of `path` in `current` its new stat key, if it
/// is still that path's version there.
fn rekey(current: &mut Manifest, path: &[u8], id: i64, key: StatKey) {
    if let Some(row) = current.get_mut(path).filter(|r| r.id == id) {
        row.key = key;
    }
}

impl Captured {
    /// [`Captured::apply_to`], for a capture written with the catalogue ids
    /// `ids`, moving its versions into `current` instead of copying them:
    /// after a first checkpoint of a million files, the two copies would
    /// be most of the daemon's peak memory. Its `added`, `ended` and
    /// `rekeyed` are left empty. Returns how many versions it inserted
    /// one at a time (see [`crate::manifest::compact`]): a capture that
    /// adds more than a quarter of what `current` holds builds the result
    /// compact instead, and returns 0.
    pub fn move_into(&mut self, current: &mut Manifest, ids: &[i64]) -> usize {
        for (path, _) in std::mem::take(&mut self.ended) {
            current.remove(path.as_slice());
        }
        let added = std::mem::take(&mut self.added);
        let inserted = added.len();
        let mut into = match inserted > current.len() / 4 {
            true => Sink::Built(crate::manifest::Builder::new(std::mem::take(current))),
            false => Sink::Current(current),
        };
        // As in `apply_to`, a row past the ids given gets 0.
        let ids = ids.iter().copied().chain(std::iter::repeat(0));
        for (a, id) in freeing(added).zip(ids) {
            let row = Row { id, meta: a.meta, key: a.key };
            match &mut into {
                Sink::Built(b) => b.insert(a.path, row),
                Sink::Current(m) => drop(m.insert(a.path.into(), row)),
            }
        }
        let inserted = match into {
            Sink::Built(b) => {
                *current = b.finish();
                0
            }
            Sink::Current(_) => inserted,
        };
        for (path, id, key) in std::mem::take(&mut self.rekeyed) {
            rekey(current, &path, id, key);
        }
        inserted
    }

    /// Gives way to `fresh`, a capture compared with the same manifest as
    /// this one: the objects this one stored are dropped (freed after the
    /// commit unless it refers to them), its counts kept.
    pub fn replaced_by(self, mut fresh: Captured) -> Captured {
        fresh.dropped.extend(self.added.into_iter().filter_map(|a| a.meta.object));
        fresh.dropped.extend(self.dropped);
        fresh.stats.add(&self.stats);
        fresh
    }

    /// Folds in `later`, a capture of some of the same paths made after
    /// this one against this one's result (its added rows have id 0):
    /// where `later` read a path again, its finding replaces this one's, so
    /// the whole is still relative to the manifest this capture started
    /// from.
    pub fn then(mut self, later: Captured) -> Captured {
        let read_again: std::collections::HashSet<&[u8]> = later
            .added
            .iter()
            .map(|a| a.path.as_slice())
            .chain(later.ended.iter().map(|(p, _)| p.as_slice()))
            .collect();
        let (replaced, kept): (Vec<NewRow>, Vec<NewRow>) =
            std::mem::take(&mut self.added).into_iter().partition(|a| read_again.contains(a.path.as_slice()));
        self.added = kept;
        self.dropped.extend(replaced.into_iter().filter_map(|a| a.meta.object));
        self.rekeyed.retain(|(p, ..)| !read_again.contains(p.as_slice()));
        for (path, id, key) in later.rekeyed {
            match self.added.iter_mut().find(|a| id == 0 && a.path == path) {
                Some(added) => added.key = key,
                None => self.rekeyed.push((path, id, key)),
            }
        }
        // A row with id 0 is this capture's own addition, never written:
        // it ends by not being added.
        self.ended.extend(later.ended.into_iter().filter(|(_, row)| row.id != 0));
        self.added.extend(later.added);
        self.dropped.extend(later.dropped);
        self.stats.add(&later.stats);
        self
    }
}

enum Outcome {
    /// A new version, and the one it replaces (boxed: a first scan of a
    /// large tree holds a million of these, most replacing nothing).
    Version(NewRow, Option<Box<Row>>),
    Rekey(Vec<u8>, i64, StatKey),
    Gone(Vec<u8>, Row),
}

struct Job {
    path: Vec<u8>,
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    prior: Option<Row>,
}

/// How many threads walk, read or write files at once: one per core, at
/// most four. Asked of the system once: `available_parallelism` reads the
/// cgroup's CPU quota files on every call.
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4))
}

/// Readers for each walker in a scan of a whole tree that reads its files
/// (with a store that cannot clone; one that can clones new files unread,
/// with no readers: see [`capture`]). Such a scan reads files whose pages
/// are mostly not in memory, one small read each, so its readers wait on
/// the disk more than they work: with more of them more reads are in
/// flight. A first checkpoint on the loop-mounted XFS of the benchmarks,
/// when it still read every file, 300,000 files: 34.0-34.7 s with one
/// reader a walker, 29.2 s with two, 29.1 s with four, 28.3 s with eight;
/// a million files: 145-171 s with one, 111.9 s with two, 112.0 s with
/// four, which also left 4 MiB more of the daemon's memory in use (more
/// threads, more allocator arenas). A watched checkpoint reads files just
/// written, from memory, and keeps one a walker.
const READERS_PER_THREAD_IN_A_WHOLE_SCAN: usize = 2;

/// Below this many paths, the roots of a scope are visited on one thread.
const PARALLEL_ROOTS: usize = 16;

/// Compares the live tree in `scope` with `current` (the current versions;
/// rows outside the scope are ignored) and returns what changed.
///
/// First the roots of the scope are visited, split between the threads in
/// runs of neighbouring paths; a file among them is read by the thread that
/// visits it, with no hand-off (a watcher's scope is mostly such files).
/// Then the directories found are walked, with files read by workers fed
/// through a bounded channel.
pub fn capture(current: &Manifest, scope: &Scope, opts: &Options<'_>) -> Result<Captured> {
    let threads = threads();
    let prefixes = scope.prefixes();
    let (mut walkers, pending) = visit_roots(current, &prefixes, opts, threads)?;
    let mut readers = Readers::default();
    if !pending.is_empty() && walkers.iter().all(|(_, r)| r.is_ok()) {
        let whole = matches!(scope, Scope::Everything);
        let capacity = if whole { current.len() / threads + 16 } else { 0 };
        let reading = match (whole, opts.unhashed) {
            // Cloning new files without reading them, the walkers store each
            // file as they meet it: a clone does not wait on the disk as a
            // read does, and handing every file to another thread cost more
            // than it saved. A first checkpoint of 300,000 files on the
            // benchmarks' XFS: 9.7-9.9 s so, 10.2 s with three walkers, 10.9
            // s with four, 13.0 s with one; 13.0 s with two readers a walker.
            (true, true) => 0,
            (true, false) => threads * READERS_PER_THREAD_IN_A_WHOLE_SCAN,
            (false, _) => threads,
        };
        walkers.extend(walk(current, pending, opts, (threads, reading), capacity, &mut readers)?);
    }
    gather(current, &prefixes, walkers, readers)
}

/// A walker of `current` with the given channel to its readers.
fn walker<'a>(
    current: &'a Manifest,
    opts: &'a Options<'a>,
    tx: Option<SyncSender<Job>>,
    capacity: usize,
) -> Walker<'a> {
    // A walker of a whole tree meets about its share of the manifest's paths.
    Walker {
        opts,
        current,
        seen: HashSet::with_capacity_and_hasher(capacity, Default::default()),
        tx,
        outcomes: Vec::new(),
        stats: Stats::default(),
    }
}

/// A walker and how its walk ended.
type Walked<'a> = (Walker<'a>, Result<()>);

/// Visits the roots of the scope, split between the threads in runs of
/// neighbouring paths. Returns the walkers and the directories found.
fn visit_roots<'a>(
    current: &'a Manifest,
    prefixes: &[Vec<u8>],
    opts: &'a Options<'a>,
    threads: usize,
) -> Result<(Vec<Walked<'a>>, Vec<Pending>)> {
    let chunks = if prefixes.len() < PARALLEL_ROOTS { 1 } else { threads };
    let per_chunk = prefixes.len().div_ceil(chunks).max(1);
    let mut walkers = Vec::new();
    let mut pending = Vec::new();
    let spawned = std::thread::scope(|s| {
        let visit = |roots: &[Vec<u8>]| {
            let mut w = walker(current, opts, None, 0);
            let r = w.start(roots);
            (w, r)
        };
        let mut parts = prefixes.chunks(per_chunk);
        let first = parts.next().unwrap_or_default();
        let others: Vec<_> = parts.map(|roots| s.spawn(move || visit(roots))).collect();
        let spawned = 1 + others.len();
        let visited = std::iter::once(visit(first)).chain(others.into_iter().filter_map(|h| h.join().ok()));
        for (w, r) in visited {
            let r = r.map(|found| pending.extend(found));
            walkers.push((w, r));
        }
        spawned
    });
    if walkers.len() != spawned {
        return Err(Error::Internal("a capture thread panicked".into()));
    }
    Ok((walkers, pending))
}

/// What the reader threads found.
#[derive(Default)]
struct Readers {
    stats: Stats,
    outcomes: Mutex<Vec<Outcome>>,
    failure: Mutex<Option<Error>>,
}

/// Walks the directories found: they are listed and compared by `threads`
/// walkers, and the files that must be read go to `reader_count` readers
/// through a bounded channel, or with none, are read by the walker.
fn walk<'a>(
    current: &'a Manifest,
    pending: Vec<Pending>,
    opts: &'a Options<'a>,
    (threads, reader_count): (usize, usize),
    capacity: usize,
    readers: &mut Readers,
) -> Result<Vec<Walked<'a>>> {
    let (tx, rx) = sync_channel::<Job>(4096);
    let rx = Mutex::new(rx);
    let queue = DirQueue::new(pending);
    let Readers { stats, outcomes, failure } = readers;
    let walked = std::thread::scope(|s| {
        let (outcomes, failure) = (&*outcomes, &*failure);
        let reading: Vec<_> = (0..reader_count).map(|_| s.spawn(|| work(&rx, opts, outcomes, failure))).collect();
        let mut walking = Vec::new();
        for _ in 1..threads {
            let mut w = walker(current, opts, (reader_count > 0).then(|| tx.clone()), capacity);
            let queue = &queue;
            walking.push(s.spawn(move || {
                let r = w.walk(queue);
                w.tx = None;
                (w, r)
            }));
        }
        let mut first = walker(current, opts, (reader_count > 0).then(|| tx.clone()), capacity);
        let r = first.walk(&queue);
        if r.is_err() {
            queue.fail();
        }
        first.tx = None;
        drop(tx); // with every walker's sender gone, readers drain and stop
        let mut walked = vec![(first, r)];
        walked.extend(walking.into_iter().filter_map(|h| h.join().ok()));
        for h in reading {
            stats.add(&h.join().unwrap_or_default());
        }
        walked
    });
    if walked.len() != threads {
        return Err(Error::Internal("a capture thread panicked".into()));
    }
    Ok(walked)
}

/// Gathers what the walkers and readers found into one capture: a new
/// version per path, and an end for whatever was current in the scope and
/// not seen.
fn gather(current: &Manifest, prefixes: &[Vec<u8>], walkers: Vec<Walked<'_>>, readers: Readers) -> Result<Captured> {
    let mut seen: Vec<HashSet<&[u8], foldhash::quality::RandomState>> = Vec::new();
    let mut walker_outcomes = Vec::new();
    let mut out = Captured { stats: readers.stats, ..Captured::default() };
    for (w, r) in walkers {
        r?;
        out.stats.add(&w.stats);
        seen.push(w.seen);
        walker_outcomes.extend(w.outcomes);
    }
    if let Some(e) = readers.failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let read = readers.outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    // New versions only: a scan after a restart finds mostly unchanged
    // files (rekeyed), and room for as many versions was 120 bytes each.
    let versions = walker_outcomes.iter().chain(&read).filter(|o| matches!(o, Outcome::Version(..))).count();
    // Each outcome's memory goes back as it becomes a version: a first
    // scan of a million files held both, 290 MiB, for a moment.
    let all = freeing(walker_outcomes).chain(freeing(read));
    // A path seen twice (a directory renamed back and forth under the
    // walk) keeps one new version: the catalogue holds one current row per
    // path. Told by each path's hash and the index of the first version
    // with that hash (and, for another path with the same hash, by the
    // path): a first scan of a million files would hold a copy of every
    // path otherwise.
    out.added.reserve_exact(versions);
    let hasher = foldhash::quality::RandomState::default();
    // Sized at once: grown, it left the tables it outgrew (up to 18 MiB
    // at a million files) free in the thread's heap.
    let mut versioned: std::collections::HashMap<u64, usize, foldhash::quality::RandomState> =
        std::collections::HashMap::with_capacity_and_hasher(versions, Default::default());
    let mut same_hash: HashSet<Vec<u8>> = HashSet::new();
    for o in all {
        match o {
            Outcome::Version(new, prior) => {
                use std::collections::hash_map::Entry;
                let seen_twice = match versioned.entry(std::hash::BuildHasher::hash_one(&hasher, &new.path)) {
                    Entry::Vacant(v) => {
                        v.insert(out.added.len());
                        false
                    }
                    Entry::Occupied(first) if out.added[*first.get()].path == new.path => true,
                    Entry::Occupied(_) => !same_hash.insert(new.path.clone()),
                };
                if seen_twice {
                    tracing::debug!(path = %show(&new.path), "seen twice in one scan; keeping the first version");
                    continue;
                }
                if let Some(prior) = prior {
                    out.ended.push((new.path.clone(), *prior));
                }
                out.added.push(new);
            }
            Outcome::Rekey(path, id, key) => out.rekeyed.push((path, id, key)),
            Outcome::Gone(path, row) => out.ended.push((path, row)),
        }
    }
    for prefix in prefixes {
        for (path, row) in subtree(current, prefix) {
            if !seen.iter().any(|s| s.contains(path)) {
                out.ended.push((path.to_vec(), row.clone()));
            }
        }
    }
    Ok(out)
}

/// The items of `v` in order, giving back its memory as it empties: an
/// eighth of it at a time, so that what it holds and what is made of its
/// items are not both whole at once. Shrinking in place copies nothing
/// (a large vector is its own mapping, shrunk by `mremap`).
fn freeing<T>(mut v: Vec<T>) -> impl Iterator<Item = T> {
    v.reverse();
    std::iter::from_fn(move || {
        let item = v.pop();
        if v.capacity() > 4096 && v.len() < v.capacity() - v.capacity() / 8 {
            v.shrink_to_fit();
        }
        item
    })
}

/// A directory to list: `name` in `parent`, or `parent` itself when `name`
/// is `None`. It is opened only when listed, so open fds stay bounded by
/// the walkers' depth rather than the number of directories found.
struct Pending {
    path: Vec<u8>,
    parent: Arc<OwnedFd>,
    name: Option<Vec<u8>>,
}

/// Directories waiting to be listed, shared by the walkers. Empty with no
/// walker busy means the walk is over.
struct DirQueue {
    state: Mutex<(Vec<Pending>, usize, bool)>,
    wake: Condvar,
}

impl DirQueue {
    fn new(items: Vec<Pending>) -> DirQueue {
        DirQueue { state: Mutex::new((items, 0, false)), wake: Condvar::new() }
    }

    /// Takes a directory, waiting while others may still add some.
    fn pop(&self) -> Option<Pending> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let (items, busy, failed) = &mut *g;
            if *failed {
                return None;
            }
            if let Some(item) = items.pop() {
                *busy += 1;
                return Some(item);
            }
            if *busy == 0 {
                return None;
            }
            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Ends the work on one directory, adding the ones found in it.
    fn done(&self, found: Vec<Pending>) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.0.extend(found);
        g.1 -= 1;
        self.wake.notify_all();
    }

    /// Stops every walker.
    fn fail(&self) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.2 = true;
        self.wake.notify_all();
    }
}

struct Walker<'a> {
    opts: &'a Options<'a>,
    current: &'a Manifest,
    /// Current paths met by the walk; the others are gone.
    seen: HashSet<&'a [u8], foldhash::quality::RandomState>,
    tx: Option<SyncSender<Job>>,
    outcomes: Vec<Outcome>,
    stats: Stats,
}

impl<'a> Walker<'a> {
    /// Visits `roots` (disjoint, sorted paths); returns the directories to
    /// list. Neighbouring roots in one directory share its open fd.
    fn start(&mut self, roots: &[Vec<u8>]) -> Result<Vec<Pending>> {
        let mut pending = Vec::new();
        let mut open: Option<(&[u8], Arc<OwnedFd>)> = None;
        for prefix in roots {
            if prefix.is_empty() {
                let root = sys::open_beneath(self.opts.root, b"").ctx(|| "opening the sandbox root".into())?;
                pending.push(Pending { path: Vec::new(), parent: Arc::new(root), name: None });
                continue;
            }
            if self.opts.excludes.covers(prefix) || prefix.starts_with(TEMP_PREFIX) {
                continue;
            }
            let (parent, name) = sys::split_parent(prefix);
            let parent_fd = match &open {
                Some((path, fd)) if *path == parent => fd.clone(),
                _ => match sys::open_beneath(self.opts.root, parent) {
                    Ok(fd) => {
                        let fd = Arc::new(fd);
                        open = Some((parent, fd.clone()));
                        fd
                    }
                    Err(e) if gone(&e) => continue, // the subtree is gone
                    Err(e) => return Err(e).ctx(|| format!("opening {}", show(parent))),
                },
            };
            let name = name.to_vec();
            if self.visit(prefix.clone(), &parent_fd, name.clone())? {
                pending.push(Pending { path: prefix.clone(), parent: parent_fd, name: Some(name) });
            }
        }
        Ok(pending)
    }

    /// Lists directories from the shared queue until it is empty.
    fn walk(&mut self, queue: &DirQueue) -> Result<()> {
        while let Some(item) = queue.pop() {
            let result = self.list(item);
            match result {
                Ok(found) => queue.done(found),
                Err(e) => {
                    queue.fail();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Lists one directory and visits its entries; returns its
    /// subdirectories.
    fn list(&mut self, item: Pending) -> Result<Vec<Pending>> {
        let Pending { path, parent, name } = item;
        let dir = match name {
            None => parent,
            Some(name) => match sys::openat(parent.as_fd(), &name, sys::DIR_FLAGS, 0) {
                Ok(fd) => Arc::new(fd),
                Err(e) if gone(&e) => return Ok(Vec::new()), // what was below it is gone
                Err(e) => return Err(e).ctx(|| format!("opening {}", show(&path))),
            },
        };
        let entries = match sys::read_dir(dir.as_fd()) {
            Ok(entries) => entries,
            // Removed between the open and the listing (getdents of a
            // removed directory fails with ENOENT): as gone as above.
            Err(e) if gone(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx(|| format!("listing {}", show(&path))),
        };
        let mut found = Vec::new();
        for e in entries {
            if e.name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let child = join(&path, &e.name);
            if self.opts.excludes.is_excluded(&child, &e.name) {
                continue;
            }
            if self.visit(child.clone(), &dir, e.name.clone())? {
                found.push(Pending { path: child, parent: dir.clone(), name: Some(e.name) });
            }
        }
        Ok(found)
    }

    /// Compares one path; returns whether it is a directory to descend into.
    fn visit(&mut self, path: Vec<u8>, dir: &Arc<OwnedFd>, name: Vec<u8>) -> Result<bool> {
        self.stats.scanned += 1;
        if let Some(p) = self.opts.progress {
            p.tick(1);
        }
        let st = match sys::lstatat(dir.as_fd(), &name) {
            Ok(st) => st,
            Err(e) if gone(&e) => return Ok(false), // vanished: its row ends
            Err(e) => return Err(e).ctx(|| format!("reading {}", show(&path))),
        };
        let live = Live::from_stat(&st, self.opts.racy_after_ns);
        let known = self.current.get_key_value(path.as_slice());
        if let Some((key, _)) = known {
            self.seen.insert(key);
        }
        let unchanged = known.is_some_and(|(_, p)| live.matches(p));
        let prior = if unchanged { None } else { known.map(|(_, p)| p.clone()) };
        match live.meta.kind {
            Kind::File => {
                if !unchanged {
                    let job = Job { path, dir: dir.clone(), name, prior };
                    match &self.tx {
                        Some(tx) => tx.send(job).map_err(|_| Error::Internal("capture workers stopped".into()))?,
                        None => {
                            if let Some(o) = read_file(job, self.opts, &mut self.stats)? {
                                self.outcomes.push(o);
                            }
                        }
                    }
                }
                Ok(false)
            }
            Kind::Dir => {
                if !unchanged {
                    self.record(path, live.to_meta(None, None), live.key, prior);
                }
                Ok(true)
            }
            Kind::Symlink => {
                if !unchanged {
                    let target = match sys::readlinkat(dir.as_fd(), &name) {
                        Ok(t) => t,
                        Err(e) if gone(&e) => {
                            if let Some(p) = prior {
                                self.outcomes.push(Outcome::Gone(path, p));
                            }
                            return Ok(false);
                        }
                        Err(e) => return Err(e).ctx(|| format!("reading the link {}", show(&path))),
                    };
                    self.stats.read += 1;
                    self.record(path, live.to_meta(Some(target.into_boxed_slice()), None), live.key, prior);
                }
                Ok(false)
            }
            Kind::Special => {
                if !unchanged {
                    self.record(path, live.to_meta(None, None), live.key, prior);
                }
                Ok(false)
            }
        }
    }

    fn record(&mut self, path: Vec<u8>, meta: Meta, key: StatKey, prior: Option<Row>) {
        self.outcomes.push(outcome(path, meta, key, prior));
    }
}

fn outcome(path: Vec<u8>, meta: Meta, key: StatKey, prior: Option<Row>) -> Outcome {
    match prior {
        // A version's inode number names its links (see `crate::links`):
        // a multi-link path on another inode is a new version, so that the
        // states before keep theirs.
        // Its link count is the highest it had: a past state's names of
        // one file stay findable by inode when the others are gone.
        Some(p) if p.meta == meta && (p.key.ino == key.ino || (p.key.nlink < 2 && key.nlink < 2)) => {
            let nlink = if p.key.ino == key.ino { key.nlink.max(p.key.nlink) } else { key.nlink };
            Outcome::Rekey(path, p.id, StatKey { nlink, ..key })
        }
        prior => Outcome::Version(NewRow { path, meta, key }, prior.map(Box::new)),
    }
}

fn work(
    rx: &Mutex<Receiver<Job>>,
    opts: &Options<'_>,
    outcomes: &Mutex<Vec<Outcome>>,
    failure: &Mutex<Option<Error>>,
) -> Stats {
    let mut stats = Stats::default();
    // Handed over a batch at a time: a reader's whole share of a first
    // scan, gathered apart and then moved over, was a second copy of half
    // of its outcomes at the scan's end (about 60 MiB at a million files).
    // Empty at first: most captures read a few files.
    let mut local = Vec::new();
    let hand_over = |local: &mut Vec<Outcome>| {
        if let Ok(mut all) = outcomes.lock() {
            all.append(local);
        }
    };
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => break,
        };
        let Ok(job) = job else { break };
        if failure.lock().is_ok_and(|f| f.is_some()) {
            continue; // drain without working: the capture has failed
        }
        match read_file(job, opts, &mut stats) {
            Ok(Some(o)) => {
                local.push(o);
                if local.len() == OUTCOME_BATCH {
                    hand_over(&mut local);
                }
            }
            Ok(None) => {}
            Err(e) => {
                if let Ok(mut f) = failure.lock() {
                    f.get_or_insert(e);
                }
            }
        }
    }
    hand_over(&mut local);
    stats
}

/// How many outcomes a reader gathers before handing them over.
const OUTCOME_BATCH: usize = 1024;

fn read_file(job: Job, opts: &Options<'_>, stats: &mut Stats) -> Result<Option<Outcome>> {
    let Job { path, dir, name, prior } = job;
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
    let fd = match sys::openat(dir.as_fd(), &name, flags, 0) {
        Ok(fd) => fd,
        Err(e) if gone(&e) => return Ok(prior.map(|p| Outcome::Gone(path, p))),
        Err(e) => return Err(e).ctx(|| format!("opening {}", show(&path))),
    };
    let st = sys::fstat(fd.as_fd()).ctx(|| format!("reading {}", show(&path)))?;
    if Kind::of_mode(st.st_mode) != Kind::File {
        // Swapped for something else since the lstat: keep the old version
        // and have the next scan look again.
        return Ok(prior.map(|p| Outcome::Rekey(path, p.id, StatKey { racy: true, ..p.key })));
    }
    stats.read += 1;
    let (hash, st, unstable) = match opts.store {
        Some(store) => {
            let storing = || format!("storing {}", show(&path));
            // A file with other names is read: its names must hold one
            // object (see `crate::links`), and each is stored on its own.
            let unhashed = match opts.unhashed && prior.is_none() && st.st_nlink < 2 {
                true => store.put_unhashed(fd.as_fd(), st).ctx(storing)?,
                false => None,
            };
            let put = match unhashed {
                Some(put) => {
                    stats.unhashed += 1;
                    put
                }
                None => store
                    .put(fd.as_fd(), st, opts.reflink, (opts.pack, opts.seek_moved && prior.is_none()))
                    .ctx(storing)?,
            };
            stats.reflinked += put.reflinked as u64;
            stats.copied += put.copied as u64;
            (put.hash, put.stat, put.unstable)
        }
        None => {
            let hash = hash_fd(fd.as_fd(), st.st_size as u64).ctx(|| format!("reading {}", show(&path)))?;
            let after = sys::fstat(fd.as_fd()).ctx(|| format!("reading {}", show(&path)))?;
            let moved = sys::ctime_ns(&after) != sys::ctime_ns(&st) || after.st_size != st.st_size;
            (hash, st, moved)
        }
    };
    let mut live = Live::from_stat(&st, opts.racy_after_ns);
    live.key.racy |= unstable;
    Ok(Some(outcome(path, live.to_meta(None, Some(hash)), live.key, prior)))
}

/// Whether an error means the path is no longer there (or is no longer a
/// directory on the way to it).
fn gone(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP))
}

/// Returns a printable form of a relative path.
/// Of `paths` (sorted, each recorded in `current`), the ones whose live
/// stat no longer proves them unchanged (see [`Live::matches`]), or that
/// are gone: a quick pass for the files with other names, which are
/// checked at every checkpoint. Each directory is opened once and each
/// name `lstat`-ed in it, on all the capture threads.
pub fn moved_among(root: BorrowedFd<'_>, current: &Manifest, paths: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let check = |run: &[Vec<u8>]| {
        let mut moved = Vec::new();
        let mut dir: Option<(&[u8], Option<OwnedFd>)> = None;
        for path in run {
            let (parent, name) = sys::split_parent(path);
            if dir.as_ref().is_none_or(|(at, _)| *at != parent) {
                dir = Some((parent, sys::open_beneath(root, parent).ok()));
            }
            let same = match (&dir, current.get(path.as_slice())) {
                (Some((_, Some(fd))), Some(row)) => {
                    // The racy instant only marks new keys; a match needs the row's.
                    sys::lstatat(fd.as_fd(), name).is_ok_and(|st| Live::from_stat(&st, i64::MAX).matches(row))
                }
                _ => false,
            };
            if !same {
                moved.push(path.clone());
            }
        }
        moved
    };
    if paths.len() < 2048 {
        return check(paths);
    }
    let per = paths.len().div_ceil(threads());
    std::thread::scope(|s| {
        let runs: Vec<_> = paths.chunks(per).map(|run| s.spawn(move || check(run))).collect();
        // A thread that failed to report leaves its paths to the capture.
        runs.into_iter().zip(paths.chunks(per)).flat_map(|(h, run)| h.join().unwrap_or_else(|_| run.to_vec())).collect()
    })
}

pub fn show(path: &[u8]) -> String {
    if path.is_empty() {
        return "the sandbox root".into();
    }
    snapback::proto::WirePath(path.to_vec()).display()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_names_anywhere_and_paths_from_the_root() {
        let ex = Excludes::new(&["*.o".into(), "node_modules".into(), "build/out".into()]).unwrap();
        assert!(ex.is_excluded(b"a/b/x.o", b"x.o"));
        assert!(ex.is_excluded(b"web/node_modules", b"node_modules"));
        assert!(ex.is_excluded(b"build/out", b"out"));
        assert!(!ex.is_excluded(b"src/build/out", b"out"));
        assert!(!ex.is_excluded(b"x.c", b"x.c"));
        assert!(ex.covers(b"web/node_modules/react/index.js"));
        assert!(!ex.covers(b"web/src/index.js"));
        assert!(Excludes::new(&["[".into()]).is_err());
    }

    #[test]
    fn a_capture_that_gives_way_drops_its_objects_and_keeps_its_counts() {
        use crate::manifest::ObjectId;
        let file = |path: &str, object: u8| NewRow {
            path: path.as_bytes().to_vec(),
            meta: Meta {
                kind: Kind::File,
                mode: 0o644,
                uid: 0,
                gid: 0,
                size: 1,
                mtime_ns: 0,
                target: None,
                object: Some(ObjectId([object; 32])),
            },
            key: StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 },
        };
        let stats = Stats { scanned: 2, read: 2, reflinked: 0, unhashed: 0, copied: 2 };
        let earlier = Captured {
            added: vec![file("a", 1), file("b", 2)],
            dropped: vec![ObjectId([3; 32])],
            stats,
            ..Captured::default()
        };
        let fresh = Captured { added: vec![file("a", 4)], stats, ..Captured::default() };
        let kept = earlier.replaced_by(fresh);
        assert_eq!(kept.added.len(), 1);
        assert_eq!(kept.added[0].meta.object, Some(ObjectId([4; 32])));
        let mut dropped: Vec<u8> = kept.dropped.iter().map(|o| o.0[0]).collect();
        dropped.sort();
        assert_eq!(dropped, [1, 2, 3]);
        assert_eq!(kept.stats.scanned, 4);
    }

    #[test]
    fn moving_a_capture_in_gives_one_manifest_whether_it_inserts_or_builds() {
        let file = |path: String, size: u64| NewRow {
            path: path.into_bytes(),
            meta: Meta { kind: Kind::File, mode: 0o644, uid: 0, gid: 0, size, mtime_ns: 0, target: None, object: None },
            key: StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 },
        };
        let row = |a: NewRow| (a.path.into(), Row { id: 0, meta: a.meta, key: a.key });
        let current: Manifest = (0..1000).map(|i| row(file(format!("old/{i:04}"), 1))).collect();
        let run = |changes: usize| {
            let mut current = current.clone();
            // Each change replaces a version, ends one, or adds a path.
            let mut captured = Captured::default();
            for i in 0..changes {
                let old = format!("old/{:04}", i % 1000);
                match i % 3 {
                    0 => captured.added.push(file(old, 2)),
                    1 => {
                        let version = current[old.as_bytes()].clone();
                        captured.ended.push((old.into_bytes(), version));
                    }
                    _ => captured.added.push(file(format!("new/{i:05}"), 3)),
                }
            }
            let ids: Vec<i64> = (1..=captured.added.len() as i64).collect();
            let mut expected = current.clone();
            captured.apply_to(&mut expected, Some(&ids));
            let inserted = captured.move_into(&mut current, &ids);
            let sizes = |m: &Manifest| m.iter().map(|(p, r)| (p.clone(), r.id, r.meta.size)).collect::<Vec<_>>();
            assert_eq!(sizes(&current), sizes(&expected), "{changes} changes");
            inserted
        };
        // A few changes go into the manifest one at a time; many, more
        // than a quarter of it, build it anew.
        assert_eq!(run(90), 60);
        assert_eq!(run(2999), 0);
    }

    #[test]
    fn freeing_a_vector_gives_its_items_in_order() {
        let v: Vec<usize> = (0..10_000).collect();
        assert_eq!(freeing(v.clone()).collect::<Vec<_>>(), v);
    }

    #[test]
    fn a_scope_is_disjoint_prefixes_whatever_sorts_between_a_path_and_what_is_below_it() {
        let paths = ["d/x", "d.txt", "d", "d (1)/y", "d/x/y", "e", "d (1)"];
        let scope = Scope::Paths(paths.iter().map(|p| p.as_bytes().to_vec()).collect());
        assert_eq!(scope.prefixes(), [&b"d"[..], b"d (1)", b"d.txt", b"e"]);
    }

    #[test]
    fn listing_a_directory_removed_after_its_open_reads_as_gone() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let fd = OwnedFd::from(std::fs::File::open(&sub).unwrap());
        std::fs::remove_dir(&sub).unwrap();
        match sys::read_dir(fd.as_fd()) {
            Ok(entries) => panic!("listed {} entries of a removed directory", entries.len()),
            Err(e) => assert!(gone(&e), "{e}"),
        }
    }

    #[test]
    fn scope_prefixes_drop_nested_paths() {
        let s = Scope::Paths(vec![b"a/b".to_vec(), b"a".to_vec(), b"ab".to_vec()]);
        assert_eq!(s.prefixes(), vec![b"a".to_vec(), b"ab".to_vec()]);
        assert_eq!(Scope::Everything.prefixes(), vec![Vec::<u8>::new()]);
    }
}
