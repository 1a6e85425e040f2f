//! The engine: one method per request, each a blocking call that reads and
//! writes the catalogue and the sandboxes. The socket server runs these on
//! tokio's blocking pool.
//!
//! Operations that change a sandbox (checkpoint, rollback, remove) hold that
//! sandbox's lock; the catalogue is the only record of state, so nothing
//! that guards an operation lives in this struct.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use snapback::proto::{
    Change, ChangeKind, CheckpointInfo, CheckpointKind, CheckpointRequest, Checkpoints, CloneMethod, DiffReport,
    DiffRequest, ExportReport, ExportRequest, ListRequest, PROTOCOL, PathNote, PlanInfo, PlanRollbackRequest,
    PlanState, PruneReport, PruneRequest, Request, Response, RevertRequest, RollbackReport, RollbackRequest,
    SandboxAdd, SandboxInfo, SandboxPath, SandboxRemove, SandboxStatus, Sandboxes, StatusReport, UndoRequest,
    VerifyReport, WirePath,
};

use crate::access;
use crate::capture::{self, Captured, Excludes, Options, Scope};
use crate::catalogue::{self, Checkpoint, CheckpointWrite, Sandbox};
use crate::config::Retention;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Kind, Manifest, StatKey, is_within};
use crate::progress;
use crate::restore::{Plan, Step, selected};
use crate::retention::{self, Policy};
use crate::store::{Pack, Store};
use crate::sys::{self, Identity};
use crate::watcher::{Drain, SandboxWatch};

/// A file changed less than this long before a scan began is marked racy:
/// the next scan that meets it (its path marked dirty by an event, or a full
/// comparison) reads it again even if its stat looks the same (timestamps
/// are coarse). Without an event there is nothing to re-read: every change
/// after the barrier of a watched checkpoint marks its path dirty.
const RACY_WINDOW_NS: i64 = 20_000_000;

/// How many times a checkpoint reads again the paths that changed while it
/// read them, before it gives up with `busy` (see [`Engine::settle`]).
const SETTLE_ROUNDS: usize = 8;

pub use crate::access::Peer;

/// The paths of a sandbox's files with other names, as of the checkpoint
/// with this seq.
type SharedNames = (u64, Vec<Vec<u8>>);

fn may_use(peer: &Peer, sandbox: &Sandbox) -> bool {
    peer.is_root() || peer.uid == sandbox.owner_uid
}

pub struct Engine {
    state_dir: PathBuf,
    /// The state directory, held open: the catalogue is reached through it.
    _state_fd: OwnedFd,
    /// The catalogue's id, which each of its stores records.
    catalogue_id: String,
    db_path: PathBuf,
    default_store: PathBuf,
    socket: PathBuf,
    started: Instant,
    stores: Mutex<HashMap<Vec<u8>, Arc<Store>>>,
    /// Held while a store is opened for the first time.
    opening_store: Mutex<()>,
    /// Per sandbox, the paths of files with other names, as of a
    /// checkpoint's seq (see [`Engine::shared_names`]).
    shared: Mutex<HashMap<i64, SharedNames>>,
    /// Numbers each watch started, for its cookie directory.
    watch_generation: std::sync::atomic::AtomicU64,
    locks: Mutex<HashMap<i64, Arc<Mutex<()>>>>,
    /// Current manifests by sandbox, each valid only while the sandbox's
    /// head seq in the catalogue equals the seq it was read at. A cache, not
    /// a record: a miss reads the catalogue.
    manifests: Mutex<HashMap<i64, (u64, Manifest)>>,
    retention: Retention,
    /// Retention owed by checkpoints already answered (see
    /// [`Engine::settle_retention`]).
    owed: Mutex<Owed>,
    owed_changed: Condvar,
    /// Whether sandboxes are watched at all.
    watch: bool,
    /// Quiet periods after which a sandbox takes an `auto` checkpoint.
    auto: std::collections::BTreeMap<String, std::time::Duration>,
    /// Watches by sandbox: hints of what changed, never guards.
    watches: Mutex<HashMap<i64, Arc<SandboxWatch>>>,
    /// Idle catalogue connections, reused by requests.
    idle: Mutex<Vec<Connection>>,
    /// Copies the catalogue's write-ahead log back after writes.
    wal: crate::wal::WalCheckpointer,
    /// Exclude globs added to every sandbox registered.
    default_excludes: Vec<String>,
    /// When checkpoints and rollbacks are acknowledged.
    durability: crate::config::Durability,
}

/// Sandboxes whose retention is owed: a checkpoint answers before it prunes.
#[derive(Default)]
struct Owed {
    sandboxes: std::collections::BTreeSet<i64>,
    /// Sandboxes whose pruning failed: when the pruner tries again, and
    /// how many times in a row it failed.
    retry: std::collections::BTreeMap<i64, (Instant, u32)>,
    /// Sandboxes being pruned right now.
    running: usize,
    /// The pruner thread is asked to stop.
    stopped: bool,
}

/// How long the pruner waits before its `failures`-th retry of a sandbox:
/// 30 s, doubling to at most an hour. (With `SNAPBACK_TEST_HOOKS=1`,
/// `SNAPBACK_TEST_PRUNE_RETRY_MS` replaces the 30 s, for tests.)
fn retry_delay(failures: u32) -> Duration {
    let first = std::env::var("SNAPBACK_TEST_PRUNE_RETRY_MS")
        .ok()
        .filter(|_| test_hooks())
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    (first * 2u32.saturating_pow(failures.saturating_sub(1).min(16))).min(Duration::from_secs(3600))
}

/// Whether the daemon runs with `SNAPBACK_TEST_HOOKS=1`, which turns on
/// what only tests may use.
pub(crate) fn test_hooks() -> bool {
    std::env::var_os("SNAPBACK_TEST_HOOKS").is_some_and(|v| v == "1")
}

/// What a caller chooses about a new checkpoint.
#[derive(Default)]
struct NewCheckpoint {
    plan: Option<String>,
    reason: Option<String>,
    tool: Option<String>,
    phase: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    kind: CheckpointKind,
    pinned: bool,
}

/// Background work a request starts, begun only once its answer is sent
/// (see [`Engine::handle`]).
enum Later {
    /// Copy the write-ahead logs back (catalogue and pack indexes).
    CheckpointLogs,
    /// Wake the pruner for the retention owed.
    WakePruner,
    /// Read restored files in (see [`crate::restore::warm`]).
    Warm(OwnedFd, Vec<(Vec<u8>, u64)>),
}

thread_local! {
    /// The work deferred by the request running on this thread, if one
    /// is (see [`Engine::handle`]).
    static DEFERRED: std::cell::RefCell<Option<Vec<Later>>> = const { std::cell::RefCell::new(None) };
}

/// Work a request left for after its answer: run when dropped.
pub struct After {
    engine: Arc<Engine>,
    work: Vec<Later>,
}

impl Drop for After {
    fn drop(&mut self) {
        for later in self.work.drain(..) {
            self.engine.run_later(later);
        }
    }
}

/// Idle connections kept beyond this many are closed.
const MAX_IDLE_CONNECTIONS: usize = 8;

/// A catalogue connection that goes back to the engine's pool when
/// dropped, unless a transaction was left open on it. Dropping one that
/// wrote asks for a checkpoint of the write-ahead log (after the answer,
/// when a request is running: see [`Engine::handle`]).
struct Pooled<'a> {
    conn: Option<Connection>,
    /// The connection's change counter when it was handed out.
    changes: u64,
    engine: &'a Engine,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("a pooled connection is present until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("a pooled connection is present until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if conn.total_changes() != self.changes {
            self.engine.later(Later::CheckpointLogs);
        }
        if conn.is_autocommit() {
            let mut idle = lock(&self.engine.idle);
            if idle.len() < MAX_IDLE_CONNECTIONS {
                idle.push(conn);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Milliseconds since `t`, to a tenth, for the phase timings in the log.
fn ms_since(t: Instant) -> f64 {
    (t.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

fn now_ms() -> i64 {
    now_ns() / 1_000_000
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

fn bytes_of(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

fn path_of(b: &[u8]) -> &Path {
    Path::new(std::ffi::OsStr::from_bytes(b))
}

impl Engine {
    /// Opens the state directory (creating it, mode 0700), brings the
    /// catalogue up to date and collects objects left by checkpoints that
    /// never committed.
    pub fn open(config: &crate::Config) -> Result<Engine> {
        // Opened from `/` without following a symlink, like a sandbox root,
        // and held open: the catalogue is reached through the open
        // directory (see [`Store::open_in`] for why `/proc/self/fd`).
        let given = std::path::absolute(&config.state_dir)
            .ctx(|| format!("resolving the state directory {}", config.state_dir.display()))?;
        let state_b = clean_path("the state directory", given.as_os_str().as_bytes())?;
        let state_fd = sys::make_dir_pinned(&state_b, 0o700)
            .map_err(|e| Error::InvalidRequest(format!("cannot use the state directory {}: {e}", given.display())))?;
        let state_dir = path_of(&state_b).to_owned();
        let db_path = PathBuf::from(format!("/proc/self/fd/{}/catalogue.db", state_fd.as_raw_fd()));
        match sys::mkdirat(state_fd.as_fd(), b"store", 0o700) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).ctx(|| format!("creating the store in {}", state_dir.display()));
            }
            _ => {}
        }
        refuse_new_catalogue_beside_objects(&state_fd, &state_dir, &db_path)?;
        // The cookie directories of an earlier run's watches.
        let _ = std::fs::remove_dir_all(state_dir.join("cookies"));
        let conn = catalogue::open(&db_path)?;
        let catalogue_id = catalogue::catalogue_id(&conn)?;
        let wal = crate::wal::WalCheckpointer::start(catalogue::connect(&db_path)?, "the catalogue")
            .map_err(|e| Error::Internal(format!("starting the catalogue's log checkpointer: {e}")))?;
        let engine = Engine {
            default_store: state_dir.join("store"),
            state_dir,
            _state_fd: state_fd,
            catalogue_id,
            db_path,
            socket: config.socket.clone(),
            started: Instant::now(),
            stores: Mutex::new(HashMap::new()),
            opening_store: Mutex::new(()),
            shared: Mutex::new(HashMap::new()),
            watch_generation: std::sync::atomic::AtomicU64::new(0),
            locks: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            retention: config.retention.clone(),
            owed: Mutex::new(Owed::default()),
            owed_changed: Condvar::new(),
            auto: config.auto_checkpoints.clone(),
            watch: config.watch,
            default_excludes: config.default_excludes.clone(),
            durability: config.durability,
            watches: Mutex::new(HashMap::new()),
            idle: Mutex::new(Vec::new()),
            wal,
        };
        engine.store(&bytes_of(&engine.default_store))?;
        for store in catalogue::stores(&conn)? {
            match engine.collect_garbage(&conn, &store) {
                Ok((n, bytes)) if n > 0 => {
                    tracing::info!(store = %path_of(&store).display(), objects = n, bytes, "collected unreferenced objects")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(store = %path_of(&store).display(), "collecting garbage: {e}"),
            }
        }
        Ok(engine)
    }

    /// Registers a sandbox named in the configuration file, as the daemon's
    /// own user (so root registers it for the directory's owner). One that
    /// is registered already is left as it is; any other failure is logged
    /// and the daemon serves on.
    pub fn register_configured(&self, r: &crate::config::Registration) {
        let req = SandboxAdd {
            path: WirePath::from(r.path.as_path()),
            name: Some(r.name.clone()),
            excludes: r.excludes.clone(),
            store: r.store.as_deref().map(WirePath::from),
        };
        match self.sandbox_add(&Peer::daemon(), req) {
            Ok(info) => tracing::info!(name = %info.name, "registered from the configuration"),
            Err(Error::AlreadyExists(_)) => {}
            Err(e) => {
                tracing::warn!(name = %r.name, path = %r.path.display(), "not registered from the configuration: {e}")
            }
        }
    }

    /// Starts watching every active sandbox (in the background: this
    /// returns at once).
    pub fn start_watches(&self) -> Result<()> {
        let conn = self.db()?;
        for mut sandbox in catalogue::sandboxes(&conn)? {
            self.recheck_root(&conn, &mut sandbox);
            if sandbox.state == "active" && sandbox.moved.is_none() {
                self.watch_sandbox(&sandbox);
            }
        }
        Ok(())
    }

    /// Returns whether any sandbox has auto checkpoints configured.
    pub fn has_auto_checkpoints(&self) -> bool {
        !self.auto.is_empty()
    }

    /// Takes an `auto` checkpoint of each sandbox configured for them whose
    /// tree changed and has then been quiet for its period. A sandbox busy
    /// with another operation is left for the next tick.
    pub fn auto_checkpoints(&self) {
        let Ok(mut conn) = self.db() else { return };
        for (name, quiet) in &self.auto {
            let Ok(sandbox) = catalogue::sandbox_by_ref(&conn, name) else { continue };
            let Some(watch) = self.watch_of(sandbox.id) else { continue };
            if sandbox.state != "active" || !watch.quiet_with_changes(*quiet) {
                continue;
            }
            let guard = self.sandbox_lock(sandbox.id);
            let Ok(_held) = guard.try_lock() else { continue };
            let new = NewCheckpoint {
                kind: CheckpointKind::Auto,
                reason: Some(format!("quiet for {} ms after changes", quiet.as_millis())),
                ..NewCheckpoint::default()
            };
            match self.take(&mut conn, sandbox.id, new) {
                Err(Error::Moved { why, .. }) => self.record_moved(&conn, sandbox.id, &why),
                Err(e) => tracing::warn!(sandbox = %name, "auto checkpoint: {e}"),
                Ok(_) => {}
            }
        }
    }

    /// Stops every watch.
    pub fn stop_watches(&self) {
        for (_, w) in lock(&self.watches).drain() {
            w.stop();
        }
    }

    fn watch_sandbox(&self, sandbox: &Sandbox) {
        if !self.watch {
            return;
        }
        let excludes = match Excludes::new(&sandbox.excludes) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(sandbox = %sandbox.name, "not watching: {e}");
                return;
            }
        };
        // A directory of its own per watch: a watch replaced by a new one
        // (see `stalled`) removes its cookies as it stops, and must not
        // remove the new one's.
        let generation = self.watch_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cookies = self.state_dir.join("cookies").join(format!("{}-{generation}", sandbox.id));
        match SandboxWatch::start(path_of(&sandbox.root), &cookies, excludes) {
            Ok(w) => {
                if let Some(old) = lock(&self.watches).insert(sandbox.id, w) {
                    old.stop();
                }
            }
            Err(e) => tracing::warn!(sandbox = %sandbox.name, "not watching: {e}"),
        }
    }

    fn unwatch_sandbox(&self, id: i64) {
        if let Some(w) = lock(&self.watches).remove(&id) {
            w.stop();
        }
    }

    fn watch_of(&self, id: i64) -> Option<Arc<SandboxWatch>> {
        lock(&self.watches).get(&id).cloned()
    }

    /// Makes a sandbox's next checkpoint compare everything, as a kernel
    /// queue overflow would: the `inject_rescan` test hook, served only when
    /// the daemon runs with `SNAPBACK_TEST_HOOKS=1`.
    fn inject(&self, peer: &Peer, reference: &str) -> Result<SandboxInfo> {
        if !test_hooks() {
            return Err(Error::InvalidRequest("test hooks are off (SNAPBACK_TEST_HOOKS=1 turns them on)".into()));
        }
        let conn = self.db()?;
        let sandbox = self.active_sandbox(&conn, peer, reference)?;
        let watch = self.watch_of(sandbox.id).ok_or_else(|| Error::NotFound("the sandbox is not watched".into()))?;
        watch.force_full("a rescan was injected".into());
        self.sandbox_info(&conn, &sandbox)
    }

    /// The `stop-after-safety` test hook, on only with
    /// `SNAPBACK_TEST_HOOKS=1`: a restore whose safety checkpoint and
    /// intent have just committed ends the daemon there, before it touches
    /// the sandbox, once for each time a test creates the file
    /// `stop-after-safety` in the state directory.
    fn stop_after_safety_hook(&self) {
        if test_hooks() && std::fs::remove_file(self.state_dir.join("stop-after-safety")).is_ok() {
            tracing::warn!("test hook: stopping after the safety checkpoint");
            std::process::exit(70);
        }
    }

    /// Returns a catalogue connection: an idle one from the pool, or a new
    /// one. Reusing connections keeps their prepared statements and schema
    /// cache; opening one costs about a millisecond.
    fn db(&self) -> Result<Pooled<'_>> {
        let conn = match lock(&self.idle).pop() {
            Some(conn) => conn,
            None => {
                let conn = catalogue::connect(&self.db_path)?;
                if self.durability == crate::config::Durability::Sync {
                    // Every commit reaches the disk before it returns.
                    conn.pragma_update(None, "synchronous", "FULL")?;
                }
                conn
            }
        };
        Ok(Pooled { changes: conn.total_changes(), conn: Some(conn), engine: self })
    }

    /// Returns the store at `path`, opening it the first time: from `/`
    /// without following a symlink, and only if it is the directory the
    /// catalogue recorded when it was first opened (a store whose path now
    /// leads elsewhere is never read, written or collected).
    fn store(&self, path: &[u8]) -> Result<Arc<Store>> {
        if let Some(s) = lock(&self.stores).get(path) {
            return Ok(s.clone());
        }
        // One first open at a time; `stores` itself is not held across the
        // catalogue lookup, whose connection runs deferred work that reads
        // `stores` when it goes back to the pool.
        let _opening = lock(&self.opening_store);
        if let Some(s) = lock(&self.stores).get(path) {
            return Ok(s.clone());
        }
        let shown = path_of(path).display();
        let moved = |why: String| Error::Moved {
            message: format!("the store {shown} is no longer the directory that was registered: {why}"),
            sandbox: None,
            why,
        };
        let dir = match sys::open_dir_pinned(path) {
            Ok(dir) => dir,
            Err(e) if e.is_symlink() || e.source.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(moved(e.to_string()));
            }
            Err(e) => return Err(e.source).ctx(|| format!("opening the store {shown}")),
        };
        let now = Identity::of(dir.as_fd()).ctx(|| format!("reading the store {shown}"))?;
        if let Some(Some(theirs)) = crate::store::catalogue_of(dir.as_fd()).ctx(|| format!("reading {shown}"))?
            && theirs != self.catalogue_id
        {
            return Err(Error::Internal(format!(
                "the store {shown} belongs to another catalogue ({theirs}) than this daemon's ({}): \
                 it is neither written nor collected. If the catalogue was lost, restore it from a backup",
                self.catalogue_id
            )));
        }
        let conn = self.db()?;
        match catalogue::store_identity(&conn, path)? {
            Some(registered) if registered != now => {
                return Err(moved(format!(
                    "{shown} is another directory now (device {}, inode {}; registered: device {}, inode {})",
                    now.dev, now.ino, registered.dev, registered.ino
                )));
            }
            Some(_) => {}
            None => catalogue::insert_store(&conn, path, now)?,
        }
        drop(conn);
        let store = Arc::new(
            Store::open_in(dir, path_of(path), Some(&self.catalogue_id))
                .ctx(|| format!("opening the store {shown}"))?,
        );
        lock(&self.stores).insert(path.to_vec(), store.clone());
        Ok(store)
    }

    fn sandbox_lock(&self, id: i64) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(id).or_default().clone()
    }

    /// Returns how restores into `sandbox` are applied.
    fn apply_options(&self, sandbox: &Sandbox) -> crate::restore::ApplyOptions {
        crate::restore::ApplyOptions {
            reflink: sandbox.clone_method == CloneMethod::Reflink,
            // Restores are restricted in every sandbox but root's.
            owner: (sandbox.owner_uid != 0).then_some(sandbox.owner_uid),
            durable: self.durability == crate::config::Durability::Sync,
        }
    }

    /// Undoes a checkpoint that failed before its commit: the cached
    /// manifest goes back (unless `current` is `None`: the catalogue
    /// refused it as stale), the next checkpoint compares everything (this one
    /// drained the dirty set), and the objects it stored are removed, so an
    /// absent checkpoint leaves nothing behind, not even until the next
    /// start. `storing` is the checkpoint's shared hold on the store.
    fn abandon(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        store: &Store,
        watch: Option<&SandboxWatch>,
        current: Option<Manifest>,
        storing: std::sync::RwLockReadGuard<'_, ()>,
    ) {
        if let Some(current) = current {
            self.put_manifest(sandbox.id, sandbox.head_seq, current);
        }
        if let Some(w) = watch {
            w.force_full("the previous checkpoint failed".into());
        }
        drop(storing);
        let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        match self.collect_garbage(conn, &sandbox.store) {
            Ok((n, bytes)) if n > 0 => {
                tracing::info!(sandbox = %sandbox.name, objects = n, bytes, "removed the objects of a failed checkpoint")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(sandbox = %sandbox.name, "removing the objects of a failed checkpoint: {e}"),
        }
    }

    fn collect_garbage(&self, conn: &Connection, store_path: &[u8]) -> Result<(u64, u64)> {
        let store = self.store(store_path)?;
        let referenced = catalogue::referenced_objects(conn, store_path)?.into_keys().collect();
        store.collect_garbage(&referenced).ctx(|| format!("collecting garbage in {}", store.path().display()))
    }

    /// Answers one request; errors become `Response::Error`. The
    /// background work it starts (copying write-ahead logs back, waking the
    /// pruner, reading restored files in) is left to the returned
    /// [`After`]: the caller sends the answer first, then drops it, so that
    /// the work does not compete with the answer for the CPU.
    pub fn handle(self: &Arc<Self>, peer: Peer, request: Request) -> (Response, After) {
        /// Ends the deferral when the request ends, even by a panic; the
        /// work collected then runs at once.
        struct Collecting<'a>(&'a Arc<Engine>);
        impl Collecting<'_> {
            fn take(&self) -> After {
                let work = DEFERRED.with_borrow_mut(Option::take).unwrap_or_default();
                After { engine: self.0.clone(), work }
            }
        }
        impl Drop for Collecting<'_> {
            fn drop(&mut self) {
                drop(self.take());
            }
        }
        DEFERRED.with_borrow_mut(|d| *d = Some(Vec::new()));
        let collecting = Collecting(self);
        let response = self.answer(&peer, request);
        let after = collecting.take();
        (response, after)
    }

    fn answer(&self, peer: &Peer, request: Request) -> Response {
        // Every request sees the retention of the checkpoints answered
        // before it.
        self.settle_retention();
        let result = match request {
            Request::Hello(_) => Err(Error::InvalidRequest("hello was already exchanged".into())),
            Request::SandboxAdd(r) => self.sandbox_add(peer, r).map(Response::Sandbox),
            Request::SandboxList(_) => self.sandbox_list(peer).map(Response::Sandboxes),
            Request::SandboxRemove(r) => self.sandbox_remove(peer, r).map(Response::Sandbox),
            Request::Checkpoint(r) => self.checkpoint(peer, r).map(Response::Checkpoint),
            Request::List(r) => self.list(peer, r).map(Response::Checkpoints),
            Request::Show(r) => self.show(peer, &r.checkpoint).map(Response::Checkpoint),
            Request::Diff(r) => self.diff(peer, r).map(Response::Diff),
            Request::Rollback(r) => self.rollback(peer, r).map(Response::Rollback),
            Request::Status(_) => self.status(peer).map(Response::Status),
            Request::PlanShow(r) => self.plan_show(peer, &r.plan).map(Response::Plan),
            Request::PlanApply(r) => self.plan_close(peer, &r.plan, PlanState::Applied).map(Response::Plan),
            Request::PlanAbandon(r) => self.plan_close(peer, &r.plan, PlanState::Abandoned).map(Response::Plan),
            Request::PlanRollback(r) => self.plan_rollback(peer, r).map(Response::Rollback),
            Request::Revert(r) => self.revert(peer, r).map(Response::Rollback),
            Request::Undo(r) => self.undo(peer, r).map(Response::Rollback),
            Request::Prune(r) => self.prune(peer, r).map(Response::Pruned),
            Request::Export(r) => self.export(peer, r).map(Response::Exported),
            Request::Verify(_) => self.verify(peer).map(Response::Verified),
            Request::InjectRescan(r) => self.inject(peer, &r.sandbox).map(Response::Sandbox),
        };
        result.unwrap_or_else(|e| {
            if let Error::Moved { sandbox: Some(id), why, .. } = &e
                && let Ok(conn) = self.db()
            {
                self.record_moved(&conn, *id, why);
            }
            tracing::debug!(code = e.code().as_str(), "request refused: {e}");
            Response::Error(e.to_body())
        })
    }

    fn sandbox_ref(&self, conn: &Connection, peer: &Peer, reference: &str) -> Result<Sandbox> {
        let sandbox = catalogue::sandbox_by_ref(conn, reference)?;
        if !may_use(peer, &sandbox) {
            return Err(Error::NotFound(format!("no sandbox named or rooted at {reference:?}")));
        }
        Ok(sandbox)
    }

    fn checkpoint_ref(&self, peer: &Peer, reference: &str) -> Result<catalogue::Checkpoint> {
        let conn = self.db()?;
        let c =
            catalogue::checkpoint_by_ref(&conn, reference).map_err(|e| self.pruned_or(&conn, peer, reference, e))?;
        let sandbox = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
        if !may_use(peer, &sandbox) {
            return Err(Error::NotFound(format!("no checkpoint {reference}")));
        }
        Ok(c)
    }

    /// Turns "no checkpoint X" into "X was pruned by ... on ..." when X
    /// names a pruned checkpoint of a sandbox the caller may use.
    fn pruned_or(&self, conn: &Connection, peer: &Peer, reference: &str, e: Error) -> Error {
        if !matches!(e, Error::NotFound(_)) {
            return e;
        }
        match catalogue::pruned(conn, reference) {
            Ok(Some((id, sandbox_id, at_ms, why)))
                if catalogue::sandbox_by_id(conn, sandbox_id).is_ok_and(|s| may_use(peer, &s)) =>
            {
                Error::NotFound(format!("checkpoint {id} was pruned by {why} on {} UTC", snapback::utc(at_ms)))
            }
            _ => e,
        }
    }

    fn sandbox_info(&self, conn: &Connection, s: &Sandbox) -> Result<SandboxInfo> {
        Ok(SandboxInfo {
            name: s.name.clone(),
            path: WirePath(s.root.clone()),
            store: WirePath(s.store.clone()),
            clone_method: s.clone_method,
            clone_note: s.clone_note.clone(),
            excludes: s.excludes.clone(),
            state: shown_state(s).into(),
            moved: s.moved.clone(),
            owner_uid: s.owner_uid,
            checkpoints: catalogue::checkpoint_count(conn, s.id)?,
            created_unix_ms: s.created_ms,
        })
    }

    /// Registers a directory. Nothing is written before every check has
    /// passed: the root is opened from `/` without following a symlink (as
    /// the caller, so it must be a directory the caller can reach and
    /// owns), its identity recorded; the placement rule
    /// ([`access::check_placement`]) and the store's rule
    /// ([`Engine::prepare_store`]) are applied; then the store is made.
    fn sandbox_add(&self, peer: &Peer, req: SandboxAdd) -> Result<SandboxInfo> {
        let SandboxAdd { path, name, mut excludes, store } = req;
        for default in &self.default_excludes {
            if !excludes.contains(default) {
                excludes.push(default.clone());
            }
        }
        let root_b = clean_path("the sandbox", path.as_bytes())?;
        let root = path_of(&root_b).to_owned();
        let root_fd = access::with_caller_creds(peer, |_| Ok(sys::open_dir_pinned(&root_b)))
            .ctx(|| format!("opening {}", root.display()))?
            .map_err(|e| Error::InvalidRequest(format!("cannot register {}: {e}", root.display())))?;
        let meta = sys::fstat(root_fd.as_fd()).ctx(|| format!("reading {}", root.display()))?;
        if !peer.is_root() && meta.st_uid != peer.uid {
            return Err(Error::PermissionDenied(format!(
                "{} belongs to uid {}; only its owner or root may register it",
                root.display(),
                meta.st_uid
            )));
        }
        let identity = Identity { dev: meta.st_dev, ino: meta.st_ino };
        Excludes::new(&excludes)?; // refuse bad patterns before anything is written
        let store_b = match &store {
            None => bytes_of(&self.default_store),
            Some(s) => clean_path("the store", s.as_bytes())?,
        };
        let name = match name {
            Some(n) => n,
            None => root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into()),
        };
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) || name.len() > 200 {
            return Err(Error::InvalidRequest(format!("{name:?} is not a valid sandbox name")));
        }
        let conn = self.db()?;
        let all = catalogue::sandboxes(&conn)?;
        if let Some(other) = all.iter().find(|o| o.root == root_b) {
            return self.register_again(&conn, peer, other, identity);
        }
        let others: Vec<access::Placed<'_>> =
            all.iter().map(|o| access::Placed { name: &o.name, root: &o.root, store: &o.store }).collect();
        access::check_placement(&root_b, &store_b, &bytes_of(&self.state_dir), &bytes_of(&self.default_store), &others)
            .map_err(Error::InvalidRequest)?;
        if let Some(other) = all.iter().find(|o| o.name == name) {
            return Err(Error::AlreadyExists(format!("a sandbox named {} already exists", other.name)));
        }
        if store.is_some() {
            let shares = all.iter().any(|o| o.store == store_b && may_use(peer, o));
            self.prepare_store(&conn, peer, &store_b, shares)?;
        }
        let store = self.store(&store_b)?;
        let same_fs = store.device().ctx(|| "reading the store".into())? == meta.st_dev;
        let (fs, clones) = sys::filesystem(root_fd.as_fd()).ctx(|| format!("reading {}", root.display()))?;
        let (clone_method, clone_note) = if same_fs && store.probe_reflink() {
            (
                CloneMethod::Reflink,
                format!("reflink: the store shares the sandbox's filesystem ({fs}), which clones files"),
            )
        } else if !same_fs && clones {
            (
                CloneMethod::Copy,
                format!(
                    "copy: the store {} is on another filesystem than the sandbox; add the sandbox with \
                     --store DIR on its own filesystem ({fs}) to get reflinks",
                    path_of(&store_b).display()
                ),
            )
        } else {
            let elsewhere = if same_fs { "" } else { ", so no store elsewhere would help" };
            (CloneMethod::Copy, format!("copy: the sandbox's filesystem ({fs}) cannot clone files{elsewhere}"))
        };
        let mut sandbox = Sandbox {
            id: 0,
            name,
            root: root_b,
            store: store_b,
            clone_method,
            clone_note,
            excludes,
            owner_uid: if peer.is_root() { meta.st_uid } else { peer.uid },
            state: "active".into(),
            head_seq: 0,
            created_ms: now_ns() / 1_000_000,
            identity: Some(identity),
            moved: None,
        };
        sandbox.id = catalogue::insert_sandbox(&conn, &sandbox)?;
        self.watch_sandbox(&sandbox);
        tracing::info!(name = %sandbox.name, root = %root.display(), method = clone_method.as_str(), "sandbox registered");
        self.sandbox_info(&conn, &sandbox)
    }

    /// `sandbox add` of a path registered already: a removed or moved
    /// sandbox of the caller's comes back, pinned to the directory there
    /// now (its next checkpoint compares the whole tree); an active one is
    /// an error.
    fn register_again(&self, conn: &Connection, peer: &Peer, other: &Sandbox, now: Identity) -> Result<SandboxInfo> {
        let moved = other.moved.is_some() || other.identity.is_some_and(|i| i != now);
        if !may_use(peer, other) || (other.state != "removed" && !moved) {
            return Err(Error::AlreadyExists(format!(
                "{} is already registered as {}",
                path_of(&other.root).display(),
                other.name
            )));
        }
        let guard = self.sandbox_lock(other.id);
        let _held = lock(&guard);
        catalogue::set_sandbox_identity(conn, other.id, now)?;
        catalogue::set_sandbox_state(conn, other.id, "active")?;
        lock(&self.manifests).remove(&other.id);
        let again = catalogue::sandbox_by_id(conn, other.id)?;
        self.watch_sandbox(&again);
        if moved {
            tracing::info!(name = %again.name, "registered again after its root moved");
        }
        self.sandbox_info(conn, &again)
    }

    /// Checks, and makes if needed, a store directory a caller named with
    /// `--store`. One that exists must be reached without a symlink and be
    /// the caller's (any, for root), and be empty or a snapback store; one
    /// the caller already shares (`shares`: a sandbox of the caller's uses
    /// it) needs nothing more. A missing one is created with the caller's
    /// credentials (so only where the caller could create it), then given
    /// to the daemon, mode 0700: what is inside is the daemon's alone.
    fn prepare_store(&self, conn: &Connection, peer: &Peer, store: &[u8], shares: bool) -> Result<()> {
        let shown = path_of(store).display().to_string();
        if shares && catalogue::store_identity(conn, store)?.is_some() {
            return Ok(());
        }
        match sys::open_dir_pinned(store) {
            Ok(dir) => {
                let st = sys::fstat(dir.as_fd()).ctx(|| format!("reading {shown}"))?;
                if !peer.is_root() && st.st_uid != peer.uid {
                    return Err(Error::PermissionDenied(format!(
                        "the store {shown} belongs to uid {}; name an empty directory of yours, or a new one",
                        st.st_uid
                    )));
                }
                let empty = sys::read_dir(dir.as_fd()).ctx(|| format!("reading {shown}"))?.is_empty();
                if !empty && !peer.is_root() {
                    // What is inside would be the caller's, which the daemon
                    // would then read and write as root.
                    return Err(Error::InvalidRequest(format!(
                        "the store {shown} is not empty: name a new or an empty directory of yours (a store \
                         already in use can be shared only by sandboxes of the uid that uses it)"
                    )));
                }
                if !empty && !crate::store::is_store(dir.as_fd()) {
                    return Err(Error::InvalidRequest(format!(
                        "the store {shown} is not empty and not a snapback store; name an empty or a new directory"
                    )));
                }
                if empty {
                    sys::fchown(dir.as_fd(), sys::euid(), u32::MAX).ctx(|| format!("taking {shown}"))?;
                    sys::fchmod(dir.as_fd(), 0o700).ctx(|| format!("taking {shown}"))?;
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                let made = access::with_caller_creds(peer, |_| Ok(sys::make_dir_pinned(store, 0o700)))
                    .ctx(|| format!("creating the store {shown}"))?
                    .map_err(|e| Error::InvalidRequest(format!("cannot create the store {shown}: {e}")))?;
                sys::fchown(made.as_fd(), sys::euid(), u32::MAX).ctx(|| format!("taking {shown}"))?;
                Ok(())
            }
            Err(e) => Err(Error::InvalidRequest(format!("cannot use the store {shown}: {e}"))),
        }
    }

    fn sandbox_list(&self, peer: &Peer) -> Result<Sandboxes> {
        let conn = self.db()?;
        let mut out = Vec::new();
        for mut s in catalogue::sandboxes(&conn)? {
            if may_use(peer, &s) {
                self.recheck_root(&conn, &mut s);
                out.push(self.sandbox_info(&conn, &s)?);
            }
        }
        Ok(Sandboxes { sandboxes: out })
    }

    fn sandbox_remove(&self, peer: &Peer, req: SandboxRemove) -> Result<SandboxInfo> {
        let conn = self.db()?;
        let sandbox = self.sandbox_ref(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let mut info = self.sandbox_info(&conn, &sandbox)?;
        if !req.purge {
            catalogue::set_sandbox_state(&conn, sandbox.id, "removed")?;
            self.unwatch_sandbox(sandbox.id);
            info.state = "removed".into();
            return Ok(info);
        }
        // Objects may be shared with other sandboxes of the same store; the
        // store's collection lock waits for their checkpoints in progress.
        let store = self.store(&sandbox.store)?;
        let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        catalogue::delete_sandbox(&conn, sandbox.id)?;
        self.unwatch_sandbox(sandbox.id);
        lock(&self.manifests).remove(&sandbox.id);
        let (n, bytes) = self.collect_garbage(&conn, &sandbox.store)?;
        tracing::info!(name = %sandbox.name, objects = n, bytes, "sandbox purged");
        info.state = "purged".into();
        info.checkpoints = 0;
        Ok(info)
    }

    fn active_sandbox(&self, conn: &Connection, peer: &Peer, reference: &str) -> Result<Sandbox> {
        let sandbox = self.sandbox_ref(conn, peer, reference)?;
        if sandbox.state != "active" {
            return Err(Error::InvalidRequest(format!(
                "the sandbox {} was removed; add it again to use it",
                sandbox.name
            )));
        }
        Ok(sandbox)
    }

    fn checkpoint(&self, peer: &Peer, req: CheckpointRequest) -> Result<CheckpointInfo> {
        let CheckpointRequest { sandbox, plan, reason, tool, phase, labels, pin, kind } = req;
        let kind = kind.unwrap_or(if tool.is_some() { CheckpointKind::Tool } else { CheckpointKind::Manual });
        if matches!(kind, CheckpointKind::Safety | CheckpointKind::Restore) {
            return Err(Error::InvalidRequest(format!("{} checkpoints are taken by the daemon itself", kind.as_str())));
        }
        let mut conn = self.db()?;
        let sb = self.active_sandbox(&conn, peer, &sandbox)?;
        if let Some(plan) = &plan {
            if plan.is_empty() || plan.len() > 200 || plan.chars().any(char::is_control) {
                return Err(Error::InvalidRequest(format!("{plan:?} is not a valid plan id")));
            }
            check_plan_open(&conn, plan, &sb)?;
        }
        let guard = self.sandbox_lock(sb.id);
        let _held = lock(&guard);
        let new = NewCheckpoint { plan, reason, tool, phase, labels, kind, pinned: pin };
        self.take(&mut conn, sb.id, new)
    }

    /// Opens a sandbox's root from `/` without following a symlink, and
    /// checks that it is the directory that was registered. One that is
    /// not (renamed, replaced, missing, or reached through a symlink now)
    /// is an [`Error::Moved`], which [`Engine::answer`] records.
    fn open_root(&self, sandbox: &Sandbox) -> Result<OwnedFd> {
        let path = path_of(&sandbox.root).display();
        let moved = |why: String| Error::Moved {
            message: format!(
                "the sandbox {} is no longer the directory that was registered: {why}. Nothing was read or \
                 written there; its checkpoints stay readable, and `snapback sandbox add {path}` registers \
                 the directory there now",
                sandbox.name
            ),
            sandbox: Some(sandbox.id),
            why,
        };
        if let Some(why) = &sandbox.moved {
            return Err(moved(why.clone()));
        }
        let fd = match sys::open_dir_pinned(&sandbox.root) {
            Ok(fd) => fd,
            Err(e) if e.is_symlink() || e.is_not_found() || e.source.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(moved(e.to_string()));
            }
            Err(e) => return Err(e.source).ctx(|| format!("opening the sandbox {path}")),
        };
        let now = Identity::of(fd.as_fd()).ctx(|| format!("reading the sandbox {path}"))?;
        match sandbox.identity {
            Some(registered) if registered != now => Err(moved(format!(
                "{path} is another directory now (device {}, inode {}; registered: device {}, inode {})",
                now.dev, now.ino, registered.dev, registered.ino
            ))),
            Some(_) => Ok(fd),
            None => {
                // Registered before identities were recorded: the first open
                // after the upgrade records what it finds.
                catalogue::set_sandbox_identity(&*self.db()?, sandbox.id, now)?;
                tracing::info!(sandbox = %sandbox.name, "recorded the root's identity");
                Ok(fd)
            }
        }
    }

    /// Whether a sandbox's root is still what was registered; records it
    /// as moved if not. For `status` and `sandbox list`.
    fn recheck_root(&self, conn: &Connection, sandbox: &mut Sandbox) {
        if sandbox.state != "active" || sandbox.moved.is_some() {
            return;
        }
        if let Err(Error::Moved { why, .. }) = self.open_root(sandbox) {
            self.record_moved(conn, sandbox.id, &why);
            sandbox.moved = Some(why);
        }
    }

    /// Records that a sandbox's root moved, and stops watching it.
    fn record_moved(&self, conn: &Connection, id: i64, why: &str) {
        if let Err(e) = catalogue::set_sandbox_moved(conn, id, why) {
            tracing::warn!("recording that sandbox {id} moved: {e}");
        }
        self.unwatch_sandbox(id);
        tracing::warn!(sandbox = id, "the root moved: {why}");
    }

    /// Takes the current manifest of a sandbox out of the cache, or reads it
    /// from the catalogue. The caller holds the sandbox's lock and gives it
    /// back with [`Engine::put_manifest`].
    fn take_manifest(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        match lock(&self.manifests).remove(&sandbox.id) {
            Some((seq, m)) if seq == sandbox.head_seq => Ok(m),
            _ => catalogue::current_rows(conn, sandbox.id),
        }
    }

    fn put_manifest(&self, sandbox_id: i64, seq: u64, manifest: Manifest) {
        lock(&self.manifests).insert(sandbox_id, (seq, manifest));
    }

    /// Returns a copy of the current manifest of a sandbox.
    fn copy_manifest(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        if let Some((seq, m)) = lock(&self.manifests).get(&sandbox.id)
            && *seq == sandbox.head_seq
        {
            return Ok(m.clone());
        }
        catalogue::current_rows(conn, sandbox.id)
    }

    /// Compares the live tree in `scope` with `current`, its current
    /// versions. With a store, new content is stored; without one (a dry
    /// run), only hashed.
    fn scan(
        &self,
        sandbox: &Sandbox,
        scope: &Scope,
        current: &Manifest,
        store: Option<(&Store, Option<&Pack<'_>>)>,
        scan_start_ns: i64,
    ) -> Result<Captured> {
        let root = self.open_root(sandbox)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let progress = progress::current();
        if let Some(p) = &progress {
            // A full scan visits about as many entries as the manifest holds.
            let total = matches!(scope, Scope::Everything).then_some(current.len() as u64).filter(|&n| n > 0);
            p.start(progress::Phase::Scanning, total);
        }
        let opts = Options {
            root: root.as_fd(),
            excludes: &excludes,
            store: store.map(|(s, _)| s),
            reflink: sandbox.clone_method == CloneMethod::Reflink,
            pack: store.and_then(|(_, p)| p),
            racy_after_ns: scan_start_ns - RACY_WINDOW_NS,
            progress: progress.as_deref(),
        };
        capture::capture(current, scope, &opts)
    }

    /// The paths of `sandbox`'s files whose inode had more than one name
    /// when last compared, as of checkpoint `seq` whose manifest is
    /// `current`: kept beside the manifest cache, made from `current` when
    /// it is not there.
    fn shared_names(&self, sandbox_id: i64, seq: u64, current: &Manifest) -> Vec<Vec<u8>> {
        let mut cache = lock(&self.shared);
        if let Some((at, paths)) = cache.get(&sandbox_id)
            && *at == seq
        {
            return paths.clone();
        }
        let paths: Vec<Vec<u8>> = current
            .iter()
            .filter(|(_, r)| r.meta.kind == Kind::File && r.key.nlink > 1)
            .map(|(p, _)| p.clone())
            .collect();
        cache.insert(sandbox_id, (seq, paths.clone()));
        paths
    }

    /// Carries the list of [`Engine::shared_names`] from checkpoint `from`
    /// to `to` through what changed: the versions that ended (`gone`), were
    /// `added`, or were re-keyed (dropped when it was not the list of
    /// `from`: made again when next asked for).
    fn update_shared_names<'a>(
        &self,
        sandbox_id: i64,
        (from, to): (u64, u64),
        gone: impl Iterator<Item = &'a [u8]>,
        added: &[catalogue::NewRow],
        rekeyed: &[(Vec<u8>, i64, StatKey)],
    ) {
        let mut cache = lock(&self.shared);
        let Some((at, paths)) = cache.get_mut(&sandbox_id).filter(|(at, _)| *at == from) else {
            cache.remove(&sandbox_id);
            return;
        };
        let mut set: std::collections::BTreeSet<Vec<u8>> = std::mem::take(paths).into_iter().collect();
        for path in gone {
            set.remove(path);
        }
        for a in added {
            if a.meta.kind == Kind::File && a.key.nlink > 1 {
                set.insert(a.path.clone());
            }
        }
        for (path, _, key) in rekeyed {
            if key.nlink > 1 {
                set.insert(path.clone());
            } else {
                set.remove(path);
            }
        }
        *paths = set.into_iter().collect();
        *at = to;
    }

    /// Makes a capture a tree that existed: the paths that got events while
    /// it read the tree (asked of the watcher through its barrier, so none
    /// is missed) are read again, against the state found so far, until a
    /// round meets no event; then every path holds what it held at that
    /// last barrier. A directory renamed back and forth during a scan would
    /// otherwise be found at neither name. Bounded: a tree that will not
    /// settle in [`SETTLE_ROUNDS`] is a `busy` error, and nothing is
    /// recorded. Without a watch in working order (none, degraded, or not
    /// set up yet) there is nothing to ask, and the capture stands.
    fn settle(
        &self,
        sb: &Sandbox,
        watch: Option<&SandboxWatch>,
        current: &Manifest,
        mut captured: Captured,
        store: (&Store, Option<&Pack<'_>>),
        scan_start_ns: i64,
    ) -> Result<Captured> {
        let Some(watch) = watch else { return Ok(captured) };
        let mut asked = std::collections::HashSet::new();
        for _ in 0..SETTLE_ROUNDS {
            let others = other_names(current, &captured, &asked);
            asked.extend(others.iter().cloned());
            let scope = match watch.drain() {
                Drain::Paths(paths) if paths.is_empty() && others.is_empty() => return Ok(captured),
                Drain::Paths(mut paths) => {
                    paths.extend(others);
                    Scope::Paths(paths)
                }
                // A watch that is degraded or not set up yet has no events
                // to ask for: as without a watch.
                Drain::Everything(_) if !watch.report().watching => return Ok(captured),
                Drain::Everything(_) => Scope::Everything,
            };
            // The state found so far: copied only when the tree moved.
            let mut state = current.clone();
            captured.apply_to(&mut state, None);
            let again = self.scan(sb, &scope, &state, Some(store), scan_start_ns)?;
            captured = captured.then(again);
        }
        watch.force_full("the tree kept changing during the last checkpoint".into());
        Err(Error::Busy(format!(
            "the sandbox {} kept changing while the checkpoint read it ({SETTLE_ROUNDS} rounds); nothing was \
             recorded. Try again when it is quieter",
            sb.name
        )))
    }

    /// Takes a checkpoint, and records the retention it owes (applied after
    /// the answer, see [`Engine::retain`]); the caller holds the sandbox's
    /// lock.
    fn take(&self, conn: &mut Connection, sandbox_id: i64, new: NewCheckpoint) -> Result<CheckpointInfo> {
        let (info, ()) = self.take_then(conn, sandbox_id, new, |_, _| Ok(()))?;
        self.retain(sandbox_id);
        Ok(info)
    }

    /// Retention applies after every checkpoint, without being asked, but
    /// not inside the request that took it: the pruner thread applies it
    /// once the answer is on its way, or the next request does, first, if
    /// it comes sooner (see [`Engine::settle_retention`]).
    fn retain(&self, sandbox_id: i64) {
        lock(&self.owed).sandboxes.insert(sandbox_id);
        self.later(Later::WakePruner);
    }

    /// Runs `work` now, or after the answer of the request running on
    /// this thread (see [`Engine::handle`]).
    fn later(&self, work: Later) {
        let work = DEFERRED.with_borrow_mut(|d| match d {
            Some(deferred) => {
                deferred.push(work);
                None
            }
            None => Some(work),
        });
        if let Some(work) = work {
            self.run_later(work);
        }
    }

    fn run_later(&self, work: Later) {
        match work {
            Later::CheckpointLogs => {
                self.wal.kick();
                for store in lock(&self.stores).values() {
                    store.checkpoint_index_log();
                }
            }
            Later::WakePruner => self.owed_changed.notify_all(),
            Later::Warm(root, cloned) => {
                let warming = std::thread::Builder::new()
                    .name("snapback-warm".into())
                    .spawn(move || crate::restore::warm(root.as_fd(), &cloned));
                if let Err(e) = warming {
                    tracing::debug!("not warming the restored files: {e}");
                }
            }
        }
    }

    /// Applies the retention owed, and waits for any being applied: after
    /// this, every checkpoint answered so far has been followed by its
    /// pruning. Called with no sandbox lock held.
    pub fn settle_retention(&self) {
        let mut owed = lock(&self.owed);
        loop {
            if let Some(id) = owed.sandboxes.pop_first() {
                owed.running += 1;
                // A retry being made is not due again meanwhile.
                let failures = match owed.retry.get_mut(&id) {
                    Some((at, n)) => {
                        *at = Instant::now() + retry_delay(*n);
                        *n
                    }
                    None => 0,
                };
                drop(owed);
                let result = self.retain_now(id, failures > 0);
                owed = lock(&self.owed);
                owed.running -= 1;
                match result {
                    Ok(()) => {
                        owed.retry.remove(&id);
                    }
                    Err(e) => {
                        let wait = retry_delay(failures + 1);
                        tracing::warn!(sandbox_id = id, "pruning: {e}; trying again in {} s", wait.as_secs_f64());
                        owed.retry.insert(id, (Instant::now() + wait, failures + 1));
                    }
                }
                self.owed_changed.notify_all();
            } else if owed.running > 0 {
                owed = self.owed_changed.wait(owed).unwrap_or_else(|p| p.into_inner());
            } else {
                return;
            }
        }
    }

    /// The pruner thread: applies owed retention as it comes, until
    /// [`Engine::stop_pruner`]; what is owed then is applied before it
    /// returns.
    pub fn prune_in_background(&self) {
        loop {
            let mut owed = lock(&self.owed);
            while owed.sandboxes.is_empty() && !owed.stopped {
                // A failed pruning is owed again once its delay is up.
                let now = Instant::now();
                let due: Vec<i64> = owed.retry.iter().filter(|(_, (at, _))| *at <= now).map(|(&id, _)| id).collect();
                if !due.is_empty() {
                    owed.sandboxes.extend(due);
                    break;
                }
                owed = match owed.retry.values().map(|&(at, _)| at).min() {
                    Some(at) => self.owed_changed.wait_timeout(owed, at - now).unwrap_or_else(|p| p.into_inner()).0,
                    None => self.owed_changed.wait(owed).unwrap_or_else(|p| p.into_inner()),
                };
            }
            let stopped = owed.stopped;
            drop(owed);
            self.settle_retention();
            if stopped {
                return;
            }
        }
    }

    pub fn stop_pruner(&self) {
        lock(&self.owed).stopped = true;
        self.owed_changed.notify_all();
    }

    /// Prunes one sandbox under its lock. A failure does not undo the
    /// checkpoint that was taken: the caller has the pruner try again later.
    /// On such a later try (`sweep`), the sandbox's store is also swept for
    /// objects nothing references, which a failed removal may have left.
    fn retain_now(&self, sandbox_id: i64, sweep: bool) -> Result<()> {
        let guard = self.sandbox_lock(sandbox_id);
        let _held = lock(&guard);
        let mut conn = self.db()?;
        let sb = match catalogue::sandbox_by_id(&conn, sandbox_id) {
            Ok(sb) if sb.state == "active" => sb,
            // Removed or purged since: nothing left to prune.
            Ok(_) | Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.enforce_retention(&mut conn, &sb, &self.retention.policy(&sb.name), "retention")?;
        if sweep {
            let store = self.store(&sb.store)?;
            let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let (n, bytes) = self.collect_garbage(&conn, &sb.store)?;
            tracing::info!(sandbox = %sb.name, objects = n, bytes, "pruned after an earlier failure");
        }
        Ok(())
    }

    /// Takes a checkpoint and runs `then` in the transaction that records
    /// it, so that what `then` writes commits with the checkpoint or not at
    /// all. Retention is left to the caller. The caller holds the sandbox's
    /// lock.
    fn take_then<T>(
        &self,
        conn: &mut Connection,
        sandbox_id: i64,
        new: NewCheckpoint,
        then: impl FnOnce(&rusqlite::Transaction<'_>, &CheckpointInfo) -> Result<T>,
    ) -> Result<(CheckpointInfo, T)> {
        let started = Instant::now();
        let sb = catalogue::sandbox_by_id(conn, sandbox_id)?;
        let store = self.store(&sb.store)?;
        let watch = self.watch_of(sb.id);
        let scope = match watch.as_ref().map(|w| w.drain()) {
            Some(Drain::Paths(paths)) => Scope::Paths(paths),
            Some(Drain::Everything(why)) => {
                tracing::debug!(sandbox = %sb.name, "full scan: {why}");
                Scope::Everything
            }
            None => Scope::Everything,
        };
        if watch.as_ref().is_some_and(|w| w.stalled()) {
            // Its events stopped coming: this checkpoint scans everything,
            // and a fresh watch takes over for the next ones.
            tracing::warn!(sandbox = %sb.name, "the watch stopped delivering events; starting a new one");
            self.watch_sandbox(&sb);
        }
        let mut scope = scope;
        let drain_ms = ms_since(started);
        let scan_start_ns = now_ns();
        // From the first object stored until the commit references it.
        let storing = store.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        let mut current = self.take_manifest(conn, &sb)?;
        if let Scope::Paths(paths) = &mut scope {
            // A file with other names changes with no event for this one:
            // each is checked, and the ones that moved are read.
            let shared = self.shared_names(sb.id, sb.head_seq, &current);
            if !shared.is_empty() {
                let root = self.open_root(&sb)?;
                paths.extend(capture::moved_among(root.as_fd(), &current, &shared));
            }
        }
        let scope = &scope;
        let rows_ms = ms_since(started);
        // Files the watcher marked were written moments ago: their pages
        // are likely dirty (a clone would first write them out), and most
        // are small: those go into one pack rather than a file each.
        let pack = matches!(scope, Scope::Paths(_)).then(|| store.pack());
        // A checkpoint that read nothing holds the tree of its barrier.
        let read_nothing = matches!(scope, Scope::Paths(paths) if paths.is_empty());
        let scanned = self.scan(&sb, scope, &current, Some((&store, pack.as_ref())), scan_start_ns);
        let read_ms = ms_since(started);
        let captured = scanned.and_then(|c| {
            if read_nothing {
                return Ok(c);
            }
            self.settle(&sb, watch.as_deref(), &current, c, (&store, pack.as_ref()), scan_start_ns)
        });
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                self.abandon(conn, &sb, &store, watch.as_deref(), Some(current), storing);
                return Err(e);
            }
        };
        let scan_ms = ms_since(started);
        let parent = match sb.head_seq {
            0 => None,
            head => catalogue::checkpoint_at(conn, sb.id, head)?,
        };
        let counts = Counts::after(
            parent.as_ref(),
            captured.ended.iter().map(|(_, row)| (row.meta.kind, row.meta.size)),
            captured.added.iter().map(|a| (a.meta.kind, a.meta.size)),
        );
        let NewCheckpoint { plan, reason, tool, phase, labels, kind, pinned } = new;
        let info = CheckpointInfo {
            id: ulid::Ulid::new().to_string(),
            sandbox: sb.name.clone(),
            seq: sb.head_seq + 1,
            parent: parent.map(|p| p.info.id),
            plan,
            reason,
            tool,
            phase,
            labels,
            kind,
            pinned,
            created_unix_ms: now_ns() / 1_000_000,
            files: counts.files,
            dirs: counts.dirs,
            symlinks: counts.symlinks,
            bytes: counts.bytes,
            changed: captured.changed_paths(),
            exclusive_bytes: None,
            scanned: Some(captured.stats.scanned),
            full_scan: Some(matches!(scope, Scope::Everything)),
            broken: None,
        };
        let ended: Vec<i64> = captured.ended.iter().map(|(_, r)| r.id).collect();
        let written = std::thread::scope(|s| {
            // The pack index and the catalogue are two databases: the pack's
            // slots are recorded on a thread of their own while the rows
            // are written here, and the commit waits for both (a committed
            // checkpoint never names an object nothing can find).
            let mut sealing = pack.as_ref().filter(|p| !p.is_empty()).map(|p| s.spawn(move || p.seal()));
            let mut sealed = || match sealing.take() {
                Some(seal) => seal
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the sealing thread panicked")))
                    .ctx(|| format!("sealing a pack in {}", store.path().display())),
                None => Ok(()),
            };
            if self.durability == crate::config::Durability::Sync && captured.stats.read > 0 {
                // One syncfs for all of this checkpoint's objects, before the
                // catalogue can reference them.
                sealed()?;
                store.sync().ctx(|| format!("syncing the store {}", store.path().display()))?;
            }
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(plan) = &info.plan {
                // Checked again under the write lock: the plan may have been
                // applied since the request was accepted.
                check_plan_open(&tx, plan, &sb)?;
                catalogue::ensure_plan(&tx, plan, sb.id, info.created_unix_ms)?;
            }
            let ids = catalogue::write_checkpoint(
                &tx,
                &CheckpointWrite {
                    info: &info,
                    sandbox_id: sb.id,
                    scan_start_ns,
                    ended: &ended,
                    added: &captured.added,
                    rekeyed: &captured.rekeyed,
                },
            )?;
            let also = then(&tx, &info)?;
            sealed()?;
            tx.commit()?;
            Ok::<_, Error>((ids, also))
        });
        let written_ms = ms_since(started);
        let also = match written {
            Ok((ids, also)) => {
                captured.apply_to(&mut current, Some(&ids));
                let gone = captured.ended.iter().map(|(p, _)| p.as_slice());
                self.update_shared_names(sb.id, (sb.head_seq, info.seq), gone, &captured.added, &captured.rekeyed);
                self.put_manifest(sb.id, info.seq, current);
                also
            }
            Err(e) => {
                // A manifest the catalogue refused is dropped: the next
                // checkpoint reads the current versions from the catalogue.
                let current = (!matches!(e, Error::Stale(_))).then_some(current);
                self.abandon(conn, &sb, &store, watch.as_deref(), current, storing);
                return Err(e);
            }
        };
        let st = captured.stats;
        tracing::info!(
            sandbox = %sb.name, id = %info.id, kind = kind.as_str(), changed = info.changed,
            scanned = st.scanned, read = st.read, reflinked = st.reflinked, copied = st.copied,
            drain_ms, rows_ms, read_ms, scan_ms, written_ms, ms = ms_since(started), "checkpoint"
        );
        drop(storing);
        if !captured.dropped.is_empty() {
            // Versions a settling round replaced left their objects behind.
            let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let freed = catalogue::unreferenced(conn, &sb.store, &captured.dropped).and_then(|dead| {
                store.remove_objects(&dead).ctx(|| format!("removing objects from {}", store.path().display()))
            });
            if let Err(e) = freed {
                tracing::warn!(sandbox = %sb.name, "removing the objects of replaced versions: {e}");
            }
        }
        Ok((info, also))
    }

    fn list(&self, peer: &Peer, req: ListRequest) -> Result<Checkpoints> {
        let conn = self.db()?;
        let sandbox_id = match &req.sandbox {
            Some(s) => Some(self.sandbox_ref(&conn, peer, s)?.id),
            None => None,
        };
        let visible: std::collections::HashSet<i64> =
            catalogue::sandboxes(&conn)?.into_iter().filter(|s| may_use(peer, s)).map(|s| s.id).collect();
        let checkpoints = catalogue::checkpoints(&conn, sandbox_id, req.plan.as_deref())?
            .into_iter()
            .filter(|c| visible.contains(&c.sandbox_id))
            .map(|c| c.info)
            .collect();
        Ok(Checkpoints { checkpoints })
    }

    /// Returns the live state of a whole sandbox, reading (not storing)
    /// what changed since its last checkpoint.
    fn live_state(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        let mut current = self.copy_manifest(conn, sandbox)?;
        let captured = self.scan(sandbox, &Scope::Everything, &current, None, now_ns())?;
        captured.apply_to(&mut current, None);
        Ok(current)
    }

    fn diff(&self, peer: &Peer, req: DiffRequest) -> Result<DiffReport> {
        let from = self.checkpoint_ref(peer, &req.from)?;
        let conn = self.db()?;
        let (to_id, changes) = match &req.to {
            Some(to_ref) => {
                let to = self.checkpoint_ref(peer, to_ref)?;
                if to.sandbox_id != from.sandbox_id {
                    return Err(Error::InvalidRequest(format!(
                        "{} and {} belong to different sandboxes",
                        from.info.id, to.info.id
                    )));
                }
                let (a, b) = (from.info.seq, to.info.seq);
                let changes = if a == b {
                    Vec::new()
                } else {
                    let (old, new) = catalogue::rows_between(&conn, from.sandbox_id, a.min(b), a.max(b))?;
                    if a < b { changes(&old, &new) } else { changes(&new, &old) }
                };
                (Some(to.info.id), changes)
            }
            None => {
                let sandbox = catalogue::sandbox_by_id(&conn, from.sandbox_id)?;
                let live = self.live_state(&conn, &sandbox)?;
                let then = catalogue::rows_at(&conn, from.sandbox_id, from.info.seq)?;
                (None, changes(&then, &live))
            }
        };
        Ok(DiffReport { from: from.info.id, to: to_id, changes })
    }

    fn rollback(&self, peer: &Peer, req: RollbackRequest) -> Result<RollbackReport> {
        let target = self.checkpoint_ref(peer, &req.checkpoint)?;
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox_by_id(&conn, peer, target.sandbox_id)?;
        let filter = rollback_filter(&sandbox, &req.paths)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        self.restore_to(&mut conn, &sandbox, &target, &filter, req.dry_run, "rollback")
    }

    fn active_sandbox_by_id(&self, conn: &Connection, peer: &Peer, id: i64) -> Result<Sandbox> {
        let sandbox = catalogue::sandbox_by_id(conn, id)?;
        self.active_sandbox(conn, peer, &sandbox.name)
    }

    /// Brings a sandbox to `target` (within `filter`); the caller holds the
    /// sandbox's lock. Refused when the target belongs to an applied plan.
    /// Anything but a dry run is recorded as an intent first, so that a
    /// crash half way is finished at the next start.
    fn restore_to(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
        dry_run: bool,
        kind: &str,
    ) -> Result<RollbackReport> {
        let target = &still_there(conn, target)?;
        if let Some(plan) = &target.info.plan {
            refuse_if_applied(conn, plan)?;
        }
        refuse_if_broken(target)?;
        self.check_filter(conn, sandbox, target, filter)?;
        if !dry_run {
            let intent = catalogue::begin_intent(conn, sandbox.id, kind, &target.info.id, filter, false, now_ms())?;
            let result = self.restore_intent(conn, sandbox, target, filter, kind, (intent, IntentEnd::WithTheRestore));
            self.close_intent(conn, intent, &result);
            return result;
        }
        let excludes = Excludes::new(&sandbox.excludes)?;
        let store = self.store(&sandbox.store)?;
        let sb = catalogue::sandbox_by_id(conn, sandbox.id)?;
        let live = self.live_state(conn, &sb)?;
        let then = catalogue::rows_at(conn, sandbox.id, target.info.seq)?;
        let (mut t_side, mut l_side) = differences(&then, &live);
        let relinked =
            crate::links::relink(&crate::links::InMemory::new(&then, &live), &mut t_side, &mut l_side, true)?;
        let plan = Plan::new(&t_side, &l_side, filter, &excludes, relinked);
        let total = match filter {
            [] => then.len(),
            _ => then.keys().filter(|p| selected(p, filter, &excludes)).count(),
        } as u64;
        self.apply_plan(sandbox, &plan, &store, None, &target.info.id, total)
    }

    /// Refuses a `--path` that a rollback could do nothing with, before
    /// anything is written: one that is excluded (a rollback never touches
    /// it), or that is neither in the target checkpoint nor in the live
    /// tree (a typo, most likely).
    fn check_filter(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
    ) -> Result<()> {
        let excludes = Excludes::new(&sandbox.excludes)?;
        for path in filter.iter().filter(|p| !p.is_empty()) {
            let shown = capture::show(path);
            if excludes.covers(path) {
                return Err(Error::InvalidRequest(format!(
                    "{shown} is excluded from {}: a rollback never touches it",
                    sandbox.name
                )));
            }
            let root = self.open_root(sandbox)?;
            let (dir, name) = sys::split_parent(path);
            let live = sys::open_beneath(root.as_fd(), dir).and_then(|d| sys::lstatat(d.as_fd(), name)).is_ok();
            if !live && !catalogue::holds_path_at(conn, sandbox.id, target.info.seq, path)? {
                return Err(Error::InvalidRequest(format!(
                    "{shown} is neither in checkpoint {} nor in the sandbox {}",
                    target.info.id, sandbox.name
                )));
            }
        }
        Ok(())
    }

    /// Counts the target paths a restore covers (for `unchanged`). `head`
    /// is the sandbox's newest checkpoint, `gone` the versions valid at the
    /// target and not at `head`, `new` those valid at `head` only.
    #[allow(clippy::too_many_arguments)]
    fn restore_total(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        head: u64,
        (gone, new): (&Manifest, &Manifest),
        filter: &[Vec<u8>],
        excludes: &Excludes,
    ) -> Result<u64> {
        if filter.is_empty() {
            // The target's versions are the head's, less the new ones, plus
            // the gone ones: no need to count the whole tree's rows.
            let at_head = match lock(&self.manifests).get(&sandbox.id) {
                Some((seq, m)) if *seq == head => m.len() as u64,
                _ => catalogue::count_at(conn, sandbox.id, head)?,
            };
            return Ok((at_head + gone.len() as u64).saturating_sub(new.len() as u64));
        }
        Ok(catalogue::rows_at(conn, sandbox.id, target.info.seq)?
            .keys()
            .filter(|p| selected(p, filter, excludes))
            .count() as u64)
    }

    /// The body of a restore whose intent `intent` is recorded: a safety
    /// checkpoint, committed with the plan (recorded in the intent before
    /// anything is touched), then its application; only then is retention
    /// owed (earlier, the safety checkpoint could push the target out of
    /// the policy while it is being restored).
    fn restore_intent(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        target: &Checkpoint,
        filter: &[Vec<u8>],
        kind: &str,
        (intent, end): (i64, IntentEnd),
    ) -> Result<RollbackReport> {
        let started = Instant::now();
        let excludes = Excludes::new(&sandbox.excludes)?;
        let store = self.store(&sandbox.store)?;
        let reason = format!("before {kind} to {}", target.info.id);
        let (safety, (plan, t_side, l_side)) =
            self.take_then(conn, sandbox.id, safety_checkpoint(reason), |tx, s| {
                let planned = restore_plan(tx, sandbox.id, target.info.seq, s.seq, filter, &excludes)?;
                catalogue::intent_applying(tx, intent, &s.id, now_ms())?;
                // Recorded first: a rollback that fails half way can still be
                // undone to the state before it.
                catalogue::record_rollback(tx, sandbox.id, kind, &target.info.id, &s.id, now_ms())?;
                Ok(planned)
            })?;
        self.stop_after_safety_hook();
        let safety_ms = ms_since(started);
        let total = self.restore_total(conn, sandbox, target, safety.seq, (&t_side, &l_side), filter, &excludes)?;
        let plan_ms = ms_since(started);
        let closes = (end == IntentEnd::WithTheRestore).then_some(intent);
        let applying = Applying { safety: &safety, closes };
        let report = self.apply_plan(sandbox, &plan, &store, Some(applying), &target.info.id, total)?;
        self.retain(sandbox.id);
        tracing::info!(
            sandbox = %sandbox.name, target = %target.info.id, kind,
            restored = report.restored, created = report.created, deleted = report.deleted,
            safety_ms, plan_ms, ms = ms_since(started), "rollback"
        );
        Ok(report)
    }

    /// Ends a restore's intent once the request is answered. It is deleted
    /// when the restore succeeded (with the outcomes `status` reported of
    /// earlier ones), or failed before touching anything (a refused
    /// revert). One that failed half way is kept as `failed`, for
    /// `status`, and is not resumed at start: the client heard of the
    /// failure, and a second rollback finishes the job.
    fn close_intent(&self, conn: &Connection, intent: i64, result: &Result<RollbackReport>) {
        let closed = match result {
            Ok(_) => catalogue::finish_intent(conn, intent),
            Err(e) => catalogue::intent(conn, intent).and_then(|found| match found {
                Some(i) if i.state == "applying" => {
                    let note =
                        format!("the {} to {} failed half way: {e}; a second rollback finishes it", i.kind, i.target);
                    catalogue::settle_intent(conn, &i, "failed", &note, now_ms())
                }
                _ => catalogue::end_intent(conn, intent),
            }),
        };
        if let Err(e) = closed {
            tracing::warn!(intent, "closing a restore intent: {e}");
        }
    }

    /// Finishes every restore a crash interrupted, before the daemon
    /// serves: one that had not yet touched the sandbox is run from the
    /// beginning; one that had is brought, path by path, to the versions
    /// its intent recorded (each step is idempotent). The outcome is kept
    /// for `status`.
    pub fn resume_interrupted(&self) -> Result<()> {
        let mut conn = self.db()?;
        for intent in catalogue::intents(&conn, &["pending", "applying"], None)? {
            let guard = self.sandbox_lock(intent.sandbox_id);
            let _held = lock(&guard);
            let outcome = self.resume_one(&mut conn, &intent);
            let (state, note) = match &outcome {
                Ok(n) => (
                    "resumed",
                    format!(
                        "the {} to {} interrupted by a daemon stop was finished at start ({n} paths)",
                        intent.kind, intent.target
                    ),
                ),
                Err(e) => (
                    "failed",
                    format!(
                        "the {} to {} interrupted by a daemon stop could not be finished: {e}",
                        intent.kind, intent.target
                    ),
                ),
            };
            tracing::warn!(intent = intent.id, "{note}");
            catalogue::settle_intent(&conn, &intent, state, &note, now_ms())?;
        }
        Ok(())
    }

    /// Finishes one interrupted restore; returns the number of paths it
    /// touched.
    fn resume_one(&self, conn: &mut Connection, intent: &catalogue::Intent) -> Result<u64> {
        let sandbox = catalogue::sandbox_by_id(conn, intent.sandbox_id)?;
        if intent.state == "pending" {
            // Nothing was touched yet: run it again under the same intent.
            let target = catalogue::checkpoint_by_ref(conn, &intent.target)?;
            let report = if intent.kind == "revert" {
                self.revert_intent(conn, &sandbox, &target, intent.force, (intent.id, IntentEnd::ByTheCaller))?
            } else {
                self.restore_intent(
                    conn,
                    &sandbox,
                    &target,
                    &intent.filter,
                    &intent.kind,
                    (intent.id, IntentEnd::ByTheCaller),
                )?
            };
            return Ok(report.restored + report.created + report.deleted);
        }
        let Desired { present, absent, relinked } = intent_desired(conn, &sandbox, intent)?;
        let live = self.live_state(conn, &sandbox)?;
        let wanted: std::collections::HashSet<&[u8]> =
            present.keys().map(Vec::as_slice).chain(absent.iter().map(Vec::as_slice)).collect();
        let live_side: Manifest = live.into_iter().filter(|(p, _)| wanted.contains(p.as_slice())).collect();
        let excludes = Excludes::new(&sandbox.excludes)?;
        let plan = Plan::new(&present, &live_side, &[], &excludes, relinked);
        let store = self.store(&sandbox.store)?;
        let root = self.open_root(&sandbox)?;
        let applied = plan.apply(root.as_fd(), &store, &self.apply_options(&sandbox))?;
        let touched: Vec<&[u8]> = wanted.into_iter().collect();
        crate::restore::remove_leftover_temps(root.as_fd(), &touched)?;
        // The state it restored becomes the head, as after a restore that
        // was not interrupted (nothing is written if that was done already).
        let skipped: std::collections::HashSet<&[u8]> = applied.skipped.iter().map(Vec::as_slice).collect();
        let desired = present
            .iter()
            .map(|(p, r)| (p.as_slice(), Some(&r.meta)))
            .chain(absent.iter().map(|p| (p.as_slice(), None)))
            .filter(|(p, _)| !skipped.contains(p));
        let reason = format!("{} to {}, finished at start", intent.kind, intent.target);
        self.record_restored(&sandbox, desired, &plan.linking(), root.as_fd(), reason, None);
        Ok(plan.steps.len() as u64)
    }

    /// Applies a restore plan (unless `safety` is `None`: a dry run) and
    /// builds the report. `total` is the number of target paths the plan
    /// covers.
    fn apply_plan(
        &self,
        sandbox: &Sandbox,
        plan: &Plan,
        store: &Store,
        applying: Option<Applying<'_>>,
        target_id: &str,
        total: u64,
    ) -> Result<RollbackReport> {
        let (safety, closes) = match applying {
            Some(Applying { safety, closes }) => (Some(safety), closes),
            None => (None, None),
        };
        let mut skipped = Vec::new();
        let mut restore_checkpoint = None;
        if let Some(safety) = safety {
            let started = Instant::now();
            let root = self.open_root(sandbox)?;
            let applied = plan.apply(root.as_fd(), store, &self.apply_options(sandbox))?;
            let apply_ms = ms_since(started);
            skipped = applied.skipped;
            let done: std::collections::HashSet<&[u8]> = skipped.iter().map(Vec::as_slice).collect();
            let desired = plan.desired().into_iter().filter(|(p, _)| !done.contains(p));
            let reason = format!("{} to {target_id}, after {}", restore_label(&safety.reason), safety.id);
            let linking = plan.linking();
            restore_checkpoint =
                self.record_restored(sandbox, desired, &linking, root.as_fd(), reason, closes).map(|c| c.id);
            tracing::debug!(sandbox = %sandbox.name, apply_ms, record_ms = ms_since(started) - apply_ms, "restore applied");
            if !applied.cloned.is_empty() {
                // After the answer, on a thread of its own: the answer does
                // not wait for what only the next checkpoint gains from.
                self.later(Later::Warm(root, applied.cloned));
            }
        }
        let (restored, created, deleted) = plan.counts();
        let paths_of = |f: fn(&Step) -> bool| -> Vec<WirePath> {
            plan.steps.iter().filter(|(_, s)| f(s)).map(|(p, _)| WirePath(p.clone())).collect()
        };
        Ok(RollbackReport {
            checkpoint: target_id.to_owned(),
            sandbox: sandbox.name.clone(),
            safety_checkpoint: safety.map(|s| s.id.clone()),
            restore_checkpoint,
            created_paths: paths_of(|s| matches!(s, Step::Create(_))),
            restored_paths: paths_of(|s| matches!(s, Step::Restore { .. })),
            dry_run: safety.is_none(),
            restored,
            created,
            deleted,
            unchanged: total.saturating_sub(restored + created),
            changed: plan.steps.keys().map(|p| WirePath(p.clone())).collect(),
            removed: paths_of(|s| matches!(s, Step::Delete(_))),
            skipped: skipped.into_iter().map(WirePath).collect(),
            conflicts: Vec::new(),
        })
    }

    /// Records the state a restore left as the sandbox's newest
    /// checkpoint, of kind `restore`: the head's versions, with `desired`
    /// (each path's restored version, or `None` for a path removed) put in
    /// place. So the next checkpoint, and a revert of it, hold the next step
    /// only, while `undo` still goes back to the safety checkpoint before
    /// the restore. Nothing is read again: the versions are the ones the
    /// restore wrote, and each file's stat is taken now, marked racy, so
    /// the next checkpoint reads again any of them that got an event. Paths
    /// that already hold their version write nothing; a restore that
    /// changed nothing records no checkpoint. A failure is logged: the
    /// restore is done, and the next checkpoint then counts its changes, as
    /// it would without this record.
    fn record_restored<'a>(
        &self,
        sandbox: &Sandbox,
        desired: impl Iterator<Item = (&'a [u8], Option<&'a crate::manifest::Meta>)>,
        linking: &std::collections::HashSet<&[u8]>,
        root: std::os::fd::BorrowedFd<'_>,
        reason: String,
        closes: Option<i64>,
    ) -> Option<CheckpointInfo> {
        let recorded = (|| {
            let mut conn = self.db()?;
            let sb = catalogue::sandbox_by_id(&conn, sandbox.id)?;
            let mut current = self.take_manifest(&conn, &sb)?;
            let mut ended = Vec::new();
            let mut added = Vec::new();
            for (path, want) in desired {
                let have = current.get(path);
                // A path written for its links alone gets a version for
                // its new inode.
                if have.map(|r| &r.meta) == want && !linking.contains(path) {
                    continue;
                }
                if let Some(r) = have {
                    ended.push((path.to_vec(), r.id, r.meta.kind, r.meta.size));
                }
                if let Some(meta) = want {
                    // Racy: the next checkpoint that meets it reads it again
                    // (its own writes are events for the watcher). Only the
                    // names of one file need their inode now, to be found
                    // as such; every other file a restore writes has one
                    // name.
                    let unknown = StatKey { ctime_ns: 0, ino: 0, racy: true, nlink: 1 };
                    let key = if linking.contains(path) {
                        let (dir, name) = sys::split_parent(path);
                        match sys::open_beneath(root, dir).and_then(|d| sys::lstatat(d.as_fd(), name)) {
                            Ok(st) => StatKey {
                                ctime_ns: sys::ctime_ns(&st),
                                ino: st.st_ino,
                                racy: true,
                                nlink: st.st_nlink.clamp(1, u32::MAX as u64) as u32,
                            },
                            Err(_) => unknown,
                        }
                    } else {
                        unknown
                    };
                    added.push(catalogue::NewRow { path: path.to_vec(), meta: meta.clone(), key });
                }
            }
            if ended.is_empty() && added.is_empty() {
                self.put_manifest(sb.id, sb.head_seq, current);
                return Ok(None);
            }
            let parent = catalogue::checkpoint_at(&conn, sb.id, sb.head_seq)?;
            let counts = Counts::after(
                parent.as_ref(),
                ended.iter().map(|(_, _, kind, size)| (*kind, *size)),
                added.iter().map(|a| (a.meta.kind, a.meta.size)),
            );
            let mut changed: Vec<&[u8]> =
                ended.iter().map(|(p, ..)| p.as_slice()).chain(added.iter().map(|a| a.path.as_slice())).collect();
            changed.sort();
            changed.dedup();
            let info = CheckpointInfo {
                id: ulid::Ulid::new().to_string(),
                sandbox: sb.name.clone(),
                seq: sb.head_seq + 1,
                parent: parent.map(|p| p.info.id),
                plan: None,
                reason: Some(reason),
                tool: None,
                phase: None,
                labels: Default::default(),
                kind: CheckpointKind::Restore,
                pinned: false,
                created_unix_ms: now_ns() / 1_000_000,
                files: counts.files,
                dirs: counts.dirs,
                symlinks: counts.symlinks,
                bytes: counts.bytes,
                changed: changed.len() as u64,
                exclusive_bytes: None,
                scanned: None,
                full_scan: None,
                broken: None,
            };
            let ended_ids: Vec<i64> = ended.iter().map(|(_, id, ..)| *id).collect();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let ids = catalogue::write_checkpoint(
                &tx,
                &CheckpointWrite {
                    info: &info,
                    sandbox_id: sb.id,
                    scan_start_ns: now_ns(),
                    ended: &ended_ids,
                    added: &added,
                    rekeyed: &[],
                },
            )?;
            if let Some(intent) = closes {
                // The restore is done: one commit ends its intent too.
                catalogue::finish_intent(&tx, intent)?;
            }
            tx.commit()?;
            let gone = ended.iter().map(|(p, ..)| p.as_slice());
            self.update_shared_names(sb.id, (sb.head_seq, info.seq), gone, &added, &[]);
            for (path, ..) in &ended {
                current.remove(path);
            }
            for (row, id) in added.into_iter().zip(ids) {
                current.insert(row.path, crate::manifest::Row { id, meta: row.meta, key: row.key });
            }
            self.put_manifest(sb.id, info.seq, current);
            Ok::<_, Error>(Some(info))
        })();
        recorded.unwrap_or_else(|e| {
            tracing::warn!(sandbox = %sandbox.name, "recording the restored state: {e}");
            None
        })
    }

    fn show(&self, peer: &Peer, reference: &str) -> Result<CheckpointInfo> {
        let c = self.checkpoint_ref(peer, reference)?;
        let conn = self.db()?;
        let sandbox = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
        let mut info = c.info;
        info.exclusive_bytes =
            Some(catalogue::checkpoint_exclusive_bytes(&conn, sandbox.id, info.seq, &sandbox.store)?);
        Ok(info)
    }

    fn plan_ref(&self, conn: &Connection, peer: &Peer, id: &str) -> Result<(catalogue::Plan, Sandbox)> {
        let missing = || Error::NotFound(format!("no plan {id:?}"));
        let plan = catalogue::plan(conn, id)?.ok_or_else(missing)?;
        let sandbox = catalogue::sandbox_by_id(conn, plan.sandbox_id)?;
        if !may_use(peer, &sandbox) {
            return Err(missing());
        }
        Ok((plan, sandbox))
    }

    fn plan_info(&self, conn: &Connection, plan: &catalogue::Plan, sandbox: &Sandbox) -> Result<PlanInfo> {
        Ok(PlanInfo {
            id: plan.id.clone(),
            sandbox: sandbox.name.clone(),
            state: plan.state,
            created_unix_ms: plan.created_ms,
            updated_unix_ms: plan.updated_ms,
            checkpoints: catalogue::checkpoints(conn, Some(sandbox.id), Some(&plan.id))?
                .into_iter()
                .map(|c| c.info)
                .collect(),
        })
    }

    fn plan_show(&self, peer: &Peer, id: &str) -> Result<PlanInfo> {
        let conn = self.db()?;
        let (plan, sandbox) = self.plan_ref(&conn, peer, id)?;
        self.plan_info(&conn, &plan, &sandbox)
    }

    /// Applies or abandons an active plan. Holds the sandbox's lock, so no
    /// rollback of the plan is between its guard and its work meanwhile.
    fn plan_close(&self, peer: &Peer, id: &str, state: PlanState) -> Result<PlanInfo> {
        let conn = self.db()?;
        let (_, sandbox) = self.plan_ref(&conn, peer, id)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        if !catalogue::close_plan(&conn, id, state, now_ns() / 1_000_000)? {
            let (plan, _) = self.plan_ref(&conn, peer, id)?;
            return Err(Error::InvalidRequest(format!(
                "plan {id} is {}, not active: it cannot become {}",
                plan.state.as_str(),
                state.as_str()
            )));
        }
        let (plan, sandbox) = self.plan_ref(&conn, peer, id)?;
        tracing::info!(plan = id, state = state.as_str(), "plan closed");
        self.plan_info(&conn, &plan, &sandbox)
    }

    fn plan_rollback(&self, peer: &Peer, req: PlanRollbackRequest) -> Result<RollbackReport> {
        let mut conn = self.db()?;
        let (_, sandbox) = self.plan_ref(&conn, peer, &req.plan)?;
        let target = self.checkpoint_ref(peer, &req.checkpoint)?;
        if target.info.plan.as_deref() != Some(req.plan.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "checkpoint {} is not part of plan {}",
                target.info.id, req.plan
            )));
        }
        let sandbox = self.active_sandbox(&conn, peer, &sandbox.name)?;
        let filter = rollback_filter(&sandbox, &req.paths)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        // The guard reads the catalogue under the sandbox's lock.
        refuse_if_applied(&conn, &req.plan)?;
        self.restore_to(&mut conn, &sandbox, &target, &filter, req.dry_run, "rollback")
    }

    fn revert(&self, peer: &Peer, req: RevertRequest) -> Result<RollbackReport> {
        let step = self.checkpoint_ref(peer, &req.checkpoint)?;
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox_by_id(&conn, peer, step.sandbox_id)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let step = still_there(&conn, &step)?;
        if let Some(plan) = &step.info.plan {
            refuse_if_applied(&conn, plan)?;
        }
        let intent = catalogue::begin_intent(&conn, sandbox.id, "revert", &step.info.id, &[], req.force, now_ms())?;
        let result = self.revert_intent(&mut conn, &sandbox, &step, req.force, (intent, IntentEnd::WithTheRestore));
        self.close_intent(&conn, intent, &result);
        result
    }

    /// The body of a revert whose intent `intent` is recorded; the caller
    /// holds the sandbox's lock.
    fn revert_intent(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        step: &Checkpoint,
        force: bool,
        (intent, end): (i64, IntentEnd),
    ) -> Result<RollbackReport> {
        let parent = catalogue::previous_checkpoint(conn, sandbox.id, step.info.seq)?.ok_or_else(|| {
            Error::InvalidRequest(format!(
                "{} is the first checkpoint of {}: there is no earlier state to revert its changes to",
                step.info.id, sandbox.name
            ))
        })?;
        refuse_if_broken(&parent)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let reason = format!("before revert of {}", step.info.id);
        // The plan is made in the safety checkpoint's transaction, from the
        // versions that changed between the step and now. A refused revert
        // rolls that transaction back: it leaves no checkpoint behind.
        let (safety, planned) = self.take_then(conn, sandbox.id, safety_checkpoint(reason), |tx, s| {
            let planned = revert_plan(tx, sandbox.id, (parent.info.seq, step.info.seq, s.seq), force, &excludes)?
                .map_err(|conflicts| {
                    let shown: Vec<String> = conflicts.iter().take(10).map(|p| capture::show(p)).collect();
                    Error::Conflict {
                        message: format!(
                            "{} path(s) changed by {} were changed again later ({}{}); nothing was reverted. \
                             `revert --force` takes the step's parent version for them",
                            conflicts.len(),
                            step.info.id,
                            shown.join(", "),
                            if conflicts.len() > shown.len() { ", ..." } else { "" }
                        ),
                        paths: conflicts,
                    }
                })?;
            catalogue::intent_applying(tx, intent, &s.id, now_ms())?;
            catalogue::record_rollback(tx, sandbox.id, "revert", &step.info.id, &s.id, now_ms())?;
            Ok(planned)
        })?;
        self.stop_after_safety_hook();
        let Reverting { plan, conflicts, step_paths } = planned;
        let store = self.store(&sandbox.store)?;
        let total = step_paths as u64;
        let closes = (end == IntentEnd::WithTheRestore).then_some(intent);
        let applying = Applying { safety: &safety, closes };
        let mut report = self.apply_plan(sandbox, &plan, &store, Some(applying), &step.info.id, total)?;
        self.retain(sandbox.id);
        report.unchanged = total.saturating_sub(report.restored + report.created + report.deleted);
        report.conflicts = conflicts.into_iter().map(WirePath).collect();
        Ok(report)
    }

    fn undo(&self, peer: &Peer, req: UndoRequest) -> Result<RollbackReport> {
        let mut conn = self.db()?;
        let sandbox = self.active_sandbox(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let (kind, target, safety) = catalogue::latest_rollback(&conn, sandbox.id)?.ok_or_else(|| {
            Error::NotFound(format!("nothing to undo: {} has had no rollback or revert", sandbox.name))
        })?;
        let back = catalogue::checkpoint_by_ref(&conn, &safety).map_err(|_| {
            Error::NotFound(format!("the safety checkpoint {safety} of the last {kind} (to {target}) is gone"))
        })?;
        self.restore_to(&mut conn, &sandbox, &back, &[], false, "undo")
    }

    fn prune(&self, peer: &Peer, req: PruneRequest) -> Result<PruneReport> {
        let mut conn = self.db()?;
        let sandbox = self.sandbox_ref(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let mut policy = self.retention.policy(&sandbox.name);
        if let Some(n) = req.keep_last {
            policy.keep_last = n;
        }
        if let Some(secs) = req.keep_within_secs {
            policy.keep_within_ms = Some(secs.saturating_mul(1000).min(i64::MAX as u64) as i64);
        }
        let (pruned, freed_bytes) = self.enforce_retention(&mut conn, &sandbox, &policy, "`snapback prune`")?;
        Ok(PruneReport {
            sandbox: sandbox.name.clone(),
            pruned,
            kept: catalogue::checkpoint_count(&conn, sandbox.id)?,
            freed_bytes,
        })
    }

    /// Prunes what `policy` does not keep, then, with a budget, the oldest
    /// prunable checkpoints while the sandbox's exclusive bytes exceed it.
    /// Returns the pruned ids and the bytes freed. The caller holds the
    /// sandbox's lock.
    fn enforce_retention(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        policy: &Policy,
        why: &str,
    ) -> Result<(Vec<String>, u64)> {
        let started = Instant::now();
        let candidates = catalogue::retention_candidates(conn, sandbox.id)?;
        let Some(newest) = candidates.last().map(|c| c.seq) else {
            return Ok((Vec::new(), 0));
        };
        let protected: std::collections::HashSet<String> =
            catalogue::latest_rollback(conn, sandbox.id)?.into_iter().map(|(_, _, safety)| safety).collect();
        let keep = retention::kept(&candidates, policy, now_ns() / 1_000_000, &protected);
        let (victims, survivors): (Vec<_>, Vec<_>) = candidates
            .iter()
            .filter(|c| retention::prunable(c, newest, &protected))
            .partition(|c| !keep.contains(&c.id));
        let mut pruned: Vec<String> = victims.iter().map(|c| c.id.clone()).collect();
        let mut freed = self.delete_checkpoints(conn, sandbox, &pruned, why)?;
        if let Some(budget) = policy.budget_bytes {
            let mut budget_pruned = 0;
            for c in survivors {
                if catalogue::sandbox_exclusive_bytes(conn, sandbox.id, &sandbox.store)? <= budget {
                    break;
                }
                freed += self.delete_checkpoints(conn, sandbox, std::slice::from_ref(&c.id), "the storage budget")?;
                pruned.push(c.id.clone());
                budget_pruned += 1;
            }
            if budget_pruned > 0 {
                catalogue::add_budget_pruned(conn, sandbox.id, budget_pruned)?;
                tracing::info!(sandbox = %sandbox.name, budget, pruned = budget_pruned, "pruned to fit the storage budget");
            }
        }
        if !pruned.is_empty() {
            tracing::info!(sandbox = %sandbox.name, pruned = pruned.len(), freed, ms = ms_since(started), "retention");
        }
        Ok((pruned, freed))
    }

    /// Deletes checkpoints in one transaction, then the objects nothing
    /// references any more. Returns the bytes freed.
    fn delete_checkpoints(&self, conn: &mut Connection, sandbox: &Sandbox, ids: &[String], why: &str) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Immediate: it reads before it writes, and a deferred transaction
        // whose snapshot a concurrent commit (the log checkpointer's) made
        // stale fails at its first write instead of waiting.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let objects = catalogue::delete_checkpoints(&tx, sandbox.id, ids, why, now_ms())?;
        tx.commit()?;
        let store = self.store(&sandbox.store)?;
        let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let dead = catalogue::unreferenced(conn, &sandbox.store, &objects)?;
        store.remove_objects(&dead).ctx(|| format!("removing objects from {}", store.path().display()))
    }

    /// Writes a checkpoint out as a new read-only tree, with the caller's
    /// filesystem credentials (see [`access::with_caller_creds`]): the
    /// destination's parent is opened from `/` as the caller, without
    /// following a symlink, and everything is created in it through that
    /// fd. Content the caller could not have read is withheld.
    fn export(&self, peer: &Peer, req: ExportRequest) -> Result<ExportReport> {
        let c = self.checkpoint_ref(peer, &req.checkpoint)?;
        let conn = self.db()?;
        let sandbox = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
        let dest = clean_path("the export", req.dir.as_bytes())?;
        let (parent, name) = sys::split_parent(&dest);
        if name.is_empty() {
            return Err(Error::InvalidRequest("cannot export into /".into()));
        }
        let parent = if parent.is_empty() { b"/".as_slice() } else { parent };
        let shown = path_of(&dest).display().to_string();
        let overlaps = |a: &[u8], b: &[u8]| is_within(a, b) || is_within(b, a);
        if overlaps(&dest, &bytes_of(&self.state_dir)) {
            return Err(Error::InvalidRequest("cannot export into the daemon's state directory".into()));
        }
        for other in catalogue::sandboxes(&conn)? {
            if overlaps(&dest, &other.root) || overlaps(&dest, &other.store) {
                return Err(Error::InvalidRequest(format!("{shown} overlaps the sandbox {} or its store", other.name)));
            }
        }
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let rows = catalogue::rows_at(&conn, sandbox.id, c.info.seq)?;
        let store = self.store(&sandbox.store)?;
        let report = access::with_caller_creds(peer, |acting| {
            let parent_fd =
                sys::open_dir_pinned(parent).map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))?;
            crate::export::export(&rows, parent_fd.as_fd(), name, &store, peer, acting)
        })
        .ctx(|| format!("exporting into {shown}"))?;
        let notes =
            |v: Vec<(Vec<u8>, String)>| v.into_iter().map(|(p, why)| PathNote { path: WirePath(p), why }).collect();
        Ok(ExportReport {
            checkpoint: c.info.id,
            dir: WirePath(dest),
            files: report.files,
            dirs: report.dirs,
            symlinks: report.symlinks,
            cloned: report.cloned,
            hardlinked: 0,
            withheld: notes(report.withheld),
            skipped: notes(report.skipped),
        })
    }

    /// Checks every store against the catalogue. Holds each store's
    /// collection lock, so no checkpoint's objects are half-referenced.
    fn verify(&self, peer: &Peer) -> Result<VerifyReport> {
        if peer.uid != 0 && peer.uid != sys::euid() {
            return Err(Error::PermissionDenied("verify checks every sandbox's store: run it as root".into()));
        }
        let mut conn = self.db()?;
        let current_twice = catalogue::paths_current_twice(&conn)?
            .into_iter()
            .map(|(sandbox, path)| SandboxPath { sandbox, path: WirePath(path) })
            .collect();
        let mut report = VerifyReport {
            objects: 0,
            missing: vec![],
            corrupt: vec![],
            unreferenced: vec![],
            broken: vec![],
            current_twice,
        };
        let mut bad = Vec::new();
        let mut stores = catalogue::stores(&conn)?;
        let default = bytes_of(&self.default_store);
        if !stores.contains(&default) {
            stores.push(default);
        }
        for store_path in stores {
            let store = self.store(&store_path)?;
            let _still = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let referenced = catalogue::referenced_objects(&conn, &store_path)?;
            for (id, size) in &referenced {
                report.objects += 1;
                match store.check_object(id, *size) {
                    Ok(true) => {}
                    Ok(false) => {
                        report.corrupt.push(id.to_string());
                        bad.push((*id, format!("object {id} is corrupt (wrong size or content)")));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        report.missing.push(id.to_string());
                        bad.push((*id, format!("object {id} is missing from its store")));
                    }
                    Err(e) => return Err(e).ctx(|| format!("checking object {id}")),
                }
            }
            let present = store.list_objects().ctx(|| format!("listing {}", store.path().display()))?;
            report
                .unreferenced
                .extend(present.into_iter().filter(|id| !referenced.contains_key(id)).map(|id| id.to_string()));
        }
        // Reported, and recorded so that no rollback restores garbage; the
        // objects themselves are left as they are.
        report.broken = catalogue::mark_broken(&mut conn, &bad)?;
        Ok(report)
    }

    fn status(&self, peer: &Peer) -> Result<StatusReport> {
        let conn = self.db()?;
        let mut sandboxes = Vec::new();
        for mut s in catalogue::sandboxes(&conn)? {
            if !may_use(peer, &s) {
                continue;
            }
            self.recheck_root(&conn, &mut s);
            let last = match s.head_seq {
                0 => None,
                head => catalogue::checkpoint_at(&conn, s.id, head)?.map(|c| c.info.id),
            };
            let budget_bytes = self.retention.policy(&s.name).budget_bytes;
            let exclusive_bytes = match budget_bytes {
                Some(_) => Some(catalogue::sandbox_exclusive_bytes(&conn, s.id, &s.store)?),
                None => None,
            };
            let report = self.watch_of(s.id).map(|w| w.report());
            let (watch, dirty_paths) = match &report {
                Some(r) => (r.state.clone(), r.dirty),
                None => ("not watching".to_string(), 0),
            };
            let watched_dirs = match (report.is_some_and(|r| r.watching), s.head_seq) {
                (false, _) => 0,
                (true, 0) => 1,
                (true, head) => catalogue::checkpoint_at(&conn, s.id, head)?.map_or(1, |c| c.info.dirs + 1),
            };
            let recovery = catalogue::intents(&conn, &["resumed", "failed"], Some(s.id))?.pop().and_then(|i| i.note);
            sandboxes.push(SandboxStatus {
                recovery,
                watch,
                watched_dirs,
                dirty_paths,
                budget_bytes,
                exclusive_bytes,
                budget_pruned: catalogue::budget_pruned(&conn, s.id)?,
                name: s.name.clone(),
                path: WirePath(s.root.clone()),
                state: shown_state(&s).into(),
                clone_method: s.clone_method,
                checkpoints: catalogue::checkpoint_count(&conn, s.id)?,
                store_bytes: catalogue::store_bytes(&conn, s.id)?,
                last_checkpoint: last,
            });
        }
        Ok(StatusReport {
            daemon: daemon_name(),
            protocol: PROTOCOL,
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            state_dir: WirePath(bytes_of(&self.state_dir)),
            socket: WirePath(bytes_of(&self.socket)),
            sandboxes,
        })
    }
}

/// The plan of a rollback or undo to checkpoint `target` whose safety
/// checkpoint is `now`: the paths that differ between the two (within
/// `filter`) go back to their versions at `target`. Also returns the two
/// sides of the difference. Made in the safety checkpoint's transaction,
/// and again from the committed catalogue when a crash cut the restore
/// short (see [`intent_desired`]).
fn restore_plan(
    conn: &Connection,
    sandbox_id: i64,
    target: u64,
    now: u64,
    filter: &[Vec<u8>],
    excludes: &Excludes,
) -> Result<(Plan, Manifest, Manifest)> {
    let (mut t_side, mut l_side) = catalogue::rows_between(conn, sandbox_id, target, now)?;
    let linked = catalogue::LinkedAt { conn, sandbox_id, target, live: now };
    let relinked = crate::links::relink(&linked, &mut t_side, &mut l_side, true)?;
    let plan = Plan::new(&t_side, &l_side, filter, excludes, relinked);
    Ok((plan, t_side, l_side))
}

/// What a revert does.
struct Reverting {
    plan: Plan,
    /// Paths the step changed that were changed again after it.
    conflicts: Vec<Vec<u8>>,
    /// How many paths the step changed.
    step_paths: usize,
}

/// The plan of a revert of checkpoint `step` (`parent` is the checkpoint
/// before it) whose safety checkpoint is `now` (seqs, in that order): each
/// path the step changed goes back to its version at `parent`. Its live
/// version is its version at the step, unless it changed again later: those
/// paths conflict, and unless `force` the revert is refused (`Err`, with
/// them). Made like [`restore_plan`].
fn revert_plan(
    conn: &Connection,
    sandbox_id: i64,
    (parent, step, now_seq): (u64, u64, u64),
    force: bool,
    excludes: &Excludes,
) -> Result<std::result::Result<Reverting, Vec<Vec<u8>>>> {
    let (before, after) = catalogue::rows_between(conn, sandbox_id, parent, step)?;
    let step_paths = changed_paths(&before, &after);
    let (then, now) = catalogue::rows_between(conn, sandbox_id, step, now_seq)?;
    let later: std::collections::HashSet<Vec<u8>> = changed_paths(&then, &now).into_iter().collect();
    // A path to put back whose directory was removed (or became something
    // else) after the step conflicts too: putting it back would undo that
    // later change.
    let dir_gone_later = |p: &[u8]| {
        let mut up = p;
        while let Some(i) = up.iter().rposition(|&b| b == b'/') {
            up = &up[..i];
            let was_dir = then.get(up).is_some_and(|r| r.meta.kind == Kind::Dir);
            if was_dir && now.get(up).is_none_or(|r| r.meta.kind != Kind::Dir) {
                return true;
            }
        }
        false
    };
    let conflicts: Vec<Vec<u8>> = step_paths
        .iter()
        .filter(|p| later.contains(*p) || (before.contains_key(*p) && dir_gone_later(p)))
        .cloned()
        .collect();
    if !conflicts.is_empty() && !force {
        return Ok(Err(conflicts));
    }
    let mut target = Manifest::default();
    let mut live = Manifest::default();
    for p in &step_paths {
        if let Some(row) = before.get(p) {
            target.insert(p.clone(), row.clone());
        }
        let at_now = if later.contains(p) { now.get(p) } else { after.get(p) };
        if let Some(row) = at_now {
            live.insert(p.clone(), row.clone());
        }
    }
    let linked = catalogue::LinkedAt { conn, sandbox_id, target: parent, live: now_seq };
    let relinked = crate::links::relink(&linked, &mut target, &mut live, false)?;
    let plan = Plan::new(&target, &live, &[], excludes, relinked);
    Ok(Ok(Reverting { plan, conflicts, step_paths: step_paths.len() }))
}

/// What an interrupted restore must still bring about.
struct Desired {
    /// The version each path must end with.
    present: Manifest,
    /// The paths that must not exist.
    absent: Vec<Vec<u8>>,
    /// Paths written for their links alone (see [`Plan::new`]).
    relinked: std::collections::BTreeSet<Vec<u8>>,
}

/// The version every path an `applying` intent touches must end with, and
/// the paths that must not exist: made again from its target and safety
/// checkpoint, as the interrupted request made them (nothing in the
/// sandbox's history changes while a restore holds its lock, and neither
/// checkpoint can be pruned before the restore is finished), or read as an
/// earlier daemon recorded them.
fn intent_desired(conn: &Connection, sandbox: &Sandbox, intent: &catalogue::Intent) -> Result<Desired> {
    let recorded = catalogue::intent_paths(conn, intent.id)?;
    if !recorded.0.is_empty() || !recorded.1.is_empty() {
        return Ok(Desired { present: recorded.0, absent: recorded.1, relinked: Default::default() });
    }
    let safety = intent
        .safety
        .as_deref()
        .ok_or_else(|| Error::Internal(format!("the applying intent {} names no safety checkpoint", intent.id)))?;
    let now = catalogue::checkpoint_by_ref(conn, safety)?.info.seq;
    let target = catalogue::checkpoint_by_ref(conn, &intent.target)?;
    let excludes = Excludes::new(&sandbox.excludes)?;
    let plan = if intent.kind == "revert" {
        let parent = catalogue::previous_checkpoint(conn, sandbox.id, target.info.seq)?
            .ok_or_else(|| Error::Internal(format!("the checkpoint before {} is gone", target.info.id)))?;
        revert_plan(conn, sandbox.id, (parent.info.seq, target.info.seq, now), intent.force, &excludes)?
            .map_err(|_| Error::Internal(format!("the revert of {} now conflicts", target.info.id)))?
            .plan
    } else {
        restore_plan(conn, sandbox.id, target.info.seq, now, &intent.filter, &excludes)?.0
    };
    let mut present = Manifest::default();
    let mut absent = Vec::new();
    for (path, meta) in plan.desired() {
        match meta {
            Some(meta) => {
                let key = crate::manifest::StatKey { ctime_ns: 0, ino: 0, racy: false, nlink: 1 };
                present.insert(path.to_vec(), crate::manifest::Row { id: 0, meta: meta.clone(), key });
            }
            None => absent.push(path.to_vec()),
        }
    }
    // Names of one file keep a key of their own, so that the plan made
    // again from these finds the same groups.
    for (i, group) in plan.links.iter().enumerate() {
        for path in group {
            if let Some(row) = present.get_mut(path) {
                row.key = crate::manifest::StatKey { ctime_ns: 0, ino: i as u64 + 1, racy: false, nlink: 2 };
            }
        }
    }
    Ok(Desired { present, absent, relinked: plan.relinked })
}

/// What a restore was, from its safety checkpoint's reason (`before
/// rollback to X`): `rollback`, `revert of X` or `undo`.
fn restore_label(safety_reason: &Option<String>) -> &str {
    let reason = safety_reason.as_deref().unwrap_or("restore");
    let reason = reason.strip_prefix("before ").unwrap_or(reason);
    reason.split(" to ").next().unwrap_or(reason)
}

/// The recorded names of inodes that `captured` found with more than one
/// name, which it did not read itself and which were not `asked` for
/// already: a new link changes the link count (and ctime) of the file's
/// other names with no event for them, so they must be read again, or a
/// later write through the new name would leave them stale.
fn other_names(current: &Manifest, captured: &Captured, asked: &std::collections::HashSet<Vec<u8>>) -> Vec<Vec<u8>> {
    let read: std::collections::HashSet<&[u8]> = captured
        .added
        .iter()
        .map(|a| a.path.as_slice())
        .chain(captured.rekeyed.iter().map(|(p, ..)| p.as_slice()))
        .collect();
    let linked: std::collections::HashSet<u64> = captured
        .added
        .iter()
        .filter(|a| a.meta.kind == Kind::File && a.key.nlink > 1)
        .map(|a| a.key.ino)
        .chain(captured.rekeyed.iter().filter(|(_, _, k)| k.nlink > 1).map(|(_, _, k)| k.ino))
        .collect();
    if linked.is_empty() {
        return Vec::new();
    }
    current
        .iter()
        .filter(|(_, r)| r.meta.kind == Kind::File && linked.contains(&r.key.ino))
        .filter(|(p, _)| !read.contains(p.as_slice()) && !asked.contains(*p))
        .map(|(p, _)| p.clone())
        .collect()
}

/// A restore being applied (not a dry run): its safety checkpoint, and the
/// intent its restore checkpoint ends, if it is the one to.
struct Applying<'a> {
    safety: &'a CheckpointInfo,
    closes: Option<i64>,
}

/// Who ends a restore's intent once the restore is done.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IntentEnd {
    /// The commit of its restore checkpoint (one commit for both); the
    /// request's own close finds it gone.
    WithTheRestore,
    /// The caller: a restore finished at start, whose outcome is kept for
    /// `status`.
    ByTheCaller,
}

/// What a checkpoint holds, by kind: its files, directories and symlinks,
/// and its files' bytes.
struct Counts {
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
}

impl Counts {
    /// The counts of a checkpoint made from `parent` (none: the first) by
    /// ending the versions `ended` and adding `added` (each its kind and
    /// size).
    fn after(
        parent: Option<&Checkpoint>,
        ended: impl Iterator<Item = (Kind, u64)>,
        added: impl Iterator<Item = (Kind, u64)>,
    ) -> Counts {
        let mut n = parent.map_or([0i64; 4], |p| {
            [p.info.files as i64, p.info.dirs as i64, p.info.symlinks as i64, p.info.bytes as i64]
        });
        let signed = ended.map(|v| (v, -1)).chain(added.map(|v| (v, 1)));
        for ((kind, size), sign) in signed {
            match kind {
                Kind::File => {
                    n[0] += sign;
                    n[3] += sign * size as i64;
                }
                Kind::Dir => n[1] += sign,
                Kind::Symlink => n[2] += sign,
                Kind::Special => {}
            }
        }
        let [files, dirs, symlinks, bytes] = n.map(|c| c.max(0) as u64);
        Counts { files, dirs, symlinks, bytes }
    }
}

/// A safety checkpoint's request: taken by the daemon before it changes a
/// sandbox.
fn safety_checkpoint(reason: String) -> NewCheckpoint {
    NewCheckpoint { kind: CheckpointKind::Safety, reason: Some(reason), ..NewCheckpoint::default() }
}

/// Reads a checkpoint named by a request again, under the sandbox's lock:
/// retention may have pruned it since.
fn still_there(conn: &Connection, c: &Checkpoint) -> Result<Checkpoint> {
    catalogue::checkpoint_by_ref(conn, &c.info.id).map_err(|e| match e {
        Error::NotFound(_) => {
            Error::NotFound(format!("checkpoint {} was pruned before it could be restored", c.info.id))
        }
        e => e,
    })
}

/// Refuses to restore from a checkpoint `verify` found broken.
fn refuse_if_broken(target: &Checkpoint) -> Result<()> {
    match &target.info.broken {
        Some(why) => Err(Error::InvalidRequest(format!(
            "checkpoint {} is broken ({why}); it cannot be restored. Pick another with `snapback list`",
            target.info.id
        ))),
        None => Ok(()),
    }
}

/// Refuses when `plan` is applied: the guard reads the catalogue.
fn refuse_if_applied(conn: &Connection, plan: &str) -> Result<()> {
    match catalogue::plan(conn, plan)? {
        Some(p) if p.state == PlanState::Applied => Err(Error::PlanApplied(format!(
            "plan {plan} was applied: its checkpoints can no longer be rolled back or reverted"
        ))),
        _ => Ok(()),
    }
}

/// Checks that a checkpoint may join `plan`: it is new, or active and of
/// the same sandbox.
fn check_plan_open(conn: &Connection, plan: &str, sandbox: &Sandbox) -> Result<()> {
    match catalogue::plan(conn, plan)? {
        None => Ok(()),
        Some(p) if p.sandbox_id != sandbox.id => {
            Err(Error::InvalidRequest(format!("plan {plan} belongs to another sandbox")))
        }
        Some(p) => match p.state {
            PlanState::Active => Ok(()),
            PlanState::Applied => {
                Err(Error::PlanApplied(format!("plan {plan} was applied: it takes no more checkpoints")))
            }
            PlanState::Abandoned => {
                Err(Error::InvalidRequest(format!("plan {plan} was abandoned: it takes no more checkpoints")))
            }
        },
    }
}

/// Returns the paths whose versions differ between two sides of a
/// difference, sorted.
fn changed_paths(a: &Manifest, b: &Manifest) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = a
        .iter()
        .filter(|(p, r)| b.get(*p).is_none_or(|o| o.meta != r.meta))
        .map(|(p, _)| p.clone())
        .chain(b.keys().filter(|p| !a.contains_key(*p)).cloned())
        .collect();
    out.sort();
    out.dedup();
    out
}

fn rollback_filter(sandbox: &Sandbox, paths: &[WirePath]) -> Result<Vec<Vec<u8>>> {
    paths.iter().map(|p| relative_to_root(&sandbox.root, p.as_bytes())).collect()
}

/// Returns the daemon's name and version, as sent in `welcome`.
pub fn daemon_name() -> String {
    format!("snapbackd {}", env!("CARGO_PKG_VERSION"))
}

/// Returns, of two states, the versions of each that the other does not
/// hold identically: (only or different in `a`, only or different in `b`).
fn differences(a: &Manifest, b: &Manifest) -> (Manifest, Manifest) {
    let mut a_side = Manifest::default();
    let mut b_side = Manifest::default();
    for (path, row) in a {
        if b.get(path).is_none_or(|other| other.meta != row.meta) {
            a_side.insert(path.clone(), row.clone());
        }
    }
    for (path, row) in b {
        if a.get(path).is_none_or(|other| other.meta != row.meta) {
            b_side.insert(path.clone(), row.clone());
        }
    }
    (a_side, b_side)
}

/// Lists how each path differs from `from` to `to`, sorted by path.
fn changes(from: &Manifest, to: &Manifest) -> Vec<Change> {
    let mut out = Vec::new();
    for (path, f) in from {
        let change = match to.get(path) {
            None => ChangeKind::Deleted,
            Some(t) if t.meta.kind != f.meta.kind => ChangeKind::TypeChanged,
            Some(t) if t.meta != f.meta => ChangeKind::Modified,
            Some(_) => continue,
        };
        out.push(Change { path: WirePath(path.clone()), change });
    }
    for path in to.keys() {
        if !from.contains_key(path) {
            out.push(Change { path: WirePath(path.clone()), change: ChangeKind::Added });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Refuses to start on a catalogue that holds nothing (missing, a 0-byte
/// file, no schema) while the default store beside it holds objects: the
/// catalogue that knew them was lost, and a new one would find every object
/// unreferenced and collect it. Checked before the catalogue is written.
fn refuse_new_catalogue_beside_objects(state: &OwnedFd, state_dir: &Path, db_path: &Path) -> Result<()> {
    if !catalogue::is_new(db_path)? {
        return Ok(());
    }
    let store = match sys::openat(state.as_fd(), b"store", sys::DIR_FLAGS, 0) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("opening the store in {}", state_dir.display())),
    };
    if !crate::store::holds_objects(store.as_fd()).ctx(|| format!("reading the store in {}", state_dir.display()))? {
        return Ok(());
    }
    Err(Error::Internal(format!(
        "the catalogue {0}/catalogue.db is missing or empty, but the store {0}/store holds the objects of \
         checkpoints: snapbackd does not start, so that none of them is collected. Restore catalogue.db \
         from a backup; or, to start afresh on purpose, move {0}/store away first",
        state_dir.display()
    )))
}

/// Checks that a path from a request is clean and absolute (no `.`, `..`
/// or empty component: see [`sys::clean_components`]), and returns it
/// without a trailing `/`. Symlinks are not resolved, here or anywhere in
/// the daemon: the client resolves its own (the CLI does), with its own
/// rights, and the daemon refuses any it meets.
fn clean_path(what: &str, p: &[u8]) -> Result<Vec<u8>> {
    match sys::clean_components(p) {
        Some(parts) if parts.is_empty() => Ok(b"/".to_vec()),
        Some(_) => Ok(p.strip_suffix(b"/").unwrap_or(p).to_vec()),
        None => Err(Error::InvalidRequest(format!(
            "{what} {} is not a clean absolute path (no `.`, `..` or `//`)",
            WirePath(p.to_vec()).display()
        ))),
    }
}

/// The state a sandbox is shown in: `moved` once its root was found to be
/// another directory, else its recorded state.
fn shown_state(s: &Sandbox) -> &str {
    if s.moved.is_some() && s.state == "active" { "moved" } else { &s.state }
}

/// Turns a `--path` argument into a clean sandbox-relative path: relative
/// paths are taken from the sandbox root, absolute ones must lie below it.
fn relative_to_root(root: &[u8], p: &[u8]) -> Result<Vec<u8>> {
    let mut rel: &[u8] = if p.first() == Some(&b'/') {
        if !is_within(p, root) {
            return Err(Error::InvalidRequest(format!(
                "{} is outside the sandbox {}",
                WirePath(p.to_vec()).display(),
                path_of(root).display()
            )));
        }
        &p[root.len()..]
    } else {
        p
    };
    while let Some(r) = rel.strip_prefix(b"/").or_else(|| rel.strip_prefix(b"./")) {
        rel = r;
    }
    while let Some(r) = rel.strip_suffix(b"/") {
        rel = r;
    }
    if rel.is_empty() || rel == b"." {
        return Ok(Vec::new());
    }
    sys::check_relative(rel).map_err(|_| {
        Error::InvalidRequest(format!("{} is not a path inside the sandbox", WirePath(p.to_vec()).display()))
    })?;
    Ok(rel.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_paths_are_made_relative_to_the_root() {
        assert_eq!(relative_to_root(b"/s", b"a/b/").unwrap(), b"a/b");
        assert_eq!(relative_to_root(b"/s", b"./a").unwrap(), b"a");
        assert_eq!(relative_to_root(b"/s", b"/s/a").unwrap(), b"a");
        assert_eq!(relative_to_root(b"/s", b"/s").unwrap(), b"");
        assert!(relative_to_root(b"/s", b"/t/a").is_err());
        assert!(relative_to_root(b"/s", b"a/../../etc").is_err());
    }

    /// An engine (no watcher) on a temporary state directory, with sandbox
    /// `s` (id 1) holding the file `a`: "one".
    fn test_engine() -> (tempfile::TempDir, PathBuf, Engine, Peer) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sandbox");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a"), b"one").unwrap();
        let config = crate::Config {
            socket: dir.path().join("sock"),
            listener: None,
            socket_group: None,
            state_dir: dir.path().join("state"),
            retention: Default::default(),
            auto_checkpoints: Default::default(),
            watch: false,
            default_excludes: vec![],
            register: vec![],
            limits: Default::default(),
            durability: Default::default(),
        };
        let engine = Engine::open(&config).unwrap();
        let peer = Peer::daemon();
        let add =
            SandboxAdd { path: WirePath::from(root.as_path()), name: Some("s".into()), excludes: vec![], store: None };
        engine.sandbox_add(&peer, add).unwrap();
        (dir, root, engine, peer)
    }

    #[test]
    fn verify_reports_a_path_with_two_current_versions() {
        let (_dir, _root, engine, peer) = test_engine();
        engine.checkpoint(&peer, CheckpointRequest { sandbox: "s".into(), ..Default::default() }).unwrap();
        let report = engine.verify(&peer).unwrap();
        assert!(report.clean(), "{report:?}");
        // A second current version of `a`, as a write from a manifest that
        // lacked it would have added.
        let conn = engine.db().unwrap();
        conn.execute(
            "INSERT INTO entries (sandbox_id, path, start_seq, kind, mode, uid, gid, size, mtime_ns, ctime_ns, ino)
             SELECT sandbox_id, path, start_seq, kind, mode, uid, gid, size, mtime_ns, ctime_ns, ino FROM entries",
            [],
        )
        .unwrap();
        drop(conn);
        let report = engine.verify(&peer).unwrap();
        assert_eq!(report.current_twice, [SandboxPath { sandbox: "s".into(), path: WirePath(b"a".to_vec()) }]);
        assert!(!report.clean());
    }

    #[test]
    fn a_manifest_the_catalogue_refuses_is_read_again_by_the_next_checkpoint() {
        let (_dir, root, engine, peer) = test_engine();
        let take = || engine.checkpoint(&peer, CheckpointRequest { sandbox: "s".into(), ..Default::default() });
        take().unwrap();
        let (seq, stale) = lock(&engine.manifests).get(&1).cloned().unwrap();
        std::fs::write(root.join("a"), b"two").unwrap();
        take().unwrap();
        // The manifest of the first checkpoint, passed off as the second's:
        // its version of `a` ended at the second.
        assert_eq!(seq, 1);
        lock(&engine.manifests).insert(1, (2, stale));
        std::fs::write(root.join("a"), b"three").unwrap();
        let err = take().unwrap_err();
        assert!(matches!(err, Error::Stale(_)), "{err}");
        let third = take().unwrap();
        assert_eq!(third.seq, 3);
        let conn = engine.db().unwrap();
        let current = catalogue::current_rows(&conn, 1).unwrap();
        assert_eq!(current.keys().collect::<Vec<_>>(), [b"a"]);
        assert_eq!(current[&b"a"[..]].meta.size, 5, "the third checkpoint holds `three`");
        assert_eq!(catalogue::count_at(&conn, 1, 3).unwrap(), 1);
    }
}
