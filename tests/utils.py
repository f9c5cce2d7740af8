"""Helpers shared by the test files (tolerance rule of style.md, Triton-on-CPU skips, the CUDA
tests' no-sync guard)."""

import contextlib

import pytest
import torch

from fastrp.ops._common import triton_usable

# CPU-tensor Triton tests need the interpreter: conftest sets TRITON_INTERPRET=1 only where CUDA
# is absent, so on a GPU machine they skip (the CUDA-marked tests cover Triton there).
needs_triton = pytest.mark.skipif(
    not triton_usable(torch.device("cpu")), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


def backends(*names: str) -> list:
    """``names`` as pytest params, ``"triton"`` marked :data:`needs_triton`."""
    return [pytest.param(n, marks=needs_triton) if n == "triton" else n for n in names]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_ref(out, ref32, ref64, factor: float = 2.0, name: str = "output", atol: float = None):
    """The kernel's error against the float64 reference is within ``factor`` x the error of the
    float32 torch reference against float64 (plus a tiny floor relative to the magnitude, for
    outputs where the float32 reference happens to be exact)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = max_err(out, ref64)
    base = max_err(ref32, ref64)
    scale = ref64.detach().abs().max().item() if ref64.numel() else 1.0
    floor = atol if atol is not None else 1e-6 * max(1.0, scale)
    assert err <= factor * base + floor, (
        f"{name}: error {err:.3e} vs float64 exceeds {factor} x float32-reference error {base:.3e} (+{floor:.1e})"
    )


@contextlib.contextmanager
def no_host_sync(device="cuda"):
    """The CUDA tests' op calls run inside this block: on a CUDA device it sets
    ``torch.cuda.set_sync_debug_mode("error")``, so any operation that synchronises the host with
    the device (a read back such as ``.item()`` or ``.tolist()``, ``nonzero``, a pageable
    host-to-device copy, a stream or device synchronisation) raises. Moving test data to the device
    and comparing results stay outside the block. On other devices it does nothing."""
    if torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
