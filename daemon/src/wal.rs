//! Write-ahead log checkpoints off the request path, for the catalogue and
//! for each store's pack index.
//!
//! Both databases run with SQLite's automatic checkpoint off: it would copy
//! the log back (and fsync) inside whichever commit crosses 1,000 pages,
//! adding milliseconds to tens of milliseconds to that one request. A
//! [`WalCheckpointer`] does it on a thread of its own, after writes.

use std::io;

use rusqlite::Connection;

/// A thread that copies a database's write-ahead log back into the
/// database file when kicked. A passive checkpoint never blocks readers or
/// writers; when it finds the log fully copied and no reader in it, the
/// thread starts the log over itself (see [`checkpoint`]), so it stays
/// small.
pub struct WalCheckpointer {
    kick: std::sync::mpsc::SyncSender<()>,
}

impl WalCheckpointer {
    /// Starts the thread with `conn`, a connection of its own to a database
    /// in WAL mode that has the one-row table `log_generation (id, n)`.
    /// `what` names the database in warnings. The thread stops when the
    /// checkpointer is dropped.
    pub fn start(conn: Connection, what: &str) -> io::Result<WalCheckpointer> {
        Self::start_with(conn, what, || {})
    }

    /// Like [`WalCheckpointer::start`], with `before` run on the thread at
    /// each kick, before the checkpoint: work of its own that writes to the
    /// database after a request (a store records its sealed packs).
    pub fn start_with(
        conn: Connection,
        what: &str,
        mut before: impl FnMut() + Send + 'static,
    ) -> io::Result<WalCheckpointer> {
        let (kick, kicked) = std::sync::mpsc::sync_channel::<()>(1);
        let what = what.to_owned();
        std::thread::Builder::new().name("snapback-wal".into()).spawn(move || {
            while kicked.recv().is_ok() {
                before();
                if let Err(e) = checkpoint(&conn) {
                    tracing::warn!("checkpointing the write-ahead log of {what}: {e}");
                }
            }
        })?;
        Ok(WalCheckpointer { kick })
    }

    /// Asks for a checkpoint soon; never blocks (one pending request
    /// covers every write made before it runs).
    pub fn kick(&self) {
        let _ = self.kick.try_send(());
    }
}

/// Copies the write-ahead log back into the database; once all of it is,
/// starts the log over with a one-row write. The first write of a new log
/// generation fsyncs the log's header (SQLite orders it before the frames
/// that follow); done here, that fsync (3 ms on a loop-mounted XFS, more on
/// a slow disk) is not paid inside the next request's commit.
pub fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    let (busy, log, copied): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    if busy == 0 && log > 0 && copied == log {
        conn.execute("UPDATE log_generation SET n = n + 1", [])?;
    }
    Ok(())
}
