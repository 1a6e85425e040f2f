-- Schema version 14: directory versions, by path.
--
-- Content goes to a non-root caller only if every directory above the file
-- was searchable for it at capture time (the access rule). A diff or a log
-- entry of a few changed files looks up the versions of their directories
-- at one checkpoint; without an index that is a read of every version of
-- the sandbox. Only directory versions are in this index, and a directory
-- gets a new version only when its mode or owner changes, so checkpoints of
-- edited files write nothing to it.
CREATE INDEX entries_dirs ON entries(sandbox_id, path) WHERE kind = 'dir';
