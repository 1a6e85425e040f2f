//! Administration: export, verify and status.

use super::*;

impl Engine {
    /// Writes a checkpoint out as a new read-only tree, with the caller's
    /// filesystem credentials (see [`access::with_caller_creds`]): the
    /// destination's parent is opened from `/` as the caller, without
    /// following a symlink, and everything is created in it through that
    /// fd. Content the caller could not have read is withheld.
    pub(super) fn export(&self, peer: &Peer, req: ExportRequest) -> Result<ExportReport> {
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
        let _held = self.hold(sandbox.id, &guard);
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
    pub(super) fn verify(&self, peer: &Peer) -> Result<VerifyReport> {
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
        let default = bytes_of(&self.stores.default);
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

    pub(super) fn status(&self, peer: &Peer) -> Result<StatusReport> {
        let conn = self.db()?;
        // What the last checkpoints added: little, as the pruner thread
        // folds it in after each.
        catalogue::fold_held(&conn)?;
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
            let budget_bytes = self.pruner.policy.policy(&s.name).budget_bytes;
            let exclusive_bytes = match budget_bytes {
                Some(_) => Some(catalogue::sandbox_exclusive_bytes(&conn, s.id, &s.store)?),
                None => None,
            };
            let report = self.watch_of(s.id).map(|w| w.report());
            let (watch, dirty_paths) = match &report {
                Some(r) => (r.state.clone(), r.dirty),
                None => ("not watching".to_string(), 0),
            };
            let watcher = report.as_ref().filter(|r| r.watching).map(|r| r.watcher.to_string());
            let watched_dirs = match (report.is_some_and(|r| r.watching), s.head_seq) {
                (false, _) => 0,
                (true, 0) => 1,
                (true, head) => catalogue::checkpoint_at(&conn, s.id, head)?.map_or(1, |c| c.info.dirs + 1),
            };
            let recovery = catalogue::intents(&conn, &[IntentState::Resumed, IntentState::Failed], Some(s.id))?
                .pop()
                .and_then(|i| i.note);
            sandboxes.push(SandboxStatus {
                recovery,
                watch,
                watched_dirs,
                dirty_paths,
                watcher,
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
            collecting_garbage: self.collecting_garbage(),
            hashing_objects: self.hashing_objects(),
        })
    }
}

/// Returns the daemon's name and version, as sent in `welcome`.
pub fn daemon_name() -> String {
    format!("snapbackd {}", env!("CARGO_PKG_VERSION"))
}
