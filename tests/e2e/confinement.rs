//! Symlinks planted by an agent never lead the daemon outside the sandbox:
//! not when restoring through them, not while a thread keeps swapping a
//! directory for a symlink to outside during rollbacks and checkpoints.

use std::os::unix::fs::{MetadataExt, symlink};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::fixture::{TestDaemon, store_holds, write};
use crate::tree::{Node, assert_same, snapshot};

/// A directory outside the sandbox whose every file's content and mtime,
/// and whose list of names, must not change.
struct Outside {
    dir: std::path::PathBuf,
    before: std::collections::BTreeMap<Vec<u8>, Node>,
}

impl Outside {
    fn new(dir: std::path::PathBuf, secret: &str) -> Outside {
        write(&dir.join("f"), "sentinel outside");
        write(&dir.join("secret"), secret);
        // Old mtimes, so that any write would show.
        for name in ["f", "secret"] {
            let file = std::fs::File::options().write(true).open(dir.join(name)).unwrap();
            file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000)).unwrap();
        }
        let before = snapshot(&dir);
        Outside { dir, before }
    }

    fn assert_untouched(&self, what: &str) {
        assert_same(&snapshot(&self.dir), &self.before, &format!("{what}: outside the sandbox"));
    }
}

#[test]
fn a_rollback_through_planted_symlinks_restores_inside_and_writes_nothing_outside() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    let outside = Outside::new(d.path("outside"), "secret-1f3b");
    write(&sb.join("d/f"), "inside d/f");
    write(&sb.join("x"), "inside x");
    d.add_sandbox("sb", &sb, &[]);
    let id = d.checkpoint("sb");
    let expected = snapshot(&sb);

    // The agent replaces d by a symlink to the outside directory (which
    // holds an `f` too), and x by a symlink to a file outside.
    std::fs::remove_dir_all(sb.join("d")).unwrap();
    symlink(&outside.dir, sb.join("d")).unwrap();
    std::fs::remove_file(sb.join("x")).unwrap();
    symlink(outside.dir.join("f"), sb.join("x")).unwrap();
    let report = d.rollback(&id);
    assert_same(&snapshot(&sb), &expected, "after the rollback");
    outside.assert_untouched("after the rollback");
    assert!(std::fs::symlink_metadata(sb.join("d")).unwrap().is_dir());
    assert!(report.changed.len() >= 2, "{report:?}");
    // The safety checkpoint recorded the symlinks as symlinks: nothing of
    // what they point to was read (what the sandbox held, was).
    assert!(store_holds(&d.state_dir.join("store"), b"inside d/f"));
    assert!(!store_holds(&d.state_dir.join("store"), b"secret-1f3b"));
    assert!(!store_holds(&d.state_dir.join("store"), b"sentinel outside"));
}

#[test]
fn swapping_a_directory_for_a_symlink_during_rollbacks_and_checkpoints_never_escapes() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    let outside = Outside::new(d.path("outside"), "secret-9c2e");
    for i in 0..50 {
        write(&sb.join(format!("d/f{i}")), format!("inside {i}"));
    }
    write(&sb.join("other"), "stays");
    d.add_sandbox("sb", &sb, &[]);
    let a = d.checkpoint("sb");
    for i in 0..50 {
        write(&sb.join(format!("d/f{i}")), format!("changed {i}"));
    }
    let b = d.checkpoint("sb");

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (stop, sb, target) = (stop.clone(), sb.clone(), outside.dir.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // d -> d.real, a symlink to outside as d, then back.
                if std::fs::rename(sb.join("d"), sb.join("d.real")).is_ok() {
                    let _ = symlink(&target, sb.join("d"));
                    std::thread::yield_now();
                    if std::fs::symlink_metadata(sb.join("d")).is_ok_and(|m| m.file_type().is_symlink()) {
                        let _ = std::fs::remove_file(sb.join("d"));
                    }
                    let _ = std::fs::rename(sb.join("d.real"), sb.join("d"));
                    swaps += 1;
                }
                // A swap about every 200 µs: many during each operation,
                // without flooding the daemon's watcher (a flood only makes
                // every checkpoint wait for its barrier, then scan it all).
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            swaps
        })
    };
    for round in 0..40 {
        let id = if round % 2 == 0 { &a } else { &b };
        // Either may fail when it meets the symlink; neither may escape.
        let _ = d.cli(&["rollback", id]);
        let _ = d.cli(&["checkpoint", "sb"]);
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0, "the swapper never got to swap");
    outside.assert_untouched(&format!("after 40 rounds against {swaps} swaps"));
    assert!(!store_holds(&d.state_dir.join("store"), b"secret-9c2e"), "the secret outside was read into the store");
    // Put d back as a directory if the last swap left it elsewhere, then a
    // plain rollback still reaches the target exactly.
    if !sb.join("d").exists() && sb.join("d.real").exists() {
        std::fs::rename(sb.join("d.real"), sb.join("d")).unwrap();
    }
    d.rollback(&a);
    let f0 = std::fs::read_to_string(sb.join("d/f0")).unwrap();
    assert_eq!(f0, "inside 0");
    assert_eq!(std::fs::metadata(sb.join("other")).unwrap().nlink(), 1);
    outside.assert_untouched("at the end");
}
