-- Schema version 9: the catalogue's own id.
--
-- Every store records the id of the catalogue it belongs to (in its
-- `snapback-store` file), and a store that belongs to another catalogue is
-- never opened, written or collected: a catalogue lost and made anew (a
-- truncated `catalogue.db`, say) would otherwise find every object
-- unreferenced and collect them all.
CREATE TABLE catalogue_id (
    id TEXT NOT NULL
);
INSERT INTO catalogue_id (id) VALUES (lower(hex(randomblob(16))));
