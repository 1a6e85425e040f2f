//! Authorization by the peer's uid: another user can neither see nor touch
//! root's sandboxes, and registers only directories it owns.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::{Command, Output};

use crate::fixture::{TestDaemon, binary, root_or_skip, tool_or_skip, write};
use crate::tree::snapshot;

const NOBODY: u32 = 65534;

/// Runs the CLI as `nobody` (group `nogroup`) through `setpriv`.
fn as_nobody(setpriv: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(setpriv)
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(binary("snapback"))
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap()
}

#[test]
fn another_uid_cannot_see_or_touch_roots_sandbox_and_registers_only_its_own() {
    let test = "another_uid_cannot_see_or_touch_roots_sandbox_and_registers_only_its_own";
    if !root_or_skip(test) {
        return;
    }
    let Some(setpriv) = tool_or_skip("setpriv", test) else { return };
    // The socket is group nogroup, so nobody may connect at all: what it
    // may then do is up to the daemon.
    let d = TestDaemon::start_with_config(Some("socket_group = \"nogroup\"\n"));
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
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
    assert_eq!(d.json(&["list", "mine"])["checkpoints"].as_array().unwrap().len(), 1);
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
