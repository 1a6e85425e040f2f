//! `snapbackd`: parses arguments, sets up logging and calls
//! [`snapback_daemon::run`] until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// The snapback daemon: copy-on-write checkpoints and rollbacks of sandbox
/// directories, served over a Unix socket.
#[derive(Parser)]
#[command(name = "snapbackd", version)]
struct Args {
    /// The socket to serve [default: $SNAPBACK_SOCKET, then
    /// $XDG_RUNTIME_DIR/snapback/snapbackd.sock, then
    /// /run/snapback/snapbackd.sock for root]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Where the catalogue and the default object store live [default:
    /// /var/lib/snapback for root, else $XDG_STATE_HOME/snapback]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// A TOML configuration file [default: /etc/snapback/snapbackd.toml for
    /// root, else $XDG_CONFIG_HOME/snapback/snapbackd.toml, when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print a systemd drop-in that makes the configured sandboxes and
    /// their stores writable under `ProtectSystem=strict`, then exit.
    #[arg(long)]
    print_dropin: bool,
}

/// Returns the default configuration file, if it exists.
fn default_config() -> Option<PathBuf> {
    // SAFETY: geteuid cannot fail.
    let path = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/etc/snapback/snapbackd.toml")
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        base.join("snapback/snapbackd.toml")
    };
    path.is_file().then_some(path)
}

fn main() -> ExitCode {
    // SAFETY: nothing else runs yet: no thread reads the environment, and
    // fd 3 is taken once, here.
    let listener = match unsafe { snapback_daemon::systemd::take_listener() } {
        Ok(l) => l,
        Err(e) => {
            eprintln!("snapbackd: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args = Args::parse();
    // Read once, before the daemon's threads start.
    snapback_daemon::hooks::init();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SNAPBACK_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colours for a person at a terminal; none in a file or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = match args.config.or_else(default_config) {
        Some(path) => match snapback_daemon::config::FileConfig::load(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("snapbackd: {e}");
                return ExitCode::from(2);
            }
        },
        None => snapback_daemon::config::FileConfig::default(),
    };
    if args.print_dropin {
        print!("{}", snapback_daemon::config::systemd_dropin(&file));
        return ExitCode::SUCCESS;
    }
    // The socket systemd passed wins; then a flag, the environment, the file.
    let socket = listener
        .as_ref()
        .and_then(snapback_daemon::systemd::listener_path)
        .or(args.socket)
        .or_else(|| std::env::var_os(snapback::defaults::SOCKET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| file.socket.clone())
        .or_else(snapback::defaults::socket_path);
    let Some(socket) = socket else {
        eprintln!("snapbackd: no socket path: pass --socket, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR");
        return ExitCode::from(2);
    };
    let Some(state_dir) = args.state_dir.or_else(|| file.state_dir.clone()).or_else(snapback::defaults::state_dir)
    else {
        eprintln!("snapbackd: no state directory: pass --state-dir, or set XDG_STATE_HOME or HOME");
        return ExitCode::from(2);
    };
    let config = snapback_daemon::Config {
        socket,
        listener,
        socket_group: file.socket_group.clone(),
        state_dir,
        retention: file.retention(),
        auto_checkpoints: file.auto_checkpoints(),
        watch: file.watch.unwrap_or(true),
        watcher: file.watcher.unwrap_or_default(),
        default_excludes: file.excludes.clone(),
        register: file.registrations(),
        limits: file.limits(),
        durability: file.durability.unwrap_or_default(),
        diff_max_bytes: file.diff_max_bytes(),
    };
    match snapback_daemon::run(config, shutdown_signal) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapbackd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers now (inside the runtime, before
/// the socket is bound), and returns a future that resolves on the first
/// of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the daemon would ignore stop requests;
            // stop right away instead of running unstoppable.
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    }
}
