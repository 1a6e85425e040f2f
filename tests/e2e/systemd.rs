//! The daemon under systemd's protocols: a listener passed by
//! `systemd-socket-activate`, readiness sent to `NOTIFY_SOCKET`, and the
//! shipped unit files accepted by `systemd-analyze verify`.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;
use snapback::proto::{CheckpointRequest, SandboxAdd, WirePath};

use crate::fixture::{binary, eventually, tool_or_skip, write};

fn sigterm(child: &std::process::Child) {
    // SAFETY: signalling a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn a_socket_activated_daemon_serves_on_the_passed_socket_and_leaves_it_to_systemd() {
    let test = "a_socket_activated_daemon_serves_on_the_passed_socket";
    let Some(activate) = tool_or_skip("systemd-socket-activate", test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let state = dir.path().join("state");
    let sandbox = dir.path().join("sb");
    write(&sandbox.join("a.txt"), "one");
    // No --socket: the daemon must serve the socket it is handed.
    let mut child = Command::new(activate)
        .arg("--listen")
        .arg(&socket)
        .arg(binary("snapbackd"))
        .arg("--state-dir")
        .arg(&state)
        .env("SNAPBACK_LOG", "warn")
        .env("HOME", "/nonexistent")
        .env_remove("SNAPBACK_SOCKET")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn systemd-socket-activate");
    // The socket file appears at bind(), a moment before listen(): until
    // then a connect is refused, so wait for a connect, not for the file.
    // Once it listens, connections queue until the daemon takes them.
    let mut client = eventually(Duration::from_secs(20), Duration::from_millis(10), || {
        assert!(child.try_wait().unwrap().is_none(), "systemd-socket-activate exited early");
        Client::connect(&socket).map_err(|e| format!("systemd-socket-activate does not listen: {e}"))
    });
    let path = WirePath::from(sandbox.as_path());
    client.sandbox_add(SandboxAdd { path, name: Some("sb".into()), excludes: vec![], store: None }).unwrap();
    let cp = client.checkpoint(CheckpointRequest { sandbox: "sb".into(), ..Default::default() }).unwrap();
    assert_eq!(cp.files, 1);
    let status = client.status().unwrap();
    assert_eq!(status.socket.as_path(), socket, "status reports the passed socket");
    drop(client);
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "snapbackd: {}", String::from_utf8_lossy(&out.stderr));
    assert!(socket.exists(), "an activated daemon leaves the socket file to systemd");
}

/// Receives one notification datagram as text, while `child` runs. A
/// daemon that exits first, or sends nothing within 60 s, fails the test
/// with its log, and in the second case with where each of its threads
/// waits.
fn receive(notify: &UnixDatagram, child: &mut Child, log: &Path) -> String {
    notify.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("receiving from the notify socket: {e}"),
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("snapbackd exited with {status} before notifying: {}", read_log(log));
        }
        if Instant::now() > deadline {
            let threads = thread_states(child.id());
            let _ = child.kill();
            let _ = child.wait();
            panic!("no notification within 60 s; snapbackd's threads:\n{threads}\nits log: {}", read_log(log));
        }
    }
}

fn read_log(log: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned()
}

/// Each thread of process `pid`: its name, the kernel function it sleeps
/// in, and (readable by root) its kernel stack.
fn thread_states(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let (comm, wchan, stack) = (read("comm"), read("wchan"), read("stack"));
        out += &format!("{} ({}) in {wchan}\n{stack}", task.file_name().to_string_lossy(), comm.trim());
    }
    out
}

#[test]
fn ready_reaches_notify_socket_only_once_the_socket_listens() {
    // The daemon's state goes on a tmpfs when there is one. Its start
    // fsyncs the new catalogue about a dozen times, and on a disk that
    // the other tests (and the build before them) keep busy, each fsync
    // waits for their writeback: the likeliest reason why, once in CI, no
    // notification came within 60 s. This test is about the order of
    // READY=1 and listen(), not about the disk.
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let socket = dir.path().join("run/snapbackd.sock");
    let log = dir.path().join("snapbackd.log");
    let mut child = Command::new(binary("snapbackd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("SNAPBACK_LOG", "debug")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file, not a pipe: nobody reads the log until the end, and a
        // full pipe would stop the daemon at its next log line.
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let ready = receive(&notify, &mut child, &log);
    assert!(ready.lines().any(|l| l == "READY=1"), "first notification: {ready:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=serving")), "{ready:?}");
    // No retry: when READY=1 arrives the socket already accepts, and the
    // catalogue is migrated.
    let mut client = Client::connect(&socket).expect("the socket listens when READY=1 is sent");
    assert!(client.sandbox_list().unwrap().sandboxes.is_empty());
    drop(client);
    sigterm(&child);
    let stopping = receive(&notify, &mut child, &log);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "snapbackd: {status}: {}", read_log(&log));
    assert!(!socket.exists(), "a daemon that bound its socket removes it");
}

/// Copies the unit files of `from` into `to`, pointing `ExecStart` at the
/// binary just built instead of the install location (verify checks that
/// the command exists).
fn stage_units(from: &Path, to: &Path) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let daemon = binary("snapbackd");
    let mut staged = Vec::new();
    for name in ["snapbackd.socket", "snapbackd.service"] {
        let text = std::fs::read_to_string(from.join(name)).unwrap();
        assert!(name.ends_with(".socket") || text.contains("ExecStart=/usr/local/bin/snapbackd "));
        let text = text.replace("/usr/local/bin/snapbackd", daemon.to_str().unwrap());
        std::fs::write(to.join(name), text).unwrap();
        staged.push(to.join(name));
    }
    staged
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_files() {
    let Some(analyze) = tool_or_skip("systemd-analyze", "systemd_analyze_verify_accepts_the_unit_files") else {
        return;
    };
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    for (scope, from) in [("system", units.clone()), ("user", units.join("user"))] {
        let staged = stage_units(&from, &dir.path().join(scope));
        let mut cmd = Command::new(&analyze);
        if scope == "user" {
            cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
        }
        let out = cmd.arg("verify").args(&staged).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify exits 0 on some problems it only warns about: both count.
        assert!(out.status.success() && stderr.trim().is_empty(), "{scope} units: {}\n{stderr}", out.status);
    }
}
