"""Compile checks of the CUDA sources with the machine's nvcc, for machines without a CUDA torch.

* every ``csrc/cuda/*.cu`` kernel file is compiled to an object (``nvcc -c``) for sm_80 and
  sm_90 — the kernels depend only on the CUDA runtime and their own headers;
* every ``csrc/cuda/*.cpp`` torch glue file is syntax-checked with the host compiler against
  torch's headers and the CUDA toolkit's (a CPU torch wheel ships the c10/cuda headers but not
  their generated ``cuda_cmake_macros.h``, which the glue does not need).

Both skip cleanly when the tools are missing and fail with the compiler's error text.
"""

import glob
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
GLUE_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
ARCH_FLAGS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _nvcc():
    home = cpp_extension.CUDA_HOME
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    if candidate and os.path.exists(candidate):
        return candidate
    return shutil.which("nvcc")


def _cuda_include(nvcc):
    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in homes:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    return None


def _include_flags():
    return [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}"]


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"compilation timed out: {' '.join(cmd)}\n{exc}")
    if out.returncode != 0:
        pytest.fail(f"compilation failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")


def test_cuda_sources_exist():
    assert CU_SOURCES, "no csrc/cuda/*.cu kernel sources"
    assert GLUE_SOURCES, "no csrc/cuda/*.cpp registration sources"


@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_nvcc_compiles_kernel(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    obj = tmp_path / (os.path.basename(source) + ".o")
    _run([nvcc, "-c", source, "-o", str(obj), "-std=c++17", "-O3", "--use_fast_math", *ARCH_FLAGS,
          *_include_flags()])
    assert obj.stat().st_size > 0


@pytest.mark.parametrize("source", GLUE_SOURCES, ids=os.path.basename)
def test_host_compiler_accepts_glue(source):
    nvcc = _nvcc()
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if nvcc is None or cxx is None:
        pytest.skip("nvcc or a host C++ compiler not found")
    cuda_include = _cuda_include(nvcc)
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's cuda_runtime.h was not found")
    _run([cxx, "-fsyntax-only", "-std=c++17", "-w", "-DFASTRP_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
          *_include_flags(), f"-I{cuda_include}", source])
