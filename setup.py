"""Build script for fastsam.

fastsam is pure Python today: the torch backend, and Triton kernels that Triton compiles at
run time. The C++/CUDA extension ``fastsam._C`` (csrc/) will be built from here when it lands.
"""
from setuptools import setup

setup()
