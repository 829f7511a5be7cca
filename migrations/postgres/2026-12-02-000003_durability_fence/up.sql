-- The worker's durability fence: a write of its own, committed with a local WAL flush, whose
-- commit record follows every commit record written before it began, and so makes them all
-- durable (the WAL is flushed in order). The worker calls it when it saw a producer's commit
-- before the WAL was flushed past it (a transaction that turned synchronous_commit off) and no
-- flush came soon enough. It returns the WAL insert position after its write; the row it writes
-- is deleted in the same transaction, so nobody ever sees it.
CREATE FUNCTION dtb_fence() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    fence_id uuid := gen_random_uuid();
BEGIN
    PERFORM set_config('synchronous_commit', 'local', true);
    INSERT INTO dtb_barriers (id, job_kind) VALUES (fence_id, 'dtb_fence');
    DELETE FROM dtb_barriers WHERE id = fence_id;
    RETURN pg_current_wal_insert_lsn()::text;
END
$$;
