-- When a job whose handler failed is due back from Faktory's retries at the latest (its retry
-- schedule, as the worker that failed it computed it); NULL when no retry will come (the job
-- went to the dead set, or its retries were off). The reconciler pushes the job again once it
-- is overdue by the grace period, so that a committed job in Faktory's retry set is not lost
-- with the broker's data.
ALTER TABLE dtb_barriers ADD COLUMN retry_due_at TIMESTAMP(6) NULL DEFAULT NULL;
