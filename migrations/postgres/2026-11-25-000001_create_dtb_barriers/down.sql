DROP FUNCTION IF EXISTS dtb_await_barrier(uuid, integer);
DROP TABLE IF EXISTS dtb_barriers;
