//! Benchmark: reviewing steps, snapback side by side with a shadow git
//! repository (as Gemini CLI, Cline and Roo Code keep one), in one run.
//!
//! - `diff --stat` and `diff --patch` of one step that edited 100 text
//!   files, in a tree of `--files` text files (100,000 by default; 1-8 KiB,
//!   1,000 directories): snapback's step diff against `git diff --stat
//!   HEAD~ HEAD` and `git diff HEAD~ HEAD`, each step taken by both.
//! - `log -n 50` over `--steps` checkpoints (10,000 by default) of a
//!   1,000-file tree, each step editing 1-3 files: snapback's log (which
//!   counts each step's lines) against `git log --stat -n 50`.
//!
//! snapback is reached through its client library over one connection, as
//! a harness would; git is run as a command, its output read and dropped.
//! As root it measures on a loop-mounted XFS (`reflink=1`) image, else in
//! a temporary directory.
//!
//! Run: `cargo bench -p snapback-daemon --bench review -- [--files N] [--steps N] [--runs N]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use snapback::Client;
use snapback::proto::{CheckpointRequest, DiffDetail, DiffRequest, LogRequest, SandboxAdd, WirePath};

mod common;
use common::*;

struct Args {
    files: usize,
    steps: usize,
    runs: usize,
}

fn parse_args() -> Args {
    let mut args = Args { files: 100_000, steps: 10_000, runs: 7 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} takes a number"))
        };
        match a.as_str() {
            "--files" => args.files = value("--files"),
            "--steps" => args.steps = value("--steps"),
            "--runs" => args.runs = value("--runs").max(1),
            "--bench" => {}
            other => panic!("unknown argument {other}; see the header of daemon/benches/review.rs"),
        }
    }
    args
}

/// A text file of 1-8 KiB: numbered lines, as source code has.
fn text(rng: &mut Rng) -> String {
    let target = 1024 + (rng.next() % 7169) as usize;
    let mut out = String::with_capacity(target + 64);
    let mut line = 0;
    while out.len() < target {
        line += 1;
        out.push_str(&format!("    let value_{line} = compute({}, {line}); // step\n", rng.next() % 100_000));
    }
    out
}

/// Writes `files` text files in 1,000 directories (fewer for small trees).
fn text_tree(tree: &Path, files: usize, rng: &mut Rng) -> Vec<PathBuf> {
    let dirs = 1000.min(files / 10).max(1);
    let mut paths = Vec::with_capacity(files);
    for i in 0..files {
        let p = tree.join(format!("d{:03}/f{i:06}.rs", i % dirs));
        if i < dirs {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        }
        std::fs::write(&p, text(rng)).unwrap();
        paths.push(p);
    }
    paths
}

/// Edits `file` as an agent's edit does: a few lines replaced, one added.
fn edit(file: &Path, rng: &mut Rng) {
    let old = std::fs::read_to_string(file).unwrap();
    let mut lines: Vec<String> = old.lines().map(str::to_owned).collect();
    for _ in 0..3 {
        let i = (rng.next() as usize) % lines.len();
        lines[i] = format!("    let edited = compute({}, 0); // changed", rng.next() % 1000);
    }
    lines.insert((rng.next() as usize) % lines.len(), "    // a new line".into());
    std::fs::write(file, lines.join("\n") + "\n").unwrap();
}

/// A shadow repository of `tree`, driven as the agents drive theirs.
struct Shadow {
    git_dir: PathBuf,
    tree: PathBuf,
}

impl Shadow {
    fn new(git_dir: &Path, tree: &Path) -> Shadow {
        let s = Shadow { git_dir: git_dir.to_owned(), tree: tree.to_owned() };
        init_shadow(git_dir);
        s.commit();
        s
    }

    fn git(&self) -> Command {
        shadow_git(&self.git_dir, &self.tree)
    }

    fn commit(&self) {
        run(self.git().args(["add", "-A"]));
        run(self.git().args(["commit", "-q", "--allow-empty", "-m", "step"]));
    }

    /// Times a git command whose output is read and dropped.
    fn time(&self, args: &[&str]) -> Duration {
        let t = Instant::now();
        let out = self.git().args(args).output().unwrap();
        let took = t.elapsed();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        took
    }
}

fn checkpoint(client: &mut Client, sandbox: &str) -> String {
    client.checkpoint(CheckpointRequest { sandbox: sandbox.into(), ..CheckpointRequest::default() }).unwrap().id
}

fn add(client: &mut Client, tree: &Path, name: &str) {
    let path = WirePath::from(tree);
    client.sandbox_add(SandboxAdd { path, name: Some(name.into()), excludes: vec![], store: None }).unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let args = parse_args();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let scratch = tempfile::Builder::new().prefix("snapback-review-").tempdir().unwrap();
    let mount = root.then(|| Mount::new("xfs", scratch.path()));
    let base = mount.as_ref().map_or_else(|| scratch.path().to_owned(), |m| m.point.clone());
    let fs = if root { "XFS (reflink)" } else { "the temporary directory's filesystem" };
    let mut rng = Rng(0x5EED_0F2E_71E3);

    // Retention off for the run: the log needs its 10,000 checkpoints.
    let config = format!("[retention]\nkeep_last = {}\n", args.steps + args.runs + 100);
    let _daemon = Daemon(start_daemon_with(&base.join("daemon"), &config));
    let mut client = Client::connect(&base.join("daemon/sock")).unwrap();

    eprintln!("diff: writing {} text files", args.files);
    let tree = base.join("tree");
    let files = text_tree(&tree, args.files, &mut rng);
    add(&mut client, &tree, "tree");
    checkpoint(&mut client, "tree");
    let shadow = Shadow::new(&base.join("tree.git"), &tree);
    let (mut stat, mut patch, mut git_stat, mut git_patch) = (vec![], vec![], vec![], vec![]);
    let mut patch_bytes = 0;
    for run in 0..args.runs {
        for i in 0..100 {
            edit(&files[(run * 7919 + i * 997) % files.len()], &mut rng);
        }
        let step = checkpoint(&mut client, "tree");
        shadow.commit();
        settle();
        let req = |detail| DiffRequest { from: step.clone(), step: true, detail, ..DiffRequest::default() };
        let t = Instant::now();
        let report = client.diff(req(DiffDetail::Stat)).unwrap();
        stat.push(t.elapsed());
        assert_eq!(report.total.as_ref().map(|t| t.files), Some(100), "{:?}", report.total);
        let t = Instant::now();
        let mut bytes = 0;
        client
            .diff_streaming(req(DiffDetail::Patch), &mut |item| {
                if let snapback::DiffItem::Patch(p) = item {
                    bytes += p.len();
                }
            })
            .unwrap();
        patch.push(t.elapsed());
        patch_bytes = bytes;
        git_stat.push(shadow.time(&["diff", "--stat", "HEAD~", "HEAD"]));
        git_patch.push(shadow.time(&["diff", "HEAD~", "HEAD"]));
    }

    eprintln!("log: {} steps of a 1,000-file tree", args.steps);
    let small = base.join("small");
    let small_files = text_tree(&small, 1000, &mut rng);
    add(&mut client, &small, "small");
    checkpoint(&mut client, "small");
    let small_shadow = Shadow::new(&base.join("small.git"), &small);
    let started = Instant::now();
    for s in 0..args.steps {
        for _ in 0..1 + rng.next() % 3 {
            edit(&small_files[(rng.next() as usize) % small_files.len()], &mut rng);
        }
        checkpoint(&mut client, "small");
        small_shadow.commit();
        if s % 1000 == 999 {
            eprintln!("  {} steps, {:.0} s", s + 1, started.elapsed().as_secs_f64());
        }
    }
    settle();
    let (mut log, mut git_log) = (vec![], vec![]);
    for _ in 0..args.runs {
        let t = Instant::now();
        let report =
            client.log(LogRequest { sandbox: Some("small".into()), limit: Some(50), ..LogRequest::default() }).unwrap();
        log.push(t.elapsed());
        assert_eq!(report.entries.len(), 50);
        git_log.push(small_shadow.time(&["log", "--stat", "-n", "50"]));
    }

    let row = |what: &str, ours: &[Duration], theirs: &[Duration]| {
        let (a, b) = (median(ours.to_vec()), median(theirs.to_vec()));
        format!("| {what} | {:.1} ms | {:.1} ms | {:.1}x |", ms(a), ms(b), ms(b) / ms(a))
    };
    println!(
        "On {fs}; medians of {} runs.\n\n| operation | snapback | shadow git | git / snapback |\n| --- | --- | --- | --- |",
        args.runs
    );
    println!("{}", row(&format!("`diff --stat` of a 100-file step, {} files", args.files), &stat, &git_stat));
    println!("{}", row(&format!("`diff --patch` of the same step ({} KiB)", patch_bytes / 1024), &patch, &git_patch));
    println!(
        "{}",
        row(&format!("`log -n 50` over {} checkpoints (git: `log --stat -n 50`)", args.steps), &log, &git_log)
    );
}
