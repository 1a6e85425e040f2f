//! `snapback setup`: the hooks, the MCP server and the systemd units,
//! written where each agent (and systemd) reads them.
//!
//! Settings are merged, never replaced: other hooks, other servers and
//! other keys stay, in their order (JSON objects keep their order, TOML is
//! edited in place with its comments). Only snapback's own entries are
//! added, once (a second run changes nothing), and `--remove` takes out
//! exactly those. The first time snapback changes a file, its bytes are
//! kept beside it (`FILE.snapback-backup`); a `--remove` that leaves the
//! settings as that backup held them puts its very bytes back (or no file,
//! where there was none). `--dry-run` prints the change as a diff and
//! writes nothing.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::Failure;
use crate::hook::Agent;

/// Where an agent's settings are: the project's, or the user's.
pub enum Scope {
    Project(PathBuf),
    User,
}

/// What `setup` writes for an agent.
#[derive(Clone, Copy)]
pub enum What {
    Hooks,
    Mcp,
}

/// A settings file and how its content is written.
struct Settings {
    path: PathBuf,
    format: Format,
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    Json,
    Toml,
}

/// What `setup` did, for `--json`.
#[derive(serde::Serialize)]
pub struct Outcome {
    pub file: PathBuf,
    pub changed: bool,
    pub dry_run: bool,
    /// The previous content, kept beside the file.
    pub backup: Option<PathBuf>,
    /// What is left to do by hand.
    pub next: Option<String>,
}

fn home() -> Result<PathBuf, Failure> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| Failure::Usage("HOME is not set: pass --project DIR".into()))
}

/// The file an agent reads `what` from, in `scope`.
fn settings(agent: Agent, what: What, scope: &Scope) -> Result<Settings, Failure> {
    let (dir, user) = match scope {
        Scope::Project(dir) => (dir.clone(), false),
        Scope::User => (home()?, true),
    };
    let json = |rel: &str| Settings { path: dir.join(rel), format: Format::Json };
    Ok(match (agent, what, user) {
        (Agent::Claude, What::Hooks, _) => json(".claude/settings.json"),
        (Agent::Claude, What::Mcp, false) => json(".mcp.json"),
        (Agent::Claude, What::Mcp, true) => json(".claude.json"),
        (Agent::Gemini, _, _) => json(".gemini/settings.json"),
        (Agent::Codex, What::Hooks, _) => json(".codex/hooks.json"),
        (Agent::Codex, What::Mcp, _) => Settings { path: dir.join(".codex/config.toml"), format: Format::Toml },
        (Agent::Cursor, What::Hooks, _) => json(".cursor/hooks.json"),
        (Agent::Cursor, What::Mcp, _) => json(".cursor/mcp.json"),
    })
}

/// The events an agent's hook runs on, with the tools they match (`None`:
/// the event has no matcher) and the timeout in the agent's unit.
fn hook_events(agent: Agent) -> Vec<(&'static str, Option<&'static str>, Option<u64>)> {
    const CLAUDE: &str = "Edit|MultiEdit|Write|NotebookEdit|Bash";
    const GEMINI: &str = "write_file|replace|run_shell_command";
    const CODEX: &str = "Bash|apply_patch";
    // Under each agent's own limit, and above the hook's 20 s wait.
    match agent {
        Agent::Claude => vec![("PreToolUse", Some(CLAUDE), Some(30)), ("PostToolUse", Some(CLAUDE), Some(30))],
        Agent::Gemini => vec![("BeforeTool", Some(GEMINI), Some(30_000)), ("AfterTool", Some(GEMINI), Some(30_000))],
        Agent::Codex => vec![("PreToolUse", Some(CODEX), Some(30)), ("PostToolUse", Some(CODEX), Some(30))],
        Agent::Cursor => ["beforeShellExecution", "afterShellExecution", "afterFileEdit", "beforeMCPExecution"]
            .into_iter()
            .map(|e| (e, None, None))
            .collect(),
    }
}

/// This `snapback`, as a command the agent can run whatever its `PATH`.
fn snapback_command() -> String {
    let exe = this_snapback().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|| "snapback".into());
    if exe.contains(|c: char| c.is_whitespace() || "'\"\\$`".contains(c)) { format!("'{exe}'") } else { exe }
}

/// The real path of this `snapback` (symlinks resolved): where the
/// settings and units point, whatever the agent's `PATH` or cwd.
fn this_snapback() -> Option<PathBuf> {
    std::env::current_exe().ok().and_then(|p| p.canonicalize().ok())
}

/// Whether a hook command is snapback's: `.../snapback hook ...`.
fn is_ours(command: &str) -> bool {
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or_default().trim_matches(['\'', '"']);
    Path::new(program).file_name().is_some_and(|n| n == "snapback") && words.next() == Some("hook")
}

fn agent_name(agent: Agent) -> &'static str {
    match agent {
        Agent::Claude => "claude",
        Agent::Gemini => "gemini",
        Agent::Codex => "codex",
        Agent::Cursor => "cursor",
    }
}

/// Adds snapback's hooks to an agent's settings; returns whether anything
/// changed.
fn add_hooks(doc: &mut Value, agent: Agent, command: &str) -> bool {
    let obj = object(doc);
    if agent == Agent::Cursor && !obj.contains_key("version") {
        obj.insert("version".into(), json!(1));
    }
    let hooks = object(obj.entry("hooks").or_insert_with(|| json!({})));
    let mut changed = false;
    for (event, matcher, timeout) in hook_events(agent) {
        let list = hooks.entry(event).or_insert_with(|| json!([]));
        let Some(list) = list.as_array_mut() else { continue };
        if list.iter().any(|group| commands(group).any(is_ours)) {
            continue;
        }
        let mut entry = json!({"type": "command", "command": command});
        if let Some(t) = timeout {
            entry["timeout"] = json!(t);
        }
        list.push(match (agent, matcher) {
            (Agent::Cursor, _) => json!({"command": command}),
            (_, Some(m)) => json!({"matcher": m, "hooks": [entry]}),
            (_, None) => json!({"hooks": [entry]}),
        });
        changed = true;
    }
    changed
}

/// The commands of one entry of an event's list: a group's hooks (Claude,
/// Gemini, Codex) or the entry itself (Cursor).
fn commands(group: &Value) -> impl Iterator<Item = &str> {
    let own = group.get("command").and_then(Value::as_str);
    let inner = group.get("hooks").and_then(Value::as_array).into_iter().flatten();
    own.into_iter().chain(inner.filter_map(|h| h.get("command").and_then(Value::as_str)))
}

/// Takes snapback's hooks out, and the lists and groups they leave empty.
fn remove_hooks(doc: &mut Value) -> bool {
    let Some(hooks) = doc.get_mut("hooks").and_then(Value::as_object_mut) else { return false };
    let mut changed = false;
    for list in hooks.values_mut().filter_map(Value::as_array_mut) {
        list.retain_mut(|group| {
            if group.get("command").and_then(Value::as_str).is_some_and(is_ours) {
                changed = true;
                return false;
            }
            let Some(inner) = group.get_mut("hooks").and_then(Value::as_array_mut) else { return true };
            let before = inner.len();
            inner.retain(|h| !h.get("command").and_then(Value::as_str).is_some_and(is_ours));
            changed |= inner.len() != before;
            !(inner.is_empty() && before > 0)
        });
    }
    if changed {
        hooks.retain(|_, list| list.as_array().is_none_or(|l| !l.is_empty()));
    }
    changed
}

/// Drops what setup adds around its entries once they are gone: an empty
/// `hooks` or `mcpServers`, and Cursor's `version` left alone.
fn tidy(mut doc: Value) -> Value {
    let obj = object(&mut doc);
    for key in ["hooks", "mcpServers"] {
        if obj.get(key).and_then(Value::as_object).is_some_and(serde_json::Map::is_empty) {
            obj.remove(key);
        }
    }
    if obj.len() == 1 && obj.get("version") == Some(&json!(1)) {
        obj.clear();
    }
    doc
}

/// The MCP server's entry, as every agent names one.
fn mcp_entry(command: &str) -> Value {
    json!({"command": command.trim_matches('\''), "args": ["mcp"]})
}

fn add_mcp(doc: &mut Value, command: &str) -> bool {
    let servers = object(object(doc).entry("mcpServers").or_insert_with(|| json!({})));
    if servers.contains_key("snapback") {
        return false;
    }
    servers.insert("snapback".into(), mcp_entry(command));
    true
}

fn remove_mcp(doc: &mut Value) -> bool {
    let Some(servers) = doc.get_mut("mcpServers").and_then(Value::as_object_mut) else { return false };
    servers.remove("snapback").is_some()
}

/// `value` as an object, made one if it was not.
fn object(value: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !value.is_object() {
        *value = json!({});
    }
    value.as_object_mut().unwrap_or_else(|| unreachable!())
}

/// Codex's `config.toml`: `[mcp_servers.snapback]`, edited in place.
fn edit_toml(text: &str, command: &str, remove: bool) -> Result<(String, bool), String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("not TOML: {e}"))?;
    let changed = if remove {
        let servers = doc.get_mut("mcp_servers").and_then(|s| s.as_table_like_mut());
        let changed = servers.is_some_and(|s| s.remove("snapback").is_some());
        if doc.get("mcp_servers").and_then(|s| s.as_table_like()).is_some_and(|s| s.is_empty()) {
            doc.remove("mcp_servers");
        }
        changed
    } else {
        let servers = doc.entry("mcp_servers").or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        });
        let servers = servers.as_table_like_mut().ok_or("mcp_servers is not a table")?;
        match servers.contains_key("snapback") {
            true => false,
            false => {
                let mut server = toml_edit::Table::new();
                server.insert("command", toml_edit::value(command.trim_matches('\'')));
                let mut args = toml_edit::Array::new();
                args.push("mcp");
                server.insert("args", toml_edit::value(args));
                servers.insert("snapback", toml_edit::Item::Table(server));
                true
            }
        }
    };
    Ok((doc.to_string(), changed))
}

/// The settings a file holds, for comparing two versions of it.
fn meaning(text: &str, format: Format) -> Option<Value> {
    match format {
        Format::Json if text.trim().is_empty() => Some(json!({})),
        Format::Json => serde_json::from_str(text).ok(),
        Format::Toml => toml_edit::de::from_str(text).ok(),
    }
}

/// Runs `snapback setup AGENT` or `snapback setup mcp AGENT`.
pub fn agent(agent: Agent, what: What, scope: Scope, dry_run: bool, remove: bool) -> Result<Outcome, Failure> {
    let file = settings(agent, what, &scope)?;
    let old = match std::fs::read_to_string(&file.path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure::Refused(format!("reading {}: {e}", file.path.display()))),
    };
    let refuse = |why: String| Failure::Refused(format!("{}: {why}; nothing was changed", file.path.display()));
    let command = match what {
        What::Hooks => format!("{} hook --agent {}", snapback_command(), agent_name(agent)),
        What::Mcp => snapback_command(),
    };
    let (mut new, changed) = match file.format {
        Format::Toml => edit_toml(&old, &command, remove).map_err(refuse)?,
        Format::Json => {
            let mut doc = meaning(&old, Format::Json).ok_or_else(|| refuse("not a JSON object".into()))?;
            if !doc.is_object() {
                return Err(refuse("not a JSON object".into()));
            }
            let changed = match (what, remove) {
                (What::Hooks, false) => add_hooks(&mut doc, agent, &command),
                (What::Hooks, true) => remove_hooks(&mut doc),
                (What::Mcp, false) => add_mcp(&mut doc, &command),
                (What::Mcp, true) => remove_mcp(&mut doc),
            };
            let text = serde_json::to_string_pretty(&doc).map_err(|e| refuse(e.to_string()))?;
            (text + "\n", changed)
        }
    };
    let backup = backup_path(&file.path);
    // A removal that leaves the settings as they were before setup puts
    // back their very bytes, or no file where there was none.
    let restored = match remove && changed {
        true => std::fs::read_to_string(&backup).ok().filter(|before| {
            let (then, now) = (meaning(before, file.format), meaning(&new, file.format));
            // With or without what setup put around its entries.
            then.is_some() && (then == now || then == now.map(tidy))
        }),
        false => None,
    };
    if let Some(before) = &restored {
        new.clone_from(before);
    }
    let outcome = Outcome { file: file.path.clone(), changed, dry_run, backup: None, next: None };
    if !changed {
        return Ok(outcome);
    }
    if dry_run {
        print_change(&file.path, &old, &new);
        return Ok(outcome);
    }
    let failed = |e: std::io::Error| refuse(e.to_string());
    if restored.is_some() {
        match new.is_empty() {
            true => std::fs::remove_file(&file.path).map_err(failed)?,
            false => write_atomically(&file.path, new.as_bytes()).map_err(failed)?,
        }
        std::fs::remove_file(&backup).map_err(failed)?;
        return Ok(outcome);
    }
    // The bytes before snapback first changed the file (none, for a file
    // it creates) stay beside it, until a removal puts them back.
    if !backup.exists() {
        let dir = backup.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&backup, &old))
            .map_err(|e| refuse(format!("keeping a backup: {e}")))?;
    }
    write_atomically(&file.path, new.as_bytes()).map_err(failed)?;
    Ok(Outcome { backup: (!old.is_empty()).then_some(backup), ..outcome })
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".snapback-backup");
    path.with_file_name(name)
}

/// Prints what a change would do to `path`, as a unified diff.
fn print_change(path: &Path, old: &str, new: &str) {
    let shown = path.display().to_string();
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff.unified_diff().header(&shown, &shown).to_string();
    crate::review::out_bytes(text.as_bytes());
}

/// Writes `bytes` to `path` through a temporary file renamed over it
/// (keeping its mode), making its directory if needed.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(format!(".snapback-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The units `setup service` installs, by file name: the shipped ones,
/// with the daemon's path.
fn units(user: bool, daemon: &Path) -> Vec<(&'static str, String)> {
    let (service, socket) = match user {
        true => {
            (include_str!("../../systemd/user/snapbackd.service"), include_str!("../../systemd/user/snapbackd.socket"))
        }
        false => (include_str!("../../systemd/snapbackd.service"), include_str!("../../systemd/snapbackd.socket")),
    };
    let service = service.replace("/usr/local/bin/snapbackd", &daemon.to_string_lossy());
    vec![("snapbackd.service", service), ("snapbackd.socket", socket.to_owned())]
}

/// The daemon to run: `snapbackd` beside this `snapback`, else on `PATH`.
fn daemon_path() -> Result<PathBuf, Failure> {
    let beside = this_snapback().map(|p| p.with_file_name("snapbackd"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("snapbackd"));
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| p.is_file())
        .ok_or_else(|| Failure::Refused("no snapbackd beside this snapback or on PATH: install it first".into()))
}

/// Runs `snapback setup service`.
pub fn service(user: bool, now: bool, dry_run: bool, remove: bool) -> Result<Outcome, Failure> {
    let dir = match user {
        true => std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .map_or_else(|| home().map(|h| h.join(".config")), Ok)?
            .join("systemd/user"),
        false => PathBuf::from("/etc/systemd/system"),
    };
    let systemctl = if user { "systemctl --user" } else { "systemctl" };
    let daemon = if remove { PathBuf::from("snapbackd") } else { daemon_path()? };
    let mut changed = false;
    for (name, text) in units(user, &daemon) {
        let path = dir.join(name);
        let old = std::fs::read_to_string(&path).ok();
        match (remove, &old) {
            // Only a unit snapback wrote: its first line is ours.
            (true, Some(o)) if o.lines().next() == text.lines().next() => {
                changed = true;
                if !dry_run {
                    std::fs::remove_file(&path).map_err(|e| Failure::Refused(format!("{}: {e}", path.display())))?;
                }
            }
            (true, _) => {}
            (false, Some(o)) if *o == text => {}
            (false, _) => {
                changed = true;
                match dry_run {
                    true => print_change(&path, old.as_deref().unwrap_or_default(), &text),
                    false => write_atomically(&path, text.as_bytes())
                        .map_err(|e| Failure::Refused(format!("{}: {e}", path.display())))?,
                }
            }
        }
    }
    let command = match remove {
        true => format!("{systemctl} disable --now snapbackd.socket snapbackd.service; {systemctl} daemon-reload"),
        false => format!("{systemctl} daemon-reload && {systemctl} enable --now snapbackd.socket"),
    };
    let running = Path::new("/run/systemd/system").is_dir();
    let next = match (now && !dry_run, running) {
        (true, true) => {
            let status = std::process::Command::new("sh").arg("-c").arg(&command).status();
            match status {
                Ok(s) if s.success() => None,
                _ => Some(format!("`{command}` failed; run it yourself")),
            }
        }
        (true, false) => Some(format!("systemd is not running here; once it is: {command}")),
        (false, _) => Some(command),
    };
    Ok(Outcome { file: dir, changed, dry_run, backup: None, next })
}
