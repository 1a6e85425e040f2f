//! Default locations shared by the daemon and its clients, so both sides
//! find the same socket without being told.

use std::ffi::OsString;
use std::path::PathBuf;

/// Environment variable that names the socket, for the daemon and clients.
pub const SOCKET_ENV: &str = "SNAPBACK_SOCKET";

/// The socket path used when the system service runs as root.
pub const SYSTEM_SOCKET: &str = "/run/snapback/snapbackd.sock";

/// The state directory used when the daemon runs as root.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/snapback";

fn non_empty(var: &str) -> Option<OsString> {
    std::env::var_os(var).filter(|v| !v.is_empty())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Returns the socket path: `$SNAPBACK_SOCKET`, then
/// `$XDG_RUNTIME_DIR/snapback/snapbackd.sock`, then
/// `/run/snapback/snapbackd.sock` for root. `None` when none applies (a
/// non-root user without `XDG_RUNTIME_DIR`).
pub fn socket_path() -> Option<PathBuf> {
    if let Some(p) = non_empty(SOCKET_ENV) {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = non_empty("XDG_RUNTIME_DIR") {
        return Some(PathBuf::from(dir).join("snapback").join("snapbackd.sock"));
    }
    is_root().then(|| PathBuf::from(SYSTEM_SOCKET))
}

/// Returns the daemon's state directory: `/var/lib/snapback` for root, else
/// `$XDG_STATE_HOME/snapback`, else `$HOME/.local/state/snapback`.
pub fn state_dir() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from(SYSTEM_STATE_DIR));
    }
    if let Some(dir) = non_empty("XDG_STATE_HOME") {
        return Some(PathBuf::from(dir).join("snapback"));
    }
    non_empty("HOME").map(|home| PathBuf::from(home).join(".local/state/snapback"))
}
