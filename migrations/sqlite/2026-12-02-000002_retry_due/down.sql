ALTER TABLE dtb_barriers DROP COLUMN retry_due_at;
