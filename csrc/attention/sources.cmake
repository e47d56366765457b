# Fused DiT attention kernels (QK-RMSNorm + RoPE prologue, flash attention forward).
