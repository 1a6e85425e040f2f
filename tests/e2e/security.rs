//! The shared root daemon attacked by a user it serves: a second real uid
//! (`nobody`, through `setpriv`) on a socket it may reach, trying to make
//! the daemon read or write what it could not reach itself.

use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};

use crate::fixture::{TestDaemon, as_nobody, daemon_for_nobody, raw_as_nobody, sh_as_nobody, store_holds, write};
use crate::tree::snapshot;

const NOBODY: u32 = 65534;
const SECRET: &str = "root-only secret 7f3a9c";

/// A daemon whose socket `nobody` may use, with its temporary directory
/// searchable by everyone (the sandboxes live in it).
fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Makes a directory (and its parents) owned by nobody.
fn nobody_dir(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// Writes a file (and its missing parents) owned by nobody.
fn nobody_file(p: &Path, data: &str) {
    write(p, data);
    chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// A root-only directory outside every sandbox, holding secrets: what an
/// attack would make the daemon read, write or delete.
fn victim(d: &TestDaemon) -> PathBuf {
    let v = d.path("victim");
    for f in ["etc/shadow", "etc/passwd", "store/keep"] {
        write(&v.join(f), SECRET);
        mode(&v.join(f), 0o600);
    }
    mode(&v.join("etc"), 0o755);
    v
}

fn run_ok(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts that the CLI refused with exit 1 and a message holding `needle`.
fn refused(out: &std::process::Output, needle: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    assert!(stderr.contains(needle), "{what}: {stderr:?} should say {needle:?}");
}

#[test]
fn a_swapped_parent_a_replaced_root_or_a_swapped_store_parent_reach_nothing_outside() {
    let test = "a_swapped_parent_a_replaced_root_or_a_swapped_store_parent_reach_nothing_outside";
    let Some((setpriv, mut d)) = daemon_for_nobody(test) else { return };
    let victim = victim(&d);
    let before = snapshot(&victim);
    let h = d.path("h");
    nobody_dir(&h);
    let nobody = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    let hs = |rel: &str| h.join(rel).to_str().unwrap().to_owned();

    // Four sandboxes of nobody's, each attacked one way.
    for dir in ["x/etc", "y", "z", "w"] {
        nobody_dir(&h.join(dir));
        nobody_file(&h.join(dir).join("mine"), "nobody's own");
    }
    nobody_dir(&h.join("x"));
    nobody_dir(&h.join("s"));
    let add = |dir: &str, name: &str, extra: &[&str]| {
        let dir = hs(dir);
        let mut args = vec!["--json", "sandbox", "add", &*dir, "--name", name];
        args.extend_from_slice(extra);
        run_ok(&nobody(&args))
    };
    add("x/etc", "parent", &[]);
    add("y", "replaced", &[]);
    add("z", "renamed", &[]);
    let store = hs("s/store");
    add("w", "storeswap", &["--store", &store]);
    let mut ids = std::collections::HashMap::new();
    for name in ["parent", "replaced", "renamed", "storeswap"] {
        ids.insert(name, run_ok(&nobody(&["--json", "checkpoint", name]))["id"].as_str().unwrap().to_owned());
    }

    // The attacks, made by nobody in directories it owns.
    let (v, hp) = (victim.to_str().unwrap(), h.to_str().unwrap());
    sh_as_nobody(&setpriv, &format!("cd {hp} && mv x x-away && ln -s {v} x"));
    sh_as_nobody(&setpriv, &format!("cd {hp} && mv y y-away && ln -s {v}/etc y"));
    sh_as_nobody(&setpriv, &format!("cd {hp} && mv z z-away && mkdir z && echo planted > z/new"));
    sh_as_nobody(&setpriv, &format!("cd {hp} && mv s s-away && ln -s {v} s"));

    let refuse_all = |nobody: &dyn Fn(&[&str]) -> std::process::Output| {
        for name in ["parent", "replaced", "renamed"] {
            let id = &ids[name];
            for args in [vec!["checkpoint", name], vec!["diff", id], vec!["rollback", id]] {
                refused(&nobody(&args), "no longer the directory that was registered", &format!("{name}: {args:?}"));
            }
        }
        let sandboxes = run_ok(&nobody(&["--json", "sandbox", "list"]));
        for s in sandboxes["sandboxes"].as_array().unwrap() {
            if s["name"] != "storeswap" {
                assert_eq!(s["state"], "moved", "{s}");
                assert!(s["moved"].as_str().is_some(), "{s}");
            }
        }
        let status = run_ok(&nobody(&["--json", "status"]));
        for s in status["sandboxes"].as_array().unwrap() {
            if s["name"] != "storeswap" {
                assert_eq!(s["state"], "moved", "{s}");
            }
        }
    };
    refuse_all(&nobody);
    // The checkpoints stay readable: an export of one holds nobody's own
    // file, and nothing from outside.
    let out = d.path("out");
    nobody_dir(&out);
    let e = run_ok(&nobody(&["--json", "export", &ids["parent"], out.join("parent").to_str().unwrap()]));
    assert_eq!(e["files"], 1, "{e}");
    assert_eq!(std::fs::read_to_string(out.join("parent/mine")).unwrap(), "nobody's own");

    // After a restart, which reopens every root and store by name, too.
    d.restart();
    refuse_all(&|args: &[&str]| as_nobody(&setpriv, &d.socket, args));
    let r = as_nobody(&setpriv, &d.socket, &["checkpoint", "storeswap"]);
    refused(&r, "the store", "a store whose parent was swapped");
    refused(&r, "no longer the directory that was registered", "a store whose parent was swapped");

    assert_eq!(snapshot(&victim), before, "nothing outside was written, deleted or chmodded");
    assert!(!store_holds(&d.state_dir.join("store"), SECRET.as_bytes()), "no secret in the store");
    assert!(!store_holds(&h.join("s-away/store"), SECRET.as_bytes()), "no secret in the store");

    // Registering again through the swapped path reaches root's directory,
    // which nobody does not own; the renamed root's owner may take the new
    // directory on, and its checkpoints go on.
    refused(&as_nobody(&setpriv, &d.socket, &["sandbox", "add", &hs("x/etc")]), "only its owner", "re-add via symlink");
    let again = run_ok(&as_nobody(&setpriv, &d.socket, &["--json", "sandbox", "add", &hs("z")]));
    assert_eq!(again["state"], "active", "{again}");
    let c = run_ok(&as_nobody(&setpriv, &d.socket, &["--json", "checkpoint", "renamed"]));
    assert_eq!(c["files"], 1, "the new directory's one file: {c}");
    assert_eq!(snapshot(&victim), before);
}

#[test]
fn root_only_files_are_withheld_from_a_users_export_and_exported_for_root() {
    let test = "root_only_files_are_withheld_from_a_users_export_and_exported_for_root";
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let sb = d.path("theirs");
    nobody_dir(&sb);
    nobody_file(&sb.join("own.sh"), "#!/bin/sh\necho mine\n");
    mode(&sb.join("own.sh"), 0o755);
    let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(978_307_200); // 2001
    std::fs::File::options().write(true).open(sb.join("own.sh")).unwrap().set_modified(old).unwrap();
    // Placed by root: unreadable to nobody, by mode or by a closed directory.
    write(&sb.join("root-600"), SECRET);
    mode(&sb.join("root-600"), 0o600);
    write(&sb.join("root-000"), SECRET);
    mode(&sb.join("root-000"), 0o000);
    write(&sb.join("closed/open-644"), SECRET);
    mode(&sb.join("closed"), 0o700);
    write(&sb.join("public-644"), "anyone may read this");
    nix_mkfifo(&sb.join("pipe"));
    let nobody = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    run_ok(&nobody(&["--json", "sandbox", "add", sb.to_str().unwrap()]));
    let id = run_ok(&nobody(&["--json", "checkpoint", "theirs"]))["id"].as_str().unwrap().to_owned();

    let out = d.path("out");
    nobody_dir(&out);
    let dest = out.join("e");
    let e = run_ok(&nobody(&["--json", "export", &id, dest.to_str().unwrap()]));
    let mut withheld: Vec<&str> =
        e["withheld"].as_array().unwrap().iter().map(|w| w["path"]["text"].as_str().unwrap()).collect();
    withheld.sort();
    assert_eq!(withheld, ["closed/open-644", "root-000", "root-600"], "{e}");
    for w in e["withheld"].as_array().unwrap() {
        assert!(w["why"].as_str().unwrap().contains("uid 65534"), "{w}");
    }
    let skipped = e["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{e}");
    assert_eq!(skipped[0]["path"]["text"], "pipe");
    assert!(skipped[0]["why"].as_str().unwrap().contains("FIFO"));
    for f in ["root-600", "root-000", "closed/open-644"] {
        assert!(!dest.join(f).exists(), "{f} was written out for nobody");
    }
    // What it got is its own, and faithful: mode less write bits, the
    // recorded mtime, a file of its own (not the store's inode).
    let script = std::fs::symlink_metadata(dest.join("own.sh")).unwrap();
    assert_eq!((script.uid(), script.mode() & 0o7777, script.nlink()), (NOBODY, 0o555, 1));
    assert_eq!(script.modified().unwrap(), old);
    assert_eq!(std::fs::read_to_string(dest.join("public-644")).unwrap(), "anyone may read this");
    for entry in walkdir(&dest) {
        assert_eq!(std::fs::symlink_metadata(&entry).unwrap().uid(), NOBODY, "{} is not nobody's", entry.display());
    }
    let human = nobody(&["export", &id, out.join("h").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("withheld: 3 paths") && text.contains("root-600"), "{text}");

    // Root gets everything.
    let all = d.json(&["export", &id, d.path("root-out").to_str().unwrap()]);
    assert_eq!(all["withheld"].as_array().unwrap().len(), 0, "{all}");
    assert_eq!(std::fs::read_to_string(d.path("root-out/root-600")).unwrap(), SECRET);
    assert_eq!(std::fs::read_to_string(d.path("root-out/closed/open-644")).unwrap(), SECRET);
}

fn nix_mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", p.display());
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_user_cannot_export_where_it_could_not_write_nor_through_a_symlinked_parent() {
    let test = "a_user_cannot_export_where_it_could_not_write_nor_through_a_symlinked_parent";
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let sb = d.path("theirs");
    nobody_dir(&sb);
    nobody_file(&sb.join("f"), "nobody's");
    let nobody = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    run_ok(&nobody(&["--json", "sandbox", "add", sb.to_str().unwrap()]));
    let id = run_ok(&nobody(&["--json", "checkpoint", "theirs"]))["id"].as_str().unwrap().to_owned();

    // Root's directories, and another user's home (uid 65533, 0755).
    let roots = d.path("roots");
    std::fs::create_dir(&roots).unwrap();
    mode(&roots, 0o755);
    let home = d.path("home-65533");
    std::fs::create_dir(&home).unwrap();
    chown(&home, Some(65533), Some(65533)).unwrap();
    mode(&home, 0o755);
    let etc = PathBuf::from(format!("/etc/snapback-export-test-{}", std::process::id()));
    for dest in [roots.join("e"), home.join("e"), etc.clone()] {
        refused(&nobody(&["export", &id, dest.to_str().unwrap()]), "ermission denied", &dest.display().to_string());
        assert!(!dest.exists(), "{} was created", dest.display());
    }
    assert_eq!(std::fs::read_dir(&roots).unwrap().count(), 0, "nothing left behind in root's directory");
    assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0, "nothing left behind in the other home");

    // Through a symlinked parent: the CLI resolves its user's own links,
    // so the request is made raw, as a client that did not would send it.
    let mine = d.path("mine");
    nobody_dir(&mine);
    let link = d.path("link-to-roots");
    symlink(&roots, &link).unwrap();
    let line = serde_json::json!({
        "type": "export", "checkpoint": id, "dir": {"text": link.join("e").to_str().unwrap()}
    });
    let e = raw_as_nobody(&setpriv, &d.socket, &line.to_string());
    assert_eq!(e["type"], "error", "{e}");
    assert!(e["message"].as_str().unwrap().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read_dir(&roots).unwrap().count(), 0);
    // And where it may write, it can.
    run_ok(&nobody(&["--json", "export", &id, mine.join("e").to_str().unwrap()]));
    assert_eq!(std::fs::read_to_string(mine.join("e/f")).unwrap(), "nobody's");
}

#[test]
fn registration_refuses_the_root_ancestors_of_the_state_and_foreign_or_full_stores() {
    let test = "registration_refuses_the_root_ancestors_of_the_state_and_foreign_or_full_stores";
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let sb = d.path("sb");
    std::fs::create_dir(&sb).unwrap();
    let at_root = ["/objects", "/packs", "/packs.db", "/snapback-store"];
    let existed: Vec<bool> = at_root.iter().map(|p| Path::new(p).exists()).collect();
    let sbs = sb.to_str().unwrap();
    let state = d.state_dir.to_str().unwrap();
    let tmp = d.dir.path().to_str().unwrap();
    refused(&d.cli(&["sandbox", "add", "/"]), "/ cannot be a sandbox", "add /");
    refused(&d.cli(&["sandbox", "add", tmp]), "state directory", "add an ancestor of the state directory");
    refused(&d.cli(&["sandbox", "add", state]), "state directory", "add the state directory");
    refused(&d.cli(&["sandbox", "add", sbs, "--store", "/"]), "/ cannot be a store", "--store /");
    let now: Vec<bool> = at_root.iter().map(|p| Path::new(p).exists()).collect();
    assert_eq!(now, existed, "nothing created at /");

    // nobody's sandbox, with a store that is root's, or is full of other things.
    let theirs = d.path("theirs");
    nobody_dir(&theirs);
    let foreign = d.path("foreign");
    write(&foreign.join("data"), "root's");
    let full = d.path("full");
    nobody_dir(&full);
    write(&full.join("notes"), "nobody's notes");
    let nobody = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    let ts = theirs.to_str().unwrap();
    refused(&nobody(&["sandbox", "add", ts, "--store", foreign.to_str().unwrap()]), "belongs to uid 0", "foreign");
    refused(&nobody(&["sandbox", "add", ts, "--store", full.to_str().unwrap()]), "not empty", "full");
    // A directory of its own dressed up as a store: the daemon would read
    // and write, as root, what the user controls.
    let fake = d.path("fake-store");
    nobody_dir(&fake);
    write(&fake.join("snapback-store"), "a snapback object store");
    nobody_dir(&fake.join("objects"));
    refused(&nobody(&["sandbox", "add", ts, "--store", fake.to_str().unwrap()]), "not empty", "a planted store");
    refused(&nobody(&["sandbox", "add", ts, "--store", "/etc/snapback-test-store"]), "ermission denied", "in /etc");
    assert!(!Path::new("/etc/snapback-test-store").exists());
    assert_eq!(snapshot(&foreign).len(), 1);
    assert_eq!(snapshot(&full).len(), 1, "nothing written into the full directory");
    assert_eq!(d.json(&["sandbox", "list"])["sandboxes"].as_array().unwrap().len(), 0);
    // A new directory of its own is fine, and becomes the daemon's.
    nobody_dir(&d.path("parent-of-store"));
    let own_in = d.path("parent-of-store/store");
    run_ok(&nobody(&["--json", "sandbox", "add", ts, "--store", own_in.to_str().unwrap()]));
    let st = std::fs::metadata(&own_in).unwrap();
    assert_eq!((st.uid(), st.mode() & 0o777), (0, 0o700));
}

/// Sends one raw request line as root (after the hello).
fn raw_as_root(socket: &Path, line: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut answer = String::new();
    s.write_all(b"{\"type\":\"hello\",\"protocol\":1,\"client\":\"raw test\"}\n").unwrap();
    reader.read_line(&mut answer).unwrap();
    answer.clear();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn every_path_field_with_a_nul_or_a_relative_path_is_an_invalid_request() {
    let test = "every_path_field_with_a_nul_or_a_relative_path_is_an_invalid_request";
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let nul = "/tmp/a\u{0}b";
    let lines = [
        serde_json::json!({"type": "sandbox_add", "path": {"text": "relative/dir"}}),
        serde_json::json!({"type": "sandbox_add", "path": {"text": nul}}),
        serde_json::json!({"type": "sandbox_add", "path": {"bytes": "L3RtcC9hAGI="}}), // "/tmp/a\0b"
        serde_json::json!({"type": "sandbox_add", "path": {"text": "/tmp"}, "store": {"text": "store"}}),
        serde_json::json!({"type": "sandbox_add", "path": {"text": "/tmp"}, "store": {"text": nul}}),
        serde_json::json!({"type": "export", "checkpoint": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "dir": {"text": "out"}}),
        serde_json::json!({"type": "export", "checkpoint": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "dir": {"text": nul}}),
        serde_json::json!({"type": "rollback", "checkpoint": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "paths": [{"text": "a\u{0}"}]}),
        serde_json::json!({"type": "rollback", "checkpoint": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "paths": [{"text": "../up"}]}),
        serde_json::json!({"type": "plan_rollback", "plan": "p", "checkpoint": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
                           "paths": [{"text": "a\u{0}"}]}),
    ];
    for line in lines {
        // As a user and as root: the check is the decoder's, before anything.
        let e = raw_as_nobody(&setpriv, &d.socket, &line.to_string());
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("invalid_request")), "{line}: {e}");
        let answer = raw_as_root(&d.socket, &line.to_string());
        assert_eq!(answer["code"], "invalid_request", "{line}: {answer}");
    }
}

#[test]
fn a_users_patch_withholds_what_it_could_not_read_and_roots_does_not() {
    let test = "a_users_patch_withholds_what_it_could_not_read_and_roots_does_not";
    let Some((setpriv, d)) = daemon_for_nobody(test) else { return };
    let sb = d.path("theirs");
    nobody_dir(&sb);
    nobody_file(&sb.join("own.txt"), "mine v1\n");
    write(&sb.join("root-600"), format!("{SECRET} v1\n"));
    mode(&sb.join("root-600"), 0o600);
    write(&sb.join("closed/open-644"), format!("{SECRET} v1\n"));
    mode(&sb.join("closed"), 0o700);
    let nobody = |args: &[&str]| as_nobody(&setpriv, &d.socket, args);
    run_ok(&nobody(&["--json", "sandbox", "add", sb.to_str().unwrap()]));
    let a = run_ok(&nobody(&["--json", "checkpoint", "theirs"]))["id"].as_str().unwrap().to_owned();
    nobody_file(&sb.join("own.txt"), "mine v2\n");
    write(&sb.join("root-600"), format!("{SECRET} v2\n"));
    write(&sb.join("closed/open-644"), format!("{SECRET} v2\n"));
    let b = run_ok(&nobody(&["--json", "checkpoint", "theirs"]))["id"].as_str().unwrap().to_owned();

    for to in [Some(b.as_str()), None] {
        let mut args = vec!["diff", a.as_str()];
        args.extend(to);
        let patch = nobody(&[&args[..], &["--patch"]].concat());
        let text = String::from_utf8_lossy(&patch.stdout);
        assert!(patch.status.success(), "{}", String::from_utf8_lossy(&patch.stderr));
        assert!(!text.contains(SECRET), "the patch gave nobody a root-only file:\n{text}");
        assert!(text.contains("-mine v1\n+mine v2\n"), "its own file is diffed:\n{text}");
        for f in ["root-600", "closed/open-644"] {
            assert!(text.contains(&format!("# snapback: {f} withheld: uid 65534 could not")), "{f}:\n{text}");
        }
        let stat = run_ok(&nobody(&[&["--json"], &args[..], &["--stat"]].concat()));
        let withheld: Vec<&str> = stat["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["stat"]["withheld"].is_string())
            .map(|c| c["path"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(withheld, ["closed/open-644", "root-600"], "{stat}");
        assert!(!stat.to_string().contains(SECRET));
    }
    // The log's counts go through the same rule: nobody's own line only.
    let log = run_ok(&nobody(&["--json", "log", "theirs", "--stat"]));
    assert_eq!(log["entries"][0]["total"], serde_json::json!({"files": 3, "added": 1, "removed": 1}), "{log}");
    // Root reads everything.
    let all = d.cli(&["diff", &a, &b, "--patch"]);
    assert!(String::from_utf8_lossy(&all.stdout).contains(&format!("+{SECRET} v2")));
}
