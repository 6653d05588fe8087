-- The SQLite store rewrote the CHECK constraints of its hot usage tables (IN lists
-- cost it an ephemeral B-tree per row written). PostgreSQL compares an IN list in
-- place, so nothing changes here; the migration keeps both stores' versions alike.
SELECT 1;
