# imgbase: the thin pool's autoextend policy (attached with --metadataprofile imgbase-thin).
# dmeventd grows the pool by 20 % of its size whenever data or metadata use passes 70 %,
# as long as the volume group has free space; `imgbase check` warns at 80 %.
activation {
	thin_pool_autoextend_threshold = 70
	thin_pool_autoextend_percent = 20
}
