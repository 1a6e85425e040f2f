//! Lists of an answer sent while the request still runs: a diff of a
//! whole install, or a patch, goes out as it is made, in `part` lines
//! (see [`snapback::proto::Part`]), so that neither the daemon nor the
//! client holds all of it at once.
//!
//! The server gives a request of a client that reads parts (protocol 2) a
//! channel and runs it inside [`scoped`]; the engine fills a [`Streamed`]
//! list item by item. A request run without one (a protocol 1 client, a
//! test) keeps the items, and they go in the answer itself.

use std::cell::RefCell;
use std::io;

use serde::Serialize;
use snapback::proto::{MAX_LINE, Part};
use tokio::sync::mpsc::Sender;

/// A part line is sent once its items pass this many bytes: small enough
/// that the client sees the answer flow, large enough that the envelope
/// costs nothing.
const BATCH: usize = 256 * 1024;

thread_local! {
    static SINK: RefCell<Option<Sender<Part>>> = const { RefCell::new(None) };
}

/// Runs `f` with `sink` taking the parts of this thread's answer.
pub fn scoped<R>(sink: Sender<Part>, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<Sender<Part>>);
    impl Drop for Reset {
        fn drop(&mut self) {
            SINK.with(|s| *s.borrow_mut() = self.0.take());
        }
    }
    let _reset = Reset(SINK.with(|s| s.borrow_mut().replace(sink)));
    f()
}

/// One list field of an answer, filled in order.
pub struct Streamed<T> {
    field: &'static str,
    sink: Option<Sender<Part>>,
    batch: Vec<serde_json::Value>,
    size: usize,
    /// Without a sink: the items, for the answer.
    kept: Vec<T>,
}

impl<T: Serialize> Streamed<T> {
    /// The list named `field`, sent in parts when this thread's request
    /// has a sink.
    pub fn new(field: &'static str) -> Streamed<T> {
        let sink = SINK.with(|s| s.borrow().clone());
        Streamed { field, sink, batch: Vec::new(), size: 0, kept: Vec::new() }
    }

    /// Adds the next item. Fails when the client has gone: the request
    /// should stop.
    pub fn push(&mut self, item: T) -> io::Result<()> {
        if self.sink.is_none() {
            self.kept.push(item);
            return Ok(());
        }
        let value = serde_json::to_value(&item).map_err(io::Error::other)?;
        let len = serde_json::to_vec(&value).map_err(io::Error::other)?.len() + 1;
        if len > MAX_LINE - 4096 {
            return Err(io::Error::other(format!("an item of {} is {len} bytes, longer than a line", self.field)));
        }
        if self.size + len > BATCH {
            self.flush()?;
        }
        self.size += len;
        self.batch.push(value);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(sink) = &self.sink else { return Ok(()) };
        if self.batch.is_empty() {
            return Ok(());
        }
        let part = Part { field: self.field.to_owned(), items: std::mem::take(&mut self.batch) };
        self.size = 0;
        sink.blocking_send(part).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }

    /// Sends what is left; returns the items kept for the answer (none
    /// when they were sent).
    pub fn finish(mut self) -> io::Result<Vec<T>> {
        self.flush()?;
        Ok(std::mem::take(&mut self.kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_go_to_the_sink_in_batches_or_stay_for_the_answer() {
        let mut alone = Streamed::new("changes");
        alone.push(1u32).unwrap();
        assert_eq!(alone.finish().unwrap(), vec![1]);

        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let kept = scoped(tx, || {
            let mut list = Streamed::new("patch");
            let piece = "x".repeat(100_000);
            for _ in 0..6 {
                list.push(piece.clone()).unwrap();
            }
            list.finish().unwrap()
        });
        assert!(kept.is_empty());
        let mut parts = Vec::new();
        while let Ok(p) = rx.try_recv() {
            parts.push(p);
        }
        assert!(parts.len() >= 2, "600 KB in one part");
        assert!(parts.iter().all(|p| p.field == "patch"));
        assert_eq!(parts.iter().map(|p| p.items.len()).sum::<usize>(), 6);
    }

    #[test]
    fn a_gone_client_stops_the_request() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        let err = scoped(tx, || {
            let mut list = Streamed::new("changes");
            list.push(1u32).and_then(|()| list.finish().map(drop))
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
