//! Watches: a watcher per registered sandbox, automatic checkpoints, and
//! the test hooks that act on a watch.

use super::*;

impl Engine {
    /// Starts watching every active sandbox (in the background: this
    /// returns at once).
    pub fn start_watches(&self) -> Result<()> {
        let conn = self.db()?;
        for mut sandbox in catalogue::sandboxes(&conn)? {
            self.recheck_root(&conn, &mut sandbox);
            if sandbox.state == SandboxState::Active && sandbox.moved.is_none() {
                self.watch_sandbox(&sandbox);
            }
        }
        Ok(())
    }

    /// Returns whether any sandbox has auto checkpoints configured.
    pub fn has_auto_checkpoints(&self) -> bool {
        !self.watching.auto.is_empty()
    }

    /// Takes an `auto` checkpoint of each sandbox configured for them whose
    /// tree changed and has then been quiet for its period. A sandbox busy
    /// with another operation is left for the next tick.
    pub fn auto_checkpoints(&self) {
        let Ok(mut conn) = self.db() else { return };
        for (name, quiet) in &self.watching.auto {
            let Ok(sandbox) = catalogue::sandbox_by_ref(&conn, name) else { continue };
            let Some(watch) = self.watch_of(sandbox.id) else { continue };
            if sandbox.state != SandboxState::Active || !watch.quiet_with_changes(*quiet) {
                continue;
            }
            let guard = self.sandbox_lock(sandbox.id);
            let Ok(_held) = guard.try_lock() else { continue };
            self.write_owed_record(sandbox.id);
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
        for (_, w) in lock(&self.watching.watches).drain() {
            w.stop();
        }
    }

    pub(super) fn watch_sandbox(&self, sandbox: &Sandbox) {
        if !self.watching.enabled {
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
        let generation = self.watching.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cookies = self.state_dir.join("cookies").join(format!("{}-{generation}", sandbox.id));
        match SandboxWatch::start(
            path_of(&sandbox.root),
            &cookies,
            excludes,
            self.watching.kind,
            self.own_dirs(sandbox),
        ) {
            Ok(w) => {
                if let Some(old) = lock(&self.watching.watches).insert(sandbox.id, w) {
                    old.stop();
                }
            }
            Err(e) => tracing::warn!(sandbox = %sandbox.name, "not watching: {e}"),
        }
    }

    /// The daemon's own directories, none inside a sandbox: its state and
    /// the stores it knows of now (the sandbox's, and those open).
    fn own_dirs(&self, sandbox: &Sandbox) -> Vec<std::path::PathBuf> {
        let mut stores: std::collections::BTreeSet<Vec<u8>> = lock(&self.stores.open).keys().cloned().collect();
        stores.insert(sandbox.store.clone());
        let mut dirs = vec![self.state_dir.clone()];
        dirs.extend(stores.iter().flat_map(|s| crate::store::directories(path_of(s))));
        dirs
    }

    pub(super) fn unwatch_sandbox(&self, id: i64) {
        if let Some(w) = lock(&self.watching.watches).remove(&id) {
            w.stop();
        }
    }

    pub(super) fn watch_of(&self, id: i64) -> Option<Arc<SandboxWatch>> {
        lock(&self.watching.watches).get(&id).cloned()
    }

    /// Makes a sandbox's next checkpoint compare everything, as a kernel
    /// queue overflow would: the `inject_rescan` test hook, served only when
    /// the daemon runs with `SNAPBACK_TEST_HOOKS=1`.
    pub(super) fn inject(&self, peer: &Peer, reference: &str) -> Result<SandboxInfo> {
        if !test_hooks() {
            return Err(Error::InvalidRequest("test hooks are off (SNAPBACK_TEST_HOOKS=1 turns them on)".into()));
        }
        let conn = self.db()?;
        let sandbox = self.active_sandbox(&conn, peer, reference)?;
        let watch = self.watch_of(sandbox.id).ok_or_else(|| Error::NotFound("the sandbox is not watched".into()))?;
        watch.force_full("a rescan was injected".into());
        self.sandbox_info(&conn, &sandbox)
    }

    /// The `pause-before-scan` test hook, on only with
    /// `SNAPBACK_TEST_HOOKS=1`: while the file `pause-before-scan` is in the
    /// state directory, a checkpoint that has drained its watch waits
    /// before it reads the tree (at most 30 s), saying so with the file
    /// `paused-before-scan`, so that a test can change the tree between a
    /// round's barrier and its reading.
    pub(super) fn pause_before_scan_hook(&self) {
        let (pause, paused) = (self.state_dir.join("pause-before-scan"), self.state_dir.join("paused-before-scan"));
        if !test_hooks() || !pause.exists() {
            return;
        }
        let _ = std::fs::write(&paused, b"");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while pause.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&paused);
    }

    /// The `hold-records` test hook: keeps the pruner thread from writing
    /// the restore records owed while that file exists in the state
    /// directory (and the daemon is not stopping), so that the requests
    /// that come next must write them.
    pub(super) fn hold_records_hook(&self) {
        while test_hooks() && self.state_dir.join("hold-records").exists() && !lock(&self.pruner.owed).stopped {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The `stop-before-record` test hook: ends the daemon before it writes
    /// a restore's record owed after the answer, as a crash there would,
    /// once for each time a test creates that file in the state directory.
    pub(super) fn stop_before_record_hook(&self) {
        if test_hooks() && std::fs::remove_file(self.state_dir.join("stop-before-record")).is_ok() {
            tracing::warn!("test hook: stopping before the restore's record");
            std::process::exit(70);
        }
    }

    /// The `stop-after-safety` test hook, on only with
    /// `SNAPBACK_TEST_HOOKS=1`: a restore whose safety checkpoint and
    /// intent have just committed ends the daemon there, before it touches
    /// the sandbox, once for each time a test creates the file
    /// `stop-after-safety` in the state directory.
    pub(super) fn stop_after_safety_hook(&self) {
        if test_hooks() && std::fs::remove_file(self.state_dir.join("stop-after-safety")).is_ok() {
            tracing::warn!("test hook: stopping after the safety checkpoint");
            std::process::exit(70);
        }
    }
}
