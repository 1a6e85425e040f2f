//! Deferred work: what a request leaves for after its answer (see
//! [`Engine::handle`]).

use super::*;

impl Engine {
    /// Runs `work` now, or after the answer of the request running on
    /// this thread (see [`Engine::handle`]).
    pub(super) fn later(&self, work: Later) {
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

    pub(super) fn run_later(&self, work: Later) {
        match work {
            Later::CheckpointLogs => {
                self.pool.wal.kick();
                for store in lock(&self.stores.open).values() {
                    store.checkpoint_index_log();
                }
            }
            Later::WakePruner => self.pruner.owed_changed.notify_all(),
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
}

/// Background work a request starts, begun only once its answer is sent
/// (see [`Engine::handle`]).
pub(super) enum Later {
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
    pub(super) static DEFERRED: std::cell::RefCell<Option<Vec<Later>>> = const { std::cell::RefCell::new(None) };
}

/// Work a request left for after its answer: run when dropped.
pub struct After {
    pub(super) engine: Arc<Engine>,
    pub(super) work: Vec<Later>,
}

impl Drop for After {
    fn drop(&mut self) {
        for later in self.work.drain(..) {
            self.engine.run_later(later);
        }
    }
}
