-- snapback catalogue, schema version 1.
--
-- A sandbox's history is a sequence of checkpoints numbered 1, 2, ... (seq).
-- Its manifests are stored as path versions: each `entries` row is one
-- version of one path, valid from checkpoint `start_seq` up to, but not
-- including, `end_seq` (NULL: still the current version). The state at
-- checkpoint k is the rows with start_seq <= k < coalesce(end_seq, inf), so a
-- checkpoint writes rows only for the paths that changed.

CREATE TABLE sandboxes (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL UNIQUE,
    root         BLOB    NOT NULL UNIQUE,          -- absolute path, bytes
    store        BLOB    NOT NULL,                 -- object store directory, bytes
    clone_method TEXT    NOT NULL CHECK (clone_method IN ('reflink', 'copy')),
    clone_note   TEXT    NOT NULL,
    excludes     TEXT    NOT NULL DEFAULT '[]',    -- JSON array of globs
    owner_uid    INTEGER NOT NULL,
    state        TEXT    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'removed')),
    head_seq     INTEGER NOT NULL DEFAULT 0,       -- seq of the newest checkpoint
    created_ms   INTEGER NOT NULL
);

CREATE TABLE checkpoints (
    id            TEXT    PRIMARY KEY,             -- ULID
    sandbox_id    INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    parent        TEXT,                            -- previous checkpoint of the sandbox
    plan          TEXT,
    reason        TEXT,
    tool          TEXT,
    phase         TEXT,
    labels        TEXT    NOT NULL DEFAULT '{}',   -- JSON object
    kind          TEXT    NOT NULL CHECK (kind IN ('manual', 'tool', 'safety', 'auto')),
    pinned        INTEGER NOT NULL DEFAULT 0,
    created_ms    INTEGER NOT NULL,
    scan_start_ns INTEGER NOT NULL,                -- wall clock when its scan began
    files         INTEGER NOT NULL,
    dirs          INTEGER NOT NULL,
    symlinks      INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    changed       INTEGER NOT NULL,
    UNIQUE (sandbox_id, seq)
);
CREATE INDEX checkpoints_plan ON checkpoints(plan) WHERE plan IS NOT NULL;

CREATE TABLE entries (
    id         INTEGER PRIMARY KEY,
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    path       BLOB    NOT NULL,                   -- relative to the root, bytes
    start_seq  INTEGER NOT NULL,
    end_seq    INTEGER,
    kind       TEXT    NOT NULL CHECK (kind IN ('file', 'dir', 'symlink', 'special')),
    mode       INTEGER NOT NULL,                   -- permission bits, 0o7777
    uid        INTEGER NOT NULL,
    gid        INTEGER NOT NULL,
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,                   -- files only; 0 otherwise
    target     BLOB,                               -- symlink target
    object     BLOB,                               -- blake3 of a file's content (32 bytes)
    -- What the live path looked like when last compared: used only to decide
    -- whether it must be read again, never restored.
    ctime_ns   INTEGER NOT NULL,
    ino        INTEGER NOT NULL,
    racy       INTEGER NOT NULL DEFAULT 0,          -- changed too close to its scan
    CHECK (end_seq IS NULL OR end_seq > start_seq)
);
CREATE UNIQUE INDEX entries_current ON entries(sandbox_id, path) WHERE end_seq IS NULL;
CREATE INDEX entries_start ON entries(sandbox_id, start_seq);
CREATE INDEX entries_end ON entries(sandbox_id, end_seq) WHERE end_seq IS NOT NULL;
CREATE INDEX entries_object ON entries(object) WHERE object IS NOT NULL;
