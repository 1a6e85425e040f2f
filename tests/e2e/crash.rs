//! `kill -9` of the daemon in the middle of a rollback or a checkpoint: a
//! restart finishes the rollback to its target exactly, a checkpoint is
//! listed complete or not at all, and `verify` is clean after each. And a
//! daemon stopped by a test hook right after the safety checkpoint of a
//! rollback, revert or undo finishes each at restart; one killed before
//! it recorded a checkpoint's pack in the pack index records it at restart.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fixture::{TestDaemon, binary, eventually, write};
use crate::tree::{assert_same, snapshot};

/// A small xorshift generator, seeded from the clock and printed, so that a
/// failing run can be replayed with `SNAPBACK_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("SNAPBACK_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 | 1);
        eprintln!("{test}: SNAPBACK_CRASH_SEED={seed}");
        Rng(seed)
    }

    /// Returns a duration in `[0, max)`.
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_nanos(self.0 % (max.as_nanos() as u64).max(1))
    }
}

/// Starts `snapback ARGS` in the background.
fn spawn_cli(d: &TestDaemon, args: &[&str]) -> Child {
    Command::new(binary("snapback"))
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until the catalogue shows that the daemon took up a rollback to
/// `target` (its intent is recorded), so that the kill lands during it.
/// An earlier restore's intent stays until its `restore` checkpoint is
/// written, just after its answer: it does not count.
fn wait_for_intent(state_dir: &Path, target: &str) {
    let conn = snapback_daemon::testing::connect_catalogue(&state_dir.join("catalogue.db")).unwrap();
    eventually(Duration::from_secs(30), Duration::from_millis(1), || {
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM intents WHERE state IN ('pending', 'applying') AND target = ?1",
                [target],
                |r| r.get(0),
            )
            .unwrap();
        if n > 0 { Ok(()) } else { Err("the rollback never started".into()) }
    })
}

fn kill9(d: &TestDaemon) {
    // SAFETY: signalling the daemon child the fixture owns.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
}

#[test]
fn a_rollback_killed_at_random_points_is_finished_at_restart() {
    let mut d = TestDaemon::start();
    let mut rng = Rng::new("a_rollback_killed_at_random_points_is_finished_at_restart");
    let sb = d.path("sb");
    for i in 0..20_000 {
        write(&sb.join(format!("d{:03}/f{i}", i % 200)), format!("version a of {i}"));
    }
    d.add_sandbox("sb", &sb, &[]);
    let a = d.checkpoint("sb");
    let tree_a = snapshot(&sb);
    // B: every file rewritten or deleted, new directories and files.
    for i in 0..20_000 {
        let p = sb.join(format!("d{:03}/f{i}", i % 200));
        if i % 10 == 0 {
            std::fs::remove_file(p).unwrap();
        } else {
            write(&p, format!("version b of {i}"));
        }
    }
    for i in 0..2_000 {
        write(&sb.join(format!("new{:02}/g{i}", i % 20)), format!("new {i}"));
    }
    let b = d.checkpoint("sb");
    let tree_b = snapshot(&sb);

    let started = Instant::now();
    d.rollback(&a);
    let full = started.elapsed();
    assert_same(&snapshot(&sb), &tree_a, "an uninterrupted rollback");
    d.rollback(&b);
    assert_same(&snapshot(&sb), &tree_b, "rolling forward again");

    for trial in 0..20 {
        let mut cli = spawn_cli(&d, &["rollback", &a]);
        wait_for_intent(&d.state_dir, &a);
        std::thread::sleep(rng.below(full));
        kill9(&d);
        let _ = cli.wait();
        d.restart();
        assert_same(&snapshot(&sb), &tree_a, &format!("trial {trial}: after a kill -9 and a restart"));
        let status = d.status();
        let recovery = status.sandboxes[0].recovery.clone().unwrap_or_default();
        assert!(
            recovery.is_empty() || recovery.contains("finished at start"),
            "trial {trial}: status reports {recovery:?}"
        );
        d.rollback(&b);
    }
    d.assert_verified();
}

#[test]
fn a_checkpoint_killed_at_random_points_is_listed_complete_or_absent() {
    let mut d = TestDaemon::start();
    let mut rng = Rng::new("a_checkpoint_killed_at_random_points_is_listed_complete_or_absent");
    let sb = d.path("sb");
    for i in 0..10_000 {
        write(&sb.join(format!("d{:02}/f{i}", i % 100)), format!("base {i}"));
    }
    d.add_sandbox("sb", &sb, &[]);
    let started = Instant::now();
    d.checkpoint("sb");
    let full = started.elapsed();
    for trial in 0..10 {
        for i in (trial..10_000).step_by(5) {
            write(&sb.join(format!("d{:02}/f{i}", i % 100)), format!("trial {trial} {i}"));
        }
        let tree = snapshot(&sb);
        let before = d.list(&["sb"]).len();
        let mut cli = spawn_cli(&d, &["checkpoint", "sb"]);
        std::thread::sleep(rng.below(full));
        kill9(&d);
        let _ = cli.wait();
        d.restart();
        // What the killed checkpoint left is collected in the background.
        d.wait_collected();
        d.assert_verified();
        let list = d.json(&["list", "sb"]);
        let all = list["checkpoints"].as_array().unwrap();
        assert!(all.len() == before || all.len() == before + 1, "trial {trial}: {list}");
        assert_same(&snapshot(&sb), &tree, &format!("trial {trial}: a checkpoint never changes the tree"));
        if all.len() == before + 1 {
            // Listed: complete. It records exactly the tree as it was (a
            // diff with the live tree compares every path's content), and
            // verify found all its objects with the right hashes.
            let id = all.last().unwrap()["id"].as_str().unwrap().to_owned();
            let diff = d.json(&["diff", &id]);
            assert!(diff["changes"].as_array().unwrap().is_empty(), "trial {trial}: {diff}");
        }
    }
}

/// A daemon with its test hooks on, and a sandbox `sb` of `a/x.txt` (x1)
/// and `b/y.txt` (y1) with a first checkpoint of them, whose id it returns.
fn hooked_sandbox() -> (TestDaemon, std::path::PathBuf, String) {
    let d = TestDaemon::builder().env("SNAPBACK_TEST_HOOKS", "1").start();
    let sb = d.path("sb");
    write(&sb.join("a/x.txt"), "x1");
    write(&sb.join("b/y.txt"), "y1");
    d.add_sandbox("sb", &sb, &[]);
    let first = d.checkpoint("sb");
    (d, sb, first)
}

/// Runs `snapback ARGS` against a daemon that the `stop-after-safety` hook
/// ends right after the request's safety checkpoint, starts it again, and
/// checks that `status` reports the request finished at start.
fn stopped_after_safety_then_restarted(d: &mut TestDaemon, args: &[&str]) {
    let hook = d.state_dir.join("stop-after-safety");
    std::fs::write(&hook, b"").unwrap();
    let out = d.cli(args);
    assert!(!out.status.success(), "{args:?} was answered although the daemon was to stop");
    assert!(!hook.exists(), "{args:?}: the daemon did not stop at the hook");
    d.restart();
    let status = d.status();
    let note = status.sandboxes[0].recovery.as_deref().unwrap_or_default();
    assert!(note.contains("finished at start"), "{args:?}: status reports {note:?}");
}

#[test]
fn restores_stopped_after_their_safety_checkpoint_are_finished_at_restart() {
    // Each kind of restore, stopped once its intent and safety checkpoint
    // are committed and nothing is touched yet: the restart makes its plan
    // again from the catalogue and applies all of it.
    let (mut d, sb, first) = hooked_sandbox();
    write(&sb.join("a/x.txt"), "x2");
    write(&sb.join("a/new.txt"), "new");
    write(&sb.join("b/y.txt"), "y2");
    d.checkpoint("sb");
    write(&sb.join("b/y.txt"), "y3");
    let step = d.checkpoint("sb");
    let tree = || ["a/x.txt", "a/new.txt", "b/y.txt"].map(|p| std::fs::read_to_string(sb.join(p)).ok());
    let text = |s: &str| Some(s.to_owned());

    // A rollback of `a` only.
    stopped_after_safety_then_restarted(&mut d, &["rollback", &first, "--path", &sb.join("a").to_string_lossy()]);
    assert_eq!(tree(), [text("x1"), None, text("y3")]);

    // A revert of the step that wrote y3.
    stopped_after_safety_then_restarted(&mut d, &["revert", &step]);
    assert_eq!(tree(), [text("x1"), None, text("y2")]);

    // Undo of that revert.
    stopped_after_safety_then_restarted(&mut d, &["undo", "sb"]);
    assert_eq!(tree(), [text("x1"), None, text("y3")]);
    d.assert_verified();
}

#[test]
fn a_restore_stopped_before_its_record_is_recorded_at_restart_and_not_applied_again() {
    // A rollback is answered once its files are back, and its `restore`
    // checkpoint written just after. A daemon stopped in between (a test
    // hook ends it there) writes that record at its next start, under the
    // id the answer gave, and applies nothing again: the agent's write
    // made after the answer survives, and is the next step.
    let (mut d, sb, first) = hooked_sandbox();
    write(&sb.join("a/x.txt"), "x2");
    write(&sb.join("a/new.txt"), "new");
    let hook = d.state_dir.join("stop-before-record");
    std::fs::write(&hook, b"").unwrap();
    let recorded = d.rollback(&first).restore_checkpoint.expect("the answer names the restore checkpoint");
    let stopped = d.stop().expect("the daemon was running");
    assert_eq!(stopped.code(), Some(70), "the daemon did not stop at the hook");
    assert!(!hook.exists());
    let read = |p: &str| std::fs::read_to_string(sb.join(p)).ok();
    assert_eq!((read("a/x.txt"), read("a/new.txt")), (Some("x1".to_owned()), None));

    write(&sb.join("a/x.txt"), "the agent's next step");
    d.restart();
    assert_eq!(read("a/x.txt").as_deref(), Some("the agent's next step"), "the rollback was applied again");
    let last = d.list(&["sb"]).pop().unwrap();
    assert_eq!((&last.id, last.kind), (&recorded, snapback::proto::CheckpointKind::Restore), "{last:?}");
    let next: snapback::proto::CheckpointInfo = d.answer(&["checkpoint", "sb"]);
    assert_eq!((next.parent.as_deref(), next.changed), (Some(recorded.as_str()), 1), "{next:?}");
    let step = d.json(&["diff", &recorded, &next.id]);
    let changes = step["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{step}");
    assert_eq!(changes[0]["path"]["text"], "a/x.txt", "{step}");
    assert!(d.status().sandboxes[0].recovery.is_none(), "an answered rollback left a recovery note");
    d.assert_verified();
}

#[test]
fn a_checkpoint_whose_pack_was_never_recorded_is_whole_after_a_kill() {
    // A watched checkpoint's small files go into a pack that the pack index
    // records after the answer. Held there by a test hook, a daemon killed
    // with the pack sealed but unrecorded records it from the pack's
    // trailer at the next start.
    let _serial = crate::watch::serial();
    let mut d = TestDaemon::builder().env("SNAPBACK_TEST_HOOKS", "1").env("SNAPBACK_TEST_HOLD_PACKS", "1").start();
    let sb = d.path("sb");
    let file = |i: usize| sb.join(format!("d{}/f{i}", i % 10));
    for i in 0..200 {
        write(&file(i), format!("first {i}"));
    }
    let added = d.add_sandbox("sb", &sb, &[]);
    crate::watch::wait_watching(&d, "sb");
    d.checkpoint("sb");
    // Where the store cannot clone, the first checkpoint packs its 200
    // files too, held unrecorded as well.
    let (first_packs, first_slots) = match added["clone_method"].as_str() {
        Some("copy") => (1, 200),
        _ => (0, 0),
    };
    for i in 0..100 {
        write(&file(i), format!("second {i}"));
    }
    let second = d.checkpoint("sb");
    let tree = snapshot(&sb);
    let store = d.state_dir.join("store");
    let packs = || std::fs::read_dir(store.join("packs")).unwrap().count();
    let recorded = || -> i64 {
        let index = rusqlite::Connection::open(store.join("packs.db")).unwrap();
        index.query_row("SELECT count(*) FROM packed", [], |r| r.get(0)).unwrap()
    };
    assert_eq!(
        (packs(), recorded()),
        (first_packs + 1, 0),
        "the second checkpoint's files were not left in an unrecorded pack"
    );
    kill9(&d);
    d.restart();
    assert_eq!(recorded(), first_slots + 100, "the packs were not recorded at the restart");
    for i in 0..150 {
        write(&file(i), format!("third {i}"));
    }
    d.rollback(&second);
    assert_same(&snapshot(&sb), &tree, "rolled back to the checkpoint of the unrecorded pack");
    d.assert_verified();
}

/// Starts the daemon on `d`'s state and expects it to refuse to start
/// (to exit unsuccessfully within a minute): returns what it said.
fn refused_start(d: &TestDaemon) -> String {
    let mut child = Command::new(binary("snapbackd"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("--state-dir")
        .arg(&d.state_dir)
        .env("SNAPBACK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run snapbackd");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("snapbackd started and kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr).unwrap();
    assert!(!status.success(), "snapbackd exited successfully: {stderr}");
    stderr
}

#[test]
fn a_lost_catalogue_never_costs_the_store_its_objects() {
    let mut d = TestDaemon::start();
    let sb = d.path("sb");
    write(&sb.join("a.txt"), "kept through a lost catalogue");
    write(&sb.join("big.bin"), vec![7u8; 256 << 10]);
    d.add_sandbox("sb", &sb, &[]);
    d.checkpoint("sb");
    d.stop();
    let store = d.state_dir.join("store");
    let objects = crate::fixture::object_count(&store);
    assert!(objects >= 2, "{objects}");

    // The catalogue truncated to 0 bytes, as a full disk or a bad copy
    // leaves it: the daemon refuses to start, now and next time, and says
    // how to start afresh; the objects stay.
    let db = d.state_dir.join("catalogue.db");
    std::fs::File::create(&db).unwrap();
    for extra in ["catalogue.db-wal", "catalogue.db-shm"] {
        let _ = std::fs::remove_file(d.state_dir.join(extra));
    }
    for _ in 0..2 {
        let said = refused_start(&d);
        assert!(said.contains("holds the objects") && said.contains("move"), "{said}");
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "the catalogue was written");
    }
    assert_eq!(crate::fixture::object_count(&store), objects);

    // Afresh on purpose: the store moved away, a new catalogue and store.
    let old_store = d.state_dir.join("store.old");
    std::fs::rename(&store, &old_store).unwrap();
    d.restart();
    d.stop();
    // The old store put back in place of the new one belongs to the lost
    // catalogue: neither written nor collected.
    let new_store = d.state_dir.join("store.new");
    std::fs::rename(&store, &new_store).unwrap();
    std::fs::rename(&old_store, &store).unwrap();
    let said = refused_start(&d);
    assert!(said.contains("belongs to another catalogue"), "{said}");
    assert_eq!(crate::fixture::object_count(&store), objects);

    // Another daemon's catalogue copied over this one has never seen this
    // store, whose marker names the catalogue it belongs to.
    let mut other = TestDaemon::start();
    other.stop();
    std::fs::copy(other.state_dir.join("catalogue.db"), &db).unwrap();
    let said = refused_start(&d);
    assert!(said.contains("belongs to another catalogue"), "{said}");
    assert_eq!(crate::fixture::object_count(&store), objects);
}

#[test]
fn sigterm_during_a_rollback_still_answers_it_and_removes_the_socket() {
    let mut d = TestDaemon::start();
    let sb = d.path("sb");
    for i in 0..20_000 {
        write(&sb.join(format!("d{:03}/f{i:05}", i % 200)), format!("file {i}"));
    }
    d.add_sandbox("sb", &sb, &[]);
    let c = d.checkpoint("sb");
    for e in std::fs::read_dir(&sb).unwrap() {
        std::fs::remove_dir_all(e.unwrap().path()).unwrap();
    }
    let cli = Command::new(binary("snapback"))
        .args(["--json", "rollback", &c, "--socket"])
        .arg(&d.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_intent(&d.state_dir, &c);
    // SAFETY: signalling the daemon child the fixture owns.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "the rollback's client got: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["created"].as_u64(), Some(20_000 + 200), "{}", report["created"]);
    let status = d.stop().expect("the daemon was running");
    assert!(status.success(), "{status}");
    assert!(!d.socket.exists(), "the socket was left behind");
    assert_eq!(std::fs::read_to_string(sb.join("d007/f12007")).unwrap(), "file 12007");
}

#[test]
fn sigterm_in_the_first_milliseconds_after_bind_stops_the_daemon_cleanly() {
    use std::os::unix::process::ExitStatusExt;
    let mut rng = Rng::new("sigterm_in_the_first_milliseconds_after_bind_stops_the_daemon_cleanly");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let state = dir.path().join("state");
    for round in 0..60 {
        let mut child = TestDaemon::spawn(&socket, &state);
        let deadline = Instant::now() + Duration::from_secs(60);
        // Spun on, not slept on: the signal must land within the first
        // fraction of a millisecond after the bind.
        while !socket.exists() {
            assert!(Instant::now() < deadline, "round {round}: the socket never appeared");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: snapbackd exited before binding: {status}");
            }
            std::thread::yield_now();
        }
        let wait = rng.below(Duration::from_micros(300));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        // SAFETY: signalling a child we own.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), None, "round {round}: killed by the signal's default action");
        assert!(status.success(), "round {round}: {status}");
        assert!(!socket.exists(), "round {round}: the socket was left behind");
    }
}
