//! Benchmark: checkpoint and rollback of a generated tree (100,000 files of
//! 1-8 KiB in 1,000 directories), side by side with what users would do
//! instead: `cp -a` (with `--reflink=always` where the filesystem clones)
//! and a shadow git repository.
//!
//! Run with `cargo bench -p snapback-daemon --bench checkpoint`. As root it
//! creates, mounts and measures on loop-mounted ext4, XFS (reflink=1) and
//! btrfs images; otherwise on a temporary directory of the current
//! filesystem. Options: `--files N`, `--runs N`, `--fs ext4,xfs,btrfs`,
//! `--dir DIR` (measure in DIR instead of mounting), `--csv FILE`,
//! `--no-watch` (the daemon runs without inotify: every checkpoint is a
//! full scan).
//!
//! Every figure is a median of `--runs` runs on a warm page cache, the
//! daemon reached through its socket as a client would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;
use snapback::proto::{CheckpointRequest, RollbackRequest, SandboxAdd, WirePath};

struct Args {
    files: usize,
    runs: usize,
    filesystems: Vec<String>,
    dir: Option<PathBuf>,
    csv: Option<PathBuf>,
    no_watch: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        files: 100_000,
        runs: 5,
        filesystems: vec!["ext4".into(), "xfs".into(), "btrfs".into()],
        dir: None,
        csv: None,
        no_watch: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--files" => args.files = it.next().and_then(|v| v.parse().ok()).expect("--files N"),
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--fs" => args.filesystems = it.next().expect("--fs LIST").split(',').map(String::from).collect(),
            "--dir" => args.dir = Some(PathBuf::from(it.next().expect("--dir DIR"))),
            "--csv" => args.csv = Some(PathBuf::from(it.next().expect("--csv FILE"))),
            "--no-watch" => args.no_watch = true,
            "--bench" => {} // passed by cargo bench
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

fn run(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A loop-mounted filesystem image, unmounted on drop.
struct Mount {
    point: PathBuf,
    image: PathBuf,
}

impl Mount {
    fn new(fs: &str, base: &Path) -> Mount {
        let image = base.join(format!("{fs}.img"));
        let point = base.join(fs);
        std::fs::create_dir_all(&point).unwrap();
        run(Command::new("truncate").args(["-s", "8G"]).arg(&image));
        match fs {
            "ext4" => run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)),
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

/// A small deterministic generator, so every run writes the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn file_path(tree: &Path, i: usize) -> PathBuf {
    tree.join(format!("d{:03}/f{:06}.dat", i % 1000, i))
}

fn generate(tree: &Path, files: usize) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for d in 0..1000.min(files) {
        std::fs::create_dir_all(tree.join(format!("d{d:03}"))).unwrap();
    }
    for i in 0..files {
        let size = 1024 + (rng.next() % 7169) as usize;
        std::fs::write(file_path(tree, i), rng.bytes(size)).unwrap();
    }
}

/// Rewrites `count` files starting at `start` (spread over directories).
fn modify(tree: &Path, files: usize, start: usize, count: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    for k in 0..count {
        let i = (start + k * 997) % files;
        let size = 1024 + (rng.next() % 7169) as usize;
        std::fs::write(file_path(tree, i), rng.bytes(size)).unwrap();
    }
}

fn create(tree: &Path, tag: usize, count: usize) {
    let mut rng = Rng(0xABCD ^ tag as u64);
    for k in 0..count {
        std::fs::write(tree.join(format!("d{:03}/new-{tag}-{k}.dat", k % 1000)), rng.bytes(2048)).unwrap();
    }
}

/// Flushes dirty pages so that writeback of one phase does not land in the
/// timing of the next.
fn settle() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

/// Set by `--no-watch`: the daemons run with `watch = false`.
static NO_WATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let socket = state.with_extension("sock");
        let config = state.with_extension("toml");
        let watch = !NO_WATCH.load(std::sync::atomic::Ordering::Relaxed);
        std::fs::write(&config, format!("watch = {watch}\n")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_snapbackd"))
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(state)
            .env("SNAPBACK_LOG", "warn")
            .spawn()
            .expect("start snapbackd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Client::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "snapbackd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, socket }
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket).unwrap()
    }

    /// Peak resident memory of the daemon, from /proc.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn checkpoint(client: &mut Client) -> String {
    client.checkpoint(CheckpointRequest { sandbox: "bench".into(), ..Default::default() }).unwrap().id
}

fn rollback(client: &mut Client, id: &str) -> u64 {
    let r = client.rollback(RollbackRequest { checkpoint: id.into(), paths: vec![], dry_run: false }).unwrap();
    r.restored + r.created + r.deleted
}

struct Row {
    fs: String,
    what: &'static str,
    snapback: Duration,
    other_name: &'static str,
    other: Option<Duration>,
    /// A second alternative (btrfs subvolumes), where it applies.
    extra: Option<(&'static str, Duration)>,
}

fn git(repo: &Path, tree: &Path, args: &[&str]) {
    run(Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .arg("--work-tree")
        .arg(tree)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "gc.auto=0"])
        .args(args));
}

fn reflinks(base: &Path) -> bool {
    let a = base.join("probe-a");
    std::fs::write(&a, b"probe").unwrap();
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(&a)
        .arg(base.join("probe-b"))
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(base.join("probe-b"));
    ok
}

fn measure(fs: &str, base: &Path, args: &Args, rows: &mut Vec<Row>, memory: &mut Vec<(String, u64)>) {
    let tree = base.join("tree");
    let _ = std::fs::remove_dir_all(&tree);
    eprintln!("[{fs}] generating {} files", args.files);
    generate(&tree, args.files);
    let runs = args.runs;
    let cow = reflinks(base);

    // cp -a of the whole tree (with --reflink=always where it clones).
    let (cp_name, cp_flag): (&'static str, &[&str]) =
        if cow { ("cp -a --reflink=always", &["-a", "--reflink=always"]) } else { ("cp -a", &["-a"]) };
    let mut cp_times = Vec::new();
    for r in 0..runs.min(3) {
        let dst = base.join(format!("copy{r}"));
        cp_times.push(time(|| run(Command::new("cp").args(cp_flag).arg(&tree).arg(&dst))));
        std::fs::remove_dir_all(&dst).unwrap();
    }

    // snapback's first checkpoint, each run with a fresh state directory.
    let mut first = Vec::new();
    for r in 0..runs.min(3) {
        let state = base.join(format!("state-first{r}"));
        let d = Daemon::start(&state);
        let mut c = d.client();
        c.sandbox_add(SandboxAdd {
            path: WirePath::from(tree.as_path()),
            name: Some("bench".into()),
            excludes: vec![],
            store: None,
        })
        .unwrap();
        first.push(time(|| {
            checkpoint(&mut c);
        }));
        drop(c);
        drop(d);
        std::fs::remove_dir_all(&state).unwrap();
    }
    rows.push(Row {
        fs: fs.into(),
        what: "first checkpoint",
        snapback: median(first),
        other_name: cp_name,
        other: Some(median(cp_times)),
        extra: None,
    });

    let state = base.join("state");
    let d = Daemon::start(&state);
    let mut c = d.client();
    let info = c
        .sandbox_add(SandboxAdd {
            path: WirePath::from(tree.as_path()),
            name: Some("bench".into()),
            excludes: vec![],
            store: None,
        })
        .unwrap();
    eprintln!("[{fs}] clone method: {}", info.clone_method.as_str());
    checkpoint(&mut c);

    // Shadow git repository, as agent tools keep one.
    let repo = base.join("shadow.git");
    eprintln!("[{fs}] building the shadow git repository");
    run(Command::new("git").args(["init", "-q", "--bare"]).arg(&repo));
    git(&repo, &tree, &["add", "-A"]);
    git(&repo, &tree, &["commit", "-q", "-m", "base"]);

    settle();
    let unchanged: Vec<Duration> = (0..runs).map(|_| time(|| drop(checkpoint(&mut c)))).collect();
    let git_unchanged: Vec<Duration> = (0..runs).map(|_| time(|| git(&repo, &tree, &["add", "-A"]))).collect();
    rows.push(Row {
        fs: fs.into(),
        what: "checkpoint, 0 changed",
        snapback: median(unchanged),
        other_name: "git add -A",
        other: Some(median(git_unchanged)),
        extra: None,
    });

    let mut changed = Vec::new();
    let mut git_changed = Vec::new();
    settle();
    for r in 0..runs {
        modify(&tree, args.files, r * 131, 100, 7 + r as u64);
        changed.push(time(|| drop(checkpoint(&mut c))));
        git_changed.push(time(|| {
            git(&repo, &tree, &["add", "-A"]);
            git(&repo, &tree, &["commit", "-q", "-m", "step"]);
        }));
    }
    rows.push(Row {
        fs: fs.into(),
        what: "checkpoint, 100 changed",
        snapback: median(changed),
        other_name: "git add -A && git commit",
        other: Some(median(git_changed)),
        extra: None,
    });

    let mut big = Vec::new();
    let mut git_big = Vec::new();
    for r in 0..runs.min(3) {
        modify(&tree, args.files, 20_000 + r * 7, args.files.min(10_000), 1000 + r as u64);
        settle();
        big.push(time(|| drop(checkpoint(&mut c))));
        git_big.push(time(|| {
            git(&repo, &tree, &["add", "-A"]);
            git(&repo, &tree, &["commit", "-q", "-m", "big"]);
        }));
    }
    rows.push(Row {
        fs: fs.into(),
        what: "checkpoint, 10,000 changed",
        snapback: median(big),
        other_name: "git add -A && git commit",
        other: Some(median(git_big)),
        extra: None,
    });

    let mut rb = Vec::new();
    let mut git_rb = Vec::new();
    for r in 0..runs {
        let base_id = checkpoint(&mut c);
        modify(&tree, args.files, 50_000 + r * 17, 100, 99 + r as u64);
        create(&tree, r, 50);
        settle();
        let mut touched = 0;
        rb.push(time(|| touched = rollback(&mut c, &base_id)));
        assert_eq!(touched, 150, "the rollback touched {touched} paths, not 150");
        // The same damage, undone by git.
        git(&repo, &tree, &["add", "-A"]);
        git(&repo, &tree, &["commit", "-q", "--allow-empty", "-m", "clean"]);
        modify(&tree, args.files, 70_000 + r * 19, 100, 199 + r as u64);
        create(&tree, 100 + r, 50);
        settle();
        git_rb.push(time(|| {
            git(&repo, &tree, &["checkout", "HEAD", "--", "."]);
            git(&repo, &tree, &["clean", "-fdq"]);
        }));
    }
    rows.push(Row {
        fs: fs.into(),
        what: "rollback, 100 modified + 50 new",
        snapback: median(rb),
        other_name: "git checkout -- . && git clean -fd",
        other: Some(median(git_rb)),
        extra: None,
    });
    memory.push((fs.into(), d.peak_rss_kib()));
    drop(c);
    drop(d);

    if fs == "btrfs" {
        btrfs_subvolumes(base, &tree, args, rows);
    }
}

/// btrfs read-only snapshots as checkpoints, and delete + snapshot as the
/// rollback, on a subvolume holding a copy of the tree.
fn btrfs_subvolumes(base: &Path, tree: &Path, args: &Args, rows: &mut [Row]) {
    let vol = base.join("subvol");
    run(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&vol));
    run(Command::new("cp").args(["-a", "--reflink=always"]).arg(format!("{}/.", tree.display())).arg(&vol));
    let mut snaps = Vec::new();
    let mut rollbacks = Vec::new();
    for r in 0..args.runs {
        modify(&vol, args.files, 3_000 + r * 29, 100, 500 + r as u64);
        settle();
        let snap = base.join(format!("snap{r}"));
        snaps
            .push(time(|| run(Command::new("btrfs").args(["-q", "subvolume", "snapshot", "-r"]).arg(&vol).arg(&snap))));
        modify(&vol, args.files, 40_000 + r * 31, 100, 600 + r as u64);
        create(&vol, 300 + r, 50);
        settle();
        rollbacks.push(time(|| {
            run(Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(&vol));
            run(Command::new("btrfs").args(["-q", "subvolume", "snapshot"]).arg(&snap).arg(&vol));
        }));
    }
    let (snap, rb) = (median(snaps), median(rollbacks));
    for row in rows.iter_mut().filter(|r| r.fs == "btrfs") {
        match row.what {
            "checkpoint, 100 changed" => row.extra = Some(("btrfs snapshot -r", snap)),
            "rollback, 100 modified + 50 new" => row.extra = Some(("btrfs subvolume delete + snapshot", rb)),
            _ => {}
        }
    }
}

/// Times a daemon start with 10 sandboxes of `per` files each, from spawn
/// to the first answered request (watches are set up in the background).
fn startup(base: &Path, per: usize, runs: usize) -> (Duration, u64) {
    let state = base.join("state-startup");
    {
        let d = Daemon::start(&state);
        let mut c = d.client();
        for s in 0..10 {
            let tree = base.join(format!("multi/s{s}"));
            let mut rng = Rng(0x5EED + s as u64);
            for i in 0..per {
                let dir = tree.join(format!("d{:02}", i % 100));
                if i < 100 {
                    std::fs::create_dir_all(&dir).unwrap();
                }
                let size = 1024 + (rng.next() % 2048) as usize;
                std::fs::write(dir.join(format!("f{i}")), rng.bytes(size)).unwrap();
            }
            let name = format!("s{s}");
            c.sandbox_add(SandboxAdd {
                path: WirePath::from(tree.as_path()),
                name: Some(name.clone()),
                excludes: vec![],
                store: None,
            })
            .unwrap();
            c.checkpoint(CheckpointRequest { sandbox: name, ..Default::default() }).unwrap();
        }
    }
    let mut times = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        settle();
        let t = Instant::now();
        let d = Daemon::start(&state);
        times.push(t.elapsed());
        // Checkpoints right away are correct whether or not the watches
        // are in place yet (they scan everything until they are).
        let mut c = d.client();
        for s in 0..10 {
            c.checkpoint(CheckpointRequest { sandbox: format!("s{s}"), ..Default::default() }).unwrap();
        }
        rss = rss.max(d.peak_rss_kib());
    }
    (median(times), rss)
}

fn fs_name(path: &Path) -> String {
    let out = Command::new("stat").args(["-f", "-c", "%T"]).arg(path).output().expect("stat -f");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn main() {
    let args = parse_args();
    NO_WATCH.store(args.no_watch, std::sync::atomic::Ordering::Relaxed);
    let mut rows = Vec::new();
    let mut memory = Vec::new();
    let mut startup_figures = None;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let scratch = tempfile::Builder::new()
        .prefix("snapback-bench-")
        .tempdir_in(std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from))
        .unwrap();
    match (&args.dir, root) {
        (Some(dir), _) => {
            let base = dir.join("snapback-bench");
            std::fs::create_dir_all(&base).unwrap();
            measure(&fs_name(&base), &base, &args, &mut rows, &mut memory);
            std::fs::remove_dir_all(&base).unwrap();
        }
        (None, true) => {
            for fs in &args.filesystems {
                let m = Mount::new(fs, scratch.path());
                measure(fs, &m.point, &args, &mut rows, &mut memory);
                // Start-up is measured once, on XFS when it is measured.
                let here = if args.filesystems.iter().any(|f| f == "xfs") { fs == "xfs" } else { true };
                if here && startup_figures.is_none() {
                    startup_figures = Some(startup(&m.point, args.files / 10, args.runs.min(3)));
                }
            }
        }
        (None, false) => {
            eprintln!(
                "not root: measuring on {} only (run as root for ext4, XFS and btrfs loop mounts)",
                scratch.path().display()
            );
            measure(&fs_name(scratch.path()), scratch.path(), &args, &mut rows, &mut memory);
            startup_figures = Some(startup(scratch.path(), args.files / 10, args.runs.min(3)));
        }
    }

    println!(
        "\n{} files, median of {} runs (first checkpoint, cp and 10,000 changed: of {}), {}\n",
        args.files,
        args.runs,
        args.runs.min(3),
        if args.no_watch { "no watcher: every checkpoint is a full scan" } else { "with the watcher" }
    );
    println!("| fs | operation | snapback | alternative | alternative's time | alternative / snapback |");
    println!("|---|---|---:|---|---:|---:|");
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    for r in &rows {
        let (other, ratio) = match r.other {
            Some(o) => (ms(o), format!("{:.2}x", o.as_secs_f64() / r.snapback.as_secs_f64())),
            None => ("-".into(), "-".into()),
        };
        println!("| {} | {} | {} | {} | {} | {} |", r.fs, r.what, ms(r.snapback), r.other_name, other, ratio);
        if let Some((name, t)) = r.extra {
            let ratio = t.as_secs_f64() / r.snapback.as_secs_f64();
            println!("| {} | {} | {} | {} | {} | {ratio:.2}x |", r.fs, r.what, ms(r.snapback), name, ms(t));
        }
    }
    if let Some((t, kib)) = startup_figures {
        println!(
            "\ndaemon start with 10 sandboxes of {} files each (on the filesystem measured first, or XFS), to the first answer: {} (peak memory {:.1} MiB)",
            args.files / 10,
            ms(t),
            kib as f64 / 1024.0
        );
    }
    for (fs, kib) in &memory {
        println!("\npeak daemon memory on {fs}: {:.1} MiB", *kib as f64 / 1024.0);
    }
    if let Some(csv) = &args.csv {
        let mut out = String::from("fs,operation,snapback_ms,alternative,alternative_ms\n");
        for r in &rows {
            let alternatives = r.other.map(|o| (r.other_name, o)).into_iter().chain(r.extra);
            for (name, t) in alternatives {
                out.push_str(&format!(
                    "{},{},{:.3},{},{:.3}\n",
                    r.fs,
                    r.what,
                    r.snapback.as_secs_f64() * 1000.0,
                    name,
                    t.as_secs_f64() * 1000.0
                ));
            }
        }
        std::fs::write(csv, out).unwrap();
    }
}
