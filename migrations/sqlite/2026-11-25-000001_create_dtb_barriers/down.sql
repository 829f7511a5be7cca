DROP INDEX IF EXISTS dtb_barriers_created_at_idx;
DROP TABLE IF EXISTS dtb_barriers;
