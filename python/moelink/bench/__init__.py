"""Benchmarks of moelink against the baselines MoE frameworks use without it (``bench.baseline``)."""
