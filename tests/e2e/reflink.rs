//! Reflinks on real copy-on-write filesystems, loop-mounted (root only).

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::fixture::{Mounted, TestDaemon, eventually, object_count, open_store, root_or_skip, write};

/// Runs `$check(fs)` as the test `$xfs` on XFS and as `$btrfs` on btrfs,
/// each loop-mounted (root only).
macro_rules! on_both {
    ($check:ident, $xfs:ident, $btrfs:ident) => {
        #[test]
        fn $xfs() {
            if root_or_skip(stringify!($xfs)) {
                $check("xfs");
            }
        }

        #[test]
        fn $btrfs() {
            if root_or_skip(stringify!($btrfs)) {
                $check("btrfs");
            }
        }
    };
}

/// Checkpoints and rolls back 64 MiB on `fs` and checks that neither copies
/// the data: free space barely moves while objects and files appear.
fn objects_share_extents(fs: &str) {
    let m = Mounted::new(fs, 512 << 20);
    let d = TestDaemon::start();
    let sandbox = m.mountpoint.join("sandbox");
    let store = m.mountpoint.join("store");
    std::fs::create_dir_all(&sandbox).unwrap();
    let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(sandbox.join("big.bin"), &data).unwrap();
    let added = d.add_sandbox("cow", &sandbox, &["--store", store.to_str().unwrap()]);
    assert_eq!(added["clone_method"], "reflink", "{added}");

    let before = m.free();
    let c = d.checkpoint("cow");
    let after = m.free();
    d.wait_hashed(); // else the object may be between its two names
    assert_eq!(object_count(&store), 1);
    let used = before.saturating_sub(after);
    assert!(used < 8 << 20, "{fs}: a checkpoint of 64 MiB used {used} bytes: the object was copied");

    // A write into the live file must not reach the object.
    let mut f = std::fs::OpenOptions::new().write(true).open(sandbox.join("big.bin")).unwrap();
    std::io::Write::write_all(&mut f, b"overwritten").unwrap();
    drop(f);
    std::fs::remove_file(sandbox.join("extra")).ok();
    let before = m.free();
    d.rollback(&c);
    let after = m.free();
    assert_eq!(std::fs::read(sandbox.join("big.bin")).unwrap(), data);
    let used = before.saturating_sub(after);
    assert!(used < 8 << 20, "{fs}: a rollback of 64 MiB used {used} bytes: the file was copied");

    // The sandbox list says which method each sandbox uses. A sandbox on
    // this filesystem whose store is the daemon's (on another filesystem)
    // copies, and says why.
    let other = m.mountpoint.join("other");
    std::fs::create_dir_all(&other).unwrap();
    let copied = d.add_sandbox("other", &other, &[]);
    assert_eq!(copied["clone_method"], "copy");
    assert!(copied["clone_note"].as_str().unwrap().contains("another filesystem"), "{copied}");
    assert_ne!(std::fs::metadata(&other).unwrap().dev(), std::fs::metadata(&d.state_dir).unwrap().dev());
    let list = d.json(&["sandbox", "list"]);
    let methods: Vec<(&str, &str)> = list["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["clone_method"].as_str().unwrap()))
        .collect();
    assert_eq!(methods, [("cow", "reflink"), ("other", "copy")]);
    drop(d);
}

on_both!(
    objects_share_extents,
    xfs_checkpoints_and_rollbacks_share_extents,
    btrfs_checkpoints_and_rollbacks_share_extents
);

/// The versions in the catalogue at `db` that hold an unhashed object,
/// and the distinct objects among them.
fn unhashed(db: &Path) -> (i64, i64) {
    let conn = snapback_daemon::testing::connect_catalogue(db).unwrap();
    conn.query_row(
        "SELECT count(*), count(DISTINCT object) FROM entries
         WHERE substr(object, 17) = CAST('snapback:unhashd' AS BLOB)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// Has the next checkpoint of `sandbox` compare the whole tree (the
/// `inject_rescan` test hook), as a first checkpoint does.
fn full_scan_next(d: &TestDaemon, sandbox: &str) {
    let rescan = snapback::proto::InjectRescan { sandbox: sandbox.into() };
    let injected = d.client().call(&snapback::proto::Request::InjectRescan(rescan));
    assert!(injected.is_ok(), "{injected:?}");
}

/// A first checkpoint on a filesystem that clones stores its files without
/// reading them: each version holds an unhashed object of its own (equal
/// content is not shared yet), which a rollback restores from as from any
/// object. After the answer the daemon names each object by its content:
/// then equal content is one object, every object's content hashes to its
/// name (`verify`), nothing unhashed is left in the store or the catalogue,
/// and the sandbox's stored bytes are those of its objects. A daemon
/// stopped in the middle of naming (names made, catalogue not committed)
/// loses nothing and finishes after its restart.
fn objects_cloned_unread_are_named_after_the_answer(fs: &str) {
    let m = Mounted::new(fs, 512 << 20);
    let mut d = TestDaemon::builder().env("SNAPBACK_TEST_HOOKS", "1").start();
    let sandbox = m.mountpoint.join("sandbox");
    let store = m.mountpoint.join("store");
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let odd = sandbox.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    write(&sandbox.join("same1"), "equal content");
    write(&sandbox.join("dir/same2"), "equal content");
    write(&sandbox.join("empty"), "");
    write(&sandbox.join("big.bin"), &big);
    write(&odd, "latin-1 name");
    write(&sandbox.join("link1"), "linked");
    std::fs::hard_link(sandbox.join("link1"), sandbox.join("link2")).unwrap();
    let files = 5; // the two names of one file are read, and share an object
    let added = d.add_sandbox("u", &sandbox, &["--store", store.to_str().unwrap()]);
    assert_eq!(added["clone_method"], "reflink", "{added}");
    let db = d.state_dir.join("catalogue.db");
    let hold = d.state_dir.join("hold-hashing");
    std::fs::write(&hold, b"").unwrap();

    let first = d.checkpoint("u");
    assert_eq!(unhashed(&db), (files, files), "{fs}: one unhashed object for each file's version");
    assert_eq!(object_count(&store), files as usize + 1, "{fs}: equal content is not shared before it is named");
    assert!(d.status().hashing_objects);
    write(&sandbox.join("same1"), "changed");
    write(&sandbox.join("big.bin"), b"smaller now");
    std::fs::remove_file(&odd).unwrap();
    let report = d.rollback(&first);
    assert_eq!(report.restored + report.created, 3, "{fs}: {report:?}");
    assert_eq!(std::fs::read(sandbox.join("same1")).unwrap(), b"equal content");
    assert_eq!(std::fs::read(sandbox.join("big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(&odd).unwrap(), b"latin-1 name");
    // The rollback's `restore` checkpoint is written after its answer, and
    // before any request that follows is answered.
    assert_eq!(d.list(&["u"]).last().map(|c| c.kind), Some(snapback::proto::CheckpointKind::Restore));
    let (versions, objects) = unhashed(&db);
    assert_eq!((versions, objects), (files + 3, files + 3), "{fs}: the restored versions hold clones of their own");

    std::fs::remove_file(&hold).unwrap();
    d.wait_hashed();
    assert_eq!(unhashed(&db), (0, 0), "{fs}: every version holds its content's hash");
    // Equal content once: the first checkpoint's five contents, and the
    // two changed ones the rollback's safety checkpoint stored.
    let s = open_store(&store);
    let ids = s.list_objects().unwrap();
    assert_eq!(ids.len(), 7, "{fs}: {ids:?}");
    assert!(ids.iter().all(|id| !id.is_unhashed()), "{fs}: an unhashed name is left in the store");
    let bytes: u64 = ids.iter().map(|id| s.open_object(id).unwrap().size().unwrap()).sum();
    drop(s);
    assert_eq!(d.status().sandboxes[0].store_bytes, bytes, "{fs}: the stored bytes are not the objects'");
    d.assert_verified();
    write(&sandbox.join("same1"), "changed again");
    d.rollback(&first);
    assert_eq!(std::fs::read(sandbox.join("same1")).unwrap(), b"equal content");

    // Stopped with hashes made names of their objects and the catalogue
    // not yet pointed at them.
    let more = sandbox.join("more");
    for i in 0..40 {
        write(&more.join(format!("f{i}")), format!("file {i}"));
    }
    std::fs::write(&hold, b"").unwrap();
    full_scan_next(&d, "u");
    let last = d.checkpoint("u");
    assert_eq!(unhashed(&db).0, 40, "{fs}: a full scan clones new files unread");
    let stop = d.state_dir.join("stop-while-naming");
    std::fs::write(&stop, b"").unwrap();
    std::fs::remove_file(&hold).unwrap();
    eventually(std::time::Duration::from_secs(30), std::time::Duration::from_millis(20), || {
        if stop.exists() { Err("the daemon has not stopped at the hook".to_string()) } else { Ok(()) }
    });
    assert_eq!(d.stop().and_then(|s| s.code()), Some(70));
    assert_eq!(unhashed(&db).0, 40, "{fs}: the stopped batch was not committed");
    d.restart();
    d.wait_hashed();
    d.wait_collected();
    assert_eq!(unhashed(&db), (0, 0), "{fs}: naming was not finished after the restart");
    d.assert_verified();
    for i in 0..40 {
        write(&more.join(format!("f{i}")), "overwritten");
    }
    d.rollback(&last);
    for i in 0..40 {
        assert_eq!(std::fs::read(more.join(format!("f{i}"))).unwrap(), format!("file {i}").as_bytes());
    }

    // An unhashed object lost from the store (as after a power loss) is
    // passed over: the others are named, the naming ends, and `verify`
    // reports the one missing.
    for i in 0..10 {
        write(&sandbox.join(format!("lost/f{i}")), format!("lost {i}"));
    }
    std::fs::write(&hold, b"").unwrap();
    full_scan_next(&d, "u");
    d.checkpoint("u");
    let unhashed_names: Vec<_> = crate::fixture::store_files(&store)
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().ends_with("736e61706261636b3a756e6861736864")))
        .collect();
    assert_eq!(unhashed_names.len(), 10, "{fs}: {unhashed_names:?}");
    std::fs::remove_file(&unhashed_names[3]).unwrap();
    std::fs::remove_file(&hold).unwrap();
    d.wait_hashed();
    assert_eq!(unhashed(&db), (1, 1), "{fs}: the lost object's version keeps its name, the others are named");
    let out = d.cli(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{fs}: verify found nothing wrong");
    let v: snapback::proto::VerifyReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.missing.len(), 1, "{fs}: {v:?}");
    drop(d);
}

on_both!(
    objects_cloned_unread_are_named_after_the_answer,
    xfs_objects_cloned_unread_are_named_after_the_answer,
    btrfs_objects_cloned_unread_are_named_after_the_answer
);

/// How many of the file's pages are in the page cache, and how many it has
/// (`mincore` over a read-only mapping; root may ask it of any file).
fn resident_pages(path: &std::path::Path) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: sysconf only reads its argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let pages = len.div_ceil(page);
    // SAFETY: a fresh read-only shared mapping of the whole file, only
    // passed to mincore and unmapped before the file is closed.
    unsafe {
        let at = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
        assert_ne!(at, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0, "mincore {}", path.display());
        assert_eq!(libc::munmap(at, len), 0);
        (vec.iter().filter(|&&v| v & 1 == 1).count(), pages)
    }
}

/// A clone leaves none of a file's pages in memory, and the checkpoint
/// after a rollback reads every restored file again: the daemon has the
/// small ones it cloned read in meanwhile (nothing else in this test reads
/// them before it looks).
fn cloned_files_are_read_in_after_a_rollback(fs: &str) {
    let m = Mounted::new(fs, 512 << 20);
    let d = TestDaemon::start();
    let sandbox = m.mountpoint.join("sandbox");
    let store = m.mountpoint.join("store");
    std::fs::create_dir_all(&sandbox).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    let content =
        |name: &str, round: u8| -> Vec<u8> { name.bytes().cycle().take(16 << 10).map(|b| b ^ round).collect() };
    for n in &names {
        std::fs::write(sandbox.join(n), content(n, 0)).unwrap();
    }
    let added = d.add_sandbox("warm", &sandbox, &["--store", store.to_str().unwrap()]);
    assert_eq!(added["clone_method"], "reflink", "{added}");
    let c = d.checkpoint("warm");
    for n in &names {
        std::fs::write(sandbox.join(n), content(n, 1)).unwrap();
    }
    let report = d.rollback(&c);
    assert_eq!(report.restored, 20, "{report:?}");
    let (limit, every) = (std::time::Duration::from_secs(30), std::time::Duration::from_millis(20));
    for n in &names {
        eventually(limit, every, || match resident_pages(&sandbox.join(n)) {
            (resident, pages) if resident == pages => Ok(()),
            (resident, pages) => Err(format!("{fs}: {n} has {resident} of its {pages} pages in memory")),
        });
        assert_eq!(std::fs::read(sandbox.join(n)).unwrap(), content(n, 0), "{fs}: {n}");
    }
    drop(d);
}

on_both!(
    cloned_files_are_read_in_after_a_rollback,
    xfs_cloned_files_are_read_in_after_a_rollback,
    btrfs_cloned_files_are_read_in_after_a_rollback
);

#[test]
fn a_sandbox_on_tmpfs_is_not_told_that_another_store_would_clone() {
    if !root_or_skip("a_sandbox_on_tmpfs_is_not_told_that_another_store_would_clone") {
        return;
    }
    let d = TestDaemon::start();
    let mnt = d.path("tmpfs");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&mnt).status().unwrap();
    assert!(ok.success(), "mount -t tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // Lazily: this runs before the daemon stops, and its open
            // directory would make a plain umount fail and leave the
            // mount behind after every run.
            let _ = std::process::Command::new("umount").arg("--lazy").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let sb = mnt.join("sb");
    std::fs::create_dir(&sb).unwrap();
    let added = d.add_sandbox("t", &sb, &[]);
    let note = added["clone_note"].as_str().unwrap();
    assert_eq!(added["clone_method"], "copy");
    assert!(note.contains("(tmpfs) cannot clone files") && !note.contains("--store"), "{note}");
    d.cli(&["sandbox", "remove", "t"]);
}

/// With a store that cannot clone, a first checkpoint copies its small
/// files (64 KiB or less) into packs, not a file each: the store holds
/// one loose object, for the one larger file. Every file comes back from
/// them, before and after a restart, hardlinks as hardlinks.
#[test]
fn a_store_that_cannot_clone_packs_the_small_files_of_a_first_checkpoint() {
    if !root_or_skip("a_store_that_cannot_clone_packs_the_small_files_of_a_first_checkpoint") {
        return;
    }
    let m = Mounted::new("ext4", 256 << 20);
    let mut d = TestDaemon::start();
    let sandbox = m.mountpoint.join("sandbox");
    let store = m.mountpoint.join("store");
    let mut files: Vec<(std::path::PathBuf, Vec<u8>)> = (0..500)
        .map(|i| {
            (sandbox.join(format!("d{}/f{i}", i % 7)), format!("small file {i}\n").repeat(i % 50 + 1).into_bytes())
        })
        .collect();
    files.push((sandbox.join("empty"), Vec::new()));
    files.push((sandbox.join("just-small"), vec![7u8; 64 << 10]));
    files.push((sandbox.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"latin-1 name".to_vec()));
    files.push((
        sandbox.join("big.bin"),
        (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
    ));
    for (path, body) in &files {
        write(path, body);
    }
    write(&sandbox.join("link1"), "linked");
    std::fs::hard_link(sandbox.join("link1"), sandbox.join("link2")).unwrap();
    let added = d.add_sandbox("e", &sandbox, &["--store", store.to_str().unwrap()]);
    assert_eq!(added["clone_method"], "copy", "{added}");

    let first = d.checkpoint("e");
    let loose: Vec<_> = std::fs::read_dir(store.join("objects"))
        .unwrap()
        .flat_map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap())
        .collect();
    assert_eq!(loose.len(), 1, "only the file over 64 KiB is an object of its own: {loose:?}");
    assert!(std::fs::read_dir(store.join("packs")).unwrap().count() > 0, "no pack was written");
    assert_eq!(object_count(&store), files.len() + 1, "one object for each content");

    // A directory moved, there and back, puts its files at paths with no
    // version: their content is found among the objects stored, not
    // packed again.
    let packs = || std::fs::read_dir(store.join("packs")).unwrap().count();
    let before = packs();
    for (from, to) in [("d0", "moved"), ("moved", "d0")] {
        std::fs::rename(sandbox.join(from), sandbox.join(to)).unwrap();
        let moved = d.json(&["checkpoint", "e"]);
        assert!(moved["changed"].as_u64().unwrap() > 70, "{moved}");
        assert_eq!(packs(), before, "the files moved to {to} were stored again: {moved}");
    }
    assert_eq!(object_count(&store), files.len() + 1, "the moves stored nothing");

    let damage = |sandbox: &Path| {
        for i in 0..7 {
            std::fs::remove_dir_all(sandbox.join(format!("d{i}"))).unwrap();
        }
        write(&sandbox.join("big.bin"), "overwritten");
        write(&sandbox.join("link2"), "changed through the second name");
        std::fs::remove_file(sandbox.join("empty")).unwrap();
    };
    let restored = |sandbox: &Path, when: &str| {
        for (path, body) in &files {
            let got = std::fs::read(path).unwrap_or_else(|e| panic!("{when}: {}: {e}", path.display()));
            assert!(got == *body, "{when}: {} does not hold what was checkpointed", path.display());
        }
        let (one, two) = (sandbox.join("link1"), sandbox.join("link2"));
        assert_eq!(std::fs::read(&one).unwrap(), b"linked", "{when}");
        assert_eq!(std::fs::metadata(&one).unwrap().ino(), std::fs::metadata(&two).unwrap().ino(), "{when}");
    };
    damage(&sandbox);
    d.rollback(&first);
    restored(&sandbox, "rolled back");
    d.assert_verified();

    d.restart();
    damage(&sandbox);
    d.rollback(&first);
    restored(&sandbox, "rolled back after a restart");
    d.assert_verified();
}
