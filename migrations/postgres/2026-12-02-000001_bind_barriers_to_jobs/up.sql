-- Binds each barrier to its job: the digest of the job's kind, queue, arguments and custom data
-- (see src/binding.rs), written by the producer. A worker consumes a barrier only for a
-- delivery with the same digest (the job, a retry of it, or one of the crate's own copies), so a
-- job pushed with another job's descriptor cannot take that job's barrier. NULL (rows written
-- before this migration) binds to nothing.
ALTER TABLE dtb_barriers ADD COLUMN job_digest text;

-- Claims barrier p_id for the calling transaction, for a delivery whose job digest is p_digest:
-- deletes it without waiting for another transaction that holds it, so that committing consumes
-- the barrier and rolling back restores it. Raises DTB02 when there is nothing to claim now (the
-- row is held by another worker, is gone, is not committed yet, or belongs to another job): a
-- worker can then begin its transaction and claim in one round trip, and learn which case it met
-- on the rare path.
CREATE FUNCTION dtb_claim_barrier(p_id uuid, p_digest text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM dtb_barriers
    WHERE id = (SELECT id FROM dtb_barriers WHERE id = p_id FOR UPDATE SKIP LOCKED)
      AND (job_digest IS NULL OR job_digest = p_digest);
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'DTB02', MESSAGE = 'barrier not claimable now';
    END IF;
END
$$;
