-- Schema version 12: each version's link count, as its scan found it.
--
-- A file with several names changes under all of them at once, but an
-- event comes only for the name written through (or none, when that name
-- is outside the sandbox or excluded). The paths whose inode had more than
-- one name are re-checked at every checkpoint; this is how the daemon
-- knows them. Rows from earlier daemons count 1 until their path is next
-- compared.
ALTER TABLE entries ADD COLUMN nlink INTEGER NOT NULL DEFAULT 1;
