-- Schema version 4: checkpoints that `verify` found broken.
--
-- After a power loss, objects a checkpoint referenced may not have reached
-- the disk. `verify` sets `broken` (why, as text) on every checkpoint whose
-- state needs a missing or corrupt object; a broken checkpoint is never
-- restored from, so garbage is never written into a sandbox.
ALTER TABLE checkpoints ADD COLUMN broken TEXT;
