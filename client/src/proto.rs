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

/// The protocol number exchanged in `hello` / `welcome`. Bumped on any
/// incompatible change.
pub const PROTOCOL: u32 = 2;

/// The oldest protocol the daemon still serves. Protocol 1 has no
/// [`Part`] lines: an answer longer than [`MAX_LINE`] is an error there.
pub const OLDEST_PROTOCOL: u32 = 1;

/// The longest line either side accepts, newline included. A longer line is
/// an error, never an allocation.
pub const MAX_LINE: usize = 1 << 20;

/// A path as bytes. Linux file names need not be UTF-8, so a path travels as
/// `{"text": "..."}` when it is valid UTF-8 and as `{"bytes": "<base64>"}`
/// otherwise.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct WirePath(pub Vec<u8>);

impl WirePath {
    /// Returns the path's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Returns the path as a `Path` (no conversion: Unix paths are bytes).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// Returns a printable form: the text itself when it is UTF-8 without
    /// control characters, else a quoted form with escapes.
    pub fn display(&self) -> String {
        match std::str::from_utf8(&self.0) {
            Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
            _ => format!("\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl From<&Path> for WirePath {
    fn from(p: &Path) -> Self {
        WirePath(p.as_os_str().as_bytes().to_vec())
    }
}

impl From<&[u8]> for WirePath {
    fn from(p: &[u8]) -> Self {
        WirePath(p.to_vec())
    }
}

impl From<Vec<u8>> for WirePath {
    fn from(p: Vec<u8>) -> Self {
        WirePath(p)
    }
}

impl fmt::Debug for WirePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.escape_ascii().to_string())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum WirePathRepr {
    Text(String),
    Bytes(String),
}

impl Serialize for WirePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => WirePathRepr::Text(text.to_owned()),
            Err(_) => WirePathRepr::Bytes(BASE64.encode(&self.0)),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for WirePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match WirePathRepr::deserialize(d)? {
            WirePathRepr::Text(t) => Ok(WirePath(t.into_bytes())),
            WirePathRepr::Bytes(b) => BASE64
                .decode(b)
                .map(WirePath)
                .map_err(|e| serde::de::Error::custom(format!("invalid base64 path: {e}"))),
        }
    }
}

/// Checks a request field that names a place on the filesystem: absolute,
/// and without a NUL byte (which no system call could be handed).
fn check_absolute(field: &str, p: &WirePath) -> Result<(), String> {
    if p.0.contains(&0) {
        return Err(format!("{field}: {} contains a NUL byte", p.display()));
    }
    if p.0.first() != Some(&b'/') {
        return Err(format!("{field}: {} is not an absolute path", p.display()));
    }
    Ok(())
}

/// Checks a request field that names a path inside a sandbox: absolute (below
/// its root) or relative to its root, without a NUL byte or a `..`.
fn check_sandbox_path(field: &str, p: &WirePath) -> Result<(), String> {
    if p.0.contains(&0) {
        return Err(format!("{field}: {} contains a NUL byte", p.display()));
    }
    if p.0.is_empty() || p.0.split(|&b| b == b'/').any(|c| c == b"..") {
        return Err(format!("{field}: {} is not a path inside a sandbox", p.display()));
    }
    Ok(())
}

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

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InjectRescan {
    pub sandbox: String,
}

/// Checks every store against the catalogue.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {}

/// Names a plan by its client-chosen id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanRef {
    pub plan: String,
}

/// Rolls a plan back to one of its own checkpoints; refused once the plan
/// is applied.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanRollbackRequest {
    pub plan: String,
    pub checkpoint: String,
    #[serde(default)]
    pub paths: Vec<WirePath>,
    #[serde(default)]
    pub dry_run: bool,
}

/// Undoes only the changes a checkpoint recorded since the checkpoint
/// before it, keeping every later change.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    pub checkpoint: String,
    /// For paths also changed later, take the step's parent version anyway.
    #[serde(default)]
    pub force: bool,
}

/// Rolls a sandbox back to the safety checkpoint of its latest rollback,
/// revert or undo.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UndoRequest {
    pub sandbox: String,
}

/// Prunes a sandbox's checkpoints now under its retention policy, with
/// optional overrides.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    pub sandbox: String,
    /// Keep this many newest checkpoints instead of the policy's number.
    #[serde(default)]
    pub keep_last: Option<u64>,
    /// Also keep every checkpoint younger than this many seconds.
    #[serde(default)]
    pub keep_within_secs: Option<u64>,
}

/// Materializes a checkpoint as a read-only tree in a new directory.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    pub checkpoint: String,
    /// An absolute path that does not exist yet.
    pub dir: WirePath,
}

/// Opens a session: must be the first line on a connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    /// Free text naming the client, for the daemon's log.
    pub client: String,
    /// Ask for [`Response::Progress`] lines before the answer of a long
    /// operation. Off when absent, so a client that does not draw progress
    /// reads exactly one line per request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub progress: bool,
}

/// How far a long operation has come: sent (only to a client that asked in
/// its hello) about every 100 ms while a request runs, before its answer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProgressReport {
    /// What the daemon is doing: `scanning` (comparing the tree with the
    /// catalogue), `storing` (writing a checkpoint) or `restoring`.
    pub phase: String,
    /// Entries done in this phase.
    pub done: u64,
    /// Entries the phase will handle, when known.
    pub total: Option<u64>,
}

/// Registers a directory as a sandbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxAdd {
    /// An absolute path to an existing directory.
    pub path: WirePath,
    /// Defaults to the directory's last component.
    #[serde(default)]
    pub name: Option<String>,
    /// Glob patterns, matched against paths relative to the sandbox root.
    #[serde(default)]
    pub excludes: Vec<String>,
    /// Where this sandbox's objects live; defaults to the daemon's store.
    /// Put it on the sandbox's filesystem to get reflinks.
    #[serde(default)]
    pub store: Option<WirePath>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SandboxList {}

/// Unregisters a sandbox. The sandbox directory itself is never touched.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SandboxRemove {
    pub sandbox: String,
    /// Also delete the sandbox's checkpoints and collect their objects.
    #[serde(default)]
    pub purge: bool,
}

/// What caused a checkpoint.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Asked for by a person or a harness.
    #[default]
    Manual,
    /// Taken around an agent's tool call.
    Tool,
    /// Taken by the daemon before a rollback, so the rollback can be undone.
    Safety,
    /// Taken by the daemon on its own.
    Auto,
    /// Recorded by the daemon when a rollback, revert or undo is done: the
    /// state it restored, so that the next checkpoint holds the next step
    /// only.
    Restore,
}

impl CheckpointKind {
    /// Returns the name used on the wire and in the catalogue.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Manual => "manual",
            CheckpointKind::Tool => "tool",
            CheckpointKind::Safety => "safety",
            CheckpointKind::Auto => "auto",
            CheckpointKind::Restore => "restore",
        }
    }

    /// Parses the name used on the wire and in the catalogue.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "manual" => CheckpointKind::Manual,
            "tool" => CheckpointKind::Tool,
            "safety" => CheckpointKind::Safety,
            "auto" => CheckpointKind::Auto,
            "restore" => CheckpointKind::Restore,
            _ => return None,
        })
    }
}

/// Takes a checkpoint of a sandbox.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    /// A sandbox name or registered path.
    pub sandbox: String,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// The agent tool this checkpoint was taken for.
    #[serde(default)]
    pub tool: Option<String>,
    /// Free text, for example `pre` or `post`.
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pin: bool,
    /// Defaults to `tool` when `tool` is given, else `manual`.
    #[serde(default)]
    pub kind: Option<CheckpointKind>,
}

/// Lists checkpoints, newest last.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    #[serde(default)]
    pub sandbox: Option<String>,
    #[serde(default)]
    pub plan: Option<String>,
}

/// Shows one checkpoint. `checkpoint` is a ULID or a unique prefix of one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShowRequest {
    pub checkpoint: String,
}

/// Compares a checkpoint with a later one, or with the live tree when `to`
/// is absent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiffRequest {
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// Brings a sandbox back to a checkpoint.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub checkpoint: String,
    /// Restrict the rollback to these sandbox-relative paths (and everything
    /// below the directories among them). Empty means the whole sandbox.
    #[serde(default)]
    pub paths: Vec<WirePath>,
    /// Report what would change, touching nothing.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

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
            let list = value
                .get_mut(&part.field)
                .and_then(serde_json::Value::as_array_mut)
                .ok_or_else(|| format!("a part names {:?}, which the answer has no list of", part.field))?;
            list.extend(part.items);
        }
        serde_json::from_value(value).map_err(|e| format!("the parts do not fit the answer: {e}"))
    }
}

/// What `verify` found. It reports; it never repairs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Distinct objects the catalogue references, all checked.
    pub objects: u64,
    /// Referenced objects that are not in their store.
    pub missing: Vec<String>,
    /// Referenced objects whose size or content hash is wrong.
    pub corrupt: Vec<String>,
    /// Objects in a store that nothing references.
    pub unreferenced: Vec<String>,
    /// Checkpoints this run marked broken, because their state needs a
    /// missing or corrupt object.
    #[serde(default)]
    pub broken: Vec<String>,
    /// Paths the catalogue holds two or more current versions of, which
    /// no checkpoint should ever write.
    #[serde(default)]
    pub current_twice: Vec<SandboxPath>,
}

/// A path of a sandbox, relative to its root.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SandboxPath {
    pub sandbox: String,
    pub path: WirePath,
}

impl VerifyReport {
    /// Whether the stores and the catalogue agree, and the catalogue holds
    /// no path twice.
    pub fn clean(&self) -> bool {
        self.missing.is_empty()
            && self.corrupt.is_empty()
            && self.unreferenced.is_empty()
            && self.current_twice.is_empty()
    }
}

/// The lifecycle state of a plan.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PlanState {
    /// Checkpoints may be added and the plan rolled back.
    Active,
    /// Its result was applied to the real project: it can no longer be
    /// rolled back.
    Applied,
    /// Given up: no more checkpoints may join it.
    Abandoned,
}

impl PlanState {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanState::Active => "active",
            PlanState::Applied => "applied",
            PlanState::Abandoned => "abandoned",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(PlanState::Active),
            "applied" => Some(PlanState::Applied),
            "abandoned" => Some(PlanState::Abandoned),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PlanInfo {
    pub id: String,
    pub sandbox: String,
    pub state: PlanState,
    pub created_unix_ms: i64,
    pub updated_unix_ms: i64,
    /// The plan's checkpoints, oldest first.
    pub checkpoints: Vec<CheckpointInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PruneReport {
    pub sandbox: String,
    /// Ids of the checkpoints deleted.
    pub pruned: Vec<String>,
    /// Checkpoints left.
    pub kept: u64,
    /// Bytes of the store objects deleted.
    pub freed_bytes: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ExportReport {
    pub checkpoint: String,
    pub dir: WirePath,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files whose content was cloned (reflinked), not copied.
    #[serde(default)]
    pub cloned: u64,
    /// Always 0: exports no longer hardlink store objects. Kept so that
    /// clients of the first protocol revision still read the answer.
    #[serde(default)]
    pub hardlinked: u64,
    /// Files left out because the caller could not have read them at
    /// capture time, each with why.
    #[serde(default)]
    pub withheld: Vec<PathNote>,
    /// Entries left out because an export holds only directories, files
    /// and symlinks (FIFOs, sockets, devices), each with what it was.
    #[serde(default)]
    pub skipped: Vec<PathNote>,
}

/// A path and a sentence about it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PathNote {
    pub path: WirePath,
    pub why: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Welcome {
    pub protocol: u32,
    /// The daemon's name and version.
    pub daemon: String,
}

/// How a sandbox's files are copied into its store.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CloneMethod {
    /// Copy-on-write clones (`FICLONE`): no data is copied.
    Reflink,
    /// Sparse-aware copies: the store is on another filesystem, or the
    /// filesystem cannot clone.
    Copy,
}

impl CloneMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "reflink" => Some(CloneMethod::Reflink),
            "copy" => Some(CloneMethod::Copy),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SandboxInfo {
    pub name: String,
    pub path: WirePath,
    pub store: WirePath,
    pub clone_method: CloneMethod,
    /// Why the clone method is what it is, in a sentence.
    pub clone_note: String,
    pub excludes: Vec<String>,
    /// `active`; `removed` for a sandbox unregistered without `--purge`;
    /// `moved` for one whose root is no longer the registered directory
    /// (see `moved`), until its owner registers it again.
    pub state: String,
    /// Why the sandbox is `moved`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved: Option<String>,
    pub owner_uid: u32,
    pub checkpoints: u64,
    pub created_unix_ms: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Sandboxes {
    pub sandboxes: Vec<SandboxInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub id: String,
    pub sandbox: String,
    /// Position in the sandbox's history, from 1.
    pub seq: u64,
    /// The previous checkpoint of the same sandbox.
    pub parent: Option<String>,
    pub plan: Option<String>,
    pub reason: Option<String>,
    pub tool: Option<String>,
    pub phase: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub kind: CheckpointKind,
    pub pinned: bool,
    pub created_unix_ms: i64,
    /// Regular files in the checkpoint.
    pub files: u64,
    /// Directories in the checkpoint.
    pub dirs: u64,
    /// Symlinks in the checkpoint.
    pub symlinks: u64,
    /// Apparent bytes of the checkpoint's regular files.
    pub bytes: u64,
    /// Paths this checkpoint recorded as new, changed or deleted since its
    /// parent.
    pub changed: u64,
    /// Bytes of the store objects that only this checkpoint references:
    /// what pruning it would free. Given by `show`, absent from `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
    /// In the answer to `checkpoint`: how many paths its scan compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanned: Option<u64>,
    /// In the answer to `checkpoint`: whether it compared the whole tree
    /// (first checkpoint, after a restart or an event overflow, or without
    /// a watch) rather than only the paths the watcher marked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_scan: Option<bool>,
    /// Why the checkpoint cannot be restored: `verify` found an object of
    /// its state missing or corrupt (after a power loss, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Checkpoints {
    pub checkpoints: Vec<CheckpointInfo>,
}

/// How one path differs between two states.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
    TypeChanged,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Modified => "modified",
            ChangeKind::Deleted => "deleted",
            ChangeKind::TypeChanged => "type_changed",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Change {
    pub path: WirePath,
    pub change: ChangeKind,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiffReport {
    pub from: String,
    /// `None` when compared with the live tree.
    pub to: Option<String>,
    /// Sorted by path.
    pub changes: Vec<Change>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct RollbackReport {
    pub checkpoint: String,
    pub sandbox: String,
    /// The checkpoint of the pre-rollback state; rolling back to it undoes
    /// this rollback. `None` on a dry run.
    pub safety_checkpoint: Option<String>,
    /// The checkpoint of the state the restore left (kind `restore`), which
    /// the next checkpoint follows. `None` on a dry run, or when nothing
    /// changed.
    #[serde(default)]
    pub restore_checkpoint: Option<String>,
    pub dry_run: bool,
    /// Paths that existed and were replaced or had their metadata reset.
    pub restored: u64,
    /// Paths that were missing and were created.
    pub created: u64,
    /// Paths that were removed.
    pub deleted: u64,
    /// Paths of the checkpoint that already matched.
    pub unchanged: u64,
    /// Every path touched (or, on a dry run, that would be), sorted.
    pub changed: Vec<WirePath>,
    /// The created paths among `changed`.
    #[serde(default)]
    pub created_paths: Vec<WirePath>,
    /// The restored (replaced, or metadata reset) paths among `changed`.
    #[serde(default)]
    pub restored_paths: Vec<WirePath>,
    /// The removed paths among `changed`.
    pub removed: Vec<WirePath>,
    /// Paths that could not be brought back (sockets, devices) or could not
    /// be removed because they hold excluded files.
    pub skipped: Vec<WirePath>,
    /// For a forced revert: the paths also changed after the reverted step,
    /// which were set to the step's parent version anyway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<WirePath>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SandboxStatus {
    pub name: String,
    pub path: WirePath,
    pub state: String,
    pub clone_method: CloneMethod,
    pub checkpoints: u64,
    /// Bytes of the objects that this sandbox's checkpoints reference.
    pub store_bytes: u64,
    pub last_checkpoint: Option<String>,
    /// The storage budget in force, if any.
    pub budget_bytes: Option<u64>,
    /// Bytes of the objects only this sandbox references, computed when a
    /// budget is set (the budget is checked against it).
    pub exclusive_bytes: Option<u64>,
    /// Checkpoints pruned so far to keep within the budget.
    pub budget_pruned: u64,
    /// `watching`, `starting`, `needs full scan: WHY`, `degraded: WHY`, or
    /// `not watching`.
    pub watch: String,
    /// Directories under watch (those of the last checkpoint, and the root).
    pub watched_dirs: u64,
    /// Paths marked dirty since the last checkpoint.
    pub dirty_paths: u64,
    /// How the last rollback, revert or undo that did not end normally
    /// ended: finished at start after a daemon stop, or failed half way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub daemon: String,
    pub protocol: u32,
    pub pid: u32,
    pub uptime_ms: u64,
    pub state_dir: WirePath,
    pub socket: WirePath,
    pub sandboxes: Vec<SandboxStatus>,
}

/// A stable error code; scripts match on these, never on messages.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    /// A checkpoint prefix matched more than one checkpoint.
    Ambiguous,
    AlreadyExists,
    PlanApplied,
    /// A revert would overwrite later changes; the paths are listed.
    Conflict,
    PermissionDenied,
    InvalidRequest,
    ProtocolMismatch,
    /// A sandbox root or store is no longer the directory that was
    /// registered; its owner registers it again to go on.
    Moved,
    Busy,
    Io,
    Internal,
    /// A code this client does not know (from a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::Ambiguous => "ambiguous",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::PlanApplied => "plan_applied",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::ProtocolMismatch => "protocol_mismatch",
            ErrorCode::Moved => "moved",
            ErrorCode::Busy => "busy",
            ErrorCode::Io => "io",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// The paths the error is about, when there are several (a revert's
    /// conflicts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<WirePath>,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
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
