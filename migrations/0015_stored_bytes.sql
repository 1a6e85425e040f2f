-- Schema version 15: what each sandbox holds in its store, counted as it
-- changes.
--
-- `status` showed each sandbox's stored bytes (the sizes of its distinct
-- objects) by reading every version of the sandbox: 4 s at 1,000,000
-- files. Now `sandbox_objects` holds each sandbox's objects with how many
-- of its versions hold each, and `sandboxes.stored_bytes` their sum; and
-- asking whether any sandbox of a store holds an object is a lookup, so
-- pruning finds the objects it left unused without reading the store's
-- versions either.
--
-- A version's object never changes. Triggers append each version added or
-- deleted to `held_changes`, whoever writes it; `catalogue::fold_held`
-- folds them into the counts, off the request's path (after the
-- checkpoint's answer, in the pruner thread) or first thing when the
-- counts are read. An append writes the table's last page, where adding
-- to `sandbox_objects` at once would write a page at a random place of it
-- for every version (see migration 0007 for what that cost).
CREATE TABLE sandbox_objects (
    sandbox_id INTEGER NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    object     BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    versions   INTEGER NOT NULL,                   -- the sandbox's versions holding it
    PRIMARY KEY (sandbox_id, object)
) WITHOUT ROWID;

ALTER TABLE sandboxes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;

INSERT INTO sandbox_objects (sandbox_id, object, size, versions)
    SELECT sandbox_id, object, max(size), count(*) FROM entries WHERE object IS NOT NULL
    GROUP BY sandbox_id, object;
UPDATE sandboxes SET stored_bytes =
    (SELECT coalesce(sum(size), 0) FROM sandbox_objects WHERE sandbox_id = sandboxes.id);

CREATE TABLE held_changes (
    id         INTEGER PRIMARY KEY,
    sandbox_id INTEGER NOT NULL,
    object     BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    delta      INTEGER NOT NULL CHECK (delta IN (1, -1))   -- a version added, or deleted
);

CREATE TRIGGER entries_hold AFTER INSERT ON entries WHEN new.object IS NOT NULL BEGIN
    INSERT INTO held_changes (sandbox_id, object, size, delta) VALUES (new.sandbox_id, new.object, new.size, 1);
END;

CREATE TRIGGER entries_release AFTER DELETE ON entries WHEN old.object IS NOT NULL BEGIN
    INSERT INTO held_changes (sandbox_id, object, size, delta) VALUES (old.sandbox_id, old.object, old.size, -1);
END;
