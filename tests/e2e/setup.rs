//! `snapback setup`: agents' settings merged, never replaced; a second run
//! changes nothing; `--remove` gives back the very bytes; the hooks it
//! writes run; the systemd units it installs pass `systemd-analyze`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::fixture::{TestDaemon, binary, payload, tool_or_skip, write};

fn setup(home: &Path, args: &[&str]) -> Output {
    let out = Command::new(binary("snapback"))
        .arg("setup")
        .args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .output()
        .unwrap();
    assert!(out.status.success(), "setup {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Settings files with content of their own (other hooks, other keys in
/// an unusual order, comments in TOML), by agent and file.
fn existing() -> [(&'static str, &'static str, &'static str); 5] {
    [
        (
            "claude",
            ".claude/settings.json",
            r#"{"model":"opus","hooks":{"PreToolUse":[{"matcher":"Read","hooks":[{"type":"command","command":"audit.sh"}]}]},"env":{"B":"2","A":"1"}}"#,
        ),
        ("gemini", ".gemini/settings.json", "{\n  \"theme\": \"dark\",\n  \"hooks\": {}\n}\n"),
        ("codex", ".codex/hooks.json", r#"{"hooks":{"Stop":[{"hooks":[{"type":"command","command":"notify.sh"}]}]}}"#),
        ("cursor", ".cursor/hooks.json", r#"{"version":1,"hooks":{"afterFileEdit":[{"command":"prettier.sh"}]}}"#),
        (
            "mcp codex",
            ".codex/config.toml",
            "# mine\nmodel = \"o4\"  # keep\n\n[mcp_servers.github]\ncommand = \"gh\"\n",
        ),
    ]
}

#[test]
fn setup_merges_once_and_remove_gives_back_the_very_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path();
    for (what, file, original) in existing() {
        let path = project.join(file);
        write(&path, original);
        let args: Vec<&str> = what.split(' ').chain(["--project", project.to_str().unwrap()]).collect();
        let dry = setup(project, &[&args[..], &["--dry-run"]].concat());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original, "{what}: a dry run wrote");
        assert!(String::from_utf8_lossy(&dry.stdout).contains("+++ "), "{what}: no diff printed");
        setup(project, &args);
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(written.contains("snapback"), "{what}: {written}");
        for theirs in ["audit.sh", "dark", "notify.sh", "prettier.sh", "# keep", "gh"] {
            assert_eq!(original.contains(theirs), written.contains(theirs), "{what} lost {theirs}: {written}");
        }
        setup(project, &args);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), written, "{what}: a second run changed the file");
        setup(project, &[&args[..], &["--remove"]].concat());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original, "{what}: remove did not give back the bytes");
    }
    // Key order is kept: `model` still before `hooks` before `env`.
    let claude = project.join(".claude/settings.json");
    setup(project, &["claude", "--project", project.to_str().unwrap()]);
    let text = std::fs::read_to_string(&claude).unwrap();
    let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
    assert!(at("model") < at("hooks") && at("hooks") < at("env") && at("B") < at("A"), "{text}");
    // A file setup made is gone again after a removal.
    let mcp = project.join(".mcp.json");
    setup(project, &["mcp", "claude", "--project", project.to_str().unwrap()]);
    assert!(mcp.exists());
    setup(project, &["mcp", "claude", "--project", project.to_str().unwrap(), "--remove"]);
    assert!(!mcp.exists() && !project.join(".mcp.json.snapback-backup").exists());
}

#[test]
fn the_hooks_setup_writes_take_checkpoints() {
    let d = TestDaemon::start();
    let sb = d.path("project");
    write(&sb.join("a.txt"), "1");
    d.add_sandbox("project", &sb, &[]);
    setup(&sb, &["claude", "--project", sb.to_str().unwrap()]);
    setup(&sb, &["cursor", "--project", sb.to_str().unwrap()]);
    let claude: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.join(".claude/settings.json")).unwrap()).unwrap();
    let cursor: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.join(".cursor/hooks.json")).unwrap()).unwrap();
    let commands = [
        (claude["hooks"]["PreToolUse"][0]["hooks"][0]["command"].as_str().unwrap(), "claude-pre-bash.json", "{}"),
        (
            cursor["hooks"]["beforeShellExecution"][0]["command"].as_str().unwrap(),
            "cursor-before-shell.json",
            r#"{"permission":"allow"}"#,
        ),
    ];
    for (i, (command, file, answer)) in commands.into_iter().enumerate() {
        let input = payload(file, &sb);
        // As the agent runs it: through a shell, the JSON on stdin.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("SNAPBACK_SOCKET", &d.socket)
            .env("XDG_RUNTIME_DIR", d.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), answer, "{file}");
        assert_eq!(d.list(&["project"]).len(), i + 1, "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn setup_service_user_installs_units_systemd_accepts() {
    let Some(analyze) = tool_or_skip("systemd-analyze", "setup_service_user_installs_units_systemd_accepts") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let out = setup(home.path(), &["--json", "service", "--user"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["next"].as_str().unwrap().contains("systemctl --user enable --now snapbackd.socket"), "{doc}");
    let units = home.path().join(".config/systemd/user");
    let service = std::fs::read_to_string(units.join("snapbackd.service")).unwrap();
    assert!(service.contains(&format!("ExecStart={} ", binary("snapbackd").canonicalize().unwrap().display())));
    let runtime = home.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let verified = Command::new(analyze)
        .args(["--user", "verify"])
        .arg(units.join("snapbackd.socket"))
        .arg(units.join("snapbackd.service"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verified.stderr);
    assert!(verified.status.success() && stderr.trim().is_empty(), "{stderr}");
    let again: serde_json::Value =
        serde_json::from_slice(&setup(home.path(), &["--json", "service", "--user"]).stdout).unwrap();
    assert_eq!(again["changed"], false);
    setup(home.path(), &["service", "--user", "--remove"]);
    assert!(!units.join("snapbackd.service").exists() && !units.join("snapbackd.socket").exists());
}
