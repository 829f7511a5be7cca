-- Barrier rows of diesel_transaction_barrier. A row is inserted by the producer inside the
-- application's transaction; a worker runs the job only once the row is visible (committed),
-- and deletes it in the transaction that runs the handler.
CREATE TABLE dtb_barriers (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- the producer's top-level transaction id (pg_current_xact_id), for diagnostics
    txid bigint,
    job_id text NOT NULL DEFAULT '',
    job_kind text NOT NULL DEFAULT '',
    job_queue text NOT NULL DEFAULT '',
    -- the job as pushed (JSON, without its barrier descriptor), so it can be pushed again if
    -- the broker loses it
    payload text,
    -- when the job was last pushed (by the producer, or again by a worker's reconciler)
    pushed_at timestamptz NOT NULL DEFAULT now(),
    -- when a worker last ran the handler and it failed: the job is then in Faktory's retries
    attempted_at timestamptz
);

CREATE INDEX dtb_barriers_created_at_idx ON dtb_barriers (created_at);

-- Waits at most p_timeout_ms for the transaction that wrote barrier p_id to end, and says how
-- it ended: 'committed' (the row exists), 'not_committed' (no such row once every writer of it
-- has ended), or 'pending' (still running when the time was up).
--
-- The wait is the lock wait of an insert that conflicts with the producer's uncommitted row,
-- which ends exactly when the producer's transaction (or savepoint) ends. The probe row is
-- never kept: the inner block is always undone. Errors are classified here, by SQLSTATE, so
-- callers need not parse messages.
CREATE FUNCTION dtb_await_barrier(p_id uuid, p_timeout_ms integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('lock_timeout', p_timeout_ms::text || 'ms', true);
    BEGIN
        INSERT INTO dtb_barriers (id) VALUES (p_id) ON CONFLICT (id) DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            PERFORM set_config('lock_timeout', '0', true);
            RETURN 'committed';
        END IF;
        RAISE EXCEPTION USING ERRCODE = 'DTB01', MESSAGE = 'undo the barrier probe';
    EXCEPTION
        WHEN lock_not_available THEN
            PERFORM set_config('lock_timeout', '0', true);
            RETURN 'pending';
        WHEN SQLSTATE 'DTB01' THEN
            PERFORM set_config('lock_timeout', '0', true);
            RETURN 'not_committed';
    END;
END
$$;
