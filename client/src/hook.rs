//! `snapback hook`: a checkpoint for a coding agent's tool call.
//!
//! The agent runs it before (or after) each tool call with the call
//! described as JSON on stdin. Claude Code and Codex CLI send
//! `PreToolUse`/`PostToolUse`, Gemini CLI `BeforeTool`/`AfterTool`, Cursor
//! `beforeShellExecution`, `beforeMCPExecution`, `afterFileEdit` and the
//! like, each in its own shape; [`Agent::of`] tells them apart.
//!
//! It must never block or fail the call: whatever goes wrong, it says why
//! on stderr, and once per session in a way the agent shows its user, and
//! exits 0. Its stdout is what that agent reads as "go ahead, nothing to
//! add" (see [`Agent::answer`]); with `--json`, what it did.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use snapback::proto::{CheckpointInfo, CheckpointKind, CheckpointRequest, ErrorCode};
use snapback::{Client, ClientError, ConnectOptions};

use crate::agent::{bounded, containing_sandbox};

/// The agents whose hooks `snapback hook` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Agent {
    Claude,
    Gemini,
    Codex,
    Cursor,
}

impl Agent {
    /// The agent that sent `input`, by its shape: Cursor's events are in
    /// camel case and carry `conversation_id`, Gemini's are `BeforeTool`
    /// and `AfterTool`, Codex's carry a `turn_id`.
    pub fn of(input: &HookInput) -> Agent {
        let event = input.hook_event_name.as_deref().unwrap_or_default();
        if input.conversation_id.is_some() || event.starts_with(|c: char| c.is_ascii_lowercase()) {
            Agent::Cursor
        } else if matches!(event, "BeforeTool" | "AfterTool") {
            Agent::Gemini
        } else if input.turn_id.is_some() {
            Agent::Codex
        } else {
            Agent::Claude
        }
    }

    /// What the hook prints on stdout: the agent's "go ahead, nothing to
    /// add", with `notice` shown to its user where the agent shows one.
    /// Cursor's before-hooks must answer `permission: allow` explicitly;
    /// its after-hooks read nothing.
    pub fn answer(self, event: &str, notice: Option<&str>) -> serde_json::Value {
        let mut doc = serde_json::Map::new();
        match self {
            Agent::Cursor if event.starts_with("before") => {
                doc.insert("permission".into(), "allow".into());
                if let Some(n) = notice {
                    doc.insert("user_message".into(), n.into());
                }
            }
            Agent::Cursor => {}
            Agent::Claude | Agent::Gemini | Agent::Codex => {
                if let Some(n) = notice {
                    doc.insert("systemMessage".into(), n.into());
                }
            }
        }
        serde_json::Value::Object(doc)
    }
}

/// The fields snapback reads from a hook's JSON; anything else is ignored.
#[derive(Deserialize, Debug, Default)]
pub struct HookInput {
    pub session_id: Option<String>,
    pub cwd: Option<PathBuf>,
    pub hook_event_name: Option<String>,
    pub tool_name: Option<String>,
    pub tool_use_id: Option<String>,
    /// Claude Code: the user's prompt this call answers, the subagent
    /// making it, the permission mode.
    pub prompt_id: Option<String>,
    pub agent_id: Option<String>,
    pub permission_mode: Option<String>,
    /// Codex: the turn the call belongs to.
    pub turn_id: Option<String>,
    /// Cursor: the conversation (its session), the generation (its turn),
    /// the workspace's folders; a shell call's `command`, an edit's
    /// `file_path`.
    pub conversation_id: Option<String>,
    pub generation_id: Option<String>,
    #[serde(default)]
    pub workspace_roots: Vec<PathBuf>,
    pub command: Option<String>,
    pub file_path: Option<String>,
    /// The call's arguments: only what names the call is read (see
    /// [`call_identity`]), never content.
    pub tool_input: Option<serde_json::Value>,
    /// Gemini CLI, for a call of an MCP server's tool.
    pub mcp_context: Option<McpContext>,
}

impl HookInput {
    /// The session: Cursor's conversation, everyone else's session.
    fn session(&self) -> Option<&str> {
        self.session_id.as_deref().or(self.conversation_id.as_deref())
    }

    /// Where the call runs: its cwd, else the workspace's first folder.
    fn cwd(&self) -> Option<&Path> {
        self.cwd.as_deref().or(self.workspace_roots.first().map(PathBuf::as_path))
    }

    /// The tool, as the agent names it; Cursor's events name it instead.
    fn tool(&self, agent: Agent) -> Option<String> {
        let event = self.hook_event_name.as_deref().unwrap_or_default();
        match (agent, &self.tool_name) {
            (Agent::Cursor, Some(t)) if event.contains("MCP") => Some(format!("mcp {t}")),
            (Agent::Cursor, _) if event.contains("Shell") => Some("shell".into()),
            (Agent::Cursor, _) if event.contains("FileEdit") => Some("edit".into()),
            (_, t) => t.clone(),
        }
    }

    /// The labels of the checkpoint: the agent's ids of the call, bounded.
    fn labels(&self) -> BTreeMap<String, String> {
        let ids = [
            ("tool_use_id", &self.tool_use_id),
            ("turn_id", &self.turn_id),
            ("prompt_id", &self.prompt_id),
            ("agent_id", &self.agent_id),
            ("permission_mode", &self.permission_mode),
            ("generation_id", &self.generation_id),
        ];
        ids.into_iter().filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), bounded(v, MAX_IDENTITY)))).collect()
    }
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
    let command = text("command").or(input.command.as_deref());
    let event = input.hook_event_name.as_deref().unwrap_or_default();
    // Cursor names an MCP call by its tool alone.
    let mcp = mcp.or_else(|| event.contains("MCPExecution").then(|| tool.to_owned()).filter(|t| !t.is_empty()));
    let found = if let Some(call) = mcp {
        Some(call)
    } else if let Some(command) = command {
        match patched_files(command) {
            Some(files) => Some(files.join(", ")),
            None => command.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned),
        }
    } else {
        let file = ["file_path", "notebook_path", "path"].into_iter().find_map(text).or(input.file_path.as_deref());
        file.map(|p| relative_to(p, input.cwd()))
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

/// The most a hook reads from stdin; a tool call that writes a large file
/// carries it in `tool_input`.
const MAX_HOOK_INPUT: u64 = 64 << 20;

/// How long a hook waits for the daemon's answer unless
/// `SNAPBACK_HOOK_TIMEOUT_MS` says otherwise: under the timeout `snapback
/// setup` gives each agent (30 s), so that the agent never kills it.
const HOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// What a hook did, for `--json` and the exit note.
#[derive(serde::Serialize)]
struct HookOutcome {
    checkpoint: Option<CheckpointInfo>,
    /// Why no checkpoint was taken.
    skipped: Option<String>,
    /// What the agent's user was told, if anything.
    notice: Option<String>,
}

/// Runs `snapback hook`. Always exits 0.
pub fn hook(socket: Option<PathBuf>, sandbox: Option<String>, agent: Option<Agent>, json: bool) -> ExitCode {
    let mut raw = Vec::new();
    let read = std::io::stdin().take(MAX_HOOK_INPUT).read_to_end(&mut raw);
    let input = match read {
        Ok(_) => {
            serde_json::from_slice::<HookInput>(&raw).map_err(|e| format!("stdin is not a hook's JSON object: {e}"))
        }
        Err(e) => Err(format!("reading the hook's JSON on stdin: {e}")),
    };
    let (agent, event) = match &input {
        Ok(i) => (agent.unwrap_or_else(|| Agent::of(i)), i.hook_event_name.clone().unwrap_or_default()),
        Err(_) => (agent.unwrap_or(Agent::Claude), String::new()),
    };
    let taken = input.map_err(|why| (why, None)).and_then(|i| take(socket, sandbox, agent, i));
    let outcome = match taken {
        Ok((info, notice)) => {
            eprintln!("snapback: checkpoint {} of {} ({} changed)", info.id, info.sandbox, info.changed);
            HookOutcome { checkpoint: Some(info), skipped: None, notice }
        }
        Err((why, session)) => {
            eprintln!("snapback hook: no checkpoint: {why}");
            let notice = first_time(session.as_deref()).then(|| format!("snapback took no checkpoint: {why}"));
            HookOutcome { checkpoint: None, skipped: Some(why), notice }
        }
    };
    let doc = match json {
        true => serde_json::to_value(&outcome).unwrap_or_default(),
        false => agent.answer(&event, outcome.notice.as_deref()),
    };
    outln!("{doc}");
    ExitCode::SUCCESS
}

/// Why no checkpoint was taken, and the session it was for (for the
/// once-per-session notice).
type Skipped = (String, Option<String>);

/// Takes the checkpoint of `input`'s call; returns it and what to tell
/// the agent's user about it, if anything.
fn take(
    socket: Option<PathBuf>,
    sandbox: Option<String>,
    agent: Agent,
    input: HookInput,
) -> Result<(CheckpointInfo, Option<String>), Skipped> {
    let session = input.session().map(str::to_owned);
    let skipped = |why: String| (why, session.clone());
    let timeout = std::env::var("SNAPBACK_HOOK_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(HOOK_TIMEOUT, Duration::from_millis);
    let path = socket
        .or_else(snapback::defaults::socket_path)
        .ok_or_else(|| skipped("no socket path: pass --socket, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR".into()))?;
    let options = ConnectOptions { timeout: Some(timeout), progress: None };
    let mut client = Client::connect_with(&path, options).map_err(|e| match e {
        ClientError::Unreachable { .. } => skipped(format!("snapbackd is not running ({e})")),
        other => skipped(other.to_string()),
    })?;
    let sandbox = match sandbox {
        Some(s) => s,
        None => {
            let cwd =
                input.cwd().ok_or_else(|| skipped("the hook's JSON has no cwd, and no --sandbox was given".into()))?;
            let list = client.sandbox_list().map_err(|e| skipped(e.to_string()))?.sandboxes;
            containing_sandbox(&list, cwd)
                .ok_or_else(|| skipped(format!("{} is not in a registered sandbox", cwd.display())))?
        }
    };
    let event = input.hook_event_name.clone();
    let reason = call_identity(&input).or_else(|| match (&event, &input.tool_name) {
        (Some(e), Some(t)) => Some(format!("{e} {t}")),
        (Some(e), None) => Some(e.clone()),
        _ => None,
    });
    let mut req = CheckpointRequest {
        sandbox,
        plan: session.clone(),
        reason,
        tool: input.tool(agent),
        phase: event,
        labels: input.labels(),
        pin: false,
        kind: Some(CheckpointKind::Tool),
    };
    match client.checkpoint(req.clone()) {
        Ok(info) => Ok((info, None)),
        // The session's plan was applied: its checkpoints go on, outside it.
        Err(ClientError::Daemon(e)) if e.code == ErrorCode::PlanApplied => {
            let plan = req.plan.take().unwrap_or_default();
            req.labels.insert("session".into(), bounded(&plan, MAX_IDENTITY));
            let info = client.checkpoint(req).map_err(|e| skipped(e.to_string()))?;
            let notice = first_time(session.as_deref())
                .then(|| format!("snapback: the plan {plan} was applied; this session's checkpoints go on outside it"));
            Ok((info, notice))
        }
        Err(e) => Err(skipped(e.to_string())),
    }
}

/// Whether this is the first notice of `session` (without one: every
/// time). A marker file per session, in a directory of this user's
/// (`$XDG_RUNTIME_DIR/snapback/hook-notices`, else under the temporary
/// directory), remembers it; when it cannot be made, every call tells.
fn first_time(session: Option<&str>) -> bool {
    let Some(session) = session else { return true };
    let Some(dir) = notices_dir() else { return true };
    let name: String = session.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let marker = dir.join(bounded(&name, 100));
    std::fs::OpenOptions::new().write(true).create_new(true).open(marker).is_ok()
}

/// This user's directory of notice markers, made (mode 0700) if needed;
/// `None` when one that is not this user's alone is in the way.
fn notices_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(run) => PathBuf::from(run).join("snapback/hook-notices"),
        None => std::env::temp_dir().join(format!("snapback-hook-notices-{uid}")),
    };
    let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(doc: serde_json::Value) -> HookInput {
        serde_json::from_value(doc).unwrap()
    }

    fn identity(doc: serde_json::Value) -> Option<String> {
        call_identity(&input(doc))
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
        assert_eq!(Agent::of(&h), Agent::Claude);
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
        let cursor = json!({"hook_event_name": "afterFileEdit", "workspace_roots": ["/w"], "file_path": "/w/src/m.ts"});
        assert_eq!(identity(cursor).as_deref(), Some("src/m.ts"));
        let shell = json!({"hook_event_name": "beforeShellExecution", "command": "npm i express", "cwd": "/w"});
        assert_eq!(identity(shell).as_deref(), Some("npm i express"));
        let long = json!({"tool_name": "Bash", "tool_input": {"command": "é".repeat(300)}});
        let named = identity(long).unwrap();
        assert!(named.len() <= MAX_IDENTITY && named.ends_with('…'), "{named}");
        assert_eq!(identity(json!({"tool_name": "WebSearch", "tool_input": {"query": "q"}})), None);
    }

    #[test]
    fn each_agent_is_told_to_go_ahead_in_its_own_words() {
        use serde_json::json;
        let cursor = input(json!({"hook_event_name": "beforeShellExecution", "conversation_id": "c"}));
        let gemini = input(json!({"hook_event_name": "BeforeTool"}));
        let codex = input(json!({"hook_event_name": "PreToolUse", "turn_id": "t"}));
        let claude = input(json!({"hook_event_name": "PreToolUse"}));
        let agents: Vec<Agent> = [&cursor, &gemini, &codex, &claude].into_iter().map(Agent::of).collect();
        assert_eq!(agents, [Agent::Cursor, Agent::Gemini, Agent::Codex, Agent::Claude]);
        assert_eq!(Agent::Cursor.answer("beforeShellExecution", None), json!({"permission": "allow"}));
        assert_eq!(
            Agent::Cursor.answer("beforeMCPExecution", Some("n")),
            json!({"permission": "allow", "user_message": "n"})
        );
        assert_eq!(Agent::Cursor.answer("afterFileEdit", Some("n")), json!({}));
        assert_eq!(Agent::Claude.answer("PreToolUse", None), json!({}));
        assert_eq!(Agent::Codex.answer("PostToolUse", Some("n")), json!({"systemMessage": "n"}));
    }
}
