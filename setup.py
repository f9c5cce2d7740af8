"""Build script for fastrp.

Builds the compiled extension ``fastrp._C`` with torch's extension tools:

* the C++ CPU sources in ``csrc/*.cpp`` always (OpenMP where the compiler has it);
* the CUDA sources in ``csrc/cuda/*.cu`` (and ``csrc/cuda/*.cpp``) only when torch was built
  with CUDA and an ``nvcc`` whose major version matches torch's CUDA is found.

The Triton kernels in the top-level ``kernels/`` directory are installed as ``fastrp.kernels``.

Environment knobs:

``FASTRP_NO_EXT=1``        build no compiled extension at all (pure Python install).
``FASTRP_SKIP_CUDA=1``     build the CPU part of the extension only.
``FASTRP_CUDA_ARCH``       CUDA architectures, e.g. ``"8.0;9.0"`` (sets ``TORCH_CUDA_ARCH_LIST``;
                           default: the visible GPUs, else ``8.0;9.0``).
``FASTRP_BUILD_JOBS``      parallel compile jobs (``MAX_JOBS``), default: number of cores.

torch is not a build requirement in ``pyproject.toml`` on purpose: an isolated build would
download a different torch (several GB of CUDA packages) and produce an extension that does not
match the torch it runs with.  Instead this script compiles against the torch installed in the
environment being installed into; inside pip's isolated build environment it finds that torch
by asking the same interpreter without the isolation's path overrides.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"fastrp setup: {msg}", file=sys.stderr)


def _import_torch():
    """Import the target environment's torch, also from inside pip's isolated build env."""
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
            env=env, capture_output=True, text=True, timeout=300, check=True,
        ).stdout.strip().splitlines()[-1]
    except Exception:
        return None
    if out and os.path.isdir(out) and out not in sys.path:
        sys.path.append(out)  # appended: the isolated env's setuptools keeps precedence
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        return None


def _nvcc_matches(torch):
    if os.environ.get("FASTRP_SKIP_CUDA", "0") == "1":
        _log("FASTRP_SKIP_CUDA=1: building the CPU part of the extension only")
        return False
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA: building the CPU part of the extension only")
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        warnings.warn("nvcc not found: building the CPU part of fastrp._C only (kNN on CUDA falls back to torch)")
        return False
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        nvcc_ver = re.search(r"release (\d+)\.(\d+)", text).groups()
    except Exception as exc:  # pragma: no cover - depends on the machine
        warnings.warn(f"could not run {nvcc} --version ({exc}); skipping the CUDA sources")
        return False
    if nvcc_ver[0] != torch.version.cuda.split(".")[0]:
        warnings.warn(
            f"nvcc {'.'.join(nvcc_ver)} does not match torch's CUDA {torch.version.cuda}: "
            "skipping the CUDA sources of fastrp._C"
        )
        return False
    return True


def _extensions():
    if os.environ.get("FASTRP_NO_EXT", "0") == "1":
        _log("FASTRP_NO_EXT=1: no compiled extension (the torch reference is used instead)")
        return [], {}
    torch = _import_torch()
    if torch is None:
        warnings.warn("torch is not installed: building fastrp without its compiled extension")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if "FASTRP_BUILD_JOBS" in os.environ:
        os.environ["MAX_JOBS"] = os.environ["FASTRP_BUILD_JOBS"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17"] + openmp
    define_macros = []
    if _nvcc_matches(torch):
        arch = os.environ.get("FASTRP_CUDA_ARCH")
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "fastrp._C",
            sources + cuda_sources,
            define_macros=define_macros + [("FASTRP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "fastrp._C", sources, define_macros=define_macros, extra_compile_args=cxx, extra_link_args=openmp
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastrp", "fastrp.*"]) + ["fastrp.kernels"],
    package_dir={"fastrp.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
