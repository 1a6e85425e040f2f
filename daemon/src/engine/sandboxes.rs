//! Sandboxes: registering (with the checks on where a sandbox and its
//! store may be), listing, removing, and opening a registered root pinned.

use super::*;

impl Engine {
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

    pub(super) fn sandbox_info(&self, conn: &Connection, s: &Sandbox) -> Result<SandboxInfo> {
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
    pub(super) fn sandbox_add(&self, peer: &Peer, req: SandboxAdd) -> Result<SandboxInfo> {
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
            None => bytes_of(&self.stores.default),
            Some(s) => clean_path("the store", s.as_bytes())?,
        };
        let name = sandbox_name(name, &root)?;
        let conn = self.db()?;
        let all = catalogue::sandboxes(&conn)?;
        if let Some(other) = all.iter().find(|o| o.root == root_b) {
            return self.register_again(&conn, peer, other, identity);
        }
        let others: Vec<access::Placed<'_>> =
            all.iter().map(|o| access::Placed { name: &o.name, root: &o.root, store: &o.store }).collect();
        access::check_placement(
            &root_b,
            &store_b,
            &bytes_of(&self.state_dir),
            &bytes_of(&self.stores.default),
            &others,
        )
        .map_err(Error::InvalidRequest)?;
        if let Some(other) = all.iter().find(|o| o.name == name) {
            return Err(Error::AlreadyExists(format!("a sandbox named {} already exists", other.name)));
        }
        if store.is_some() {
            let shares = all.iter().any(|o| o.store == store_b && may_use(peer, o));
            self.prepare_store(&conn, peer, &store_b, shares)?;
        }
        let (clone_method, clone_note) = self.clone_method(&root_fd, &root, meta.st_dev, &store_b)?;
        let mut sandbox = Sandbox {
            id: 0,
            name,
            root: root_b,
            store: store_b,
            clone_method,
            clone_note,
            excludes,
            owner_uid: if peer.is_root() { meta.st_uid } else { peer.uid },
            state: SandboxState::Active,
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

    /// How a sandbox's files go into `store_b`, and why: by reflink where
    /// the store shares the sandbox's filesystem and it clones, else by
    /// copy, with what would help, if anything.
    fn clone_method(
        &self,
        root_fd: &OwnedFd,
        root: &Path,
        root_dev: u64,
        store_b: &[u8],
    ) -> Result<(CloneMethod, String)> {
        let store = self.store(store_b)?;
        let same_fs = store.device().ctx(|| "reading the store".into())? == root_dev;
        let (fs, clones) = sys::filesystem(root_fd.as_fd()).ctx(|| format!("reading {}", root.display()))?;
        Ok(if same_fs && store.probe_reflink() {
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
                    path_of(store_b).display()
                ),
            )
        } else {
            let elsewhere = if same_fs { "" } else { ", so no store elsewhere would help" };
            (CloneMethod::Copy, format!("copy: the sandbox's filesystem ({fs}) cannot clone files{elsewhere}"))
        })
    }

    /// `sandbox add` of a path registered already: a removed or moved
    /// sandbox of the caller's comes back, pinned to the directory there
    /// now (its next checkpoint compares the whole tree); an active one is
    /// an error.
    pub(super) fn register_again(
        &self,
        conn: &Connection,
        peer: &Peer,
        other: &Sandbox,
        now: Identity,
    ) -> Result<SandboxInfo> {
        let moved = other.moved.is_some() || other.identity.is_some_and(|i| i != now);
        if !may_use(peer, other) || (other.state != SandboxState::Removed && !moved) {
            return Err(Error::AlreadyExists(format!(
                "{} is already registered as {}",
                path_of(&other.root).display(),
                other.name
            )));
        }
        let guard = self.sandbox_lock(other.id);
        let _held = self.hold(other.id, &guard);
        catalogue::set_sandbox_identity(conn, other.id, now)?;
        catalogue::set_sandbox_state(conn, other.id, SandboxState::Active)?;
        lock(&self.cache.manifests).remove(&other.id);
        lock(&self.cache.inserted).remove(&other.id);
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
    pub(super) fn prepare_store(&self, conn: &Connection, peer: &Peer, store: &[u8], shares: bool) -> Result<()> {
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

    pub(super) fn sandbox_list(&self, peer: &Peer) -> Result<Sandboxes> {
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

    pub(super) fn sandbox_remove(&self, peer: &Peer, req: SandboxRemove) -> Result<SandboxInfo> {
        let conn = self.db()?;
        let sandbox = self.sandbox_ref(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        let mut info = self.sandbox_info(&conn, &sandbox)?;
        if !req.purge {
            catalogue::set_sandbox_state(&conn, sandbox.id, SandboxState::Removed)?;
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
        lock(&self.cache.manifests).remove(&sandbox.id);
        lock(&self.cache.inserted).remove(&sandbox.id);
        let (n, bytes) = self.collect_garbage(&conn, &sandbox.store)?;
        tracing::info!(name = %sandbox.name, objects = n, bytes, "sandbox purged");
        info.state = "purged".into();
        info.checkpoints = 0;
        Ok(info)
    }

    pub(super) fn active_sandbox(&self, conn: &Connection, peer: &Peer, reference: &str) -> Result<Sandbox> {
        let sandbox = self.sandbox_ref(conn, peer, reference)?;
        if sandbox.state != SandboxState::Active {
            return Err(Error::InvalidRequest(format!(
                "the sandbox {} was removed; add it again to use it",
                sandbox.name
            )));
        }
        Ok(sandbox)
    }

    /// Opens a sandbox's root from `/` without following a symlink, and
    /// checks that it is the directory that was registered. One that is
    /// not (renamed, replaced, missing, or reached through a symlink now)
    /// is an [`Error::Moved`], which [`Engine::answer`] records.
    pub(super) fn open_root(&self, sandbox: &Sandbox) -> Result<OwnedFd> {
        let path = path_of(&sandbox.root).display();
        let moved = |why: String| Error::Moved {
            message: format!(
                "the sandbox {} is no longer the directory that was registered: {why}. Nothing was read or \
                 written there; its checkpoints stay readable",
                sandbox.name
            ),
            sandbox: Some(sandbox.id),
            why,
            hint: format!("`snapback sandbox add {path}` registers the directory there now"),
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
    pub(super) fn recheck_root(&self, conn: &Connection, sandbox: &mut Sandbox) {
        if sandbox.state != SandboxState::Active || sandbox.moved.is_some() {
            return;
        }
        if let Err(Error::Moved { why, .. }) = self.open_root(sandbox) {
            self.record_moved(conn, sandbox.id, &why);
            sandbox.moved = Some(why);
        }
    }

    /// Records that a sandbox's root moved, and stops watching it.
    pub(super) fn record_moved(&self, conn: &Connection, id: i64, why: &str) {
        if let Err(e) = catalogue::set_sandbox_moved(conn, id, why) {
            tracing::warn!("recording that sandbox {id} moved: {e}");
        }
        self.unwatch_sandbox(id);
        tracing::warn!(sandbox = id, "the root moved: {why}");
    }

    pub(super) fn active_sandbox_by_id(&self, conn: &Connection, peer: &Peer, id: i64) -> Result<Sandbox> {
        let sandbox = catalogue::sandbox_by_id(conn, id)?;
        self.active_sandbox(conn, peer, &sandbox.name)
    }
}

pub(super) fn may_use(peer: &Peer, sandbox: &Sandbox) -> bool {
    peer.is_root() || peer.uid == sandbox.owner_uid
}

/// Refuses to start on a catalogue that holds nothing (missing, a 0-byte
/// file, no schema) while the default store beside it holds objects: the
/// catalogue that knew them was lost, and a new one would find every object
/// unreferenced and collect it. Checked before the catalogue is written.
pub(super) fn refuse_new_catalogue_beside_objects(state: &OwnedFd, state_dir: &Path, db_path: &Path) -> Result<()> {
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
pub(super) fn clean_path(what: &str, p: &[u8]) -> Result<Vec<u8>> {
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
/// The name a new sandbox gets: the one asked for, or its root's last
/// component; refused if it could not be typed or shown.
fn sandbox_name(asked: Option<String>, root: &Path) -> Result<String> {
    let name = match asked {
        Some(n) => n,
        None => root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into()),
    };
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) || name.len() > 200 {
        return Err(Error::InvalidRequest(format!("{name:?} is not a valid sandbox name")));
    }
    Ok(name)
}

pub(super) fn shown_state(s: &Sandbox) -> &'static str {
    if s.moved.is_some() && s.state == SandboxState::Active { "moved" } else { s.state.as_str() }
}
