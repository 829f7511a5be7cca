-- The worker's durability fence. InnoDB releases a committing transaction's row locks, and
-- makes it visible, before its commit is flushed to the redo log; the redo log is flushed in
-- order, so a write of the worker's own, begun after it saw a commit and committed with
-- innodb_flush_log_at_trx_commit = 1, proves that commit durable. The worker's write goes to a
-- row of this table (one of a few slots, each worker picks one), never to a barrier row that a
-- handler might be claiming at that very moment.
CREATE TABLE dtb_fences (
    slot SMALLINT NOT NULL,
    -- how many fences this slot has committed, and when the last one did
    fences BIGINT NOT NULL DEFAULT 0,
    fenced_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (slot)
) ENGINE = InnoDB;
