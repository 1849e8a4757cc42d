"""Triton kernels (arithmetic only); launchers live in fastsam/backends/triton.py."""
