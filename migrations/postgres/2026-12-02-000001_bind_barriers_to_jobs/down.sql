DROP FUNCTION dtb_claim_barrier(uuid, text);
ALTER TABLE dtb_barriers DROP COLUMN job_digest;
