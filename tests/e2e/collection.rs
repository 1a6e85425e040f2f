//! Garbage collection in the background: the daemon answers at once after
//! a start and removes unreferenced objects a slice at a time, while
//! checkpoints and restarts go on.

use std::path::{Path, PathBuf};

use crate::fixture::*;
use crate::tree::*;

/// An object's file in the store: `objects/<first byte>/<hash>`.
fn object_file(store: &Path, content: &[u8]) -> PathBuf {
    let hex = blake3::hash(content).to_hex().to_string();
    store.join("objects").join(&hex[..2]).join(hex)
}

/// Content whose object lies in one of the last directories collected, so
/// that a checkpoint taken just after a start meets it before the
/// collection gets there.
fn late_content(what: &str) -> Vec<u8> {
    (0..)
        .map(|i| format!("{what} {i}\n").repeat(4000).into_bytes())
        .find(|c| blake3::hash(c).as_bytes()[0] >= 0xf0)
        .expect("some content hashes late")
}

#[test]
fn background_collection_keeps_what_checkpoints_meet_and_frees_the_rest() {
    // Every slice pauses, so a collection lasts seconds: long enough for
    // checkpoints, and a restart, to land in the middle of it.
    let mut d = TestDaemon::builder()
        .env("SNAPBACK_TEST_HOOKS", "1")
        .env("SNAPBACK_TEST_GC_SLICE_MS", "15")
        .config("watch = false\n")
        .start();
    let sb = d.path("sb");
    for i in 0..20 {
        write(&sb.join(format!("d{}/f{i}", i % 4)), format!("first {i}\n").repeat(3000));
    }
    d.add_sandbox("sb", &sb, &[]);
    d.wait_collected();
    let first = d.checkpoint("sb");
    let first_tree = snapshot(&sb);
    d.stop();

    // Garbage as a stopped daemon leaves it: objects no checkpoint holds
    // (one of them with the content a later checkpoint meets again), and
    // a temporary.
    let store = d.state_dir.join("store");
    let met_again = late_content("met again");
    let garbage: Vec<Vec<u8>> = (0..40).map(|i| format!("garbage {i}\n").repeat(2000).into_bytes()).collect();
    for content in garbage.iter().chain([&met_again]) {
        write(&object_file(&store, content), content);
    }
    write(&store.join("tmp/leftover"), "half written");
    d.restart();
    assert!(d.status().collecting_garbage, "the collection was done before the daemon answered");

    // A checkpoint during the collection stores the content that lies
    // unreferenced in the store: the store finds it there and refers to it,
    // before the collection reaches its directory.
    write(&sb.join("d0/again"), &met_again);
    write(&sb.join("d1/f1"), "second\n");
    let second = d.checkpoint("sb");
    let second_tree = snapshot(&sb);
    assert!(d.status().collecting_garbage, "the collection ended before the checkpoint: it proves nothing");
    d.wait_collected();
    assert!(object_file(&store, &met_again).exists(), "the object a checkpoint met again was collected");

    // More garbage, and a daemon killed in the middle of its collection:
    // the next start collects from the beginning, while a checkpoint
    // stores content new to the store.
    let more: Vec<Vec<u8>> = (0..40).map(|i| format!("more {i}\n").repeat(2000).into_bytes()).collect();
    d.stop();
    for content in &more {
        write(&object_file(&store, content), content);
    }
    d.restart();
    write(&sb.join("d2/new"), late_content("third"));
    std::fs::remove_file(sb.join("d3/f3")).unwrap();
    let third = d.checkpoint("sb");
    let third_tree = snapshot(&sb);
    // SAFETY: signalling the daemon child the fixture owns.
    unsafe { libc::kill(d.pid(), libc::SIGKILL) };
    d.restart();
    write(&sb.join("d0/fourth"), late_content("fourth"));
    let fourth = d.checkpoint("sb");
    let fourth_tree = snapshot(&sb);
    d.wait_collected();

    for content in garbage.iter().chain(&more) {
        assert!(!object_file(&store, content).exists(), "an unreferenced object was kept");
    }
    assert!(!store.join("tmp/leftover").exists(), "a leftover temporary was kept");
    d.assert_verified();
    let all = [(&first, &first_tree), (&second, &second_tree), (&third, &third_tree), (&fourth, &fourth_tree)];
    for (id, tree) in all {
        d.rollback(id);
        assert_same(&snapshot(&sb), tree, "rolled back after the collection");
    }
}
