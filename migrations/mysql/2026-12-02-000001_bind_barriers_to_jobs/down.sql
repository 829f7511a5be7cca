ALTER TABLE dtb_barriers DROP COLUMN job_digest;
