-- Barrier rows of diesel_transaction_barrier. A row is inserted by the producer inside the
-- application's transaction; a worker runs the job only once the row is visible (committed),
-- and deletes it in the transaction that runs the handler.
--
-- The worker waits for the producer's transaction with a locking read of the row
-- (SELECT ... FOR UPDATE, bounded by innodb_lock_wait_timeout), then proves that the commit
-- is durable by committing a write of its own to the same row (attempts = attempts + 1).
CREATE TABLE dtb_barriers (
    id CHAR(36) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- the producer's connection id (CONNECTION_ID()), for diagnostics only
    txid BIGINT NULL,
    job_id TEXT NOT NULL,
    job_kind TEXT NOT NULL,
    job_queue TEXT NOT NULL,
    -- the job as pushed (JSON, without its barrier descriptor), so it can be pushed again if
    -- the broker loses it
    payload LONGTEXT NULL,
    -- when the job was last pushed (by the producer, or again by a worker's reconciler)
    pushed_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    -- when a worker last ran the handler and it failed: the job is then in Faktory's retries
    attempted_at TIMESTAMP(6) NULL DEFAULT NULL,
    -- how often a worker found the transaction committed (each time it writes this column
    -- before it reports so: that write is the worker's durability fence)
    attempts INT NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    KEY dtb_barriers_created_at_idx (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
