//! The socket server: binds the Unix socket, accepts connections, and for
//! each one reads newline-delimited JSON requests, runs them on the
//! blocking pool and writes the responses.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use snapback::proto::{
    ErrorBody, ErrorCode, MAX_LINE, OLDEST_PROTOCOL, PROTOCOL, Part, Request, Response, Welcome, WirePath,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::engine::{After, Engine, Peer, daemon_name};
use crate::error::{Error, IoContext, Result};
use crate::progress::{self, Progress};

/// Binds the socket at `path`. A socket there that accepts connections
/// means another daemon is running: refused. A stale one is replaced. The
/// file's mode is set before `listen`: 0600 for a user daemon, 0660 for
/// root; with `group`, 0660 and owned by that group.
pub fn bind(path: &Path, group: Option<&str>) -> Result<std::os::unix::net::UnixListener> {
    let gid = match group {
        None => None,
        Some(name) => match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Some(g.gid),
            Ok(None) => return Err(Error::InvalidRequest(format!("socket_group {name:?}: no such group"))),
            Err(e) => return Err(Error::InvalidRequest(format!("socket_group {name:?}: {e}"))),
        },
    };
    let root = crate::sys::euid() == 0;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(if root { 0o755 } else { 0o700 })
            .create(parent)
            .ctx(|| format!("creating the socket directory {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::AlreadyExists(format!(
                    "snapbackd is already running on {} (stop it first, or pass another --socket)",
                    path.display()
                )));
            }
            std::fs::remove_file(path).ctx(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => {
            return Err(Error::AlreadyExists(format!("{} exists and is not a socket", path.display())));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| format!("checking {}", path.display())),
    }
    let as_io = |e: nix::Error| io::Error::from_raw_os_error(e as i32);
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(as_io)
    .ctx(|| "creating the socket".into())?;
    let addr = UnixAddr::new(path).map_err(as_io).ctx(|| format!("socket path {}", path.display()))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &addr).map_err(as_io).ctx(|| format!("binding {}", path.display()))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(as_io)
            .ctx(|| format!("giving {} to its socket group", path.display()))?;
    }
    let mode = if root || gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("setting the mode of {}", path.display()))?;
    nix::sys::socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
        .map_err(as_io)
        .ctx(|| format!("listening on {}", path.display()))?;
    Ok(std::os::unix::net::UnixListener::from(fd))
}

pub use crate::config::Limits;

/// One open connection, as the registry sees it.
struct Slot {
    uid: u32,
    /// The registry's clock when the connection was accepted or last
    /// served a request: the smallest is the longest idle.
    last_active: AtomicU64,
    /// A request is running: never evicted then.
    busy: AtomicBool,
    evict: Notify,
    /// The request running, by name, for the log of a stop that cuts it.
    doing: Mutex<Option<&'static str>>,
}

/// The open connections by uid.
struct Registry {
    /// Counts accepts and served requests. A counter, not a time: two
    /// connections accepted within the same millisecond still have an
    /// order, and the one accepted last is never the longest idle.
    clock: AtomicU64,
    per_uid: usize,
    by_uid: Mutex<HashMap<u32, Vec<Arc<Slot>>>>,
}

/// A connection's place in the registry, given back on drop.
struct Admitted {
    registry: Arc<Registry>,
    slot: Arc<Slot>,
}

impl Registry {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits a connection of `uid` accepted at `accepted` (a tick),
    /// evicting that uid's longest-idle one when it is at its limit.
    /// `None`: every one of them is busy.
    fn admit(self: &Arc<Self>, uid: u32, accepted: u64) -> Option<Admitted> {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let open = by_uid.entry(uid).or_default();
        if open.len() >= self.per_uid {
            let idle = open
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.busy.load(Ordering::Acquire))
                .min_by_key(|(_, s)| s.last_active.load(Ordering::Relaxed))
                .map(|(i, _)| i)?;
            let evicted = open.swap_remove(idle);
            evicted.evict.notify_one();
        }
        let slot = Arc::new(Slot {
            uid,
            last_active: AtomicU64::new(accepted),
            busy: AtomicBool::new(false),
            evict: Notify::new(),
            doing: Mutex::new(None),
        });
        open.push(slot.clone());
        Some(Admitted { registry: self.clone(), slot })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut by_uid = self.registry.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = by_uid.get_mut(&self.slot.uid) {
            open.retain(|s| !Arc::ptr_eq(s, &self.slot));
            if open.is_empty() {
                by_uid.remove(&self.slot.uid);
            }
        }
    }
}

/// How long a stop waits for the requests already running to be answered.
pub const STOP_GRACE: Duration = Duration::from_secs(60);

/// Accepts connections until `shutdown` resolves. Then it stops accepting,
/// calls `stopped_accepting` (which removes the socket file), and lets
/// every connection finish the request it is running and send its answer
/// (idle ones are closed), for at most `grace`; the requests still running
/// then are logged as cut.
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
    stopped_accepting: impl FnOnce(),
    grace: Duration,
) {
    let registry = Arc::new(Registry {
        clock: AtomicU64::new(0),
        per_uid: limits.per_uid.max(1),
        by_uid: Mutex::new(HashMap::new()),
    });
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Stamped here, in accept order: the spawned tasks may
                    // take their places in any order.
                    let accepted = registry.tick();
                    let engine = engine.clone();
                    let registry = registry.clone();
                    let stopping = stopping.clone();
                    connections.spawn(async move {
                        if let Err(e) = admit(stream, accepted, engine, registry, limits, stopping).await {
                            tracing::debug!("connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    stopped_accepting();
    let _ = stop.send(true);
    let running = connections.len();
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        let by_uid = registry.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        let cut: Vec<String> = by_uid
            .values()
            .flatten()
            .filter_map(|s| {
                let doing = *s.doing.lock().unwrap_or_else(|p| p.into_inner());
                doing.map(|what| format!("{what} for uid {}", s.uid))
            })
            .collect();
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "stopping: requests still running were cut, their clients get no answer: {}",
            cut.join(", ")
        );
    } else if running > 0 {
        tracing::info!(connections = running, "stopping: every request in progress was answered");
    }
}

/// Reads the peer's uid, takes its place in the registry (or refuses it),
/// and serves it.
async fn admit(
    stream: UnixStream,
    accepted: u64,
    engine: Arc<Engine>,
    registry: Arc<Registry>,
    limits: Limits,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let groups = crate::sys::peer_groups(std::os::fd::AsFd::as_fd(&stream))?;
    let peer = Peer { uid: cred.uid(), gid: cred.gid(), groups: groups.into() };
    match registry.admit(peer.uid, accepted) {
        Some(admitted) => connection(stream, peer, engine, &admitted, limits, stopping).await,
        None => {
            let (_, mut write) = stream.into_split();
            let message = format!("uid {} has {} connections open, each running a request", peer.uid, limits.per_uid);
            let mut refusal = error(ErrorCode::Busy, message);
            if let Response::Error(body) = &mut refusal {
                body.hint = Some("try again when one of them is done".into());
            }
            send(&mut write, &refusal).await
        }
    }
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one line of at most `MAX_LINE` bytes; a longer one is reported
/// without being kept in memory.
async fn read_line(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Line::Eof); // a half line at EOF is dropped
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        if line.len() + chunk.len() >= MAX_LINE {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(chunk);
        let complete = done > chunk.len();
        reader.consume(done);
        if complete {
            return Ok(Line::Complete(line));
        }
    }
}

/// The wire's answer to a refused request: the one place where each of the
/// daemon's errors gets its code.
pub(crate) fn refusal(e: &Error) -> Response {
    let inner = match e {
        Error::Hinted { error, .. } => error,
        other => other,
    };
    let paths = match inner {
        Error::Conflict { paths, .. } => paths.iter().map(|p| WirePath(p.clone())).collect(),
        _ => Vec::new(),
    };
    let body = ErrorBody { code: code(inner), message: e.to_string(), paths, hint: e.hint().map(str::to_owned) };
    tracing::debug!(code = body.code.as_str(), "refused: {}", body.message);
    Response::Error(body)
}

/// The wire code of an error (not `Hinted`: see [`refusal`]).
fn code(e: &Error) -> ErrorCode {
    match e {
        Error::Hinted { error, .. } => code(error),
        Error::NotFound(_) => ErrorCode::NotFound,
        Error::Ambiguous(_) => ErrorCode::Ambiguous,
        Error::AlreadyExists(_) => ErrorCode::AlreadyExists,
        Error::InvalidRequest(_) => ErrorCode::InvalidRequest,
        Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
        Error::PlanApplied(_) => ErrorCode::PlanApplied,
        Error::Moved { .. } => ErrorCode::Moved,
        Error::Busy(_) => ErrorCode::Busy,
        Error::Conflict { .. } => ErrorCode::Conflict,
        Error::Io { source, .. } if source.kind() == io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        Error::Io { .. } => ErrorCode::Io,
        Error::Db(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => {
            ErrorCode::Busy
        }
        Error::Db(_) | Error::Internal(_) | Error::Stale(_) => ErrorCode::Internal,
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(ErrorBody { code, message: message.into(), paths: Vec::new(), hint: None })
}

async fn connection(
    stream: UnixStream,
    peer: Peer,
    engine: Arc<Engine>,
    admitted: &Admitted,
    limits: Limits,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let slot = &admitted.slot;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(16 * 1024, read);
    let mut session = Session { greeted: false, wants_progress: false, protocol: OLDEST_PROTOCOL };
    loop {
        if *stopping.borrow() {
            return Ok(()); // the daemon is stopping: no new request
        }
        let wait = if session.greeted { limits.idle } else { limits.hello.min(limits.idle) };
        let read = tokio::select! {
            read = tokio::time::timeout(wait, read_line(&mut reader)) => read,
            _ = stopping.changed() => return Ok(()),
            () = slot.evict.notified() => {
                let e = error(
                    ErrorCode::Busy,
                    format!("closing: uid {} opened more than {} connections, and this one was the longest idle", peer.uid, limits.per_uid),
                );
                return send(&mut write, &e).await;
            }
        };
        let Ok(read) = read else {
            let what = if session.greeted { "no request" } else { "no hello" };
            let e = error(ErrorCode::InvalidRequest, format!("closing: {what} for {} ms", wait.as_millis()));
            return send(&mut write, &e).await;
        };
        slot.busy.store(true, Ordering::Release);
        let served = serve_line(read?, &mut session, &peer, &engine, &mut write, slot).await;
        slot.last_active.store(admitted.registry.tick(), Ordering::Relaxed);
        slot.busy.store(false, Ordering::Release);
        *slot.doing.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !served? {
            return Ok(());
        }
    }
}

/// What a connection's hello settled.
struct Session {
    greeted: bool,
    /// The client asked for progress lines.
    wants_progress: bool,
    /// The protocol the client speaks.
    protocol: u32,
}

/// Answers one line. Returns whether the connection stays open.
async fn serve_line(
    line: Line,
    session: &mut Session,
    peer: &Peer,
    engine: &Arc<Engine>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    slot: &Slot,
) -> io::Result<bool> {
    let line = match line {
        Line::Eof => return Ok(false),
        Line::TooLong => {
            let e = error(ErrorCode::InvalidRequest, format!("request line longer than {MAX_LINE} bytes"));
            send(write, &e).await?;
            return Ok(false); // the rest of the line cannot be trusted
        }
        Line::Complete(l) => l,
    };
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            send(write, &error(ErrorCode::InvalidRequest, format!("undecodable request: {e}"))).await?;
            return Ok(true);
        }
    };
    *slot.doing.lock().unwrap_or_else(|p| p.into_inner()) = Some(request.name());
    if let Err(e) = request.check_paths() {
        send(write, &error(ErrorCode::InvalidRequest, e)).await?;
        return Ok(true);
    }
    let (response, after) = match (session.greeted, request) {
        (false, Request::Hello(hello)) if (OLDEST_PROTOCOL..=PROTOCOL).contains(&hello.protocol) => {
            session.greeted = true;
            session.wants_progress = hello.progress;
            session.protocol = hello.protocol;
            tracing::debug!(uid = peer.uid, client = %hello.client, protocol = hello.protocol, "hello");
            (Response::Welcome(Welcome { protocol: hello.protocol, daemon: daemon_name() }), None)
        }
        (false, Request::Hello(hello)) => {
            let e = error(
                ErrorCode::ProtocolMismatch,
                format!("this daemon speaks protocols {OLDEST_PROTOCOL} to {PROTOCOL}, the client {}", hello.protocol),
            );
            send(write, &e).await?;
            return Ok(false);
        }
        (false, _) => (error(ErrorCode::InvalidRequest, "the first request must be hello"), None),
        (true, request) => run(engine, peer, request, session, write).await?,
    };
    // The answer goes out before the background work the request started:
    // the work runs when `after` drops, sent or not.
    let sent = send_as(write, &response, session.protocol).await;
    drop(after);
    sent?;
    Ok(true)
}

/// Runs one request on the blocking pool. When the client asked for
/// progress, a `progress` line goes out about every 100 ms while it runs
/// (only when something moved); to a client that reads parts, the lists
/// the request streams (see [`crate::parts`]) go out as they are made.
/// The answer follows.
async fn run(
    engine: &Arc<Engine>,
    peer: &Peer,
    request: Request,
    session: &Session,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> io::Result<(Response, Option<After>)> {
    let finished = |done: std::result::Result<(Result<Response>, After), tokio::task::JoinError>| match done {
        Ok((answer, after)) => (answer.unwrap_or_else(|e| refusal(&e)), Some(after)),
        Err(e) => (error(ErrorCode::Internal, format!("the request failed: {e}")), None),
    };
    let engine = engine.clone();
    let peer = peer.clone();
    let counters = session.wants_progress.then(|| Arc::new(Progress::default()));
    let shared = counters.clone();
    let (sink, mut parts) = tokio::sync::mpsc::channel::<Part>(4);
    let streams = session.protocol >= 2;
    let mut task = tokio::task::spawn_blocking(move || {
        let work = || engine.handle(peer, request);
        let work = || match streams {
            true => crate::parts::scoped(sink, work),
            false => work(),
        };
        match shared {
            Some(p) => progress::scoped(p, work),
            None => work(),
        }
    });
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            done = &mut task => {
                // The parts sent before the request ended go first.
                while let Some(part) = parts.recv().await {
                    send(write, &Response::Part(part)).await?;
                }
                return Ok(finished(done));
            }
            Some(part) = parts.recv() => send(write, &Response::Part(part)).await?,
            _ = tick.tick(), if counters.is_some() => {
                let now = counters.as_ref().and_then(|c| c.report());
                if let Some(report) = now.as_ref().filter(|_| now != last) {
                    send(write, &Response::Progress(report.clone())).await?;
                    last = now;
                }
            }
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response) -> io::Result<()> {
    send_as(write, response, OLDEST_PROTOCOL).await
}

/// Sends an answer to a client of `protocol`. One longer than a line goes
/// out in parts (see [`Part`]) to a client that reads them, as an error to
/// one that does not.
async fn send_as(write: &mut tokio::net::unix::OwnedWriteHalf, response: &Response, protocol: u32) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    if line.len() < MAX_LINE {
        line.push(b'\n');
        return write.write_all(&line).await;
    }
    let lines = match protocol {
        2.. => in_parts(response).map_err(io::Error::other)?,
        _ => None,
    };
    let lines = lines.unwrap_or_else(|| {
        let e = error(
            ErrorCode::Internal,
            format!(
                "the answer is {} bytes, longer than one line ({MAX_LINE}), and this client reads no parts \
                 (protocol {protocol}): use a client of protocol {PROTOCOL}",
                line.len()
            ),
        );
        let mut line = serde_json::to_vec(&e).unwrap_or_default();
        line.push(b'\n');
        vec![line]
    });
    for line in lines {
        write.write_all(&line).await?;
    }
    Ok(())
}

/// The lines of an answer too long for one: `part` lines carrying the
/// items of each list field, each line shorter than [`MAX_LINE`], then the
/// answer with those lists empty. `None` when that is still too long (a
/// single item, or a field that is not a list, past the limit).
fn in_parts(response: &Response) -> serde_json::Result<Option<Vec<Vec<u8>>>> {
    /// Room left in a part's line for its envelope.
    const BUDGET: usize = MAX_LINE - 4096;
    let mut answer = serde_json::to_value(response)?;
    let Some(fields) = answer.as_object_mut() else { return Ok(None) };
    let mut lines = Vec::new();
    for (field, value) in fields.iter_mut() {
        let Some(list) = value.as_array_mut() else { continue };
        let mut items = Vec::new();
        let mut size = 0;
        let flush = |items: &mut Vec<serde_json::Value>, lines: &mut Vec<Vec<u8>>| -> serde_json::Result<()> {
            let part = Response::Part(Part { field: field.clone(), items: std::mem::take(items) });
            let mut line = serde_json::to_vec(&part)?;
            line.push(b'\n');
            lines.push(line);
            Ok(())
        };
        for item in std::mem::take(list) {
            let len = serde_json::to_vec(&item)?.len() + 1;
            if len > BUDGET {
                return Ok(None);
            }
            if size + len > BUDGET {
                flush(&mut items, &mut lines)?;
                size = 0;
            }
            size += len;
            items.push(item);
        }
        if !items.is_empty() {
            flush(&mut items, &mut lines)?;
        }
    }
    let mut last = serde_json::to_vec(&answer)?;
    if last.len() >= MAX_LINE {
        return Ok(None);
    }
    last.push(b'\n');
    lines.push(last);
    Ok(Some(lines))
}
