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
and torch on CPU. The backward is the same for both backends: explicit reverse-mode formulas of
the recurrence in batched torch matmuls (it recomputes the forward intermediates in torch, so
the forward stores nothing but its inputs); it skips the parameter gradients when no weight,
bias or scale requires one (frozen parameters). The op is registered as
``fastrp::ensemble_mlp_jvp`` (forward) and ``fastrp::ensemble_mlp_jvp_backward`` (backward) with
fake implementations, so it traces under ``torch.compile(fullgraph=True)``. Double backward is
not supported.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ._common import act as _act
from ._common import act_d1 as _act_d1
from ._common import act_d2 as _act_d2
from ._common import check_activation, check_layers, check_tensor, eager_autograd, resolve_backend

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
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
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
    are lists of empty tensors.
    """
    E, B, K = tangents.shape[:3]
    record: list = []
    _recurrence(x, tangents, weights, biases, scales, activation, record)
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


def _present(tensors: Sequence[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], List[bool]]:
    """Split a list with None entries into its tensors and a presence mask."""
    return [t for t in tensors if t is not None], [t is not None for t in tensors]


def _expand(tensors: Sequence[torch.Tensor], present: Sequence[bool]) -> List[Optional[torch.Tensor]]:
    """Inverse of :func:`_present`."""
    it = iter(tensors)
    return [next(it) if p else None for p in present]


# The registered ops take the biases and scales that are present plus presence masks, because
# torch.library's autograd support does not reach tensors inside ``Tensor?[]`` arguments.
@torch.library.custom_op("fastrp::ensemble_mlp_jvp", mutates_args=())
def _jvp_op(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    scales: List[torch.Tensor],
    has_bias: List[bool],
    has_scale: List[bool],
    activation: str,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    bs, ss = _expand(biases, has_bias), _expand(scales, has_scale)
    if backend == "triton":
        from fastrp.kernels import ensemble_mlp_jvp as kernel

        return kernel.mlp_jvp_forward(x, tangents, weights, bs, ss, activation)
    return _recurrence(x, tangents, weights, bs, ss, activation)


@_jvp_op.register_fake
def _jvp_op_fake(x, tangents, weights, biases, scales, has_bias, has_scale, activation, backend):
    E, B, K = tangents.shape[:3]
    d_out = weights[-1].shape[2]
    return x.new_empty((E, B, d_out)), x.new_empty((E, B, K, d_out))


@torch.library.custom_op("fastrp::ensemble_mlp_jvp_backward", mutates_args=())
def _jvp_backward_op(
    grad_y: torch.Tensor,
    grad_jy: torch.Tensor,
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    scales: List[torch.Tensor],
    has_bias: List[bool],
    has_scale: List[bool],
    activation: str,
    need_params: bool,
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Gradients of x, tangents, every weight, and the present biases and scales (with
    ``need_params=False`` the parameter gradients are empty tensors and cost nothing)."""
    gx, gt, gW, gb, gs = _backward_torch(
        grad_y, grad_jy, x, tangents, weights, _expand(biases, has_bias), _expand(scales, has_scale), activation,
        need_params,
    )
    gb = [g for g, p in zip(gb, has_bias) if p]
    gs = [g for g, p in zip(gs, has_scale) if p]
    return gx, gt, gW, gb, gs


@_jvp_backward_op.register_fake
def _jvp_backward_op_fake(grad_y, grad_jy, x, tangents, weights, biases, scales, has_bias, has_scale, activation,
                          need_params):
    # the real op returns contiguous tensors whatever the strides of its inputs
    def like(t):
        return t.new_empty(t.shape if need_params else (0,))

    return (
        x.new_empty(x.shape),
        tangents.new_empty(tangents.shape),
        [like(w) for w in weights],
        [like(b) for b in biases],
        [like(s) for s in scales],
    )


def _setup_context(ctx, inputs, output):
    x, tangents, weights, biases, scales, has_bias, has_scale, activation, _backend = inputs
    ctx.activation = activation
    ctx.sizes = (len(weights), len(biases))
    ctx.has_bias, ctx.has_scale = list(has_bias), list(has_scale)
    ctx.save_for_backward(x, tangents, *weights, *biases, *scales)


def _backward(ctx, grad_y, grad_jy):
    x, tangents, *params = ctx.saved_tensors
    n_w, n_b = ctx.sizes
    weights, biases, scales = params[:n_w], params[n_w:n_w + n_b], params[n_w + n_b:]
    if grad_y is None:
        grad_y = x.new_zeros((x.shape[0], x.shape[1], weights[-1].shape[2]))
    if grad_jy is None:
        grad_jy = tangents.new_zeros(tuple(tangents.shape[:3]) + (weights[-1].shape[2],))
    nig = ctx.needs_input_grad
    need_params = len(nig) != 9 or any(_any(f) for f in nig[2:5])
    gx, gt, gW, gb, gs = _jvp_backward_op(
        grad_y.contiguous(), grad_jy.contiguous(), x, tangents, weights, biases, scales,
        ctx.has_bias, ctx.has_scale, ctx.activation, need_params,
    )
    if not need_params:
        return gx, gt, [None] * len(gW), [None] * len(gb), [None] * len(gs), None, None, None, None
    return gx, gt, list(gW), list(gb), list(gs), None, None, None, None


def _any(flag) -> bool:
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


_jvp_op.register_autograd(_backward, setup_context=_setup_context)


def ensemble_mlp_jvp(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: str = "silu",
    *,
    backend: Optional[str] = None,
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

    Returns:
        ``(y[E, B, out], jy[E, B, K, out])``. Differentiable in ``x``, ``tangents``, weights,
        biases and scales (explicit reverse-mode formulas in batched torch matmuls for both
        backends; double backward is not supported).

    Raises:
        ValueError: on a bad shape, dtype, device, list length, activation or backend.
    """
    weights, biases, scales = _normalize_args(x, tangents, weights, biases, scales, activation)
    chosen = resolve_backend(_OP, backend, x.device, _BACKENDS)
    if eager_autograd(backend, chosen, x):
        return _recurrence(x, tangents, weights, biases, scales, activation)
    bs, has_bias = _present(biases)
    ss, has_scale = _present(scales)
    return _jvp_op(x, tangents, weights, bs, ss, has_bias, has_scale, activation, chosen)
