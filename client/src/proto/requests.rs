//! The payload of each request.

use super::*;

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
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    pub checkpoint: String,
    /// For paths also changed later, take the step's parent version anyway.
    #[serde(default)]
    pub force: bool,
    /// Report what would change, touching nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Rolls a sandbox back to the safety checkpoint of its latest rollback,
/// revert or undo.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct UndoRequest {
    pub sandbox: String,
    /// Report what would change, touching nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
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
/// is absent; or, with `step`, shows what one checkpoint recorded.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DiffRequest {
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
    /// Compare `from`'s parent (the empty tree for a first checkpoint)
    /// with `from`: the changes that step recorded. `to` must be absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub step: bool,
    /// Only these sandbox-relative paths and what lies below them. Empty:
    /// everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<WirePath>,
    #[serde(default)]
    pub detail: DiffDetail,
}

/// How much a diff says about each path.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiffDetail {
    /// Each path and how it changed.
    #[default]
    Paths,
    /// Also each file's added and removed lines ([`FileStat`]).
    Stat,
    /// Also the patch, in git's extended unified format
    /// ([`DiffReport::patch`]).
    Patch,
}

/// The timeline of checkpoints, newest first, each with what its step
/// changed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    /// Only this sandbox (a name or registered path).
    #[serde(default)]
    pub sandbox: Option<String>,
    /// Only this plan's checkpoints.
    #[serde(default)]
    pub plan: Option<String>,
    /// At most this many entries [default: 20]; 0 for all of them.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Also each entry's files, with their line counts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stat: bool,
}

/// How many entries a log holds when the request does not say.
pub const LOG_LIMIT: u64 = 20;

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
