-- Schema version 17: restores applied whose record is still to write.
--
-- A rollback, revert or undo is answered once its plan is applied; the
-- `restore` checkpoint that records the state it left is written just
-- after the answer (or first by whatever next takes the sandbox's lock).
-- Before the answer, its intent records the id the answer gives that
-- checkpoint: a daemon stopped in between must not apply the plan again
-- at its next start (the agent may have written to those paths since),
-- only write the record, under that id.
ALTER TABLE intents ADD COLUMN record TEXT;
