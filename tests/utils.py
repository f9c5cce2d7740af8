"""Helpers shared by the test files (tolerance rule of style.md)."""

import torch


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
