"""Build of sparse_engine and its compiled kernels, the extension module ``sparse_engine._C``.

The C++ CPU kernels (csrc/cpu, OpenMP) are always built. The CUDA kernels (csrc/cuda) are built
when torch was built with CUDA and nvcc is found (CUDA_HOME, else nvcc on PATH, else
/usr/local/cuda); the macro SPARSE_ENGINE_WITH_CUDA then tells csrc/bindings.cpp to dispatch CUDA
tensors to them.

Environment:
  SPARSE_ENGINE_CUDA    unset: build the CUDA kernels when possible; 0: never build them;
                        1: build them, and fail the build if that is impossible.
  TORCH_CUDA_ARCH_LIST  GPU architectures, torch's syntax (e.g. "8.0;9.0a"). Unset: sm_80 and
                        sm_90a.
  MAX_JOBS              parallel compile jobs (torch's ninja build; default: all cores).

Install (the venv's torch is used, hence no build isolation):
  pip install --no-build-isolation -e .
"""
import os
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent

# -gencode rather than -arch=sm_90a: nvcc 13.0's shorthand also runs a plain sm_90 pass.
DEFAULT_CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def build_cuda() -> bool:
    flag = os.environ.get("SPARSE_ENGINE_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"SPARSE_ENGINE_CUDA must be unset, 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} was built without CUDA")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if missing and flag == "1":
        raise RuntimeError("SPARSE_ENGINE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing


def sources(pattern: str) -> list[str]:
    # setuptools wants paths relative to setup.py.
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def extension():
    # No -std for the C++ sources: torch's BuildExtension adds the standard its headers need
    # (C++20 from torch 2.10 on; they warn under C++17). Our code is C++17.
    cxx_flags = ["-O3", "-fopenmp"]
    cpp_sources = ["csrc/bindings.cpp"] + sources("csrc/cpu/*.cpp")
    if not build_cuda():
        return CppExtension(
            "sparse_engine._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # Our .cu files include no torch headers, so they need no more than C++17. An explicit
    # -gencode makes torch add no arch flags of its own; with TORCH_CUDA_ARCH_LIST set, torch
    # turns it into -gencode flags.
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_CUDA_ARCH_FLAGS
    return CUDAExtension(
        "sparse_engine._C",
        cpp_sources + sources("csrc/cuda/*.cu"),
        define_macros=[("SPARSE_ENGINE_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"] + arch_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="sparse_engine",
    version="0.1.0",
    description="Neural-network pruning and sparse retraining for PyTorch, with fused masked kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["sparse_engine", "sparse_engine.*"]) + ["sparse_engine.kernels"],
    # The Triton kernels live in the top-level folder kernels/; they install as sparse_engine.kernels
    # (never `import kernels`: a different PyPI package has that name).
    package_dir={"sparse_engine.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "tqdm",
        "matplotlib",
        "safetensors>=0.4",
        "tomli>=2.0; python_version < '3.11'",  # sweep files (tomllib from Python 3.11 on)
    ],
    # `pip install sparse_engine[ray]`: the sweep runner's ray executor (make test installs the pinned
    # version the tests use, Makefile SWEEP_DEPS).
    extras_require={"ray": ["ray>=2.60,<3"]},
    entry_points={"console_scripts": ["sparse-engine = sparse_engine.sweep.cli:main"]},
    zip_safe=False,
)
