-- Schema version 8: what a sandbox root and a store are, not only where.
--
-- A root's device and inode are recorded when it is registered, and every
-- operation checks the directory it opened against them: a root that was
-- renamed, replaced, or reached through a parent swapped for a symlink is
-- refused, and `moved` says why until its owner registers it again. Rows
-- from earlier daemons have no identity yet; the first open after the
-- upgrade records the one it finds.
ALTER TABLE sandboxes ADD COLUMN root_dev INTEGER;
ALTER TABLE sandboxes ADD COLUMN root_ino INTEGER;
ALTER TABLE sandboxes ADD COLUMN moved TEXT;

-- Each store directory the daemon has opened, with its identity: a store
-- whose path leads to another directory is never opened, written or
-- collected.
CREATE TABLE stores (
    path BLOB    PRIMARY KEY,
    dev  INTEGER NOT NULL,
    ino  INTEGER NOT NULL
);
