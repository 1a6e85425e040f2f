-- Schema version 11: which checkpoints were pruned, when and by what.
--
-- A request naming a pruned checkpoint is told so ("pruned by retention on
-- ..."), not that no such checkpoint exists, as for a typo. One short row
-- per pruned checkpoint; a purged sandbox takes its rows with it.
CREATE TABLE pruned (
    id         TEXT    PRIMARY KEY,                 -- the checkpoint's ULID
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    pruned_ms  INTEGER NOT NULL,
    why        TEXT    NOT NULL                     -- `retention`, `the storage budget`, `snapback prune`
);
