//! `snapback`: the command-line client of snapbackd.
//!
//! Exit codes: 0 success, 1 the operation was refused or failed, 2 usage
//! error, 3 the daemon is not reachable.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;
use snapback::proto::{
    CheckpointRequest, DiffDetail, DiffRequest, ExportRequest, ListRequest, LogRequest, PlanRollbackRequest,
    PruneRequest, RevertRequest, RollbackRequest, SandboxAdd, SandboxRemove, UndoRequest, WireBytes, WirePath,
};
use snapback::{Client, ClientError, ConnectOptions, DiffItem};

/// Prints a line on stdout, like `println!`; when stdout is closed (`|
/// head`), the CLI ends quietly with exit 0, which `println!` would turn
/// into a panic.
macro_rules! outln {
    () => { $crate::out_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out_line(format_args!($($arg)*)) };
}

mod agent;
mod demo;
mod hook;
mod mcp;
mod print;
mod progress;
mod review;
mod setup;

use print::{Restore, print_checkpoint, print_checkpoints, print_plan, print_restore, print_rollback, print_sandboxes};

/// Writes one line on stdout; see [`outln`].
fn out_line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("snapback: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Checkpoints and rollbacks of sandbox directories, through snapbackd.
#[derive(Parser)]
#[command(name = "snapback", version, propagate_version = true)]
struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's socket [default: $SNAPBACK_SOCKET, then
    /// $XDG_RUNTIME_DIR/snapback/snapbackd.sock, then
    /// /run/snapback/snapbackd.sock for root]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register, list or unregister sandbox directories.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Take a checkpoint of a sandbox.
    Checkpoint {
        /// A sandbox name or registered path.
        sandbox: String,
        /// The plan this checkpoint belongs to.
        #[arg(long, value_name = "ID")]
        plan: Option<String>,
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// The agent tool this checkpoint is taken for.
        #[arg(long, value_name = "NAME")]
        tool: Option<String>,
        /// For example pre or post.
        #[arg(long, value_name = "TEXT")]
        phase: Option<String>,
        /// A free label, repeatable.
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Mark the checkpoint as pinned.
        #[arg(long)]
        pin: bool,
    },
    /// List checkpoints, oldest first.
    List {
        /// Only this sandbox (a name or registered path).
        sandbox: Option<String>,
        /// Only this plan.
        #[arg(long, value_name = "ID")]
        plan: Option<String>,
    },
    /// Show one checkpoint; with --stat or --patch, also what its step
    /// changed against its parent.
    Show {
        /// A checkpoint id or a unique prefix of one.
        checkpoint: String,
        #[command(flatten)]
        detail: Detail,
    },
    /// Show what changed between two checkpoints, or since one.
    Diff {
        /// The older state.
        from: String,
        /// The newer state [default: the live tree]
        to: Option<String>,
        #[command(flatten)]
        detail: Detail,
    },
    /// The timeline of checkpoints, newest first, each with what its step
    /// changed.
    Log {
        /// Only this sandbox (a name or registered path).
        sandbox: Option<String>,
        /// Only this plan.
        #[arg(long, value_name = "ID")]
        plan: Option<String>,
        /// At most this many entries; 0 for all [default: 20]
        #[arg(short = 'n', value_name = "N")]
        limit: Option<u64>,
        /// Also each step's files, with their added and removed lines.
        #[arg(long)]
        stat: bool,
    },
    /// Bring a sandbox back to a checkpoint. A safety checkpoint of the
    /// current state is taken first, so the rollback can be undone.
    Rollback {
        checkpoint: String,
        /// Restore only this path (relative to the sandbox root, or
        /// absolute below it) and what lies below it; repeatable.
        #[arg(long = "path", value_name = "P")]
        paths: Vec<PathBuf>,
        /// Report what would change, touching nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show, apply, abandon or roll back a plan.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Undo only the changes a checkpoint recorded since the checkpoint
    /// before it, keeping every later change.
    Revert {
        checkpoint: String,
        /// For paths also changed later, take the step's parent version.
        #[arg(long)]
        force: bool,
        /// Report what would change, touching nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undo the latest rollback, revert or undo of a sandbox.
    Undo {
        sandbox: String,
        /// Report what would change, touching nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prune checkpoints now under the retention policy, with overrides.
    Prune {
        sandbox: String,
        /// Keep this many newest checkpoints.
        #[arg(long, value_name = "N")]
        keep_last: Option<u64>,
        /// Also keep every checkpoint younger than this (30s, 15m, 2h, 7d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_within: Option<u64>,
    },
    /// Write a checkpoint out as a read-only directory tree.
    Export {
        checkpoint: String,
        /// A directory that does not exist yet.
        dir: PathBuf,
    },
    /// Check every stored object against the catalogue (size and content
    /// hash) and look for objects nothing references. Reports; never
    /// repairs. Exits 1 when anything is wrong.
    Verify,
    /// Show the daemon and its sandboxes.
    Status,
    /// Take a checkpoint for a coding agent's tool call, described by the
    /// hook JSON on stdin (Claude Code and Codex PreToolUse/PostToolUse,
    /// Gemini CLI BeforeTool/AfterTool, Cursor beforeShellExecution and
    /// the like). Never fails the call: always exits 0.
    Hook {
        /// The sandbox [default: the registered sandbox holding the JSON's cwd]
        #[arg(long)]
        sandbox: Option<String>,
        /// The agent that runs the hook [default: told by the JSON's shape]
        #[arg(long, value_enum)]
        agent: Option<hook::Agent>,
    },
    /// Checkpoint, run a command, checkpoint again (phases pre and post);
    /// exits with the command's code.
    Exec {
        #[arg(long)]
        sandbox: String,
        /// The tool name to record [default: the command's file name]
        #[arg(long, value_name = "NAME")]
        tool: Option<String>,
        /// The plan both checkpoints belong to.
        #[arg(long, value_name = "ID")]
        plan: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Run a short demonstration against a private daemon in a temporary
    /// directory: register, checkpoint, edit, diff, roll back.
    Demo,
    /// Serve the Model Context Protocol on stdio: tools to checkpoint, list,
    /// diff, roll back, revert a step and undo, for an agent to call.
    Mcp {
        /// The sandbox for tools not given one [default: the one holding
        /// the working directory]
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Write snapback's hooks into an agent's settings, register its MCP
    /// server with an agent, or install the systemd units. Merges with
    /// what is there; a second run changes nothing.
    #[command(subcommand)]
    Setup(SetupCommand),
}

#[derive(Subcommand)]
enum SetupCommand {
    /// Claude Code: PreToolUse and PostToolUse hooks in .claude/settings.json.
    Claude(SetupArgs),
    /// Gemini CLI: BeforeTool and AfterTool hooks in .gemini/settings.json.
    Gemini(SetupArgs),
    /// Codex CLI: PreToolUse and PostToolUse hooks in .codex/hooks.json.
    Codex(SetupArgs),
    /// Cursor: shell, MCP and file-edit hooks in .cursor/hooks.json.
    Cursor(SetupArgs),
    /// Register `snapback mcp` as an MCP server with an agent.
    Mcp {
        #[arg(value_enum)]
        agent: hook::Agent,
        #[command(flatten)]
        args: SetupArgs,
    },
    /// Install the systemd units: the system's (as root), or the user's
    /// (--user, into ~/.config/systemd/user), socket-activated.
    Service {
        #[arg(long)]
        user: bool,
        /// Also reload systemd and start the socket, where systemd runs.
        #[arg(long)]
        now: bool,
        #[arg(long)]
        dry_run: bool,
        /// Remove the units snapback installed.
        #[arg(long)]
        remove: bool,
    },
}

/// Where and how `setup` writes an agent's settings.
#[derive(clap::Args)]
struct SetupArgs {
    /// The project's settings, in DIR [default: the current directory]
    #[arg(long, value_name = "DIR", conflicts_with = "user")]
    project: Option<PathBuf>,
    /// The user's settings, in the home directory.
    #[arg(long)]
    user: bool,
    /// Print the change as a diff; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take snapback's entries out again.
    #[arg(long)]
    remove: bool,
}

/// How much `diff` and `show` say about each path.
#[derive(clap::Args)]
struct Detail {
    /// A unified diff in git's format, for `git apply` or `patch -p1`.
    #[arg(long, conflicts_with = "stat")]
    patch: bool,
    /// Added and removed lines per file, and the total.
    #[arg(long)]
    stat: bool,
    /// Only this path (relative to the sandbox root) and what lies below
    /// it; repeatable.
    #[arg(long = "path", value_name = "P")]
    paths: Vec<PathBuf>,
}

impl Detail {
    fn level(&self) -> DiffDetail {
        match (self.patch, self.stat) {
            (true, _) => DiffDetail::Patch,
            (false, true) => DiffDetail::Stat,
            (false, false) => DiffDetail::Paths,
        }
    }

    fn paths(&self) -> Vec<WirePath> {
        self.paths.iter().map(|p| WirePath::from(p.as_path())).collect()
    }
}

#[derive(Subcommand)]
enum PlanCommand {
    /// Show a plan's state and checkpoints.
    Show { plan: String },
    /// Mark a plan applied: it can no longer be rolled back.
    Apply { plan: String },
    /// Mark a plan abandoned: it takes no more checkpoints.
    Abandon { plan: String },
    /// Roll a sandbox back to one of the plan's checkpoints (refused once
    /// the plan is applied).
    Rollback {
        plan: String,
        checkpoint: String,
        #[arg(long = "path", value_name = "P")]
        paths: Vec<PathBuf>,
        #[arg(long)]
        dry_run: bool,
    },
}

/// Parses `90`, `30s`, `15m`, `2h` or `7d` into seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30s, 15m, 2h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Register a directory as a sandbox.
    Add {
        dir: PathBuf,
        /// [default: the directory's name]
        #[arg(long)]
        name: Option<String>,
        /// A glob of paths never captured nor touched by a rollback;
        /// repeatable. Without a `/` it matches a name at any depth.
        #[arg(long = "exclude", value_name = "GLOB")]
        excludes: Vec<String>,
        /// Keep this sandbox's objects here; put it on the sandbox's
        /// filesystem to get reflinks [default: the daemon's store]
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
    },
    /// List registered sandboxes.
    List,
    /// Unregister a sandbox; its directory is never touched.
    Remove {
        name: String,
        /// Also delete its checkpoints and their stored files.
        #[arg(long)]
        purge: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not K=V"))
}

/// How a command ended, for the exit code.
enum Failure {
    Refused(String),
    /// Refused by the daemon, with its error code and hint.
    Daemon(&'static str, String, Option<String>),
    Usage(String),
    /// The daemon is not reachable; what to do about it.
    Unreachable(String, String),
    /// Refused, and already reported on stdout (a `--json` verify report
    /// that found problems): only the exit code is left to give.
    Reported,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable { path, source } => {
                // SAFETY: geteuid cannot fail.
                let service = if unsafe { libc::geteuid() } == 0 {
                    "systemctl start snapbackd"
                } else {
                    "systemctl --user start snapbackd"
                };
                Failure::Unreachable(
                    format!("snapbackd is not running at {} ({source})", path.display()),
                    format!(
                        "start it with `snapbackd --socket {}` (or `{service}`), or point --socket / \
                         SNAPBACK_SOCKET at the right socket",
                        path.display()
                    ),
                )
            }
            ClientError::Daemon(body) => {
                let list: Vec<String> = body.paths.iter().map(|p| format!("\n  {}", p.display())).collect();
                Failure::Daemon(body.code.as_str(), format!("{}{}", body.message, list.concat()), body.hint)
            }
            other => Failure::Refused(other.to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: what was asked for, on stdout.
            outln!("{}", e.to_string().trim_end());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // Before parsing succeeds, `--json` is looked for by hand: a
            // script that asked for JSON gets JSON, usage errors included.
            if std::env::args_os().any(|a| a == "--json") {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                let doc = serde_json::json!({"error": {"exit": 2, "code": "usage", "message": message}});
                outln!("{doc}");
            }
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(failure) => {
            let (exit, code, message, hint) = match failure {
                Failure::Refused(m) => (1, "refused", m, None),
                Failure::Daemon(code, m, hint) => (1, code, m, hint),
                Failure::Usage(m) => (2, "usage", m, None),
                Failure::Unreachable(m, hint) => (3, "unreachable", m, Some(hint)),
                Failure::Reported => return ExitCode::from(1),
            };
            if json {
                let mut error = serde_json::json!({"exit": exit, "code": code, "message": message});
                if let Some(hint) = &hint {
                    error["hint"] = hint.as_str().into();
                }
                outln!("{}", serde_json::json!({ "error": error }));
            }
            eprintln!("snapback: {message}");
            if let Some(hint) = hint {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(exit)
        }
    }
}

fn socket_path(socket: Option<PathBuf>) -> Result<PathBuf, Failure> {
    socket.or_else(snapback::defaults::socket_path).ok_or_else(|| {
        Failure::Usage("no socket path: pass --socket, or set SNAPBACK_SOCKET or XDG_RUNTIME_DIR".into())
    })
}

fn connect(socket: Option<PathBuf>) -> Result<Client, Failure> {
    Ok(Client::connect(&socket_path(socket)?)?)
}

/// Connects for a command that may run long (a checkpoint, a rollback):
/// on a terminal, and without `--json`, it draws the daemon's progress
/// lines as a bar on stderr.
fn connect_with_bar(socket: Option<PathBuf>, json: bool) -> Result<(Client, progress::Bar), Failure> {
    let bar = progress::Bar::for_stderr(!json);
    let options = ConnectOptions { timeout: None, progress: bar.callback() };
    Ok((Client::connect_with(&socket_path(socket)?, options)?, bar))
}

/// Prints `value` as JSON, or runs `text` to print it for a person.
fn emit<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T)) -> Result<(), Failure> {
    if json {
        let out = serde_json::to_string_pretty(value).map_err(|e| Failure::Refused(e.to_string()))?;
        outln!("{out}");
    } else {
        text(value);
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf, Failure> {
    std::path::absolute(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))
}

/// Resolves a path the daemon will open for this user: the daemon follows
/// no symlink (a swapped parent must not lead it elsewhere), so the CLI
/// resolves the user's own, with the user's rights: the longest existing
/// prefix is made canonical, and the components that do not exist yet are
/// kept as given.
fn resolved(path: &Path) -> Result<PathBuf, Failure> {
    let path = absolute(path)?;
    let mut missing = Vec::new();
    let mut existing = path.as_path();
    loop {
        if let Ok(mut base) = existing.canonicalize() {
            base.extend(missing.iter().rev());
            return Ok(base);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                existing = parent;
            }
            _ => return Ok(path), // nothing resolves: the daemon says why
        }
    }
}

/// A sandbox argument is a name, or a path to a registered directory. A
/// name is tried first; when it is not registered and names a directory,
/// the directory's canonical path is used.
fn sandbox_ref(client: &mut Client, arg: &str) -> Result<String, Failure> {
    let looks_like_path = arg.contains('/') || arg == "." || arg == "..";
    if !looks_like_path {
        let known = client.sandbox_list()?.sandboxes.iter().any(|s| s.name == arg);
        if known || !Path::new(arg).is_dir() {
            return Ok(arg.to_owned());
        }
    }
    let canonical = Path::new(arg).canonicalize().map_err(|e| Failure::Refused(format!("{arg}: {e}")))?;
    canonical
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| Failure::Usage(format!("{arg}: refer to this sandbox by its name")))
}

fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let json = cli.json;
    let done = match cli.command {
        Command::Hook { sandbox, agent } => return Ok(hook::hook(cli.socket, sandbox, agent, json)),
        Command::Exec { sandbox, tool, plan, command } => {
            let mut client = connect(cli.socket)?;
            let sandbox = sandbox_ref(&mut client, &sandbox)?;
            return agent::exec(&mut client, sandbox, tool, plan, command, json).map_err(Failure::from);
        }
        Command::Demo => demo::run(json),
        Command::Setup(cmd) => run_setup(cmd, json),
        Command::Mcp { sandbox } => return Ok(mcp::serve(mcp::Options { socket: cli.socket, sandbox })),
        Command::Sandbox(cmd) => run_sandbox(&mut connect(cli.socket)?, cmd, json),
        Command::Checkpoint { sandbox, plan, reason, tool, phase, labels, pin } => {
            let (mut client, bar) = connect_with_bar(cli.socket, json)?;
            let sandbox = sandbox_ref(&mut client, &sandbox)?;
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let req = CheckpointRequest { sandbox, plan, reason, tool, phase, labels, pin, kind: None };
            let info = client.checkpoint(req);
            bar.finish();
            let info = info?;
            emit(json, &info, print::taken)
        }
        Command::List { sandbox, plan } => {
            let mut client = connect(cli.socket)?;
            let sandbox = sandbox.map(|s| sandbox_ref(&mut client, &s)).transpose()?;
            let list = client.list(ListRequest { sandbox, plan })?;
            emit(json, &list, |l| print_checkpoints(&l.checkpoints))
        }
        Command::Show { checkpoint, detail } => run_show(&mut connect(cli.socket)?, &checkpoint, &detail, json),
        Command::Diff { from, to, detail } => {
            let req = DiffRequest { from, to, detail: detail.level(), paths: detail.paths(), step: false };
            run_diff(&mut connect(cli.socket)?, req, json)
        }
        Command::Log { sandbox, plan, limit, stat } => {
            let mut client = connect(cli.socket)?;
            let sandbox = sandbox.map(|s| sandbox_ref(&mut client, &s)).transpose()?;
            let log = client.log(LogRequest { sandbox, plan, limit, stat })?;
            emit(json, &log, |l| review::print_log(&l.entries, l.more))
        }
        Command::Rollback { checkpoint, paths, dry_run } => {
            let paths = paths.iter().map(|p| WirePath(p.as_os_str().as_bytes().to_vec())).collect();
            let (mut client, bar) = connect_with_bar(cli.socket, json)?;
            let report = client.rollback(RollbackRequest { checkpoint, paths, dry_run });
            bar.finish();
            emit(json, &report?, print_rollback)
        }
        Command::Plan(cmd) => run_plan(&mut connect(cli.socket)?, cmd, json),
        Command::Revert { checkpoint, force, dry_run } => {
            let (mut client, bar) = connect_with_bar(cli.socket, json)?;
            let report = client.revert(RevertRequest { checkpoint, force, dry_run });
            bar.finish();
            emit(json, &report?, |r| print_restore(Restore::Revert, r))
        }
        Command::Undo { sandbox, dry_run } => {
            let (mut client, bar) = connect_with_bar(cli.socket, json)?;
            let sandbox = sandbox_ref(&mut client, &sandbox)?;
            let report = client.undo(UndoRequest { sandbox, dry_run });
            bar.finish();
            emit(json, &report?, |r| print_restore(Restore::Undo, r))
        }
        Command::Prune { sandbox, keep_last, keep_within } => {
            let mut client = connect(cli.socket)?;
            let sandbox = sandbox_ref(&mut client, &sandbox)?;
            let report = client.prune(PruneRequest { sandbox, keep_last, keep_within_secs: keep_within })?;
            emit(json, &report, print::pruned)
        }
        Command::Export { checkpoint, dir } => {
            let dir = WirePath::from(resolved(&dir)?.as_path());
            let report = connect(cli.socket)?.export(ExportRequest { checkpoint, dir })?;
            emit(json, &report, print::exported)
        }
        Command::Verify => run_verify(&mut connect(cli.socket)?, json),
        Command::Status => {
            let report = connect(cli.socket)?.status()?;
            emit(json, &report, print::status)
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

/// `snapback diff`: printed as it arrives, unless `--json`.
fn run_diff(client: &mut Client, req: DiffRequest, json: bool) -> Result<(), Failure> {
    if json {
        let mut report = client.diff(req)?;
        // One document: the patch's pieces as one.
        if !report.patch.is_empty() {
            let whole: Vec<u8> = report.patch.drain(..).flat_map(|p| p.0).collect();
            report.patch.push(WireBytes(whole));
        }
        return emit(json, &report, |_| {});
    }
    match req.detail {
        // A diff of a whole install need not be held in memory first.
        DiffDetail::Paths => {
            let mut count = 0u64;
            let report = client.diff_streaming(req, &mut |item| {
                if let DiffItem::Change(c) = item {
                    review::print_change(&c);
                    count += 1;
                }
            })?;
            review::print_diff_summary(&report, count);
        }
        // Column widths need every line: the stat lines are kept (each is
        // a path and three numbers), the patch never.
        DiffDetail::Stat => {
            let mut changes = Vec::new();
            let report = client.diff_streaming(req, &mut |item| {
                if let DiffItem::Change(c) = item {
                    changes.push(c);
                }
            })?;
            review::print_stat(&changes, report.total.as_ref(), " ");
        }
        DiffDetail::Patch => {
            client.diff_streaming(req, &mut |item| {
                if let DiffItem::Patch(bytes) = item {
                    review::out_bytes(&bytes);
                }
            })?;
        }
    }
    Ok(())
}

/// `snapback show`: the checkpoint; with `--stat` or `--patch`, its step.
fn run_show(client: &mut Client, checkpoint: &str, detail: &Detail, json: bool) -> Result<(), Failure> {
    let info = client.show(checkpoint)?;
    // A checkpoint taken after a tool call and its parent taken before the
    // same call (one tool_use_id) are one step: say so.
    let call = info.labels.get("tool_use_id").zip(info.parent.as_ref());
    let pre = match call {
        Some((call, parent)) if !json => {
            client.show(parent).ok().filter(|p| p.labels.get("tool_use_id") == Some(call)).map(|p| p.id)
        }
        _ => None,
    };
    let print = |info: &snapback::proto::CheckpointInfo| {
        print_checkpoint(info);
        if let Some(pre) = &pre {
            outln!("step       one tool call: {pre} was taken before it, this after it");
        }
    };
    if detail.level() == DiffDetail::Paths && detail.paths.is_empty() {
        return emit(json, &info, print);
    }
    let req =
        DiffRequest { from: info.id.clone(), to: None, step: true, detail: detail.level(), paths: detail.paths() };
    if json {
        let step = client.diff(req)?;
        return emit(json, &serde_json::json!({ "checkpoint": info, "step": step }), |_| {});
    }
    print(&info);
    outln!();
    run_diff(client, req, false)
}

/// `snapback setup ...`.
fn run_setup(cmd: SetupCommand, json: bool) -> Result<(), Failure> {
    use hook::Agent;
    let (agent, what, args) = match cmd {
        SetupCommand::Claude(a) => (Agent::Claude, setup::What::Hooks, a),
        SetupCommand::Gemini(a) => (Agent::Gemini, setup::What::Hooks, a),
        SetupCommand::Codex(a) => (Agent::Codex, setup::What::Hooks, a),
        SetupCommand::Cursor(a) => (Agent::Cursor, setup::What::Hooks, a),
        SetupCommand::Mcp { agent, args } => (agent, setup::What::Mcp, args),
        SetupCommand::Service { user, now, dry_run, remove } => {
            let outcome = setup::service(user, now, dry_run, remove)?;
            return emit(json, &outcome, print::set_up);
        }
    };
    let scope = match (args.user, args.project) {
        (true, _) => setup::Scope::User,
        (false, Some(dir)) => setup::Scope::Project(absolute(&dir)?),
        (false, None) => setup::Scope::Project(absolute(Path::new("."))?),
    };
    let outcome = setup::agent(agent, what, scope, args.dry_run, args.remove)?;
    emit(json, &outcome, print::set_up)
}

/// `snapback verify`: exits 1 when anything is wrong.
fn run_verify(client: &mut Client, json: bool) -> Result<(), Failure> {
    let report = client.verify()?;
    emit(json, &report, print::verified)?;
    match (report.clean(), json) {
        (true, _) => Ok(()),
        (false, true) => Err(Failure::Reported),
        (false, false) => {
            let store_agrees = report.missing.is_empty() && report.corrupt.is_empty() && report.unreferenced.is_empty();
            Err(Failure::Refused(match store_agrees {
                true => "the catalogue holds two current versions of a path".into(),
                false => "the store does not match the catalogue".into(),
            }))
        }
    }
}

/// `snapback sandbox ...`.
fn run_sandbox(client: &mut Client, cmd: SandboxCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        SandboxCommand::Add { dir, name, excludes, store } => {
            let path = WirePath::from(resolved(&dir)?.as_path());
            let store = store.map(|s| resolved(&s)).transpose()?.map(|s| WirePath::from(s.as_path()));
            let info = client.sandbox_add(SandboxAdd { path, name, excludes, store })?;
            emit(json, &info, print::registered)
        }
        SandboxCommand::List => {
            let list = client.sandbox_list()?;
            emit(json, &list, |l| print_sandboxes(&l.sandboxes))
        }
        SandboxCommand::Remove { name, purge } => {
            let sandbox = sandbox_ref(client, &name)?;
            let info = client.sandbox_remove(SandboxRemove { sandbox, purge })?;
            emit(json, &info, |i| print::removed(i, purge))
        }
    }
}

/// `snapback plan ...`.
fn run_plan(client: &mut Client, cmd: PlanCommand, json: bool) -> Result<(), Failure> {
    match cmd {
        PlanCommand::Show { plan } => emit(json, &client.plan_show(&plan)?, print_plan),
        PlanCommand::Apply { plan } => emit(json, &client.plan_apply(&plan)?, print_plan),
        PlanCommand::Abandon { plan } => emit(json, &client.plan_abandon(&plan)?, print_plan),
        PlanCommand::Rollback { plan, checkpoint, paths, dry_run } => {
            let paths = paths.iter().map(|p| WirePath(p.as_os_str().as_bytes().to_vec())).collect();
            let req = PlanRollbackRequest { plan, checkpoint, paths, dry_run };
            emit(json, &client.plan_rollback(req)?, print_rollback)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::print::human_bytes;
    use snapback::utc;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_709_210_096_000), "2024-02-29 12:34:56");
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
