"""Build script for fastsam: the Python package and the optional native extension ``fastsam._C``.

``fastsam._C`` (csrc/) holds the kernels of the ``cpu`` backend, built whenever a C++ compiler
works, and those of the ``cuda`` backend, added when the installed torch has CUDA and nvcc is
found (architectures: ``FASTSAM_CUDA_ARCHS``, else ``TORCH_CUDA_ARCH_LIST``, else torch's
choice for the visible GPUs). Build with ``pip install --no-build-isolation`` so the extension
is compiled against the torch that is installed.

``FASTSAM_SKIP_BUILD=1`` installs pure Python. A failed build warns and leaves a working
pure-Python install (torch and triton backends); asking for the ``cpu`` or ``cuda`` backend then
shows the import error.
"""
import os
import warnings

from setuptools import setup


def _native_extension():
    """(ext_modules, cmdclass) for fastsam._C, or ([], {}) when it is not to be built."""
    if os.environ.get("FASTSAM_SKIP_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        warnings.warn(f"fastsam: torch is not importable ({exc}); installing pure Python only")
        return [], {}

    # -fopenmp: at::parallel_for runs serially in a file compiled without it. -O3 for the
    # loops' vectorisation (no -ffast-math: the reductions' order is part of the contract).
    # -fno-math-errno: sqrtf then vectorises (Adam's update: sqrtps, not a scalar sqrtss with
    # a libm call for negative inputs to set errno); the same correctly rounded square root.
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    sources = ["csrc/binding.cpp", "csrc/cpu_kernels.cpp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        if os.environ.get("FASTSAM_CUDA_ARCHS"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTSAM_CUDA_ARCHS"]
        extension = cpp_extension.CUDAExtension(
            "fastsam._C",
            sources + ["csrc/cuda_kernels.cu"],
            extra_compile_args={
                "cxx": cxx + ["-DFASTSAM_WITH_CUDA"],
                "nvcc": ["-O3", "-DFASTSAM_WITH_CUDA"],
            },
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "fastsam._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed build of fastsam._C warns instead of failing the install (torch checks
        the compiler before any extension is built, so the whole command is guarded)."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or failing: pure Python still works
                warnings.warn(
                    f"fastsam: building fastsam._C failed ({exc!r}); the cpu/cuda backends are "
                    "unavailable, torch and triton still work"
                )

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _native_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
