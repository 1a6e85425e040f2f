//! The hasher: names by their content the objects that a scan of a whole
//! tree cloned without reading them (see [`Store::put_unhashed`]), after
//! the scan's answer.
//!
//! A first checkpoint answers once every file is cloned into the store:
//! reading each of them (most not in memory) to hash it took as long again
//! as the clones. Its versions then hold objects with unhashed names
//! (migration 16 lists them), which hold the content as any object does: a
//! restore, an export or a diff reads them as it reads any other. The
//! pruner thread names them a batch at a time, between the retention and
//! the garbage collection it owes. For each object:
//!
//! 1. it reads the object and hashes it, holding no lock;
//! 2. under the sandbox's lock, then the store's collection lock (shared,
//!    as a checkpoint holds it, and in that order), it makes the hash a
//!    name of the object unless the store has that content already, points
//!    the versions holding it at the hash in one transaction, and updates
//!    the sandbox's cached manifest;
//! 3. it removes the unhashed name.
//!
//! Each unhashed object is held by exactly one version, so that naming it
//! is one update: a restore that records a version of one (the state it
//! restored) holds a clone of its own ([`Store::clone_unhashed`]).
//!
//! A stop anywhere leaves the versions either on the unhashed name, which
//! still holds the content (the hasher takes it up again at the next
//! start), or on the hash, with the unhashed name left over for garbage
//! collection. Until an object is named, equal content elsewhere in the
//! store is not shared with it, and a comparison by object id finds them
//! different: a scan that reads a file whose version holds an unhashed
//! object records a new version even when the content is the same, and a
//! diff shows such a pair as changed in content (its patch is empty).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// How long after the last request ended the hasher waits before it reads
/// more: a burst of requests (an agent's tool calls, each with its
/// checkpoint) finds the disk and the sandbox's lock to itself.
pub(super) const QUIET: Duration = Duration::from_millis(100);

/// The requests in progress and when the last one ended, for the hasher
/// and the counters' fold (see [`Engine::prune_in_background`]) to make
/// way for them.
pub(super) struct Requests {
    in_flight: AtomicUsize,
    last_ended: Mutex<Instant>,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests { in_flight: AtomicUsize::new(0), last_ended: Mutex::new(Instant::now()) }
    }
}

/// A request in progress, until dropped.
pub(super) struct Request<'a>(&'a Requests);

impl Requests {
    pub(super) fn begin(&self) -> Request<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Request(self)
    }

    /// No request is in progress.
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }

    /// No request is in progress, and none ended in the last [`QUIET`].
    pub(super) fn quiet(&self) -> bool {
        self.quiet_in().is_zero()
    }

    /// How long until [`Requests::quiet`] holds if no request comes: a
    /// whole [`QUIET`] while one is in progress.
    pub(super) fn quiet_in(&self) -> Duration {
        match self.idle() {
            true => QUIET.saturating_sub(lock(&self.last_ended).elapsed()),
            false => QUIET,
        }
    }
}

impl Drop for Request<'_> {
    fn drop(&mut self) {
        *lock(&self.0.last_ended) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Objects read per batch: on the loop-mounted XFS of the benchmarks,
/// about a tenth of a second of reading small files not in memory, so
/// that retention owed meanwhile waits little.
const BATCH: usize = 256;

/// Where the hasher is: the checkpoint it goes through, and the last
/// version of it that it went through.
pub(super) type Cursor = Option<(catalogue::UnhashedCheckpoint, i64)>;

impl Engine {
    /// Has the pruner thread name the unhashed objects a checkpoint just
    /// stored, once the request's answer is sent.
    pub(super) fn owe_hashing(&self) {
        lock(&self.pruner.owed).unhashed += 1;
        self.later(Later::WakePruner);
    }

    /// Whether unhashed objects are owed a name.
    pub(super) fn hashing_owed(owed: &Owed) -> bool {
        owed.unhashed > owed.hashed
    }

    /// Names the next batch of unhashed objects; once no listed checkpoint
    /// holds any, what was owed when that pass began is paid. A batch that
    /// fails is logged and its checkpoint passed over until the next debt
    /// (a checkpoint that stores unhashed objects, or the next start).
    /// Returns whether it went through a batch (it waits while requests
    /// come).
    pub(super) fn hash_a_batch(&self, cursor: &mut Cursor, passed: &mut Vec<(i64, u64)>) -> bool {
        if self.hold_hashing_hook() {
            return false;
        }
        if !self.pruner.requests.quiet() {
            std::thread::sleep(Duration::from_millis(20));
            return false;
        }
        let owed_at = lock(&self.pruner.owed).unhashed;
        let going_through = cursor.as_ref().map(|(c, _)| (c.sandbox_id, c.seq));
        let done = match self.name_a_batch(cursor, passed) {
            Ok(more) => !more,
            Err(e) => {
                tracing::warn!("naming cloned objects by their content: {e}");
                *cursor = None;
                match going_through {
                    Some(checkpoint) => {
                        passed.push(checkpoint);
                        false
                    }
                    // Not even the list could be read: until the next debt.
                    None => true,
                }
            }
        };
        if done {
            passed.clear();
            let mut owed = lock(&self.pruner.owed);
            owed.hashed = owed.hashed.max(owed_at);
        }
        true
    }

    /// Names up to [`BATCH`] unhashed objects of the checkpoint at
    /// `cursor`, or of the next listed one not `passed`; returns whether
    /// there was any checkpoint to go through.
    fn name_a_batch(&self, cursor: &mut Cursor, passed: &mut Vec<(i64, u64)>) -> Result<bool> {
        let started = Instant::now();
        let conn = self.db()?;
        let (checkpoint, after) = match cursor.take() {
            Some(at) => at,
            None => {
                let listed = catalogue::unhashed_checkpoints(&conn)?;
                match listed.into_iter().find(|c| !passed.contains(&(c.sandbox_id, c.seq))) {
                    Some(c) => (c, 0),
                    None => return Ok(false),
                }
            }
        };
        let versions = catalogue::unhashed_versions(&conn, &checkpoint, after, BATCH)?;
        if versions.is_empty() {
            if after > 0 && !catalogue::unhashed_versions(&conn, &checkpoint, 0, 1)?.is_empty() {
                // Objects this pass could not read (each was logged): tried
                // again at the next debt.
                passed.push((checkpoint.sandbox_id, checkpoint.seq));
            } else {
                // Every object it added is named (or its versions were pruned).
                catalogue::unlist_unhashed(&conn, &checkpoint)?;
            }
            return Ok(true);
        }
        drop(conn);
        let store = self.store(&checkpoint.store)?;
        let hashes = hash_all(&store, &versions, &self.pruner.requests);
        // Those read before a request came, the first ones.
        let read = &versions[..hashes.len()];
        if read.is_empty() {
            *cursor = Some((checkpoint, after));
            return Ok(true);
        }
        let last = read.last().map_or(after, |&(id, _)| id);
        let named = self.name_in_sandbox(&store, checkpoint.sandbox_id, read, hashes)?;
        tracing::debug!(named, ms = ms_since(started), "named cloned objects by their content");
        *cursor = Some((checkpoint, last));
        Ok(true)
    }

    /// Steps 2 and 3 for versions of one sandbox (id, unhashed object),
    /// with their objects' hashes (or why they could not be read); returns
    /// how many were named.
    fn name_in_sandbox(
        &self,
        store: &Store,
        sandbox_id: i64,
        versions: &[(i64, ObjectId)],
        hashes: Vec<std::io::Result<ObjectId>>,
    ) -> Result<usize> {
        let mut done = Vec::new();
        let guard = self.sandbox_lock(sandbox_id);
        let held = self.hold(sandbox_id, &guard);
        let storing = store.gc_lock.read().unwrap_or_else(|p| p.into_inner());
        {
            let mut conn = self.db()?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut renamed = Vec::new();
            for (&(version, id), hash) in versions.iter().zip(hashes) {
                let hash = match hash {
                    Ok(hash) => hash,
                    Err(e) => {
                        // Missing (`verify` reports it) or unreadable: the
                        // version keeps the name, and the next pass tries.
                        tracing::warn!(object = %id, "reading an unhashed object in {}: {e}", store.path().display());
                        continue;
                    }
                };
                match store.name_unhashed(&id, &hash) {
                    Ok(()) => {}
                    // Removed since it was read, with the version that
                    // held it: nothing to name.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx(|| format!("naming the object {id} {hash}")),
                }
                if let Some(path) = catalogue::name_unhashed(&tx, version, &id, &hash)? {
                    renamed.push((version, path, hash));
                }
                if hash != id {
                    done.push(id);
                }
            }
            self.stop_while_naming_hook();
            tx.commit()?;
            let mut cache = lock(&self.cache.manifests);
            if let Some((_, manifest)) = cache.get_mut(&sandbox_id) {
                for (version, path, hash) in renamed {
                    if let Some(row) = manifest.get_mut(path.as_slice())
                        && row.id == version
                    {
                        row.meta.object = Some(hash);
                    }
                }
            }
        }
        drop(held);
        // The one version holding each of these names holds its hash now,
        // and no version can take an unhashed name it does not hold. Still
        // under the collection lock: `verify` and garbage collection see
        // each object under one name or the other, never both.
        if let Err(e) = store.remove_unhashed(&done) {
            tracing::warn!("removing named objects' unhashed names from {}: {e}", store.path().display());
        }
        drop(storing);
        Ok(done.len())
    }

    /// Whether unhashed objects are being named, or are owed a name.
    pub(super) fn hashing_objects(&self) -> bool {
        Self::hashing_owed(&lock(&self.pruner.owed))
    }

    /// The `hold-hashing` test hook, on only with `SNAPBACK_TEST_HOOKS=1`:
    /// while the file `hold-hashing` is in the state directory, the hasher
    /// names nothing (it looks again every 20 ms), so that a test sees
    /// versions on their unhashed objects.
    fn hold_hashing_hook(&self) -> bool {
        let held = test_hooks() && self.state_dir.join("hold-hashing").exists();
        if held {
            std::thread::sleep(Duration::from_millis(20));
        }
        held
    }

    /// The `stop-while-naming` test hook, on only with
    /// `SNAPBACK_TEST_HOOKS=1`: a batch that has made its hashes names of
    /// their objects ends the daemon before its commit, once for each time
    /// a test creates the file `stop-while-naming` in the state directory.
    fn stop_while_naming_hook(&self) {
        if test_hooks() && std::fs::remove_file(self.state_dir.join("stop-while-naming")).is_ok() {
            tracing::warn!("test hook: stopping while naming objects");
            std::process::exit(70);
        }
    }
}

/// Hashes the unhashed objects of `versions` (id, object), on a few
/// threads: they are mostly small and not in memory, so several reads at
/// once keep the disk busy (as a whole scan's readers do). Once a request
/// comes, no more are begun: returns the hashes of the first ones, in
/// order.
fn hash_all(store: &Store, versions: &[(i64, ObjectId)], requests: &Requests) -> Vec<std::io::Result<ObjectId>> {
    // Handed out in order, each one taken is read: those read are a prefix.
    let next = AtomicUsize::new(0);
    let threads = (capture::threads() * 2).min(versions.len()).max(1);
    let mut found: Vec<(usize, std::io::Result<ObjectId>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    while requests.idle() {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((_, id)) = versions.get(i) else { break };
                        mine.push((i, store.hash_unhashed(id)));
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    found.sort_unstable_by_key(|(i, _)| *i);
    let taken = next.load(Ordering::SeqCst).min(versions.len());
    let mut out: Vec<std::io::Result<ObjectId>> = Vec::with_capacity(taken);
    let mut found = found.into_iter().peekable();
    for i in 0..taken {
        match found.next_if(|(j, _)| *j == i) {
            Some((_, r)) => out.push(r),
            // Its thread panicked: read as a failure, tried again later.
            None => out.push(Err(std::io::Error::other("the hashing thread stopped"))),
        }
    }
    out
}
