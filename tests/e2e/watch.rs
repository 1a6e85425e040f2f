//! The watcher: incremental checkpoints that miss nothing.

use std::sync::Mutex;
use std::time::Duration;

use snapback::proto::CheckpointRequest;

use crate::fixture::{TestDaemon, eventually, root_or_skip, write};

/// The real-overflow test lowers a system-wide inotify limit for a moment;
/// the other tests here assert incremental scans, so they do not overlap it.
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits until the sandbox's watch is set up (a readiness signal, polled).
pub(crate) fn wait_watching(d: &TestDaemon, name: &str) {
    let watch = eventually(Duration::from_secs(30), Duration::from_millis(20), || {
        let status = d.status();
        let sb = status.sandboxes.into_iter().find(|s| s.name == name).unwrap();
        match sb.watch.as_str() {
            "starting" => Err(format!("the watch of {name} never came up")),
            watch => Ok(watch.to_owned()),
        }
    });
    assert!(!watch.starts_with("degraded"), "{watch}");
}

/// Asserts that `watcher` watches the sandbox `name`.
fn assert_watcher(d: &TestDaemon, name: &str, watcher: &str) {
    let status = d.status();
    let sb = status.sandboxes.iter().find(|s| s.name == name).unwrap();
    assert_eq!(sb.watcher.as_deref(), Some(watcher), "{sb:?}");
}

/// Each test named here runs twice, as `NAME::inotify` and
/// `NAME::fanotify`: what one watcher sees, the other must see too.
/// fanotify needs root; without it the test skips (and fails under CI).
macro_rules! with_each_watcher {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn inotify() {
                super::$name("inotify");
            }

            #[test]
            fn fanotify() {
                if crate::fixture::root_or_skip(concat!(stringify!($name), "::fanotify")) {
                    super::$name("fanotify");
                }
            }
        }
    )*};
}

with_each_watcher!(
    reading_every_file_leaves_nothing_to_compare,
    a_thousand_write_then_checkpoint_rounds_capture_every_write,
    files_created_with_mkdir_p_in_one_burst_are_captured,
    more_dirty_files_than_the_read_queue_holds_are_captured,
    a_directory_moved_into_and_out_of_the_sandbox_is_captured,
    writes_in_a_renamed_directory_are_captured_under_its_new_name,
    an_injected_rescan_leads_to_a_full_comparison,
    status_shows_the_watch,
    changes_while_stopped_are_found_by_a_full_scan_after_restart,
    auto_checkpoints_follow_a_quiet_period,
    small_files_of_watched_checkpoints_are_packed_restored_and_freed,
    a_never_checkpointed_sandbox_says_its_first_checkpoint_compares_everything,
    checkpoints_taken_during_a_rename_storm_are_trees_that_existed,
    a_tree_that_never_settles_gets_busy_and_nothing_is_recorded,
    a_file_with_several_names_is_never_kept_stale,
    names_of_one_file_come_back_as_one_file,
    a_file_changed_through_a_link_that_is_gone_is_caught,
    a_removed_directory_and_its_neighbours_are_each_compared_once,
    a_link_replaced_while_a_checkpoint_reads_is_caught,
);

fn checkpoint(client: &mut snapback::Client, sandbox: &str) -> snapback::proto::CheckpointInfo {
    client.checkpoint(CheckpointRequest { sandbox: sandbox.into(), ..Default::default() }).unwrap()
}

/// The paths `snapback diff FROM TO` lists, in its order.
fn changed(d: &TestDaemon, from: &str, to: &str) -> Vec<String> {
    let diff = d.json(&["diff", from, to]);
    diff["changes"].as_array().unwrap().iter().map(|c| c["path"]["text"].as_str().unwrap().to_owned()).collect()
}

/// The path of the `i`th file [`watched`] seeds.
fn seeded(root: &std::path::Path, i: usize) -> std::path::PathBuf {
    root.join(format!("d{}/f{i}", i % 10))
}

/// One test's daemon, run alone (see [`serial`]), with a watched sandbox
/// `sb` of `files` files: the lock, the daemon and the sandbox's root.
fn watched_alone(
    files: usize,
    w: &'static str,
) -> (std::sync::MutexGuard<'static, ()>, TestDaemon, std::path::PathBuf) {
    let serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let root = watched(&d, "sb", files);
    assert_watcher(&d, "sb", w);
    (serial, d, root)
}

/// A sandbox with a watch in place and its first (full) checkpoint taken.
fn watched(d: &TestDaemon, name: &str, files: usize) -> std::path::PathBuf {
    let root = d.path(name);
    for i in 0..files {
        write(&seeded(&root, i), "seed");
    }
    std::fs::create_dir_all(&root).unwrap();
    d.add_sandbox(name, &root, &[]);
    wait_watching(d, name);
    let mut client = d.client();
    let first = checkpoint(&mut client, name);
    assert_eq!(first.full_scan, Some(true), "the first checkpoint after the watch starts compares everything");
    // From here on checkpoints compare only what events mark; settle until
    // one compares nothing (no event of the seeding is left over).
    for _ in 0..20 {
        if checkpoint(&mut client, name).scanned == Some(0) {
            return root;
        }
    }
    panic!("checkpoints of an unchanged tree keep comparing paths");
}

fn reading_every_file_leaves_nothing_to_compare(w: &'static str) {
    let (_serial, d, root) = watched_alone(200, w);
    // Agents read far more than they write: opening and reading a file
    // changes nothing, so the next checkpoint compares nothing.
    for i in 0..200 {
        std::fs::read(seeded(&root, i)).unwrap();
    }
    let c = checkpoint(&mut d.client(), "sb");
    assert_eq!((c.full_scan, c.scanned, c.changed), (Some(false), Some(0), 0), "{c:?}");
}

fn a_thousand_write_then_checkpoint_rounds_capture_every_write(w: &'static str) {
    let (_serial, d, root) = watched_alone(200, w);
    let mut client = d.client();
    let mut taken = Vec::new();
    for i in 0..1000u32 {
        let content = format!("round {i:04}");
        std::fs::write(root.join("hot.txt"), &content).unwrap();
        let c = checkpoint(&mut client, "sb");
        assert_eq!(c.changed, 1, "round {i}: the write was not captured: {c:?}");
        assert_eq!(c.full_scan, Some(false), "round {i} scanned everything");
        assert!(c.scanned.unwrap() <= 3, "round {i} compared {:?} paths", c.scanned);
        taken.push((c.id, content));
    }
    // Retention keeps the newest 100, and each rollback adds two (its
    // safety and restore checkpoints): each target still kept restores its
    // round.
    for (id, content) in taken.iter().rev().take(60).step_by(8) {
        d.rollback(id);
        assert_eq!(std::fs::read_to_string(root.join("hot.txt")).unwrap(), *content);
    }
}

fn files_created_with_mkdir_p_in_one_burst_are_captured(w: &'static str) {
    let (_serial, d, root) = watched_alone(20, w);
    let before = checkpoint(&mut d.client(), "sb");
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    for i in 0..50 {
        std::fs::write(root.join(format!("a/b/c/f{i}")), format!("{i}")).unwrap();
    }
    std::fs::write(root.join("a/b/g"), "g").unwrap();
    std::fs::write(root.join("a/top"), "t").unwrap();
    let after = checkpoint(&mut d.client(), "sb");
    assert_eq!(after.full_scan, Some(false));
    let diff = d.json(&["diff", &before.id, &after.id]);
    let added = diff["changes"].as_array().unwrap().iter().filter(|c| c["change"] == "added").count();
    assert_eq!(added, 3 + 50 + 2, "{diff}");
}

fn more_dirty_files_than_the_read_queue_holds_are_captured(w: &'static str) {
    // Each dirty file is its own root of the scan: 6,000 of them overflow
    // the bounded queue of files to read, which must drain while they are
    // still being queued.
    let (_serial, d, root) = watched_alone(20, w);
    for i in 0..6000 {
        std::fs::write(root.join(format!("d{}/new-{i}", i % 10)), format!("{i}")).unwrap();
    }
    let c = checkpoint(&mut d.client(), "sb");
    assert_eq!(c.changed, 6000, "{c:?}");
    assert_eq!(c.files, 6020);
}

fn a_directory_moved_into_and_out_of_the_sandbox_is_captured(w: &'static str) {
    let (_serial, d, root) = watched_alone(20, w);
    let outside = d.path("outside/tree");
    for i in 0..30 {
        write(&outside.join(format!("sub/f{i}")), "moved in");
    }
    let before = checkpoint(&mut d.client(), "sb");
    std::fs::rename(&outside, root.join("arrived")).unwrap();
    let moved_in = checkpoint(&mut d.client(), "sb");
    assert_eq!(moved_in.full_scan, Some(false));
    assert_eq!(moved_in.changed, 2 + 30, "{moved_in:?}");
    std::fs::rename(root.join("d3"), d.path("outside/d3")).unwrap();
    let moved_out = checkpoint(&mut d.client(), "sb");
    assert_eq!(moved_out.changed, 1 + 2, "d3 held two files: {moved_out:?}");
    d.rollback(&before.id);
    assert!(!root.join("arrived").exists());
    assert_eq!(std::fs::read_dir(root.join("d3")).unwrap().count(), 2);
}

fn writes_in_a_renamed_directory_are_captured_under_its_new_name(w: &'static str) {
    let (_serial, d, root) = watched_alone(20, w);
    write(&root.join("x/y/f"), "first");
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    // Written once under the old names, so a watcher that remembers
    // directories has seen them.
    write(&root.join("x/y/f"), "second");
    write(&root.join("d1/f1"), "second");
    checkpoint(&mut client, "sb");
    std::fs::rename(root.join("x"), root.join("z")).unwrap();
    std::fs::rename(root.join("d1"), root.join("moved")).unwrap();
    let renamed = checkpoint(&mut client, "sb");
    assert_eq!(renamed.full_scan, Some(false));
    write(&root.join("z/y/f"), "third");
    write(&root.join("moved/f1"), "third");
    // A new directory under an old name is another directory.
    write(&root.join("d1/new"), "new");
    let after = checkpoint(&mut client, "sb");
    assert_eq!((after.full_scan, after.changed), (Some(false), 4), "{after:?}");
    let mut paths = changed(&d, &renamed.id, &after.id);
    paths.sort();
    assert_eq!(paths, ["d1", "d1/new", "moved/f1", "z/y/f"]);
}

fn an_injected_rescan_leads_to_a_full_comparison(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).env("SNAPBACK_TEST_HOOKS", "1").start();
    let root = watched(&d, "sb", 100);
    assert_watcher(&d, "sb", w);
    let quiet = checkpoint(&mut d.client(), "sb");
    assert_eq!(quiet.full_scan, Some(false));
    assert_eq!(quiet.changed, 0);
    let mut client = d.client();
    let injected =
        client.call(&snapback::proto::Request::InjectRescan(snapback::proto::InjectRescan { sandbox: "sb".into() }));
    assert!(injected.is_ok(), "{injected:?}");
    let status = d.status();
    assert_eq!(status.sandboxes[0].watch, "needs full scan: a rescan was injected");
    write(&root.join("new.txt"), "after the overflow");
    let full = checkpoint(&mut client, "sb");
    assert_eq!(full.full_scan, Some(true));
    // Every path is compared once. With a full scan owed, the checkpoint
    // does not wait for the watcher to catch up, so new.txt's own event may
    // come during the scan and have it read once more as the tree settles.
    let scanned = full.scanned.unwrap_or(0);
    assert!((100 + 10 + 1..=100 + 10 + 2).contains(&scanned), "every path was compared: {full:?}");
    assert_eq!(full.changed, 1);
    let next = checkpoint(&mut client, "sb");
    assert_eq!(next.full_scan, Some(false), "back to incremental after the full scan");
    // Without the hook turned on, the request is refused.
    let plain = TestDaemon::start();
    let sb2 = plain.path("x");
    plain.add_sandbox("x", &sb2, &[]);
    let refused = plain
        .client()
        .call(&snapback::proto::Request::InjectRescan(snapback::proto::InjectRescan { sandbox: "x".into() }));
    assert!(refused.is_err());
}

/// Restores a sysctl on drop.
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap();
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        std::fs::write(self.path, self.old.trim()).unwrap();
    }
}

#[test]
fn a_real_kernel_queue_overflow_leads_to_a_full_comparison() {
    if !root_or_skip("a_real_kernel_queue_overflow_leads_to_a_full_comparison") {
        return;
    }
    let _serial = serial();
    let d = TestDaemon::builder().watcher("inotify").start();
    let root = d.path("sb");
    std::fs::create_dir_all(&root).unwrap();
    let limit = Sysctl::set("/proc/sys/fs/inotify/max_queued_events", "32");
    // The queue size is fixed when the watch's inotify instance is made.
    d.add_sandbox("sb", &root, &[]);
    wait_watching(&d, "sb");
    drop(limit);
    overflow_with_a_burst(&d, &root, 5000);
}

/// Takes the first checkpoint of the empty sandbox `sb`, writes `files`
/// new files while the daemon is stopped (more than its watcher's queue
/// holds), and expects the next checkpoint to compare everything and find
/// them all.
fn overflow_with_a_burst(d: &TestDaemon, root: &std::path::Path, files: u64) {
    let first = checkpoint(&mut d.client(), "sb");
    assert_eq!(first.full_scan, Some(true));
    // SAFETY: signalling the daemon child; it is resumed right after.
    unsafe { libc::kill(d.pid(), libc::SIGSTOP) };
    for i in 0..files {
        std::fs::write(root.join(format!("burst-{i}")), "x").unwrap();
    }
    // SAFETY: as above.
    unsafe { libc::kill(d.pid(), libc::SIGCONT) };
    let after = checkpoint(&mut d.client(), "sb");
    assert_eq!(after.full_scan, Some(true), "an overflowed queue must lead to a full comparison");
    assert_eq!((after.changed, after.files), (files, files), "{after:?}");
}

#[test]
fn a_fanotify_queue_overflow_leads_to_a_full_comparison() {
    if !root_or_skip("a_fanotify_queue_overflow_leads_to_a_full_comparison") {
        return;
    }
    let _serial = serial();
    let d = TestDaemon::builder().watcher("fanotify").start();
    let root = d.path("sb");
    std::fs::create_dir_all(&root).unwrap();
    d.add_sandbox("sb", &root, &[]);
    wait_watching(&d, "sb");
    assert_watcher(&d, "sb", "fanotify");
    // More new files than a fanotify queue holds (16,384 events).
    overflow_with_a_burst(&d, &root, 20_000);
}

fn status_shows_the_watch(w: &'static str) {
    let (_serial, d, root) = watched_alone(30, w);
    write(&root.join("d1/pending.txt"), "not yet checkpointed");
    // Dirty paths appear once their events are read: poll for them.
    let sb = eventually(Duration::from_secs(10), Duration::from_millis(10), || {
        let sb = d.json(&["status"])["sandboxes"][0].clone();
        match sb["dirty_paths"].as_u64().unwrap() {
            0 => Err(format!("no dirty path: {sb}")),
            _ => Ok(sb),
        }
    });
    assert_eq!(sb["watch"], "watching", "{sb}");
    assert_eq!(sb["watched_dirs"], 11, "{sb}");
    assert!(sb["checkpoints"].as_u64().unwrap() >= 2);
    assert!(sb["store_bytes"].as_u64().unwrap() > 0);
    assert!(["reflink", "copy"].contains(&sb["clone_method"].as_str().unwrap()));
    let text = String::from_utf8_lossy(&d.cli(&["status"]).stdout).to_string();
    assert!(text.contains("watching"), "{text}");
}

fn changes_while_stopped_are_found_by_a_full_scan_after_restart(w: &'static str) {
    let (_serial, mut d, root) = watched_alone(20, w);
    d.stop();
    write(&root.join("d0/f0"), "changed while stopped");
    d.restart();
    wait_watching(&d, "sb");
    let after = checkpoint(&mut d.client(), "sb");
    assert_eq!(after.full_scan, Some(true));
    assert_eq!(after.changed, 1);
    write(&root.join("d0/f0"), "and again");
    let next = checkpoint(&mut d.client(), "sb");
    assert_eq!((next.full_scan, next.changed), (Some(false), 1));
}

fn auto_checkpoints_follow_a_quiet_period(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).config("[sandbox.sb]\nauto_checkpoint_ms = 200\n").start();
    let root = watched(&d, "sb", 5);
    assert_watcher(&d, "sb", w);
    write(&root.join("edited.txt"), "by an agent");
    let auto = eventually(Duration::from_secs(20), Duration::from_millis(50), || {
        let list = d.json(&["list", "sb"]);
        let mut checkpoints = list["checkpoints"].as_array().unwrap().iter();
        checkpoints.find(|c| c["kind"] == "auto").cloned().ok_or_else(|| "no auto checkpoint came".to_string())
    });
    assert_eq!(auto["changed"], 1, "{auto}");
    // Without changes, no more come.
    let count = d.list(&["sb"]).len();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(d.list(&["sb"]).len(), count);
}

#[test]
fn without_the_watcher_every_checkpoint_compares_everything() {
    let d = TestDaemon::builder().config("watch = false\n").start();
    let root = d.path("sb");
    write(&root.join("a/f"), "1");
    d.add_sandbox("sb", &root, &[]);
    checkpoint(&mut d.client(), "sb");
    write(&root.join("a/f"), "2");
    let c = checkpoint(&mut d.client(), "sb");
    assert_eq!((c.full_scan, c.scanned, c.changed), (Some(true), Some(2), 1));
    assert_eq!(d.status().sandboxes[0].watch, "not watching");
}

fn small_files_of_watched_checkpoints_are_packed_restored_and_freed(w: &'static str) {
    let (_serial, d, root) = watched_alone(20, w);
    let store = d.state_dir.join("store");
    let packs = || std::fs::read_dir(store.join("packs")).unwrap().count();
    let f = |i: usize| seeded(&root, i);
    // A full scan packs its small files only where the store cannot clone
    // (they are cloned, unread, where it can).
    let full_scan = match d.json(&["sandbox", "list"])["sandboxes"][0]["clone_method"].as_str() {
        Some("copy") => 1,
        _ => 0,
    };
    assert_eq!(packs(), full_scan, "packs after the first, full, checkpoint");
    let mut client = d.client();
    let mut ids = Vec::new();
    for round in 0..3 {
        for i in 0..20 {
            write(&f(i), format!("round {round} of f{i}"));
        }
        let c = checkpoint(&mut client, "sb");
        assert_eq!((c.full_scan, c.changed), (Some(false), 20), "{c:?}");
        ids.push(c.id);
    }
    assert_eq!(packs(), full_scan + 3, "one pack per watched checkpoint");
    assert!(crate::fixture::store_holds(&store, b"round 0 of f7"));
    // Restored out of the packs; the safety checkpoint finds its content
    // packed already and keeps no pack of its own.
    let report = d.rollback(&ids[1]);
    assert_eq!(report.restored, 20, "{report:?}");
    for i in 0..20 {
        assert_eq!(std::fs::read_to_string(f(i)).unwrap(), format!("round 1 of f{i}"));
    }
    assert_eq!(packs(), full_scan + 3);
    d.assert_verified();
    // Pruned down to the restore checkpoint (round 1's content, the
    // newest) and the safety checkpoint before it (round 2's, kept for
    // `undo`): the pack of round 0, and the full scan's, hold nothing live
    // and go.
    let pruned = d.json(&["prune", "sb", "--keep-last", "1"]);
    assert!(!pruned["pruned"].as_array().unwrap().is_empty(), "{pruned}");
    assert_eq!(packs(), 2, "{pruned}");
    assert!(!crate::fixture::store_holds(&store, b"round 0 of f7"));
    assert!(crate::fixture::store_holds(&store, b"round 1 of f7"));
    assert!(crate::fixture::store_holds(&store, b"round 2 of f7"));
    d.assert_verified();
    let kinds: Vec<String> = d.json(&["list", "sb"])["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(kinds.contains(&"restore".to_owned()) && kinds.contains(&"safety".to_owned()), "{kinds:?}");
}

fn a_never_checkpointed_sandbox_says_its_first_checkpoint_compares_everything(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let sb = d.path("fresh");
    write(&sb.join("f"), "x");
    d.add_sandbox("fresh", &sb, &[]);
    // Once the watch is in place, status says what is true of the next
    // checkpoint, not that the watch is still being set up.
    let watch = eventually(Duration::from_secs(10), Duration::from_millis(10), || {
        let w = d.status().sandboxes[0].watch.clone();
        if w == "starting" { Err(w) } else { Ok(w) }
    });
    assert!(watch.starts_with("needs full scan: changes before the watch started are unknown"), "{watch}");
    d.checkpoint("fresh");
    assert_eq!(d.status().sandboxes[0].watch, "watching");
    assert_watcher(&d, "fresh", w);
}

/// A sandbox `sb` whose directory `d` holds 51 files, checkpointed once.
fn storm_sandbox(d: &TestDaemon, others: &[&str]) -> (std::path::PathBuf, snapback::Client) {
    let root = d.path("sb");
    for i in 0..51 {
        write(&root.join(format!("d/f{i:02}")), format!("file {i}"));
    }
    for other in others {
        write(&root.join(other), "x");
    }
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    (root, client)
}

/// Renames `root/d` to `root/e` and back until stopped, pausing `pause`
/// after each (as a build tool or a package manager swaps a directory
/// into place); the thread returns how many renames it made.
fn rename_storm(
    root: &std::path::Path,
    pause: Duration,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<u64>) {
    use std::sync::atomic::Ordering;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stopped, root) = (stop.clone(), root.to_owned());
    let storm = std::thread::spawn(move || {
        let mut renames = 0u64;
        while !stopped.load(Ordering::Relaxed) {
            std::fs::rename(root.join("d"), root.join("e")).unwrap();
            std::thread::sleep(pause);
            std::fs::rename(root.join("e"), root.join("d")).unwrap();
            std::thread::sleep(pause);
            renames += 2;
        }
        renames
    });
    (stop, storm)
}

/// The most checkpoints asked for during a rename storm.
const STORM_ATTEMPTS: usize = 200;

fn checkpoints_taken_during_a_rename_storm_are_trees_that_existed(w: &'static str) {
    use std::sync::atomic::Ordering;
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let (root, mut client) = storm_sandbox(&d, &["other"]);
    assert_watcher(&d, "sb", w);
    let (stop, storm) = rename_storm(&root, Duration::from_millis(3));
    // Checkpoints every 20 ms: 45, and more until ten are taken. How many
    // answer `busy` follows the machine's load: of 45, a quiet machine took
    // 41-45, a run of the whole suite on two busy cores as few as 9. What
    // is checked is each taken checkpoint's tree, and that the storm does
    // not starve them.
    let (mut taken, mut busy) = (Vec::new(), 0);
    while (taken.len() + busy < 45 || taken.len() < 10) && taken.len() + busy < STORM_ATTEMPTS {
        std::thread::sleep(Duration::from_millis(20));
        match client.checkpoint(CheckpointRequest { sandbox: "sb".into(), ..Default::default() }) {
            Ok(c) => taken.push(c),
            Err(snapback::ClientError::Daemon(e)) if e.code == snapback::proto::ErrorCode::Busy => busy += 1,
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let renames = storm.join().unwrap();
    assert!(renames > 50, "the storm renamed only {renames} times");
    eprintln!("{} checkpoints, {busy} busy, during {renames} renames", taken.len());
    assert!(taken.len() >= 10, "only {} of {STORM_ATTEMPTS} checkpoints were taken ({busy} busy)", taken.len());
    // Each holds the directory, whole, under one of its two names.
    for c in &taken {
        assert_eq!((c.files, c.dirs), (52, 1), "checkpoint {} holds a tree that never existed: {c:?}", c.id);
    }
    let last = &taken[taken.len() - 1].id;
    d.rollback(last);
    let name = if root.join("d").exists() { "d" } else { "e" };
    assert_eq!(std::fs::read_dir(root.join(name)).unwrap().count(), 51);
}

fn a_tree_that_never_settles_gets_busy_and_nothing_is_recorded(w: &'static str) {
    use std::sync::atomic::Ordering;
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let (root, mut client) = storm_sandbox(&d, &[]);
    assert_watcher(&d, "sb", w);
    let count = || d.list(&["sb"]).len();
    let before = count();
    // Renames with no pause: no round of reading ever meets a quiet tree.
    let (stop, storm) = rename_storm(&root, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(50));
    // Five checkpoints, and more until one answers busy: on two loaded
    // cores the storm's thread can be kept off them for a whole
    // checkpoint (a CI run once saw five quiet ones in a row).
    let (mut asked, mut busy) = (0, 0);
    while asked < 5 || (busy == 0 && asked < STORM_ATTEMPTS) {
        asked += 1;
        match client.checkpoint(CheckpointRequest { sandbox: "sb".into(), ..Default::default() }) {
            Ok(c) => assert_eq!((c.files, c.dirs), (51, 1), "{c:?}"),
            Err(snapback::ClientError::Daemon(e)) => {
                assert_eq!(e.code, snapback::proto::ErrorCode::Busy, "{}", e.message);
                assert!(e.message.contains("kept changing"), "{}", e.message);
                busy += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    storm.join().unwrap();
    assert!(busy > 0, "the storm never made a checkpoint busy in {asked}");
    assert_eq!(count(), before + asked - busy, "a busy checkpoint left a record");
    // Quiet again: once the daemon has read the storm's backlog of events
    // (a barrier may time out meanwhile, which makes a round compare
    // everything again), a checkpoint holds the whole tree.
    let c = eventually(Duration::from_secs(60), Duration::from_millis(100), || {
        client.checkpoint(CheckpointRequest { sandbox: "sb".into(), ..Default::default() }).map_err(|e| e.to_string())
    });
    assert_eq!((c.files, c.dirs), (51, 1), "{c:?}");
}

/// A tree in `sb` where `a/x` and each of `b/NAME` for `names` are one file.
fn linked_tree(d: &TestDaemon, names: &[&str]) -> std::path::PathBuf {
    let root = d.path("sb");
    write(&root.join("a/x"), "one");
    std::fs::create_dir_all(root.join("b")).unwrap();
    for name in names {
        std::fs::hard_link(root.join("a/x"), root.join("b").join(name)).unwrap();
    }
    root
}

fn a_file_with_several_names_is_never_kept_stale(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let root = linked_tree(&d, &["y"]);
    // A name whose other link is outside the sandbox (a package store).
    write(&d.path("store-outside/z"), "outside one");
    std::fs::hard_link(d.path("store-outside/z"), root.join("z")).unwrap();
    write(&root.join("plain"), "p");
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    assert_watcher(&d, "sb", w);
    checkpoint(&mut client, "sb"); // watched from here on
    let rewrite = |p: &std::path::Path, text: &str| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    let c0 = checkpoint(&mut client, "sb");
    rewrite(&root.join("a/x"), "two, written through a/x");
    let c1 = checkpoint(&mut client, "sb");
    assert_eq!(c1.full_scan, Some(false));
    assert_eq!(changed(&d, &c0.id, &c1.id), ["a/x", "b/y"]);
    rewrite(&root.join("b/y"), "three, written through b/y");
    let c2 = checkpoint(&mut client, "sb");
    assert_eq!(changed(&d, &c1.id, &c2.id), ["a/x", "b/y"]);
    rewrite(&d.path("store-outside/z"), "outside two");
    let c3 = checkpoint(&mut client, "sb");
    assert_eq!(changed(&d, &c2.id, &c3.id), ["z"]);
    // What the checkpoints hold comes back.
    d.rollback(&c1.id);
    assert_eq!(std::fs::read_to_string(root.join("b/y")).unwrap(), "two, written through a/x");
    assert_eq!(std::fs::read_to_string(root.join("z")).unwrap(), "outside one");
}

/// A link made and removed between two checkpoints, and a file changed
/// through it: the file's own name got no event. fanotify gives the
/// changed file's handle, which finds it; inotify does not, and the
/// checkpoint compares everything. Either way it keeps what is there. A
/// file written and renamed, the way editors save, costs nothing of the
/// kind; a temporary file written and removed costs inotify a full
/// comparison, and fanotify none.
fn a_file_changed_through_a_link_that_is_gone_is_caught(w: &'static str) {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let root = d.path("sb");
    let compares_everything = Some(w == "inotify");
    for name in ["a", "b", "c", "d", "e"] {
        write(&root.join(name), format!("{name}, as it was"));
    }
    std::fs::create_dir_all(root.join("sub")).unwrap();
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    assert_watcher(&d, "sb", w);
    let before = checkpoint(&mut client, "sb");
    assert_eq!(before.full_scan, Some(false));
    let outside = d.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let through = |name: &str, link: &str| {
        std::fs::hard_link(root.join(name), root.join(link)).unwrap();
        root.join(link)
    };

    // Written through the link, which is then removed.
    let l = through("a", "sub/link-a");
    std::fs::write(&l, "a, written through a link").unwrap();
    std::fs::remove_file(&l).unwrap();
    // Its mode changed through the link, which then leaves the sandbox.
    let l = through("b", "link-b");
    std::fs::set_permissions(&l, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&l, outside.join("link-b")).unwrap();
    // Written through the link, which is renamed, and removed by its new name.
    let l = through("c", "link-c");
    std::fs::write(&l, "c, written through a link").unwrap();
    std::fs::rename(&l, root.join("sub/renamed")).unwrap();
    std::fs::remove_file(root.join("sub/renamed")).unwrap();
    // Written through the link, which a rename over it replaces.
    let l = through("d", "link-d");
    std::fs::write(&l, "d, written through a link").unwrap();
    std::os::unix::fs::symlink("anywhere", root.join("sub/new")).unwrap();
    std::fs::rename(root.join("sub/new"), &l).unwrap();
    let after = checkpoint(&mut client, "sb");
    assert_eq!(after.full_scan, compares_everything, "{after:?}");
    assert_eq!(changed(&d, &before.id, &after.id), ["a", "b", "c", "d", "link-d"]);
    d.assert_verified();

    // What it recorded comes back, after a rollback to before.
    d.rollback(&before.id);
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "a, as it was");
    d.rollback(&after.id);
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "a, written through a link");
    assert_eq!(std::fs::read_to_string(root.join("c")).unwrap(), "c, written through a link");
    assert_eq!(std::fs::read_to_string(root.join("d")).unwrap(), "d, written through a link");
    assert_eq!(std::fs::metadata(root.join("b")).unwrap().permissions().mode() & 0o777, 0o600);

    // An editor's save: written to a new name, renamed over the old one,
    // and a directory of written files renamed: nothing is gone.
    let base = checkpoint(&mut client, "sb");
    std::fs::write(root.join("e.tmp"), "e, saved").unwrap();
    std::fs::rename(root.join("e.tmp"), root.join("e")).unwrap();
    write(&root.join("build/out"), "built");
    std::fs::rename(root.join("build"), root.join("sub/build")).unwrap();
    let saved = checkpoint(&mut client, "sb");
    assert_eq!(saved.full_scan, Some(false), "{saved:?}");
    assert_eq!(changed(&d, &base.id, &saved.id), ["e", "sub/build", "sub/build/out"]);

    // A temporary file, written and removed.
    std::fs::write(root.join("scratch"), "for a moment").unwrap();
    std::fs::remove_file(root.join("scratch")).unwrap();
    let later = checkpoint(&mut client, "sb");
    assert_eq!(later.full_scan, compares_everything, "{later:?}");
    assert_eq!(later.changed, 0, "{later:?}");
}

/// A file written through a link, and the link replaced by another file
/// between the checkpoint's barrier and its reading: the checkpoint reads
/// the new file at that name, and the replacement's events, which come in
/// its next round, say the name lost a file, which must then be read under
/// its other name.
fn a_link_replaced_while_a_checkpoint_reads_is_caught(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).env("SNAPBACK_TEST_HOOKS", "1").start();
    let root = d.path("sb");
    write(&root.join("a"), "a, as it was");
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    assert_watcher(&d, "sb", w);
    let before = checkpoint(&mut client, "sb");
    std::fs::hard_link(root.join("a"), root.join("link")).unwrap();
    std::fs::write(root.join("link"), "a, written through a link").unwrap();

    let (pause, paused) = (d.state_dir.join("pause-before-scan"), d.state_dir.join("paused-before-scan"));
    std::fs::write(&pause, "").unwrap();
    let mut other = d.client();
    let taking = std::thread::spawn(move || checkpoint(&mut other, "sb"));
    eventually(Duration::from_secs(30), Duration::from_millis(5), || {
        if paused.exists() { Ok(()) } else { Err("the checkpoint did not pause before its scan".to_string()) }
    });
    std::fs::remove_file(root.join("link")).unwrap();
    std::fs::write(root.join("link"), "another file").unwrap();
    std::fs::remove_file(&pause).unwrap();
    let after = taking.join().unwrap();

    assert_eq!(changed(&d, &before.id, &after.id), ["a", "link"], "{after:?}");
    d.assert_verified();
    d.rollback(&before.id);
    d.rollback(&after.id);
    assert_eq!(std::fs::read_to_string(root.join("a")).unwrap(), "a, written through a link");
    assert_eq!(std::fs::read_to_string(root.join("link")).unwrap(), "another file");
}

/// Names that sort between a directory and its entries (`d.txt`, `d (1)`
/// between `d` and `d/x`) changed with the directory and its entries: each
/// path is compared once, and the checkpoint records them all.
fn a_removed_directory_and_its_neighbours_are_each_compared_once(w: &'static str) {
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let root = d.path("sb");
    for name in ["d/x", "d/sub/y", "d.txt", "d (1)/z"] {
        write(&root.join(name), "first");
    }
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    checkpoint(&mut client, "sb");
    assert_watcher(&d, "sb", w);
    let base = checkpoint(&mut client, "sb");
    for name in ["d/x", "d/sub/y", "d.txt", "d (1)/z"] {
        write(&root.join(name), "second");
    }
    std::fs::remove_dir_all(root.join("d")).unwrap();
    let after = checkpoint(&mut client, "sb");
    assert_eq!((after.files, after.dirs), (2, 1), "{after:?}");
    assert_eq!(changed(&d, &base.id, &after.id), ["d", "d (1)/z", "d.txt", "d/sub", "d/sub/y", "d/x"]);
    d.rollback(&base.id);
    assert_eq!(std::fs::read_to_string(root.join("d/sub/y")).unwrap(), "first");
}

fn names_of_one_file_come_back_as_one_file(w: &'static str) {
    use std::os::unix::fs::MetadataExt;
    let _serial = serial();
    let d = TestDaemon::builder().watcher(w).start();
    let root = linked_tree(&d, &["y", "z"]);
    write(&root.join("p"), "apart");
    write(&root.join("q"), "apart");
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    let c1 = checkpoint(&mut client, "sb");
    assert_watcher(&d, "sb", w);
    let ino = |p: &str| std::fs::symlink_metadata(root.join(p)).unwrap().ino();
    let one_file = |names: &[&str]| names.iter().all(|n| ino(n) == ino(names[0]));
    // An editor's save through one name: a new file, no longer linked.
    write(&root.join("a/x.tmp"), "two");
    std::fs::rename(root.join("a/x.tmp"), root.join("a/x")).unwrap();
    // A copy of one name over another: the content holds, the link goes.
    std::fs::remove_file(root.join("b/z")).unwrap();
    std::fs::copy(root.join("b/y"), root.join("b/z")).unwrap();
    // Two apart files joined.
    std::fs::remove_file(root.join("q")).unwrap();
    std::fs::hard_link(root.join("p"), root.join("q")).unwrap();
    let c2 = checkpoint(&mut client, "sb");
    assert!(!one_file(&["a/x", "b/y"]) && !one_file(&["b/y", "b/z"]) && one_file(&["p", "q"]));
    let report = d.rollback(&c1.id);
    assert!(one_file(&["a/x", "b/y", "b/z"]), "{report:?}");
    assert_eq!(std::fs::metadata(root.join("b/z")).unwrap().nlink(), 3);
    assert_eq!(std::fs::read_to_string(root.join("b/z")).unwrap(), "one");
    assert!(!one_file(&["p", "q"]), "names the checkpoint held apart are apart again");
    // The state the rollback left is recorded as one file too: a rollback
    // to c2 and back brings the same links.
    d.rollback(&c2.id);
    assert!(!one_file(&["a/x", "b/y"]) && one_file(&["p", "q"]));
    d.rollback(&c1.id);
    assert!(one_file(&["a/x", "b/y", "b/z"]));
    // Content written through one name changes every name, and a rollback
    // brings it back under every name, still one file.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(root.join("b/y")).unwrap();
        f.write_all(b"three, through b/y").unwrap();
    }
    checkpoint(&mut client, "sb");
    d.rollback(&c1.id);
    assert!(one_file(&["a/x", "b/y", "b/z"]));
    assert_eq!(std::fs::read_to_string(root.join("a/x")).unwrap(), "one");
    // An export holds them as one file of its own, not the store's.
    let out = d.path("export");
    d.json(&["export", &c1.id, out.to_str().unwrap()]);
    let exported = |p: &str| std::fs::symlink_metadata(out.join(p)).unwrap();
    assert_eq!(exported("a/x").ino(), exported("b/y").ino());
    assert_eq!(exported("a/x").ino(), exported("b/z").ino());
    assert_eq!(exported("a/x").nlink(), 3);
    assert_ne!(exported("p").ino(), exported("q").ino());
    assert_eq!(std::fs::read_to_string(out.join("b/z")).unwrap(), "one");
}
