//! The MCP server's tools: each a daemon request, with a JSON Schema for
//! its arguments and its structured result, and annotations that say
//! honestly what it does to the sandbox.

use std::path::PathBuf;

use serde_json::{Value, json};
use snapback::proto::{
    Change, CheckpointKind, CheckpointRequest, DiffDetail, DiffRequest, LogRequest, RevertRequest, RollbackReport,
    RollbackRequest, UndoRequest, WirePath,
};
use snapback::{Client, ClientError};

use super::{Options, RpcError};

/// A patch longer than this is cut in a tool's answer (an agent's context
/// holds no more); `paths` narrows it.
const MAX_PATCH: usize = 256 * 1024;

pub struct Tools {
    socket: Option<PathBuf>,
    sandbox: Option<String>,
}

/// Why a tool failed: the daemon's code and message, as the agent reads
/// them in an `isError` result.
struct Failed {
    code: String,
    message: String,
}

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Failed {
        let code = match &e {
            ClientError::Daemon(body) => body.code.as_str().to_owned(),
            ClientError::Unreachable { .. } => "unreachable".to_owned(),
            _ => "protocol".to_owned(),
        };
        Failed { code, message: e.to_string() }
    }
}

fn failed(code: &str, message: impl Into<String>) -> Failed {
    Failed { code: code.into(), message: message.into() }
}

type Answer = Result<(String, Value), Failed>;

impl Tools {
    pub fn new(options: Options) -> Tools {
        Tools { socket: options.socket, sandbox: options.sandbox }
    }

    /// The tool definitions `tools/list` answers.
    pub fn list() -> Vec<Value> {
        let string = json!({"type": "string"});
        let paths = json!({"type": "array", "items": {"type": "string"},
            "description": "Only these paths (relative to the sandbox root) and what lies below them."});
        let sandbox = json!({"type": "string",
            "description": "A sandbox name or registered path [default: the server's, or the one holding its working directory]."});
        let restore_output = json!({"type": "object", "properties": {
            "dry_run": {"type": "boolean"}, "restored": {"type": "integer"}, "created": {"type": "integer"},
            "deleted": {"type": "integer"}, "safety_checkpoint": {"type": ["string", "null"]},
            "changes": {"type": "array", "items": file_schema()}},
            "required": ["dry_run", "restored", "created", "deleted", "changes"]});
        let annotations = |title: &str, read_only: bool, destructive: bool, idempotent: bool| {
            json!({"title": title, "readOnlyHint": read_only, "destructiveHint": destructive,
                "idempotentHint": idempotent, "openWorldHint": false})
        };
        vec![
            json!({"name": "checkpoint",
                "description": "Record the sandbox as it is now, so that it can be rolled back to this point.",
                "inputSchema": {"type": "object", "properties": {"sandbox": sandbox, "reason": string}},
                "outputSchema": {"type": "object", "properties": {"id": string, "sandbox": string,
                    "changed": {"type": "integer"}, "files": {"type": "integer"}}, "required": ["id", "sandbox", "changed", "files"]},
                "annotations": annotations("Take a checkpoint", false, false, false)}),
            json!({"name": "list_checkpoints",
                "description": "The sandbox's checkpoints, newest first, each with what its step changed.",
                "inputSchema": {"type": "object", "properties": {"sandbox": sandbox,
                    "limit": {"type": "integer", "minimum": 1, "description": "At most this many [default: 20]."}}},
                "outputSchema": {"type": "object", "properties": {"checkpoints": {"type": "array", "items": {"type": "object",
                    "properties": {"id": string, "created_unix_ms": {"type": "integer"}, "kind": string,
                        "tool": {"type": ["string", "null"]}, "reason": {"type": ["string", "null"]},
                        "files": {"type": ["integer", "null"]}, "added": {"type": ["integer", "null"]},
                        "removed": {"type": ["integer", "null"]}}, "required": ["id", "created_unix_ms", "kind"]}},
                    "more": {"type": "integer"}}, "required": ["checkpoints", "more"]},
                "annotations": annotations("List checkpoints", true, false, true)}),
            json!({"name": "diff",
                "description": "What changed from a checkpoint to another, or to the sandbox as it is now: each file with its added and removed lines, and with patch: true the patch in git's format.",
                "inputSchema": {"type": "object", "properties": {"from": string,
                    "to": {"type": "string", "description": "[default: the sandbox as it is now]"},
                    "patch": {"type": "boolean"}, "paths": paths}, "required": ["from"]},
                "outputSchema": {"type": "object", "properties": {"files": {"type": "array", "items": file_schema()},
                    "added": {"type": "integer"}, "removed": {"type": "integer"}, "patch": string,
                    "truncated": {"type": "boolean"}}, "required": ["files", "added", "removed"]},
                "annotations": annotations("Show a diff", true, false, true)}),
            json!({"name": "rollback",
                "description": "Bring the sandbox back to a checkpoint. A dry run that changes nothing unless confirm is true; a real rollback first takes a safety checkpoint, so undo takes it back.",
                "inputSchema": {"type": "object", "properties": {"checkpoint": string, "paths": paths,
                    "confirm": {"type": "boolean", "description": "Really roll back [default: false, a dry run]."}},
                    "required": ["checkpoint"]},
                "outputSchema": restore_output.clone(),
                "annotations": annotations("Roll back", false, true, false)}),
            json!({"name": "revert_step",
                "description": "Undo only the changes one checkpoint's step made, keeping every later change. Refused when a later step changed the same files, unless force.",
                "inputSchema": {"type": "object", "properties": {"checkpoint": string, "force": {"type": "boolean"},
                    "dry_run": {"type": "boolean"}}, "required": ["checkpoint"]},
                "outputSchema": restore_output.clone(),
                "annotations": annotations("Revert one step", false, true, false)}),
            json!({"name": "undo",
                "description": "Take back the sandbox's latest rollback, revert or undo.",
                "inputSchema": {"type": "object", "properties": {"sandbox": sandbox, "dry_run": {"type": "boolean"}}},
                "outputSchema": restore_output,
                "annotations": annotations("Undo the last restore", false, true, false)}),
        ]
    }

    /// Runs `tools/call`. A tool's own failure is a result with
    /// `isError`; only a call that names no known tool is a protocol error.
    pub fn call(&self, params: &Value, roots: &mut dyn FnMut() -> Vec<PathBuf>) -> Result<Value, RpcError> {
        let name = params.get("name").and_then(Value::as_str).ok_or_else(|| RpcError::new(-32602, "no tool name"))?;
        let empty = json!({});
        let args = params.get("arguments").filter(|a| !a.is_null()).unwrap_or(&empty);
        if !args.is_object() {
            return Err(RpcError::new(-32602, "arguments must be an object"));
        }
        let answer = match name {
            "checkpoint" => self.checkpoint(args, roots),
            "list_checkpoints" => self.list_checkpoints(args, roots),
            "diff" => self.diff(args),
            "rollback" => self.rollback(args),
            "revert_step" => self.revert(args),
            "undo" => self.undo(args, roots),
            other => return Err(RpcError::new(-32602, format!("no tool {other}"))),
        };
        Ok(match answer {
            Ok((text, structured)) => {
                json!({"content": [{"type": "text", "text": text}], "structuredContent": structured, "isError": false})
            }
            Err(f) => {
                eprintln!("snapback mcp: {name}: {}: {}", f.code, f.message);
                json!({"content": [{"type": "text", "text": format!("{}: {}", f.code, f.message)}], "isError": true})
            }
        })
    }

    fn connect(&self) -> Result<Client, Failed> {
        let path = self.socket.clone().or_else(snapback::defaults::socket_path).ok_or_else(|| {
            failed("unreachable", "no socket path: start snapback mcp with --socket, or set SNAPBACK_SOCKET")
        })?;
        Ok(Client::connect(&path)?)
    }

    /// The sandbox a tool acts on: its argument, the server's, the one
    /// holding one of the client's roots, or the one holding the server's
    /// working directory.
    fn sandbox(
        &self,
        client: &mut Client,
        args: &Value,
        roots: &mut dyn FnMut() -> Vec<PathBuf>,
    ) -> Result<String, Failed> {
        if let Some(s) = text(args, "sandbox").map(str::to_owned).or_else(|| self.sandbox.clone()) {
            return Ok(s);
        }
        let cwd = std::env::current_dir().map_err(|e| failed("invalid_request", e.to_string()))?;
        let list = client.sandbox_list()?.sandboxes;
        let places = roots().into_iter().chain(std::iter::once(cwd.clone()));
        places.into_iter().find_map(|p| crate::agent::containing_sandbox(&list, &p)).ok_or_else(|| {
            let why = format!("no sandbox given, and neither the client's roots nor {} is in one", cwd.display());
            failed("invalid_request", why)
        })
    }

    fn checkpoint(&self, args: &Value, roots: &mut dyn FnMut() -> Vec<PathBuf>) -> Answer {
        let mut client = self.connect()?;
        let sandbox = self.sandbox(&mut client, args, roots)?;
        let req = CheckpointRequest {
            sandbox,
            reason: text(args, "reason").map(str::to_owned),
            tool: Some("mcp".into()),
            kind: Some(CheckpointKind::Tool),
            ..CheckpointRequest::default()
        };
        let c = client.checkpoint(req)?;
        let summary = format!("checkpoint {} of {}: {} paths changed since the last one", c.id, c.sandbox, c.changed);
        Ok((summary, json!({"id": c.id, "sandbox": c.sandbox, "changed": c.changed, "files": c.files})))
    }

    fn list_checkpoints(&self, args: &Value, roots: &mut dyn FnMut() -> Vec<PathBuf>) -> Answer {
        let mut client = self.connect()?;
        let sandbox = self.sandbox(&mut client, args, roots)?;
        let limit = args.get("limit").and_then(Value::as_u64).unwrap_or(snapback::proto::LOG_LIMIT).max(1);
        let log = client.log(LogRequest { sandbox: Some(sandbox), limit: Some(limit), ..LogRequest::default() })?;
        let mut lines = Vec::new();
        let entries: Vec<Value> = log
            .entries
            .iter()
            .map(|e| {
                let c = &e.checkpoint;
                let t = e.total.as_ref();
                let counts = t.map_or(format!("{} paths", c.changed), |t| format!("{} files, +{} -{}", t.files, t.added, t.removed));
                let what = [c.tool.as_deref(), c.reason.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(": ");
                lines.push(format!("{}  {}  {}  {what}  ({counts})", c.id, snapback::utc(c.created_unix_ms), c.kind.as_str()));
                json!({"id": c.id, "created_unix_ms": c.created_unix_ms, "kind": c.kind.as_str(), "tool": c.tool,
                    "reason": c.reason, "files": t.map(|t| t.files), "added": t.map(|t| t.added), "removed": t.map(|t| t.removed)})
            })
            .collect();
        if log.more > 0 {
            lines.push(format!("... and {} older", log.more));
        }
        Ok((lines.join("\n"), json!({"checkpoints": entries, "more": log.more})))
    }

    fn diff(&self, args: &Value) -> Answer {
        let from = text(args, "from").ok_or_else(|| failed("invalid_request", "from is required"))?;
        let patch = args.get("patch").and_then(Value::as_bool).unwrap_or(false);
        let req = DiffRequest {
            from: from.to_owned(),
            to: text(args, "to").map(str::to_owned),
            detail: if patch { DiffDetail::Patch } else { DiffDetail::Stat },
            paths: strings(args, "paths").into_iter().map(|p| WirePath(p.into_bytes())).collect(),
            step: false,
        };
        let report = self.connect()?.diff(req)?;
        let total = report.total.clone().unwrap_or_default();
        let mut text_out = report.changes.iter().map(stat_line).collect::<Vec<_>>();
        text_out.push(format!("{} files changed, +{} -{}", total.files, total.added, total.removed));
        let mut structured = json!({"files": report.changes.iter().map(file_json).collect::<Vec<_>>(),
            "added": total.added, "removed": total.removed});
        if patch {
            let mut whole: Vec<u8> = report.patch.into_iter().flat_map(|p| p.0).collect();
            let truncated = whole.len() > MAX_PATCH;
            whole.truncate(MAX_PATCH);
            let shown = String::from_utf8_lossy(&whole).into_owned();
            text_out = vec![shown.clone()];
            if truncated {
                text_out.push(format!(
                    "[the patch is longer than {MAX_PATCH} bytes: cut here; pass paths to see the rest]"
                ));
            }
            structured["patch"] = shown.into();
            structured["truncated"] = truncated.into();
        }
        Ok((text_out.join("\n"), structured))
    }

    fn rollback(&self, args: &Value) -> Answer {
        let checkpoint = text(args, "checkpoint").ok_or_else(|| failed("invalid_request", "checkpoint is required"))?;
        let confirm = args.get("confirm").and_then(Value::as_bool).unwrap_or(false);
        let req = RollbackRequest {
            checkpoint: checkpoint.to_owned(),
            paths: strings(args, "paths").into_iter().map(|p| WirePath(p.into_bytes())).collect(),
            dry_run: !confirm,
        };
        let report = self.connect()?.rollback(req)?;
        Ok(restore_answer(&report, "roll back", "call rollback again with confirm: true to do it"))
    }

    fn revert(&self, args: &Value) -> Answer {
        let checkpoint = text(args, "checkpoint").ok_or_else(|| failed("invalid_request", "checkpoint is required"))?;
        let req = RevertRequest {
            checkpoint: checkpoint.to_owned(),
            force: args.get("force").and_then(Value::as_bool).unwrap_or(false),
            dry_run: args.get("dry_run").and_then(Value::as_bool).unwrap_or(false),
        };
        let report = self.connect()?.revert(req)?;
        Ok(restore_answer(&report, "revert", "call revert_step without dry_run to do it"))
    }

    fn undo(&self, args: &Value, roots: &mut dyn FnMut() -> Vec<PathBuf>) -> Answer {
        let mut client = self.connect()?;
        let sandbox = self.sandbox(&mut client, args, roots)?;
        let dry_run = args.get("dry_run").and_then(Value::as_bool).unwrap_or(false);
        let report = client.undo(UndoRequest { sandbox, dry_run })?;
        Ok(restore_answer(&report, "undo", "call undo without dry_run to do it"))
    }
}

fn text<'a>(args: &'a Value, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn strings(args: &Value, key: &str) -> Vec<String> {
    let list = args.get(key).and_then(Value::as_array).into_iter().flatten();
    list.filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The schema of one changed path in a tool's answer.
fn file_schema() -> Value {
    json!({"type": "object", "properties": {"path": {"type": "string"}, "change": {"type": "string"},
        "added": {"type": "integer"}, "removed": {"type": "integer"}, "binary": {"type": "boolean"},
        "note": {"type": "string"}}, "required": ["path", "change"]})
}

fn file_json(c: &Change) -> Value {
    let mut file = json!({"path": c.path.display(), "change": c.change.as_str()});
    if let Some(s) = &c.stat {
        file["added"] = s.added.into();
        file["removed"] = s.removed.into();
        file["binary"] = s.binary.into();
        if let Some(why) = s.withheld.as_ref().or(s.not_diffed.as_ref()) {
            file["note"] = why.as_str().into();
        }
    }
    file
}

fn stat_line(c: &Change) -> String {
    match &c.stat {
        Some(s) if s.binary => {
            format!("{} {}: binary, {} -> {} bytes", c.change.as_str(), c.path.display(), s.old_size, s.new_size)
        }
        Some(s) => format!("{} {}: +{} -{}", c.change.as_str(), c.path.display(), s.added, s.removed),
        None => format!("{} {}", c.change.as_str(), c.path.display()),
    }
}

/// A restore's answer: what it did (or would do), path by path.
fn restore_answer(r: &RollbackReport, verb: &str, then: &str) -> (String, Value) {
    let head = match r.dry_run {
        true => format!(
            "dry run: would {verb} {} paths ({} restored, {} created, {} deleted); {then}",
            r.restored + r.created + r.deleted,
            r.restored,
            r.created,
            r.deleted
        ),
        false => format!(
            "done: {} restored, {} created, {} deleted; undo takes it back (safety checkpoint {})",
            r.restored,
            r.created,
            r.deleted,
            r.safety_checkpoint.as_deref().unwrap_or("-")
        ),
    };
    let changes: Vec<Value> = match r.dry_run {
        true => r.preview.iter().map(file_json).collect(),
        false => {
            let marked = [("added", &r.created_paths), ("modified", &r.restored_paths), ("deleted", &r.removed)];
            marked
                .iter()
                .flat_map(|(kind, paths)| paths.iter().map(move |p| json!({"path": p.display(), "change": kind})))
                .collect()
        }
    };
    let mut lines = vec![head];
    lines.extend(r.preview.iter().map(stat_line));
    let structured = json!({"dry_run": r.dry_run, "restored": r.restored, "created": r.created, "deleted": r.deleted,
        "safety_checkpoint": r.safety_checkpoint, "changes": changes});
    (lines.join("\n"), structured)
}
