//! Garbage collection in the background: a store's objects that no
//! catalogue row references are removed a slice at a time by the pruner
//! thread, between the retention it owes, while checkpoints and restores
//! go on. The daemon owes every store one collection when it starts, and
//! answers requests before it is done.
//!
//! A slice holds the store's collection lock exclusively, as any removal
//! does: no checkpoint is between its first object and its commit then.
//! What a slice keeps is what the catalogue referenced when the
//! collection began, and every object put, opened or linked since (the
//! store notes them from the moment the collection starts, under the same
//! lock; see [`Store::track_uses`]). An object a later checkpoint refers to
//! either was referenced then, or came through the store and was noted.

use super::*;
use crate::store::SLICES;

/// One store's collection in progress.
pub(super) struct Collection {
    path: Vec<u8>,
    store: Arc<Store>,
    /// What the catalogue referenced once the store noted uses, sorted.
    referenced: Vec<ObjectId>,
    /// The next of the store's [`SLICES`] to collect.
    next: usize,
    /// Objects removed and bytes freed so far.
    removed: (u64, u64),
}

impl Drop for Collection {
    fn drop(&mut self) {
        self.store.track_uses(false);
    }
}

impl Engine {
    /// Has the pruner thread collect `store` in the background.
    pub(super) fn owe_collection(&self, store: Vec<u8>) {
        lock(&self.pruner.owed).stores.insert(store);
        self.pruner.owed_changed.notify_all();
    }

    /// Whether a collection is owed or in progress.
    pub(super) fn collecting_garbage(&self) -> bool {
        let owed = lock(&self.pruner.owed);
        owed.collection_running || !owed.stores.is_empty()
    }

    /// Collects the next slice of the collection in progress, or starts
    /// the next one owed.
    pub(super) fn collect_a_slice(&self, current: &mut Option<Collection>) {
        let Some(c) = current else {
            let next = {
                // Owed or running, never neither, for `collecting_garbage`.
                let mut owed = lock(&self.pruner.owed);
                let next = owed.stores.pop_first();
                owed.collection_running = next.is_some();
                next
            };
            let Some(path) = next else {
                return;
            };
            match self.start_collection(&path) {
                Ok(c) => *current = Some(c),
                Err(e) => {
                    tracing::warn!(store = %path_of(&path).display(), "collecting garbage: {e}");
                    lock(&self.pruner.owed).collection_running = false;
                }
            }
            return;
        };
        let slice = c.next;
        let result = {
            let _collecting = c.store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            let used = c.store.used_since_tracked();
            c.store.collect_slice(slice, |id| c.referenced.binary_search(id).is_ok() || used.contains(id))
        };
        match result {
            Ok((n, bytes)) => c.removed = (c.removed.0 + n, c.removed.1 + bytes),
            // One slice that cannot be collected does not keep the others;
            // the next start tries it again.
            Err(e) => tracing::warn!(store = %c.store.path().display(), slice, "collecting garbage: {e}"),
        }
        c.next += 1;
        if let Some(pause) = slice_pause() {
            std::thread::sleep(pause);
        }
        if c.next == SLICES {
            let (objects, bytes) = c.removed;
            tracing::info!(store = %path_of(&c.path).display(), objects, bytes, "garbage collected");
            *current = None;
            lock(&self.pruner.owed).collection_running = false;
        }
    }

    fn start_collection(&self, path: &[u8]) -> Result<Collection> {
        let store = self.store(path)?;
        {
            let _collecting = store.gc_lock.write().unwrap_or_else(|p| p.into_inner());
            store.track_uses(true);
            store.clear_temporaries().ctx(|| format!("clearing {}/tmp", store.path().display()))?;
        }
        // The collection ends (and the store stops noting uses) if this fails.
        let mut c = Collection { path: path.to_vec(), store, referenced: Vec::new(), next: 0, removed: (0, 0) };
        c.referenced = catalogue::referenced_ids(&*self.db()?, path)?;
        Ok(c)
    }
}

/// With `SNAPBACK_TEST_HOOKS=1`, `SNAPBACK_TEST_GC_SLICE_MS` has the
/// collection pause that long after each slice, so that a test can take
/// checkpoints and restart the daemon while one is in progress.
fn slice_pause() -> Option<Duration> {
    std::env::var("SNAPBACK_TEST_GC_SLICE_MS")
        .ok()
        .filter(|_| test_hooks())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}
