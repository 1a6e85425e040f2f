//! What the benchmarks share: commands, a deterministic generator of
//! trees, the daemon, loop-mounted filesystems.

#![allow(dead_code)] // each benchmark uses some of it

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;

pub fn run(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn output(cmd: &mut Command) -> String {
    let out = cmd.stderr(Stdio::piped()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Flushes dirty pages, so that writeback of one step does not land in the
/// timing of the next.
pub fn settle() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// A small deterministic generator, so that every tool sees the same bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }

    /// 1 to 8 KiB: the size of a typical source file.
    pub fn small(&mut self) -> Vec<u8> {
        let n = 1024 + (self.next() % 7169) as usize;
        self.bytes(n)
    }
}

/// Writes the generated tree: `files` small files in `dirs` directories
/// and `big` files of 100 MiB.
pub fn generate(tree: &Path, files: usize, dirs: usize, big: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let dirs = dirs.clamp(1, files.max(1));
    for d in 0..dirs {
        std::fs::create_dir_all(tree.join(format!("d{d:03}"))).unwrap();
    }
    for i in 0..files {
        std::fs::write(tree.join(format!("d{:03}/f{i:06}.dat", i % dirs)), rng.small()).unwrap();
    }
    std::fs::create_dir_all(tree.join("big")).unwrap();
    for b in 0..big {
        let mut f = std::fs::File::create(tree.join(format!("big/blob{b}.bin"))).unwrap();
        for _ in 0..100 {
            f.write_all(&rng.bytes(1 << 20)).unwrap();
        }
    }
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Starts snapbackd with its state in `dir`; returns once it answers.
pub fn start_daemon(dir: &Path) -> Child {
    start_daemon_with(dir, "")
}

/// Starts snapbackd with the configuration `config` (TOML; empty: none).
pub fn start_daemon_with(dir: &Path, config: &str) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("sock");
    let file = dir.join("snapbackd.toml");
    std::fs::write(&file, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_snapbackd"))
        .arg("--config")
        .arg(&file)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("SNAPBACK_LOG", std::env::var("SNAPBACK_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .expect("start snapbackd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Client::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "snapbackd did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Waits until the sandbox's watch is in place (set up in the background).
pub fn wait_watching(client: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = client.status().unwrap();
        // Set up, the watch asks for one full comparison: the first checkpoint.
        if status.sandboxes.iter().any(|s| s.name == "bench" && s.watch != "starting") {
            return;
        }
        assert!(Instant::now() < deadline, "the watch never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub struct Mount {
    pub point: PathBuf,
    image: PathBuf,
}

impl Mount {
    pub fn new(fs: &str, base: &Path) -> Mount {
        let image = base.join(format!("{fs}.img"));
        let point = base.join(fs);
        std::fs::create_dir_all(&point).unwrap();
        // Sparse: only what the tools write takes space. The snapshots of
        // every tool on both trees stay until the end, and filled 16 GiB of
        // btrfs once.
        run(Command::new("truncate").args(["-s", "32G"]).arg(&image));
        match fs {
            // One inode per 4 KiB: the snapshots the tools leave behind (they
            // are removed only with the image) need millions.
            "ext4" => run(Command::new("mkfs.ext4").args(["-q", "-F", "-i", "4096"]).arg(&image)),
            "xfs" => run(Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&image)),
            "btrfs" => run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&image)),
            other => panic!("unknown filesystem {other}"),
        }
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&point));
        Mount { point, image }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.point).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A git command on the shadow repository `repo` of `tree`, as the agents
/// that keep one drive it (no automatic gc: every run measures the same).
pub fn shadow_git(repo: &Path, tree: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("--git-dir").arg(repo).arg("--work-tree").arg(tree);
    c.args(["-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "gc.auto=0"]);
    c
}

/// Creates the shadow repository `repo`.
pub fn init_shadow(repo: &Path) {
    run(Command::new("git").args(["init", "-q", "--bare"]).arg(repo));
}

/// A daemon the benchmark started, stopped when dropped (a failed run
/// too: the daemon must not hold the scratch filesystem).
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
