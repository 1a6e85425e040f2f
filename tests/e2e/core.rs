//! Checkpoint, diff and rollback of whole trees.

use std::ffi::OsStr;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use crate::fixture::{TestDaemon, eventually, object_count, write};
use crate::tree::{Node, assert_same, snapshot};

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Builds the tree of the issue: nested and empty directories, four modes
/// (one that a usual umask takes bits off), relative, absolute and dangling
/// symlinks, a non-UTF-8 name, a name with a newline, a 50 MiB file and a
/// sparse 1 GiB file with a few KiB of data.
fn build_rich_tree(root: &Path) {
    write(&root.join("src/lib/deep/mod.rs"), b"pub fn deep() {}\n");
    write(&root.join("src/main.rs"), b"fn main() {}\n");
    std::fs::create_dir_all(root.join("empty/also-empty")).unwrap();
    write(&root.join("secret.key"), b"0600 secret\n");
    chmod(&root.join("secret.key"), 0o600);
    write(&root.join("run.sh"), b"#!/bin/sh\necho hi\n");
    chmod(&root.join("run.sh"), 0o755);
    write(&root.join("notes.txt"), b"0644 notes\n");
    chmod(&root.join("notes.txt"), 0o644);
    write(&root.join("shared.txt"), b"0666 shared\n");
    chmod(&root.join("shared.txt"), 0o666);
    symlink("src/main.rs", root.join("rel-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    write(&root.join(OsStr::from_bytes(b"caf\xe9-latin1.txt")), b"not utf-8 name\n");
    write(&root.join("line\nbreak.txt"), b"newline in name\n");
    let big: Vec<u8> = (0..50u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    write(&root.join("big.bin"), &big);
    let mut sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.write_all(b"header").unwrap();
    sparse.seek(SeekFrom::Start(512 << 20)).unwrap();
    sparse.write_all(&[0xAB; 4096]).unwrap();
    sparse.set_len(1 << 30).unwrap();
    // A read-only directory must still be restorable into.
    write(&root.join("ro/inside.txt"), b"inside a 0555 directory\n");
    chmod(&root.join("ro"), 0o555);
}

/// Applies every kind of change: edits, deletions, creations, chmods, a
/// renamed directory and file/dir/symlink type changes in each direction.
fn mutate(root: &Path) {
    write(&root.join("src/main.rs"), b"fn main() { println!(\"changed\"); }\n");
    std::fs::remove_file(root.join("notes.txt")).unwrap();
    std::fs::remove_file(root.join("shared.txt")).unwrap();
    write(&root.join("new/dir/created.txt"), b"created after\n");
    chmod(&root.join("run.sh"), 0o644);
    chmod(&root.join("secret.key"), 0o640);
    std::fs::rename(root.join("src/lib"), root.join("src/library")).unwrap();
    // file -> dir
    std::fs::remove_file(root.join("secret.key")).unwrap();
    write(&root.join("secret.key/now-a-dir"), b"x");
    // dir -> symlink
    std::fs::remove_dir_all(root.join("empty")).unwrap();
    symlink("src", root.join("empty")).unwrap();
    // symlink -> file
    std::fs::remove_file(root.join("rel-link")).unwrap();
    write(&root.join("rel-link"), b"was a symlink\n");
    // dir -> file
    chmod(&root.join("ro"), 0o755);
    std::fs::remove_dir_all(root.join("ro")).unwrap();
    write(&root.join("ro"), b"was a directory\n");
    // content of the big file, same size
    let mut f = std::fs::OpenOptions::new().write(true).open(root.join("big.bin")).unwrap();
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.write_all(b"patched in place").unwrap();
}

fn allocated_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn rich_tree_comes_back_exactly_through_rollbacks_and_undo() {
    let d = TestDaemon::start();
    let root = d.path("sandbox");
    std::fs::create_dir_all(&root).unwrap();
    build_rich_tree(&root);
    d.add_sandbox("rich", &root, &[]);
    let a = d.checkpoint("rich");
    let tree_a = snapshot(&root);

    mutate(&root);
    let b = d.checkpoint("rich");
    let tree_b = snapshot(&root);
    assert_ne!(tree_a, tree_b);

    let diff = d.json(&["diff", &a, &b]);
    let changes = diff["changes"].as_array().unwrap();
    let kind_of = |p: &str| {
        changes
            .iter()
            .find(|c| c["path"]["text"] == p)
            .map(|c| c["change"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{p} missing from the diff: {diff}"))
    };
    assert_eq!(kind_of("src/main.rs"), "modified");
    assert_eq!(kind_of("notes.txt"), "deleted");
    assert_eq!(kind_of("new/dir/created.txt"), "added");
    assert_eq!(kind_of("secret.key"), "type_changed");
    assert_eq!(kind_of("empty"), "type_changed");
    assert_eq!(kind_of("rel-link"), "type_changed");
    assert_eq!(kind_of("run.sh"), "modified");
    assert_eq!(kind_of("big.bin"), "modified");

    let r1 = d.rollback(&a);
    assert_same(&snapshot(&root), &tree_a, "after rolling back to A");
    assert!(r1.restored > 0);
    assert!(r1.created > 0);
    assert!(r1.deleted > 0);
    assert!(allocated_bytes(&root.join("sparse.img")) < 16 << 20, "the sparse file came back dense");

    let r2 = d.rollback(&b);
    assert_same(&snapshot(&root), &tree_b, "after rolling back to B");

    // Undo the second rollback through its safety checkpoint: back to A.
    let safety = r2.safety_checkpoint.clone().unwrap();
    let shown = d.json(&["show", &safety]);
    assert_eq!(shown["kind"], "safety");
    d.rollback(&safety);
    assert_same(&snapshot(&root), &tree_a, "after undoing the rollback to B");

    // Nothing differs any more from A.
    let live = d.json(&["diff", &a]);
    assert_eq!(live["changes"].as_array().unwrap().len(), 0, "{live}");
    chmod(&root.join("ro"), 0o755); // let the temporary directory be removed
}

#[test]
fn an_in_place_rewrite_keeping_size_and_mtime_is_captured() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("f.txt"), b"aaaa");
    d.add_sandbox("sb", &root, &[]);
    let first = d.checkpoint("sb");
    let mtime = std::fs::metadata(root.join("f.txt")).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let f = std::fs::OpenOptions::new().write(true).open(root.join("f.txt")).unwrap();
    (&f).write_all(b"bbbb").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(root.join("f.txt")).unwrap().modified().unwrap(), mtime);
    let second = d.json(&["checkpoint", "sb"]);
    assert_eq!(second["changed"], 1, "{second}");
    d.rollback(&first);
    assert_eq!(std::fs::read(root.join("f.txt")).unwrap(), b"aaaa");
}

#[test]
fn rapid_rewrites_right_after_a_checkpoint_are_not_missed() {
    // Racy timestamps: a change within the same clock tick as the scan must
    // still be seen by the next checkpoint.
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("f"), b"0");
    d.add_sandbox("sb", &root, &[]);
    let mut client = d.client();
    let mut taken = Vec::new();
    for i in 0..50u32 {
        let content = format!("{i:04}");
        std::fs::write(root.join("f"), &content).unwrap();
        let c = client
            .checkpoint(snapback::proto::CheckpointRequest { sandbox: "sb".into(), ..Default::default() })
            .unwrap();
        taken.push((c.id, content));
    }
    for (id, content) in taken.iter().rev().step_by(7) {
        d.rollback(id);
        assert_eq!(std::fs::read_to_string(root.join("f")).unwrap(), *content, "checkpoint {id}");
    }
}

#[test]
fn a_fifo_does_not_hang_a_checkpoint() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("f"), b"data");
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    d.add_sandbox("sb", &root, &[]);
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = d.socket.clone();
    std::thread::spawn(move || {
        let mut c = snapback::Client::connect(&socket).unwrap();
        let r = c.checkpoint(snapback::proto::CheckpointRequest { sandbox: "sb".into(), ..Default::default() });
        let _ = tx.send(r.map(|c| c.id));
    });
    let id = rx.recv_timeout(Duration::from_secs(60)).expect("the checkpoint hung on a FIFO").unwrap();
    std::fs::remove_file(root.join("pipe")).unwrap();
    d.rollback(&id);
    let meta = std::fs::symlink_metadata(root.join("pipe")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()), "the FIFO was not recreated");
}

#[test]
fn excluded_paths_are_neither_captured_nor_touched() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("src/a.c"), b"int a;\n");
    write(&root.join("src/a.o"), b"object v1");
    write(&root.join("build/out/bin"), b"binary v1");
    d.add_sandbox("sb", &root, &["--exclude", "*.o", "--exclude", "build/out"]);
    let c = d.checkpoint("sb");
    let shown = d.json(&["show", &c]);
    assert_eq!(shown["files"], 1, "excluded files were captured: {shown}");

    write(&root.join("src/a.o"), b"object v2");
    write(&root.join("build/out/bin"), b"binary v2");
    write(&root.join("build/out/new"), b"new");
    write(&root.join("src/b.o"), b"new object");
    write(&root.join("src/a.c"), b"int a = 2;\n");
    // A directory created after the checkpoint that holds only an excluded
    // file cannot be removed without touching it: it stays.
    write(&root.join("gen/x.o"), b"generated");
    let diff = d.json(&["diff", &c]);
    let paths: Vec<&str> =
        diff["changes"].as_array().unwrap().iter().map(|c| c["path"]["text"].as_str().unwrap()).collect();
    assert_eq!(paths, vec!["gen", "src/a.c"], "{diff}");

    let r = d.rollback(&c);
    assert_eq!(std::fs::read(root.join("src/a.c")).unwrap(), b"int a;\n");
    assert_eq!(std::fs::read(root.join("src/a.o")).unwrap(), b"object v2");
    assert_eq!(std::fs::read(root.join("build/out/bin")).unwrap(), b"binary v2");
    assert_eq!(std::fs::read(root.join("build/out/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(root.join("src/b.o")).unwrap(), b"new object");
    assert_eq!(std::fs::read(root.join("gen/x.o")).unwrap(), b"generated");
    assert_eq!(r.skipped[0].display(), "gen", "{r:?}");
}

#[test]
fn writing_into_a_live_file_never_changes_a_checkpoint() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("data.bin"), [1u8; 256 * 1024]);
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    // Overwrite in place, same inode, same size.
    let mut f = std::fs::OpenOptions::new().write(true).open(root.join("data.bin")).unwrap();
    f.write_all(&[2u8; 256 * 1024]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    d.rollback(&c);
    assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), vec![1u8; 256 * 1024]);
    // And after the rollback, writing into the restored file leaves the
    // checkpoint intact too.
    let mut f = std::fs::OpenOptions::new().write(true).open(root.join("data.bin")).unwrap();
    f.write_all(&[3u8; 1024]).unwrap();
    drop(f);
    d.rollback(&c);
    assert_eq!(std::fs::read(root.join("data.bin")).unwrap(), vec![1u8; 256 * 1024]);
}

#[test]
fn a_file_is_restored_in_place_unless_another_name_would_see_it() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("lone.txt"), "lone, as checkpointed");
    write(&root.join("linked.txt"), "linked, as checkpointed");
    write(&root.join("short.txt"), "short, as checkpointed");
    chmod(&root.join("lone.txt"), 0o600);
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    // A second name for linked.txt, outside the sandbox: a restore must
    // never write through it.
    let outside = d.path("outside-name");
    std::fs::hard_link(root.join("linked.txt"), &outside).unwrap();
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (lone_ino, linked_ino) = (ino(&root.join("lone.txt")), ino(&root.join("linked.txt")));
    let short_ino = ino(&root.join("short.txt"));
    // Rewritten in place (same inodes): longer, with another mode; shorter.
    write(&root.join("lone.txt"), "lone, rewritten by the agent, and longer");
    chmod(&root.join("lone.txt"), 0o644);
    write(&root.join("short.txt"), "s");
    write(&root.join("linked.txt"), "linked, rewritten");
    let r = d.rollback(&c);
    assert_eq!(r.restored, 3, "{r:?}");
    assert_eq!(std::fs::read(root.join("short.txt")).unwrap(), b"short, as checkpointed");
    assert_eq!(ino(&root.join("short.txt")), short_ino);
    let lone = std::fs::metadata(root.join("lone.txt")).unwrap();
    assert_eq!(std::fs::read(root.join("lone.txt")).unwrap(), b"lone, as checkpointed");
    assert_eq!(lone.mode() & 0o7777, 0o600);
    assert_eq!(lone.ino(), lone_ino, "a file with one name is rewritten in place");
    assert_eq!(std::fs::read(root.join("linked.txt")).unwrap(), b"linked, as checkpointed");
    assert_ne!(ino(&root.join("linked.txt")), linked_ino, "a file with two names is replaced");
    assert_eq!(std::fs::read(&outside).unwrap(), b"linked, rewritten", "the other name was written through");
    assert_eq!(ino(&outside), linked_ino);
}

#[test]
fn a_running_program_in_the_sandbox_is_replaced_not_written_into() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    let program = root.join("tool");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy("/bin/true", &program).unwrap();
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    // The agent replaces the tool, in place, and runs it: the kernel then
    // refuses to open its file for writing (ETXTBSY).
    std::fs::write(&program, std::fs::read("/bin/sleep").unwrap()).unwrap();
    chmod(&program, 0o755);
    let mut running = std::process::Command::new(&program).arg("30").spawn().expect("running the tool");
    let r = d.rollback(&c);
    let _ = running.kill();
    let _ = running.wait();
    assert_eq!(r.restored, 1, "{r:?}");
    assert_eq!(std::fs::read(&program).unwrap(), std::fs::read("/bin/true").unwrap());
}

#[test]
fn dry_run_touches_nothing_and_path_restores_only_what_is_named() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("keep/a"), b"a1");
    write(&root.join("keep/b"), b"b1");
    write(&root.join("dir/x"), b"x1");
    write(&root.join("dir/sub/y"), b"y1");
    write(&root.join("top"), b"t1");
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    write(&root.join("keep/a"), b"a2");
    write(&root.join("keep/b"), b"b2");
    std::fs::remove_dir_all(root.join("dir")).unwrap();
    write(&root.join("top"), b"t2");
    write(&root.join("extra"), b"e");
    let before = snapshot(&root);

    let dry = d.json(&["rollback", &c, "--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["restored"], 3, "{dry}");
    assert_eq!(dry["created"], 4, "{dry}");
    assert_eq!(dry["deleted"], 1, "{dry}");
    assert!(dry["safety_checkpoint"].is_null());
    assert_same(&snapshot(&root), &before, "after a dry run");
    let listed = d.json(&["list", "sb"]);
    assert_eq!(listed["checkpoints"].as_array().unwrap().len(), 1, "a dry run took a checkpoint");

    let r = d.json(&["rollback", &c, "--path", "keep/a", "--path", "dir/"]);
    assert_eq!(r["created"], 4, "dir, dir/x, dir/sub, dir/sub/y: {r}");
    assert_eq!(r["restored"], 1, "keep/a: {r}");
    assert_eq!(std::fs::read(root.join("keep/a")).unwrap(), b"a1");
    assert_eq!(std::fs::read(root.join("keep/b")).unwrap(), b"b2");
    assert_eq!(std::fs::read(root.join("dir/sub/y")).unwrap(), b"y1");
    assert_eq!(std::fs::read(root.join("top")).unwrap(), b"t2");
    assert!(root.join("extra").exists());

    // An absolute path below the root works too; one outside is refused.
    let abs = root.join("top");
    d.json(&["rollback", &c, "--path", abs.to_str().unwrap()]);
    assert_eq!(std::fs::read(root.join("top")).unwrap(), b"t1");
    let out = d.cli(&["rollback", &c, "--path", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn list_show_and_prefixes() {
    let d = TestDaemon::start();
    let one = d.path("one");
    let two = d.path("two");
    write(&one.join("f"), b"1");
    write(&two.join("f"), b"2");
    d.add_sandbox("one", &one, &[]);
    d.add_sandbox("two", &two, &[]);
    let a = d.json(&[
        "checkpoint",
        "one",
        "--plan",
        "p1",
        "--reason",
        "first",
        "--tool",
        "Edit",
        "--phase",
        "pre",
        "--label",
        "k=v",
    ]);
    assert_eq!(a["kind"], "tool");
    assert_eq!(a["labels"]["k"], "v");
    d.json(&["checkpoint", "one", "--plan", "p2"]);
    d.json(&["checkpoint", one.to_str().unwrap()]); // by path
    d.json(&["checkpoint", "two", "--plan", "p3"]);
    // A plan belongs to the sandbox of its first checkpoint.
    assert_eq!(d.cli(&["checkpoint", "two", "--plan", "p1"]).status.code(), Some(1));
    d.json(&["checkpoint", "one", "--plan", "p1"]);
    assert_eq!(d.list(&[]).len(), 5);
    assert_eq!(d.list(&["one"]).len(), 4);
    assert_eq!(d.list(&["--plan", "p1"]).len(), 2);
    assert_eq!(d.list(&["two", "--plan", "p3"]).len(), 1);
    assert_eq!(d.list(&["two", "--plan", "p1"]).len(), 0);

    let id = a["id"].as_str().unwrap();
    let shown = d.json(&["show", &id[..20].to_lowercase()]);
    assert_eq!(shown["id"], id);
    assert_eq!(shown["files"], 1);
    assert_eq!(shown["bytes"], 1);
    assert_eq!(shown["reason"], "first");
    assert_eq!(shown["tool"], "Edit");
    assert_eq!(shown["phase"], "pre");
    assert_eq!(shown["parent"], serde_json::Value::Null);
    let second = d.json(&["list", "one"])["checkpoints"][1].clone();
    assert_eq!(second["parent"], id);

    // Every checkpoint id starts with the same few characters of time.
    let out = d.cli(&["show", &id[..2], "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("more than one"), "{err}");
}

#[test]
fn sandboxes_list_their_clone_method_and_can_be_removed() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("f"), b"x");
    let added = d.add_sandbox("sb", &root, &[]);
    assert!(["reflink", "copy"].contains(&added["clone_method"].as_str().unwrap()));
    assert!(!added["clone_note"].as_str().unwrap().is_empty());
    let c = d.checkpoint("sb");
    let list = d.json(&["sandbox", "list"]);
    assert_eq!(list["sandboxes"][0]["clone_method"], added["clone_method"]);
    assert_eq!(list["sandboxes"][0]["checkpoints"], 1);

    d.json(&["sandbox", "remove", "sb"]);
    let out = d.cli(&["checkpoint", "sb"]);
    assert_eq!(out.status.code(), Some(1), "a removed sandbox took a checkpoint");
    assert_eq!(d.json(&["show", &c])["id"], c.as_str(), "checkpoints are kept without --purge");
    d.add_sandbox("sb", &root, &[]);
    d.checkpoint("sb");
    d.json(&["sandbox", "remove", "sb", "--purge"]);
    assert_eq!(d.cli(&["show", &c]).status.code(), Some(1));
    assert_eq!(object_count(&d.state_dir.join("store")), 0, "purge left objects behind");
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"x", "the sandbox directory was touched");
}

#[test]
fn changes_made_while_the_daemon_was_stopped_are_captured() {
    let mut d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("f"), b"before");
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    d.stop();
    write(&root.join("f"), b"during");
    write(&root.join("g"), b"new");
    d.restart();
    let after = d.json(&["checkpoint", "sb"]);
    assert_eq!(after["changed"], 2);
    d.rollback(&c);
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"before");
    assert!(!root.join("g").exists());
}

#[test]
fn objects_are_shared_when_files_do_not_change() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    for i in 0..50 {
        write(&root.join(format!("d{}/f{i}", i % 5)), format!("content {i}").as_bytes());
    }
    d.add_sandbox("sb", &root, &[]);
    d.checkpoint("sb");
    let count_objects = || object_count(&d.state_dir.join("store"));
    assert_eq!(count_objects(), 50);
    let unchanged = d.json(&["checkpoint", "sb"]);
    assert_eq!(unchanged["changed"], 0);
    write(&root.join("d0/f0"), b"changed");
    d.checkpoint("sb");
    assert_eq!(count_objects(), 51, "an unchanged file was stored again");
    // The catalogue holds one version per change, not one per checkpoint.
    let conn = rusqlite_count(&d.state_dir.join("catalogue.db"));
    assert_eq!(conn, 50 + 5 + 1, "50 files, 5 directories, 1 new version");
    if let Node::File { .. } = snapshot(&root)[&b"d0/f0".to_vec()] {
    } else {
        panic!("d0/f0 is not a file");
    }
}

#[test]
fn the_catalogue_log_is_copied_back_once_a_request_is_answered() {
    // The daemon's thread of its own copies the write-ahead log back into
    // the database file, started once the request that wrote has been
    // answered. Without it, the log would only grow.
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("x.txt"), "a");
    d.add_sandbox("sb", &root, &[]);
    let id = d.checkpoint("sb");
    // The database file alone, as if there were no log.
    let uri = format!("file:{}?immutable=1", d.state_dir.join("catalogue.db").display());
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
    eventually(Duration::from_secs(10), Duration::from_millis(10), || {
        let conn = rusqlite::Connection::open_with_flags(&uri, flags).map_err(|e| e.to_string())?;
        let found: i64 = conn
            .query_row("SELECT count(*) FROM checkpoints WHERE id = ?1", [&id], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if found == 1 { Ok(()) } else { Err(format!("checkpoint {id} is still only in the log")) }
    });
}

fn rusqlite_count(db: &Path) -> i64 {
    let conn = snapback_daemon::testing::connect_catalogue(db).unwrap();
    conn.query_row("SELECT count(*) FROM entries", [], |r| r.get(0)).unwrap()
}

#[test]
fn the_restore_checkpoint_written_after_the_answer_is_seen_by_the_next_request() {
    // A rollback's `restore` checkpoint is written after its answer. With
    // the daemon's own background writer held back by a test hook, the
    // requests that come next write it first: `list` shows it, and the
    // next checkpoint follows it.
    let d = TestDaemon::builder().env("SNAPBACK_TEST_HOOKS", "1").start();
    let sb = d.path("sb");
    write(&sb.join("f"), "a");
    d.add_sandbox("sb", &sb, &[]);
    let c1 = d.checkpoint("sb");
    write(&sb.join("f"), "b");
    write(&sb.join("new"), "made after c1");
    let held = d.state_dir.join("hold-records");
    std::fs::write(&held, b"").unwrap();
    let restore = d.rollback(&c1).restore_checkpoint.expect("a restore checkpoint");
    let listed = d.list(&["sb"]);
    let last = listed.last().unwrap();
    assert_eq!((&last.id, last.kind), (&restore, snapback::proto::CheckpointKind::Restore), "{listed:?}");
    write(&sb.join("f"), "c");
    let next: snapback::proto::CheckpointInfo = d.answer(&["checkpoint", "sb"]);
    assert_eq!((next.parent.as_deref(), next.changed), (Some(restore.as_str()), 1), "{next:?}");
    std::fs::remove_file(&held).unwrap();
    d.assert_verified();
}

#[test]
fn the_step_after_a_rollback_holds_that_step_only() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    write(&sb.join("f1"), "a");
    write(&sb.join("f2"), "a");
    d.add_sandbox("sb", &sb, &[]);
    let c1 = d.checkpoint("sb");
    write(&sb.join("f1"), "b");
    write(&sb.join("new"), "made after c1");
    d.checkpoint("sb");
    let r = d.rollback(&c1);
    let restore = r.restore_checkpoint.clone().expect("a restore checkpoint");
    let texts = |paths: &[snapback::proto::WirePath]| -> Vec<String> { paths.iter().map(|p| p.display()).collect() };
    assert_eq!(
        (texts(&r.restored_paths), texts(&r.created_paths), texts(&r.removed)),
        (vec!["f1".to_owned()], vec![], vec!["new".to_owned()])
    );

    // The restored state is the head: a checkpoint with nothing changed
    // says so, and the next step is that step alone.
    let listed = d.json(&["list", "sb"]);
    let head = listed["checkpoints"].as_array().unwrap().iter().find(|c| c["id"] == restore).cloned().unwrap();
    assert_eq!((head["kind"].as_str(), head["changed"].as_u64()), (Some("restore"), Some(2)), "{head}");
    assert_eq!(d.json(&["checkpoint", "sb"])["changed"], 0);
    write(&sb.join("f2"), "c");
    let c3 = d.json(&["checkpoint", "sb"]);
    assert_eq!(c3["changed"], 1, "only f2 changed: {c3}");
    let rev = d.json(&["revert", c3["id"].as_str().unwrap()]);
    assert_eq!(rev["changed"].as_array().unwrap().len(), 1, "{rev}");
    assert_eq!(std::fs::read_to_string(sb.join("f1")).unwrap(), "a", "the revert left the rollback's f1");
    assert_eq!(std::fs::read_to_string(sb.join("f2")).unwrap(), "a");

    // Undo still goes back to the state before the last restore (the
    // revert), and says what it discards.
    let undo = d.cli(&["undo", "sb"]);
    let text = String::from_utf8_lossy(&undo.stdout);
    assert!(undo.status.success(), "{}", String::from_utf8_lossy(&undo.stderr));
    assert!(text.contains("undid the last restore of sb") && text.contains("discarded"), "{text}");
    assert_eq!(std::fs::read_to_string(sb.join("f2")).unwrap(), "c");
    // And a rollback's human output marks each path by what happened to it.
    write(&sb.join("later"), "x");
    let out = d.cli(&["rollback", &c1]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rolled back sb to") && text.contains("  - later") && text.contains("  ~ f2"), "{text}");
    std::fs::remove_file(sb.join("f1")).unwrap();
    let text = String::from_utf8_lossy(&d.cli(&["rollback", &c1]).stdout).into_owned();
    assert!(text.contains("  + f1"), "{text}");
}

/// Bytes the process has read through system calls (`rchar` of
/// `/proc/PID/io`).
fn bytes_read(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

/// CPU seconds the process has used (`utime + stime` of
/// `/proc/PID/stat`, in clock ticks of 1/100 s).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // Fields 14 and 15 of the whole line; the name was field 2.
    (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64 / 100.0
}

#[test]
fn a_terabyte_sparse_file_costs_its_data_not_its_size() {
    const TIB: u64 = 1 << 40;
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    let big = sb.join("sparse.img");
    let mut f = std::fs::File::create(&big).unwrap();
    for (off, data) in [(0u64, &b"head"[..]), (TIB / 2, b"middle"), (TIB - 4096, b"tail")] {
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(data).unwrap();
    }
    f.set_len(TIB).unwrap();
    drop(f);
    d.add_sandbox("sb", &sb, &[]);
    // Reading it as its apparent size would be a terabyte of zeros.
    // A bound on the work, far from both: 12 KiB of data is milliseconds,
    // a terabyte of zeros hashed is minutes of CPU.
    let (before, cpu) = (bytes_read(d.pid()), cpu_seconds(d.pid()));
    let c = d.checkpoint("sb");
    let read = bytes_read(d.pid()) - before;
    assert!(read < 64 << 20, "the checkpoint read {read} bytes of a file with 12 KiB of data");
    let used = cpu_seconds(d.pid()) - cpu;
    assert!(used < 20.0, "the checkpoint used {used} s of CPU");

    let mut f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
    f.seek(SeekFrom::Start(TIB / 4)).unwrap();
    f.write_all(b"changed").unwrap();
    drop(f);
    let (before, cpu) = (bytes_read(d.pid()), cpu_seconds(d.pid()));
    d.rollback(&c);
    let out = d.path("export");
    d.json(&["export", &c, out.to_str().unwrap()]);
    let read = bytes_read(d.pid()) - before;
    assert!(read < 64 << 20, "the rollback and export read {read} bytes");
    let used = cpu_seconds(d.pid()) - cpu;
    assert!(used < 20.0, "the rollback and export used {used} s of CPU");
    for p in [&big, &out.join("sparse.img")] {
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(meta.len(), TIB);
        assert!(meta.blocks() * 512 < 16 << 20, "{} takes {} blocks", p.display(), meta.blocks());
        let mut f = std::fs::File::open(p).unwrap();
        let mut at = |off: u64, n: usize| {
            let mut buf = vec![0u8; n];
            f.seek(SeekFrom::Start(off)).unwrap();
            std::io::Read::read_exact(&mut f, &mut buf).unwrap();
            buf
        };
        assert_eq!(at(TIB / 2, 6), b"middle");
        assert_eq!(at(TIB / 4, 7), vec![0u8; 7], "the change was rolled back");
        assert_eq!(at(TIB - 4096, 4), b"tail");
    }
    let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755));
}

/// Opens (creating, with `mkdir`) the directories `names` below `top`, one
/// name per call: a path longer than PATH_MAX cannot be handed to one.
fn deep_dir(top: &Path, names: &[Vec<u8>], create: bool) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut dir = OwnedFd::from(std::fs::File::open(top).unwrap());
    for name in names {
        let c = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: plain syscalls on a valid C string and a dir fd we own.
        unsafe {
            if create {
                libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755);
            }
            let fd = libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
            assert!(fd >= 0, "open {}", String::from_utf8_lossy(name));
            dir = OwnedFd::from_raw_fd(fd);
        }
    }
    dir
}

/// Reads the file `name` in the directory `dir`.
fn read_in(dir: &std::os::fd::OwnedFd, name: &str) -> String {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: openat on a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "open {name}");
    std::io::read_to_string(unsafe { std::fs::File::from_raw_fd(fd) }).unwrap()
}

#[test]
fn a_path_deeper_than_path_max_is_restored_and_exported() {
    use std::os::fd::AsRawFd;
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    let names: Vec<Vec<u8>> = (0..30).map(|i| format!("{i:02}{}", "d".repeat(200)).into_bytes()).collect();
    let depth: usize = names.iter().map(|n| n.len() + 1).sum();
    assert!(depth > 6000, "{depth}");
    let bottom = deep_dir(&sb, &names, true);
    let c = std::ffi::CString::new("deep.txt").unwrap();
    // SAFETY: openat on a valid C string; the fd is owned by the File.
    let fd = unsafe { libc::openat(bottom.as_raw_fd(), c.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644) };
    assert!(fd >= 0);
    // SAFETY: fd is a new descriptor we own.
    std::io::Write::write_all(&mut unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }, b"bottom")
        .unwrap();
    d.add_sandbox("sb", &sb, &[]);
    let c1 = d.checkpoint("sb");
    assert!(d.json(&["show", &c1])["files"].as_u64() == Some(1));
    std::fs::remove_dir_all(sb.join(OsStr::from_bytes(&names[0]))).unwrap();
    let r = d.rollback(&c1);
    assert_eq!(r.created, 31, "{r:?}");
    assert_eq!(read_in(&deep_dir(&sb, &names, false), "deep.txt"), "bottom");
    let out = d.path("export");
    d.json(&["export", &c1, out.to_str().unwrap()]);
    assert_eq!(read_in(&deep_dir(&out, &names, false), "deep.txt"), "bottom");
    // The export's directories are read-only: let the test's cleanup in.
    let mut dir = deep_dir(&out, &[], false);
    chmod(&out, 0o755);
    for name in &names {
        let c = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: fchmodat and openat on valid C strings and a dir fd we own.
        unsafe {
            libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), 0o755, 0);
        }
        dir = deep_dir_step(&dir, name);
    }
}

fn deep_dir_step(dir: &std::os::fd::OwnedFd, name: &[u8]) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(name.to_vec()).unwrap();
    // SAFETY: openat on a valid C string; the new fd is ours.
    unsafe {
        std::os::fd::OwnedFd::from_raw_fd(libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY))
    }
}
