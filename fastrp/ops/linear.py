"""Ensemble linear layer: ``ensemble_linear`` and its reference ``ensemble_linear_ref``.

``ensemble_linear`` is the one-layer case of the fused ensemble MLP op
(``fastrp::ensemble_mlp_fwd`` / ``_bwd`` in :mod:`fastrp.ops.mlp`), so it shares its Triton
kernels, torch backend, registration and autograd formulas.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._common import check_precision, check_tensor, eager_autograd, resolve_backend

__all__ = ["ensemble_linear", "ensemble_linear_ref"]


def ensemble_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Per-member affine map ``(x @ weight) * scale[:, None, None] + bias[:, None, :]``.

    Args:
        x: ``[E, B, in]``.
        weight: ``[E, in, out]``.
        bias: optional ``[E, out]``.
        scale: optional ``[E]`` per-member multiplier of the matmul (e.g. ``1 / sigma``).
        backend: None (auto: ``"triton"`` on CUDA, ``"torch"`` on CPU), ``"triton"`` (one fused
            launch: GEMM with scale and bias in the epilogue; also runs on CPU under
            ``TRITON_INTERPRET=1``) or ``"torch"`` (``bmm`` with explicit backward formulas).
        precision: the Triton matmul's input precision, ``"ieee"`` (default), ``"tf32"`` or
            ``"tf32x3"``, as in :func:`fastrp.ops.ensemble_mlp`.

    Returns:
        ``[E, B, out]``, differentiable in ``x``, ``weight``, ``bias`` and ``scale``. float32
        inputs (float64 also works); all tensors on one device; ``E >= 1`` (like
        :func:`fastrp.ops.ensemble_mlp`).
    """
    from .mlp import _apply

    check_tensor("x", x, ndim=3, what="[E, B, in]")
    E, B, d_in = x.shape
    if E < 1:
        raise ValueError(f"x must have at least one member (E >= 1), got shape {tuple(x.shape)}")
    dev, dtype = x.device, x.dtype
    check_tensor("weight", weight, shape=[E, d_in, None], dtypes=[dtype], device=dev,
                 what=f"[E={E}, in={d_in}, out] like x's dtype")
    d_out = weight.shape[2]
    if bias is not None:
        check_tensor("bias", bias, shape=[E, d_out], dtypes=[dtype], device=dev,
                     what=f"[E={E}, out={d_out}] like x's dtype")
    if scale is not None:
        check_tensor("scale", scale, shape=[E], dtypes=[dtype], device=dev, what=f"[E={E}] like x's dtype")
    check_precision(precision)
    impl = resolve_backend("ensemble_linear", backend, dev, ("triton", "torch"))
    if eager_autograd(backend, impl, x):
        return ensemble_linear_ref(x, weight, bias, scale)
    y = _apply(x.reshape(E * B, d_in), None, [weight], [bias], [scale], "silu", impl, precision)
    return y.view(E, B, d_out)


def ensemble_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`ensemble_linear` (plain autograd)."""
    y = torch.bmm(x, weight)
    if scale is not None:
        y = y * scale[:, None, None]
    if bias is not None:
        y = y + bias[:, None, :]
    return y
