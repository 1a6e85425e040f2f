-- Schema version 16: objects cloned before they were read.
--
-- A scan of a whole tree (a first checkpoint, above all) with a store that
-- clones now clones each new file into the store without reading it, under
-- a unique name that says so: 16 bytes of a ULID, then the 16 bytes
-- 'snapback:unhashd' (see `ObjectId::unhashed`). After the answer, the
-- daemon's hasher reads each such object and points the version holding
-- it at the hash of its content, the name every other object has. Each
-- such object is held by one version: a restore that records a version of
-- one clones it under a name of its own.
--
-- `unhashed_checkpoints` lists the checkpoints that added versions holding
-- such objects, for the hasher to go through; listing each version would
-- add a row to write for every file of a first checkpoint.
--
-- A version's object now changes once, from its unhashed name to its
-- hash, and only by the hasher: the trigger moves what the sandbox holds
-- from one object to the other (see migration 15).
CREATE TABLE unhashed_checkpoints (
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, seq)
) WITHOUT ROWID;

CREATE TRIGGER entries_object_named AFTER UPDATE OF object ON entries
WHEN old.object IS NOT new.object BEGIN
    INSERT INTO held_changes (sandbox_id, object, size, delta)
        SELECT old.sandbox_id, old.object, old.size, -1 WHERE old.object IS NOT NULL;
    INSERT INTO held_changes (sandbox_id, object, size, delta)
        SELECT new.sandbox_id, new.object, new.size, 1 WHERE new.object IS NOT NULL;
END;
