//! Progress of the request a blocking thread is running, for clients that
//! asked for progress lines in their hello.
//!
//! The server gives each request a [`Progress`] and runs it inside
//! [`scoped`]; the engine's long loops (the capture walk, the restore
//! steps) find it with [`current`] and count with atomic adds, and the
//! server samples it about every 100 ms. Nothing here blocks or allocates
//! on the hot path, and a request run without a `Progress` (an auto
//! checkpoint, a test) simply counts nothing.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use snapback::proto::ProgressReport;

/// What a long operation is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Idle = 0,
    /// Comparing the live tree with the catalogue (and storing what changed).
    Scanning = 1,
    /// Bringing the live tree to a checkpoint.
    Restoring = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Scanning,
            2 => Phase::Restoring,
            _ => Phase::Idle,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Scanning => "scanning",
            Phase::Restoring => "restoring",
        }
    }
}

/// Counters of one request, shared between the thread running it and the
/// connection that reports it.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    done: AtomicU64,
    /// `u64::MAX`: unknown.
    total: AtomicU64,
}

impl Progress {
    /// Enters `phase`, with `total` entries to handle when known.
    pub fn start(&self, phase: Phase, total: Option<u64>) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Counts `n` more entries done.
    pub fn tick(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Returns the progress so far, or `None` before any phase started.
    pub fn report(&self) -> Option<ProgressReport> {
        let phase = Phase::from_u8(self.phase.load(Ordering::Acquire));
        if phase == Phase::Idle {
            return None;
        }
        let total = self.total.load(Ordering::Relaxed);
        Some(ProgressReport {
            phase: phase.as_str().into(),
            done: self.done.load(Ordering::Relaxed),
            total: (total != u64::MAX).then_some(total),
        })
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Progress>>> = const { RefCell::new(None) };
}

/// Runs `f` with `progress` as this thread's current progress.
pub fn scoped<R>(progress: Arc<Progress>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Arc<Progress>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(CURRENT.with(|c| c.borrow_mut().replace(progress)));
    f()
}

/// Returns this thread's current progress, if its request asked for one.
pub fn current() -> Option<Arc<Progress>> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_once_a_phase_started_and_resets_between_phases() {
        let p = Arc::new(Progress::default());
        assert_eq!(p.report(), None);
        scoped(p.clone(), || {
            let cur = current().expect("set inside scoped");
            cur.start(Phase::Scanning, None);
            cur.tick(3);
        });
        assert!(current().is_none(), "cleared after scoped");
        assert_eq!(p.report(), Some(ProgressReport { phase: "scanning".into(), done: 3, total: None }));
        p.start(Phase::Restoring, Some(10));
        p.tick(4);
        assert_eq!(p.report(), Some(ProgressReport { phase: "restoring".into(), done: 4, total: Some(10) }));
    }
}
