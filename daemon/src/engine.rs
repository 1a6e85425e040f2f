//! The engine: one method per request, each a blocking call that reads and
//! writes the catalogue and the sandboxes. The socket server runs these on
//! tokio's blocking pool.
//!
//! Operations that change a sandbox (checkpoint, rollback, remove) hold that
//! sandbox's lock; the catalogue is the only record of state, so nothing
//! that guards an operation lives in this struct.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use snapback::proto::{
    Change, ChangeKind, CheckpointInfo, CheckpointKind, CheckpointRequest, Checkpoints, CloneMethod, DiffReport,
    DiffRequest, ListRequest, PROTOCOL, Request, Response, RollbackReport, RollbackRequest, SandboxAdd, SandboxInfo,
    SandboxRemove, SandboxStatus, Sandboxes, StatusReport, WirePath,
};

use crate::capture::{self, Captured, Excludes, Options, Scope};
use crate::catalogue::{self, CheckpointWrite, Sandbox};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{Kind, Manifest, is_within};
use crate::restore::{Plan, selected};
use crate::store::Store;
use crate::sys;

/// A file changed less than this long before a scan began is re-read by
/// the next scan even if its stat looks the same (timestamps are coarse).
const RACY_WINDOW_NS: i64 = 20_000_000;

/// Who sent a request, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: u32,
}

impl Peer {
    fn may_use(&self, sandbox: &Sandbox) -> bool {
        self.uid == 0 || self.uid == sandbox.owner_uid
    }
}

pub struct Engine {
    state_dir: PathBuf,
    db_path: PathBuf,
    default_store: PathBuf,
    socket: PathBuf,
    started: Instant,
    stores: Mutex<HashMap<Vec<u8>, Arc<Store>>>,
    locks: Mutex<HashMap<i64, Arc<Mutex<()>>>>,
    /// Current manifests by sandbox, each valid only while the sandbox's
    /// head seq in the catalogue equals the seq it was read at. A cache, not
    /// a record: a miss reads the catalogue.
    manifests: Mutex<HashMap<i64, (u64, Manifest)>>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    pub fn open(state_dir: &Path, socket: &Path) -> Result<Engine> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .ctx(|| format!("creating the state directory {}", state_dir.display()))?;
        let state_dir = state_dir.canonicalize().ctx(|| format!("opening {}", state_dir.display()))?;
        let db_path = state_dir.join("catalogue.db");
        let conn = catalogue::open(&db_path)?;
        let engine = Engine {
            default_store: state_dir.join("store"),
            state_dir,
            db_path,
            socket: socket.to_owned(),
            started: Instant::now(),
            stores: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
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

    fn db(&self) -> Result<Connection> {
        catalogue::connect(&self.db_path)
    }

    fn store(&self, path: &[u8]) -> Result<Arc<Store>> {
        let mut stores = lock(&self.stores);
        if let Some(s) = stores.get(path) {
            return Ok(s.clone());
        }
        let store =
            Arc::new(Store::open(path_of(path)).ctx(|| format!("opening the store {}", path_of(path).display()))?);
        stores.insert(path.to_vec(), store.clone());
        Ok(store)
    }

    fn sandbox_lock(&self, id: i64) -> Arc<Mutex<()>> {
        lock(&self.locks).entry(id).or_default().clone()
    }

    fn collect_garbage(&self, conn: &Connection, store_path: &[u8]) -> Result<(u64, u64)> {
        let store = self.store(store_path)?;
        let referenced = catalogue::referenced_objects(conn, store_path)?;
        store.collect_garbage(&referenced).ctx(|| format!("collecting garbage in {}", store.path().display()))
    }

    /// Answers one request. Errors become `Response::Error`.
    pub fn handle(&self, peer: Peer, request: Request) -> Response {
        let result = match request {
            Request::Hello(_) => Err(Error::InvalidRequest("hello was already exchanged".into())),
            Request::SandboxAdd(r) => self.sandbox_add(peer, r).map(Response::Sandbox),
            Request::SandboxList(_) => self.sandbox_list(peer).map(Response::Sandboxes),
            Request::SandboxRemove(r) => self.sandbox_remove(peer, r).map(Response::Sandbox),
            Request::Checkpoint(r) => self.checkpoint(peer, r).map(Response::Checkpoint),
            Request::List(r) => self.list(peer, r).map(Response::Checkpoints),
            Request::Show(r) => self.checkpoint_ref(peer, &r.checkpoint).map(|c| Response::Checkpoint(c.info)),
            Request::Diff(r) => self.diff(peer, r).map(Response::Diff),
            Request::Rollback(r) => self.rollback(peer, r).map(Response::Rollback),
            Request::Status(_) => self.status(peer).map(Response::Status),
        };
        result.unwrap_or_else(|e| {
            tracing::debug!(code = e.code().as_str(), "request refused: {e}");
            Response::Error(e.to_body())
        })
    }

    fn sandbox_ref(&self, conn: &Connection, peer: Peer, reference: &str) -> Result<Sandbox> {
        let sandbox = catalogue::sandbox_by_ref(conn, reference)?;
        if !peer.may_use(&sandbox) {
            return Err(Error::NotFound(format!("no sandbox named or rooted at {reference:?}")));
        }
        Ok(sandbox)
    }

    fn checkpoint_ref(&self, peer: Peer, reference: &str) -> Result<catalogue::Checkpoint> {
        let conn = self.db()?;
        let c = catalogue::checkpoint_by_ref(&conn, reference)?;
        let sandbox = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
        if !peer.may_use(&sandbox) {
            return Err(Error::NotFound(format!("no checkpoint {reference}")));
        }
        Ok(c)
    }

    fn sandbox_info(&self, conn: &Connection, s: &Sandbox) -> Result<SandboxInfo> {
        Ok(SandboxInfo {
            name: s.name.clone(),
            path: WirePath(s.root.clone()),
            store: WirePath(s.store.clone()),
            clone_method: s.clone_method,
            clone_note: s.clone_note.clone(),
            excludes: s.excludes.clone(),
            state: s.state.clone(),
            owner_uid: s.owner_uid,
            checkpoints: catalogue::checkpoint_count(conn, s.id)?,
            created_unix_ms: s.created_ms,
        })
    }

    fn sandbox_add(&self, peer: Peer, req: SandboxAdd) -> Result<SandboxInfo> {
        let SandboxAdd { path, name, excludes, store } = req;
        let given = path.as_path();
        if !given.is_absolute() {
            return Err(Error::InvalidRequest(format!("{} is not an absolute path", path.display())));
        }
        let root = given
            .canonicalize()
            .map_err(|e| Error::InvalidRequest(format!("cannot register {}: {e}", path.display())))?;
        let meta = std::fs::symlink_metadata(&root).ctx(|| format!("reading {}", root.display()))?;
        if !meta.is_dir() {
            return Err(Error::InvalidRequest(format!("{} is not a directory", root.display())));
        }
        if peer.uid != 0 && meta.uid() != peer.uid {
            return Err(Error::PermissionDenied(format!(
                "{} belongs to uid {}; only its owner or root may register it",
                root.display(),
                meta.uid()
            )));
        }
        let excludes_set = Excludes::new(&excludes)?;
        drop(excludes_set);
        // Resolve the store without creating it: nothing is written before
        // every check has passed.
        let store_path = match store {
            None => self.default_store.clone(),
            Some(s) => {
                let p = s.as_path();
                if !p.is_absolute() {
                    return Err(Error::InvalidRequest(format!("store {} is not an absolute path", s.display())));
                }
                resolve_new_dir(p)?
            }
        };
        let root_b = bytes_of(&root);
        let store_b = bytes_of(&store_path);
        let overlaps = |a: &[u8], b: &[u8]| is_within(a, b) || is_within(b, a);
        if overlaps(&root_b, &bytes_of(&self.state_dir)) {
            return Err(Error::InvalidRequest(format!(
                "{} overlaps the daemon's state directory {}",
                root.display(),
                self.state_dir.display()
            )));
        }
        if overlaps(&root_b, &store_b) {
            return Err(Error::InvalidRequest(format!(
                "{} overlaps its store {}; put the store outside the sandbox",
                root.display(),
                store_path.display()
            )));
        }
        let name = match name {
            Some(n) => n,
            None => root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into()),
        };
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) || name.len() > 200 {
            return Err(Error::InvalidRequest(format!("{name:?} is not a valid sandbox name")));
        }
        let conn = self.db()?;
        for other in catalogue::sandboxes(&conn)? {
            if other.root == root_b {
                if other.state == "removed" && peer.may_use(&other) {
                    catalogue::set_sandbox_state(&conn, other.id, "active")?;
                    let again = catalogue::sandbox_by_id(&conn, other.id)?;
                    return self.sandbox_info(&conn, &again);
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already registered as {}",
                    root.display(),
                    other.name
                )));
            }
            if overlaps(&root_b, &other.root) {
                return Err(Error::InvalidRequest(format!(
                    "{} overlaps the sandbox {} at {}",
                    root.display(),
                    other.name,
                    path_of(&other.root).display()
                )));
            }
            if is_within(&other.store, &root_b) {
                return Err(Error::InvalidRequest(format!(
                    "{} contains the store of the sandbox {}",
                    root.display(),
                    other.name
                )));
            }
            if overlaps(&store_b, &other.root) {
                return Err(Error::InvalidRequest(format!(
                    "the store {} overlaps the sandbox {}",
                    store_path.display(),
                    other.name
                )));
            }
            if other.name == name {
                return Err(Error::AlreadyExists(format!("a sandbox named {name} already exists")));
            }
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&store_path)
            .ctx(|| format!("creating the store {}", store_path.display()))?;
        let store = self.store(&store_b)?;
        let same_fs = store.device().ctx(|| "reading the store".into())? == meta.dev();
        let (clone_method, clone_note) = if !same_fs {
            (
                CloneMethod::Copy,
                format!(
                    "copy: the store {} is on another filesystem than the sandbox; add the sandbox with \
                     --store DIR on its own filesystem to get reflinks",
                    store_path.display()
                ),
            )
        } else if store.probe_reflink() {
            (CloneMethod::Reflink, "reflink: the store shares the sandbox's filesystem, which clones files".into())
        } else {
            (CloneMethod::Copy, "copy: the sandbox's filesystem cannot clone files (no reflink support)".into())
        };
        let mut sandbox = Sandbox {
            id: 0,
            name,
            root: root_b,
            store: store_b,
            clone_method,
            clone_note,
            excludes,
            owner_uid: if peer.uid == 0 { meta.uid() } else { peer.uid },
            state: "active".into(),
            head_seq: 0,
            created_ms: now_ns() / 1_000_000,
        };
        sandbox.id = catalogue::insert_sandbox(&conn, &sandbox)?;
        tracing::info!(name = %sandbox.name, root = %root.display(), method = clone_method.as_str(), "sandbox registered");
        self.sandbox_info(&conn, &sandbox)
    }

    fn sandbox_list(&self, peer: Peer) -> Result<Sandboxes> {
        let conn = self.db()?;
        let mut out = Vec::new();
        for s in catalogue::sandboxes(&conn)? {
            if peer.may_use(&s) {
                out.push(self.sandbox_info(&conn, &s)?);
            }
        }
        Ok(Sandboxes { sandboxes: out })
    }

    fn sandbox_remove(&self, peer: Peer, req: SandboxRemove) -> Result<SandboxInfo> {
        let conn = self.db()?;
        let sandbox = self.sandbox_ref(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let mut info = self.sandbox_info(&conn, &sandbox)?;
        if !req.purge {
            catalogue::set_sandbox_state(&conn, sandbox.id, "removed")?;
            info.state = "removed".into();
            return Ok(info);
        }
        // Objects may be shared with other sandboxes of the same store: hold
        // all of their locks while collecting, so that no checkpoint is
        // writing objects that are not referenced yet.
        let mut sharing: Vec<i64> = catalogue::sandboxes(&conn)?
            .into_iter()
            .filter(|s| s.store == sandbox.store && s.id != sandbox.id)
            .map(|s| s.id)
            .collect();
        sharing.sort();
        let others: Vec<Arc<Mutex<()>>> = sharing.iter().map(|id| self.sandbox_lock(*id)).collect();
        let _held_others: Vec<MutexGuard<'_, ()>> = others.iter().map(|m| lock(m)).collect();
        catalogue::delete_sandbox(&conn, sandbox.id)?;
        lock(&self.manifests).remove(&sandbox.id);
        let (n, bytes) = self.collect_garbage(&conn, &sandbox.store)?;
        tracing::info!(name = %sandbox.name, objects = n, bytes, "sandbox purged");
        info.state = "purged".into();
        info.checkpoints = 0;
        Ok(info)
    }

    fn active_sandbox(&self, conn: &Connection, peer: Peer, reference: &str) -> Result<Sandbox> {
        let sandbox = self.sandbox_ref(conn, peer, reference)?;
        if sandbox.state != "active" {
            return Err(Error::InvalidRequest(format!(
                "the sandbox {} was removed; add it again to use it",
                sandbox.name
            )));
        }
        Ok(sandbox)
    }

    fn checkpoint(&self, peer: Peer, req: CheckpointRequest) -> Result<CheckpointInfo> {
        let CheckpointRequest { sandbox, plan, reason, tool, phase, labels, pin, kind } = req;
        let kind = kind.unwrap_or(if tool.is_some() { CheckpointKind::Tool } else { CheckpointKind::Manual });
        if kind == CheckpointKind::Safety {
            return Err(Error::InvalidRequest("safety checkpoints are taken by the daemon itself".into()));
        }
        let mut conn = self.db()?;
        let sb = self.active_sandbox(&conn, peer, &sandbox)?;
        let guard = self.sandbox_lock(sb.id);
        let _held = lock(&guard);
        let new = NewCheckpoint { plan, reason, tool, phase, labels, kind, pinned: pin };
        self.take(&mut conn, sb.id, new, &Scope::Everything)
    }

    /// Opens a sandbox's root directory, refusing a symlink in its place.
    fn open_root(sandbox: &Sandbox) -> Result<OwnedFd> {
        let path = path_of(&sandbox.root);
        let c = sys::cstr(&sandbox.root).ctx(|| format!("opening {}", path.display()))?;
        // SAFETY: open with a valid C string; the fd is checked below.
        let fd = unsafe { libc::open(c.as_ptr(), sys::DIR_FLAGS) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).ctx(|| format!("opening the sandbox {}", path.display()));
        }
        // SAFETY: fd is a new, valid descriptor we own.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
    }

    /// Takes the current manifest of a sandbox out of the cache, or reads it
    /// from the catalogue. The caller holds the sandbox's lock and gives it
    /// back with [`Engine::put_manifest`].
    fn take_manifest(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        match lock(&self.manifests).remove(&sandbox.id) {
            Some((seq, m)) if seq == sandbox.head_seq => Ok(m),
            _ => catalogue::current_rows(conn, sandbox.id, b""),
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
        catalogue::current_rows(conn, sandbox.id, b"")
    }

    /// Compares the live tree in `scope` with `current`, its current
    /// versions. With a store, new content is stored; without one (a dry
    /// run), only hashed.
    fn scan(
        &self,
        sandbox: &Sandbox,
        scope: &Scope,
        current: &Manifest,
        store: Option<&Store>,
        scan_start_ns: i64,
    ) -> Result<Captured> {
        let root = Self::open_root(sandbox)?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let opts = Options {
            root: root.as_fd(),
            excludes: &excludes,
            store,
            reflink: sandbox.clone_method == CloneMethod::Reflink,
            racy_after_ns: scan_start_ns - RACY_WINDOW_NS,
        };
        capture::capture(current, scope, &opts)
    }

    /// Takes a checkpoint; the caller holds the sandbox's lock.
    fn take(
        &self,
        conn: &mut Connection,
        sandbox_id: i64,
        new: NewCheckpoint,
        scope: &Scope,
    ) -> Result<CheckpointInfo> {
        let started = Instant::now();
        let sb = catalogue::sandbox_by_id(conn, sandbox_id)?;
        let store = self.store(&sb.store)?;
        let scan_start_ns = now_ns();
        let mut current = self.take_manifest(conn, &sb)?;
        let rows_ms = started.elapsed().as_millis() as u64;
        let captured = match self.scan(&sb, scope, &current, Some(&store), scan_start_ns) {
            Ok(c) => c,
            Err(e) => {
                self.put_manifest(sb.id, sb.head_seq, current);
                return Err(e);
            }
        };
        let scan_ms = started.elapsed().as_millis() as u64;
        let parent = match sb.head_seq {
            0 => None,
            head => catalogue::checkpoint_at(conn, sb.id, head)?,
        };
        let mut counts = parent.as_ref().map_or([0i64; 4], |p| {
            [p.info.files as i64, p.info.dirs as i64, p.info.symlinks as i64, p.info.bytes as i64]
        });
        let mut tally = |kind: Kind, size: u64, sign: i64| match kind {
            Kind::File => {
                counts[0] += sign;
                counts[3] += sign * size as i64;
            }
            Kind::Dir => counts[1] += sign,
            Kind::Symlink => counts[2] += sign,
            Kind::Special => {}
        };
        for (_, row) in &captured.ended {
            tally(row.meta.kind, row.meta.size, -1);
        }
        for a in &captured.added {
            tally(a.meta.kind, a.meta.size, 1);
        }
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
            files: counts[0].max(0) as u64,
            dirs: counts[1].max(0) as u64,
            symlinks: counts[2].max(0) as u64,
            bytes: counts[3].max(0) as u64,
            changed: captured.changed_paths(),
        };
        let ended: Vec<i64> = captured.ended.iter().map(|(_, r)| r.id).collect();
        let written = (|| {
            let tx = conn.transaction()?;
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
            tx.commit()?;
            Ok::<_, Error>(ids)
        })();
        match written {
            Ok(ids) => {
                captured.apply_to(&mut current, Some(&ids));
                self.put_manifest(sb.id, info.seq, current);
            }
            Err(e) => {
                self.put_manifest(sb.id, sb.head_seq, current);
                return Err(e);
            }
        }
        let st = captured.stats;
        tracing::info!(
            sandbox = %sb.name, id = %info.id, kind = kind.as_str(), changed = info.changed,
            scanned = st.scanned, read = st.read, reflinked = st.reflinked, copied = st.copied,
            rows_ms, scan_ms, ms = started.elapsed().as_millis() as u64, "checkpoint"
        );
        Ok(info)
    }

    fn list(&self, peer: Peer, req: ListRequest) -> Result<Checkpoints> {
        let conn = self.db()?;
        let sandbox_id = match &req.sandbox {
            Some(s) => Some(self.sandbox_ref(&conn, peer, s)?.id),
            None => None,
        };
        let visible: std::collections::HashSet<i64> =
            catalogue::sandboxes(&conn)?.into_iter().filter(|s| peer.may_use(s)).map(|s| s.id).collect();
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

    fn diff(&self, peer: Peer, req: DiffRequest) -> Result<DiffReport> {
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

    fn rollback(&self, peer: Peer, req: RollbackRequest) -> Result<RollbackReport> {
        let target = self.checkpoint_ref(peer, &req.checkpoint)?;
        let mut conn = self.db()?;
        let sandbox = catalogue::sandbox_by_id(&conn, target.sandbox_id)?;
        let sandbox = self.active_sandbox(&conn, peer, &sandbox.name)?;
        let filter =
            req.paths.iter().map(|p| relative_to_root(&sandbox.root, p.as_bytes())).collect::<Result<Vec<_>>>()?;
        let excludes = Excludes::new(&sandbox.excludes)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = lock(&guard);
        let store = self.store(&sandbox.store)?;
        let (plan, safety) = if req.dry_run {
            let live = self.live_state(&conn, &sandbox)?;
            let then = catalogue::rows_at(&conn, sandbox.id, target.info.seq)?;
            let (t_side, l_side) = differences(&then, &live);
            (Plan::new(&t_side, &l_side, &filter, &excludes), None)
        } else {
            let safety = self.take(
                &mut conn,
                sandbox.id,
                NewCheckpoint {
                    kind: CheckpointKind::Safety,
                    reason: Some(format!("before rollback to {}", target.info.id)),
                    ..NewCheckpoint::default()
                },
                &Scope::Everything,
            )?;
            let (t_side, l_side) = catalogue::rows_between(&conn, sandbox.id, target.info.seq, safety.seq)?;
            (Plan::new(&t_side, &l_side, &filter, &excludes), Some(safety))
        };
        let mut skipped = Vec::new();
        if !req.dry_run {
            let root = Self::open_root(&sandbox)?;
            let reflink = sandbox.clone_method == CloneMethod::Reflink;
            skipped = plan.apply(root.as_fd(), &store, reflink)?.skipped;
        }
        let (restored, created, deleted) = plan.counts();
        let total = catalogue::rows_at(&conn, sandbox.id, target.info.seq)?
            .keys()
            .filter(|p| selected(p, &filter) && !excludes.covers(p))
            .count() as u64;
        let changed: Vec<WirePath> = plan.steps.keys().map(|p| WirePath(p.clone())).collect();
        let removed = plan
            .steps
            .iter()
            .filter(|(_, s)| matches!(s, crate::restore::Step::Delete(_)))
            .map(|(p, _)| WirePath(p.clone()))
            .collect();
        tracing::info!(
            sandbox = %sandbox.name, target = %target.info.id, dry_run = req.dry_run,
            restored, created, deleted, "rollback"
        );
        Ok(RollbackReport {
            checkpoint: target.info.id,
            sandbox: sandbox.name,
            safety_checkpoint: safety.map(|s| s.id),
            dry_run: req.dry_run,
            restored,
            created,
            deleted,
            unchanged: total.saturating_sub(restored + created),
            changed,
            removed,
            skipped: skipped.into_iter().map(WirePath).collect(),
        })
    }

    fn status(&self, peer: Peer) -> Result<StatusReport> {
        let conn = self.db()?;
        let mut sandboxes = Vec::new();
        for s in catalogue::sandboxes(&conn)? {
            if !peer.may_use(&s) {
                continue;
            }
            let last = match s.head_seq {
                0 => None,
                head => catalogue::checkpoint_at(&conn, s.id, head)?.map(|c| c.info.id),
            };
            sandboxes.push(SandboxStatus {
                name: s.name.clone(),
                path: WirePath(s.root.clone()),
                state: s.state.clone(),
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

/// Returns the canonical form of a directory that may not exist yet: its
/// nearest existing ancestor canonicalized, plus the missing components.
fn resolve_new_dir(p: &Path) -> Result<PathBuf> {
    let mut missing = Vec::new();
    let mut existing = p;
    loop {
        match existing.canonicalize() {
            Ok(base) => {
                let mut out = base;
                for part in missing.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e).ctx(|| format!("resolving {}", p.display()));
                };
                if name == ".." || name == "." {
                    return Err(Error::InvalidRequest(format!("{} is not a clean path", p.display())));
                }
                missing.push(name.to_owned());
                existing = parent;
            }
            Err(e) => return Err(e).ctx(|| format!("resolving {}", p.display())),
        }
    }
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
}
