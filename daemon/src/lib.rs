//! snapbackd: keeps copy-on-write checkpoints of sandbox directories and
//! rolls them back on request.
//!
//! [`run`] is the whole daemon: it opens the state directory and catalogue,
//! binds the socket, and serves until `shutdown` resolves. The `snapbackd`
//! binary parses arguments and calls it; tests call it too.

pub(crate) mod access;
pub(crate) mod capture;
pub(crate) mod catalogue;
pub mod config;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod export;
pub(crate) mod fanotify;
pub mod hooks;
pub(crate) mod links;
pub(crate) mod manifest;
pub(crate) mod parts;
pub(crate) mod patch;
pub(crate) mod progress;
pub(crate) mod restore;
pub(crate) mod retention;
pub(crate) mod server;
pub(crate) mod store;
pub(crate) mod sys;
pub mod systemd;
pub(crate) mod wal;
pub(crate) mod watcher;

/// What the end-to-end tests reach inside the daemon: the store and the
/// catalogue, to inspect or damage them as a disk or a crash could.
pub mod testing {
    pub use crate::catalogue::connect as connect_catalogue;
    pub use crate::store::Store;
}

use std::path::PathBuf;
use std::sync::Arc;

pub use error::{Error, Result};

/// Why the daemon could not start, or stopped serving: the step, and the
/// error it met.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("opening the state directory: {0}")]
    Open(#[source] Error),
    #[error("finishing a restore a stop interrupted: {0}")]
    Resume(#[source] Error),
    #[error("binding the socket: {0}")]
    Bind(#[source] Error),
    #[error("starting the watches: {0}")]
    Watch(#[source] Error),
    #[error("starting the {0} thread: {1}")]
    Thread(&'static str, #[source] std::io::Error),
    #[error("serving the socket: {0}")]
    Serve(#[source] std::io::Error),
}

/// The daemon's settings.
#[derive(Debug)]
pub struct Config {
    /// The Unix socket to serve.
    pub socket: PathBuf,
    /// A listening socket passed by systemd (socket activation). When set,
    /// it is served instead of binding `socket` (which should then be its
    /// path, for `status`: see [`systemd::listener_path`]), and the socket
    /// file is left to systemd on the way out.
    pub listener: Option<std::os::unix::net::UnixListener>,
    /// A group that may use the socket this daemon binds (mode 0660).
    pub socket_group: Option<String>,
    /// Holds the catalogue (`catalogue.db`) and the default object store.
    pub state_dir: PathBuf,
    /// Retention policies: the default, and per-sandbox overrides.
    pub retention: config::Retention,
    /// Sandboxes (by name) that take `auto` checkpoints after this quiet
    /// period.
    pub auto_checkpoints: std::collections::BTreeMap<String, std::time::Duration>,
    /// Watch sandboxes; without, every checkpoint compares the whole tree.
    pub watch: bool,
    /// With what.
    pub watcher: config::Watcher,
    /// Exclude globs added to every sandbox registered from now on.
    pub default_excludes: Vec<String>,
    /// Sandboxes to register at start, unless they are already.
    pub register: Vec<config::Registration>,
    /// Connection limits: per uid, idle and hello timeouts.
    pub limits: config::Limits,
    /// When checkpoints and rollbacks are acknowledged.
    pub durability: config::Durability,
    /// Files larger than this are summarised in a diff, not diffed.
    pub diff_max_bytes: u64,
}

/// Runs the daemon until the future `shutdown` makes resolves: migrations
/// first, then the socket, so that a client that can connect finds the
/// catalogue ready; then it tells systemd it is ready (when systemd started
/// it). `shutdown` is called first thing, inside the runtime, so that the
/// signal handlers it installs are in place before the socket is bound. On
/// the way out, the daemon stops accepting, removes a socket file it bound
/// itself, and answers every request already running (see
/// [`server::serve`]).
pub fn run<F: std::future::Future<Output = ()> + Send>(
    mut config: Config,
    shutdown: impl FnOnce() -> F,
) -> std::result::Result<(), StartError> {
    raise_fd_limit();
    engine::set_heap_thresholds();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .thread_name("snapbackd")
        .build()
        .map_err(StartError::Runtime)?;
    // The stop signals are caught from here on, before anything is bound:
    // one that comes while the daemon starts stops it once it serves.
    let shutdown = {
        let _context = runtime.enter();
        shutdown()
    };
    let activated = config.listener.take();
    let engine = Arc::new(engine::Engine::open(&config).map_err(StartError::Open)?);
    // A restore a crash interrupted is finished before anyone can see the
    // sandbox half restored.
    engine.resume_interrupted().map_err(StartError::Resume)?;
    let owns_socket = activated.is_none();
    let std_listener = match activated {
        Some(l) => l,
        None => server::bind(&config.socket, config.socket_group.as_deref()).map_err(StartError::Bind)?,
    };
    for registration in &config.register {
        engine.register_configured(registration);
    }
    // Watches are set up in the background: the socket serves at once, and
    // checkpoints scan everything until a sandbox's watch is in place.
    if config.watch {
        engine.start_watches().map_err(StartError::Watch)?;
    }
    // Checkpoints answer before they prune; this thread prunes after them.
    let pruner = {
        let engine = engine.clone();
        std::thread::Builder::new()
            .name("snapback-prune".into())
            .spawn(move || engine.prune_in_background())
            .map_err(|e| StartError::Thread("pruner", e))?
    };
    let stop_auto = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let auto = engine.has_auto_checkpoints().then(|| {
        let (engine, stop) = (engine.clone(), stop_auto.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                engine.auto_checkpoints();
            }
        })
    });
    let result = runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(std_listener).map_err(StartError::Serve)?;
        tracing::info!(socket = %config.socket.display(), state_dir = %config.state_dir.display(), activated = !owns_socket, "snapbackd ready");
        systemd::notify(&format!("READY=1\nSTATUS=serving {}", config.socket.display()));
        let socket = &config.socket;
        let stopped_accepting = || {
            systemd::notify("STOPPING=1\nSTATUS=stopping: answering the requests in progress");
            if owns_socket {
                let _ = std::fs::remove_file(socket);
            }
        };
        server::serve(listener, engine.clone(), config.limits, shutdown, stopped_accepting, server::STOP_GRACE).await;
        Ok(())
    });
    stop_auto.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = auto {
        let _ = t.join();
    }
    engine.stop_watches();
    // Dropping the runtime waits for requests already running on the
    // blocking pool: a checkpoint or rollback in progress completes, and
    // then the pruning it owes.
    drop(runtime);
    engine.stop_pruner();
    let _ = pruner.join();
    tracing::info!("snapbackd stopped");
    result
}

/// Raises the soft limit of open files to the hard limit: a scan holds one
/// fd per directory level and per queued file.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
