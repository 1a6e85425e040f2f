//! The watcher marks paths dirty so that a checkpoint compares only what
//! changed: with fanotify when the daemon runs as root (one mark per
//! filesystem, see [`crate::fanotify`]: no watch per directory, so no
//! watch limit), else with inotify through the `notify` crate (a watch per
//! directory).
//!
//! The dirty set is a hint, never the truth. Each dirty path is still
//! `lstat`-ed and compared with its recorded version; and anything that
//! could have lost an event — a full channel, a kernel queue overflow
//! (`need_rescan`), a watch-limit error, a watcher failure, a daemon
//! restart, a watch not yet set up — turns the next checkpoint into a full
//! comparison, as a value ([`Drain::Everything`]) and not a log line.
//!
//! Barrier: before reading the dirty set, a checkpoint creates a cookie file
//! in a private directory watched by the same inotify instance (or
//! fanotify group) and waits for its event. Events of one instance arrive
//! in order, so every change made before the request has been seen. There
//! are no sleeps.
//!
//! The `notify` callback never blocks: it `try_send`s into a bounded
//! channel; a full channel marks the sandbox for a full scan. fanotify
//! events are read by a thread of the watch's own, which resolves each
//! directory handle to a path before it takes the watch's lock; one it
//! cannot resolve marks the sandbox for a full scan.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, EventKindMask};
use notify::{Config, Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};

use crate::capture::{Excludes, TEMP_PREFIX};
use crate::config::Watcher;
use crate::fanotify::{self, Place};

/// Events buffered between the callback and the consumer thread.
const CHANNEL: usize = 16 * 1024;
/// Events the consumer notes under one lock, at most.
const BATCH: usize = 1024;
/// Beyond this many dirty paths, a full scan is cheaper to keep track of.
const MAX_DIRTY: usize = 200_000;
/// How long a checkpoint waits for its cookie before scanning everything.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

/// What the next checkpoint must compare.
#[derive(Debug, Clone, PartialEq)]
pub enum Drain {
    /// The whole tree, and why.
    Everything(String),
    /// Only these paths (and below the directories among them).
    Paths {
        paths: Vec<Vec<u8>>,
        /// The ones a file was written through, or had its mode or times
        /// changed through (not only named, renamed or removed).
        touched: Vec<Touched>,
        /// Names a file was changed through that it no longer has: removed,
        /// moved out of the sandbox, or replaced by a rename over them (a
        /// rename within the sandbox carries the mark to the new name).
        unnamed: Vec<Touched>,
    },
}

/// A name a file was changed through, and which files: each one's handle
/// where the watcher has it (fanotify), `None` where it has not (inotify).
///
/// A file changes under all its names, but the event comes for one. A name
/// the checkpoint reads shows the file's link count, and its other names
/// are read too; a name gone before it is read may have been a link, made
/// since the last checkpoint, to a file still here under a name that got
/// no event. The handles tell whether the file lives on, and as what;
/// without them the checkpoint must compare everything.
#[derive(Debug, Clone, PartialEq)]
pub struct Touched {
    /// Empty for a name in a directory removed before its event was read.
    pub path: Vec<u8>,
    pub files: Files,
}

/// The files changed through one name (see [`Touched`]).
pub type Files = Option<Vec<fanotify::Handle>>;

/// Adds `more` to `files`: not knowing one makes them all unknown.
fn merge(files: &mut Files, more: Files) {
    match (files.as_mut(), more) {
        (Some(known), Some(more)) => {
            for h in more {
                if !known.contains(&h) {
                    known.push(h);
                }
            }
        }
        _ => *files = None,
    }
}

/// Marks `path`: the files in `files` were changed through it.
fn mark(marks: &mut BTreeMap<Vec<u8>, Files>, path: Vec<u8>, files: Files) {
    match marks.get_mut(&path) {
        Some(known) => merge(known, files),
        None => {
            marks.insert(path, files);
        }
    }
}

/// Takes the marks of `from`, and of the names below it, out of `marks`:
/// each with the rest of its path below `from` (empty: `from` itself).
fn take_below(marks: &mut BTreeMap<Vec<u8>, Files>, from: &[u8]) -> Vec<(Vec<u8>, Files)> {
    if from.is_empty() {
        return std::mem::take(marks).into_iter().collect();
    }
    let dir = [from, b"/"].concat();
    let below: Vec<Vec<u8>> =
        marks.range(dir.clone()..).take_while(|(p, _)| p.starts_with(&dir)).map(|(p, _)| p.clone()).collect();
    let mut taken: Vec<(Vec<u8>, Files)> = marks.remove(from).map(|f| (Vec::new(), f)).into_iter().collect();
    for path in below {
        let files = marks.remove(&path).unwrap_or(None);
        taken.push((path[dir.len()..].to_vec(), files));
    }
    taken
}

/// Puts marks [`take_below`] took at `to`.
fn put_below(marks: &mut BTreeMap<Vec<u8>, Files>, to: &[u8], taken: Vec<(Vec<u8>, Files)>) {
    for (rest, files) in taken {
        mark(marks, join(to.to_vec(), &rest), files);
    }
}

/// A sandbox's watch state, as `status` shows it.
#[derive(Debug, Clone)]
pub struct Report {
    /// `watching`, `starting`, `needs full scan: WHY` or `degraded: WHY`.
    pub state: String,
    pub dirty: u64,
    /// The recursive watch is in place and working.
    pub watching: bool,
    /// `fanotify` or `inotify`.
    pub watcher: &'static str,
}

#[derive(Default)]
struct State {
    dirty: HashSet<Vec<u8>>,
    /// The dirty paths a file was changed through, and the ones it was
    /// changed through that it no longer has (see [`Drain::Paths`]);
    /// ordered, to find the ones below a renamed directory.
    touched: BTreeMap<Vec<u8>, Files>,
    unnamed: BTreeMap<Vec<u8>, Files>,
    /// The touched names a checkpoint under way has drained: one removed
    /// before a round read it, with its event after that round's barrier,
    /// is still a name lost. Cleared when the checkpoint is done with them
    /// ([`SandboxWatch::settled`]).
    settling: BTreeMap<Vec<u8>, Files>,
    /// Why the next checkpoint must compare everything.
    full: Option<String>,
    /// A lasting problem (watch limit): every checkpoint scans everything.
    degraded: Option<String>,
    /// The recursive watch is in place.
    ready: bool,
    cookies_seen: u64,
    /// When the last sandbox event arrived, for auto checkpoints.
    last_event: Option<Instant>,
    /// Watched with fanotify (else inotify).
    fanotify: bool,
}

/// Why a checkpoint compares everything while the watch is being set up.
const SETTING_UP: &str = "the watch is being set up";

/// The watch of one sandbox.
pub struct SandboxWatch {
    root: PathBuf,
    cookies: PathBuf,
    excludes: Excludes,
    state: Mutex<State>,
    wake: Condvar,
    overflow: Arc<AtomicBool>,
    next_cookie: AtomicU64,
    /// The inotify watcher; a fanotify group belongs to its reading thread,
    /// which ends once `stopped` is set.
    watcher: Mutex<Option<RecommendedWatcher>>,
    stopped: AtomicBool,
    /// A barrier timed out: events stopped arriving, so this watch should
    /// be replaced.
    stalled: AtomicBool,
    /// The daemon's own directories (its state, its stores), whose events
    /// a fanotify watch has the kernel drop (see
    /// [`fanotify::Group::ignore_directory`]).
    ignored: Vec<PathBuf>,
    /// Events the kernel delivered (fanotify): the watch's load.
    events: AtomicU64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SandboxWatch {
    /// Starts watching `root` (recursively, symlinks not followed) and a
    /// private cookie directory, with `watcher`; returns at once, the
    /// recursive watch is set up on a background thread. Until it is in
    /// place, checkpoints scan everything. `ignored`: the daemon's own
    /// directories, outside every sandbox, whose events fanotify need not
    /// deliver.
    pub fn start(
        root: &Path,
        cookies: &Path,
        excludes: Excludes,
        watcher: Watcher,
        ignored: Vec<PathBuf>,
    ) -> std::io::Result<Arc<SandboxWatch>> {
        let _ = std::fs::remove_dir_all(cookies);
        std::fs::create_dir_all(cookies)?;
        let watch = Arc::new(SandboxWatch {
            root: root.to_owned(),
            cookies: cookies.to_owned(),
            excludes,
            state: Mutex::new(State { full: Some(SETTING_UP.into()), ..State::default() }),
            wake: Condvar::new(),
            overflow: Arc::new(AtomicBool::new(false)),
            next_cookie: AtomicU64::new(1),
            watcher: Mutex::new(None),
            stopped: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            ignored,
            events: AtomicU64::new(0),
        });
        let fanotify = match watcher {
            Watcher::Inotify => Err(None),
            Watcher::Fanotify | Watcher::Auto => watch.start_fanotify().map_err(Some),
        };
        if let Err(refused) = fanotify {
            // Said when it was asked for, or expected (root); a user daemon
            // on `auto` just watches with inotify.
            if let Some(e) = refused.filter(|_| watcher == Watcher::Fanotify || crate::sys::euid() == 0) {
                tracing::warn!(root = %root.display(), "fanotify cannot watch: {e}; watching with inotify");
            }
            let (tx, rx) = sync_channel::<notify::Result<Event>>(CHANNEL);
            let consumer = watch.clone();
            std::thread::Builder::new().name("snapback-events".into()).spawn(move || consumer.consume(rx))?;
            let setup = watch.clone();
            std::thread::Builder::new().name("snapback-watch".into()).spawn(move || setup.set_up(tx))?;
        }
        Ok(watch)
    }

    /// Watches with fanotify: marks the root's filesystem and the cookie
    /// directory, and starts the thread that reads the events. The watch is
    /// in place when this returns.
    fn start_fanotify(self: &Arc<Self>) -> std::io::Result<()> {
        let group = fanotify::Group::new()?;
        let open_dir = |p: &Path| {
            std::fs::File::open(p).and_then(|f| {
                if f.metadata()?.is_dir() { Ok(f) } else { Err(std::io::Error::from_raw_os_error(libc::ENOTDIR)) }
            })
        };
        let (root, cookies) = (open_dir(&self.root)?, open_dir(&self.cookies)?);
        let cookie_dir = fanotify::handle_of(std::os::fd::AsFd::as_fd(&cookies))?;
        group.mark_directory(std::os::fd::AsFd::as_fd(&cookies))?;
        self.ignore_own(&group, root.metadata()?.dev());
        let paired = group.mark_filesystem(std::os::fd::AsFd::as_fd(&root))?;
        let paths = fanotify::Paths::new(root.into())?;
        let reader = self.clone();
        std::thread::Builder::new()
            .name("snapback-fanotify".into())
            .spawn(move || reader.consume_fanotify(group, paths, &cookie_dir, paired))?;
        let mut state = lock(&self.state);
        state.fanotify = true;
        self.now_ready(&mut state);
        Ok(())
    }

    /// Has `group` drop the events of the daemon's own directories on the
    /// filesystem `dev` (the root's; the others report nothing anyway).
    /// Each is opened with no symlink followed: a store's path whose
    /// parent was replaced by a link since cannot lead the mark elsewhere.
    /// Best effort: a kernel before 6.0, or a group out of marks, delivers
    /// them, and the reader finds them outside the sandbox.
    fn ignore_own(&self, group: &fanotify::Group, dev: u64) {
        for dir in &self.ignored {
            let Ok(fd) = crate::sys::open_dir_pinned(dir.as_os_str().as_bytes()) else { continue };
            if crate::sys::fstat(std::os::fd::AsFd::as_fd(&fd)).map(|st| st.st_dev).ok() != Some(dev) {
                continue;
            }
            if let Err(e) = group.ignore_directory(std::os::fd::AsFd::as_fd(&fd)) {
                tracing::debug!(root = %self.root.display(), "the daemon's own writes are reported too: {e}");
                return;
            }
        }
    }

    /// How many events the kernel delivered to a fanotify watch.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// The watch is in place: whatever happened before it is unknown.
    fn now_ready(&self, state: &mut State) {
        state.ready = true;
        // Said as it is, not as the set-up still under way.
        let since = "changes before the watch started are unknown; the next checkpoint compares everything";
        if state.full.as_deref().is_none_or(|why| why == SETTING_UP) {
            state.full = Some(since.into());
        }
        self.wake.notify_all();
    }

    /// Reads fanotify events until the watch stops: each directory handle
    /// is resolved to a path first, then what changed is noted under one
    /// lock, and waiters are woken once per read.
    /// `paired`: the kernel reports each rename as one event with both
    /// names (`FAN_RENAME`), which then says where a name went; without
    /// it, each half unnames its name.
    fn consume_fanotify(
        &self,
        mut group: fanotify::Group,
        mut paths: fanotify::Paths,
        cookie_dir: &fanotify::Handle,
        paired: bool,
    ) {
        while !self.stopped.load(Ordering::Relaxed) {
            let (events, overflow) = match group.read(Duration::from_millis(200)) {
                Ok(fanotify::Read::Nothing) => continue,
                Ok(fanotify::Read::Events(events)) => (events, false),
                Ok(fanotify::Read::Overflow(events)) => (events, true),
                Err(e) => {
                    lock(&self.state).degraded = Some(format!("the watcher failed: {e}"));
                    self.wake.notify_all();
                    return;
                }
            };
            self.events.fetch_add(events.len() as u64, Ordering::Relaxed);
            let mut cookie = 0;
            let mut changed = Vec::new();
            let mut unknown = None;
            const TOUCHES: u64 = libc::FAN_MODIFY | libc::FAN_ATTRIB | libc::FAN_CLOSE_WRITE;
            let unnames = match paired {
                true => libc::FAN_DELETE | libc::FAN_DELETE_SELF,
                false => {
                    libc::FAN_DELETE
                        | libc::FAN_DELETE_SELF
                        | libc::FAN_MOVED_FROM
                        | libc::FAN_MOVED_TO
                        | libc::FAN_MOVE_SELF
                }
            };
            let cannot = |e: std::io::Error| format!("the path of a changed directory cannot be had: {e}");
            for event in &events {
                paths.saw(event);
                if event.dir == *cookie_dir {
                    if event.mask & libc::FAN_CREATE != 0 {
                        cookie = cookie.max(cookie_number(&event.name).unwrap_or(0));
                    }
                    continue;
                }
                let touched = event.mask & TOUCHES != 0 && event.mask & libc::FAN_ONDIR == 0;
                let from = match paths.place(&event.dir) {
                    Ok(Place::Inside(dir)) => Some(join(dir, &event.name)),
                    Ok(Place::Outside) => None,
                    // Its entries went with it, which its parent's event
                    // says; but a file changed through one of them is a
                    // name lost, whose path cannot be had.
                    Ok(Place::Removed) => {
                        if touched && event.to.is_none() {
                            changed.push(Change::Orphan(event.file.clone()));
                        }
                        continue;
                    }
                    Err(e) => {
                        unknown = Some(cannot(e));
                        continue;
                    }
                };
                // Its halves (moved from, moved to) mark the names dirty;
                // this says where a name went.
                if let Some((to_dir, to_name)) = &event.to {
                    let to = match paths.place(to_dir) {
                        Ok(Place::Inside(dir)) => Some(join(dir, to_name)),
                        Ok(Place::Outside | Place::Removed) => None,
                        Err(e) => {
                            unknown = Some(cannot(e));
                            continue;
                        }
                    };
                    changed.push(Change::Renamed(from, to));
                    continue;
                }
                let Some(path) = from else { continue };
                if touched {
                    changed.push(Change::Touched(path.clone(), event.file.clone()));
                }
                if event.mask & unnames != 0 {
                    changed.push(Change::Unnamed(path.clone()));
                }
                changed.push(Change::Dirty(path));
            }
            let mut state = lock(&self.state);
            if overflow {
                state.full = Some("the kernel's event queue overflowed".into());
            }
            if let Some(why) = unknown {
                state.full = Some(why);
            }
            for change in changed {
                match change {
                    Change::Dirty(rel) => self.note_path(&mut state, rel),
                    Change::Touched(rel, file) => self.touched(&mut state, rel, file.map(|h| vec![h])),
                    Change::Unnamed(rel) => unname(&mut state, &rel),
                    Change::Renamed(from, to) => self.moved(&mut state, from, to),
                    Change::Orphan(file) => mark(&mut state.unnamed, Vec::new(), file.map(|h| vec![h])),
                }
            }
            state.cookies_seen = state.cookies_seen.max(cookie);
            self.limit_dirty(&mut state);
            drop(state);
            self.wake.notify_all();
        }
    }

    fn set_up(self: Arc<Self>, tx: SyncSender<notify::Result<Event>>) {
        let overflow = self.overflow.clone();
        let handler = move |event: notify::Result<Event>| {
            // Opens and reads are not asked for (see `kinds` below); any
            // such event that comes anyway is dropped here, before it can
            // wake the consumer.
            if event.as_ref().is_ok_and(changes_nothing) {
                return;
            }
            match tx.try_send(event) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                Err(TrySendError::Full(_)) => overflow.store(true, Ordering::Relaxed),
            }
        };
        // Everything that can change a path, and a close after writing (a
        // write through a shared mapping raises no other event); not opens
        // and reads, which change nothing: the kernel would queue one for
        // every file the daemon compares or restores, and for every file
        // an agent's tools read, and each would wake the event thread.
        let kinds = EventKindMask::CORE | EventKindMask::ACCESS_CLOSE;
        let config = Config::default().with_follow_symlinks(false).with_event_kinds(kinds);
        let result = RecommendedWatcher::new(handler, config).and_then(|mut w| {
            w.watch(&self.cookies, RecursiveMode::NonRecursive)?;
            w.watch(&self.root, RecursiveMode::Recursive)?;
            Ok(w)
        });
        let mut state = lock(&self.state);
        match result {
            Ok(_) if self.stopped.load(Ordering::Relaxed) => {} // dropped here
            Ok(w) => {
                *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
                self.now_ready(&mut state);
            }
            Err(e) => {
                let why = describe(&e);
                tracing::warn!(root = %self.root.display(), "cannot watch: {why}");
                state.degraded = Some(why);
            }
        }
        self.wake.notify_all();
    }

    /// Reads events until the watcher is dropped: whatever has arrived is
    /// noted under one lock, and waiters are woken once per batch.
    fn consume(&self, rx: Receiver<notify::Result<Event>>) {
        while let Ok(first) = rx.recv() {
            let mut state = lock(&self.state);
            if self.overflow.swap(false, Ordering::Relaxed) {
                state.full = Some("events came faster than they were read".into());
            }
            let batch = std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()).take(BATCH));
            for event in batch {
                match event {
                    Err(e) => {
                        let why = describe(&e);
                        if is_watch_limit(&e) {
                            state.degraded = Some(why);
                        } else {
                            state.full = Some(format!("the watcher failed: {why}"));
                        }
                    }
                    Ok(event) => self.note(&mut state, &event),
                }
            }
            self.limit_dirty(&mut state);
            drop(state);
            self.wake.notify_all();
        }
    }

    fn limit_dirty(&self, state: &mut State) {
        if state.dirty.len() > MAX_DIRTY {
            state.dirty.clear();
            state.touched.clear();
            state.unnamed.clear();
            state.settling.clear();
            state.full = Some(format!("more than {MAX_DIRTY} paths changed"));
        }
    }

    fn note(&self, state: &mut State, event: &Event) {
        if event.need_rescan() {
            state.full = Some("the kernel's event queue overflowed".into());
        }
        if changes_nothing(event) {
            return;
        }
        for path in &event.paths {
            if let Ok(rest) = path.strip_prefix(&self.cookies) {
                let n = cookie_number(rest.as_os_str().as_bytes());
                if let (Some(n), EventKind::Create(_)) = (n, event.kind) {
                    state.cookies_seen = state.cookies_seen.max(n);
                }
                continue;
            }
            let Ok(rel) = path.strip_prefix(&self.root) else { continue };
            tracing::trace!(kind = ?event.kind, path = %path.display(), "dirty");
            let rel = rel.as_os_str().as_bytes().to_vec();
            if touches(event) {
                self.touched(state, rel.clone(), None);
            }
            // The halves of a rename come first, then notify pairs them:
            // both names lose their file (the one moved, and the one a
            // rename over the second replaced), then the pair gives the
            // moved one back, at its new name.
            use notify::event::{ModifyKind, RenameMode};
            if matches!(
                event.kind,
                EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(
                        RenameMode::From | RenameMode::To | RenameMode::Any | RenameMode::Other
                    ))
            ) {
                unname(state, &rel);
            }
            self.note_path(state, rel);
        }
        if let (EventKind::Modify(notify::event::ModifyKind::Name(notify::event::RenameMode::Both)), [from, to]) =
            (event.kind, &event.paths[..])
            && let (Ok(from), Ok(to)) = (from.strip_prefix(&self.root), to.strip_prefix(&self.root))
        {
            let rel = |p: &Path| p.as_os_str().as_bytes().to_vec();
            let (from, to) = (rel(from), rel(to));
            if !self.ignored(&to) {
                let taken = take_below(&mut state.unnamed, &from);
                put_below(&mut state.touched, &to, taken);
            }
        }
    }

    /// A name moved (fanotify's `FAN_RENAME`), from and to a path in the
    /// sandbox or (`None`) not: the file that was at the new name loses
    /// it; the marks of files changed through the old name, and through the
    /// names below it, go to the new one (the file is read there, which
    /// shows its links), or, to a name that is not read (outside, or
    /// excluded), are unnamed.
    fn moved(&self, state: &mut State, from: Option<Vec<u8>>, to: Option<Vec<u8>>) {
        let to = to.filter(|to| !self.ignored(to));
        if let Some(to) = &to {
            unname(state, to);
        }
        let Some(from) = from else { return };
        match to {
            Some(to) => {
                let mut taken = take_below(&mut state.touched, &from);
                taken.extend(take_below(&mut state.settling, &from));
                put_below(&mut state.touched, &to, taken);
            }
            None => unname(state, &from),
        }
    }

    /// Notes that a file was changed through `rel` (`files`: which, where
    /// known), unless `rel` is not read.
    fn touched(&self, state: &mut State, rel: Vec<u8>, files: Files) {
        if !self.ignored(&rel) {
            mark(&mut state.touched, rel, files);
        }
    }

    /// Marks `rel` dirty, unless the daemon's own temporaries or the
    /// excludes cover it.
    fn note_path(&self, state: &mut State, rel: Vec<u8>) {
        if self.ignored(&rel) {
            return;
        }
        state.dirty.insert(rel);
        state.last_event = Some(Instant::now());
    }

    /// Whether `rel` is one of the daemon's own temporaries, or excluded.
    fn ignored(&self, rel: &[u8]) -> bool {
        let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
        name.starts_with(TEMP_PREFIX) || (!rel.is_empty() && self.excludes.covers(rel))
    }

    /// Waits until every event of a change made before this call has been
    /// read, then takes what the next checkpoint must compare.
    pub fn drain(&self) -> Drain {
        lock(&self.state).settling.clear();
        self.drain_again()
    }

    /// [`SandboxWatch::drain`], for the same checkpoint again (a round that
    /// reads what changed while the last one read).
    pub fn drain_again(&self) -> Drain {
        let barrier = self.barrier();
        let mut state = lock(&self.state);
        if self.overflow.swap(false, Ordering::Relaxed) {
            state.full = Some("events came faster than they were read".into());
        }
        if let Some(why) = &state.degraded {
            return Drain::Everything(format!("degraded: {why}"));
        }
        if let Err(why) = barrier {
            state.full.get_or_insert(why);
        }
        if !state.ready {
            return Drain::Everything(SETTING_UP.into());
        }
        // From here on, events land in a fresh set for the next checkpoint.
        let dirty = std::mem::take(&mut state.dirty);
        let touched = std::mem::take(&mut state.touched);
        let unnamed = std::mem::take(&mut state.unnamed);
        if let Some(why) = state.full.take() {
            return Drain::Everything(why);
        }
        let mut paths: Vec<Vec<u8>> = dirty.into_iter().collect();
        paths.sort();
        let marks = |m: BTreeMap<Vec<u8>, Files>| m.into_iter().map(|(path, files)| Touched { path, files }).collect();
        let touched: Vec<Touched> = marks(touched);
        for t in &touched {
            mark(&mut state.settling, t.path.clone(), t.files.clone());
        }
        Drain::Paths { paths, touched, unnamed: marks(unnamed) }
    }

    /// The checkpoint under way is done with the names it drained.
    pub fn settled(&self) {
        lock(&self.state).settling.clear();
    }

    /// Makes the next checkpoint compare everything (its scan failed, or a
    /// test asked for it).
    pub fn force_full(&self, why: String) {
        lock(&self.state).full = Some(why);
    }

    /// Creates a cookie and waits for its event.
    fn barrier(&self) -> Result<(), String> {
        if !lock(&self.state).ready {
            return Ok(());
        }
        let n = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let path = self.cookies.join(format!("cookie-{n}"));
        std::fs::File::create(&path).map_err(|e| format!("cannot create a cookie: {e}"))?;
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        let mut state = lock(&self.state);
        let result = loop {
            if state.cookies_seen >= n {
                break Ok(());
            }
            // Events were lost (perhaps the cookie's own): the next
            // checkpoint compares everything anyway, so waiting is useless.
            if state.full.is_some() || self.overflow.load(Ordering::Relaxed) {
                break Ok(());
            }
            if state.degraded.is_some() {
                break Err("the watcher stopped".to_string());
            }
            let now = Instant::now();
            if now >= deadline {
                self.stalled.store(true, Ordering::Relaxed);
                break Err("the event barrier timed out".to_string());
            }
            // The callback flags a full channel without waking anyone (it
            // must not block): look again every few milliseconds.
            let nap = (deadline - now).min(Duration::from_millis(5));
            state = self.wake.wait_timeout(state, nap).unwrap_or_else(|p| p.into_inner()).0;
        };
        drop(state);
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Whether a barrier timed out: the cookie's event never came, so the
    /// watch can no longer vouch for anything and should be replaced.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> Report {
        let state = lock(&self.state);
        let status = if let Some(why) = &state.degraded {
            format!("degraded: {why}")
        } else if !state.ready {
            "starting".into()
        } else if let Some(why) = &state.full {
            format!("needs full scan: {why}")
        } else {
            "watching".into()
        };
        Report {
            state: status,
            dirty: state.dirty.len() as u64,
            watching: state.ready && state.degraded.is_none(),
            watcher: if state.fanotify { "fanotify" } else { "inotify" },
        }
    }

    /// Returns whether changes have been seen and the tree has been quiet for
    /// `quiet` since the last of them.
    pub fn quiet_with_changes(&self, quiet: Duration) -> bool {
        let state = lock(&self.state);
        let changed = !state.dirty.is_empty() || state.full.is_some();
        changed && state.last_event.is_some_and(|t| t.elapsed() >= quiet)
    }
}

impl SandboxWatch {
    /// Stops watching: drops the inotify instance, which ends the consumer
    /// thread (a fanotify group's thread ends within its read timeout), and
    /// removes the cookie directory.
    pub fn stop(&self) {
        tracing::debug!(root = %self.root.display(), events = self.events(), "the watch stops");
        self.stopped.store(true, Ordering::Relaxed);
        let watcher = self.watcher.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(watcher);
        let _ = std::fs::remove_dir_all(&self.cookies);
    }
}

/// The number of a cookie file named `cookie-N`.
fn cookie_number(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name.strip_prefix(b"cookie-")?).ok()?.parse().ok()
}

/// The path of the entry `name` of the directory `dir` (the directory
/// itself when `name` is empty).
fn join(mut dir: Vec<u8>, name: &[u8]) -> Vec<u8> {
    if !name.is_empty() {
        if !dir.is_empty() {
            dir.push(b'/');
        }
        dir.extend_from_slice(name);
    }
    dir
}

/// What a fanotify event says, once its directory is a path.
enum Change {
    /// A path changed.
    Dirty(Vec<u8>),
    /// A file (this one, where known) was changed through a path.
    Touched(Vec<u8>, Option<fanotify::Handle>),
    /// A path lost the file it named.
    Unnamed(Vec<u8>),
    /// A name moved from the first path to the second (`None`: not in
    /// the sandbox).
    Renamed(Option<Vec<u8>>, Option<Vec<u8>>),
    /// A file (this one, where known) was changed in a directory removed
    /// since.
    Orphan(Option<fanotify::Handle>),
}

/// `rel`, and the names below it, lost the files they named: the marks of
/// files changed through them are unnamed.
fn unname(state: &mut State, rel: &[u8]) {
    let mut taken = take_below(&mut state.touched, rel);
    taken.extend(take_below(&mut state.settling, rel));
    put_below(&mut state.unnamed, rel, taken);
}

/// Whether `event` changed a file through its name (its content, mode or
/// times), rather than the name itself.
fn touches(event: &Event) -> bool {
    use notify::event::ModifyKind;
    matches!(
        event.kind,
        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_) | ModifyKind::Any | ModifyKind::Other)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// Opening and reading change nothing, and the daemon's own scans would
/// otherwise mark what they read. A close after writing counts: writes
/// through mmap report nothing else. An overflow always counts.
fn changes_nothing(event: &Event) -> bool {
    matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
        && !event.need_rescan()
}

fn is_watch_limit(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

/// Describes a watcher error, with help for the inotify watch limit.
fn describe(e: &notify::Error) -> String {
    if is_watch_limit(e) {
        "the inotify watch limit was reached; raise fs.inotify.max_user_watches \
         (sysctl -w fs.inotify.max_user_watches=1048576) and restart snapbackd"
            .into()
    } else {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The masks of this process's inotify watches, from /proc/self/fdinfo.
    fn watch_masks() -> Vec<u32> {
        let mut masks = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            // Another test may close its descriptors meanwhile.
            let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
            for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
                let hex = line.split_whitespace().find_map(|f| f.strip_prefix("mask:")).unwrap();
                masks.push(u32::from_str_radix(hex, 16).unwrap());
            }
        }
        masks
    }

    /// What a drain gives after a write to `path`.
    fn written(path: &[u8]) -> Drain {
        Drain::Paths {
            paths: vec![path.to_vec()],
            touched: vec![Touched { path: path.to_vec(), files: None }],
            unnamed: vec![],
        }
    }

    fn started(root: &Path, cookies: &Path) -> Arc<SandboxWatch> {
        let watch = SandboxWatch::start(root, cookies, Excludes::new(&[]).unwrap(), Watcher::Inotify, vec![]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !watch.report().watching {
            assert!(Instant::now() < deadline, "the watch was not set up: {}", watch.report().state);
            std::thread::sleep(Duration::from_millis(5));
        }
        // The first drain after set-up asks for a full comparison.
        assert!(matches!(watch.drain(), Drain::Everything(_)));
        watch
    }

    /// Whether fanotify can be used: as root. Else the test says why it
    /// skips, or fails under CI.
    fn fanotify_or_skip() -> bool {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "fanotify needs root, and CI must run this test");
        eprintln!("skipping: fanotify needs root");
        false
    }

    /// A tmpfs of its own, mounted at a fresh directory until dropped: a
    /// fanotify watch of it sees no other test's writes.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn new() -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let at = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: valid C strings; the result is checked.
            let r = unsafe { libc::mount(c"tmpfs".as_ptr(), at.as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
            assert_eq!(r, 0, "mounting a tmpfs: {}", std::io::Error::last_os_error());
            Tmpfs(dir)
        }

        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let at = std::ffi::CString::new(self.0.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(at.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn a_fanotify_watch_is_not_told_of_the_daemons_own_writes() {
        if !fanotify_or_skip() {
            return;
        }
        // Its own filesystem: the watch counts every event on it.
        let dir = Tmpfs::new();
        let (root, own) = (dir.path().join("sandbox"), dir.path().join("state"));
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(own.join("deeper")).unwrap();
        let (cookies, excludes) = (dir.path().join("cookies"), Excludes::new(&[]).unwrap());
        let watch = SandboxWatch::start(&root, &cookies, excludes, Watcher::Fanotify, vec![own.clone()]).unwrap();
        assert!(watch.report().watching, "{}", watch.report().state);
        assert!(matches!(watch.drain(), Drain::Everything(_)));
        let before = watch.events();
        for i in 0..300 {
            std::fs::write(own.join(format!("log-{i}")), b"the daemon's").unwrap();
        }
        std::fs::write(root.join("sub/f"), b"the agent's").unwrap();
        let Drain::Paths { paths, .. } = watch.drain() else { panic!("a full comparison") };
        assert_eq!(paths, [b"sub/f"]);
        let delivered = watch.events() - before;
        assert!(
            delivered < 100,
            "{delivered} events for 300 files written in an ignored directory and 1 in the sandbox"
        );
        // Only the directory's own entries are ignored.
        std::fs::write(own.join("deeper/g"), b"a file of a directory below").unwrap();
        assert_eq!(watch.drain(), Drain::Paths { paths: vec![], touched: vec![], unnamed: vec![] });
        assert!(watch.events() > before + delivered, "no event from below the ignored directory");
        watch.stop();
    }

    #[test]
    fn a_directory_to_ignore_reached_through_a_symlink_is_not_ignored() {
        if !fanotify_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sandbox");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        // A store's path whose last component was replaced by a link into
        // the sandbox.
        let store = dir.path().join("store");
        std::os::unix::fs::symlink(root.join("sub"), &store).unwrap();
        let (cookies, excludes) = (dir.path().join("cookies"), Excludes::new(&[]).unwrap());
        let watch = SandboxWatch::start(&root, &cookies, excludes, Watcher::Fanotify, vec![store]).unwrap();
        assert!(matches!(watch.drain(), Drain::Everything(_)));
        std::fs::write(root.join("sub/f"), b"the agent's").unwrap();
        let Drain::Paths { paths, .. } = watch.drain() else { panic!("a full comparison") };
        assert_eq!(paths, [b"sub/f"], "a write in the sandbox went unseen");
        watch.stop();
    }

    #[test]
    fn the_mark_of_a_write_follows_its_name_within_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sandbox");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let watch = started(&root, &dir.path().join("cookies"));
        std::fs::write(root.join("f"), "written").unwrap();
        std::fs::rename(root.join("f"), root.join("sub/g")).unwrap();
        std::fs::write(root.join("sub/h"), "written").unwrap();
        std::fs::rename(root.join("sub"), root.join("moved")).unwrap();
        // Out of the sandbox, removed, or replaced by a rename over it: the
        // name lost its file.
        std::fs::write(root.join("k"), "written").unwrap();
        std::fs::rename(root.join("k"), dir.path().join("k")).unwrap();
        std::fs::write(root.join("r"), "written").unwrap();
        std::fs::remove_file(root.join("r")).unwrap();
        std::fs::write(root.join("s"), "written").unwrap();
        std::os::unix::fs::symlink("anywhere", root.join("t")).unwrap();
        std::fs::rename(root.join("t"), root.join("s")).unwrap();
        // Named only: no mark.
        std::fs::create_dir(root.join("new")).unwrap();
        std::fs::rename(root.join("new"), root.join("newer")).unwrap();
        let Drain::Paths { paths, touched, unnamed } = watch.drain() else { panic!("a full comparison") };
        let names = |marks: &[Touched]| -> Vec<String> {
            assert!(marks.iter().all(|t| t.files.is_none()), "inotify knows no handles: {marks:?}");
            marks.iter().map(|t| String::from_utf8_lossy(&t.path).into_owned()).collect()
        };
        assert_eq!(names(&touched), ["moved/g", "moved/h"], "{paths:?}");
        assert_eq!(names(&unnamed), ["k", "r", "s"], "{paths:?}");
        watch.stop();
    }

    #[test]
    fn reads_are_not_watched_and_a_write_through_a_mapping_is() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sandbox");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let watch = started(&root, &dir.path().join("cookies"));

        // The kernel is asked for changes and closes after writing, never
        // for opens, reads or closes after reading (root, sub, cookies).
        let masks = watch_masks();
        assert!(masks.len() >= 3, "{masks:x?}");
        for mask in masks {
            assert_eq!(mask & (libc::IN_OPEN | libc::IN_ACCESS | libc::IN_CLOSE_NOWRITE), 0, "{mask:x}");
            assert_eq!(mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE), libc::IN_MODIFY | libc::IN_CLOSE_WRITE);
        }

        let file = root.join("sub/f");
        std::fs::write(&file, b"first").unwrap();
        assert_eq!(watch.drain(), written(b"sub/f"));
        assert_eq!(std::fs::read(&file).unwrap(), b"first");
        assert_eq!(
            watch.drain(),
            Drain::Paths { paths: vec![], touched: vec![], unnamed: vec![] },
            "a read marked the file"
        );

        // A write through a shared mapping raises no modify event; the close
        // of a descriptor opened for writing is what marks the file.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        // SAFETY: a fresh shared mapping of the file's 5 bytes, written
        // within them and unmapped before the file is closed.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                5,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            std::ptr::copy_nonoverlapping(b"FIRST".as_ptr(), at.cast::<u8>(), 5);
            assert_eq!(libc::munmap(at, 5), 0);
        }
        drop(f);
        assert_eq!(std::fs::read(&file).unwrap(), b"FIRST");
        assert_eq!(watch.drain(), written(b"sub/f"));
        watch.stop();
    }
}
