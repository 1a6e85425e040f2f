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
use crate::catalogue::{self, Checkpoint, CheckpointWrite, IntentKind, IntentState, Sandbox, SandboxState};
use crate::config::Retention;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Kind, Manifest, ObjectId, StatKey, has_other_names, is_within};
use crate::progress;
use crate::restore::{Plan, Step, selected};
use crate::retention::{self, Policy};
use crate::store::{Pack, Store};
use crate::sys::{self, Identity};
use crate::watcher::{Drain, SandboxWatch, Touched};

mod admin;
mod checkpoint;
mod collector;
mod compare;
mod deferred;
mod hasher;
mod plans;
mod preview;
mod pruner;
mod record;
mod recovery;
mod review;
mod rollback;
mod sandboxes;
mod watches;

pub use admin::daemon_name;
use checkpoint::*;
pub use deferred::After;
pub(crate) use deferred::set_heap_thresholds;
use deferred::*;
use plans::*;
use pruner::*;
use record::*;
use rollback::*;
use sandboxes::*;

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

/// The daemon's state between requests, in named parts. Nothing here
/// guards an operation: the catalogue is the record, and each sandbox's
/// lock orders the operations on it.
pub struct Engine {
    state_dir: PathBuf,
    /// The state directory, held open: the catalogue is reached through it.
    _state_fd: OwnedFd,
    /// The catalogue's id, which each of its stores records.
    catalogue_id: String,
    socket: PathBuf,
    started: Instant,
    /// Catalogue connections.
    pool: Pool,
    /// Object stores, opened once each.
    stores: Stores,
    /// What the catalogue says, kept in memory between checkpoints.
    cache: Cache,
    /// Retention: the policy and what checkpoints owe.
    pruner: Pruner,
    /// Watchers and automatic checkpoints.
    watching: Watching,
    /// One lock per sandbox, held by the operations that change it.
    locks: Mutex<HashMap<i64, Arc<Mutex<()>>>>,
    /// Exclude globs added to every sandbox registered.
    default_excludes: Vec<String>,
    /// When checkpoints and rollbacks are acknowledged.
    durability: crate::config::Durability,
    /// Files larger than this are summarised in a diff, not diffed.
    diff_max_bytes: u64,
}

/// Catalogue connections (see [`Engine::db`]).
struct Pool {
    /// The catalogue, through the state directory's fd.
    path: PathBuf,
    /// Idle connections, reused by requests.
    idle: Mutex<Vec<Connection>>,
    /// Copies the catalogue's write-ahead log back after writes.
    wal: crate::wal::WalCheckpointer,
}

/// Object stores (see [`Engine::store`]).
struct Stores {
    open: Mutex<HashMap<Vec<u8>, Arc<Store>>>,
    /// Held while a store is opened for the first time.
    opening: Mutex<()>,
    /// The state directory's own store.
    default: PathBuf,
}

/// Caches of the catalogue, each valid only at the seq it was read at. A
/// miss reads the catalogue.
#[derive(Default)]
struct Cache {
    /// Current manifests by sandbox, each valid only while the sandbox's
    /// head seq in the catalogue equals the seq it was read at.
    manifests: Mutex<HashMap<i64, (u64, Manifest)>>,
    /// Per sandbox, the paths inserted into its cached manifest since it
    /// was last compacted (see [`Engine::put_manifest`]).
    inserted: Mutex<HashMap<i64, usize>>,
    /// Per sandbox, the paths of files with other names, as of a
    /// checkpoint's seq (see [`Engine::shared_names`]).
    shared: Mutex<HashMap<i64, SharedNames>>,
}

/// Retention (see [`Engine::settle_retention`]).
struct Pruner {
    policy: Retention,
    /// Retention owed by checkpoints already answered.
    owed: Mutex<Owed>,
    owed_changed: Condvar,
    /// The requests in progress, which the hasher and the fold of the
    /// counters make way for.
    requests: hasher::Requests,
}

/// Watchers (see [`Engine::watch_sandbox`]).
struct Watching {
    /// Whether sandboxes are watched at all.
    enabled: bool,
    /// With what.
    kind: crate::config::Watcher,
    /// Quiet periods after which a sandbox takes an `auto` checkpoint.
    auto: std::collections::BTreeMap<String, std::time::Duration>,
    /// Watches by sandbox: hints of what changed, never guards.
    watches: Mutex<HashMap<i64, Arc<SandboxWatch>>>,
    /// Numbers each watch started, for its cookie directory.
    generation: std::sync::atomic::AtomicU64,
}

use crate::hooks::enabled as test_hooks;

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
            let mut idle = lock(&self.engine.pool.idle);
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
            stores: Stores {
                open: Mutex::new(HashMap::new()),
                opening: Mutex::new(()),
                default: state_dir.join("store"),
            },
            state_dir,
            _state_fd: state_fd,
            catalogue_id,
            pool: Pool { path: db_path, idle: Mutex::new(Vec::new()), wal },
            socket: config.socket.clone(),
            started: Instant::now(),
            cache: Cache::default(),
            locks: Mutex::new(HashMap::new()),
            pruner: Pruner {
                policy: config.retention.clone(),
                owed: Mutex::new(Owed::default()),
                owed_changed: Condvar::new(),
                requests: hasher::Requests::default(),
            },
            watching: Watching {
                enabled: config.watch,
                kind: config.watcher,
                auto: config.auto_checkpoints.clone(),
                watches: Mutex::new(HashMap::new()),
                generation: std::sync::atomic::AtomicU64::new(0),
            },
            default_excludes: config.default_excludes.clone(),
            durability: config.durability,
            diff_max_bytes: config.diff_max_bytes,
        };
        engine.store(&bytes_of(&engine.stores.default))?;
        // Collected in the background: the daemon answers at once.
        for store in catalogue::stores(&conn)? {
            engine.owe_collection(store);
        }
        // Objects a checkpoint cloned before the last stop and that were
        // not named by their content then.
        if !catalogue::unhashed_checkpoints(&conn)?.is_empty() {
            engine.owe_hashing();
        }
        Ok(engine)
    }

    /// Returns a catalogue connection: an idle one from the pool, or a new
    /// one. Reusing connections keeps their prepared statements and schema
    /// cache; opening one costs about a millisecond.
    fn db(&self) -> Result<Pooled<'_>> {
        let conn = match lock(&self.pool.idle).pop() {
            Some(conn) => conn,
            None => {
                let conn = catalogue::connect(&self.pool.path)?;
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
        if let Some(s) = lock(&self.stores.open).get(path) {
            return Ok(s.clone());
        }
        // One first open at a time; `stores` itself is not held across the
        // catalogue lookup, whose connection runs deferred work that reads
        // `stores` when it goes back to the pool.
        let _opening = lock(&self.stores.opening);
        if let Some(s) = lock(&self.stores.open).get(path) {
            return Ok(s.clone());
        }
        let shown = path_of(path).display();
        let moved = |why: String| Error::Moved {
            message: format!("the store {shown} is no longer the directory that was registered: {why}"),
            sandbox: None,
            why,
            hint: "put the store's directory back where it was; its objects are the checkpoints' content".into(),
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
        lock(&self.stores.open).insert(path.to_vec(), store.clone());
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

    /// Answers one request, or says why it was refused (the server turns
    /// that into the wire's error answer: see `server::refusal`). The
    /// background work it starts (copying write-ahead logs back, waking the
    /// pruner, reading restored files in) is left to the returned
    /// [`After`]: the caller sends the answer first, then drops it, so that
    /// the work does not compete with the answer for the CPU.
    pub fn handle(self: &Arc<Self>, peer: Peer, request: Request) -> (Result<Response>, After) {
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
        // What reads little and is asked often (a harness polling `status`)
        // does not hold the hasher back.
        let light = matches!(
            request,
            Request::Status(_) | Request::List(_) | Request::Show(_) | Request::SandboxList(_) | Request::PlanShow(_)
        );
        let _request = (!light).then(|| self.pruner.requests.begin());
        let response = self.answer(&peer, request);
        let after = collecting.take();
        (response, after)
    }

    fn answer(&self, peer: &Peer, request: Request) -> Result<Response> {
        // Every request sees the restore checkpoints of the restores, and
        // the retention of the checkpoints, answered before it.
        self.settle_records();
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
            Request::Log(r) => self.log(peer, r).map(Response::Log),
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
        result.inspect_err(|e| {
            if let Error::Moved { sandbox: Some(id), why, .. } = e
                && let Ok(conn) = self.db()
            {
                self.record_moved(&conn, *id, why);
            }
            tracing::debug!("request refused: {e}");
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
        let c = catalogue::checkpoint_by_ref(&conn, reference)
            .map_err(|e| self.pruned_or(&conn, peer, reference, e.into()))?;
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
            watcher: Default::default(),
            default_excludes: vec![],
            register: vec![],
            limits: Default::default(),
            durability: Default::default(),
            diff_max_bytes: crate::config::DIFF_MAX_BYTES,
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
    fn a_cached_manifest_is_compacted_once_a_quarter_of_it_was_inserted_one_at_a_time() {
        use crate::manifest::tests::{row, weigh};
        let (_dir, _root, engine, _peer) = test_engine();
        // Built one insertion at a time, in order: about half full.
        let sparse = || {
            let mut m = Manifest::new();
            for i in 0..10_000 {
                m.insert(format!("d/f{i:05}").into_bytes().into(), row(i));
            }
            m
        };
        let ((), kept) = weigh(|| engine.put_manifest(7, 1, sparse(), 2_500));
        let ((), compacted) = weigh(|| engine.put_manifest(8, 1, sparse(), 2_501));
        assert!(compacted * 4 < kept * 3, "compacted: {compacted} bytes, kept as it was: {kept}");
        // Inserted paths add up across checkpoints.
        let ((), change) = weigh(|| {
            let (_, m) = lock(&engine.cache.manifests).remove(&7).unwrap();
            engine.put_manifest(7, 2, m, 1);
        });
        assert!(change < -(kept / 4), "compacting {kept} bytes gave back {}", -change);
        assert_eq!(lock(&engine.cache.manifests)[&7].1.len(), 10_000);
    }

    #[test]
    fn a_request_that_touches_many_paths_gives_the_heap_back_once_after_its_answer() {
        let (_dir, root, engine, peer) = test_engine();
        let engine = Arc::new(engine);
        let checkpoint = || {
            let request = Request::Checkpoint(CheckpointRequest { sandbox: "s".into(), ..Default::default() });
            let (answer, after) = engine.handle(peer.clone(), request);
            answer.unwrap();
            after.work.iter().filter(|w| matches!(w, Later::GiveBackMemory)).count()
        };
        assert_eq!(checkpoint(), 0);
        std::fs::create_dir(root.join("many")).unwrap();
        for i in 0..GIVE_BACK_AFTER_PATHS {
            std::fs::write(root.join(format!("many/{i}")), b"x").unwrap();
        }
        assert_eq!(checkpoint(), 1);
        // However many parts of one request ask.
        DEFERRED.with_borrow_mut(|d| *d = Some(Vec::new()));
        engine.later(Later::GiveBackMemory);
        engine.later(Later::CheckpointLogs);
        engine.later(Later::GiveBackMemory);
        engine.later(Later::CheckpointLogs);
        let asked = DEFERRED.with_borrow_mut(Option::take).unwrap();
        assert_eq!(asked.iter().filter(|w| matches!(w, Later::GiveBackMemory)).count(), 1);
        assert_eq!(asked.iter().filter(|w| matches!(w, Later::CheckpointLogs)).count(), 1);
    }

    #[test]
    fn the_pruner_folds_the_counters_once_requests_make_way_or_many_went_unfolded() {
        let (_dir, root, engine, peer) = test_engine();
        let engine = Arc::new(engine);
        let pruner = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.prune_in_background())
        };
        let pending = || -> i64 {
            let conn = engine.db().unwrap();
            conn.query_row("SELECT count(*) FROM held_changes", [], |r| r.get(0)).unwrap()
        };
        let folded = || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while pending() > 0 {
                assert!(Instant::now() < deadline, "the pruner did not fold {} changes", pending());
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let mut n = 0;
        let mut checkpoints = |count: u64| {
            for _ in 0..count {
                n += 1;
                std::fs::write(root.join("a"), format!("edit {n}")).unwrap();
                engine.checkpoint(&peer, CheckpointRequest { sandbox: "s".into(), ..Default::default() }).unwrap();
            }
        };
        // A request in progress throughout: the requests never make way.
        let busy = engine.pruner.requests.begin();
        catalogue::fold_held(&engine.db().unwrap()).unwrap();
        checkpoints(3);
        std::thread::sleep(hasher::QUIET * 3);
        assert_eq!(pending(), 3, "folded while requests kept coming");
        // Enough unfolded checkpoints are folded anyway.
        checkpoints(pruner::FOLD_ANYWAY_AFTER - 3);
        folded();
        checkpoints(1);
        std::thread::sleep(hasher::QUIET * 3);
        assert_eq!(pending(), 1);
        // Once requests make way, what is owed is folded.
        drop(busy);
        folded();
        let conn = engine.db().unwrap();
        let (stored, recounted): (i64, i64) = conn
            .query_row(
                "SELECT stored_bytes, (SELECT sum(size) FROM (SELECT DISTINCT object, size FROM entries))
                 FROM sandboxes",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(stored, recounted);
        drop(conn);
        engine.stop_pruner();
        pruner.join().unwrap();
    }

    #[test]
    fn a_manifest_the_catalogue_refuses_is_read_again_by_the_next_checkpoint() {
        let (_dir, root, engine, peer) = test_engine();
        let take = || engine.checkpoint(&peer, CheckpointRequest { sandbox: "s".into(), ..Default::default() });
        take().unwrap();
        let (seq, stale) = lock(&engine.cache.manifests).get(&1).cloned().unwrap();
        std::fs::write(root.join("a"), b"two").unwrap();
        take().unwrap();
        // The manifest of the first checkpoint, passed off as the second's:
        // its version of `a` ended at the second.
        assert_eq!(seq, 1);
        lock(&engine.cache.manifests).insert(1, (2, stale));
        std::fs::write(root.join("a"), b"three").unwrap();
        let err = take().unwrap_err();
        assert!(matches!(err, Error::Stale(_)), "{err}");
        let third = take().unwrap();
        assert_eq!(third.seq, 3);
        let conn = engine.db().unwrap();
        let current = catalogue::current_rows(&conn, 1).unwrap();
        assert_eq!(current.keys().map(|p| &p[..]).collect::<Vec<_>>(), [b"a"]);
        assert_eq!(current[&b"a"[..]].meta.size, 5, "the third checkpoint holds `three`");
        assert_eq!(catalogue::count_at(&conn, 1, 3).unwrap(), 1);
    }
}
