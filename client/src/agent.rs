//! `snapback exec`: checkpoints around a command, and finding the sandbox
//! an agent works in (for `hook` and `mcp` too).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use snapback::proto::{CheckpointInfo, CheckpointKind, CheckpointRequest, SandboxInfo};
use snapback::{Client, ClientError};

/// `s` cut to at most `max` bytes (at least 3) at a character boundary,
/// marked `…`: a command line or a call's name as a checkpoint's reason.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let cut = (0..=max - 3).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    format!("{}…", &s[..cut])
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
    let reason = bounded(&line.join(" "), 200);
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
}
