//! Benchmark: snapback side by side with what users would use instead, on
//! the same trees, in one run.
//!
//! The alternatives, each driven the way its users drive it:
//!
//! - `git`: a shadow repository (`git --git-dir=... --work-tree=...`), as
//!   Gemini CLI, Cline and Roo Code keep one. A checkpoint is `git add -A &&
//!   git commit`; a rollback `git checkout <commit> -- . && git clean -fd`.
//! - `rsync`: hardlink snapshots (`rsync -a --delete --link-dest=<previous>`,
//!   as rsnapshot does); a rollback `rsync -a --delete <snapshot>/ <tree>/`.
//! - `cp`: `cp -a --reflink=always` of the whole tree where the filesystem
//!   clones, else `cp -a`; a rollback removes the tree and clones (or
//!   copies) the copy back.
//! - `btrfs`: the tree is a subvolume; a checkpoint is a read-only snapshot,
//!   a rollback `btrfs subvolume delete` + `btrfs subvolume snapshot`.
//!
//! Each tool gets its own copy of the tree and then the same sequence of
//! changes (the same seeds): the first checkpoint (for snapback on a
//! filesystem that clones, also `--rounds` checkpoints of 100 changed
//! files right after it, while the daemon names the objects it cloned
//! unread, and the time until that naming is done); checkpoints after 0,
//! 100 (`--rounds` of them: the store is measured after these) and 10,000
//! changed files; rollbacks after 100 files were modified and 50 created
//! (the issue's case), then after 20 more were also deleted, each checked
//! file by file. Each timed operation follows its changes straight away, as
//! an agent's next tool call follows the last: their writes are still in
//! the page cache, and what a tool has to write out of them is part of its
//! time (`--sync-after-changes` flushes them first instead). Dirty pages
//! are flushed (`sync`) before every change, so that no tool pays for
//! writing out another's data or an earlier step's; and before each of
//! these kinds of operation, snapbackd is left to finish its background
//! work (until it uses under 1 ms of CPU in 100 ms), so that one kind does
//! not pay for the last. snapback is reached through its
//! client library over the daemon's socket, with one connection, as an
//! agent harness would.
//!
//! As root it loop-mounts ext4, XFS (`reflink=1`) and btrfs images under
//! `$TMPDIR`; otherwise it measures in a temporary directory of the current
//! filesystem. Raw figures go to `<out>/results.csv`, medians and ratios to
//! `<out>/table.md`, and a chart of checkpoint time against changed files to
//! `<out>/checkpoint-time.png` (drawn by gnuplot from the CSV's medians).
//!
//! Run: `cargo bench -p snapback-daemon --bench compare -- --help`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snapback::Client;
use snapback::proto::{CheckpointRequest, RollbackRequest, SandboxAdd, WirePath};

mod common;
use common::*;

const HELP: &str = "\
compare: snapback against shadow git, rsync --link-dest, cp --reflink and btrfs snapshots

options:
  --files N       small files in the generated tree (default 100000)
  --dirs N        directories they are spread over (default 1000)
  --big N         100 MiB files added to the generated tree (default 3)
  --source DIR    also measure a copy of this real tree (e.g. ~/.cargo/registry/src)
  --runs N        runs per measured operation, medians reported (default 7)
  --rounds N      checkpoints of 100 changed files before the store is measured (default 20)
  --fs LIST       filesystems to loop-mount as root (default ext4,xfs,btrfs)
  --tools LIST    tools to measure (default snapback,git,rsync,cp,btrfs)
  --out DIR       where results.csv, table.md and checkpoint-time.png go (default target/bench)
  --no-startup    skip the daemon start-up measurement
  --watcher W     what the daemon watches with: auto (the default: fanotify
                  as root), fanotify or inotify
  --sync-after-changes
                  sync between the changes and the operation timed after them
                  (by default the sync comes before the changes, as an agent
                  leaves a tree: its writes still in the page cache)
  --chart-from F  measure nothing: draw <out>/checkpoint-time.png from the CSV F of an earlier run";

struct Args {
    files: usize,
    dirs: usize,
    big: usize,
    source: Option<PathBuf>,
    runs: usize,
    rounds: usize,
    filesystems: Vec<String>,
    tools: Vec<String>,
    out: PathBuf,
    startup: bool,
    /// `sync` between the changes and the operation timed after them (the
    /// method of runs before this option existed).
    sync_after_changes: bool,
    /// Only draw the chart from this CSV (written by an earlier run).
    chart_from: Option<PathBuf>,
    /// The daemon's `watcher` setting.
    watcher: String,
}

fn parse_args() -> Args {
    let mut args = Args {
        files: 100_000,
        dirs: 1000,
        big: 3,
        source: None,
        runs: 7,
        rounds: 20,
        filesystems: vec!["ext4".into(), "xfs".into(), "btrfs".into()],
        tools: ["snapback", "git", "rsync", "cp", "btrfs"].map(String::from).to_vec(),
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bench")),
        startup: true,
        sync_after_changes: false,
        chart_from: None,
        watcher: "auto".into(),
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>| v.expect("a comma-separated list").split(',').map(String::from).collect();
    while let Some(a) = it.next() {
        let mut number = || it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{a} takes a number"));
        match a.as_str() {
            "--files" => args.files = number(),
            "--dirs" => args.dirs = number(),
            "--big" => args.big = number(),
            "--runs" => args.runs = number().max(1),
            "--rounds" => args.rounds = number().max(1),
            "--source" => args.source = Some(PathBuf::from(it.next().expect("--source DIR"))),
            "--fs" => args.filesystems = list(it.next()),
            "--tools" => args.tools = list(it.next()),
            "--out" => args.out = PathBuf::from(it.next().expect("--out DIR")),
            "--no-startup" => args.startup = false,
            "--watcher" => args.watcher = it.next().expect("--watcher auto|fanotify|inotify"),
            "--sync-after-changes" => args.sync_after_changes = true,
            "--chart-from" => args.chart_from = Some(PathBuf::from(it.next().expect("--chart-from CSV"))),
            "--bench" => {} // passed by cargo bench
            "--help" | "-h" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}\n{HELP}"),
        }
    }
    args
}

impl Args {
    /// Called between the changes and the operation timed after them.
    fn sync_if_asked(&self) {
        if self.sync_after_changes {
            settle();
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers: commands, files, timing, disk usage.

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Bytes in use on the filesystem holding `path`.
fn used_bytes(path: &Path) -> u64 {
    settle();
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs fills st on success, checked below.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) }, 0, "statvfs {}", path.display());
    // SAFETY: initialised by the successful call.
    let st = unsafe { st.assume_init() };
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

/// The regular files under `tree` smaller than 1 MiB (the ones the changes
/// touch), relative and sorted.
fn small_files(tree: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                walk(root, &e.path(), out);
            } else if t.is_file() && e.metadata().unwrap().len() < 1 << 20 {
                out.push(e.path().strip_prefix(root).unwrap().to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, tree, &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// The tools.

/// A way to checkpoint and roll back a tree.
trait Tool {
    /// Takes a checkpoint; returns its time and a handle to roll back to.
    fn checkpoint(&mut self) -> (Duration, String);
    /// Brings the tree back to the checkpoint `to`; returns the time.
    fn rollback(&mut self, to: &str) -> Duration;
    /// The tree it works on (it may replace it).
    fn tree(&self) -> &Path;
    /// Peak resident memory of a daemon, for the tools that have one.
    fn peak_memory_kib(&self) -> Option<u64> {
        None
    }
    /// Resident memory of a daemon now.
    fn memory_kib(&self) -> Option<u64> {
        None
    }
    /// Times a status request, for the tools that answer one.
    fn status(&mut self) -> Option<Duration> {
        None
    }
    /// Waits until work the tool left running in the background is done
    /// (a daemon's); called before each kind of operation is measured.
    fn quiesce(&self) {}
    /// Whether objects a checkpoint cloned unread are still being named
    /// (snapback, after a first checkpoint on a filesystem that clones).
    fn naming(&mut self) -> bool {
        false
    }
}

/// snapbackd with a sandbox on the tree, over one client connection.
struct Snapback {
    daemon: Child,
    client: Client,
    tree: PathBuf,
}

impl Snapback {
    /// Starts the daemon and registers the tree; returns it, and how long
    /// its watch took to set up once the tree was registered.
    fn start(dir: &Path, tree: &Path, watcher: &str) -> (Snapback, Duration) {
        let daemon = start_daemon_with(dir, &format!("watcher = \"{watcher}\"\n"));
        let mut client = Client::connect(&dir.join("sock")).unwrap();
        let added = Instant::now();
        client
            .sandbox_add(SandboxAdd {
                path: WirePath::from(tree),
                name: Some("bench".into()),
                excludes: vec![],
                store: None,
            })
            .unwrap();
        wait_watching(&mut client);
        (Snapback { daemon, client, tree: tree.to_owned() }, added.elapsed())
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A `kB` figure of `/proc/PID/status`.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Tool for Snapback {
    fn naming(&mut self) -> bool {
        self.client.status().unwrap().hashing_objects
    }

    fn checkpoint(&mut self) -> (Duration, String) {
        let t = Instant::now();
        let c = self.client.checkpoint(CheckpointRequest { sandbox: "bench".into(), ..Default::default() }).unwrap();
        (t.elapsed(), c.id)
    }

    fn rollback(&mut self, to: &str) -> Duration {
        let t = Instant::now();
        self.client.rollback(RollbackRequest { checkpoint: to.into(), paths: vec![], dry_run: false }).unwrap();
        t.elapsed()
    }

    fn tree(&self) -> &Path {
        &self.tree
    }

    fn peak_memory_kib(&self) -> Option<u64> {
        Some(peak_rss_kib(self.daemon.id()))
    }

    fn memory_kib(&self) -> Option<u64> {
        Some(proc_status_kib(self.daemon.id(), "VmRSS:"))
    }

    fn status(&mut self) -> Option<Duration> {
        let t = Instant::now();
        self.client.status().unwrap();
        Some(t.elapsed())
    }

    /// Waits until the daemon used less than 1 ms of CPU time in 100 ms
    /// (at most 60 s): copying a large write-ahead log back, or pruning,
    /// after the 10,000-file checkpoints otherwise ran into the first
    /// rollbacks.
    fn quiesce(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = cpu_ns(self.daemon.id());
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            let now = cpu_ns(self.daemon.id());
            if now.saturating_sub(last) < 1_000_000 {
                return;
            }
            last = now;
        }
    }
}

/// CPU time of every thread of process `pid`, in nanoseconds (the first
/// field of each thread's `schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

impl Drop for Snapback {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.daemon.id() as i32, libc::SIGTERM) };
        let _ = self.daemon.wait();
    }
}

/// A shadow git repository beside the tree.
struct Git {
    repo: PathBuf,
    tree: PathBuf,
}

impl Git {
    fn git(&self) -> Command {
        shadow_git(&self.repo, &self.tree)
    }
}

impl Tool for Git {
    fn checkpoint(&mut self) -> (Duration, String) {
        if !self.repo.exists() {
            init_shadow(&self.repo);
        }
        let t = time(|| {
            run(self.git().args(["add", "-A"]));
            run(self.git().args(["commit", "-q", "--allow-empty", "-m", "checkpoint"]));
        });
        (t, output(self.git().args(["rev-parse", "HEAD"])))
    }

    fn rollback(&mut self, to: &str) -> Duration {
        time(|| {
            run(self.git().args(["checkout", to, "--", "."]));
            run(self.git().args(["clean", "-fdq"]));
        })
    }

    fn tree(&self) -> &Path {
        &self.tree
    }
}

/// Snapshots of a tree kept as numbered entries of a directory: what the
/// rsync, cp and btrfs tools have in common.
struct Snapshots {
    dir: PathBuf,
    tree: PathBuf,
    taken: usize,
}

impl Snapshots {
    /// The path of the next snapshot, and of the one before it, if any.
    fn next(&mut self) -> (PathBuf, Option<PathBuf>) {
        let n = self.taken;
        self.taken += 1;
        (self.dir.join(n.to_string()), n.checked_sub(1).map(|p| self.dir.join(p.to_string())))
    }
}

/// Hardlink snapshots with `rsync --link-dest`.
struct Rsync(Snapshots);

impl Tool for Rsync {
    fn checkpoint(&mut self) -> (Duration, String) {
        let (dest, previous) = self.0.next();
        let mut cmd = Command::new("rsync");
        cmd.args(["-a", "--delete"]);
        if let Some(previous) = previous {
            cmd.arg(format!("--link-dest={}", previous.display()));
        }
        cmd.arg(format!("{}/", self.0.tree.display())).arg(&dest);
        (time(|| run(&mut cmd)), dest.display().to_string())
    }

    fn rollback(&mut self, to: &str) -> Duration {
        time(|| run(Command::new("rsync").args(["-a", "--delete"]).arg(format!("{to}/")).arg(&self.0.tree)))
    }

    fn tree(&self) -> &Path {
        &self.0.tree
    }
}

/// Whole-tree clones with `cp -a --reflink=always`, or where the
/// filesystem cannot clone, whole-tree copies with `cp -a`.
struct Cp {
    snaps: Snapshots,
    flags: &'static [&'static str],
}

impl Cp {
    fn new(snaps: Snapshots, clones: bool) -> Cp {
        Cp { snaps, flags: if clones { &["-a", "--reflink=always"] } else { &["-a"] } }
    }
}

impl Tool for Cp {
    fn checkpoint(&mut self) -> (Duration, String) {
        let (dest, _) = self.snaps.next();
        let t = time(|| run(Command::new("cp").args(self.flags).arg(&self.snaps.tree).arg(&dest)));
        (t, dest.display().to_string())
    }

    fn rollback(&mut self, to: &str) -> Duration {
        time(|| {
            run(Command::new("rm").arg("-rf").arg(&self.snaps.tree));
            run(Command::new("cp").args(self.flags).arg(to).arg(&self.snaps.tree));
        })
    }

    fn tree(&self) -> &Path {
        &self.snaps.tree
    }
}

/// btrfs read-only snapshots of the tree, a subvolume.
struct Btrfs(Snapshots);

impl Tool for Btrfs {
    fn checkpoint(&mut self) -> (Duration, String) {
        let (dest, _) = self.0.next();
        let tree = &self.0.tree;
        let t = time(|| run(Command::new("btrfs").args(["-q", "subvolume", "snapshot", "-r"]).arg(tree).arg(&dest)));
        (t, dest.display().to_string())
    }

    fn rollback(&mut self, to: &str) -> Duration {
        time(|| {
            run(Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(&self.0.tree));
            run(Command::new("btrfs").args(["-q", "subvolume", "snapshot", to]).arg(&self.0.tree));
        })
    }

    fn tree(&self) -> &Path {
        &self.0.tree
    }
}

// ---------------------------------------------------------------------------
// What is measured.

/// Raw samples: (fs, tree, tool, operation) -> values in ms (or bytes).
type Key = (String, String, String, String);

#[derive(Default)]
struct Results {
    samples: BTreeMap<Key, Vec<f64>>,
    /// Why a tool did not run somewhere.
    skipped: Vec<String>,
}

const FIRST: &str = "first checkpoint";
const ZERO: &str = "checkpoint, 0 changed";
const HUNDRED: &str = "checkpoint, 100 changed";
const HUNDRED_NAMING: &str = "checkpoint, 100 changed, while the first checkpoint's objects are named";
const NAMED: &str = "the first checkpoint's objects named, in the background (from its answer)";
const TEN_K: &str = "checkpoint, 10,000 changed";
const ROLLBACK: &str = "rollback, 100 modified + 50 created";
const ROLLBACK_DELETED: &str = "rollback, 100 modified + 50 created + 20 deleted";
const STORE: &str = "store bytes: first checkpoint + the 100-changed rounds";
const MEMORY: &str = "peak daemon memory";
const WATCH: &str = "watch set-up, from registration";
const STATUS: &str = "status";
const STEADY: &str = "daemon memory after the 100-changed rounds";
const OPERATIONS: [&str; 13] = [
    WATCH,
    FIRST,
    NAMED,
    HUNDRED_NAMING,
    ZERO,
    HUNDRED,
    TEN_K,
    ROLLBACK,
    ROLLBACK_DELETED,
    STATUS,
    STORE,
    MEMORY,
    STEADY,
];

struct Site<'a> {
    fs: &'a str,
    tree: &'a str,
    /// On a loop mount made for the run: left in place until it is
    /// unmounted (removing millions of snapshot entries takes minutes, and
    /// btrfs frees deleted subvolumes in the background, where the next
    /// tool's disk usage would see it).
    scratch_mount: bool,
    started: Instant,
}

impl Results {
    fn add(&mut self, at: &Site<'_>, tool: &str, op: &'static str, value: f64) {
        self.samples.entry((at.fs.into(), at.tree.into(), tool.into(), op.into())).or_default().push(value);
    }

    /// The (filesystem, tree) pairs measured, in order.
    fn sites(&self) -> Vec<(String, String)> {
        let mut sites: Vec<_> = self.samples.keys().map(|(fs, tree, _, _)| (fs.clone(), tree.clone())).collect();
        sites.dedup(); // the keys are sorted, so equal pairs are adjacent
        sites
    }

    /// Reads back what [`write_csv`] wrote.
    fn read_csv(path: &Path) -> Results {
        // cargo bench runs in the package's directory: a relative path is
        // read from there.
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut results = Results::default();
        for line in text.lines().skip(1) {
            // fs,tree,tool,"operation",run,value,unit: the operation is the
            // only field that holds commas, and it is quoted.
            let (head, rest) = line.split_once(",\"").expect("a quoted operation");
            let (op, tail) = rest.split_once("\",").expect("a quoted operation");
            let head: Vec<&str> = head.split(',').collect();
            let value: f64 = tail.split(',').nth(1).and_then(|v| v.parse().ok()).expect("a value");
            let key = (head[0].to_owned(), head[1].to_owned(), head[2].to_owned(), op.to_owned());
            results.samples.entry(key).or_default().push(value);
        }
        results
    }

    fn add_time(&mut self, at: &Site<'_>, tool: &str, op: &'static str, d: Duration) {
        self.add(at, tool, op, d.as_secs_f64() * 1000.0);
    }
}

/// Changes applied to a tree, the same for every tool.
struct Changes {
    files: Vec<PathBuf>,
}

impl Changes {
    /// The `count` files of change `seed` (distinct, spread over the tree).
    fn pick(&self, seed: u64, count: usize) -> Vec<&Path> {
        let n = self.files.len();
        let count = count.min(n);
        let start = (seed as usize).wrapping_mul(7919) % n;
        // A stride coprime with n visits every index once.
        let mut stride = 104_729 % n.max(2);
        while gcd(stride.max(1), n) != 1 {
            stride += 1;
        }
        (0..count).map(|k| self.files[(start + k * stride.max(1)) % n].as_path()).collect()
    }

    /// Rewrites `count` files with new content.
    fn modify(&self, tree: &Path, seed: u64, count: usize) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9) | 1);
        for f in self.pick(seed, count) {
            std::fs::write(tree.join(f), rng.small()).unwrap();
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// What a rollback must bring back, recorded before the damage.
struct Damage {
    /// Paths with their content before (modified or deleted).
    before: Vec<(PathBuf, Vec<u8>)>,
    created: Vec<PathBuf>,
}

impl Damage {
    /// Modifies 100 files, creates 50 and deletes `deleted`.
    fn apply(changes: &Changes, tree: &Path, seed: u64, deleted: usize) -> Damage {
        let picked = changes.pick(seed, 100 + deleted);
        let (modified, deleted) = picked.split_at(picked.len().min(100));
        let before = picked.iter().map(|p| (p.to_path_buf(), std::fs::read(tree.join(p)).unwrap())).collect();
        changes.modify(tree, seed, modified.len());
        for p in deleted {
            std::fs::remove_file(tree.join(p)).unwrap();
        }
        let mut rng = Rng(seed ^ 0xABCD);
        let mut created = Vec::new();
        for k in 0..50 {
            let dir = changes.files[(seed as usize * 31 + k * 997) % changes.files.len()].parent().unwrap();
            let p = dir.join(format!("new-{seed}-{k}.dat"));
            std::fs::write(tree.join(&p), rng.small()).unwrap();
            created.push(p);
        }
        Damage { before, created }
    }

    /// Panics unless the tree is as it was before the damage.
    fn check_undone(&self, tree: &Path, tool: &str) {
        for (p, content) in &self.before {
            let now =
                std::fs::read(tree.join(p)).unwrap_or_else(|e| panic!("{tool}: {} after rollback: {e}", p.display()));
            assert!(now == *content, "{tool}: {} was not brought back", p.display());
        }
        for p in &self.created {
            assert!(!tree.join(p).exists(), "{tool}: {} is still there after rollback", p.display());
        }
    }
}

/// Runs every measurement for one tool on a fresh copy of `pristine`.
fn measure_tool(
    name: &str,
    at: &Site<'_>,
    base: &Path,
    pristine: &Path,
    changes: &Changes,
    args: &Args,
    results: &mut Results,
) {
    let dir = base.join(format!("{name}-{}", at.tree));
    let tree = dir.join("tree");
    if at.fs == "btrfs" && at.scratch_mount {
        // A subvolume per tool: each has its own metadata tree, so one
        // tool's millions of snapshot entries do not slow the next.
        run(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&dir));
    } else {
        std::fs::create_dir_all(&dir).unwrap();
    }
    if name == "btrfs" {
        run(Command::new("btrfs").args(["-q", "subvolume", "create"]).arg(&tree));
        run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(format!("{}/.", pristine.display())).arg(&tree));
    } else {
        run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(pristine).arg(&tree));
    }
    let snaps = dir.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    eprintln!("[{} {}] {name} ({:.0} s into the run)", at.fs, at.tree, at.started.elapsed().as_secs_f64());
    let before = used_bytes(base);
    let mut tool: Box<dyn Tool> = match name {
        "snapback" => {
            let (snapback, set_up) = Snapback::start(&dir, &tree, &args.watcher);
            results.add_time(at, name, WATCH, set_up);
            Box::new(snapback)
        }
        "git" => Box::new(Git { repo: dir.join("shadow.git"), tree: tree.clone() }),
        "rsync" => Box::new(Rsync(Snapshots { dir: snaps, tree: tree.clone(), taken: 0 })),
        "cp" => Box::new(Cp::new(Snapshots { dir: snaps, tree: tree.clone(), taken: 0 }, clones(base))),
        "btrfs" => Box::new(Btrfs(Snapshots { dir: snaps, tree: tree.clone(), taken: 0 })),
        other => panic!("unknown tool {other}"),
    };
    tool.quiesce();
    settle();
    let (first, _) = tool.checkpoint();
    let answered = Instant::now();
    results.add_time(at, name, FIRST, first);
    if tool.naming() {
        // What an agent's next tool calls see: checkpoints while the
        // daemon reads the first checkpoint's objects to name them.
        for seed in 1000..1000 + args.rounds as u64 {
            settle();
            changes.modify(tool.tree(), seed, 100);
            args.sync_if_asked();
            results.add_time(at, name, HUNDRED_NAMING, tool.checkpoint().0);
        }
        while tool.naming() {
            std::thread::sleep(Duration::from_millis(100));
        }
        results.add_time(at, name, NAMED, answered.elapsed());
    }
    tool.quiesce();

    // 100 changed files, `rounds` times: the store is measured after them.
    let mut seed = 1;
    for _ in 0..args.rounds {
        settle();
        changes.modify(tool.tree(), seed, 100);
        seed += 1;
        args.sync_if_asked();
        results.add_time(at, name, HUNDRED, tool.checkpoint().0);
    }
    results.add(at, name, STORE, (used_bytes(base).saturating_sub(before)) as f64);
    tool.quiesce();
    if let Some(kib) = tool.memory_kib() {
        results.add(at, name, STEADY, kib as f64 * 1024.0);
    }
    for _ in 0..args.runs {
        if let Some(t) = tool.status() {
            results.add_time(at, name, STATUS, t);
        }
    }

    // Every checkpoint and rollback of rsync and cp copies or links the
    // whole tree, whatever changed: one run of each is enough to show it,
    // and keeps the whole benchmark within 15 minutes (their 100-changed
    // figure is still the median of `rounds`).
    let runs = if matches!(name, "rsync" | "cp") { 1 } else { args.runs };
    tool.quiesce();
    for _ in 0..runs {
        settle();
        results.add_time(at, name, ZERO, tool.checkpoint().0);
    }
    tool.quiesce();
    for _ in 0..runs {
        settle();
        changes.modify(tool.tree(), seed, 10_000);
        seed += 1;
        args.sync_if_asked();
        results.add_time(at, name, TEN_K, tool.checkpoint().0);
    }
    // The issue's rollback, then one that also brings back deleted files.
    for (op, deleted) in [(ROLLBACK, 0), (ROLLBACK_DELETED, 20)] {
        tool.quiesce();
        for _ in 0..runs {
            let (_, target) = tool.checkpoint();
            settle();
            let damage = Damage::apply(changes, tool.tree(), seed, deleted);
            seed += 1;
            args.sync_if_asked();
            results.add_time(at, name, op, tool.rollback(&target));
            damage.check_undone(tool.tree(), name);
        }
    }
    if let Some(kib) = tool.peak_memory_kib() {
        results.add(at, name, MEMORY, kib as f64 * 1024.0);
    }
    drop(tool);
    if !at.scratch_mount {
        remove(&dir);
    }
}

/// Removes a tool's directory, snapshots (subvolumes) included.
fn remove(dir: &Path) {
    let snaps = dir.join("snapshots");
    if let Ok(entries) = std::fs::read_dir(&snaps) {
        for e in entries.flatten() {
            // Read-only btrfs snapshots must be deleted as subvolumes.
            let _ =
                Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(e.path()).stderr(Stdio::null()).status();
        }
    }
    let tree = dir.join("tree");
    let _ = Command::new("btrfs").args(["-q", "subvolume", "delete"]).arg(&tree).stderr(Stdio::null()).status();
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether `tool` runs on the filesystem `fs`; if not, why.
fn applies(tool: &str, fs: &str) -> Result<(), String> {
    match tool {
        "btrfs" if fs != "btrfs" => Err("btrfs snapshots run on btrfs only".into()),
        "rsync" | "git" | "btrfs" if which(tool).is_none() => Err(format!("{tool} is not installed")),
        _ => Ok(()),
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.exists())
}

fn clones(base: &Path) -> bool {
    let a = base.join("probe-a");
    let b = base.join("probe-b");
    std::fs::write(&a, b"probe").unwrap();
    let ok = Command::new("cp").arg("--reflink=always").arg(&a).arg(&b).stderr(Stdio::null()).status();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok.is_ok_and(|s| s.success())
}

/// Measures every tool on every tree of one filesystem.
fn measure_fs(fs: &str, base: &Path, scratch_mount: bool, started: Instant, args: &Args, results: &mut Results) {
    let mut trees = vec![("generated", None)];
    if let Some(src) = &args.source {
        trees.push(("source", Some(src.clone())));
    }
    for (label, source) in trees {
        let pristine = base.join(format!("pristine-{label}"));
        match &source {
            None => {
                eprintln!("[{fs}] generating {} files and {} of 100 MiB", args.files, args.big);
                generate(&pristine, args.files, args.dirs, args.big);
            }
            Some(src) => {
                eprintln!("[{fs}] copying {}", src.display());
                run(Command::new("cp").args(["-a"]).arg(src).arg(&pristine));
            }
        }
        let changes = Changes { files: small_files(&pristine) };
        assert!(!changes.files.is_empty(), "no file under 1 MiB in the {label} tree");
        let at = Site { fs, tree: label, scratch_mount, started };
        for tool in &args.tools {
            match applies(tool, fs) {
                Ok(()) => {
                    measure_tool(tool, &at, base, &pristine, &changes, args, results);
                    // Kept as they come: a run that fails later still
                    // leaves every figure measured before.
                    write_csv(results, &args.out.join("results.csv"));
                }
                Err(why) => {
                    if !results.skipped.contains(&why) {
                        results.skipped.push(why);
                    }
                }
            }
        }
        if !scratch_mount {
            let _ = std::fs::remove_dir_all(&pristine);
        }
    }
}

/// A loop-mounted filesystem image, unmounted and removed on drop.
/// Times a daemon start with 10 sandboxes of `per` files each, from spawn
/// to the first answered request (watches are set up in the background).
fn startup(base: &Path, per: usize, runs: usize) -> (Duration, u64) {
    let dir = base.join("startup");
    {
        let mut d = start_daemon(&dir);
        let mut c = Client::connect(&dir.join("sock")).unwrap();
        for s in 0..10 {
            let tree = base.join(format!("multi/s{s}"));
            let mut rng = Rng(0x5EED + s as u64);
            for i in 0..per {
                let sub = tree.join(format!("d{:02}", i % 100));
                if i < 100 {
                    std::fs::create_dir_all(&sub).unwrap();
                }
                std::fs::write(sub.join(format!("f{i}")), rng.small()).unwrap();
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
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
        let _ = d.wait();
    }
    let mut times = Vec::new();
    let mut rss = 0;
    for _ in 0..runs {
        settle();
        let t = Instant::now();
        let mut d = start_daemon(&dir);
        times.push(t.elapsed());
        // Checkpoints right away are correct whether or not the watches are
        // in place yet (they compare everything until they are).
        let mut c = Client::connect(&dir.join("sock")).unwrap();
        for s in 0..10 {
            c.checkpoint(CheckpointRequest { sandbox: format!("s{s}"), ..Default::default() }).unwrap();
        }
        rss = rss.max(peak_rss_kib(d.id()));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
        let _ = d.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(base.join("multi"));
    (median(times), rss)
}

// ---------------------------------------------------------------------------
// Reports: CSV, table, chart.

fn summary(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn show(op: &str, v: f64) -> String {
    match op {
        STORE | MEMORY | STEADY => format!("{:.1} MiB", v / (1 << 20) as f64),
        _ if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        _ => format!("{v:.1} ms"),
    }
}

fn write_csv(results: &Results, path: &Path) {
    let mut out = String::from("fs,tree,tool,operation,run,value,unit\n");
    for ((fs, tree, tool, op), values) in &results.samples {
        let unit = if [STORE, MEMORY].contains(&op.as_str()) { "bytes" } else { "ms" };
        for (i, v) in values.iter().enumerate() {
            writeln!(out, "{fs},{tree},{tool},\"{op}\",{},{v:.3},{unit}", i + 1).unwrap();
        }
    }
    std::fs::write(path, out).unwrap();
}

/// The table: per filesystem, tree and operation, each tool's median and
/// its ratio to snapback's (above 1: snapback is faster or smaller).
fn table(results: &Results, args: &Args) -> String {
    let mut out = String::new();
    for (fs, tree) in results.sites() {
        writeln!(out, "\n### {fs}, {tree} tree\n").unwrap();
        let tools: Vec<&String> = args
            .tools
            .iter()
            .filter(|t| results.samples.keys().any(|(f, tr, tool, _)| *f == fs && *tr == tree && tool == *t))
            .collect();
        let header: Vec<String> = tools.iter().map(|t| t.to_string()).collect();
        writeln!(out, "| operation | {} |", header.join(" | ")).unwrap();
        writeln!(out, "|---|{}", "---:|".repeat(tools.len())).unwrap();
        for op in OPERATIONS {
            let get = |tool: &str| {
                results.samples.get(&(fs.clone(), tree.clone(), tool.to_owned(), op.to_owned())).map(|v| summary(v))
            };
            let Some(ours) = get("snapback").or(if op == MEMORY { None } else { Some(f64::NAN) }) else { continue };
            let cells: Vec<String> = tools
                .iter()
                .map(|t| match get(t) {
                    None => "-".into(),
                    Some(v) if t.as_str() == "snapback" || !ours.is_finite() => show(op, v),
                    Some(v) => format!("{} ({:.1}x)", show(op, v), v / ours),
                })
                .collect();
            writeln!(out, "| {op} | {} |", cells.join(" | ")).unwrap();
        }
    }
    out
}

/// Draws checkpoint time (median) against changed files, one panel per
/// filesystem and tree, with gnuplot, from a data file derived from the CSV.
fn chart(results: &Results, args: &Args, out: &Path) -> Result<PathBuf, String> {
    let gnuplot = which("gnuplot").ok_or("gnuplot is not installed (apt-get install gnuplot-nox)")?;
    let mut data = String::new();
    let mut panels = Vec::new();
    for (fs, tree) in &results.sites() {
        let tools: Vec<&String> = args
            .tools
            .iter()
            .filter(|t| results.samples.contains_key(&(fs.clone(), tree.clone(), (*t).clone(), HUNDRED.to_owned())))
            .collect();
        for (label, op) in [("0", ZERO), ("100", HUNDRED), ("10000", TEN_K)] {
            let cells: Vec<String> = tools
                .iter()
                .map(|t| {
                    let key = (fs.clone(), tree.clone(), (*t).clone(), op.to_owned());
                    results.samples.get(&key).map_or("NaN".into(), |v| format!("{:.3}", summary(v)))
                })
                .collect();
            writeln!(data, "{label} {}", cells.join(" ")).unwrap();
        }
        data.push_str("\n\n");
        panels.push((format!("{fs}, {tree} tree"), tools.iter().map(|t| t.to_string()).collect::<Vec<_>>()));
    }
    let data_path = out.join("checkpoint-time.dat");
    std::fs::write(&data_path, data).map_err(|e| e.to_string())?;
    let png = out.join("checkpoint-time.png");
    let mut script = format!(
        "set terminal pngcairo size {},{} font 'sans,10'\nset output '{}'\n\
         set logscale y\nset ylabel 'checkpoint time (ms, log scale)'\nset xlabel 'changed files'\n\
         set grid ytics\nset key top left horizontal maxcols 3\nset yrange [0.1:100000]\n\
         set style data linespoints\nset offsets 0.2, 0.2, 0, 0\n\
         set multiplot layout {},{}\n",
        460 * panels.len().min(3),
        380 * panels.len().div_ceil(3),
        png.display(),
        panels.len().div_ceil(3),
        panels.len().min(3)
    );
    for (i, (title, tools)) in panels.iter().enumerate() {
        // One colour per tool, the same in every panel.
        let lines: Vec<String> = tools
            .iter()
            .enumerate()
            .map(|(k, tool)| {
                let colour = match tool.as_str() {
                    "snapback" => "#7b2cbf",
                    "git" => "#009e73",
                    "rsync" => "#e69f00",
                    "cp" => "#56b4e9",
                    _ => "#d55e00",
                };
                format!(
                    "'{}' index {i} using 0:{}:xtic(1) title '{tool}' lc rgb '{colour}' lw 2 pt 7",
                    data_path.display(),
                    k + 2
                )
            })
            .collect();
        writeln!(script, "set title '{title}'\nplot {}", lines.join(", ")).unwrap();
    }
    script.push_str("unset multiplot\n");
    let script_path = out.join("checkpoint-time.gp");
    std::fs::write(&script_path, script).map_err(|e| e.to_string())?;
    let status = Command::new(gnuplot).arg(&script_path).status().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("gnuplot failed: {status}"));
    }
    Ok(png)
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.out).unwrap();
    if let Some(csv) = &args.chart_from {
        match chart(&Results::read_csv(csv), &args, &args.out) {
            Ok(png) => eprintln!("chart: {}", png.display()),
            Err(e) => panic!("no chart: {e}"),
        }
        return;
    }
    let started = Instant::now();
    let mut results = Results::default();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let scratch = tempfile::Builder::new()
        .prefix("snapback-compare-")
        .tempdir_in(std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from))
        .unwrap();
    let mut startup_figures = None;
    if root {
        for fs in &args.filesystems {
            let m = Mount::new(fs, scratch.path());
            measure_fs(fs, &m.point, true, started, &args, &mut results);
            let here = if args.filesystems.iter().any(|f| f == "xfs") { fs == "xfs" } else { true };
            if args.startup && here && startup_figures.is_none() {
                // On an image of its own: at a million files the tree and
                // the store before it leave too little of ext4's for ten
                // more sandboxes of 100,000 files and their stores.
                drop(m);
                let m = Mount::new(fs, scratch.path());
                eprintln!("[{fs}] daemon start with 10 sandboxes");
                startup_figures = Some((fs.clone(), startup(&m.point, args.files / 10, args.runs)));
            }
        }
    } else {
        let fs = output(Command::new("stat").args(["-f", "-c", "%T"]).arg(scratch.path()));
        eprintln!(
            "not root: measuring on {} ({fs}) only; as root: ext4, XFS and btrfs loop mounts",
            scratch.path().display()
        );
        measure_fs(&fs, scratch.path(), false, started, &args, &mut results);
        if args.startup {
            startup_figures = Some((fs, startup(scratch.path(), args.files / 10, args.runs)));
        }
    }

    let mut report = format!(
        "Generated tree: {} files of 1-8 KiB in {} directories and {} of 100 MiB{}. \
         Medians of {} runs (rsync and cp: one run of the 0 and 10,000 changed checkpoints and of each rollback, \
         as each of them copies or links the whole tree); checkpoints of 100 changed files: {} rounds, \
         after which the store is measured. \
         In parentheses: the tool's figure divided by snapback's (above 1: snapback is faster or smaller).\n",
        args.files,
        args.dirs.clamp(1, args.files.max(1)),
        args.big,
        args.source.as_ref().map(|s| format!("; source tree: a copy of {}", s.display())).unwrap_or_default(),
        args.runs,
        args.rounds,
    );
    report.push_str(&table(&results, &args));
    if let Some((fs, (t, kib))) = &startup_figures {
        writeln!(
            report,
            "\nDaemon start with 10 sandboxes of {} files each ({fs}), to the first answer: {:.1} ms (median), peak memory {:.1} MiB.",
            args.files / 10,
            t.as_secs_f64() * 1000.0,
            *kib as f64 / 1024.0
        )
        .unwrap();
    }
    for why in &results.skipped {
        writeln!(report, "\nNot measured: {why}.").unwrap();
    }
    writeln!(report, "\nWhole run: {:.1} min.", started.elapsed().as_secs_f64() / 60.0).unwrap();
    println!("{report}");
    std::fs::write(args.out.join("table.md"), &report).unwrap();
    let csv = args.out.join("results.csv");
    write_csv(&results, &csv);
    // The chart is drawn from the CSV as written, so it can be redrawn from
    // a kept one.
    match chart(&Results::read_csv(&csv), &args, &args.out) {
        Ok(png) => eprintln!("chart: {}", png.display()),
        Err(e) => eprintln!("no chart: {e}"),
    }
    eprintln!("results: {}", args.out.display());
}
