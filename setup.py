"""Builds bus_kernels._C from csrc/ against the torch installed in this environment.

    pip install -e . --no-build-isolation      # the extension must match the torch that runs it

Environment:
    BUS_KERNELS_SKIP_EXT=1   pure-Python install (backends "torch" and "triton" only)
    FORCE_CUDA=1             build the CUDA kernels even if torch/nvcc detection says no
    BUS_KERNELS_CPU_ONLY=1   build only the C++ CPU kernels (faster local iteration)
    TORCH_CUDA_ARCH_LIST     default "8.0;9.0" when no GPU is visible
    MAX_JOBS                 parallel ninja jobs
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("BUS_KERNELS_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # an isolated build env has no torch: say what to do instead
        raise RuntimeError(
            "bus-kernels compiles its extension against the torch already installed. Install torch "
            "first, then `pip install -e . --no-build-isolation` (or set BUS_KERNELS_SKIP_EXT=1)."
        ) from exc

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/bus_kernels.cpp") + rel("csrc/cpu/*.cpp")
    # at::parallel_for is a header template that runs serially unless the extension itself is
    # compiled with OpenMP (torch's own build uses GNU OpenMP; the loader shares its libgomp).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3"] + openmp
    with_cuda = os.environ.get("BUS_KERNELS_CPU_ONLY", "0") != "1" and (
        os.environ.get("FORCE_CUDA", "0") == "1"
        or (torch.version.cuda is not None and CUDA_HOME is not None)
    )
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "bus_kernels._C",
            sources + rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
            define_macros=[("BUS_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension("bus_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["bus_kernels", "bus_kernels.*", "bus", "bus.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
