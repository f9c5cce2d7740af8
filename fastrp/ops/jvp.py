"""``ensemble_mlp_jvp``: an ensemble MLP's output and K forward-mode tangents in one pass.

For every member ``e`` and row ``b`` the op returns ``y[e, b] = f_e(x[e, b])`` and
``jy[e, b, k] = J_e(x[e, b]) @ tangents[e, b, k]`` for the MLP ``f_e`` of
:func:`fastrp.ops.ensemble_mlp`. DDPPO's gradient model is trained by back-propagating a loss on
``jy`` (and ``y``) through this op, so it is differentiable in ``x``, ``tangents``, the weights,
biases and scales.

Recurrence (per layer ``l`` with weight ``W``, scale ``s``, bias ``b``)::

    z = (h W) s + b,   w = (t W) s
    hidden layers:  h' = act(z),  t' = act'(z) * w
    last layer:     y = z,        jy = w

Backends: ``"torch"`` (batched matmuls) and ``"triton"`` (one fused launch computing the primal
row and its K tangent rows together, ``kernels/ensemble_mlp_jvp.py``). Auto picks Triton on CUDA
and torch on CPU. Both forwards keep the hidden pre-activations ``z`` and ``w`` of every layer
(the Triton kernel writes them anyway, to hand them from layer to layer), and the backward reads
them: explicit reverse-mode formulas of the recurrence in batched torch matmuls, with no GEMM of
the forward recomputed (only elementwise ``act``, ``act'``, ``act''`` of the saved ``z``). It skips
the parameter gradients when no weight, bias or scale requires one (frozen parameters). The op is
registered as ``fastrp::ensemble_mlp_jvp`` (forward) and ``fastrp::ensemble_mlp_jvp_backward``
(backward) with fake implementations, so it traces under ``torch.compile(fullgraph=True)``; one
autograd node per call calls them (their implementations directly outside torch.compile).
Double backward is not supported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._common import act as _act
from ._common import act_d1 as _act_d1
from ._common import act_d2 as _act_d2
from ._common import (check_activation, check_layers, check_precision, check_tensor, eager_autograd, is_compiling,
                      resolve_backend)

__all__ = ["ensemble_mlp_jvp", "ensemble_mlp_jvp_ref"]

_OP = "ensemble_mlp_jvp"
_BACKENDS = ("triton", "torch")
_DTYPES = (torch.float32, torch.float64)


def _recurrence(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    activation: str,
    record: Optional[list] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The primal + tangent recurrence in plain torch ops (autograd-able).

    When ``record`` is a list, the pre-activations ``(z, w)`` of every hidden layer are appended
    to it (what the explicit backward needs).
    """
    E, B, K = tangents.shape[:3]
    h, t = x, tangents
    last = len(weights) - 1
    for layer, (w, b, s) in enumerate(zip(weights, biases, scales)):
        d_in, d_out = w.shape[1], w.shape[2]
        u = torch.matmul(h, w)
        v = torch.matmul(t.reshape(E, B * K, d_in), w).reshape(E, B, K, d_out)
        if s is not None:
            u = u * s[:, None, None]
            v = v * s[:, None, None, None]
        z = u if b is None else u + b[:, None, :]
        if layer == last:
            return z, v
        if record is not None:
            record.append((z, v))
        h = _act(z, activation)
        t = _act_d1(z, activation).unsqueeze(2) * v
    raise AssertionError("unreachable: weights is non-empty")


def _normalize_args(x, tangents, weights, biases, scales, activation):
    """Validate the arguments; return ``(weights, biases, scales)`` as lists of length L."""
    check_activation(activation)
    x = check_tensor("x", x, ndim=3, dtypes=_DTYPES, what="[E, B, in]")
    E, B, d_in = x.shape
    if E < 1:
        raise ValueError(f"x must have at least one member (E >= 1) in [E, B, in], got shape {tuple(x.shape)}")
    dev, dt = x.device, x.dtype
    check_tensor("tangents", tangents, ndim=4, dtypes=(dt,), device=dev, what="[E, B, K, in]")
    if tangents.shape[0] != E or tangents.shape[1] != B or tangents.shape[3] != d_in:
        raise ValueError(
            f"tangents must have shape [E, B, K, in] = [{E}, {B}, K, {d_in}] (x is {tuple(x.shape)}), "
            f"got {tuple(tangents.shape)}"
        )
    _, biases, scales = check_layers(weights, biases, scales, E, d_in, dt, dev)
    return list(weights), biases, scales


def ensemble_mlp_jvp_ref(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: str = "silu",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`ensemble_mlp_jvp` (differentiable by plain autograd).

    Same arguments and results; no backend dispatch and no custom op.
    """
    weights, biases, scales = _normalize_args(x, tangents, weights, biases, scales, activation)
    return _recurrence(x, tangents, weights, biases, scales, activation)


def _backward_torch(
    grad_y: torch.Tensor,
    grad_jy: torch.Tensor,
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scales: Sequence[Optional[torch.Tensor]],
    record: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    activation: str,
    need_params: bool = True,
):
    """Reverse mode through the recurrence: ``(gx, gtangents, gW[L], gb[L], gs[L])``.

    Per layer, with ``gz``/``gw`` the gradients of its primal/tangent pre-activations and
    ``A = hᵀ gz + tᵀ gw``: ``gW = s A``, ``gs = <A, W>``, ``gb = Σ_b gz``,
    ``gh = s gz Wᵀ``, ``gt = s gw Wᵀ``; through a hidden activation
    ``gz = gh act'(z) + act''(z) Σ_k gt_k w_k`` and ``gw = gt act'(z)``.
    Gradients are returned for every layer (``gb``/``gs`` also where the bias/scale is None);
    with ``need_params=False`` (frozen parameters) ``A`` is not formed and ``gW``, ``gb``, ``gs``
    are lists of empty tensors. ``record`` holds the forward's hidden pre-activations ``(z, w)``
    per hidden layer (``[E, B, d]``, ``[E, B, K, d]``).
    """
    E, B, K = tangents.shape[:3]
    L = len(weights)
    gW: List[torch.Tensor] = [None] * L  # type: ignore[list-item]
    gb: List[torch.Tensor] = [None] * L  # type: ignore[list-item]
    gs: List[torch.Tensor] = [None] * L  # type: ignore[list-item]
    gz, gw = grad_y, grad_jy
    for layer in range(L - 1, -1, -1):
        w, s = weights[layer], scales[layer]
        d_in, d_out = w.shape[1], w.shape[2]
        if layer == 0:
            h_in, t_in = x, tangents
        elif not need_params:
            z_prev, w_prev = record[layer - 1]
            d1 = _act_d1(z_prev, activation)
            h_in = t_in = None
        else:
            z_prev, w_prev = record[layer - 1]
            d1 = _act_d1(z_prev, activation)
            h_in = _act(z_prev, activation)
            t_in = d1.unsqueeze(2) * w_prev
        gw2 = gw.reshape(E, B * K, d_out)
        if need_params:
            a = torch.matmul(h_in.transpose(1, 2), gz) + torch.matmul(
                t_in.reshape(E, B * K, d_in).transpose(1, 2), gw2)
            gb[layer] = gz.sum(1)
            gs[layer] = (a * w).sum((1, 2))
            gW[layer] = a if s is None else a * s[:, None, None]
        else:
            gW[layer], gb[layer], gs[layer] = x.new_empty(0), x.new_empty(0), x.new_empty(0)
        if s is None:
            gu, gv = gz, gw2
        else:
            gu, gv = gz * s[:, None, None], gw2 * s[:, None, None]
        wt = w.transpose(1, 2)
        gh = torch.matmul(gu, wt)
        gt = torch.matmul(gv, wt).reshape(E, B, K, d_in)
        if layer > 0:
            gz = gh * d1 + _act_d2(z_prev, activation) * (gt * w_prev).sum(2)
            gw = gt * d1.unsqueeze(2)
    return gh, gt, gW, gb, gs


def _forward_impl(x, tangents, weights, biases, scales, activation, impl, precision):
    """``(y, jy, saved)``: ``saved`` is a list, the Triton kernel's ``[L - 1, E, B, K + 1, DMAX]``
    buffer of hidden pre-activations (slot 0 ``z``, slots ``1..K`` ``w``), or the torch
    recurrence's ``z`` then ``w`` of each hidden layer."""
    if impl == "triton":
        from fastrp.kernels import ensemble_mlp_jvp as kernel

        y, jy, buf = kernel.mlp_jvp_forward(x, tangents, weights, biases, scales, activation, precision)
        return y, jy, [buf]
    record: list = []
    y, jy = _recurrence(x, tangents, weights, biases, scales, activation, record)
    return y, jy, [z for z, _ in record] + [w for _, w in record]


def _record(saved, weights, impl):
    """``saved`` of :func:`_forward_impl` as ``[(z, w)]`` per hidden layer (views)."""
    L = len(weights)
    if impl == "triton":
        buf = saved[0]
        return [(buf[l, :, :, 0, :w.shape[2]], buf[l, :, :, 1:, :w.shape[2]]) for l, w in enumerate(weights[:-1])]
    return list(zip(saved[:L - 1], saved[L - 1:]))


def _backward_impl(grad_y, grad_jy, x, tangents, weights, scales, saved, activation, impl, need_params):
    return _backward_torch(grad_y, grad_jy, x, tangents, weights, scales, _record(saved, weights, impl), activation,
                           need_params)


@torch.library.custom_op("fastrp::ensemble_mlp_jvp", mutates_args=())
def _jvp_op(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    scales: List[Optional[torch.Tensor]],
    activation: str,
    backend: str,
    precision: str,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    return _forward_impl(x, tangents, weights, biases, scales, activation, backend, precision)


@_jvp_op.register_fake
def _jvp_op_fake(x, tangents, weights, biases, scales, activation, backend, precision):
    E, B, K = tangents.shape[:3]
    d_out = weights[-1].shape[2]
    hidden = [w.shape[2] for w in weights[:-1]]
    if backend == "triton":
        saved = [x.new_empty((len(hidden), E, B, K + 1, max(hidden) if hidden else 1))]
    else:
        saved = [x.new_empty((E, B, d)) for d in hidden] + [x.new_empty((E, B, K, d)) for d in hidden]
    return x.new_empty((E, B, d_out)), x.new_empty((E, B, K, d_out)), saved


@torch.library.custom_op("fastrp::ensemble_mlp_jvp_backward", mutates_args=())
def _jvp_backward_op(
    grad_y: torch.Tensor,
    grad_jy: torch.Tensor,
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: List[torch.Tensor],
    scales: List[Optional[torch.Tensor]],
    saved: List[torch.Tensor],
    activation: str,
    backend: str,
    need_params: bool,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Gradients of x, tangents, and every layer's weight, bias and scale (with
    ``need_params=False`` the parameter gradients are empty tensors and cost nothing)."""
    return _backward_impl(grad_y, grad_jy, x, tangents, weights, scales, saved, activation, backend, need_params)


@_jvp_backward_op.register_fake
def _jvp_backward_op_fake(grad_y, grad_jy, x, tangents, weights, scales, saved, activation, backend, need_params):
    E = x.shape[0]

    def param(shape):  # the real op returns contiguous tensors whatever the strides of its inputs
        return x.new_empty(shape if need_params else (0,))

    return (
        x.new_empty(x.shape),
        tangents.new_empty(tangents.shape),
        [param(w.shape) for w in weights],
        [param((E, w.shape[2])) for w in weights],
        [param((E,)) for w in weights],
    )


class _JVPFunction(torch.autograd.Function):
    """One autograd node per call; ``params`` = weights, biases, scales (``L`` each, None where a
    layer has none)."""

    @staticmethod
    def forward(ctx, x, tangents, spec, *params):
        L, activation, backend, precision = spec
        weights, biases, scales = list(params[:L]), list(params[L:2 * L]), list(params[2 * L:])
        fwd = torch.ops.fastrp.ensemble_mlp_jvp if is_compiling() else _forward_impl
        y, jy, saved = fwd(x, tangents, weights, biases, scales, activation, backend, precision)
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, tangents, *weights, *scales, *saved)
        return y, jy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_jy):
        L, activation, backend, _ = ctx.spec
        x, tangents, *rest = ctx.saved_tensors
        weights, scales, saved = list(rest[:L]), list(rest[L:2 * L]), list(rest[2 * L:])
        if grad_y is None:
            grad_y = x.new_zeros((x.shape[0], x.shape[1], weights[-1].shape[2]))
        if grad_jy is None:
            grad_jy = tangents.new_zeros(tuple(tangents.shape[:3]) + (weights[-1].shape[2],))
        need_params = any(ctx.needs_input_grad[3:])
        bwd = torch.ops.fastrp.ensemble_mlp_jvp_backward if is_compiling() else _backward_impl
        gx, gt, gW, gb, gs = bwd(grad_y.contiguous(), grad_jy.contiguous(), x, tangents, weights, scales, saved,
                                 activation, backend, need_params)
        if not need_params:
            return (gx, gt, None) + (None,) * (3 * L)
        gb = [g if p else None for g, p in zip(gb, ctx.has_bias)]
        gs = [g if s is not None else None for g, s in zip(gs, scales)]
        return (gx, gt, None, *gW, *gb, *gs)


def ensemble_mlp_jvp(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: str = "silu",
    *,
    backend: Optional[str] = None,
    precision: str = "ieee",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ensemble MLP output and its K forward-mode directional derivatives.

    Args:
        x: ``[E, B, in]`` inputs, float32 (float64 also works).
        tangents: ``[E, B, K, in]`` directions; ``jy[e, b, k] = J_e(x[e, b]) @ tangents[e, b, k]``.
        weights: list of L tensors ``[E, d_l, d_{l+1}]`` with ``d_0 = in``.
        biases: list of L entries ``[E, d_{l+1}]`` or None (``biases=None`` means no biases).
        scales: None or list of L entries ``[E]`` or None: per-member multipliers applied as
            ``(h @ W) * scale + b`` (e.g. ``1 / sigma`` of spectral normalisation).
        activation: ``"silu" | "relu" | "tanh"`` on the hidden layers; the last layer is linear.
        backend: None (auto: ``"triton"`` on CUDA, ``"torch"`` on CPU), ``"torch"`` or
            ``"triton"`` (CUDA, or CPU with ``TRITON_INTERPRET=1``).
        precision: the Triton matmuls' input precision, ``"ieee"`` (default), ``"tf32"`` or
            ``"tf32x3"``, as in :func:`fastrp.ops.ensemble_mlp` (torch backend: full precision).

    Returns:
        ``(y[E, B, out], jy[E, B, K, out])``. Differentiable in ``x``, ``tangents``, weights,
        biases and scales (explicit reverse-mode formulas in batched torch matmuls for both
        backends; double backward is not supported).

    Raises:
        ValueError: on a bad shape, dtype, device, list length, activation or backend.
    """
    check_precision(precision)
    weights, biases, scales = _normalize_args(x, tangents, weights, biases, scales, activation)
    chosen = resolve_backend(_OP, backend, x.device, _BACKENDS)
    if eager_autograd(backend, chosen, x):
        return _recurrence(x, tangents, weights, biases, scales, activation)
    spec = (len(weights), activation, chosen, precision)
    return _JVPFunction.apply(x, tangents, spec, *weights, *biases, *scales)
