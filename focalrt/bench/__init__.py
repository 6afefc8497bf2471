"""Benchmark helpers: timing statistics, environment record, roofline, memory, plots and reports.

Torch-free so the same code measures a device install; matplotlib and psutil (the `bench` extra) are
imported only where they are used.
"""
