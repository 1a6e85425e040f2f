//! The `TestDaemon` fixture: a real snapbackd in a temporary directory,
//! ready when its socket answers, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;

/// Returns the path of a workspace binary, next to the test executable's
/// `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: build the workspace first (cargo test --workspace)", path.display());
    path
}

pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// How a [`TestDaemon`] starts: `TestDaemon::builder().config(..).env(..).start()`.
#[derive(Default)]
pub struct Builder {
    config: Option<String>,
    env: Vec<(String, String)>,
    watcher: Option<&'static str>,
}

impl Builder {
    /// The daemon's configuration file.
    pub fn config(mut self, text: &str) -> Builder {
        self.config = Some(text.to_owned());
        self
    }

    /// What watches the sandboxes: `inotify` or `fanotify` (the
    /// configuration's `watcher`).
    pub fn watcher(mut self, watcher: &'static str) -> Builder {
        self.watcher = Some(watcher);
        self
    }

    /// One more environment variable of the daemon's.
    pub fn env(mut self, key: &str, value: &str) -> Builder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts the daemon with its state in a new temporary directory, and
    /// waits until it answers.
    pub fn start(self) -> TestDaemon {
        let dir = tempfile::Builder::new().prefix("snapback-e2e-").tempdir().expect("tempdir");
        let socket = dir.path().join("run/snapbackd.sock");
        let state_dir = dir.path().join("state");
        let config = match (self.watcher, self.config) {
            (Some(w), config) => Some(format!("watcher = \"{w}\"\n{}", config.unwrap_or_default())),
            (None, config) => config,
        };
        let config = config.map(|text| {
            let path = dir.path().join("snapbackd.toml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        let mut d = TestDaemon { dir, socket, state_dir, config, env: self.env, child: None };
        d.restart();
        d
    }
}

impl TestDaemon {
    /// Starts a daemon with its state in a new temporary directory.
    pub fn start() -> TestDaemon {
        Self::builder().start()
    }

    /// A daemon to start with a configuration file or an environment of
    /// its own.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A directory for sandboxes, outside the state directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Spawns the daemon without waiting for it.
    pub fn spawn(socket: &Path, state_dir: &Path) -> Child {
        Self::spawn_with(socket, state_dir, None, &[])
    }

    fn spawn_with(socket: &Path, state_dir: &Path, config: Option<&Path>, env: &[(String, String)]) -> Child {
        let mut cmd = Command::new(binary("snapbackd"));
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(state_dir)
            .env("SNAPBACK_LOG", "warn")
            .env_remove("XDG_CONFIG_HOME")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn snapbackd")
    }

    /// (Re)starts the daemon on the same socket and state, and waits until
    /// it answers.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = Self::spawn_with(&self.socket, &self.state_dir, self.config.as_deref(), &self.env);
        // Read the daemon's log as it comes: a pipe nobody reads fills up,
        // and then every thread that logs (the watcher's too) blocks.
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
                if n == 0 {
                    break;
                }
                let mut kept = sink.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() < 1 << 20 {
                    kept.extend_from_slice(&buf[..n]);
                }
            }
        });
        // Generous: a start fsyncs the catalogue, and on a disk the other
        // tests keep busy one fsync can wait seconds for their writeback.
        // Only a hung daemon comes near this.
        eventually(Duration::from_secs(60), Duration::from_millis(10), || {
            if let Some(status) = child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(100)); // let the reader catch the last lines
                let text = String::from_utf8_lossy(&log.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
                panic!("snapbackd exited with {status}: {text}");
            }
            Client::connect(&self.socket).map(drop).map_err(|e| format!("snapbackd does not answer: {e}"))
        });
        self.child = Some(child);
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Some(child.wait().expect("wait for snapbackd"))
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect")
    }

    /// Runs the CLI with `--socket` and returns its output.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary("snapback"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run snapback")
    }

    /// Runs the CLI with `--json`, asserts success and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "snapback {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
    }

    /// Registers `dir` (created if missing) as sandbox `name`.
    pub fn add_sandbox(&self, name: &str, dir: &Path, extra: &[&str]) -> serde_json::Value {
        std::fs::create_dir_all(dir).expect("create sandbox dir");
        let mut args = vec!["sandbox", "add", dir.to_str().expect("utf-8 test path"), "--name", name];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Takes a checkpoint and returns its id.
    /// Runs the CLI with `--json` and reads its answer as the protocol's
    /// type `T`.
    pub fn answer<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let value = self.json(args);
        serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("snapback {args:?}: {e}: {value}"))
    }

    pub fn checkpoint(&self, sandbox: &str) -> String {
        self.answer::<snapback::proto::CheckpointInfo>(&["checkpoint", sandbox]).id
    }

    /// `snapback list ARGS`.
    pub fn list(&self, args: &[&str]) -> Vec<snapback::proto::CheckpointInfo> {
        let all: Vec<&str> = std::iter::once("list").chain(args.iter().copied()).collect();
        self.answer::<snapback::proto::Checkpoints>(&all).checkpoints
    }

    /// `snapback status`.
    pub fn status(&self) -> snapback::proto::StatusReport {
        self.answer(&["status"])
    }

    pub fn rollback(&self, id: &str) -> snapback::proto::RollbackReport {
        self.answer(&["rollback", id])
    }

    /// Asserts that `snapback verify` finds the store and catalogue in
    /// agreement, and no path with two current versions.
    pub fn assert_verified(&self) {
        let v: snapback::proto::VerifyReport = self.answer(&["verify"]);
        assert!(
            v.missing.is_empty() && v.corrupt.is_empty() && v.unreferenced.is_empty() && v.current_twice.is_empty(),
            "verify found problems: {v:?}"
        );
    }

    /// Waits until the daemon's garbage collection (in the background, after
    /// each start) is done.
    pub fn wait_collected(&self) {
        eventually(Duration::from_secs(60), Duration::from_millis(20), || match self.status().collecting_garbage {
            false => Ok(()),
            true => Err("the daemon is still collecting garbage".to_string()),
        });
    }

    /// Waits until the daemon has named by their content the objects a
    /// scan of a whole tree cloned unread (in the background, after the
    /// scan's answer).
    pub fn wait_hashed(&self) {
        eventually(Duration::from_secs(60), Duration::from_millis(20), || match self.status().hashing_objects {
            false => Ok(()),
            true => Err("the daemon is still naming cloned objects".to_string()),
        });
    }

    /// Returns the bytes of every object in the default store, loose or
    /// packed.
    pub fn store_bytes(&self) -> u64 {
        let store = open_store(&self.state_dir.join("store"));
        let objects = store.list_objects().expect("list objects");
        objects.iter().map(|id| store.open_object(id).and_then(|o| o.size()).expect("an object's length")).sum()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Calls `check` every `every` until it gives `Ok`, and returns what it
/// gave; past `limit`, fails the test with its last `Err`. For what the
/// daemon does in the background (its pruner, its watcher, the thread that
/// reads restored files in), which a test can only poll for.
pub fn eventually<T>(limit: Duration, every: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(done) => return done,
            Err(why) if Instant::now() >= deadline => panic!("still, after {limit:?}: {why}"),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Writes a file, creating its parent directories.
pub fn write(p: &Path, data: impl AsRef<[u8]>) {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("mkdir -p");
    }
    std::fs::write(p, data).expect("write");
}

/// Opens a store directory with the daemon's own code, beside the daemon
/// (the pack index is an SQLite database, safe to read concurrently).
pub fn open_store(store: &Path) -> snapback_daemon::testing::Store {
    snapback_daemon::testing::Store::open(store).expect("open the store")
}

/// Returns the number of objects in a store directory, loose or packed.
pub fn object_count(store: &Path) -> usize {
    open_store(store).list_objects().expect("list objects").len()
}

/// Returns every file of a store that holds object content: the loose
/// objects and the packs.
pub fn store_files(store: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in std::fs::read_dir(store.join("objects")).expect("objects") {
        files.extend(std::fs::read_dir(sub.expect("entry").path()).expect("subdir").map(|f| f.expect("object").path()));
    }
    files.extend(std::fs::read_dir(store.join("packs")).expect("packs").map(|f| f.expect("pack").path()));
    files
}

/// Whether any object in the store holds `needle`.
pub fn store_holds(store: &Path, needle: &[u8]) -> bool {
    store_files(store).iter().any(|f| {
        let data = std::fs::read(f).unwrap_or_default();
        data.windows(needle.len()).any(|w| w == needle)
    })
}

/// Overwrites every copy of `needle` in the store's files with `garbage`
/// (as long), as a power loss might; returns how many it found.
pub fn corrupt_in_store(store: &Path, needle: &[u8], garbage: &[u8]) -> usize {
    assert_eq!(needle.len(), garbage.len());
    let mut hits = 0;
    for f in store_files(store) {
        let mut data = std::fs::read(&f).unwrap_or_default();
        let found: Vec<usize> = (0..data.len().saturating_sub(needle.len() - 1))
            .filter(|&i| &data[i..i + needle.len()] == needle)
            .collect();
        for &i in &found {
            data[i..i + needle.len()].copy_from_slice(garbage);
        }
        if !found.is_empty() {
            // Objects are read-only: write through a fresh mode.
            let mode = std::fs::metadata(&f).expect("stat").permissions();
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            std::fs::write(&f, &data).expect("rewrite");
            std::fs::set_permissions(&f, mode).expect("chmod back");
            hits += found.len();
        }
    }
    hits
}

/// A daemon a second uid (`nobody`, through `setpriv`) can reach, for a
/// test that needs root: its socket's group is `nogroup`, and its
/// directory searchable. Returns `setpriv` with it, or `None` (the test
/// skips, or fails under CI: see [`root_or_skip`]).
pub fn daemon_for_nobody(test: &str) -> Option<(PathBuf, TestDaemon)> {
    if !root_or_skip(test) {
        return None;
    }
    let setpriv = tool_or_skip("setpriv", test)?;
    let d = TestDaemon::builder().config("socket_group = \"nogroup\"\n").start();
    let searchable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(d.dir.path(), searchable).unwrap();
    Some((setpriv, d))
}

/// Whether this process runs as root. When not, a test that needs root
/// prints why it skips, and fails instead if `CI` or
/// `SNAPBACK_REQUIRE_ROOT_TESTS` is set (`.ci/run` sets both).
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() || std::env::var_os("SNAPBACK_REQUIRE_ROOT_TESTS").is_some() {
        panic!("{test} needs root, and CI must run it: run the suite as root");
    }
    eprintln!("skipping {test}: it needs root (loop mounts, a second uid); run the suite as root to include it");
    false
}

/// Returns the path of `tool` on `PATH`. When it is missing, a test that
/// needs it prints why it skips, and fails instead under CI (`.ci/run`
/// installs every tool the suite uses).
pub fn tool_or_skip(tool: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file());
    installed_or_skip(test, tool, found.is_some());
    found
}

/// Whether what `test` needs (`what`) is `installed`. When it is not, the
/// test prints why it skips, and fails instead under CI (`.ci/run`
/// installs everything the suite uses).
pub fn installed_or_skip(test: &str, what: &str, installed: bool) -> bool {
    if !installed {
        if std::env::var_os("CI").is_some() {
            panic!("{test} needs {what}, and CI must run it: .ci/run installs it");
        }
        eprintln!("skipping {test}: {what} is not installed");
    }
    installed
}

/// A recorded hook payload (`tests/e2e/payloads`, shaped as each agent's
/// documentation gives it), with its working directory set to `cwd`.
pub fn payload(name: &str, cwd: &Path) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/payloads");
    let text = std::fs::read_to_string(dir.join(name)).unwrap();
    text.replace("{CWD}", cwd.to_str().unwrap())
}

/// A filesystem image mounted on a loop device, unmounted on drop.
pub struct Mounted {
    pub mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    /// Makes a `size`-byte image of `fs` (`ext4`, `xfs` with reflink, or
    /// `btrfs`) and mounts it.
    pub fn new(fs: &str, size: u64) -> Mounted {
        let dir = tempfile::Builder::new().prefix("snapback-fs-").tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        std::fs::File::create(&image).unwrap().set_len(size).unwrap();
        let mkfs = match fs {
            "xfs" => Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&image).output(),
            "btrfs" => Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&image).output(),
            "ext4" => Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image).output(),
            other => panic!("unknown filesystem {other}"),
        }
        .unwrap_or_else(|e| panic!("mkfs.{fs} is not installed ({e}); .ci/run installs it"));
        assert!(mkfs.status.success(), "mkfs.{fs}: {}", String::from_utf8_lossy(&mkfs.stderr));
        let mount = Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mountpoint).output().unwrap();
        assert!(mount.status.success(), "mount {fs}: {}", String::from_utf8_lossy(&mount.stderr));
        Mounted { mountpoint, _dir: dir }
    }

    /// Returns the bytes free for an unprivileged user, after a sync.
    pub fn free(&self) -> u64 {
        // SAFETY: sync has no preconditions; it settles delayed allocation
        // so free space is measured, not estimated.
        unsafe { libc::sync() };
        let c = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and struct.
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
    }
}

/// Runs the CLI as `nobody` (group `nogroup`) through `setpriv`.
pub fn as_nobody(setpriv: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(setpriv)
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(binary("snapback"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap()
}

/// Runs a shell command as `nobody` (an attacker's own moves).
pub fn sh_as_nobody(setpriv: &Path, script: &str) {
    let out = Command::new(setpriv)
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Sends one raw request line as `nobody` (after the hello) and returns
/// the daemon's answer: for requests the CLI would never send.
pub fn raw_as_nobody(setpriv: &Path, socket: &Path, line: &str) -> serde_json::Value {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
f.write(b'{"type":"hello","protocol":1,"client":"raw test"}\n'); f.flush(); f.readline()
f.write(sys.argv[2].encode() + b"\n"); f.flush()
sys.stdout.write(f.readline().decode())
"#;
    let out = Command::new(setpriv)
        // Debian's own python3: one under root's home (pyenv) is out of
        // nobody's reach. `.ci/run` installs it.
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c", script])
        .arg(socket)
        .arg(line)
        .output()
        .unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}
