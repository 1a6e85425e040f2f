//! Wire types of the snapback socket protocol.
//!
//! The protocol is newline-delimited JSON over a Unix stream socket. The
//! client speaks first with [`Request::Hello`]; the daemon answers
//! [`Response::Welcome`] or an error. Every later line is one [`Request`],
//! answered by one [`Response`]. Both enums are tagged by a `type` field and
//! wrap one named payload struct per variant.
//!
//! Architecture invariant: this module is the only place that defines wire
//! types. The daemon depends on it; nothing else derives `Serialize` for
//! anything that crosses the socket.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod answers;
mod errors;
mod path;
mod requests;

pub use answers::*;
pub use errors::*;
pub use path::*;
pub use requests::*;

/// The protocol number exchanged in `hello` / `welcome`. Bumped on any
/// incompatible change.
pub const PROTOCOL: u32 = 2;

/// The oldest protocol the daemon still serves. Protocol 1 has no
/// [`Part`] lines: an answer longer than [`MAX_LINE`] is an error there.
pub const OLDEST_PROTOCOL: u32 = 1;

/// The longest line either side accepts, newline included. A longer line is
/// an error, never an allocation.
pub const MAX_LINE: usize = 1 << 20;

impl Request {
    /// The request's `type` on the wire, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::SandboxAdd(_) => "sandbox_add",
            Request::SandboxList(_) => "sandbox_list",
            Request::SandboxRemove(_) => "sandbox_remove",
            Request::Checkpoint(_) => "checkpoint",
            Request::List(_) => "list",
            Request::Show(_) => "show",
            Request::Diff(_) => "diff",
            Request::Log(_) => "log",
            Request::Rollback(_) => "rollback",
            Request::Status(_) => "status",
            Request::PlanShow(_) => "plan_show",
            Request::PlanApply(_) => "plan_apply",
            Request::PlanAbandon(_) => "plan_abandon",
            Request::PlanRollback(_) => "plan_rollback",
            Request::Revert(_) => "revert",
            Request::Undo(_) => "undo",
            Request::Prune(_) => "prune",
            Request::Export(_) => "export",
            Request::Verify(_) => "verify",
            Request::InjectRescan(_) => "inject_rescan",
        }
    }

    /// Checks every path field of the request, as the daemon does right
    /// after decoding it: a bad one is an `invalid_request`, whatever the
    /// request would have done with it.
    pub fn check_paths(&self) -> Result<(), String> {
        match self {
            Request::SandboxAdd(r) => {
                check_absolute("path", &r.path)?;
                r.store.iter().try_for_each(|s| check_absolute("store", s))
            }
            Request::Export(r) => check_absolute("dir", &r.dir),
            Request::Diff(DiffRequest { paths, .. }) => paths.iter().try_for_each(|p| check_sandbox_path("paths", p)),
            Request::Rollback(RollbackRequest { paths, .. })
            | Request::PlanRollback(PlanRollbackRequest { paths, .. }) => {
                paths.iter().try_for_each(|p| check_sandbox_path("paths", p))
            }
            _ => Ok(()),
        }
    }
}

/// One request line, sent by a client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello(Hello),
    SandboxAdd(SandboxAdd),
    SandboxList(SandboxList),
    SandboxRemove(SandboxRemove),
    Checkpoint(CheckpointRequest),
    List(ListRequest),
    Show(ShowRequest),
    Diff(DiffRequest),
    Log(LogRequest),
    Rollback(RollbackRequest),
    Status(StatusRequest),
    PlanShow(PlanRef),
    PlanApply(PlanRef),
    PlanAbandon(PlanRef),
    PlanRollback(PlanRollbackRequest),
    Revert(RevertRequest),
    Undo(UndoRequest),
    Prune(PruneRequest),
    Export(ExportRequest),
    Verify(VerifyRequest),
    /// Test hook, served only by a daemon started with
    /// `SNAPBACK_TEST_HOOKS=1`: makes the sandbox's next checkpoint compare
    /// everything, as a kernel event-queue overflow does.
    InjectRescan(InjectRescan),
}

/// One response line, sent by the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Welcome(Welcome),
    Sandbox(SandboxInfo),
    Sandboxes(Sandboxes),
    Checkpoint(CheckpointInfo),
    Checkpoints(Checkpoints),
    Diff(DiffReport),
    Log(LogReport),
    Rollback(RollbackReport),
    Status(StatusReport),
    Plan(PlanInfo),
    Pruned(PruneReport),
    Exported(ExportReport),
    Verified(VerifyReport),
    /// Not an answer: a progress line, followed by more lines for the same
    /// request.
    Progress(ProgressReport),
    /// Not an answer: items of one list of the answer that follows, which
    /// was too long for one line (protocol 2). See [`Part`].
    Part(Part),
    Error(ErrorBody),
}

/// A piece of an answer longer than [`MAX_LINE`]: the daemon sends the
/// items of its longest lists in `part` lines, each shorter than
/// [`MAX_LINE`], then the answer itself with those lists empty. A client
/// appends each part's `items`, in the order received, to the list named
/// `field` of the answer (see [`Part::assemble`]); any answer arrives,
/// however long.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Part {
    /// The name of a list field of the answer.
    pub field: String,
    pub items: Vec<serde_json::Value>,
}

impl Part {
    /// Puts the parts received before `answer` back into it.
    pub fn assemble(parts: Vec<Part>, answer: Response) -> Result<Response, String> {
        if parts.is_empty() {
            return Ok(answer);
        }
        let mut value = serde_json::to_value(&answer).map_err(|e| e.to_string())?;
        for part in parts {
            let fields = value.as_object_mut().ok_or("an answer in parts is not an object")?;
            // A list left empty in the answer may be left out of it.
            let list = fields
                .entry(part.field.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                .as_array_mut()
                .ok_or_else(|| format!("a part names {:?}, which is not a list of the answer", part.field))?;
            list.extend(part.items);
        }
        serde_json::from_value(value).map_err(|e| format!("the parts do not fit the answer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_field_is_checked_as_the_request_is_decoded() {
        let bad = |json: &str| {
            let r: Request = serde_json::from_str(json).unwrap();
            r.check_paths().unwrap_err()
        };
        let ok = |json: &str| serde_json::from_str::<Request>(json).unwrap().check_paths().unwrap();
        ok(r#"{"type":"sandbox_add","path":{"text":"/a"},"store":{"text":"/s"}}"#);
        ok(r#"{"type":"export","checkpoint":"c","dir":{"text":"/out"}}"#);
        ok(r#"{"type":"rollback","checkpoint":"c","paths":[{"text":"src/a"},{"text":"/abs/b"}]}"#);
        assert!(bad(r#"{"type":"sandbox_add","path":{"text":"rel"}}"#).contains("not an absolute path"));
        assert!(bad(r#"{"type":"sandbox_add","path":{"text":"/a\u0000"}}"#).contains("NUL"));
        assert!(bad(r#"{"type":"sandbox_add","path":{"text":"/a"},"store":{"text":"s"}}"#).starts_with("store"));
        assert!(bad(r#"{"type":"export","checkpoint":"c","dir":{"bytes":"L2EAYg=="}}"#).contains("NUL"));
        assert!(bad(r#"{"type":"export","checkpoint":"c","dir":{"text":""}}"#).contains("absolute"));
        assert!(bad(r#"{"type":"rollback","checkpoint":"c","paths":[{"text":"a/../b"}]}"#).contains("inside"));
        assert!(
            bad(r#"{"type":"plan_rollback","plan":"p","checkpoint":"c","paths":[{"text":"\u0000"}]}"#).contains("NUL")
        );
    }

    /// A bounded, seeded mutation fuzz of the request decoder: valid lines
    /// with bytes flipped, cut, duplicated and spliced. Decoding must answer
    /// (a request or an error) for every one, never panic; a mutated line
    /// that decodes must encode again.
    #[test]
    fn the_request_decoder_survives_mutated_lines() {
        let seeds: Vec<&[u8]> = vec![
            br#"{"type":"hello","protocol":1,"client":"fuzz","progress":true}"#,
            br#"{"type":"checkpoint","sandbox":"s","plan":"p","labels":{"k":"v"},"pin":true,"kind":"tool"}"#,
            br#"{"type":"rollback","checkpoint":"01J","paths":[{"text":"a"},{"bytes":"Y2Fm6Qo="}],"dry_run":true}"#,
            br#"{"type":"sandbox_add","path":{"bytes":"L3RtcC9h"},"excludes":["*.o"],"store":{"text":"/s"}}"#,
            br#"{"type":"prune","sandbox":"s","keep_last":3,"keep_within_secs":60}"#,
            br#"{"type":"diff","from":"01J","to":null}"#,
            br#"{"type":"revert","checkpoint":"01J","force":false}"#,
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut decoded = 0;
        for round in 0..100_000 {
            let mut line = seeds[round % seeds.len()].to_vec();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % (line.len() + 1);
                match next() % 5 {
                    0 if at < line.len() => line[at] = next() as u8,
                    1 => line.truncate(at),
                    2 => {
                        let bytes = b"{}[]\":,0-e\x00\xff";
                        line.insert(at, bytes[(next() as usize) % bytes.len()]);
                    }
                    3 => {
                        let other = seeds[(next() as usize) % seeds.len()];
                        let from = (next() as usize) % other.len();
                        line.splice(at..at, other[from..].iter().copied());
                    }
                    _ if at < line.len() => {
                        line.remove(at);
                    }
                    _ => {}
                }
            }
            if let Ok(request) = serde_json::from_slice::<Request>(&line) {
                decoded += 1;
                serde_json::to_vec(&request).expect("a decoded request encodes again");
            }
        }
        assert!(decoded > 0, "no mutation decoded at all: the seeds are not requests");
    }

    #[test]
    fn paths_travel_as_text_or_base64_bytes() {
        let text = WirePath(b"dir/file.txt".to_vec());
        assert_eq!(serde_json::to_string(&text).unwrap(), r#"{"text":"dir/file.txt"}"#);
        let bytes = WirePath(b"caf\xe9\n".to_vec());
        let json = serde_json::to_string(&bytes).unwrap();
        assert_eq!(json, r#"{"bytes":"Y2Fm6Qo="}"#);
        assert_eq!(serde_json::from_str::<WirePath>(&json).unwrap(), bytes);
        assert!(serde_json::from_str::<WirePath>(r#"{"bytes":"!!"}"#).is_err());
    }

    #[test]
    fn requests_are_tagged_by_type() {
        let req = Request::Rollback(RollbackRequest {
            checkpoint: "01J".into(),
            paths: vec![WirePath(b"a".to_vec())],
            dry_run: true,
        });
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(json, r#"{"type":"rollback","checkpoint":"01J","paths":[{"text":"a"}],"dry_run":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let minimal: Request = serde_json::from_str(r#"{"type":"checkpoint","sandbox":"s"}"#).unwrap();
        assert_eq!(minimal, Request::Checkpoint(CheckpointRequest { sandbox: "s".into(), ..Default::default() }));
        assert!(serde_json::from_str::<Request>(r#"{"type":"launch_missiles"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"status","bogus":1}"#).is_err());
    }

    #[test]
    fn parts_fill_lists_the_answer_left_out() {
        let answer = Response::Diff(DiffReport {
            from: "a".into(),
            to: None,
            changes: Vec::new(),
            patch: Vec::new(),
            total: None,
        });
        let piece = |t: &str| Part { field: "patch".into(), items: vec![serde_json::json!({ "text": t })] };
        let whole = Part::assemble(vec![piece("x"), piece("y")], answer).unwrap();
        let Response::Diff(d) = whole else { panic!("{whole:?}") };
        assert_eq!(d.patch, [WireBytes(b"x".to_vec()), WireBytes(b"y".to_vec())]);
        let bad = Part { field: "from".into(), items: vec![] };
        let answer = Response::Diff(d);
        assert!(Part::assemble(vec![bad], answer).unwrap_err().contains("not a list"));
    }

    #[test]
    fn unknown_error_codes_decode_as_unknown() {
        let body: ErrorBody = serde_json::from_str(r#"{"code":"new_thing","message":"m"}"#).unwrap();
        assert_eq!(body.code, ErrorCode::Unknown);
    }

    #[test]
    fn display_escapes_unprintable_paths() {
        assert_eq!(WirePath(b"a/b".to_vec()).display(), "a/b");
        assert_eq!(WirePath(b"a\nb".to_vec()).display(), "\"a\\nb\"");
        assert_eq!(WirePath(b"\xff".to_vec()).display(), "\"\\xff\"");
    }
}
