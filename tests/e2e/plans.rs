//! Plans, the applied guard, revert, undo, retention, budgets and export.

use std::path::Path;
use std::time::Duration;

use snapback::proto::{ErrorCode, PlanRollbackRequest};

use crate::fixture::{TestDaemon, eventually, store_files, write};
use crate::tree::{assert_same, snapshot};

fn id(v: &serde_json::Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

#[test]
fn a_failed_step_is_rolled_back_and_an_applied_plan_never_is() {
    let mut d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("base.txt"), "base");
    d.add_sandbox("sb", &root, &[]);
    // Before each step, a checkpoint of the plan.
    let before1 = id(&d.json(&["checkpoint", "sb", "--plan", "P", "--tool", "Write", "--phase", "pre"]));
    write(&root.join("step1.txt"), "one");
    let before2 = id(&d.json(&["checkpoint", "sb", "--plan", "P", "--tool", "Bash", "--phase", "pre"]));
    write(&root.join("step2.txt"), "two");
    write(&root.join("base.txt"), "damaged by step 2");
    let before3 = id(&d.json(&["checkpoint", "sb", "--plan", "P", "--tool", "Edit", "--phase", "pre"]));
    let _ = before3;

    // Step 2 failed: back to the checkpoint before it.
    let r = d.json(&["plan", "rollback", "P", &before2]);
    assert_eq!(r["deleted"], 1, "{r}");
    assert_eq!(r["restored"], 1, "{r}");
    let changed: Vec<&str> = r["changed"].as_array().unwrap().iter().map(|p| p["text"].as_str().unwrap()).collect();
    assert_eq!(changed, ["base.txt", "step2.txt"]);
    assert_eq!(std::fs::read_to_string(root.join("step1.txt")).unwrap(), "one");
    assert!(!root.join("step2.txt").exists());
    assert_eq!(std::fs::read_to_string(root.join("base.txt")).unwrap(), "base");

    // A checkpoint of another plan is not this plan's to roll back to.
    let other = id(&d.json(&["checkpoint", "sb", "--plan", "Q"]));
    assert_eq!(d.cli(&["plan", "rollback", "P", &other]).status.code(), Some(1));

    let shown = d.json(&["plan", "show", "P"]);
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["checkpoints"].as_array().unwrap().len(), 3);
    assert_eq!(d.json(&["plan", "apply", "P"])["state"], "applied");

    // The guard holds across a restart and a new connection.
    d.restart();
    let tree = snapshot(&root);
    let mut client = d.client();
    let err = client
        .plan_rollback(PlanRollbackRequest {
            plan: "P".into(),
            checkpoint: before1.clone(),
            paths: vec![],
            dry_run: false,
        })
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PlanApplied), "{err}");
    let out = d.cli(&["rollback", &before1]);
    assert_eq!(out.status.code(), Some(1), "a plain rollback went around the guard");
    assert_eq!(d.cli(&["revert", &before2]).status.code(), Some(1));
    assert_eq!(d.cli(&["checkpoint", "sb", "--plan", "P"]).status.code(), Some(1));
    assert_eq!(d.cli(&["plan", "abandon", "P"]).status.code(), Some(1));
    assert_same(&snapshot(&root), &tree, "after refused rollbacks of an applied plan");

    assert_eq!(d.json(&["plan", "abandon", "Q"])["state"], "abandoned");
    assert_eq!(d.cli(&["checkpoint", "sb", "--plan", "Q"]).status.code(), Some(1));
    assert_eq!(d.cli(&["plan", "show", "nope"]).status.code(), Some(1));
}

#[test]
fn revert_undoes_one_step_and_refuses_to_overwrite_later_work() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("shared.txt"), "v0");
    d.add_sandbox("sb", &root, &[]);
    d.checkpoint("sb");
    // Step 1.
    write(&root.join("one.txt"), "1");
    let after1 = d.checkpoint("sb");
    // Step 2: the wrong decision.
    write(&root.join("two/new.txt"), "2");
    write(&root.join("shared.txt"), "v2");
    std::fs::remove_file(root.join("one.txt")).unwrap();
    let after2 = d.checkpoint("sb");
    // Step 3.
    write(&root.join("three.txt"), "3");
    let after3 = d.checkpoint("sb");
    let _ = after1;

    let r = d.json(&["revert", &after2]);
    assert_eq!(std::fs::read_to_string(root.join("shared.txt")).unwrap(), "v0");
    assert_eq!(std::fs::read_to_string(root.join("one.txt")).unwrap(), "1");
    assert!(!root.join("two").exists(), "step 2's directory is still there");
    assert_eq!(std::fs::read_to_string(root.join("three.txt")).unwrap(), "3", "step 3's work was lost");
    assert_eq!((r["restored"].as_u64(), r["created"].as_u64(), r["deleted"].as_u64()), (Some(1), Some(1), Some(2)));
    assert!(r["safety_checkpoint"].is_string());

    // Undo the revert, then make step 3 touch what step 2 touched.
    d.json(&["undo", "sb"]);
    assert_eq!(std::fs::read_to_string(root.join("shared.txt")).unwrap(), "v2");
    write(&root.join("shared.txt"), "v3");
    d.checkpoint("sb");
    let before = snapshot(&root);
    let mut client = d.client();
    let err =
        client.revert(snapback::proto::RevertRequest { checkpoint: after2.clone(), ..Default::default() }).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    let snapback::ClientError::Daemon(body) = &err else { panic!("{err}") };
    let listed: Vec<String> = body.paths.iter().map(|p| p.display()).collect();
    assert_eq!(listed, ["shared.txt"]);
    assert_same(&snapshot(&root), &before, "after a refused revert");
    // What to do about it is a hint of its own: a field of the answer,
    // and a line of its own after the message.
    let hint = body.hint.as_deref().unwrap_or_default();
    assert!(hint.contains("--force") && !body.message.contains("--force"), "{body:?}");
    let out = d.cli(&["revert", &after2]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shared.txt"));
    let last = stderr.lines().last().unwrap_or_default();
    assert_eq!(last, format!("hint: {hint}"), "{stderr}");
    let out = d.cli(&["--json", "revert", &after2]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["hint"], hint);

    let forced = d.json(&["revert", &after2, "--force"]);
    assert_eq!(forced["conflicts"][0]["text"], "shared.txt");
    assert_eq!(std::fs::read_to_string(root.join("shared.txt")).unwrap(), "v0");
    assert_eq!(std::fs::read_to_string(root.join("three.txt")).unwrap(), "3");
    let _ = after3;
}

#[test]
fn undo_brings_back_the_pre_rollback_tree_and_undo_again_redoes() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("a/b.txt"), "b1");
    write(&root.join("c.txt"), "c1");
    d.add_sandbox("sb", &root, &[]);
    let first = d.checkpoint("sb");
    write(&root.join("a/b.txt"), "b2");
    write(&root.join("new/d.txt"), "d");
    std::fs::remove_file(root.join("c.txt")).unwrap();
    let before = snapshot(&root);
    d.rollback(&first);
    let rolled = snapshot(&root);
    d.json(&["undo", "sb"]);
    assert_same(&snapshot(&root), &before, "after undo");
    d.json(&["undo", "sb"]);
    assert_same(&snapshot(&root), &rolled, "after undoing the undo");
    let fresh = d.path("fresh");
    write(&fresh.join("x"), "x");
    d.add_sandbox("fresh", &fresh, &[]);
    assert_eq!(d.cli(&["undo", "fresh"]).status.code(), Some(1), "undo with nothing to undo");
}

#[test]
fn the_default_policy_prunes_without_being_asked_and_keeps_what_it_must() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("counter.txt"), "0");
    write(&root.join("still.txt"), "unchanging");
    d.add_sandbox("sb", &root, &[]);
    let mut pinned = Vec::new();
    let mut safety = String::new();
    for i in 1..=300u32 {
        write(&root.join("counter.txt"), format!("{i:06}"));
        let c = if i % 100 == 7 {
            let v = d.json(&["checkpoint", "sb", "--pin"]);
            pinned.push(id(&v));
            v
        } else {
            d.json(&["checkpoint", "sb"])
        };
        if i == 20 {
            safety = d.rollback(&id(&c)).safety_checkpoint.unwrap();
        }
        if i > 100 {
            d.assert_verified();
        }
    }
    let list = d.json(&["list", "sb"]);
    let ids: Vec<&str> = list["checkpoints"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    // All 300 (plus one safety) were taken within the hour: the hourly and
    // daily buckets keep only the newest, which the last 100 hold already.
    assert!(ids.len() <= 100 + pinned.len() + 1, "kept {} checkpoints", ids.len());
    assert!(ids.len() >= 100, "kept only {}", ids.len());
    for p in &pinned {
        assert!(ids.contains(&p.as_str()), "pinned {p} was pruned");
    }
    assert!(ids.contains(&safety.as_str()), "the latest rollback's safety checkpoint was pruned");
    // Each kept checkpoint's parent is the one kept before it.
    let parents: Vec<&serde_json::Value> =
        list["checkpoints"].as_array().unwrap().iter().map(|c| &c["parent"]).collect();
    assert_eq!(parents[0], &serde_json::Value::Null, "the oldest kept checkpoint has a parent");
    for (i, parent) in parents.iter().enumerate().skip(1) {
        assert_eq!(parent.as_str(), Some(ids[i - 1]), "the parent of checkpoint {i} of {}", ids.len());
    }
    // Objects of pruned versions are gone: one object per kept counter value.
    let objects = crate::fixture::object_count(&d.state_dir.join("store"));
    assert!(objects <= ids.len() + 1, "{objects} objects for {} checkpoints", ids.len());
    // Every kept checkpoint still restores.
    let oldest = ids[0];
    d.rollback(oldest);
    d.assert_verified();
}

#[test]
fn a_rollback_to_the_oldest_kept_checkpoint_is_not_pruned_under_it() {
    // The rollback's safety checkpoint is one more checkpoint: with the
    // newest three kept, it would push its own target out of the policy.
    let d = TestDaemon::builder().config("[retention]\nkeep_last = 3\nkeep_hourly = 0\nkeep_daily = 0\n").start();
    let root = d.path("sb");
    write(&root.join("x.txt"), "a");
    write(&root.join("only-in-a.txt"), "gone after A");
    d.add_sandbox("sb", &root, &[]);
    let a = d.checkpoint("sb");
    let tree_a = snapshot(&root);
    std::fs::remove_file(root.join("only-in-a.txt")).unwrap();
    for v in ["b", "c"] {
        write(&root.join("x.txt"), v);
        d.checkpoint("sb");
    }
    write(&root.join("x.txt"), "d");
    let report = d.rollback(&a);
    assert_same(&snapshot(&root), &tree_a, "after rolling back to the oldest kept checkpoint");
    assert_eq!((report.restored, report.created), (1, 1), "{report:?}");
    // Retention still applied, after the rollback: A is the oldest of four.
    let list = d.json(&["list", "sb"]);
    let ids: Vec<String> = list["checkpoints"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(ids.len(), 3, "{list}");
    assert!(!ids.contains(&a), "{list}");
    d.assert_verified();
}

#[test]
fn retention_follows_a_checkpoint_without_waiting_for_another_request() {
    let d = TestDaemon::builder().config("[retention]\nkeep_last = 1\nkeep_hourly = 0\nkeep_daily = 0\n").start();
    let root = d.path("sb");
    d.add_sandbox("sb", &root, &[]);
    for v in ["a", "b", "c"] {
        write(&root.join("x.txt"), v);
        d.checkpoint("sb");
    }
    // No request follows: the daemon's pruner applies the policy itself.
    pruned_to_one(&d, "the checkpoints beyond keep_last = 1 were not pruned");
    let list = d.json(&["list", "sb"]);
    assert_eq!(list["checkpoints"].as_array().unwrap().len(), 1, "{list}");
}

/// Waits until the daemon's pruner has left one checkpoint, with no
/// request to prompt it: read from the catalogue directly, since any
/// request would apply the policy itself.
fn pruned_to_one(d: &TestDaemon, what: &str) {
    let conn = snapback_daemon::testing::connect_catalogue(&d.state_dir.join("catalogue.db")).unwrap();
    eventually(Duration::from_secs(20), Duration::from_millis(10), || {
        let n: i64 = conn.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0)).unwrap();
        if n == 1 { Ok(()) } else { Err(format!("{what}: {n} checkpoints")) }
    });
}

#[test]
fn a_pruning_that_failed_is_tried_again_and_frees_what_it_left() {
    let d = TestDaemon::builder()
        .config("[retention]\nkeep_last = 1\nkeep_hourly = 0\nkeep_daily = 0\n")
        .env("SNAPBACK_TEST_HOOKS", "1")
        .env("SNAPBACK_TEST_PRUNE_RETRY_MS", "50")
        .start();
    let root = d.path("sb");
    // Too large for a pack: an object file of its own.
    let first = vec![b'a'; 100_000];
    write(&root.join("x.bin"), &first);
    d.add_sandbox("sb", &root, &[]);
    d.checkpoint("sb");
    let store = d.state_dir.join("store");
    let object = store_files(&store)
        .into_iter()
        .find(|f| std::fs::read(f).is_ok_and(|data| data == first))
        .expect("the first version's object file");
    // A directory where the object was: removing it fails (EISDIR).
    let aside = d.path("aside");
    std::fs::rename(&object, &aside).unwrap();
    std::fs::create_dir(&object).unwrap();
    write(&root.join("x.bin"), vec![b'b'; 100_000]);
    d.checkpoint("sb");
    // keep_last = 1 prunes the first checkpoint; its object cannot go.
    pruned_to_one(&d, "the checkpoint beyond keep_last = 1 was not pruned");
    std::thread::sleep(Duration::from_millis(300)); // a few retries fail
    assert!(object.is_dir());
    // Put the object file back: the next retry removes it, with no
    // request and no restart to prompt it.
    std::fs::remove_dir(&object).unwrap();
    std::fs::rename(&aside, &object).unwrap();
    eventually(Duration::from_secs(20), Duration::from_millis(10), || match object.exists() {
        true => Err("the object a failed pruning left was never removed".into()),
        false => Ok(()),
    });
    d.assert_verified();
}

#[test]
fn pruning_frees_at_least_the_exclusive_bytes_it_reported() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("keep.txt"), "shared by every checkpoint");
    d.add_sandbox("sb", &root, &[]);
    for i in 0..12u32 {
        write(&root.join("data.bin"), format!("{i}").repeat(4096 + i as usize));
        d.checkpoint("sb");
    }
    let list = d.json(&["list", "sb"]);
    let all: Vec<String> = list["checkpoints"].as_array().unwrap().iter().map(id).collect();
    let doomed = &all[..all.len() - 4];
    let exclusive: u64 = doomed.iter().map(|c| d.json(&["show", c])["exclusive_bytes"].as_u64().unwrap()).sum();
    assert!(exclusive > 0);
    let before = d.store_bytes();
    let pruned = d.json(&["prune", "sb", "--keep-last", "4"]);
    assert_eq!(pruned["pruned"].as_array().unwrap().len(), doomed.len(), "{pruned}");
    assert_eq!(pruned["kept"], 4);
    let after = d.store_bytes();
    assert!(before - after >= exclusive, "freed {} < exclusive {exclusive}", before - after);
    assert_eq!(pruned["freed_bytes"].as_u64().unwrap(), before - after);
    d.assert_verified();
    // What is left still restores exactly.
    let oldest_left = &all[all.len() - 4];
    d.rollback(oldest_left);
    assert_eq!(std::fs::read_to_string(root.join("data.bin")).unwrap(), "8".repeat(4104));
    // --keep-within keeps young checkpoints whatever --keep-last says.
    let again = d.json(&["prune", "sb", "--keep-last", "1", "--keep-within", "1h"]);
    assert_eq!(again["pruned"].as_array().unwrap().len(), 0, "{again}");
}

#[test]
fn a_storage_budget_keeps_the_store_under_it() {
    let budget = 64 * 1024;
    let d = TestDaemon::builder().config(&format!("[sandbox.sb.retention]\nbudget_bytes = {budget}\n")).start();
    let root = d.path("sb");
    d.add_sandbox("sb", &root, &[]);
    for i in 0..40u32 {
        write(&root.join("blob.bin"), format!("{i:08}").repeat(1024));
        d.checkpoint("sb");
        let status = d.status();
        let sb = &status.sandboxes[0];
        assert_eq!(sb.budget_bytes, Some(budget));
        let exclusive = sb.exclusive_bytes.unwrap();
        assert!(exclusive <= budget, "checkpoint {i}: {exclusive} bytes over the budget of {budget}");
        assert!(d.store_bytes() <= budget, "checkpoint {i}: the store holds {}", d.store_bytes());
    }
    let status = d.status();
    assert!(status.sandboxes[0].budget_pruned >= 30, "{status:?}");
    let out = d.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("storage budget"));
    d.assert_verified();
}

#[test]
fn a_bad_configuration_file_stops_the_daemon_with_a_clear_error() {
    let stderr = config_error("[retention]\nkeep_forever = true\n");
    assert!(stderr.contains("keep_forever"), "{stderr}");
}

/// Starts snapbackd with a configuration file holding `text`, expects it to
/// stop with exit code 2, and returns what it said.
fn config_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(crate::fixture::binary("snapbackd"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{text:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn export_writes_a_browsable_read_only_tree() {
    let d = TestDaemon::start();
    let root = d.path("sb");
    write(&root.join("src/main.rs"), "fn main() {}\n");
    write(&root.join("README"), "hello\n");
    std::os::unix::fs::symlink("src/main.rs", root.join("link")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    d.add_sandbox("sb", &root, &[]);
    let c = d.checkpoint("sb");
    let expected = snapshot(&root);
    write(&root.join("README"), "changed later\n");

    let out = d.path("export");
    let r = d.json(&["export", &c, out.to_str().unwrap()]);
    assert_eq!((r["files"].as_u64(), r["dirs"].as_u64(), r["symlinks"].as_u64()), (Some(2), Some(2), Some(1)));
    assert_eq!(r["hardlinked"], 0, "exports never hardlink the store's objects");
    assert_eq!(std::fs::read_to_string(out.join("README")).unwrap(), "hello\n");
    // Each file is its own, with the checkpoint's mtime: a write through
    // it cannot reach the store.
    use std::os::unix::fs::MetadataExt;
    let readme = std::fs::metadata(out.join("README")).unwrap();
    assert_eq!(readme.nlink(), 1);
    assert!(matches!(&expected[&b"README".to_vec()], crate::tree::Node::File { mtime_ns, .. }
        if *mtime_ns == readme.mtime() * 1_000_000_000 + readme.mtime_nsec()));
    assert_eq!(std::fs::read_link(out.join("link")).unwrap(), Path::new("src/main.rs"));
    let exported = snapshot(&out);
    assert_eq!(exported.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    use std::os::unix::fs::PermissionsExt;
    for p in ["", "src", "empty"] {
        let mode = std::fs::metadata(out.join(p)).unwrap().permissions().mode();
        assert_eq!(mode & 0o222, 0, "{p:?} is writable");
    }
    assert_eq!(std::fs::metadata(out.join("README")).unwrap().permissions().mode() & 0o222, 0);
    assert_eq!(d.cli(&["export", &c, out.to_str().unwrap()]).status.code(), Some(1), "export over an existing dir");
    assert_eq!(d.cli(&["export", &c, root.join("inside").to_str().unwrap()]).status.code(), Some(1));
    std::fs::set_permissions(out.join("README"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(out.join("README"), "edited in the export").unwrap();
    d.assert_verified();
    // Let the temporary directory be removed.
    for p in ["", "src", "empty"] {
        std::fs::set_permissions(out.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn verify_marks_a_checkpoint_with_a_corrupt_object_broken_and_it_is_never_restored() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    write(&sb.join("a.txt"), "version one of a");
    write(&sb.join("b.txt"), "b never changes");
    d.add_sandbox("sb", &sb, &[]);
    let c1 = d.checkpoint("sb");
    write(&sb.join("a.txt"), "version two of a");
    let c2 = d.checkpoint("sb");
    // As after a power loss: the object of a.txt at c1 holds garbage.
    let hit = crate::fixture::corrupt_in_store(&d.state_dir.join("store"), b"version one of a", b"garbage garbage!");
    assert_eq!(hit, 1);
    let out = d.cli(&["--json", "verify"]);
    assert_eq!(out.status.code(), Some(1), "verify exits 1 when anything is wrong");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["corrupt"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["broken"], serde_json::json!([c1]), "only the checkpoint that needs the object: {v}");
    assert!(d.json(&["show", &c1])["broken"].as_str().unwrap().contains("corrupt"));
    assert!(d.json(&["show", &c2]).get("broken").is_none());
    // Never restored from: refused, the tree untouched.
    let before = crate::tree::snapshot(&sb);
    let out = d.cli(&["rollback", &c1]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is broken"));
    assert_eq!(crate::tree::snapshot(&sb), before);
    // The others still are.
    write(&sb.join("b.txt"), "changed");
    d.rollback(&c2);
    assert_eq!(std::fs::read_to_string(sb.join("b.txt")).unwrap(), "b never changes");
}

#[test]
fn with_sync_durability_checkpoints_and_rollbacks_work_the_same() {
    let d = TestDaemon::builder().config("durability = \"sync\"\n").start();
    let sb = d.path("sb");
    write(&sb.join("f"), "one");
    d.add_sandbox("sb", &sb, &[]);
    let c = d.checkpoint("sb");
    write(&sb.join("f"), "two");
    write(&sb.join("g"), "new");
    let r = d.rollback(&c);
    assert_eq!((r.restored, r.deleted), (1, 1));
    assert_eq!(std::fs::read_to_string(sb.join("f")).unwrap(), "one");
    d.assert_verified();
    let bad = config_error("durability = \"sometimes\"\n");
    assert!(bad.contains("sometimes"), "{bad}");
}
