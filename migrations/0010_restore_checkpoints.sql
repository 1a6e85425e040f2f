-- Schema version 10: checkpoints of kind `restore`.
--
-- A rollback, revert or undo ends with a checkpoint equal to what it
-- restored, so that the sandbox's next checkpoint holds the agent's next
-- step only (before, its parent was the safety checkpoint taken before the
-- rollback, and it counted the rollback's own changes as the step's). The
-- kind's CHECK constraint can only change with the table: it is rebuilt,
-- rows and indexes as they were. No table references `checkpoints`.
CREATE TABLE checkpoints_new (
    id            TEXT    PRIMARY KEY,             -- ULID
    sandbox_id    INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    parent        TEXT,                            -- previous checkpoint of the sandbox
    plan          TEXT,
    reason        TEXT,
    tool          TEXT,
    phase         TEXT,
    labels        TEXT    NOT NULL DEFAULT '{}',   -- JSON object
    kind          TEXT    NOT NULL CHECK (kind IN ('manual', 'tool', 'safety', 'auto', 'restore')),
    pinned        INTEGER NOT NULL DEFAULT 0,
    created_ms    INTEGER NOT NULL,
    scan_start_ns INTEGER NOT NULL,                -- wall clock when its scan began
    files         INTEGER NOT NULL,
    dirs          INTEGER NOT NULL,
    symlinks      INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    changed       INTEGER NOT NULL,
    broken        TEXT,
    UNIQUE (sandbox_id, seq)
);
INSERT INTO checkpoints_new (id, sandbox_id, seq, parent, plan, reason, tool, phase, labels, kind, pinned,
                             created_ms, scan_start_ns, files, dirs, symlinks, bytes, changed, broken)
    SELECT id, sandbox_id, seq, parent, plan, reason, tool, phase, labels, kind, pinned,
           created_ms, scan_start_ns, files, dirs, symlinks, bytes, changed, broken
    FROM checkpoints;
DROP TABLE checkpoints;
ALTER TABLE checkpoints_new RENAME TO checkpoints;
CREATE INDEX checkpoints_plan ON checkpoints(plan) WHERE plan IS NOT NULL;
