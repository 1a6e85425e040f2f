-- Schema version 3: intent records, so that a rollback, revert or undo
-- interrupted by a crash is finished when the daemon starts again.
--
-- An intent is written before the operation touches anything: first with
-- the request alone (state 'pending'); then, once its safety checkpoint is
-- committed and its plan computed, with the safety checkpoint and the
-- desired version of every path the plan touches (state 'applying', rows
-- in intent_paths). A finished operation deletes its intent. At start the
-- daemon finishes every 'pending' one from the beginning and brings every
-- 'applying' one's paths to their desired versions, then records the
-- outcome ('resumed' or 'failed', with a note for `status`).
CREATE TABLE intents (
    id         INTEGER PRIMARY KEY,
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    kind       TEXT    NOT NULL CHECK (kind IN ('rollback', 'revert', 'undo')),
    target     TEXT    NOT NULL,                    -- checkpoint rolled back to, or reverted
    filter     BLOB,                                -- rollback --path filter: paths joined by NUL
    force      INTEGER NOT NULL DEFAULT 0,          -- revert --force
    safety     TEXT,                                -- set once the safety checkpoint is committed
    state      TEXT    NOT NULL CHECK (state IN ('pending', 'applying', 'resumed', 'failed')),
    note       TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX intents_sandbox ON intents(sandbox_id, id);

-- The desired version of each path an 'applying' intent touches; a NULL
-- kind means the path must not exist.
CREATE TABLE intent_paths (
    intent_id INTEGER NOT NULL REFERENCES intents(id) ON DELETE CASCADE,
    path      BLOB    NOT NULL,
    kind      TEXT    CHECK (kind IN ('file', 'dir', 'symlink', 'special')),
    mode      INTEGER,
    uid       INTEGER,
    gid       INTEGER,
    size      INTEGER,
    mtime_ns  INTEGER,
    target    BLOB,
    object    BLOB,
    PRIMARY KEY (intent_id, path)
) WITHOUT ROWID;
