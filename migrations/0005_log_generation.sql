-- Schema version 5: a row for starting the write-ahead log over.
--
-- The first write of a new generation of SQLite's write-ahead log fsyncs
-- the log's header. The daemon's log checkpointer bumps `n` right after it
-- has copied the whole log back, so that fsync happens on its thread and
-- not inside the commit of the next checkpoint a client waits for. (A
-- rewrite of a row with its own values writes nothing, hence a counter.)
CREATE TABLE log_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  INTEGER NOT NULL
);
INSERT INTO log_generation (id, n) VALUES (1, 0);
