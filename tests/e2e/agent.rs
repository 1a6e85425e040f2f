//! What agents use: `snapback hook` fed recorded hook JSON, `snapback
//! exec`'s pre/post pair, and the progress bar drawn on a terminal.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::fixture::{TestDaemon, binary, payload, write};

/// A `PreToolUse` event as Claude Code sends it to a hook's stdin.
fn claude_pre_tool_use(cwd: &str) -> String {
    serde_json::json!({
        "session_id": "9f1c2e4a-claude-session",
        "transcript_path": "/root/.claude/projects/x/9f1c2e4a.jsonl",
        "cwd": cwd,
        "permission_mode": "default",
        "hook_event_name": "PreToolUse",
        "tool_name": "Bash",
        "tool_input": {"command": "rm -rf build", "description": "Clean the build"},
        "tool_use_id": "toolu_01ABC"
    })
    .to_string()
}

/// Runs `snapback hook` with `input` on stdin.
fn hook(socket: &std::path::Path, input: &str, extra: &[&str]) -> Output {
    hook_in(socket, input, extra, None)
}

/// Runs `snapback hook` with `input` on stdin and its notice markers in
/// `runtime` (its `XDG_RUNTIME_DIR`; by default the socket's directory,
/// the test's own).
fn hook_in(socket: &std::path::Path, input: &str, extra: &[&str], runtime: Option<&std::path::Path>) -> Output {
    let runtime = runtime.or(socket.parent()).unwrap();
    let mut child = Command::new(binary("snapback"))
        .env("XDG_RUNTIME_DIR", runtime)
        .arg("hook")
        .args(extra)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_claude_code_pre_tool_use_hook_checkpoints_the_sandbox_holding_its_cwd() {
    let d = TestDaemon::start();
    let sb = d.path("project");
    let other = d.path("other");
    write(&sb.join("src/main.rs"), "fn main() {}");
    write(&other.join("x"), "x");
    d.add_sandbox("project", &sb, &[]);
    d.add_sandbox("other", &other, &[]);
    let out = hook(&d.socket, &claude_pre_tool_use(sb.join("src").to_str().unwrap()), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"{}\n", "stdout is JSON that asks the agent for nothing");
    let list = d.json(&["list"]);
    let all = list["checkpoints"].as_array().unwrap();
    assert_eq!(all.len(), 1, "only the sandbox holding cwd: {list}");
    let c = &all[0];
    assert_eq!(c["sandbox"], "project");
    assert_eq!(c["tool"], "Bash");
    assert_eq!(c["phase"], "PreToolUse");
    assert_eq!(c["plan"], "9f1c2e4a-claude-session");
    assert_eq!(c["kind"], "tool");
    assert_eq!(c["labels"]["tool_use_id"], "toolu_01ABC");
    assert_eq!(c["files"], 1);

    // Gemini CLI's BeforeTool carries the same fields.
    let gemini = serde_json::json!({
        "session_id": "gemini-7", "cwd": sb.to_str().unwrap(), "hook_event_name": "BeforeTool",
        "tool_name": "write_file", "tool_input": {"file_path": "a.txt", "content": "hi"},
        "timestamp": "2026-11-25T06:00:00Z"
    });
    let out = hook(&d.socket, &gemini.to_string(), &["--json"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["checkpoint"]["tool"], "write_file");
    assert_eq!(doc["checkpoint"]["phase"], "BeforeTool");
    assert_eq!(doc["checkpoint"]["plan"], "gemini-7");
}

#[test]
fn a_hook_never_fails_the_tool_call() {
    let mut d = TestDaemon::start();
    let sb = d.path("project");
    write(&sb.join("a"), "a");
    d.add_sandbox("project", &sb, &[]);
    let outside = d.path("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    for (input, why) in [
        (claude_pre_tool_use(outside.to_str().unwrap()), "is not in a registered sandbox"),
        ("not json".to_owned(), "not a hook's JSON"),
        (r#"{"session_id":"s"}"#.to_owned(), "no cwd"),
    ] {
        let out = hook(&d.socket, &input, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains(why), "{input}: {}: {stderr}", out.status);
    }
    assert!(d.list(&[]).is_empty());

    // The daemon stopped (socket gone), then a stale socket file that
    // refuses connections: exit 0 at once, saying why.
    d.stop();
    let stale_dir = tempfile::tempdir().unwrap();
    let stale = stale_dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    // Each agent's payload, each still answered with that agent's go-ahead.
    let agents =
        ["claude-pre-bash.json", "gemini-before-shell.json", "codex-pre-bash.json", "cursor-before-shell.json"];
    for socket in [&d.socket, &stale] {
        for file in agents {
            let input = payload(file, &sb);
            let mut fastest = Duration::MAX;
            for _ in 0..3 {
                let started = Instant::now();
                let out = hook(socket, &input, &[]);
                fastest = fastest.min(started.elapsed());
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success() && stderr.contains("not running"), "{file}: {}: {stderr}", out.status);
                let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let allowed = answer.get("permission").is_none_or(|p| p == "allow");
                assert!(answer.is_object() && allowed, "{file}: {answer}");
            }
            assert!(fastest < Duration::from_millis(200), "{file}: the hook took {fastest:?} with the daemon down");
        }
    }
}

/// Runs `snapback --socket S ARGS`: the socket goes first, since what
/// follows `--` belongs to the command.
fn exec_cli(d: &TestDaemon, args: &[&str]) -> Output {
    Command::new(binary("snapback")).arg("--socket").arg(&d.socket).args(args).output().unwrap()
}

#[test]
fn exec_takes_a_pre_post_pair_and_passes_the_exit_code_through() {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    write(&sb.join("keep"), "k");
    d.add_sandbox("sb", &sb, &[]);
    let script = format!("echo built > {}/out.txt; exit 7", sb.display());
    let out = exec_cli(&d, &["exec", "--sandbox", "sb", "--plan", "p1", "--", "sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let list = d.json(&["list", "sb"]);
    let all = list["checkpoints"].as_array().unwrap();
    assert_eq!(all.len(), 2, "{list}");
    let (pre, post) = (&all[0], &all[1]);
    assert_eq!((pre["phase"].as_str(), post["phase"].as_str()), (Some("pre"), Some("post")));
    assert_eq!(pre["tool"], "sh");
    assert_eq!(post["plan"], "p1");
    assert_eq!(post["labels"]["exit"], "7");
    let diff = d.json(&["diff", pre["id"].as_str().unwrap(), post["id"].as_str().unwrap()]);
    let changes = diff["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{diff}");
    assert_eq!(changes[0]["path"]["text"], "out.txt");
    assert_eq!(changes[0]["change"], "added");

    // A command that cannot start: 127, like a shell, and still a pair,
    // its post labelled with that code.
    let out = exec_cli(&d, &["exec", "--sandbox", "sb", "--", "/nonexistent/cmd"]);
    assert_eq!(out.status.code(), Some(127));
    let list = d.json(&["list", "sb"]);
    let all = list["checkpoints"].as_array().unwrap();
    assert_eq!(all.len(), 4, "{list}");
    assert_eq!(all[3]["labels"]["exit"], "127");
    // The daemon unreachable: exit 3 and the command does not run.
    let marker = d.path("ran");
    let out = Command::new(binary("snapback"))
        .args(["exec", "--sandbox", "sb", "--socket", "/nonexistent/sock", "--", "touch"])
        .arg(&marker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(!marker.exists(), "no checkpoint, no command");
}

/// Runs the CLI with stderr on a new pseudo-terminal; returns what the
/// terminal received and the exit status.
fn run_on_pty(d: &TestDaemon, args: &[&str]) -> (String, std::process::ExitStatus) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills two fds on success; no name, termios or size.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and ours.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = Command::new(binary("snapback"))
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(master);
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Linux answers EIO once the last slave fd is closed.
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let status = child.wait().unwrap();
    (reader.join().unwrap(), status)
}

#[test]
fn a_long_checkpoint_draws_a_progress_bar_on_a_terminal_only() {
    let d = TestDaemon::start();
    let sb = d.path("big");
    for i in 0..30_000 {
        write(&sb.join(format!("d{:03}/f{i}", i % 300)), format!("file {i}"));
    }
    d.add_sandbox("big", &sb, &[]);
    let (tty, status) = run_on_pty(&d, &["checkpoint", "big"]);
    assert!(status.success(), "{tty}");
    assert!(tty.contains("\rscanning "), "a bar was drawn: {tty:?}");
    assert!(tty.ends_with("\r\x1b[K"), "and erased at the end: {tty:?}");
    let out = d.cli(&["--json", "checkpoint", "big"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("scanning"), "no bar when stderr is not a terminal");
    let (tty, status) = run_on_pty(&d, &["--json", "checkpoint", "big"]);
    assert!(status.success());
    assert!(!tty.contains("scanning"), "no bar with --json: {tty:?}");
}

#[test]
fn a_hook_session_of_each_agent_logs_each_step_by_its_command_or_file() {
    let d = TestDaemon::start();
    let sb = d.path("project");
    write(&sb.join("src/app.py"), "print('hello')\n");
    write(&sb.join("src/lib.rs"), "fn old() {}\n");
    d.add_sandbox("project", &sb, &[]);
    d.checkpoint("project");
    // Each call: its payloads' prefix, what the tool does, the name the
    // log must give the step.
    let calls: [(&str, &str, (&str, &str), &str); 6] = [
        ("claude", "bash", ("test-output.txt", "3 passed\n"), "npm test"),
        ("claude", "edit", ("src/app.py", "print('hi')\n"), "src/app.py"),
        ("gemini", "shell", ("build/app", "built\n"), "make build"),
        ("gemini", "write", ("NOTES.md", "secret plans\n"), "NOTES.md"),
        ("codex", "bash", ("src/lib.rs", "fn old() {}\n\n"), "cargo fmt"),
        ("codex", "patch", ("src/lib.rs", "fn new() {}\n"), "src/lib.rs"),
    ];
    let mut taken = Vec::new();
    for (agent, tool, (file, content), name) in calls {
        let (before, after) = match agent {
            "gemini" => ("before", "after"),
            _ => ("pre", "post"),
        };
        let id = |event: &str| {
            let out = hook(&d.socket, &payload(&format!("{agent}-{event}-{tool}.json"), &sb), &["--json"]);
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            doc["checkpoint"]["id"].as_str().unwrap_or_else(|| panic!("{agent} {event} {tool}: {doc}")).to_owned()
        };
        let pre = id(before);
        write(&sb.join(file), content);
        let post = id(after);
        taken.push((pre, post, name));
    }
    let log = d.json(&["log", "project", "-n", "0"]);
    let entries = log["entries"].as_array().unwrap();
    let entry =
        |id: &str| entries.iter().find(|e| e["checkpoint"]["id"] == id).unwrap_or_else(|| panic!("{id}: {log}"));
    for (pre, post, name) in &taken {
        let (p, e) = (entry(pre), entry(post));
        assert_eq!(e["checkpoint"]["reason"], *name, "{e}");
        assert_eq!(p["checkpoint"]["reason"], *name, "{p}");
        assert_eq!(e["pre"], pre.as_str(), "the post checkpoint is one step with its pre: {e}");
        assert_eq!(e["total"]["files"], 1, "{e}");
    }
    assert!(!log.to_string().contains("secret plans"), "a hook recorded file content");
    let text = String::from_utf8(d.cli(&["log", "project", "-n", "0"]).stdout).unwrap();
    for (_, _, name) in &taken {
        assert!(text.contains(&format!(": {name}")), "{name} is not in the log:\n{text}");
    }
    let shown = String::from_utf8(d.cli(&["show", &taken[0].1]).stdout).unwrap();
    assert!(shown.contains(&format!("one tool call: {} was taken before it", taken[0].0)), "{shown}");
    let codex = entry(&taken[4].1);
    assert_eq!(codex["checkpoint"]["labels"]["turn_id"], "turn-3");
    assert_eq!(codex["checkpoint"]["plan"], "cdx-19");
}

/// What each agent's recorded payloads make: the checkpoint's plan, tool
/// and labels, and on stdout exactly that agent's "go ahead".
#[test]
fn each_agents_payloads_give_its_ids_and_its_own_go_ahead() {
    let d = TestDaemon::start();
    let sb = d.path("project");
    write(&sb.join("src/main.ts"), "const port = 3000\n");
    d.add_sandbox("project", &sb, &[]);
    let allow = serde_json::json!({"permission": "allow"});
    let nothing = serde_json::json!({});
    // Each payload: the plan, tool, reason and labels it must give, and
    // what the agent must read on stdout.
    let cases = [
        (
            "claude-pre-bash.json",
            ["abc123-claude", "Bash", "npm test"],
            &[("tool_use_id", "toolu_01BASH")][..],
            &nothing,
        ),
        ("gemini-before-shell.json", ["gem-7", "run_shell_command", "make build"], &[][..], &nothing),
        (
            "codex-pre-bash.json",
            ["cdx-19", "Bash", "cargo fmt"],
            &[("tool_use_id", "call_bash_1"), ("turn_id", "turn-3")][..],
            &nothing,
        ),
        (
            "cursor-before-shell.json",
            ["c-5d1e", "shell", "npm install express"],
            &[("generation_id", "g-0091")][..],
            &allow,
        ),
        (
            "cursor-after-shell.json",
            ["c-5d1e", "shell", "npm install express"],
            &[("generation_id", "g-0091")][..],
            &nothing,
        ),
        ("cursor-after-edit.json", ["c-5d1e", "edit", "src/main.ts"], &[("generation_id", "g-0092")][..], &nothing),
        (
            "cursor-before-mcp.json",
            ["c-5d1e", "mcp create_issue", "create_issue"],
            &[("generation_id", "g-0093")][..],
            &allow,
        ),
    ];
    for (file, [plan, tool, reason], labels, answer) in cases {
        let out = hook(&d.socket, &payload(file, &sb), &[]);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(&stdout, answer, "{file}: stdout");
        let newest = d.list(&["project"]).pop().unwrap();
        let got = (newest.plan.as_deref(), newest.tool.as_deref(), newest.reason.as_deref());
        assert_eq!(got, (Some(plan), Some(tool), Some(reason)), "{file}: {newest:?}");
        for (k, v) in labels {
            assert_eq!(newest.labels.get(*k).map(String::as_str), Some(*v), "{file}: {newest:?}");
        }
    }
}

#[test]
fn a_hook_that_cannot_checkpoint_tells_the_user_once_per_session() {
    let mut d = TestDaemon::start();
    let sb = d.path("project");
    std::fs::create_dir_all(&sb).unwrap();
    d.stop();
    let runtime = tempfile::tempdir().unwrap();
    let told = |file: &str| -> (serde_json::Value, Duration) {
        let started = Instant::now();
        let out = hook_in(&d.socket, &payload(file, &sb), &[], Some(runtime.path()));
        let took = started.elapsed();
        assert!(out.status.success(), "{file}");
        (serde_json::from_slice(&out.stdout).unwrap(), took)
    };
    let (first, took) = told("claude-pre-bash.json");
    assert!(first["systemMessage"].as_str().unwrap().contains("snapbackd is not running"), "{first}");
    assert!(took < Duration::from_secs(5), "the hook waited {took:?} for a daemon that is not there");
    assert_eq!(told("claude-post-bash.json").0, serde_json::json!({}), "told twice in one session");
    let (cursor, _) = told("cursor-before-shell.json");
    assert_eq!(cursor["permission"], "allow", "{cursor}");
    assert!(cursor["user_message"].as_str().unwrap().contains("not running"), "{cursor}");
    assert_eq!(told("cursor-before-mcp.json").0, serde_json::json!({"permission": "allow"}));
}

#[test]
fn after_its_plan_is_applied_a_session_keeps_its_checkpoints() {
    let d = TestDaemon::start();
    let sb = d.path("project");
    write(&sb.join("a"), "1");
    d.add_sandbox("project", &sb, &[]);
    let runtime = tempfile::tempdir().unwrap();
    let run = |file: &str| -> serde_json::Value {
        let out = hook_in(&d.socket, &payload(file, &sb), &[], Some(runtime.path()));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(run("claude-pre-bash.json"), serde_json::json!({}));
    d.json(&["plan", "apply", "abc123-claude"]);
    write(&sb.join("a"), "2");
    let told = run("claude-post-bash.json");
    assert!(told["systemMessage"].as_str().unwrap().contains("was applied"), "{told}");
    write(&sb.join("a"), "3");
    assert_eq!(run("claude-pre-edit.json"), serde_json::json!({}), "told twice");
    let list = d.list(&["project"]);
    assert_eq!(list.len(), 3, "every call still took a checkpoint: {list:?}");
    for c in &list[1..] {
        assert_eq!((c.plan.as_deref(), c.labels.get("session").map(String::as_str)), (None, Some("abc123-claude")));
    }
}
