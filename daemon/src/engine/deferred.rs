//! Deferred work: what a request leaves for after its answer (see
//! [`Engine::handle`]).

use super::*;

impl Engine {
    /// Runs `work` now, or after the answer of the request running on
    /// this thread (see [`Engine::handle`]).
    pub(super) fn later(&self, work: Later) {
        let work = DEFERRED.with_borrow_mut(|d| match d {
            Some(deferred) => {
                let queued = |w: &Later| std::mem::discriminant(w) == std::mem::discriminant(&work);
                if !(work.once() && deferred.iter().any(queued)) {
                    deferred.push(work);
                }
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
            Later::GiveBackMemory => give_back_memory(),
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
    /// Give the heap's free pages back to the system (see
    /// [`give_back_memory`]).
    GiveBackMemory,
}

impl Later {
    /// Whether running it twice after one answer does nothing the first run
    /// did not: such work is queued once however many parts of a request
    /// ask for it (each connection a request drops after writing asks for
    /// the logs' checkpoint).
    fn once(&self) -> bool {
        !matches!(self, Later::Warm(..))
    }
}

/// The paths a request reads or writes, from which what it allocated
/// and freed is worth giving back (see [`give_back_memory`]).
pub(super) const GIVE_BACK_AFTER_PATHS: usize = 10_000;

/// Returns the free pages inside the heap to the system. The allocator
/// keeps what a large request freed (a first checkpoint's scan, a manifest
/// read or rebuilt) as free chunks among live ones, which it cannot give
/// back by shrinking the heap; `malloc_trim` releases every whole free page
/// in them. At a million files the heap held 16-31 MiB free, and giving
/// it back took about 12 MiB off the daemon's resident memory, for up to
/// 6 ms after the answer; memory a request frees is otherwise reused by
/// the next one of its size, so only requests that touch
/// [`GIVE_BACK_AFTER_PATHS`] paths or more ask for it.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = Instant::now();
        // SAFETY: malloc_trim only releases free memory the allocator owns.
        unsafe { libc::malloc_trim(0) };
        tracing::debug!(ms = ms_since(started), "gave the heap's free pages back");
    }
}

/// Fixes glibc's two heap thresholds, unless the environment sets either
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`): called once, before
/// the daemon's threads start. Left to adjust themselves, the mmap
/// threshold rises to the largest mapped block freed (up to 32 MiB) and
/// the trim threshold to twice that, so the heap of each thread a capture
/// started kept at its top what the thread freed, about 5 MiB each after
/// a first checkpoint of a million files where the store cannot clone,
/// long after the thread ended; [`give_back_memory`] cannot reach those
/// tops (`malloc_trim` shrinks the main heap's only). Fixed, a block of
/// 4 MiB or more is a mapping of its own (a vector grown past that moves
/// by `mremap`, without a copy), and a heap gives back its top once more
/// than 1 MiB of it is free. Lower thresholds were measured, and cost
/// every checkpoint the faults of a heap shrunk and grown again (see
/// docs/benchmarks.md).
pub(crate) fn set_heap_thresholds() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"].iter().any(|v| std::env::var_os(v).is_some()) {
            return;
        }
        // SAFETY: mallopt only changes the allocator's parameters.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
        }
    }
}

/// See [`set_heap_thresholds`].
const MMAP_THRESHOLD: usize = 4 << 20;
const TRIM_THRESHOLD: usize = 1 << 20;

thread_local! {
    /// The work deferred by the request running on this thread, if one
    /// is (see [`Engine::handle`]).
    pub(super) static DEFERRED: std::cell::RefCell<Option<Vec<Later>>> = const { std::cell::RefCell::new(None) };
}

/// Whether a request runs on this thread, whose answer work can wait for.
pub(super) fn deferring() -> bool {
    DEFERRED.with_borrow(Option::is_some)
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
