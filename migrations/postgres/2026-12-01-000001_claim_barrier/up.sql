-- Claims barrier p_id for the calling transaction: deletes it without waiting for another
-- transaction that holds it, so that committing consumes the barrier and rolling back restores
-- it. Raises DTB02 when there is nothing to claim now (the row is held by another worker, is
-- gone, or is not committed yet): a worker can then begin its transaction and claim in one
-- round trip, and learn which case it met on the rare path.
CREATE FUNCTION dtb_claim_barrier(p_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dtb_barriers
    WHERE id = (SELECT id FROM dtb_barriers WHERE id = p_id FOR UPDATE SKIP LOCKED);
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'DTB02', MESSAGE = 'barrier not claimable now';
    END IF;
END
$$;
