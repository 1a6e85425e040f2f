//! The payload of each answer.

use super::*;

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
    /// For a `modified` path: what about it changed. A change without
    /// `content` (or `target`) is one of metadata only: a `chmod`, a
    /// `touch`, a `chown`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub what: Vec<Aspect>,
    /// With [`DiffDetail::Stat`] or [`DiffDetail::Patch`], for a file or a
    /// symlink on either side: its line counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<FileStat>,
}

impl Change {
    /// A change with nothing said about what changed.
    pub fn new(path: WirePath, change: ChangeKind) -> Change {
        Change { path, change, what: Vec::new(), stat: None }
    }

    /// Whether only metadata changed (mode, owner, mtime): the content, or
    /// a symlink's target, is what it was.
    pub fn metadata_only(&self) -> bool {
        self.change == ChangeKind::Modified
            && !self.what.is_empty()
            && !self.what.iter().any(|a| matches!(a, Aspect::Content | Aspect::Target))
    }
}

/// One thing about a path that can change.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Aspect {
    /// A file's bytes.
    Content,
    /// A symlink's target.
    Target,
    /// Permission bits.
    Mode,
    /// Owner or group.
    Owner,
    /// A file's modification time.
    Mtime,
}

impl Aspect {
    pub fn as_str(self) -> &'static str {
        match self {
            Aspect::Content => "content",
            Aspect::Target => "target",
            Aspect::Mode => "mode",
            Aspect::Owner => "owner",
            Aspect::Mtime => "mtime",
        }
    }
}

/// The lines a file's change added and removed, as `git diff --stat`
/// counts them (a symlink counts as one line, its target).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct FileStat {
    pub added: u64,
    pub removed: u64,
    /// Either side holds a NUL byte in its first 8,000 (git's rule): no
    /// lines are counted, the sizes say what changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub binary: bool,
    /// Bytes before and after (0 for a side that does not exist).
    pub old_size: u64,
    pub new_size: u64,
    /// Why the content was not compared: the caller could not have read it
    /// (the access rule), or a side is larger than the daemon's
    /// `diff_max_bytes`. Nothing of the content is given then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_diffed: Option<String>,
}

/// The sum of a diff's line counts.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffTotal {
    /// Files and symlinks with a stat (directories are not counted).
    pub files: u64,
    pub added: u64,
    pub removed: u64,
}

impl DiffTotal {
    pub fn add(&mut self, stat: &FileStat) {
        self.files += 1;
        self.added += stat.added;
        self.removed += stat.removed;
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DiffReport {
    pub from: String,
    /// `None` when compared with the live tree.
    pub to: Option<String>,
    /// Sorted by path.
    pub changes: Vec<Change>,
    /// With [`DiffDetail::Patch`]: the patch, in pieces to be written one
    /// after the other (each well under a protocol line). Applied with
    /// `git apply` (or `patch -p1`, for text) to `from`'s tree, it makes
    /// `to`'s, but for binary files, files over `diff_max_bytes` and
    /// withheld ones, which it names without content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patch: Vec<WireBytes>,
    /// With [`DiffDetail::Stat`] or [`DiffDetail::Patch`]: the sum of the
    /// changes' line counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<DiffTotal>,
}

/// One entry of the log: a checkpoint and what its step changed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub checkpoint: CheckpointInfo,
    /// The step's line counts: what this checkpoint recorded against its
    /// parent (withheld files count as files, with no lines). `None` for a
    /// step of more than 5,000 paths, which `show --stat` counts.
    pub total: Option<DiffTotal>,
    /// For a `safety` or `restore` checkpoint: the rollback, revert or
    /// undo it belongs to (`rollback to ID`, `revert of ID`, `undo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// For a checkpoint taken after a tool call: the one taken before the
    /// same call (same `tool_use_id` label), which together make one step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<String>,
    /// With `stat`: the step's changes, with line counts (at most 1,000).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// With `stat`: the step's changes past the 1,000 listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub more_changes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LogReport {
    /// Newest first.
    pub entries: Vec<LogEntry>,
    /// Checkpoints left out by the limit.
    pub more: u64,
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
    /// On a dry run: each path it would change, as `diff --stat` from the
    /// live tree to the state it would leave (a path it would create is
    /// `added`, one it would remove `deleted`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preview: Vec<Change>,
    /// On a dry run: the sum of `preview`'s line counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_total: Option<DiffTotal>,
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
    /// What watches the sandbox, `fanotify` or `inotify`, once a watch is
    /// set up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watcher: Option<String>,
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
    /// The daemon is removing unreferenced objects in the background (as it
    /// does after every start): the space they hold is not free yet.
    #[serde(default)]
    pub collecting_garbage: bool,
    /// The daemon is reading objects that a scan of a whole tree cloned
    /// without reading them, to name each by its content (after a first
    /// checkpoint, or a restart that left some): until it is done, equal
    /// content in them is not stored once.
    #[serde(default)]
    pub hashing_objects: bool,
}
