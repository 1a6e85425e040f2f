-- Schema version 13: versions with more than one link, by inode number.
--
-- A restore brings names of one file back as one file: it looks up the
-- other names a multi-link version had in the target state, and in the
-- live one. Only multi-link versions are in this index, so a tree without
-- hardlinks writes nothing to it.
CREATE INDEX entries_links ON entries(sandbox_id, ino) WHERE nlink > 1;
