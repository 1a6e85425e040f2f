//! A full disk, on a small loop-mounted ext4 that holds both the sandbox
//! and its store (root only): a checkpoint that cannot be stored leaves no
//! checkpoint and no object behind; a rollback that runs out of space stops
//! with a clear error, and a second one, once space is freed, reaches the
//! target exactly.

use crate::fixture::{Mounted, TestDaemon, root_or_skip, write};
use crate::tree::{assert_same, snapshot};

/// Fills the filesystem with `path` until about `leave` bytes are free.
fn fill(m: &Mounted, path: &std::path::Path, leave: u64) {
    let free = m.free();
    let size = free.saturating_sub(leave) as usize;
    write(path, vec![0x5au8; size]);
    assert!(m.free() <= leave + (1 << 20), "could not fill the filesystem: {} free", m.free());
}

#[test]
fn a_full_disk_leaves_no_partial_checkpoint_and_a_second_rollback_finishes() {
    if !root_or_skip("a_full_disk_leaves_no_partial_checkpoint_and_a_second_rollback_finishes") {
        return;
    }
    let m = Mounted::new("ext4", 96 << 20);
    let d = TestDaemon::start();
    let sb = m.mountpoint.join("sb");
    let store = m.mountpoint.join("store");
    for i in 0..10 {
        write(&sb.join(format!("data/f{i}")), vec![i as u8; 2 << 20]);
    }
    d.add_sandbox("sb", &sb, &["--store", store.to_str().unwrap(), "--exclude", "filler"]);
    let a = d.checkpoint("sb");
    let tree_a = snapshot(&sb);

    // A checkpoint that needs more room than there is.
    fill(&m, &sb.join("filler"), 8 << 20);
    for i in 0..4 {
        write(&sb.join(format!("big{i}")), vec![0xa0 + i as u8; 3 << 20]);
    }
    let out = d.cli(&["checkpoint", "sb"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no space left") || stderr.contains("No space left"), "{stderr}");
    let list = d.json(&["list", "sb"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1, "no partial checkpoint: {list}");
    let v = d.json(&["verify"]);
    assert!(v["unreferenced"].as_array().unwrap().is_empty(), "the failed checkpoint left objects: {v}");
    assert!(v["missing"].as_array().unwrap().is_empty() && v["corrupt"].as_array().unwrap().is_empty(), "{v}");

    // A rollback that needs more room than there is: the 20 MiB of data
    // must come back while the (excluded) filler takes nearly all space.
    for i in 0..4 {
        std::fs::remove_file(sb.join(format!("big{i}"))).unwrap();
    }
    std::fs::remove_dir_all(sb.join("data")).unwrap();
    std::fs::remove_file(sb.join("filler")).unwrap();
    fill(&m, &sb.join("filler"), 6 << 20);
    let out = d.cli(&["rollback", &a]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no space left") || stderr.contains("No space left"), "{stderr}");
    let status = d.status();
    let recovery = status.sandboxes[0].recovery.as_deref().unwrap_or_default();
    assert!(recovery.contains("failed half way"), "status: {status:?}");

    // Space freed: a second rollback brings it exactly to the target.
    std::fs::remove_file(sb.join("filler")).unwrap();
    d.rollback(&a);
    assert_same(&snapshot(&sb), &tree_a, "after the second rollback");
    let status = d.status();
    assert!(status.sandboxes[0].recovery.is_none(), "the failure is no longer news: {status:?}");
    d.assert_verified();
}
