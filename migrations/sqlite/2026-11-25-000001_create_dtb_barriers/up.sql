-- Barrier rows of diesel_transaction_barrier. A row is inserted by the producer inside the
-- application's transaction; a worker runs the job only once the row is visible (committed),
-- and deletes it in the transaction that runs the handler.
--
-- SQLite has no transaction ids, so there is no txid column: the worker tells a rolled-back
-- transaction from a running one by taking the database's write lock (see
-- src/backend/sqlite.rs). The database should be in WAL journal mode; run_migrations switches
-- it (PRAGMA journal_mode cannot change inside the transaction a migration runs in).
CREATE TABLE dtb_barriers (
    -- insertion order, never reused: workers find newly committed rows by it
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    -- the barrier's UUID, hyphenated
    id TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    job_id TEXT NOT NULL DEFAULT '',
    job_kind TEXT NOT NULL DEFAULT '',
    job_queue TEXT NOT NULL DEFAULT '',
    -- the job as pushed (JSON, without its barrier descriptor), so it can be pushed again if
    -- the broker loses it
    payload TEXT,
    -- when the job was last pushed (by the producer, or again by a worker's reconciler)
    pushed_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- when a worker last ran the handler and it failed: the job is then in Faktory's retries
    attempted_at TEXT
);

CREATE INDEX dtb_barriers_created_at_idx ON dtb_barriers (created_at);
