//! Authorization by the peer's uid: another user can neither see nor touch
//! root's sandboxes, and registers only directories it owns.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::Output;

use crate::fixture::{TestDaemon, daemon_for_nobody, root_or_skip, write};
use crate::tree::snapshot;

const NOBODY: u32 = 65534;

fn as_nobody(setpriv: &Path, socket: &Path, args: &[&str]) -> Output {
    crate::fixture::as_nobody(setpriv, socket, args)
}

#[test]
fn another_uid_cannot_see_or_touch_roots_sandbox_and_registers_only_its_own() {
    let test = "another_uid_cannot_see_or_touch_roots_sandbox_and_registers_only_its_own";
    // The socket is group nogroup, so nobody may connect at all: what it
    // may then do is up to the daemon.
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let mine = d.path("mine");
    write(&mine.join("secret.txt"), "root's");
    d.add_sandbox("mine", &mine, &[]);
    let id = d.json(&["checkpoint", "mine", "--plan", "root-plan"])["id"].as_str().unwrap().to_owned();
    write(&mine.join("secret.txt"), "root's, edited");
    let before = snapshot(&mine);

    let run = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    let listed = run(&["--json", "list"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["checkpoints"].as_array().unwrap().len(), 0, "{listed}");
    let sandboxes: serde_json::Value = serde_json::from_slice(&run(&["--json", "sandbox", "list"]).stdout).unwrap();
    assert_eq!(sandboxes["sandboxes"].as_array().unwrap().len(), 0, "{sandboxes}");
    for args in [
        vec!["checkpoint", "mine"],
        vec!["show", &id],
        vec!["diff", &id],
        vec!["rollback", &id],
        vec!["revert", &id],
        vec!["undo", "mine"],
        vec!["plan", "show", "root-plan"],
        vec!["plan", "apply", "root-plan"],
        vec!["prune", "mine"],
        vec!["sandbox", "remove", "mine", "--purge"],
    ] {
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("no ") || stderr.contains("not"), "{args:?}: {stderr}");
    }
    assert_eq!(snapshot(&mine), before, "nothing of root's sandbox changed");
    assert_eq!(d.list(&["mine"]).len(), 1);
    assert_eq!(d.json(&["plan", "show", "root-plan"])["state"], "active");

    // Registering root's directory, or a fresh one root owns: refused.
    let out = run(&["sandbox", "add", mine.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only its owner or root"));
    // A directory nobody owns: registered, owned by nobody, and root sees it.
    let theirs = d.path("theirs");
    write(&theirs.join("f"), "nobody's");
    chown(&theirs, Some(NOBODY), Some(NOBODY)).unwrap();
    chown(theirs.join("f"), Some(NOBODY), Some(NOBODY)).unwrap();
    let out = run(&["--json", "sandbox", "add", theirs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let added: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(added["owner_uid"], NOBODY);
    let out = run(&["--json", "checkpoint", "theirs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all = d.json(&["sandbox", "list"]);
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 2, "root sees every sandbox: {all}");
}

#[test]
fn a_users_sandbox_never_gets_setuid_or_setgid_bits_on_entries_it_does_not_own() {
    use std::os::unix::fs::MetadataExt;
    if !root_or_skip("a_users_sandbox_never_gets_setuid_or_setgid_bits_on_entries_it_does_not_own") {
        return;
    }
    let d = TestDaemon::start();
    let sb = d.path("theirs");
    write(&sb.join("own-setuid"), "nobody's own");
    write(&sb.join("root-setuid"), "planted by root");
    write(&sb.join("root-setuid-kept"), "planted by root, kept");
    std::fs::create_dir(sb.join("shared")).unwrap();
    for p in ["", "own-setuid", "shared"] {
        chown(sb.join(p), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let mode = |p: &str, m: u32| std::fs::set_permissions(sb.join(p), std::fs::Permissions::from_mode(m)).unwrap();
    mode("own-setuid", 0o4755);
    mode("root-setuid", 0o6755);
    mode("root-setuid-kept", 0o6755);
    mode("shared", 0o2775);
    // Registered by root for its owner, nobody.
    let info = d.add_sandbox("theirs", &sb, &[]);
    assert_eq!(info["owner_uid"], NOBODY);
    let id = d.checkpoint("theirs");
    for p in ["own-setuid", "root-setuid"] {
        std::fs::remove_file(sb.join(p)).unwrap();
    }
    std::fs::remove_dir(sb.join("shared")).unwrap();
    // Rewritten in place, special bits and all: restored in place too.
    let kept_ino = std::fs::metadata(sb.join("root-setuid-kept")).unwrap().ino();
    std::fs::write(sb.join("root-setuid-kept"), "rewritten").unwrap();
    mode("root-setuid-kept", 0o6755);
    d.rollback(&id);
    let meta = |p: &str| std::fs::symlink_metadata(sb.join(p)).unwrap();
    // What nobody owned comes back as it was, special bits and all.
    assert_eq!((meta("own-setuid").uid(), meta("own-setuid").mode() & 0o7777), (NOBODY, 0o4755));
    assert_eq!((meta("shared").uid(), meta("shared").mode() & 0o7777), (NOBODY, 0o2775));
    // Root's file keeps its owner and content, never its setuid/setgid.
    assert_eq!((meta("root-setuid").uid(), meta("root-setuid").mode() & 0o7777), (0, 0o755));
    assert_eq!(std::fs::read_to_string(sb.join("root-setuid")).unwrap(), "planted by root");
    let kept = meta("root-setuid-kept");
    assert_eq!((kept.ino(), kept.uid(), kept.mode() & 0o7777), (kept_ino, 0, 0o755));
    assert_eq!(std::fs::read_to_string(sb.join("root-setuid-kept")).unwrap(), "planted by root, kept");
}
