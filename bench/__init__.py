"""Benchmarks of compressm_kernels: ``python -m bench <scan|decode|block|hankel|all> [--device cuda] [--quick]``."""
