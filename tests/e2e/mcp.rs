//! `snapback mcp` driven by the official MCP SDKs, not hand-written
//! JSON-RPC: the Python SDK (`mcp` on PyPI) on both revisions it speaks
//! (2026-07-28 through `server/discover`, 2025-11-25 through the
//! handshake, where the server finds the sandbox through the client's
//! roots) and the TypeScript SDK (`@modelcontextprotocol/sdk`), which
//! speaks the handshake. The clients are `tests/mcp/sdk_client.*`;
//! `.ci/run` installs both SDKs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixture::{TestDaemon, binary, installed_or_skip, tool_or_skip, write};

fn mcp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp")
}

/// A sandbox holding `notes.txt`, registered with a new daemon.
fn sandbox() -> (TestDaemon, PathBuf) {
    let d = TestDaemon::start();
    let sb = d.path("sb");
    write(&sb.join("notes.txt"), "one\ntwo\nthree\n");
    d.add_sandbox("sb", &sb, &[]);
    (d, sb)
}

/// Runs an SDK client script; returns the JSON line it printed.
fn run(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{cmd:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

/// What every client must have seen, whatever the SDK and revision.
fn check(seen: &serde_json::Value, sb: &Path) {
    let tools = ["checkpoint", "diff", "list_checkpoints", "revert_step", "rollback", "undo"];
    assert_eq!(seen["tools"], serde_json::json!(tools), "{seen}");
    assert_eq!(seen["destructive"], serde_json::json!(["revert_step", "rollback", "undo"]), "{seen}");
    assert_eq!(seen["diff"], serde_json::json!([["notes.txt", 2, 1]]), "{seen}");
    assert_eq!(seen["after_dry_run"], "one\nTWO\nthree\nfour\n", "a dry run moved the file: {seen}");
    assert_eq!(seen["after_rollback"], "one\ntwo\nthree\n", "{seen}");
    assert_eq!(std::fs::read_to_string(sb.join("notes.txt")).unwrap(), "one\ntwo\nthree\n");
}

#[test]
fn the_official_python_sdk_drives_snapback_mcp_on_both_revisions() {
    let test = "the_official_python_sdk_drives_snapback_mcp_on_both_revisions";
    let Some(python) = std::env::var_os("SNAPBACK_MCP_PYTHON") else {
        installed_or_skip(test, "a Python with the MCP SDK (SNAPBACK_MCP_PYTHON)", false);
        return;
    };
    let (d, sb) = sandbox();
    let elsewhere = d.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for (mode, revision) in [("auto", "2026-07-28"), ("legacy", "2025-11-25")] {
        let seen = run(Command::new(&python)
            .arg(mcp_dir().join("sdk_client.py"))
            .arg(binary("snapback"))
            .arg(&d.socket)
            .arg(&sb)
            .arg(mode)
            .arg(&elsewhere));
        assert_eq!(seen["protocol"], revision, "{seen}");
        check(&seen, &sb);
        assert_eq!(seen["read_only"], serde_json::json!(["diff", "list_checkpoints"]), "{seen}");
        assert_eq!(seen["patch_has_edit"], true, "{seen}");
        assert_eq!(seen["error"]["is_error"], true, "a refused call is a tool result with isError: {seen}");
        assert!(seen["error"]["text"].as_str().unwrap().starts_with("invalid_request: "), "{seen}");
    }
}

#[test]
fn the_official_typescript_sdk_drives_snapback_mcp() {
    let test = "the_official_typescript_sdk_drives_snapback_mcp";
    let Some(node) = tool_or_skip("node", test) else { return };
    let sdk = mcp_dir().join("node_modules/@modelcontextprotocol/sdk").is_dir();
    if !installed_or_skip(test, "the MCP TypeScript SDK (npm ci --prefix tests/mcp)", sdk) {
        return;
    }
    let (d, sb) = sandbox();
    let seen =
        run(Command::new(node).arg(mcp_dir().join("sdk_client.mjs")).arg(binary("snapback")).arg(&d.socket).arg(&sb));
    assert_eq!(seen["protocol"], "2025-11-25", "{seen}");
    assert_eq!(seen["server"], "snapback");
    check(&seen, &sb);
    assert_eq!((&seen["dry_run"], &seen["confirmed"]), (&true.into(), &true.into()), "{seen}");
    assert_eq!(seen["error"]["isError"], true, "{seen}");
    assert!(seen["error"]["text"].as_str().unwrap().starts_with("not_found: "), "{seen}");
}
