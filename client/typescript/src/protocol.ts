// The wire types of the snapback socket protocol (docs/reference/protocol.md):
// newline-delimited JSON, one request answered by one response, each tagged
// by `type`. The Rust definitions in client/src/proto are the source of
// truth; these follow them field for field.

/** The protocol this client speaks. */
export const PROTOCOL = 2;

/** The longest line either side sends, newline included. */
export const MAX_LINE = 1 << 20;

/** A path: `{text}` when it is UTF-8, else `{bytes}` (base64). */
export type WirePath = { text: string } | { bytes: string };

/** The same encoding, for bytes that are usually text (a patch's pieces). */
export type WireBytes = WirePath;

export type CheckpointKind = "manual" | "tool" | "safety" | "auto" | "restore";
export type ChangeKind = "added" | "modified" | "deleted" | "type_changed";
export type Aspect = "content" | "target" | "mode" | "owner" | "mtime";
export type DiffDetail = "paths" | "stat" | "patch";
export type PlanState = "active" | "applied" | "abandoned";

export type ErrorCode =
  | "not_found"
  | "ambiguous"
  | "already_exists"
  | "invalid_request"
  | "permission_denied"
  | "plan_applied"
  | "moved"
  | "busy"
  | "conflict"
  | "protocol_mismatch"
  | "io"
  | "internal"
  | string;

export interface ErrorBody {
  code: ErrorCode;
  message: string;
  paths?: WirePath[];
  hint?: string;
}

export interface SandboxInfo {
  name: string;
  path: WirePath;
  store: WirePath;
  clone_method: "reflink" | "copy";
  clone_note: string;
  excludes: string[];
  state: string;
  moved?: string;
  owner_uid: number;
  checkpoints: number;
  created_unix_ms: number;
}

export interface CheckpointInfo {
  id: string;
  sandbox: string;
  seq: number;
  parent: string | null;
  plan: string | null;
  reason: string | null;
  tool: string | null;
  phase: string | null;
  labels: Record<string, string>;
  kind: CheckpointKind;
  pinned: boolean;
  created_unix_ms: number;
  files: number;
  dirs: number;
  symlinks: number;
  bytes: number;
  changed: number;
  exclusive_bytes?: number;
  scanned?: number;
  full_scan?: boolean;
  broken?: string;
}

export interface FileStat {
  added: number;
  removed: number;
  binary?: boolean;
  old_size: number;
  new_size: number;
  withheld?: string;
  not_diffed?: string;
}

export interface Change {
  path: WirePath;
  change: ChangeKind;
  what?: Aspect[];
  stat?: FileStat;
}

export interface DiffTotal {
  files: number;
  added: number;
  removed: number;
}

export interface DiffReport {
  from: string;
  to: string | null;
  changes: Change[];
  patch?: WireBytes[];
  total?: DiffTotal;
}

export interface LogEntry {
  checkpoint: CheckpointInfo;
  total: DiffTotal | null;
  restore?: string;
  pre?: string;
  changes?: Change[];
  more_changes?: number;
}

export interface LogReport {
  entries: LogEntry[];
  more: number;
}

export interface RollbackReport {
  checkpoint: string;
  sandbox: string;
  safety_checkpoint: string | null;
  restore_checkpoint: string | null;
  dry_run: boolean;
  restored: number;
  created: number;
  deleted: number;
  unchanged: number;
  changed: WirePath[];
  created_paths: WirePath[];
  restored_paths: WirePath[];
  removed: WirePath[];
  skipped: WirePath[];
  conflicts?: WirePath[];
  preview?: Change[];
  preview_total?: DiffTotal;
}

export interface PlanInfo {
  id: string;
  sandbox: string;
  state: PlanState;
  created_unix_ms: number;
  updated_unix_ms: number;
  checkpoints: CheckpointInfo[];
}

export interface PruneReport {
  sandbox: string;
  pruned: string[];
  kept: number;
  freed_bytes: number;
}

export interface PathNote {
  path: WirePath;
  why: string;
}

export interface ExportReport {
  checkpoint: string;
  dir: WirePath;
  files: number;
  dirs: number;
  symlinks: number;
  cloned: number;
  hardlinked: number;
  withheld: PathNote[];
  skipped: PathNote[];
}

export interface VerifyReport {
  objects: number;
  missing: string[];
  corrupt: string[];
  unreferenced: string[];
  broken: string[];
  current_twice: { sandbox: string; path: WirePath }[];
}

export interface SandboxStatus {
  name: string;
  path: WirePath;
  state: string;
  clone_method: "reflink" | "copy";
  checkpoints: number;
  store_bytes: number;
  last_checkpoint: string | null;
  budget_bytes: number | null;
  exclusive_bytes: number | null;
  budget_pruned: number;
  watch: string;
  watched_dirs: number;
  dirty_paths: number;
  watcher?: string;
  recovery?: string;
}

export interface StatusReport {
  daemon: string;
  protocol: number;
  pid: number;
  uptime_ms: number;
  state_dir: WirePath;
  socket: WirePath;
  sandboxes: SandboxStatus[];
  collecting_garbage: boolean;
  hashing_objects?: boolean;
}

export interface ProgressReport {
  phase: string;
  done: number;
  total: number | null;
}

/** Every request, by its `type`. */
export type Request =
  | { type: "hello"; protocol: number; client: string; progress?: boolean }
  | { type: "sandbox_add"; path: WirePath; name?: string | null; excludes?: string[]; store?: WirePath | null }
  | { type: "sandbox_list" }
  | { type: "sandbox_remove"; sandbox: string; purge?: boolean }
  | {
      type: "checkpoint";
      sandbox: string;
      plan?: string | null;
      reason?: string | null;
      tool?: string | null;
      phase?: string | null;
      labels?: Record<string, string>;
      pin?: boolean;
      kind?: CheckpointKind | null;
    }
  | { type: "list"; sandbox?: string | null; plan?: string | null }
  | { type: "show"; checkpoint: string }
  | { type: "diff"; from: string; to?: string | null; step?: boolean; paths?: WirePath[]; detail?: DiffDetail }
  | { type: "log"; sandbox?: string | null; plan?: string | null; limit?: number | null; stat?: boolean }
  | { type: "rollback"; checkpoint: string; paths?: WirePath[]; dry_run?: boolean }
  | { type: "status" }
  | { type: "plan_show" | "plan_apply" | "plan_abandon"; plan: string }
  | { type: "plan_rollback"; plan: string; checkpoint: string; paths?: WirePath[]; dry_run?: boolean }
  | { type: "revert"; checkpoint: string; force?: boolean; dry_run?: boolean }
  | { type: "undo"; sandbox: string; dry_run?: boolean }
  | { type: "prune"; sandbox: string; keep_last?: number | null; keep_within_secs?: number | null }
  | { type: "export"; checkpoint: string; dir: WirePath }
  | { type: "verify" };

/** What each kind of answer carries. */
export interface Answers {
  welcome: { protocol: number; daemon: string };
  sandbox: SandboxInfo;
  sandboxes: { sandboxes: SandboxInfo[] };
  checkpoint: CheckpointInfo;
  checkpoints: { checkpoints: CheckpointInfo[] };
  diff: DiffReport;
  log: LogReport;
  rollback: RollbackReport;
  status: StatusReport;
  plan: PlanInfo;
  pruned: PruneReport;
  exported: ExportReport;
  verified: VerifyReport;
}
