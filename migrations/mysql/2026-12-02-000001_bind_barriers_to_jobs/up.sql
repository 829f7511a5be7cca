-- Binds each barrier to its job: the digest of the job's kind, queue, arguments and custom data
-- (see src/binding.rs), written by the producer. A worker consumes a barrier only for a
-- delivery with the same digest (the job, a retry of it, or one of the crate's own copies), so a
-- job pushed with another job's descriptor cannot take that job's barrier. NULL (rows written
-- before this migration) binds to nothing.
ALTER TABLE dtb_barriers ADD COLUMN job_digest CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL;
