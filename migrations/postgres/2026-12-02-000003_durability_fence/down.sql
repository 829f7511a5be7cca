DROP FUNCTION dtb_fence();
