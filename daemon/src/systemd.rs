//! The two pieces of systemd's protocol the daemon speaks, without linking
//! libsystemd: socket activation (`LISTEN_FDS` / `LISTEN_PID`, the
//! listener arrives as fd 3) and readiness notification (`NOTIFY_SOCKET`,
//! one datagram per state change). Both are no-ops when systemd did not
//! start the daemon.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Takes the listening socket systemd passed, if it passed one to this
/// process. Reads the environment only: call it early in `main`, before
/// threads start, and it removes `LISTEN_FDS`, `LISTEN_PID` and
/// `LISTEN_FDNAMES` so that children do not inherit them.
///
/// # Safety
///
/// Must be called at most once, while the process is single-threaded: it
/// takes ownership of fd 3 and changes the environment.
pub unsafe fn take_listener() -> io::Result<Option<UnixListener>> {
    let pid = std::env::var("LISTEN_PID").ok().and_then(|v| v.parse::<u32>().ok());
    let fds = std::env::var("LISTEN_FDS").ok().and_then(|v| v.parse::<u32>().ok());
    // SAFETY: the caller guarantees no other thread reads the environment.
    unsafe {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    if pid != std::process::id() || fds == 0 {
        return Ok(None);
    }
    if fds > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "systemd passed {fds} sockets; snapbackd serves exactly one (one ListenStream= in the socket unit)"
            ),
        ));
    }
    let fd = LISTEN_FDS_START;
    // SAFETY: fd 3 is ours by the protocol; checked to be a socket below
    // before anything else uses it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    let st = crate::sys::fstat(std::os::fd::AsFd::as_fd(&listener))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the fd systemd passed is not a socket"));
    }
    // SAFETY: fcntl on a valid fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Returns the filesystem path a listener is bound to, if it has one.
pub fn listener_path(listener: &UnixListener) -> Option<PathBuf> {
    listener.local_addr().ok()?.as_pathname().map(PathBuf::from)
}

/// Sends `state` (for example `READY=1`, `STATUS=...`, `STOPPING=1`) to
/// the service manager, when `NOTIFY_SOCKET` names one. Failures are
/// logged, never fatal: the daemon works the same without systemd.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = (|| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(PathBuf::from(&target))?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)
    })();
    if let Err(e) = sent {
        tracing::warn!("telling systemd {state:?}: {e}");
    }
}
