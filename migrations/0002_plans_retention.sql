-- Schema version 2: plans with a lifecycle, a record of rollbacks (for
-- undo and for retention), and a count of budget prunes.

-- A plan groups the checkpoints of one agent run. Its id is chosen by the
-- client; it is created on the first checkpoint that names it and belongs
-- to that checkpoint's sandbox. Once applied it can no longer be rolled
-- back; the guard reads this table, never memory.
CREATE TABLE plans (
    id         TEXT    PRIMARY KEY,
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    state      TEXT    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'applied', 'abandoned')),
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Plans named by checkpoints taken before this migration.
INSERT INTO plans (id, sandbox_id, state, created_ms, updated_ms)
    SELECT plan, sandbox_id, 'active', min(created_ms), max(created_ms)
    FROM checkpoints WHERE plan IS NOT NULL GROUP BY plan;

-- Every rollback, revert and undo, newest last. `undo` rolls back to the
-- safety checkpoint of the newest one; retention never prunes that one.
CREATE TABLE rollbacks (
    id         INTEGER PRIMARY KEY,
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL CHECK (kind IN ('rollback', 'revert', 'undo')),
    target     TEXT    NOT NULL,                   -- checkpoint rolled back to or reverted
    safety     TEXT    NOT NULL,                   -- checkpoint of the state before it
    created_ms INTEGER NOT NULL
);
CREATE INDEX rollbacks_sandbox ON rollbacks(sandbox_id, id);

-- How many checkpoints a sandbox's storage budget has pruned, for status.
ALTER TABLE sandboxes ADD COLUMN budget_pruned INTEGER NOT NULL DEFAULT 0;
