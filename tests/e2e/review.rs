//! Review: `diff --patch` and `--stat` checked against git itself on
//! exports of the same two checkpoints, `--path`, metadata-only changes,
//! a step's own diff, the log, and dry runs that change nothing.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixture::{TestDaemon, tool_or_skip, write};
use crate::tree::{Node, snapshot};

const NON_UTF8: &[u8] = b"caf\xe9.txt";

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// A tree of every kind of change a patch must carry, as checkpoints A
/// and B of sandbox `r`.
fn rich_pair(d: &TestDaemon) -> (PathBuf, String, String) {
    let sb = d.path("r");
    let lines: String = (1..=10).map(|i| format!("line {i}\n")).collect();
    write(&sb.join("a.txt"), &lines);
    write(&sb.join("bin"), b"\x00\x01\x02binary");
    write(&sb.join("run.sh"), "#!/bin/sh\necho hi\n");
    mode(&sb.join("run.sh"), 0o644);
    symlink("target-one", sb.join("link")).unwrap();
    write(&sb.join("x"), "was a file\n");
    write(&sb.join(OsStr::from_bytes(NON_UTF8)), "old\n");
    write(&sb.join("gone.txt"), "bye\n");
    write(&sb.join("touched.txt"), "same\n");
    write(&sb.join("keep/deep.txt"), "unchanged\n");
    write(&sb.join("sub/s.txt"), "s1\n");
    d.add_sandbox("r", &sb, &[]);
    let a = d.checkpoint("r");

    write(&sb.join("a.txt"), lines.replace("line 3\n", "line three\n") + "line 11\n");
    write(&sb.join("bin"), b"\x00\x01\x03binary!");
    mode(&sb.join("run.sh"), 0o755);
    std::fs::remove_file(sb.join("link")).unwrap();
    symlink("target-two", sb.join("link")).unwrap();
    std::fs::remove_file(sb.join("x")).unwrap();
    write(&sb.join("x/inner.txt"), "inner\n");
    write(&sb.join(OsStr::from_bytes(NON_UTF8)), "new\nand more\n");
    write(&sb.join("empty"), "");
    std::fs::remove_file(sb.join("gone.txt")).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200);
    std::fs::File::options().write(true).open(sb.join("touched.txt")).unwrap().set_modified(old).unwrap();
    write(&sb.join("sub/s.txt"), "s2\n");
    write(&sb.join("new/dir/n.txt"), "fresh\n");
    let b = d.checkpoint("r");
    (sb, a, b)
}

/// Exports checkpoint `id` and returns a writable copy of it, where a
/// patch can be applied.
fn writable_export(d: &TestDaemon, id: &str, name: &str) -> PathBuf {
    let export = d.path(&format!("{name}-export"));
    d.json(&["export", id, export.to_str().unwrap()]);
    let work = d.path(name);
    run(Command::new("cp").arg("-a").arg(&export).arg(&work));
    run(Command::new("chmod").args(["-R", "u+w"]).arg(&work));
    work
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// What git can carry of a tree: each file's content and exec bit, each
/// symlink's target (directories follow from them).
fn as_git_sees(tree: &BTreeMap<Vec<u8>, Node>) -> BTreeMap<Vec<u8>, String> {
    tree.iter()
        .filter_map(|(p, n)| match n {
            Node::File { content, mode, .. } => Some((p.clone(), format!("{:o} {content:x}", mode & 0o111))),
            Node::Symlink { target, .. } => Some((p.clone(), format!("-> {target:?}"))),
            _ => None,
        })
        .collect()
}

#[test]
fn git_apply_of_a_patch_makes_b_from_an_export_of_a() {
    let test = "git_apply_of_a_patch_makes_b_from_an_export_of_a";
    let Some(git) = tool_or_skip("git", test) else { return };
    let d = TestDaemon::start();
    let (_, a, b) = rich_pair(&d);
    let patch = d.cli(&["diff", &a, &b, "--patch"]);
    assert!(patch.status.success(), "{}", String::from_utf8_lossy(&patch.stderr));
    let text = String::from_utf8_lossy(&patch.stdout);
    for needle in [
        "diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n",
        "deleted file mode 100644\n--- a/gone.txt\n+++ /dev/null\n",
        "diff --git a/empty b/empty\nnew file mode 100644\n",
        "Binary files a/bin and b/bin differ\n",
        "-target-one\n\\ No newline at end of file\n+target-two\n",
        "diff --git \"a/caf\\351.txt\" \"b/caf\\351.txt\"\n",
    ] {
        assert!(text.contains(needle), "the patch lacks {needle:?}:\n{text}");
    }
    assert!(!text.contains("touched.txt"), "git has nothing to say of an mtime:\n{text}");
    let patch_file = d.path("ab.patch");
    std::fs::write(&patch_file, &patch.stdout).unwrap();

    // git refuses a binary change it has no data for, as it does for its
    // own `git diff`: the binary file is left out of the apply.
    let work = writable_export(&d, &a, "work");
    let applied = Command::new(&git).current_dir(&work).args(["apply", "--exclude=bin"]).arg(&patch_file).output();
    let applied = applied.unwrap();
    let numbered: Vec<String> = text.lines().enumerate().map(|(i, l)| format!("{:>3} {l}", i + 1)).collect();
    assert!(applied.status.success(), "{}\n{}", String::from_utf8_lossy(&applied.stderr), numbered.join("\n"));
    let wanted = writable_export(&d, &b, "wanted");
    let (mut got, mut want) = (as_git_sees(&snapshot(&work)), as_git_sees(&snapshot(&wanted)));
    assert_ne!(got.remove(&b"bin"[..]), want.remove(&b"bin"[..]), "the binary file differs, and was left out");
    assert_eq!(got, want, "git apply did not make B's text files, modes and symlinks");

    // GNU patch takes the text changes too.
    let sub = d.cli(&["diff", &a, &b, "--patch", "--path", "a.txt", "--path", "sub"]);
    let sub_file = d.path("sub.patch");
    std::fs::write(&sub_file, &sub.stdout).unwrap();
    let work2 = writable_export(&d, &a, "work2");
    run(Command::new("patch").current_dir(&work2).args(["-p1", "-s", "-i"]).arg(&sub_file));
    for f in ["a.txt", "sub/s.txt"] {
        assert_eq!(std::fs::read(work2.join(f)).unwrap(), std::fs::read(wanted.join(f)).unwrap(), "{f}");
    }
    assert_eq!(std::fs::read(work2.join("run.sh")).unwrap(), std::fs::read(work.join("run.sh")).unwrap());
}

/// `git diff --numstat -z --no-index` of two directories: per path below
/// them, (added, removed), `None` for a binary file.
fn git_numstat(git: &Path, parent: &Path, a: &str, b: &str) -> BTreeMap<Vec<u8>, Option<(u64, u64)>> {
    let out = Command::new(git)
        .current_dir(parent)
        .args(["diff", "--no-index", "--no-renames", "--numstat", "-z", a, b])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "git diff --no-index: {}", String::from_utf8_lossy(&out.stderr));
    let mut fields = out.stdout.split(|&c| c == 0).peekable();
    let mut stats = BTreeMap::new();
    while let Some(head) = fields.next().filter(|h| !h.is_empty()) {
        let mut cols = head.splitn(3, |&c| c == b'\t');
        let (added, removed, path) = (cols.next().unwrap(), cols.next().unwrap(), cols.next().unwrap());
        let paths: Vec<&[u8]> =
            if path.is_empty() { vec![fields.next().unwrap(), fields.next().unwrap()] } else { vec![path] };
        let real = paths.iter().find(|p| **p != b"/dev/null").unwrap();
        let rel = real.splitn(2, |&c| c == b'/').nth(1).unwrap().to_vec();
        let num = |v: &[u8]| std::str::from_utf8(v).unwrap().parse::<u64>().ok();
        let counts = num(added).zip(num(removed));
        let entry = stats.entry(rel).or_insert(Some((0, 0)));
        *entry = match (*entry, counts) {
            (Some((a0, r0)), Some((a1, r1))) => Some((a0 + a1, r0 + r1)),
            _ => None,
        };
    }
    stats
}

#[test]
fn stat_counts_match_git_diff_stat_and_path_limits() {
    let test = "stat_counts_match_git_diff_stat_and_path_limits";
    let Some(git) = tool_or_skip("git", test) else { return };
    let d = TestDaemon::start();
    let (_, a, b) = rich_pair(&d);
    writable_export(&d, &a, "ea");
    writable_export(&d, &b, "eb");
    let theirs = git_numstat(&git, d.dir.path(), "ea", "eb");
    let ours = d.json(&["diff", &a, &b, "--stat"]);
    let mut seen = BTreeMap::new();
    for c in ours["changes"].as_array().unwrap() {
        let Some(stat) = c.get("stat") else { continue };
        let path = serde_json::from_value::<snapback::proto::WirePath>(c["path"].clone()).unwrap().0;
        let counts = (!stat["binary"].as_bool().unwrap_or(false))
            .then(|| (stat["added"].as_u64().unwrap(), stat["removed"].as_u64().unwrap()));
        seen.insert(path, counts);
    }
    for (path, counts) in &theirs {
        assert_eq!(seen.get(path), Some(counts), "{}: git says {counts:?}", String::from_utf8_lossy(path));
    }
    for (path, counts) in &seen {
        if !theirs.contains_key(path) {
            assert_eq!(*counts, Some((0, 0)), "{} only in ours, with lines", String::from_utf8_lossy(path));
        }
    }
    let (added, removed) = theirs.values().flatten().fold((0, 0), |(a, r), (x, y)| (a + x, r + y));
    assert_eq!((ours["total"]["added"].as_u64(), ours["total"]["removed"].as_u64()), (Some(added), Some(removed)));
    let text = String::from_utf8(d.cli(&["diff", &a, &b, "--stat"]).stdout).unwrap();
    assert!(text.contains(" bin ") && text.contains("| Bin 9 -> 10 bytes"), "{text}");
    assert!(text.ends_with(&format!("changed, {added} insertions(+), {removed} deletions(-)\n")), "{text}");

    // --path: those paths and what lies below them, nothing else.
    let limited = d.json(&["diff", &a, &b, "--stat", "--path", "sub", "--path", "x"]);
    let paths: Vec<&str> =
        limited["changes"].as_array().unwrap().iter().map(|c| c["path"]["text"].as_str().unwrap()).collect();
    assert_eq!(paths, ["sub/s.txt", "x", "x/inner.txt"], "{limited}");

    // A step's own diff is its diff from its parent.
    let step = d.json(&["show", &b, "--stat"]);
    assert_eq!(step["step"]["total"], ours["total"], "{step}");
    assert_eq!(step["step"]["from"], a.as_str());
}

#[test]
fn a_metadata_only_change_is_marked_as_such() {
    let d = TestDaemon::start();
    let (_, a, b) = rich_pair(&d);
    let diff = d.json(&["diff", &a, &b]);
    let what = |p: &str| {
        let c = diff["changes"].as_array().unwrap().iter().find(|c| c["path"]["text"] == p).unwrap();
        c["what"].as_array().map(|w| w.iter().map(|a| a.as_str().unwrap().to_owned()).collect::<Vec<_>>())
    };
    assert_eq!(what("touched.txt").unwrap(), ["mtime"]);
    assert!(
        what("run.sh").unwrap().contains(&"mode".to_owned()) && !what("run.sh").unwrap().contains(&"content".into())
    );
    assert!(what("a.txt").unwrap().contains(&"content".to_owned()));
    assert_eq!(what("link").unwrap(), ["target"]);
    let text = String::from_utf8(d.cli(&["diff", &a, &b]).stdout).unwrap();
    assert!(text.contains("M  touched.txt  (metadata only: mtime)\n"), "{text}");
    assert!(text.contains("M  a.txt\n"), "{text}");
    assert!(text.contains("T  x\n") && text.contains("A  x/inner.txt\n") && text.contains("D  gone.txt\n"), "{text}");
}

#[test]
fn a_patch_longer_than_a_protocol_line_arrives_whole() {
    let d = TestDaemon::start();
    let sb = d.path("big");
    let body = |tag: &str| -> String { (0..60).map(|i| format!("{tag} line {i} of some length\n")).collect() };
    for i in 0..1500 {
        write(&sb.join(format!("d{}/f{i}.txt", i % 30)), body("old"));
    }
    d.add_sandbox("big", &sb, &[]);
    let a = d.checkpoint("big");
    for i in 0..1500 {
        write(&sb.join(format!("d{}/f{i}.txt", i % 30)), body("new"));
    }
    let out = d.cli(&["diff", &a, "--patch"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.len() > 4 << 20, "{} bytes: not past several protocol lines", out.stdout.len());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("diff --git ").count(), 1500);
    assert_eq!(text.lines().filter(|l| l.starts_with('+') && !l.starts_with("+++")).count(), 1500 * 60);
    let stat = d.json(&["diff", &a, "--stat"]);
    assert_eq!(stat["total"], serde_json::json!({"files": 1500, "added": 90000, "removed": 90000}));
    // Put back together in one document, as a client that keeps it does.
    let whole = d.json(&["diff", &a, "--patch"]);
    assert_eq!(whole["patch"], serde_json::json!([{ "text": text }]));
}

#[test]
fn dry_runs_change_nothing_and_preview_what_the_real_run_does() {
    let d = TestDaemon::start();
    let sb = d.path("p");
    write(&sb.join("a.txt"), "one\ntwo\nthree\n");
    write(&sb.join("b.txt"), "keep\n");
    d.add_sandbox("p", &sb, &[]);
    let first = d.checkpoint("p");
    write(&sb.join("a.txt"), "one\n2\nthree\nfour\n");
    write(&sb.join("new.txt"), "n1\nn2\n");
    std::fs::remove_file(sb.join("b.txt")).unwrap();
    let second = d.checkpoint("p");
    write(&sb.join("later.txt"), "later\n");

    // Each dry run leaves the tree and the catalogue as they were, and
    // previews each path from the live tree to what the run would leave.
    let unmoved = |doing: &str, args: &[&str]| -> (serde_json::Value, BTreeMap<String, (String, u64, u64)>) {
        let (tree, list) = (snapshot(&sb), d.json(&["list", "p"]));
        let report = d.json(args);
        assert_eq!(snapshot(&sb), tree, "a dry {doing} moved the tree");
        assert_eq!(d.json(&["list", "p"]), list, "a dry {doing} moved the catalogue");
        assert_eq!(report["dry_run"], true);
        let preview = report["preview"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let n = |k: &str| c["stat"][k].as_u64().unwrap();
                let path = c["path"]["text"].as_str().unwrap().to_owned();
                (path, (c["change"].as_str().unwrap().to_owned(), n("added"), n("removed")))
            })
            .collect();
        (report, preview)
    };
    let change = |kind: &str, added: u64, removed: u64| (kind.to_owned(), added, removed);

    let (_, preview) = unmoved("revert", &["revert", &second, "--dry-run"]);
    let want =
        [("a.txt", change("modified", 1, 2)), ("b.txt", change("added", 1, 0)), ("new.txt", change("deleted", 0, 2))];
    assert_eq!(preview, want.into_iter().map(|(p, c)| (p.to_owned(), c)).collect());

    let (dry, preview) = unmoved("rollback", &["rollback", &first, "--dry-run"]);
    assert_eq!(preview["later.txt"], change("deleted", 0, 1));
    assert_eq!(preview.len(), 4);
    assert_eq!(dry["preview_total"], serde_json::json!({"files": 4, "added": 2, "removed": 5}));
    let text = String::from_utf8(d.cli(&["rollback", &first, "--dry-run"]).stdout).unwrap();
    assert!(text.contains("would roll back") && text.contains("| 3 +--\n"), "{text}");
    assert!(text.contains("4 files changed, 2 insertions(+), 5 deletions(-)"), "{text}");
    let real = d.json(&["rollback", &first]);
    for field in ["created_paths", "restored_paths", "removed"] {
        assert_eq!(real[field], dry[field], "the rollback did other than its dry run said: {field}");
    }
    // The log says what the daemon's own checkpoints belong to.
    let log = d.json(&["log", "p", "-n", "2"]);
    let [restore, safety] = [&log["entries"][0], &log["entries"][1]];
    assert_eq!((&restore["checkpoint"]["kind"], &safety["checkpoint"]["kind"]), (&"restore".into(), &"safety".into()));
    assert_eq!(restore["restore"], format!("rollback to {first}"), "{log}");
    assert_eq!(safety["restore"], format!("rollback to {first}"), "{log}");
    assert_eq!(restore["total"]["files"], 4, "the restore's step is what the rollback changed: {log}");

    let (dry, preview) = unmoved("undo", &["undo", "p", "--dry-run"]);
    assert_eq!(preview.len(), 4, "{preview:?}");
    let real = d.json(&["undo", "p"]);
    for field in ["created_paths", "restored_paths", "removed"] {
        assert_eq!(real[field], dry[field], "the undo did other than its dry run said: {field}");
    }
}
