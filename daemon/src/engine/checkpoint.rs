//! Checkpoints: the capture transaction (scan, settle, write), the
//! manifest cache, and the read-only requests on checkpoints (list, show,
//! diff).

use super::*;

impl Engine {
    /// Undoes a checkpoint that failed before its commit: the cached
    /// manifest goes back (unless `current` is `None`: the catalogue
    /// refused it as stale), the next checkpoint compares everything (this one
    /// drained the dirty set), and the objects it stored are removed, so an
    /// absent checkpoint leaves nothing behind, not even until the next
    /// start. `storing` is the checkpoint's shared hold on the store.
    pub(super) fn abandon(
        &self,
        conn: &Connection,
        sandbox: &Sandbox,
        store: &Store,
        watch: Option<&SandboxWatch>,
        current: Option<Manifest>,
        storing: std::sync::RwLockReadGuard<'_, ()>,
    ) {
        if let Some(current) = current {
            self.put_manifest(sandbox.id, sandbox.head_seq, current, 0);
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

    pub(super) fn checkpoint(&self, peer: &Peer, req: CheckpointRequest) -> Result<CheckpointInfo> {
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
        let _held = self.hold(sb.id, &guard);
        let new = NewCheckpoint { plan, reason, tool, phase, labels, kind, pinned: pin };
        self.take(&mut conn, sb.id, new)
    }

    /// Takes the current manifest of a sandbox out of the cache, or reads it
    /// from the catalogue. The caller holds the sandbox's lock and gives it
    /// back with [`Engine::put_manifest`].
    pub(super) fn take_manifest(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        let cached = lock(&self.cache.manifests).remove(&sandbox.id);
        match cached {
            Some((seq, m)) if seq == sandbox.head_seq => Ok(m),
            _ => {
                // Built compact (see `crate::manifest::Builder`).
                let m = catalogue::current_rows(conn, sandbox.id)?;
                lock(&self.cache.inserted).insert(sandbox.id, 0);
                if m.len() >= GIVE_BACK_AFTER_PATHS {
                    self.later(Later::GiveBackMemory);
                }
                Ok(m)
            }
        }
    }

    /// Gives a sandbox's manifest back to the cache as of checkpoint `seq`,
    /// `inserted` paths after it was taken out (at most: a path whose
    /// version was replaced counts too). Once the paths inserted since it
    /// was last compacted pass a quarter of its size, it is compacted
    /// ([`crate::manifest::compact`]): one pass over the manifest for at
    /// least a quarter of it inserted, and the manifest stays within about
    /// twice its compact size whatever is inserted where (far less when
    /// new paths gather in a few directories, as they do).
    ///
    /// A request that inserted [`GIVE_BACK_AFTER_PATHS`] paths or more,
    /// or compacted a manifest of that size, gives the heap back after its
    /// answer.
    pub(super) fn put_manifest(&self, sandbox_id: i64, seq: u64, mut manifest: Manifest, inserted: usize) {
        {
            let mut counts = lock(&self.cache.inserted);
            let count = counts.entry(sandbox_id).or_default();
            *count += inserted;
            let compacting = *count > manifest.len() / 4;
            if compacting {
                crate::manifest::compact(&mut manifest);
                *count = 0;
            }
            if inserted >= GIVE_BACK_AFTER_PATHS || (compacting && manifest.len() >= GIVE_BACK_AFTER_PATHS) {
                self.later(Later::GiveBackMemory);
            }
        }
        lock(&self.cache.manifests).insert(sandbox_id, (seq, manifest));
    }

    /// Returns a copy of the current manifest of a sandbox.
    pub(super) fn copy_manifest(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        if let Some((seq, m)) = lock(&self.cache.manifests).get(&sandbox.id)
            && *seq == sandbox.head_seq
        {
            return Ok(m.clone());
        }
        Ok(catalogue::current_rows(conn, sandbox.id)?)
    }

    /// Compares the live tree in `scope` with `current`, its current
    /// versions. With a store, new content is stored; without one (a dry
    /// run), only hashed.
    pub(super) fn scan(
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
        let reflink = sandbox.clone_method == CloneMethod::Reflink;
        let opts = Options {
            root: root.as_fd(),
            excludes: &excludes,
            store: store.map(|(s, _)| s),
            reflink,
            pack: store.and_then(|(_, p)| p),
            // A whole tree's new files are cloned now and read after the
            // answer (see `hasher.rs`): most of them are not in memory.
            unhashed: reflink && store.is_some() && matches!(scope, Scope::Everything),
            seek_moved: !current.is_empty(),
            racy_after_ns: scan_start_ns - RACY_WINDOW_NS,
            progress: progress.as_deref(),
        };
        capture::capture(current, scope, &opts)
    }

    /// The paths of `sandbox`'s files whose inode had more than one name
    /// when last compared, as of checkpoint `seq` whose manifest is
    /// `current`: kept beside the manifest cache, made from `current` when
    /// it is not there.
    pub(super) fn shared_names(&self, sandbox_id: i64, seq: u64, current: &Manifest) -> Vec<Vec<u8>> {
        let mut cache = lock(&self.cache.shared);
        if let Some((at, paths)) = cache.get(&sandbox_id)
            && *at == seq
        {
            return paths.clone();
        }
        let paths: Vec<Vec<u8>> =
            current.iter().filter(|(_, r)| has_other_names(&r.meta, &r.key)).map(|(p, _)| p.to_vec()).collect();
        cache.insert(sandbox_id, (seq, paths.clone()));
        paths
    }

    /// Carries the list of [`Engine::shared_names`] from checkpoint `from`
    /// to `to` through what changed: the versions that ended (`gone`), were
    /// `added`, or were re-keyed (dropped when it was not the list of
    /// `from`: made again when next asked for).
    pub(super) fn update_shared_names<'a>(
        &self,
        sandbox_id: i64,
        (from, to): (u64, u64),
        gone: impl Iterator<Item = &'a [u8]>,
        added: &[catalogue::NewRow],
        rekeyed: &[(Vec<u8>, i64, StatKey)],
    ) {
        let mut cache = lock(&self.cache.shared);
        let Some((at, paths)) = cache.get_mut(&sandbox_id).filter(|(at, _)| *at == from) else {
            cache.remove(&sandbox_id);
            return;
        };
        let mut set: std::collections::BTreeSet<Vec<u8>> = std::mem::take(paths).into_iter().collect();
        for path in gone {
            set.remove(path);
        }
        for a in added {
            if has_other_names(&a.meta, &a.key) {
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
    ///
    /// `unread` is what the capture so far left unread of the files changed
    /// through names it did not read (see [`Engine::unread`]): the first
    /// round reads it. Returns the capture, and whether a round compared
    /// everything.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn settle(
        &self,
        sb: &Sandbox,
        watch: Option<&SandboxWatch>,
        current: &Manifest,
        mut captured: Captured,
        mut unread: Unread,
        store: (&Store, Option<&Pack<'_>>),
        scan_start_ns: i64,
    ) -> Result<(Captured, bool)> {
        let Some(watch) = watch else { return Ok((captured, false)) };
        let mut asked = std::collections::HashSet::new();
        let mut everything = false;
        for _ in 0..SETTLE_ROUNDS {
            let others = other_names(current, &captured, &asked);
            asked.extend(others.iter().cloned());
            let (scope, touched, unnamed) = match (std::mem::take(&mut unread), watch.drain_again()) {
                (Unread::Everything(name), _) => {
                    tracing::debug!(
                        sandbox = %sb.name, name = %capture::show(&name),
                        "full comparison: a file was changed through a name it no longer has, perhaps a link"
                    );
                    (Scope::Everything, Vec::new(), Vec::new())
                }
                // A watch that is degraded or not set up yet has no events
                // to ask for: as without a watch.
                (_, Drain::Everything(_)) if !watch.report().watching => return Ok((captured, everything)),
                (_, Drain::Everything(_)) => (Scope::Everything, Vec::new(), Vec::new()),
                (Unread::Paths(more), Drain::Paths { mut paths, touched, unnamed }) => {
                    paths.extend(others);
                    paths.extend(more);
                    if paths.is_empty() && unnamed.is_empty() {
                        return Ok((captured, everything));
                    }
                    (Scope::Paths(paths), touched, unnamed)
                }
            };
            if matches!(scope, Scope::Everything) {
                // Compared with the last checkpoint again, not with the
                // state found so far, which would be a copy of the whole
                // manifest: this round's capture replaces the earlier ones,
                // whose stored objects are freed after the commit unless
                // it refers to them.
                everything = true;
                captured = captured.replaced_by(self.scan(sb, &scope, current, Some(store), scan_start_ns)?);
                continue;
            }
            // The state found so far, of what the round compares only: a
            // copy of the whole would cost as much as the first scan of a
            // large tree in memory.
            let state = state_within(current, &captured, &scope.prefixes());
            let again = self.scan(sb, &scope, &state, Some(store), scan_start_ns)?;
            unread = self.unread(sb, current, (&state, &again), &touched, &unnamed);
            captured = captured.then(again);
        }
        watch.force_full("the tree kept changing during the last checkpoint".into());
        Err(Error::Busy(format!(
            "the sandbox {} kept changing while the checkpoint read it ({SETTLE_ROUNDS} rounds); nothing was \
             recorded",
            sb.name
        ))
        .hinted("try again when it is quieter"))
    }

    /// Takes a checkpoint, and records the retention it owes (applied after
    /// the answer, see [`Engine::retain`]); the caller holds the sandbox's
    /// lock.
    pub(super) fn take(&self, conn: &mut Connection, sandbox_id: i64, new: NewCheckpoint) -> Result<CheckpointInfo> {
        let (info, ()) = self.take_then(conn, sandbox_id, new, |_, _| Ok(()))?;
        self.retain(sandbox_id);
        Ok(info)
    }

    /// Takes a checkpoint and runs `then` in the transaction that records
    /// it, so that what `then` writes commits with the checkpoint or not at
    /// all. Retention is left to the caller. The caller holds the sandbox's
    /// lock.
    pub(super) fn take_then<T>(
        &self,
        conn: &mut Connection,
        sandbox_id: i64,
        new: NewCheckpoint,
        then: impl FnOnce(&rusqlite::Transaction<'_>, &CheckpointInfo) -> Result<T>,
    ) -> Result<(CheckpointInfo, T)> {
        let started = Instant::now();
        let sb = catalogue::sandbox_by_id(conn, sandbox_id)?;
        let store = self.store(&sb.store)?;
        let (watch, mut scope, touched, unnamed) = self.scope_of(&sb);
        self.pause_before_scan_hook();
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
        // Small files go into packs rather than a file each where they are
        // read anyway: those the watcher marked, written moments ago (their
        // pages are likely dirty: a clone would first write them out), and
        // any a store that cannot clone copies. A whole tree cloned is
        // cloned unread instead (see `Engine::scan`). A first checkpoint
        // of 300,000 small files on ext4 took 15.7 s with a file each,
        // 5.8 s packed (`cp -a` of the tree: 12.1 s).
        let packs_all = sb.clone_method != CloneMethod::Reflink;
        let pack = (matches!(scope, Scope::Paths(_)) || packs_all).then(|| store.pack());
        // A checkpoint that read nothing holds the tree of its barrier.
        let read_nothing = matches!(scope, Scope::Paths(paths) if paths.is_empty());
        let scanned = self.scan(&sb, scope, &current, Some((&store, pack.as_ref())), scan_start_ns);
        let read_ms = ms_since(started);
        let captured = scanned.and_then(|c| match read_nothing {
            true => Ok((c, false)),
            false => {
                let unread = self.unread(&sb, &current, (&current, &c), &touched, &unnamed);
                self.settle(&sb, watch.as_deref(), &current, c, unread, (&store, pack.as_ref()), scan_start_ns)
            }
        });
        if let Some(watch) = &watch {
            watch.settled();
        }
        let (mut captured, settled_whole) = match captured {
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
        let full_scan = matches!(scope, Scope::Everything) || settled_whole;
        let kind = new.kind;
        let info = checkpoint_info(&sb, parent, &captured, new, full_scan);
        let written = self.write_captured(conn, &sb, (&store, pack.as_ref()), &info, &captured, scan_start_ns, then);
        let written_ms = ms_since(started);
        let also = match written {
            Ok((ids, also)) => {
                let gone = captured.ended.iter().map(|(p, _)| p.as_slice());
                self.update_shared_names(sb.id, (sb.head_seq, info.seq), gone, &captured.added, &captured.rekeyed);
                let inserted = captured.move_into(&mut current, &ids);
                if full_scan {
                    // Read every path already: the list of files with other
                    // names is made now, not by the next (watched)
                    // checkpoint, which should cost what changed.
                    self.shared_names(sb.id, info.seq, &current);
                }
                self.put_manifest(sb.id, info.seq, current, inserted);
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
        if st.scanned as usize >= GIVE_BACK_AFTER_PATHS {
            self.later(Later::GiveBackMemory);
        }
        if st.unhashed > 0 {
            self.owe_hashing();
        }
        tracing::info!(
            sandbox = %sb.name, id = %info.id, kind = kind.as_str(), changed = info.changed,
            scanned = st.scanned, read = st.read, reflinked = st.reflinked, unhashed = st.unhashed, copied = st.copied,
            drain_ms, rows_ms, read_ms, scan_ms, written_ms, ms = ms_since(started), "checkpoint"
        );
        drop(storing);
        if !captured.dropped.is_empty() {
            self.free_replaced(conn, &sb, &store, &captured.dropped);
        }
        Ok((info, also))
    }

    /// What a checkpoint of `sb` compares: the paths its watch marked, or
    /// everything; and the names files were changed through, kept or not
    /// (see [`Drain::Paths`]). A watch whose events stopped coming is
    /// replaced.
    fn scope_of(&self, sb: &Sandbox) -> (Option<Arc<SandboxWatch>>, Scope, Vec<Touched>, Vec<Touched>) {
        let watch = self.watch_of(sb.id);
        let (scope, touched, unnamed) = match watch.as_ref().map(|w| w.drain()) {
            Some(Drain::Paths { paths, touched, unnamed }) => (Scope::Paths(paths), touched, unnamed),
            Some(Drain::Everything(why)) => {
                tracing::debug!(sandbox = %sb.name, "full scan: {why}");
                (Scope::Everything, Vec::new(), Vec::new())
            }
            None => (Scope::Everything, Vec::new(), Vec::new()),
        };
        if watch.as_ref().is_some_and(|w| w.stalled()) {
            // Its events stopped coming: this checkpoint scans everything,
            // and a fresh watch takes over for the next ones.
            tracing::warn!(sandbox = %sb.name, "the watch stopped delivering events; starting a new one");
            self.watch_sandbox(sb);
        }
        (watch, scope, touched, unnamed)
    }

    /// What a capture round left unread of the files changed through names
    /// it did not read: the names `unnamed` lost their files, and those of
    /// `touched` the round, which compared `before`, found gone. Such a
    /// file may live on under a name that got no event (the gone name was
    /// a link to it, made since the last checkpoint): its handle says
    /// whether it does (freed, or with no name left: nothing to read), and
    /// its inode which of the names in `current` it has; those must be
    /// read. A file with no handle (inotify) could be any of them: the
    /// capture must compare everything.
    fn unread(
        &self,
        sb: &Sandbox,
        current: &Manifest,
        (before, round): (&Manifest, &Captured),
        touched: &[Touched],
        unnamed: &[Touched],
    ) -> Unread {
        let gone = gone_names(before, round, touched);
        let lost: Vec<&Touched> = unnamed.iter().chain(gone).collect();
        if lost.is_empty() {
            return Unread::Paths(Vec::new());
        }
        if let Some(unknown) = lost.iter().find(|t| t.files.is_none()) {
            return Unread::Everything(unknown.path.clone());
        }
        let root = match self.open_root(sb) {
            Ok(root) => root,
            Err(_) => return Unread::Everything(lost[0].path.clone()),
        };
        let prefix = crate::fanotify::fd_path(root.as_fd()).ok().map(|p| [p.as_slice(), b"/"].concat());
        let (mut names, mut inodes) = (Vec::new(), std::collections::HashSet::new());
        for t in &lost {
            for handle in t.files.iter().flatten() {
                let alive = crate::fanotify::open_handle(root.as_fd(), handle)
                    .and_then(|fd| fd.map(|fd| crate::sys::fstat(fd.as_fd()).map(|st| (fd, st))).transpose());
                match alive {
                    Ok(Some((fd, st))) if st.st_nlink > 0 => {
                        // With one name, that name (which the kernel gives
                        // the descriptor, checked here) is the only one to
                        // read; else every recorded name of its inode.
                        let only = (st.st_nlink == 1)
                            .then(|| only_name(root.as_fd(), prefix.as_deref()?, fd.as_fd(), &st))
                            .flatten();
                        match only {
                            Some(name) => names.push(name),
                            None => {
                                inodes.insert(st.st_ino);
                            }
                        }
                    }
                    Ok(_) => {} // freed, or with no name left
                    Err(_) => return Unread::Everything(t.path.clone()),
                }
            }
        }
        if !inodes.is_empty() {
            names.extend(names_of(current, &inodes).map(<[u8]>::to_vec));
        }
        Unread::Paths(names)
    }

    /// Writes a captured checkpoint and runs `then` in its transaction
    /// (see [`Engine::take_then`]); returns the ids of the new versions.
    #[allow(clippy::too_many_arguments)]
    fn write_captured<T>(
        &self,
        conn: &mut Connection,
        sb: &Sandbox,
        (store, pack): (&Store, Option<&Pack<'_>>),
        info: &CheckpointInfo,
        captured: &Captured,
        scan_start_ns: i64,
        then: impl FnOnce(&rusqlite::Transaction<'_>, &CheckpointInfo) -> Result<T>,
    ) -> Result<(Vec<i64>, T)> {
        let ended: Vec<i64> = captured.ended.iter().map(|(_, r)| r.id).collect();
        std::thread::scope(|s| {
            // The pack index and the catalogue are two databases: the pack's
            // slots are recorded on a thread of their own while the rows
            // are written here, and the commit waits for both (a committed
            // checkpoint never names an object nothing can find).
            let mut sealing = pack.filter(|p| !p.is_empty()).map(|p| s.spawn(move || p.seal()));
            let mut sealed = || match sealing.take() {
                Some(seal) => seal
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the sealing thread panicked")))
                    .ctx(|| format!("sealing a pack in {}", store.path().display())),
                None => Ok(()),
            };
            let started = Instant::now();
            if self.durability == crate::config::Durability::Sync && captured.stats.read > 0 {
                // One syncfs for all of this checkpoint's objects, before the
                // catalogue can reference them.
                sealed()?;
                store.sync().ctx(|| format!("syncing the store {}", store.path().display()))?;
            }
            let synced_ms = ms_since(started);
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(plan) = &info.plan {
                // Checked again under the write lock: the plan may have been
                // applied since the request was accepted.
                check_plan_open(&tx, plan, sb)?;
                catalogue::ensure_plan(&tx, plan, sb.id, info.created_unix_ms)?;
            }
            let write = CheckpointWrite {
                info,
                sandbox_id: sb.id,
                scan_start_ns,
                ended: &ended,
                added: &captured.added,
                rekeyed: &captured.rekeyed,
            };
            let ids = catalogue::write_checkpoint(&tx, &write)?;
            let rows_ms = ms_since(started);
            let also = then(&tx, info)?;
            sealed()?;
            tx.commit()?;
            tracing::debug!(sandbox = %sb.name, synced_ms, rows_ms, ms = ms_since(started), "checkpoint written");
            Ok((ids, also))
        })
    }

    /// Removes the objects of versions a settling round replaced, unless
    /// another version holds them.
    fn free_replaced(&self, conn: &Connection, sb: &Sandbox, store: &Store, dropped: &[crate::manifest::ObjectId]) {
        let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let freed = catalogue::unreferenced(conn, &sb.store, dropped).map_err(Error::from).and_then(|dead| {
            store.remove_objects(&dead).ctx(|| format!("removing objects from {}", store.path().display()))
        });
        if let Err(e) = freed {
            tracing::warn!(sandbox = %sb.name, "removing the objects of replaced versions: {e}");
        }
    }

    pub(super) fn list(&self, peer: &Peer, req: ListRequest) -> Result<Checkpoints> {
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
    pub(super) fn live_state(&self, conn: &Connection, sandbox: &Sandbox) -> Result<Manifest> {
        let mut current = self.copy_manifest(conn, sandbox)?;
        let captured = self.scan(sandbox, &Scope::Everything, &current, None, now_ns())?;
        captured.apply_to(&mut current, None);
        Ok(current)
    }

    pub(super) fn show(&self, peer: &Peer, reference: &str) -> Result<CheckpointInfo> {
        let c = self.checkpoint_ref(peer, reference)?;
        let conn = self.db()?;
        let sandbox = catalogue::sandbox_by_id(&conn, c.sandbox_id)?;
        let mut info = c.info;
        info.exclusive_bytes =
            Some(catalogue::checkpoint_exclusive_bytes(&conn, sandbox.id, info.seq, &sandbox.store)?);
        Ok(info)
    }
}

/// The paths of a sandbox's files with other names, as of the checkpoint
/// with this seq.
pub(super) type SharedNames = (u64, Vec<Vec<u8>>);

/// What a caller chooses about a new checkpoint.
#[derive(Default)]
pub(super) struct NewCheckpoint {
    pub(super) plan: Option<String>,
    pub(super) reason: Option<String>,
    pub(super) tool: Option<String>,
    pub(super) phase: Option<String>,
    pub(super) labels: std::collections::BTreeMap<String, String>,
    pub(super) kind: CheckpointKind,
    pub(super) pinned: bool,
}

/// The recorded names of inodes that `captured` found with more than one
/// name, which it did not read itself and which were not `asked` for
/// already: a new link changes the link count (and ctime) of the file's
/// other names with no event for them, so they must be read again, or a
/// later write through the new name would leave them stale.
/// The record of a new checkpoint of `sb` after `parent`, holding what
/// `captured` found.
fn checkpoint_info(
    sb: &Sandbox,
    parent: Option<Checkpoint>,
    captured: &Captured,
    new: NewCheckpoint,
    full_scan: bool,
) -> CheckpointInfo {
    let counts = Counts::after(
        parent.as_ref(),
        captured.ended.iter().map(|(_, row)| (row.meta.kind, row.meta.size)),
        captured.added.iter().map(|a| (a.meta.kind, a.meta.size)),
    );
    let NewCheckpoint { plan, reason, tool, phase, labels, kind, pinned } = new;
    CheckpointInfo {
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
        full_scan: Some(full_scan),
        broken: None,
    }
}

/// The sandbox-relative name of `file` (opened by its handle; `st` its
/// stat), a file with one name, when the path the kernel gives it is
/// below `root` (whose path is `prefix`, with a trailing `/`) and names
/// that file there now; `None` otherwise (elsewhere, or moved meanwhile).
fn only_name(
    root: std::os::fd::BorrowedFd<'_>,
    prefix: &[u8],
    file: std::os::fd::BorrowedFd<'_>,
    st: &libc::stat,
) -> Option<Vec<u8>> {
    let path = crate::fanotify::fd_path(file).ok()?;
    let rel = path.strip_prefix(prefix)?;
    let there = crate::sys::lstat_beneath(root, rel).ok()?;
    (there.st_dev == st.st_dev && there.st_ino == st.st_ino).then(|| rel.to_vec())
}

/// What a capture round must still read (see [`Engine::unread`]).
pub(super) enum Unread {
    /// These paths (none: nothing).
    Paths(Vec<Vec<u8>>),
    /// Everything: a file was changed through this name, gone, and which
    /// file it was is not known.
    Everything(Vec<u8>),
}

impl Default for Unread {
    fn default() -> Unread {
        Unread::Paths(Vec::new())
    }
}

/// The names of `touched` that a capture round, which compared `before`,
/// found gone (removed before the round read them). Every touched name is
/// in the round's scope, so the round looked at each: a name it found is
/// either read (a link shows in its count, and its other names are asked)
/// or stands as it was.
fn gone_names<'a>(before: &Manifest, round: &Captured, touched: &'a [Touched]) -> Vec<&'a Touched> {
    if touched.is_empty() {
        return Vec::new();
    }
    let added: std::collections::HashSet<&[u8]> = round.added.iter().map(|a| a.path.as_slice()).collect();
    let ended: std::collections::HashSet<&[u8]> = round.ended.iter().map(|(p, _)| p.as_slice()).collect();
    let found = |p: &[u8]| added.contains(p) || (before.contains_key(p) && !ended.contains(p));
    touched.iter().filter(|t| !found(&t.path)).collect()
}

pub(super) fn other_names(
    current: &Manifest,
    captured: &Captured,
    asked: &std::collections::HashSet<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let read: std::collections::HashSet<&[u8]> = captured
        .added
        .iter()
        .map(|a| a.path.as_slice())
        .chain(captured.rekeyed.iter().map(|(p, ..)| p.as_slice()))
        .collect();
    let linked: std::collections::HashSet<u64> = captured
        .added
        .iter()
        .filter(|a| has_other_names(&a.meta, &a.key))
        .map(|a| a.key.ino)
        .chain(captured.rekeyed.iter().filter(|(_, _, k)| k.nlink > 1).map(|(_, _, k)| k.ino))
        .collect();
    if linked.is_empty() {
        return Vec::new();
    }
    names_of(current, &linked).filter(|p| !read.contains(p) && !asked.contains(*p)).map(<[u8]>::to_vec).collect()
}

/// The recorded files of `current` whose inode is one of `inodes`: a pass
/// over every path, for the rare file whose names are not all known.
fn names_of<'a>(
    current: &'a Manifest,
    inodes: &'a std::collections::HashSet<u64>,
) -> impl Iterator<Item = &'a [u8]> + 'a {
    current.iter().filter(|(_, r)| r.meta.kind == Kind::File && inodes.contains(&r.key.ino)).map(|(p, _)| &p[..])
}

/// What a checkpoint holds, by kind: its files, directories and symlinks,
/// and its files' bytes.
pub(super) struct Counts {
    pub(super) files: u64,
    pub(super) dirs: u64,
    pub(super) symlinks: u64,
    pub(super) bytes: u64,
}

impl Counts {
    /// The counts of a checkpoint made from `parent` (none: the first) by
    /// ending the versions `ended` and adding `added` (each its kind and
    /// size).
    pub(super) fn after(
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

/// Returns, of two states, the versions of each that the other does not
/// hold identically: (only or different in `a`, only or different in `b`).
pub(super) fn differences(a: &Manifest, b: &Manifest) -> (Manifest, Manifest) {
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

/// The state `captured` found, starting from `current`, of the paths at or
/// below `prefixes` only (a capture of them reads nothing else): what a
/// settling round compares with, built in the size of what it compares
/// and of what the capture changed, not of the tree.
fn state_within(current: &Manifest, captured: &Captured, prefixes: &[Vec<u8>]) -> Manifest {
    let prefixes: std::collections::HashSet<&[u8]> = prefixes.iter().map(Vec::as_slice).collect();
    let within = |path: &[u8]| {
        prefixes.contains(&[][..])
            || prefixes.contains(path)
            || path.iter().enumerate().any(|(i, &b)| b == b'/' && prefixes.contains(&path[..i]))
    };
    let mut state: Manifest = prefixes
        .iter()
        .flat_map(|p| crate::manifest::subtree(current, p))
        .map(|(path, row)| (Box::from(path), row.clone()))
        .collect();
    captured.apply_within(&mut state, None, within);
    state
}
