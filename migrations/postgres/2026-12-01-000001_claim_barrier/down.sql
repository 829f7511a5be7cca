DROP FUNCTION dtb_claim_barrier(uuid);
