//! `snapback hook` and `snapback exec`: checkpoints around an agent's tool
//! calls.
//!
//! `hook` is run by a coding agent before (or after) each tool call with
//! the call described as JSON on stdin. It must never block or fail the
//! call: whatever goes wrong, it says why on stderr and exits 0. Its stdout
//! is `{}` (with `--json`, what it did): the agents read a hook's stdout as
//! JSON instructions, and an empty object asks for nothing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use snapback::proto::{CheckpointInfo, CheckpointKind, CheckpointRequest, SandboxInfo};
use snapback::{Client, ClientError, ConnectOptions};

/// The fields snapback reads from a hook's JSON. Claude Code and Codex
/// CLI (`PreToolUse`, `PostToolUse`) and Gemini CLI (`BeforeTool`,
/// `AfterTool`) all send these names; anything else is ignored.
#[derive(Deserialize, Debug, Default)]
pub struct HookInput {
    pub session_id: Option<String>,
    pub cwd: Option<PathBuf>,
    pub hook_event_name: Option<String>,
    pub tool_name: Option<String>,
    pub tool_use_id: Option<String>,
    /// Codex: the turn the call belongs to.
    pub turn_id: Option<String>,
    /// The call's arguments: only what names the call is read (see
    /// [`call_identity`]), never content.
    pub tool_input: Option<serde_json::Value>,
    /// Gemini CLI, for a call of an MCP server's tool.
    pub mcp_context: Option<McpContext>,
}

/// Gemini CLI's description of an MCP tool call.
#[derive(Deserialize, Debug, Default, Clone)]
pub struct McpContext {
    pub server_name: Option<String>,
    pub tool_name: Option<String>,
}

/// The longest identity a hook records for a call.
const MAX_IDENTITY: usize = 200;

/// What a tool call was, in one line and at most [`MAX_IDENTITY`] bytes,
/// for the checkpoint's reason: a shell command's first line, the file an
/// edit or a write names (relative to `cwd` when below it), the files an
/// `apply_patch` touches, the server and tool of an MCP call. Never the
/// content of a file or a patch.
pub fn call_identity(input: &HookInput) -> Option<String> {
    let tool = input.tool_name.as_deref().unwrap_or_default();
    let args = input.tool_input.as_ref();
    let text = |key: &str| args.and_then(|a| a.get(key)).and_then(serde_json::Value::as_str);
    let mcp = match &input.mcp_context {
        Some(McpContext { server_name: Some(s), tool_name: Some(t) }) => Some(format!("{s} {t}")),
        _ => tool.strip_prefix("mcp__").and_then(|rest| rest.split_once("__")).map(|(s, t)| format!("{s} {t}")),
    };
    let found = if let Some(call) = mcp {
        Some(call)
    } else if let Some(command) = text("command") {
        match patched_files(command) {
            Some(files) => Some(files.join(", ")),
            None => command.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned),
        }
    } else {
        ["file_path", "notebook_path", "path"].into_iter().find_map(text).map(|p| relative_to(p, input.cwd.as_deref()))
    };
    found.map(|s| bounded(&s.replace(['\n', '\r'], " "), MAX_IDENTITY))
}

/// The files an `apply_patch` envelope (Codex) adds, updates or deletes;
/// `None` when `command` is not one.
fn patched_files(command: &str) -> Option<Vec<&str>> {
    if !command.trim_start().starts_with("*** Begin Patch") {
        return None;
    }
    let marks = ["*** Add File: ", "*** Update File: ", "*** Delete File: "];
    Some(command.lines().filter_map(|l| marks.iter().find_map(|m| l.strip_prefix(m))).map(str::trim).collect())
}

fn relative_to(path: &str, cwd: Option<&Path>) -> String {
    match cwd.and_then(|c| Path::new(path).strip_prefix(c).ok()) {
        Some(rel) if !rel.as_os_str().is_empty() => rel.to_string_lossy().into_owned(),
        _ => path.to_owned(),
    }
}

/// `s` cut to at most `max` bytes at a character boundary, marked `…`.
fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let cut = (0..=max - 3).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &s[..cut])
}

/// The most a hook reads from stdin; a tool call that writes a large file
/// carries it in `tool_input`.
const MAX_HOOK_INPUT: u64 = 64 << 20;

/// How long a hook waits for the daemon's answer unless
/// `SNAPBACK_HOOK_TIMEOUT_MS` says otherwise.
const HOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// What a hook did, for `--json` and the exit note.
#[derive(serde::Serialize)]
struct HookOutcome {
    checkpoint: Option<CheckpointInfo>,
    /// Why no checkpoint was taken.
    skipped: Option<String>,
}

/// Runs `snapback hook`. Always exits 0.
pub fn hook(socket: Option<PathBuf>, sandbox: Option<String>, json: bool) -> ExitCode {
    let outcome = match take_hook_checkpoint(socket, sandbox) {
        Ok(info) => {
            eprintln!("snapback: checkpoint {} of {} ({} changed)", info.id, info.sandbox, info.changed);
            HookOutcome { checkpoint: Some(info), skipped: None }
        }
        Err(why) => {
            eprintln!("snapback hook: no checkpoint: {why}");
            HookOutcome { checkpoint: None, skipped: Some(why) }
        }
    };
    // Both agents parse a hook's stdout as JSON: `{}` asks nothing of them.
    let doc = if json { serde_json::to_string(&outcome).unwrap_or_else(|_| "{}".into()) } else { "{}".into() };
    outln!("{doc}");
    ExitCode::SUCCESS
}

fn take_hook_checkpoint(socket: Option<PathBuf>, sandbox: Option<String>) -> Result<CheckpointInfo, String> {
    let mut raw = Vec::new();
    std::io::stdin()
        .take(MAX_HOOK_INPUT)
        .read_to_end(&mut raw)
        .map_err(|e| format!("reading the hook's JSON on stdin: {e}"))?;
    let input: HookInput =
        serde_json::from_slice(&raw).map_err(|e| format!("stdin is not a hook's JSON object: {e}"))?;
    let timeout = std::env::var("SNAPBACK_HOOK_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(HOOK_TIMEOUT, Duration::from_millis);
    let path = socket
        .or_else(snapback::defaults::socket_path)
        .ok_or("no socket path: pass --socket, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR")?;
    let options = ConnectOptions { timeout: Some(timeout), progress: None };
    let mut client = Client::connect_with(&path, options).map_err(|e| match e {
        ClientError::Unreachable { .. } => format!("snapbackd is not running ({e})"),
        other => other.to_string(),
    })?;
    let sandbox = match sandbox {
        Some(s) => s,
        None => {
            let cwd = input.cwd.as_deref().ok_or("the hook's JSON has no cwd, and no --sandbox was given")?;
            let list = client.sandbox_list().map_err(|e| e.to_string())?.sandboxes;
            containing_sandbox(&list, cwd).ok_or_else(|| format!("{} is not in a registered sandbox", cwd.display()))?
        }
    };
    let event = input.hook_event_name.clone();
    let reason = call_identity(&input).or_else(|| match (&event, &input.tool_name) {
        (Some(e), Some(t)) => Some(format!("{e} {t}")),
        (Some(e), None) => Some(e.clone()),
        _ => None,
    });
    let mut labels = BTreeMap::new();
    for (key, value) in [("tool_use_id", input.tool_use_id), ("turn_id", input.turn_id)] {
        if let Some(v) = value {
            labels.insert(key.to_owned(), bounded(&v, MAX_IDENTITY));
        }
    }
    let req = CheckpointRequest {
        sandbox,
        plan: input.session_id,
        reason,
        tool: input.tool_name,
        phase: event,
        labels,
        pin: false,
        kind: Some(CheckpointKind::Tool),
    };
    client.checkpoint(req).map_err(|e| e.to_string())
}

/// Returns the name of the registered sandbox whose root holds `cwd` (the
/// innermost, should roots nest), comparing whole path components.
pub fn containing_sandbox(sandboxes: &[SandboxInfo], cwd: &Path) -> Option<String> {
    let cwd = cwd.canonicalize().unwrap_or_else(|_| lexically_normal(cwd));
    sandboxes
        .iter()
        .filter(|s| s.state == "active" && cwd.starts_with(s.path.as_path()))
        .max_by_key(|s| s.path.as_bytes().len())
        .map(|s| s.name.clone())
}

/// Drops `.` and resolves `..` without touching the filesystem (for a cwd
/// that no longer exists).
fn lexically_normal(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What `snapback exec` did, for `--json`.
#[derive(serde::Serialize)]
struct ExecOutcome {
    pre: CheckpointInfo,
    post: Option<CheckpointInfo>,
    /// The command's exit code (128 + the signal that killed it).
    exit: i32,
}

/// Runs `snapback exec`: a `pre` checkpoint, the command, a `post`
/// checkpoint; exits with the command's code. When the `pre` checkpoint
/// cannot be taken the command is not run.
pub fn exec(
    client: &mut Client,
    sandbox: String,
    tool: Option<String>,
    plan: Option<String>,
    command: Vec<OsString>,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let program = &command[0];
    let tool = tool.unwrap_or_else(|| {
        let base = Path::new(program).file_name().unwrap_or(program);
        String::from_utf8_lossy(base.as_bytes()).into_owned()
    });
    let line: Vec<String> = command.iter().map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned()).collect();
    let mut reason = line.join(" ");
    if reason.len() > 200 {
        let cut = (0..=200).rev().find(|&i| reason.is_char_boundary(i)).unwrap_or(0);
        reason.truncate(cut);
        reason.push('…');
    }
    let request = |phase: &str, labels: BTreeMap<String, String>| CheckpointRequest {
        sandbox: sandbox.clone(),
        plan: plan.clone(),
        reason: Some(reason.clone()),
        tool: Some(tool.clone()),
        phase: Some(phase.to_owned()),
        labels,
        pin: false,
        kind: Some(CheckpointKind::Tool),
    };
    let pre = client.checkpoint(request("pre", BTreeMap::new()))?;
    if !json {
        eprintln!("snapback: pre checkpoint {}", pre.id);
    }
    let exit = run_command(&command);
    let mut labels = BTreeMap::new();
    labels.insert("exit".to_owned(), exit.to_string());
    let post = match client.checkpoint(request("post", labels)) {
        Ok(info) => {
            if !json {
                eprintln!("snapback: post checkpoint {} ({} changed)", info.id, info.changed);
            }
            Some(info)
        }
        Err(e) => {
            eprintln!("snapback: the command ran, but the post checkpoint failed: {e}");
            None
        }
    };
    if json && let Ok(doc) = serde_json::to_string_pretty(&ExecOutcome { pre, post, exit }) {
        outln!("{doc}");
    }
    Ok(ExitCode::from((exit & 0xff) as u8))
}

/// Runs the command with this process's stdio and returns its exit code
/// as a shell would: 128 + signal when killed, 127 when not found, 126
/// when it could not be started. Ctrl-C reaches the command (the terminal
/// signals the whole process group); snapback ignores it meanwhile so
/// that the post checkpoint is still taken.
fn run_command(command: &[OsString]) -> i32 {
    let mut child = match std::process::Command::new(&command[0]).args(&command[1..]).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("snapback: cannot run {}: {e}", command[0].to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    // SAFETY: signal() with SIG_IGN has no preconditions; the child was
    // spawned with the default dispositions before this.
    let old = unsafe { [libc::signal(libc::SIGINT, libc::SIG_IGN), libc::signal(libc::SIGQUIT, libc::SIG_IGN)] };
    let status = child.wait();
    // SAFETY: restores the dispositions saved above.
    unsafe {
        libc::signal(libc::SIGINT, old[0]);
        libc::signal(libc::SIGQUIT, old[1]);
    }
    match status {
        Ok(s) => s.code().or_else(|| s.signal().map(|sig| 128 + sig)).unwrap_or(1),
        Err(e) => {
            eprintln!("snapback: waiting for the command: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapback::proto::{CloneMethod, WirePath};

    fn sandbox(name: &str, path: &str) -> SandboxInfo {
        SandboxInfo {
            name: name.into(),
            path: WirePath(path.as_bytes().to_vec()),
            store: WirePath::default(),
            clone_method: CloneMethod::Copy,
            clone_note: String::new(),
            excludes: Vec::new(),
            state: "active".into(),
            moved: None,
            owner_uid: 0,
            checkpoints: 0,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn the_innermost_sandbox_holding_cwd_wins_by_whole_components() {
        let list = [sandbox("outer", "/nonexistent/a"), sandbox("inner", "/nonexistent/a/b")];
        let find = |p: &str| containing_sandbox(&list, Path::new(p));
        assert_eq!(find("/nonexistent/a/b/c").as_deref(), Some("inner"));
        assert_eq!(find("/nonexistent/a/x/../c").as_deref(), Some("outer"));
        assert_eq!(find("/nonexistent/a").as_deref(), Some("outer"));
        assert_eq!(find("/nonexistent/ab"), None, "a name prefix is not a path prefix");
        assert_eq!(find("/elsewhere"), None);
    }

    #[test]
    fn claude_code_hook_json_parses() {
        let doc = br#"{"session_id":"abc","transcript_path":"/t","cwd":"/w","permission_mode":"default",
            "hook_event_name":"PreToolUse","tool_name":"Write","tool_input":{"file_path":"/w/x","content":"hi"},
            "tool_use_id":"toolu_1"}"#;
        let h: HookInput = serde_json::from_slice(doc).unwrap();
        assert_eq!(h.session_id.as_deref(), Some("abc"));
        assert_eq!(h.cwd.as_deref(), Some(Path::new("/w")));
        assert_eq!(h.hook_event_name.as_deref(), Some("PreToolUse"));
        assert_eq!(h.tool_name.as_deref(), Some("Write"));
        assert_eq!(h.tool_use_id.as_deref(), Some("toolu_1"));
        assert_eq!(call_identity(&h).as_deref(), Some("x"), "the file, relative to cwd; never the content");
    }

    fn identity(doc: serde_json::Value) -> Option<String> {
        call_identity(&serde_json::from_value(doc).unwrap())
    }

    #[test]
    fn each_call_is_named_by_what_it_did() {
        use serde_json::json;
        let bash =
            json!({"tool_name": "Bash", "tool_input": {"command": "\n  npm test -- --watch=false  \necho done"}});
        assert_eq!(identity(bash).as_deref(), Some("npm test -- --watch=false"));
        let edit = json!({"cwd": "/w", "tool_name": "Edit", "tool_input": {"file_path": "/elsewhere/a.rs", "old_string": "x"}});
        assert_eq!(identity(edit).as_deref(), Some("/elsewhere/a.rs"));
        let mcp = json!({"tool_name": "mcp__github__create_issue", "tool_input": {"title": "t"}});
        assert_eq!(identity(mcp).as_deref(), Some("github create_issue"));
        let gemini = json!({"tool_name": "mcp_fs_write", "mcp_context": {"server_name": "fs", "tool_name": "write"}});
        assert_eq!(identity(gemini).as_deref(), Some("fs write"));
        let patch =
            "*** Begin Patch\n*** Update File: src/a.rs\n@@\n-secret\n+x\n*** Add File: b.txt\n+hi\n*** End Patch";
        let codex = json!({"tool_name": "apply_patch", "tool_input": {"command": patch}});
        assert_eq!(identity(codex).as_deref(), Some("src/a.rs, b.txt"));
        let long = json!({"tool_name": "Bash", "tool_input": {"command": "é".repeat(300)}});
        let named = identity(long).unwrap();
        assert!(named.len() <= MAX_IDENTITY && named.ends_with('…'), "{named}");
        assert_eq!(identity(json!({"tool_name": "WebSearch", "tool_input": {"query": "q"}})), None);
    }
}
