DROP TABLE IF EXISTS dtb_barriers;
