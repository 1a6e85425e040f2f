//! The CLI contract: exit codes, `--json`, and the daemon's lifecycle as a
//! user meets it.

use std::process::{Command, Stdio};

use crate::fixture::{TestDaemon, binary};

#[test]
fn exit_code_3_and_a_hint_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(binary("snapback")).args(["status", "--socket"]).arg(&socket).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running") && err.contains("snapbackd"), "{err}");
}

#[test]
fn exit_code_2_on_usage_errors() {
    let out = Command::new(binary("snapback")).args(["checkpoint"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(binary("snapback")).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(binary("snapback")).args(["checkpoint", "s", "--label", "novalue"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn refusals_exit_1_with_a_json_error_and_the_daemon_keeps_serving() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    d.add_sandbox("sb", &sb, &[]);
    let cases: Vec<Vec<String>> = vec![
        vec!["checkpoint".into(), "no-such-sandbox".into()],
        vec!["show".into(), "01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
        vec!["show".into(), "not-an-id!".into()],
        vec!["diff".into(), "01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
        vec!["rollback".into(), "01ARZ3NDEKTSV4RRFFQ69G5FAV".into()],
        vec!["sandbox".into(), "add".into(), d.path("does-not-exist").to_str().unwrap().into()],
        vec!["sandbox".into(), "add".into(), sb.join("inner").to_str().unwrap().into()],
        vec!["sandbox".into(), "add".into(), d.path("").to_str().unwrap().into()],
        vec!["sandbox".into(), "add".into(), d.state_dir.to_str().unwrap().into()],
        vec!["sandbox".into(), "add".into(), d.state_dir.join("store").to_str().unwrap().into()],
        vec!["sandbox".into(), "add".into(), sb.to_str().unwrap().into()],
        vec![
            "sandbox".into(),
            "add".into(),
            d.path("other").to_str().unwrap().into(),
            "--store".into(),
            sb.join("store").to_str().unwrap().into(),
        ],
        vec!["sandbox".into(), "add".into(), d.path("other").to_str().unwrap().into(), "--exclude".into(), "[".into()],
    ];
    std::fs::create_dir_all(sb.join("inner")).unwrap();
    std::fs::create_dir_all(d.path("other")).unwrap();
    for args in cases {
        let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
        all.push("--json");
        let out = d.cli(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error document");
        assert!(!doc["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(d.status().sandboxes.len(), 1, "after {args:?}");
    }
    assert!(!sb.join("store").exists(), "a refused add created its store inside the sandbox");
}

#[test]
fn rollback_json_carries_counts_and_changed_paths() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    std::fs::write(sb.join("a"), "1").unwrap();
    std::fs::write(sb.join("b"), "1").unwrap();
    d.add_sandbox("sb", &sb, &[]);
    let c = d.checkpoint("sb");
    std::fs::write(sb.join("a"), "2").unwrap();
    std::fs::remove_file(sb.join("b")).unwrap();
    std::fs::write(sb.join("c"), "new").unwrap();
    let r = d.rollback(&c);
    assert_eq!((r.restored, r.created, r.deleted), (1, 1, 1));
    assert_eq!(r.unchanged, 0);
    let changed: Vec<String> = r.changed.iter().map(|p| p.display()).collect();
    assert_eq!(changed, ["a", "b", "c"]);
    assert_eq!(r.removed[0].display(), "c");

    // Human output is short and names the undo.
    let c2 = d.checkpoint("sb");
    std::fs::write(sb.join("a"), "3").unwrap();
    let out = d.cli(&["rollback", &c2]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 restored, 0 created, 0 deleted"), "{text}");
    assert!(text.contains("undo with: snapback rollback"), "{text}");
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start() {
    let d = TestDaemon::start();
    let other_state = d.path("state2");
    let out = TestDaemon::spawn(&d.socket, &other_state).wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    d.json(&["status"]);
}

#[test]
fn a_stale_socket_is_replaced_and_the_socket_is_removed_on_sigterm() {
    let mut d = TestDaemon::start();
    d.stop();
    assert!(!d.socket.exists(), "SIGTERM left the socket behind");
    // A stale socket: bound, nobody listening.
    let stale = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
    drop(stale);
    assert!(d.socket.exists());
    d.restart();
    d.json(&["status"]);
}

#[test]
fn the_daemon_refuses_a_catalogue_from_a_newer_schema() {
    let mut d = TestDaemon::start();
    d.stop();
    let conn = snapback_daemon::testing::connect_catalogue(&d.state_dir.join("catalogue.db")).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);
    let out = TestDaemon::spawn(&d.socket, &d.state_dir).wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schema version 999"), "{err}");
}

#[test]
fn demo_runs_end_to_end() {
    let out = Command::new(binary("snapback"))
        .args(["demo", "--json"])
        .env("TMPDIR", tempfile::tempdir().unwrap().keep())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["restored_exactly"], true);
    assert_eq!(doc["rollback"]["deleted"], 1);
}

#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    d.add_sandbox("sb", &sb, &[]);
    let c = d.checkpoint("sb");
    for i in 0..3000 {
        std::fs::write(sb.join(format!("file-with-a-long-enough-name-{i:05}")), "x").unwrap();
    }
    // `snapback diff C | head -1`: the reader goes away after one line.
    let mut child = Command::new(binary("snapback"))
        .args(["diff", &c, "--socket"])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{stderr}");
}

#[test]
fn json_errors_of_every_kind_are_one_document_with_a_code() {
    let d = TestDaemon::start();
    let doc = |args: &[&str]| {
        let out = Command::new(binary("snapback")).args(args).arg("--socket").arg(&d.socket).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), v["error"]["code"].as_str().unwrap_or_default().to_owned(), v)
    };
    let (exit, code, v) = doc(&["--json", "list", "--bogus"]);
    assert_eq!((exit, code.as_str()), (Some(2), "usage"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--bogus"), "{v}");
    let (exit, code, v) = doc(&["--json", "checkpoint"]);
    assert_eq!((exit, code.as_str()), (Some(2), "usage"), "{v}");
    let (exit, code, v) = doc(&["--json", "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]);
    assert_eq!((exit, code.as_str()), (Some(1), "not_found"), "{v}");
    // As root, the hint names the system service.
    let out = Command::new(binary("snapback")).args(["status", "--socket", "/nonexistent/s.sock"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        assert!(err.contains("`systemctl start snapbackd`"), "{err}");
    } else {
        assert!(err.contains("`systemctl --user start snapbackd`"), "{err}");
    }
}

#[test]
fn refused_operations_leave_no_checkpoint_and_say_what_is_wrong() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    std::fs::write(sb.join("f"), "one").unwrap();
    d.add_sandbox("sb", &sb, &["--exclude", "cache"]);
    let c1 = d.checkpoint("sb");
    std::fs::write(sb.join("f"), "two").unwrap();
    let step = d.checkpoint("sb");
    std::fs::write(sb.join("f"), "three").unwrap();
    d.checkpoint("sb");
    let count = || d.list(&["sb"]).len();
    let before = count();
    let refused = |args: &[&str], needle: &str| {
        let out = d.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err:?} should say {needle:?}");
    };
    refused(&["revert", &step], "changed again later");
    refused(&["rollback", &c1, "--path", "does/not/exist"], "neither in checkpoint");
    refused(&["rollback", &c1, "--path", "cache/x"], "excluded");
    assert_eq!(count(), before, "a refused operation left a checkpoint");
    assert_eq!(std::fs::read_to_string(sb.join("f")).unwrap(), "three");

    // A pruned checkpoint is told apart from an unknown id.
    d.json(&["prune", "sb", "--keep-last", "1"]);
    refused(&["show", &c1], "was pruned by `snapback prune` on");
    refused(&["rollback", &c1[..12]], "was pruned by");
    refused(&["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"], "no checkpoint");
}

#[test]
fn the_daemon_log_has_no_colour_codes_when_it_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(binary("snapbackd"))
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("SNAPBACK_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crate::fixture::eventually(std::time::Duration::from_secs(60), std::time::Duration::from_millis(10), || {
        snapback::Client::connect(&dir.path().join("s.sock")).map(drop).map_err(|e| e.to_string())
    });
    // SAFETY: signalling a child we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
}

#[test]
fn answers_of_a_hundred_thousand_paths_arrive_whole() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    std::fs::create_dir_all(&sb).unwrap();
    d.add_sandbox("sb", &sb, &[]);
    let empty = d.checkpoint("sb");
    // An install's worth of new files, with names long enough that the
    // answers run to several MiB.
    let n = 100_000;
    for i in 0..n {
        if i % 1000 == 0 {
            std::fs::create_dir(sb.join(format!("pkg-{:03}", i / 1000))).unwrap();
        }
        std::fs::write(sb.join(format!("pkg-{:03}/module-file-{i:06}.js", i / 1000)), "").unwrap();
    }
    let paths = n + n / 1000;
    let list = |v: &serde_json::Value, k: &str| v[k].as_array().unwrap_or_else(|| panic!("{k}")).len();

    let diff = d.json(&["diff", &empty]);
    assert_eq!(list(&diff, "changes"), paths);
    assert!(serde_json::to_vec(&diff).unwrap().len() > 4 << 20, "the answer is several lines long");
    let text = d.cli(&["diff", &empty]);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let out = String::from_utf8_lossy(&text.stdout);
    assert_eq!(out.lines().filter(|l| l.starts_with("A  ")).count(), paths);
    assert!(
        out.trim_end().ends_with(&format!("{paths} changes from {empty} to the live tree")),
        "{}",
        &out[out.len() - 200..]
    );

    let rollback = d.json(&["rollback", &empty]);
    assert_eq!((list(&rollback, "changed"), list(&rollback, "removed")), (paths, paths));
    assert_eq!(std::fs::read_dir(&sb).unwrap().count(), 0);
    let undo = d.json(&["undo", "sb"]);
    assert_eq!((list(&undo, "changed"), list(&undo, "created_paths")), (paths, paths));
    assert!(sb.join("pkg-099/module-file-099999.js").exists());
}
