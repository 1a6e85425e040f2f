//! A model-based test: a seeded random sequence of what agents do to a
//! tree (writes, appends, truncates, renames of files and directories,
//! hardlinks, symlinks, chmods, deletes, a file written through a link
//! that is gone by the next checkpoint, temporary files), with
//! checkpoints, rollbacks, reverts, undos and daemon restarts among them,
//! against a real daemon.
//!
//! The model is what each checkpoint held: the tree as it stood when the
//! checkpoint answered (the test is the only writer), and, for the
//! checkpoints the daemon takes itself, the tree just before and just after
//! each restore. After every rollback, revert and undo the live tree is
//! compared with what the model says it must be. Each of them is first
//! run dry: the tree and the checkpoints must not move, and the real run
//! must then do what the dry one said.
//!
//! It runs once with each watcher (`...::inotify`, `...::fanotify`, the
//! second as root only): the checkpoints that compare what the watch
//! marked are the ones most likely to miss a change.
//!
//! `SNAPBACK_MODEL_SEED` replays a run (the seed is printed at the start of
//! each); `SNAPBACK_MODEL_OPS` sets its length (2,000 by default, which
//! takes well under two minutes here; run 20,000 or more by hand).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use snapback::proto::{CheckpointRequest, ListRequest, RevertRequest, RollbackReport, RollbackRequest, UndoRequest};
use snapback::{Client, ClientError};

use crate::fixture::TestDaemon;
use crate::tree::{Node, assert_same, link_sets, snapshot};

type Tree = BTreeMap<Vec<u8>, Node>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}

const NAMES: [&str; 6] = ["f0", "f1", "f2", "f3", "f4", "f5"];
const DIR_NAMES: [&str; 4] = ["a", "b", "c", "deep"];

/// The test's side of the run: the tree, the model, and the daemon.
struct Run {
    rng: Rng,
    seed: u64,
    d: TestDaemon,
    client: Client,
    root: std::path::PathBuf,
    /// What each checkpoint held, by id.
    held: HashMap<String, Tree>,
    /// Which of its files were names of one file, by id.
    held_links: HashMap<String, Links>,
    /// The tree before the latest rollback, revert or undo: what `undo`
    /// must bring back.
    before_last_restore: Option<(Tree, Links)>,
    op: usize,
}

type Links = BTreeSet<Vec<Vec<u8>>>;

impl Run {
    fn tree(&self) -> Tree {
        snapshot(&self.root)
    }

    fn links(&self) -> Links {
        link_sets(&self.root)
    }

    /// Asserts the live tree's names of one file are `expected`'s.
    fn assert_links(&self, expected: &Links, what: &str) {
        let live = self.links();
        let show = |l: &Links| -> Vec<Vec<String>> {
            l.iter().map(|g| g.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect()).collect()
        };
        assert_eq!(show(&live), show(expected), "{}: names of one file", self.what(what));
    }

    fn at(&self, rel: &[u8]) -> std::path::PathBuf {
        self.root.join(std::ffi::OsStr::from_bytes(rel))
    }

    fn what(&self, doing: &str) -> String {
        format!("SNAPBACK_MODEL_SEED={} op {}: {doing}", self.seed, self.op)
    }

    /// Live paths of one kind, sorted.
    fn paths(&self, want: fn(&Node) -> bool) -> Vec<Vec<u8>> {
        self.tree().into_iter().filter(|(_, n)| want(n)).map(|(p, _)| p).collect()
    }

    /// A directory to put something in: the root or a live directory.
    fn some_dir(&mut self) -> Vec<u8> {
        let mut dirs = self.paths(|n| matches!(n, Node::Dir { .. }));
        dirs.push(Vec::new());
        self.rng.pick(&dirs).cloned().unwrap_or_default()
    }

    fn child(dir: &[u8], name: &str) -> Vec<u8> {
        if dir.is_empty() { name.as_bytes().to_vec() } else { [dir, b"/", name.as_bytes()].concat() }
    }

    fn content(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 0,
            1 => 70_000 + self.rng.below(40_000), // larger than a packed object
            _ => self.rng.below(3000),
        };
        (0..len).map(|_| self.rng.next() as u8).collect()
    }

    /// One change to the tree, as an agent's tool call would make it.
    fn change(&mut self) {
        let free = |p: &Path| std::fs::symlink_metadata(p).is_err();
        match self.rng.below(14) {
            0..=2 => {
                let dir = self.some_dir();
                let name = *self.rng.pick(&NAMES).unwrap();
                let p = self.at(&Self::child(&dir, name));
                if free(&p) || std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
                    let data = self.content();
                    // In place: through any other name of the file too.
                    let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&p);
                    if let Ok(mut f) = f {
                        std::io::Write::write_all(&mut f, &data).unwrap();
                    }
                }
            }
            3 => {
                if let Some(f) = self.rng.pick(&self.paths(|n| matches!(n, Node::File { .. }))).cloned() {
                    let data = self.content();
                    let mut h = std::fs::OpenOptions::new().append(true).open(self.at(&f)).unwrap();
                    std::io::Write::write_all(&mut h, &data[..data.len().min(500)]).unwrap();
                }
            }
            4 => {
                if let Some(f) = self.rng.pick(&self.paths(|n| matches!(n, Node::File { .. }))).cloned() {
                    let h = std::fs::OpenOptions::new().write(true).open(self.at(&f)).unwrap();
                    let len = h.metadata().unwrap().len();
                    h.set_len(len / 2).unwrap();
                }
            }
            5 => {
                let files = self.paths(|n| !matches!(n, Node::Dir { .. }));
                if let Some(f) = self.rng.pick(&files).cloned() {
                    let dir = self.some_dir();
                    let name = *self.rng.pick(&NAMES).unwrap();
                    let to = self.at(&Self::child(&dir, name));
                    if free(&to) {
                        std::fs::rename(self.at(&f), to).unwrap();
                    }
                }
            }
            6 => {
                let dirs = self.paths(|n| matches!(n, Node::Dir { .. }));
                if let Some(dir) = self.rng.pick(&dirs).cloned() {
                    let parent = self.some_dir();
                    let name = *self.rng.pick(&DIR_NAMES).unwrap();
                    let to = Self::child(&parent, name);
                    let inside = to.starts_with(&dir) && (to.len() == dir.len() || to[dir.len()] == b'/');
                    if !inside && free(&self.at(&to)) {
                        std::fs::rename(self.at(&dir), self.at(&to)).unwrap();
                    }
                }
            }
            7 => {
                if let Some(f) = self.rng.pick(&self.paths(|n| matches!(n, Node::File { .. }))).cloned() {
                    let dir = self.some_dir();
                    let name = *self.rng.pick(&NAMES).unwrap();
                    let to = self.at(&Self::child(&dir, name));
                    if free(&to) {
                        std::fs::hard_link(self.at(&f), to).unwrap();
                    }
                }
            }
            8 => {
                let dir = self.some_dir();
                let name = *self.rng.pick(&NAMES).unwrap();
                let to = self.at(&Self::child(&dir, name));
                let target = *self.rng.pick(&["f1", "../a", "/etc/passwd", "nowhere/at/all"]).unwrap();
                if free(&to) {
                    symlink(target, to).unwrap();
                }
            }
            9 => {
                let all = self.paths(|n| !matches!(n, Node::Symlink { .. }));
                if let Some(p) = self.rng.pick(&all).cloned() {
                    let is_dir = std::fs::symlink_metadata(self.at(&p)).unwrap().is_dir();
                    let modes: &[u32] = if is_dir { &[0o755, 0o700, 0o750] } else { &[0o644, 0o600, 0o755, 0o444] };
                    let mode = *self.rng.pick(modes).unwrap();
                    std::fs::set_permissions(self.at(&p), std::fs::Permissions::from_mode(mode)).unwrap();
                }
            }
            10 => {
                let all = self.paths(|_| true);
                if let Some(p) = self.rng.pick(&all).cloned() {
                    let at = self.at(&p);
                    if std::fs::symlink_metadata(&at).unwrap().is_dir() {
                        std::fs::remove_dir_all(at).unwrap();
                    } else {
                        std::fs::remove_file(at).unwrap();
                    }
                }
            }
            12 => {
                // A file changed through a link that is gone by the next
                // checkpoint: removed, renamed over, or renamed and removed.
                if let Some(f) = self.rng.pick(&self.paths(|n| matches!(n, Node::File { .. }))).cloned() {
                    let dir = self.some_dir();
                    let link = self.at(&Self::child(&dir, "link"));
                    if free(&link) {
                        std::fs::hard_link(self.at(&f), &link).unwrap();
                        let data = self.content();
                        std::fs::write(&link, data).unwrap();
                        match self.rng.below(3) {
                            0 => std::fs::remove_file(&link).unwrap(),
                            1 => {
                                let other = self.at(&Self::child(&dir, "other"));
                                if free(&other) {
                                    symlink("anywhere", &other).unwrap();
                                    std::fs::rename(&other, &link).unwrap();
                                }
                                std::fs::remove_file(&link).unwrap();
                            }
                            _ => {
                                let elsewhere = self.some_dir();
                                let moved = self.at(&Self::child(&elsewhere, "moved"));
                                if free(&moved) {
                                    std::fs::rename(&link, &moved).unwrap();
                                    std::fs::remove_file(&moved).unwrap();
                                } else {
                                    std::fs::remove_file(&link).unwrap();
                                }
                            }
                        }
                    }
                }
            }
            13 => {
                // A temporary file, written and removed.
                let dir = self.some_dir();
                let tmp = self.at(&Self::child(&dir, "scratch"));
                if free(&tmp) {
                    let data = self.content();
                    std::fs::write(&tmp, data).unwrap();
                    std::fs::remove_file(&tmp).unwrap();
                }
            }
            _ => {
                let dir = self.some_dir();
                let name = *self.rng.pick(&DIR_NAMES).unwrap();
                let to = self.at(&Self::child(&dir, name));
                if free(&to) {
                    std::fs::create_dir(to).unwrap();
                }
            }
        }
    }

    fn checkpoint(&mut self) {
        let c = self
            .client
            .checkpoint(CheckpointRequest { sandbox: "m".into(), ..Default::default() })
            .unwrap_or_else(|e| panic!("{}: {e}", self.what("checkpoint")));
        self.held_links.insert(c.id.clone(), self.links());
        self.held.insert(c.id, self.tree());
    }

    /// The checkpoints the daemon still has, oldest first.
    fn existing(&mut self) -> Vec<String> {
        let list = self.client.list(ListRequest { sandbox: Some("m".into()), plan: None }).unwrap();
        list.checkpoints.into_iter().map(|c| c.id).collect()
    }

    /// Runs a restore dry: nothing may move, neither the tree, its links,
    /// nor the list of checkpoints.
    fn dry_run(
        &mut self,
        doing: &str,
        ask: impl FnOnce(&mut Client) -> Result<RollbackReport, ClientError>,
    ) -> Result<RollbackReport, ClientError> {
        let (tree, links, checkpoints) = (self.tree(), self.links(), self.existing());
        let answer = ask(&mut self.client);
        let what = self.what(&format!("a dry run of {doing}"));
        assert_same(&self.tree(), &tree, &what);
        assert_eq!(self.links(), links, "{what}: links moved");
        assert_eq!(self.existing(), checkpoints, "{what}: the checkpoints moved");
        if let Ok(report) = &answer {
            assert!(report.dry_run && report.safety_checkpoint.is_none(), "{what}: {report:?}");
        }
        answer
    }

    /// The real run did what its dry run said it would.
    fn as_said(&self, dry: &RollbackReport, real: &RollbackReport, doing: &str) {
        let what = self.what(&format!("{doing} against its dry run"));
        assert_eq!(real.created_paths, dry.created_paths, "{what}: created");
        assert_eq!(real.restored_paths, dry.restored_paths, "{what}: restored\ndry {dry:?}\nreal {real:?}");
        assert_eq!(real.removed, dry.removed, "{what}: removed");
        assert_eq!((real.restored, real.created, real.deleted), (dry.restored, dry.created, dry.deleted), "{what}");
        assert_eq!(real.conflicts, dry.conflicts, "{what}: conflicts");
    }

    /// Records the daemon's own checkpoints of a restore: the safety one
    /// held the tree before, the restore one the tree after.
    fn restored(&mut self, report: &RollbackReport, (before, links_before): (Tree, Links)) {
        let after = self.tree();
        if let Some(s) = &report.safety_checkpoint {
            self.held.insert(s.clone(), before.clone());
            self.held_links.insert(s.clone(), links_before.clone());
        }
        if let Some(r) = &report.restore_checkpoint {
            self.held.insert(r.clone(), after);
            self.held_links.insert(r.clone(), self.links());
        }
        self.before_last_restore = Some((before, links_before));
    }

    fn rollback(&mut self) {
        let existing = self.existing();
        let Some(target) = self.rng.pick(&existing).cloned() else { return };
        let dry = self
            .dry_run("rollback", |c| {
                c.rollback(RollbackRequest { checkpoint: target.clone(), paths: vec![], dry_run: true })
            })
            .unwrap_or_else(|e| panic!("{}: {e}", self.what("dry rollback")));
        let before = (self.tree(), self.links());
        let report = self
            .client
            .rollback(RollbackRequest { checkpoint: target.clone(), paths: vec![], dry_run: false })
            .unwrap_or_else(|e| panic!("{}: {e}", self.what("rollback")));
        self.as_said(&dry, &report, "rollback");
        let expected = self.held[&target].clone();
        assert_same(&self.tree(), &expected, &self.what(&format!("rollback to {target}")));
        self.assert_links(&self.held_links[&target], &format!("rollback to {target}"));
        self.restored(&report, before);
    }

    /// Reverts a random step: where it meets no later change, the paths it
    /// changed go back to its parent's versions and nothing else moves;
    /// otherwise it is refused and nothing moves.
    fn revert(&mut self) {
        let existing = self.existing();
        if existing.len() < 2 {
            return;
        }
        let i = 1 + self.rng.below(existing.len() - 1);
        let step_id = existing[i].clone();
        let dry = self.dry_run("revert", |c| {
            c.revert(RevertRequest { checkpoint: step_id.clone(), dry_run: true, ..RevertRequest::default() })
        });
        let (parent, step) = (&self.held[&existing[i - 1]], &self.held[&existing[i]]);
        let before = self.tree();
        let links_before = self.links();
        let changed: BTreeSet<&Vec<u8>> =
            parent.keys().chain(step.keys()).filter(|p| parent.get(*p) != step.get(*p)).collect();
        // Changed again later, or to be put back into a directory that was
        // removed (or became something else) after the step.
        let dir_gone = |p: &[u8]| {
            let mut up = p;
            while let Some(i) = up.iter().rposition(|&b| b == b'/') {
                up = &up[..i];
                let was_dir = matches!(step.get(up), Some(Node::Dir { .. }));
                if was_dir && !matches!(before.get(up), Some(Node::Dir { .. })) {
                    return true;
                }
            }
            false
        };
        let conflict =
            changed.iter().any(|p| before.get(*p) != step.get(*p) || (parent.contains_key(*p) && dir_gone(p)));
        let mut expected = before.clone();
        for p in &changed {
            match parent.get(*p) {
                Some(node) => {
                    expected.insert((*p).clone(), node.clone());
                }
                None => {
                    expected.remove(*p);
                }
            }
        }
        let answer = self.client.revert(RevertRequest { checkpoint: step_id, ..RevertRequest::default() });
        match (&dry, &answer) {
            (Err(ClientError::Daemon(d)), Err(ClientError::Daemon(e))) => assert_eq!(d.code, e.code),
            (Ok(dry), Ok(real)) => self.as_said(dry, real, "revert"),
            other => panic!("{}: the dry run and the revert disagree: {other:?}", self.what("revert")),
        }
        match answer {
            Err(ClientError::Daemon(e)) if conflict && e.code == snapback::proto::ErrorCode::Conflict => {
                assert_same(&self.tree(), &before, &self.what("a refused revert"));
            }
            // A revert brings names of one file back only among the paths
            // its step changed: their links are not compared.
            Ok(report) if !conflict => {
                // A directory the step made that holds later entries stays.
                for p in &report.skipped {
                    if let Some(node) = before.get(&p.0) {
                        expected.insert(p.0.clone(), node.clone());
                    }
                }
                let mut fix: Vec<Vec<u8>> = Vec::new();
                for p in expected.keys() {
                    let mut up = p.as_slice();
                    while let Some(i) = up.iter().rposition(|&b| b == b'/') {
                        up = &up[..i];
                        if !expected.contains_key(up) {
                            fix.push(up.to_vec());
                        }
                    }
                }
                for p in fix {
                    if let Some(node) = before.get(&p).or_else(|| parent.get(&p)) {
                        expected.insert(p, node.clone());
                    }
                }
                assert_same(&self.tree(), &expected, &self.what(&format!("revert of {}", existing[i])));
                self.restored(&report, (before, links_before));
            }
            other => panic!("{}: conflict expected: {conflict}, got {other:?}", self.what("revert")),
        }
    }

    fn undo(&mut self) {
        let Some((expected, links)) = self.before_last_restore.clone() else { return };
        let dry = self
            .dry_run("undo", |c| c.undo(UndoRequest { sandbox: "m".into(), dry_run: true }))
            .unwrap_or_else(|e| panic!("{}: {e}", self.what("dry undo")));
        let before = (self.tree(), self.links());
        let report = self
            .client
            .undo(UndoRequest { sandbox: "m".into(), dry_run: false })
            .unwrap_or_else(|e| panic!("{}: {e}", self.what("undo")));
        self.as_said(&dry, &report, "undo");
        assert_same(&self.tree(), &expected, &self.what("undo"));
        self.assert_links(&links, "undo");
        self.restored(&report, before);
    }

    fn restart(&mut self) {
        self.d.restart();
        self.client = self.d.client();
    }

    /// Checks the counters the catalogue keeps of what the sandbox holds
    /// against a recount from its versions: its stored bytes, and each of
    /// its objects with how many versions hold it. `status` first applies
    /// the retention owed and brings the counters up to date; nothing
    /// changes the versions after it until the test's next step. Returns
    /// the stored bytes `status` showed.
    fn assert_counters(&self, what: &str) -> u64 {
        let shown = self.d.status().sandboxes[0].store_bytes;
        let db = rusqlite::Connection::open_with_flags(
            self.d.state_dir.join("catalogue.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let (pending, kept, recounted, objects, agreeing, distinct): (i64, i64, i64, i64, i64, i64) = db
            .query_row(
                "SELECT (SELECT count(*) FROM held_changes), s.stored_bytes,
                    (SELECT coalesce(sum(size), 0) FROM (SELECT DISTINCT object, size FROM entries
                                                        WHERE sandbox_id = s.id AND object IS NOT NULL)),
                    (SELECT count(*) FROM sandbox_objects WHERE sandbox_id = s.id),
                    (SELECT count(*) FROM (SELECT object, count(*) AS n, max(size) AS size FROM entries
                                           WHERE sandbox_id = s.id AND object IS NOT NULL GROUP BY object) r
                     JOIN sandbox_objects o ON o.sandbox_id = s.id AND o.object = r.object
                                            AND o.versions = r.n AND o.size = r.size),
                    (SELECT count(DISTINCT object) FROM entries WHERE sandbox_id = s.id AND object IS NOT NULL)
                 FROM sandboxes s WHERE s.name = 'm'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .unwrap();
        assert_eq!(pending, 0, "{}: status left changes uncounted", self.what(what));
        assert_eq!(
            (shown, kept),
            (recounted as u64, recounted),
            "{}: stored bytes (shown, kept) against a recount",
            self.what(what)
        );
        assert!(
            objects == distinct && agreeing == distinct,
            "{}: the sandbox's objects kept ({objects}, {agreeing} agreeing) differ from a recount ({distinct})",
            self.what(what)
        );
        shown
    }
}

mod a_random_agent_session_is_restored_exactly_every_time {
    #[test]
    fn inotify() {
        super::session("inotify");
    }

    #[test]
    fn fanotify() {
        if crate::fixture::root_or_skip("a_random_agent_session_is_restored_exactly_every_time::fanotify") {
            super::session("fanotify");
        }
    }
}

fn session(watcher: &'static str) {
    let seed = std::env::var("SNAPBACK_MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
    let ops: usize = std::env::var("SNAPBACK_MODEL_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    eprintln!("model test ({watcher}): SNAPBACK_MODEL_SEED={seed} SNAPBACK_MODEL_OPS={ops}");
    let d = TestDaemon::builder().watcher(watcher).start();
    let root = d.path("m");
    std::fs::create_dir(&root).unwrap();
    d.add_sandbox("m", &root, &[]);
    let client = d.client();
    let mut run = Run {
        rng: Rng(seed),
        seed,
        d,
        client,
        root,
        held: HashMap::new(),
        held_links: HashMap::new(),
        before_last_restore: None,
        op: 0,
    };
    let mut counts = [0usize; 5];
    // SNAPBACK_MODEL_TRACE=1 prints each operation with the tree after it.
    let trace = std::env::var_os("SNAPBACK_MODEL_TRACE").is_some();
    for op in 0..ops {
        run.op = op;
        let dice = run.rng.below(100);
        if trace {
            let paths: Vec<String> = run.tree().keys().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
            eprintln!("op {op} (dice {dice}): tree {paths:?}");
        }
        match dice {
            0..=11 => {
                run.checkpoint();
                counts[0] += 1;
            }
            12..=15 => {
                run.rollback();
                counts[1] += 1;
            }
            16..=18 => {
                run.revert();
                counts[2] += 1;
            }
            19..=20 => {
                run.undo();
                counts[3] += 1;
            }
            21 if run.rng.below(4) == 0 => {
                run.restart();
                counts[4] += 1;
            }
            _ => {
                run.change();
                continue;
            }
        }
        run.assert_counters("after it");
    }
    run.assert_counters("at the end");
    eprintln!(
        "model test: {} checkpoints, {} rollbacks, {} reverts, {} undos, {} restarts",
        counts[0], counts[1], counts[2], counts[3], counts[4]
    );
    assert!(counts[1] > 0 && counts[2] > 0 && counts[3] > 0, "the run exercised too little: {counts:?}");
}
