"""Development benchmarks with their baselines; run each from a checkout's root as `python -m benchmarks.NAME`."""
