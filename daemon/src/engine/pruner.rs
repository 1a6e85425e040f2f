//! Retention: what a checkpoint owes, the pruner thread that applies it,
//! `prune` on request, and garbage collection of the stores.

use super::*;

impl Engine {
    pub(super) fn collect_garbage(&self, conn: &Connection, store_path: &[u8]) -> Result<(u64, u64)> {
        let store = self.store(store_path)?;
        let referenced = catalogue::referenced_objects(conn, store_path)?.into_keys().collect();
        store.collect_garbage(&referenced).ctx(|| format!("collecting garbage in {}", store.path().display()))
    }

    /// Retention applies after every checkpoint, without being asked, but
    /// not inside the request that took it: the pruner thread applies it
    /// once the answer is on its way, or the next request does, first, if
    /// it comes sooner (see [`Engine::settle_retention`]).
    pub(super) fn retain(&self, sandbox_id: i64) {
        let mut owed = lock(&self.pruner.owed);
        owed.sandboxes.insert(sandbox_id);
        // It wrote versions, and its pruning may delete some.
        owed.unfolded += 1;
        drop(owed);
        self.later(Later::WakePruner);
    }

    /// Applies the retention owed, and waits for any being applied: after
    /// this, every checkpoint answered so far has been followed by its
    /// pruning. Called with no sandbox lock held.
    pub fn settle_retention(&self) {
        let mut owed = lock(&self.pruner.owed);
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
                owed = lock(&self.pruner.owed);
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
                self.pruner.owed_changed.notify_all();
            } else if owed.running > 0 {
                owed = self.pruner.owed_changed.wait(owed).unwrap_or_else(|p| p.into_inner());
            } else {
                return;
            }
        }
    }

    /// The pruner thread: writes the `restore` checkpoints owed (see
    /// `record.rs`) and applies owed retention as they come, and between
    /// them folds the counters of what the sandboxes hold once requests
    /// make way (see [`Engine::fold_due`]), names unhashed objects a batch
    /// at a time (see `hasher.rs`) and collects the stores owed a garbage
    /// collection a slice at a time, until [`Engine::stop_pruner`]; the
    /// records and retention owed then are written and applied and the
    /// counters folded before it returns (naming or a collection left
    /// unfinished is owed again at the next start).
    pub fn prune_in_background(&self) {
        let mut collecting = None;
        let (mut hashing, mut passed) = (None, Vec::new());
        loop {
            let mut owed = lock(&self.pruner.owed);
            while owed.sandboxes.is_empty()
                && owed.records.is_empty()
                && !owed.stopped
                && collecting.is_none()
                && owed.stores.is_empty()
                && !Self::hashing_owed(&owed)
                && !self.fold_due(&owed)
            {
                // A failed pruning is owed again once its delay is up.
                let now = Instant::now();
                let due: Vec<i64> = owed.retry.iter().filter(|(_, (at, _))| *at <= now).map(|(&id, _)| id).collect();
                if !due.is_empty() {
                    owed.sandboxes.extend(due);
                    break;
                }
                // A fold owed waits for the requests to make way.
                let fold_at = (owed.unfolded > 0).then(|| now + self.pruner.requests.quiet_in());
                owed = match owed.retry.values().map(|&(at, _)| at).chain(fold_at).min() {
                    Some(at) => {
                        self.pruner.owed_changed.wait_timeout(owed, at - now).unwrap_or_else(|p| p.into_inner()).0
                    }
                    None => self.pruner.owed_changed.wait(owed).unwrap_or_else(|p| p.into_inner()),
                };
            }
            let (stopped, hash) = (owed.stopped, Self::hashing_owed(&owed));
            drop(owed);
            self.hold_records_hook();
            self.settle_records();
            self.settle_retention();
            if stopped {
                self.fold_held();
                return;
            }
            if self.fold_due(&lock(&self.pruner.owed)) {
                self.fold_held();
            }
            if hash && self.hash_a_batch(&mut hashing, &mut passed) {
                // Its objects' new names are changes to fold.
                lock(&self.pruner.owed).unfolded += 1;
            }
            self.collect_a_slice(&mut collecting);
        }
    }

    /// Whether the pruner folds the held changes now: some are owed, and
    /// the requests make way for it (see [`hasher::Requests::quiet`]), or
    /// so many went unfolded that a `status` would have much to fold.
    fn fold_due(&self, owed: &Owed) -> bool {
        owed.unfolded >= FOLD_ANYWAY_AFTER || (owed.unfolded > 0 && self.pruner.requests.quiet())
    }

    /// Brings the sandboxes' stored bytes up to date with the versions the
    /// last checkpoints and prunings wrote (see [`catalogue::fold_held`]),
    /// so that the next `status` has little to fold. Not after every
    /// checkpoint: its write would take the catalogue's write lock, and a
    /// core, from the next one of a burst of tool calls.
    /// A failure is logged and not tried again at once: the next
    /// checkpoint owes a fold again, and `status` folds first anyway.
    fn fold_held(&self) {
        lock(&self.pruner.owed).unfolded = 0;
        if let Err(e) = self.db().and_then(|conn| Ok(catalogue::fold_held(&conn)?)) {
            tracing::warn!("counting what the sandboxes hold: {e}");
        }
    }

    pub fn stop_pruner(&self) {
        lock(&self.pruner.owed).stopped = true;
        self.pruner.owed_changed.notify_all();
    }

    /// Prunes one sandbox under its lock. A failure does not undo the
    /// checkpoint that was taken: the caller has the pruner try again later.
    /// On such a later try (`sweep`), the sandbox's store is also swept for
    /// objects nothing references, which a failed removal may have left.
    pub(super) fn retain_now(&self, sandbox_id: i64, sweep: bool) -> Result<()> {
        let guard = self.sandbox_lock(sandbox_id);
        let _held = self.hold(sandbox_id, &guard);
        let mut conn = self.db()?;
        let sb = match catalogue::sandbox_by_id(&conn, sandbox_id) {
            Ok(sb) if sb.state == SandboxState::Active => sb,
            // Removed or purged since: nothing left to prune.
            Ok(_) | Err(catalogue::CatalogueError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        self.enforce_retention(&mut conn, &sb, &self.pruner.policy.policy(&sb.name), "retention")?;
        if sweep {
            let store = self.store(&sb.store)?;
            let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let (n, bytes) = self.collect_garbage(&conn, &sb.store)?;
            tracing::info!(sandbox = %sb.name, objects = n, bytes, "pruned after an earlier failure");
        }
        Ok(())
    }

    pub(super) fn prune(&self, peer: &Peer, req: PruneRequest) -> Result<PruneReport> {
        let mut conn = self.db()?;
        let sandbox = self.sandbox_ref(&conn, peer, &req.sandbox)?;
        let guard = self.sandbox_lock(sandbox.id);
        let _held = self.hold(sandbox.id, &guard);
        let mut policy = self.pruner.policy.policy(&sandbox.name);
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
    pub(super) fn enforce_retention(
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
    pub(super) fn delete_checkpoints(
        &self,
        conn: &mut Connection,
        sandbox: &Sandbox,
        ids: &[String],
        why: &str,
    ) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        // Immediate: it reads before it writes, and a deferred transaction
        // whose snapshot a concurrent commit (the log checkpointer's) made
        // stale fails at its first write instead of waiting.
        let started = Instant::now();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let objects = catalogue::delete_checkpoints(&tx, sandbox.id, ids, why, now_ms())?;
        tx.commit()?;
        let deleted_ms = ms_since(started);
        let store = self.store(&sandbox.store)?;
        let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
        let dead = catalogue::unreferenced(conn, &sandbox.store, &objects)?;
        let looked_up_ms = ms_since(started);
        let freed = store.remove_objects(&dead).ctx(|| format!("removing objects from {}", store.path().display()));
        tracing::debug!(
            sandbox = %sandbox.name, checkpoints = ids.len(), objects = objects.len(), unreferenced = dead.len(),
            deleted_ms, looked_up_ms, ms = ms_since(started), "checkpoints deleted"
        );
        freed
    }
}

/// Sandboxes whose retention is owed: a checkpoint answers before it prunes.
#[derive(Default)]
pub(super) struct Owed {
    pub(super) sandboxes: std::collections::BTreeSet<i64>,
    /// Sandboxes whose pruning failed: when the pruner tries again, and
    /// how many times in a row it failed.
    pub(super) retry: std::collections::BTreeMap<i64, (Instant, u32)>,
    /// Sandboxes being pruned right now.
    pub(super) running: usize,
    /// The pruner thread is asked to stop.
    pub(super) stopped: bool,
    /// Stores owed a garbage collection (see [`Engine::collect_a_slice`]).
    pub(super) stores: std::collections::BTreeSet<Vec<u8>>,
    /// A store's collection is in progress.
    pub(super) collection_running: bool,
    /// Debts of naming unhashed objects (see `hasher.rs`): one for each
    /// checkpoint that stored some, and one at start; `hashed` is the
    /// last one paid.
    pub(super) unhashed: u64,
    pub(super) hashed: u64,
    /// Checkpoints, restores, prunings and naming batches whose changes
    /// to what the sandboxes hold are not folded into their counters yet
    /// (see [`Engine::fold_held`]).
    pub(super) unfolded: u64,
    /// The `restore` checkpoints of restores already answered, by sandbox
    /// (see `record.rs`); emptied while one is being written.
    pub(super) records: std::collections::BTreeMap<i64, Option<OwedRecord>>,
}

/// How many writes of versions the pruner lets go unfolded while requests
/// keep coming: a `status` in the middle of a burst of checkpoints folds
/// the changes of at most this many.
pub(super) const FOLD_ANYWAY_AFTER: u64 = 16;

/// How long the pruner waits before its `failures`-th retry of a sandbox:
/// 30 s, doubling to at most an hour. (With `SNAPBACK_TEST_HOOKS=1`,
/// `SNAPBACK_TEST_PRUNE_RETRY_MS` replaces the 30 s, for tests.)
pub(super) fn retry_delay(failures: u32) -> Duration {
    let first = std::env::var("SNAPBACK_TEST_PRUNE_RETRY_MS")
        .ok()
        .filter(|_| test_hooks())
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    (first * 2u32.saturating_pow(failures.saturating_sub(1).min(16))).min(Duration::from_secs(3600))
}
