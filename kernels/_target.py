"""Which GPU the host launchers tile for: the tensors' CUDA device, or an explicit target.

The launchers pick tile sizes and grids for a GPU from its number of streaming multiprocessors;
without a GPU (CPU tensors, interpreter) they pick tiles for the interpreter. ``bench/kernel_report.py``
compiles the kernels ahead of time for a GPU that is not there: it enters :func:`compile_for`, so the
launchers take their GPU branch on CPU tensors and size their grids for that GPU.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional

import torch

_forced_sms: Optional[int] = None


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gpu_sms(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of the GPU a launch targets, or None for the interpreter."""
    if _forced_sms is not None:
        return _forced_sms
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return None


@contextlib.contextmanager
def compile_for(sms: int) -> Iterator[None]:
    """Launchers size tiles and grids for a GPU with ``sms`` multiprocessors (ahead-of-time
    compilation on a machine without it)."""
    global _forced_sms
    previous, _forced_sms = _forced_sms, int(sms)
    try:
        yield
    finally:
        _forced_sms = previous
