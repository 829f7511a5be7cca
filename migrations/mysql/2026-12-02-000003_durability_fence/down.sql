DROP TABLE dtb_fences;
