"""Ensemble MLP: ``ensemble_mlp`` (fused Triton forward + backward, or torch) and its reference.

Layers of the op (kernel, host launcher, autograd Function / registered op):

* kernels and host launchers: ``fastrp.kernels.ensemble_mlp`` (imported lazily, so fastrp imports
  without triton);
* the torch backend: :func:`_torch_forward` / :func:`_torch_backward`, explicit ``bmm`` formulas;
* registered ops ``fastrp::ensemble_mlp_fwd`` / ``fastrp::ensemble_mlp_bwd`` (``torch.library``
  custom ops with fake implementations; optional per-layer tensors as ``Tensor?[]``), so
  ``torch.compile(fullgraph=True)`` traces through the op;
* one autograd node per call, :class:`_EnsembleMLPFunction`: its forward and backward call the
  registered ops while torch.compile traces, and their implementations directly otherwise (the
  dispatcher's Python round trip costs more host time than the whole op at RL sizes);
* the public function :func:`ensemble_mlp` (validation, cached per call signature; backend
  choice; the grouped-by-member sort) and the pure-torch reference :func:`ensemble_mlp_ref`.

The op works on rows ``x2d [R, d_0]`` plus an optional segment table ``seg [E + 1]`` (member ``e``
owns rows ``seg[e]:seg[e+1]``); ``seg=None`` means the dense layout, ``R = E·B`` rows with member
``e`` owning rows ``e·B:(e+1)·B``. :func:`fastrp.ops.ensemble_linear` is the same op with one layer.

No op path reads a device value back to the host (capture-safe): the segment table is computed
on the device, the Triton launchers read nothing back, and the torch backend's grouped path on a
GPU runs every member on every row and keeps each row's own member (``E`` times the work, no
sync); on the CPU it slices rows by the host's copy of the table.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import _common
from ._common import (
    act as _act,
    act_backward as _act_backward,
    check_activation,
    check_layers,
    check_precision,
    check_tensor,
    eager_autograd,
    is_compiling,
    resolve_backend,
    value_checks_allowed,
)
from .linear import ensemble_linear_ref

__all__ = ["ensemble_mlp", "ensemble_mlp_ref"]

_BACKENDS = ("triton", "torch")


# ----------------------------------------------------------------------------------------------
# torch backend: explicit formulas


def _dense_forward(h, weights, biases, scales, activation):
    """``h [E, B, d_0]`` through every layer: ``(y [E, B, d_L], saved)`` with ``saved`` the hidden
    pre-activations ``z_l`` then post-activations ``act(z_l)`` (``[E, B, d]`` each), what the
    backward reads instead of recomputing them."""
    L = len(weights)
    zs, hs = [], []
    for l in range(L):
        w, b, s = weights[l], biases[l], scales[l]
        if b is not None and s is None:
            z = torch.baddbmm(b.unsqueeze(1), h, w)
        else:
            z = torch.bmm(h, w)
            if s is not None:
                z.mul_(s[:, None, None])
            if b is not None:
                z.add_(b.unsqueeze(1))
        if l == L - 1:
            return z, zs + hs
        h = _act(z, activation)
        zs.append(z)
        hs.append(h)
    raise AssertionError("unreachable: weights is non-empty")


def _dense_backward(dz, x, saved, weights, scales, activation, need_dx, need_params):
    """Gradients of :func:`_dense_forward` for ``grad_y = dz [E, B, d_L]``."""
    E = x.shape[0]
    L = len(weights)
    zs, hs = saved[:L - 1], saved[L - 1:]
    dws: List[torch.Tensor] = [None] * L if need_params else []  # type: ignore[list-item]
    dbs: List[torch.Tensor] = [None] * L if need_params else []  # type: ignore[list-item]
    ds = x.new_zeros(E, L if need_params else 0)
    dx = x.new_empty(0, x.shape[2])
    for l in reversed(range(L)):
        w, s = weights[l], scales[l]
        h = x if l == 0 else hs[l - 1]
        if need_params:
            a = torch.bmm(h.transpose(1, 2), dz)  # A = h^T dz
            dbs[l] = dz.sum(1)
            if s is not None:
                ds[:, l] = (a * w).sum((1, 2))  # <A, W>
                a.mul_(s[:, None, None])
            dws[l] = a
        if l == 0 and not need_dx:
            break
        g = torch.bmm(dz, w.transpose(1, 2))  # dz W^T
        if s is not None:
            g.mul_(s[:, None, None])
        if l > 0:
            dz = _act_backward(g, zs[l - 1], h, activation)
        else:
            dx = g
    return dx, dws, dbs, ds


def _row_members(seg: torch.Tensor, R: int) -> torch.Tensor:
    """Member of each of ``R`` rows grouped by member (on the device: no host read)."""
    return torch.searchsorted(seg[1:], torch.arange(R, device=seg.device, dtype=seg.dtype), right=True)


def _member(tensors, e):
    return [None if t is None else t[e:e + 1] for t in tensors]


def _torch_forward(x, seg, weights, biases, scales, activation):
    """Rows ``x [R, d_0]`` -> ``(y [R, d_L], saved hidden activations)``: the ``2 (L - 1)``
    tensors of :func:`_dense_forward` (grouped rows: each ``[E, R, d]`` on a GPU, every member
    on every row; ``[1, R, d]`` on the CPU, each member's rows filled in by member)."""
    E, R = weights[0].shape[0], x.shape[0]
    if seg is None:
        y, saved = _dense_forward(x.reshape(E, R // E, x.shape[1]), weights, biases, scales, activation)
        return y.view(R, -1), saved
    if _common.device_side(x):
        # every member on every row (no host read of the split), each row keeps its member's output
        y_all, saved = _dense_forward(x.unsqueeze(0).expand(E, R, x.shape[1]), weights, biases, scales, activation)
        return y_all[_row_members(seg, R), torch.arange(R, device=x.device)], saved
    bounds = seg.tolist()  # CPU: the table is already on the host
    y = x.new_empty(R, weights[-1].shape[2])
    saved = [x.new_empty(1, R, w.shape[2]) for w in weights[:-1] for _ in (0, 1)]
    saved = saved[0::2] + saved[1::2]
    for e in range(E):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 > r0:
            y_e, saved_e = _dense_forward(x[None, r0:r1], _member(weights, e), _member(biases, e),
                                          _member(scales, e), activation)
            y[r0:r1] = y_e[0]
            for dst, src in zip(saved, saved_e):
                dst[:, r0:r1] = src
    return y, saved


def _torch_backward(grad_y, x, seg, weights, scales, saved, activation, need_dx, need_params):
    E, R, L = weights[0].shape[0], x.shape[0], len(weights)
    if seg is None:
        B = R // E
        dx, dws, dbs, ds = _dense_backward(grad_y.reshape(E, B, -1), x.reshape(E, B, -1), saved, weights, scales,
                                           activation, need_dx, need_params)
        return dx.reshape(-1, x.shape[1]), dws, dbs, ds
    if _common.device_side(x):
        g_all = grad_y.new_zeros(E, R, grad_y.shape[1])
        g_all[_row_members(seg, R), torch.arange(R, device=x.device)] = grad_y
        dx, dws, dbs, ds = _dense_backward(g_all, x.unsqueeze(0).expand(E, R, x.shape[1]), saved, weights, scales,
                                           activation, need_dx, need_params)
        return (dx.sum(0) if need_dx else dx), dws, dbs, ds
    bounds = seg.tolist()
    dx = x.new_zeros(R if need_dx else 0, x.shape[1])
    dws = [torch.zeros_like(w) for w in weights] if need_params else []
    dbs = [x.new_zeros(E, w.shape[2]) for w in weights] if need_params else []
    ds = x.new_zeros(E, L if need_params else 0)
    for e in range(E):
        r0, r1 = bounds[e], bounds[e + 1]
        if r1 == r0:
            continue
        dxe, dwe, dbe, dse = _dense_backward(grad_y[None, r0:r1], x[None, r0:r1], [t[:, r0:r1] for t in saved],
                                             _member(weights, e), _member(scales, e), activation, need_dx,
                                             need_params)
        if need_dx:
            dx[r0:r1] = dxe[0]
        if need_params:
            for l in range(L):
                dws[l][e] = dwe[l][0]
                dbs[l][e] = dbe[l][0]
            ds[e] = dse[0]
    return dx, dws, dbs, ds


# ----------------------------------------------------------------------------------------------
# implementations and registered ops


def _forward_impl(x, seg, weights, biases, scales, activation, impl, precision):
    """``(y [R, d_L], saved)``: ``saved`` is what the backward reads, a list of tensors: one flat
    buffer of hidden pre-activations (Triton), or per hidden layer its pre- and post-activations
    (torch; see :func:`_torch_forward`)."""
    if impl == "triton":
        from fastrp.kernels import ensemble_mlp as kern

        y, z = kern.mlp_forward(x, seg, weights, biases, scales, activation, precision)
        return y, [z]
    return _torch_forward(x, seg, weights, biases, scales, activation)


def _backward_impl(grad_y, x, seg, weights, scales, saved, activation, impl, precision, need_dx, need_params):
    if impl == "triton":
        from fastrp.kernels import ensemble_mlp as kern

        return kern.mlp_backward(grad_y, x, seg, weights, scales, saved[0], activation, precision, need_dx,
                                 need_params)
    return _torch_backward(grad_y, x, seg, weights, scales, saved, activation, need_dx, need_params)


def _saved_fake(x, seg, weights, impl) -> List[torch.Tensor]:
    R, E = x.shape[0], weights[0].shape[0]
    if impl == "triton":
        return [x.new_empty(R * sum(w.shape[2] for w in weights[:-1]))]
    if seg is None:
        shapes = [(E, R // E, w.shape[2]) for w in weights[:-1]]
    else:
        shapes = [(E if _common.device_side(x) else 1, R, w.shape[2]) for w in weights[:-1]]
    return [x.new_empty(s) for s in shapes + shapes]


@torch.library.custom_op("fastrp::ensemble_mlp_fwd", mutates_args=())
def _mlp_fwd_op(
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    biases: List[Optional[torch.Tensor]],
    scales: List[Optional[torch.Tensor]],
    activation: str,
    impl: str,
    precision: str,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Rows ``x [R, d_0]`` -> ``(y [R, d_L], saved activations)`` (see :func:`_forward_impl`)."""
    return _forward_impl(x, seg, weights, biases, scales, activation, impl, precision)


@_mlp_fwd_op.register_fake
def _(x, seg, weights, biases, scales, activation, impl, precision):
    return x.new_empty(x.shape[0], weights[-1].shape[2]), _saved_fake(x, seg, weights, impl)


@torch.library.custom_op("fastrp::ensemble_mlp_bwd", mutates_args=())
def _mlp_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    scales: List[Optional[torch.Tensor]],
    saved: List[torch.Tensor],
    activation: str,
    impl: str,
    precision: str,
    need_dx: bool,
    need_params: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`_mlp_fwd_op`: ``dx [R, d_0]``, the weight and bias gradients of every
    layer and the scale gradients ``[E, L]``. ``need_dx=False`` skips the first layer's data GEMM
    (``dx`` has 0 rows); ``need_params=False`` skips the weight/bias/scale reductions (empty
    lists, ``ds`` is ``[E, 0]``): the backward of frozen parameters costs no weight-gradient work."""
    return _backward_impl(grad_y, x, seg, weights, scales, saved, activation, impl, precision, need_dx, need_params)


@_mlp_bwd_op.register_fake
def _(grad_y, x, seg, weights, scales, saved, activation, impl, precision, need_dx, need_params):
    E, L = weights[0].shape[0], len(weights)
    dws = [w.new_empty(w.shape) for w in weights] if need_params else []
    dbs = [x.new_empty(E, w.shape[2]) for w in weights] if need_params else []
    return x.new_empty(x.shape[0] if need_dx else 0, x.shape[1]), dws, dbs, x.new_empty(E, L if need_params else 0)


class _EnsembleMLPFunction(torch.autograd.Function):
    """One autograd node per call. ``params`` = weights, then biases, then scales (``L`` each,
    None where a layer has none)."""

    @staticmethod
    def forward(ctx, x, seg, spec, *params):
        L, activation, impl, precision = spec
        weights, biases, scales = list(params[:L]), list(params[L:2 * L]), list(params[2 * L:])
        fwd = torch.ops.fastrp.ensemble_mlp_fwd if is_compiling() else _forward_impl
        y, saved = fwd(x, seg, weights, biases, scales, activation, impl, precision)
        ctx.spec = spec
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, seg, *weights, *scales, *saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        L, activation, impl, precision = ctx.spec
        x, seg, *rest = ctx.saved_tensors
        weights, scales, saved = list(rest[:L]), list(rest[L:2 * L]), list(rest[2 * L:])
        nig = ctx.needs_input_grad
        need_dx, need_params = nig[0], any(nig[3:])
        bwd = torch.ops.fastrp.ensemble_mlp_bwd if is_compiling() else _backward_impl
        dx, dws, dbs, ds = bwd(grad_y, x, seg, weights, scales, saved, activation, impl, precision, need_dx,
                               need_params)
        if not need_params:
            return (dx if need_dx else None, None, None) + (None,) * (3 * L)
        gb = [dbs[l] if ctx.has_bias[l] else None for l in range(L)]
        gs = [ds[:, l] if scales[l] is not None else None for l in range(L)]
        return (dx if need_dx else None, None, None, *dws, *gb, *gs)


def _apply(x2d, seg, weights, biases, scales, activation, impl, precision="ieee") -> torch.Tensor:
    """Run the op on validated rows; returns ``y [R, d_L]``."""
    spec = (len(weights), activation, impl, precision)
    return _EnsembleMLPFunction.apply(x2d, seg, spec, *weights, *biases, *scales)


# ----------------------------------------------------------------------------------------------
# validation (full on the first call of a signature, then a dictionary look-up)


def _validate(x, weights, biases, scales, activation, members, precision):
    """Check every argument; returns ``(E, widths, biases, scales)`` with None lists expanded."""
    check_activation(activation)
    check_precision(precision)
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError("weights must be a non-empty list of [E, d_l, d_{l+1}] tensors")
    grouped = members is not None
    x_layout = "[B, in] (members given)" if grouped else "[E, B, in]"
    check_tensor("x", x, ndim=2 if grouped else 3, what=x_layout)
    dev, dtype = x.device, x.dtype
    w0 = check_tensor("weights[0]", weights[0], ndim=3, device=dev, what="[E, d_0, d_1]")
    E = w0.shape[0]
    if E < 1:
        raise ValueError(f"weights[0] must have at least one member (E >= 1), got shape {tuple(w0.shape)}")
    if not grouped and x.shape[0] != E:
        raise ValueError(f"x must have shape [E={E}, B, in] (E from weights[0]), got shape {tuple(x.shape)}")
    widths, biases, scales = check_layers(weights, biases, scales, E, x.shape[-1], dtype, dev)
    if grouped:
        check_tensor("members", members, shape=[x.shape[0]], dtypes=[torch.int64], device=dev,
                     what=f"[B={x.shape[0]}] int64 member index per row of x")
    return E, widths, biases, scales


def _meta(t):
    return None if t is None else (t.shape, t.dtype, t.device)


def signature(x, weights, biases, scales, members, *options) -> Optional[tuple]:
    """A hashable key of everything validation looks at (shapes, dtypes, devices, options), or
    None when an argument is not of the expected kind (then the full validation explains)."""
    try:
        if type(weights) not in (list, tuple) or (biases is not None and type(biases) not in (list, tuple)) \
                or (scales is not None and type(scales) not in (list, tuple)):
            return None
        return (options, _meta(x), _meta(members), tuple(_meta(w) for w in weights),
                None if biases is None else tuple(_meta(b) for b in biases),
                None if scales is None else tuple(_meta(s) for s in scales))
    except (AttributeError, TypeError):
        return None


class SignatureCache(dict):
    """Validated call signatures -> what validation derived from them (bounded)."""

    def __init__(self, limit: int = 4096):
        super().__init__()
        self.limit = limit

    def remember(self, key, value):
        if key is not None:
            if len(self) >= self.limit:
                self.clear()
            self[key] = value
        return value


_VALIDATED = SignatureCache()


def _prepare(x, weights, biases, scales, activation, members, backend, precision):
    key = signature(x, weights, biases, scales, members, activation, backend, precision)
    hit = _VALIDATED.get(key) if key is not None else None
    if hit is None:
        E, widths, _, _ = _validate(x, weights, biases, scales, activation, members, precision)
        impl = resolve_backend("ensemble_mlp", backend, x.device, _BACKENDS)
        hit = _VALIDATED.remember(key, (E, tuple(widths), impl))
    L = len(weights)
    biases = [None] * L if biases is None else list(biases)
    scales = [None] * L if scales is None else list(scales)
    if members is not None:
        _check_members_range(members, hit[0])
    return hit, biases, scales


def _check_members_range(members: torch.Tensor, E: int) -> None:
    """``members`` must lie in ``[0, E)``. With a host read allowed on CPU: one ``aminmax`` read
    and a ``ValueError``. On CUDA, and while torch.compile traces or a CUDA graph is captured, a
    device-side ``torch._assert_async`` (no host sync; a failure surfaces as a device-side assert
    error, on CPU as a ``RuntimeError``): rows with a member out of range are never computed on
    uninitialised memory silently."""
    if members.numel() == 0:
        return
    if _common.device_side(members) or not value_checks_allowed(members):
        torch._assert_async(((members >= 0) & (members < E)).all(), "members must lie in [0, E)")
        return
    lo, hi = torch.stack(torch.aminmax(members)).tolist()
    if lo < 0 or hi >= E:
        raise ValueError(f"members must lie in [0, E={E}), got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# public API


def ensemble_mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: str = "silu",
    *,
    members: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Ensemble MLP: ``E`` independent MLPs evaluated in one call.

    Args:
        x: ``[E, B, d_0]`` (each member gets its own batch), or ``[B, d_0]`` with ``members``.
        weights: ``L`` tensors ``[E, d_l, d_{l+1}]``.
        biases: ``L`` entries, each ``[E, d_{l+1}]`` or None (``biases=None``: no biases).
        scales: None, or ``L`` entries each ``[E]`` or None: per-member multipliers of the layer's
            matmul, e.g. ``1 / sigma`` from :func:`fastrp.ops.spectral_norm`.
        activation: ``"silu" | "relu" | "tanh"``, applied after every layer but the last.
        members: optional int64 ``[B]`` in ``[0, E)`` (see below). Out-of-range values raise a
            ``ValueError`` on CPU; on CUDA (and under torch.compile) they are checked on the device
            without a host sync (``torch._assert_async``: a device-side assert error).
        backend: None (auto: ``"triton"`` on CUDA; on CPU the torch formulas under plain
            autograd, see :func:`fastrp.ops._common.eager_autograd`), ``"triton"`` or ``"torch"``
            (the op with its explicit backward). ``"triton"`` also runs on CPU tensors under
            ``TRITON_INTERPRET=1``.
        precision: the Triton matmuls' input precision: ``"ieee"`` (exact fp32 products, the
            default), ``"tf32"`` (tensor cores; products of inputs rounded to a 10-bit mantissa)
            or ``"tf32x3"`` (three TF32 products, about fp32 accuracy on tensor cores). The torch
            backend and float64 inputs always compute in full precision.

    Returns:
        ``[E, B, d_L]`` (``[B, d_L]`` with ``members``) where layer ``l`` computes
        ``z = (h @ weights[l]) * scales[l][:, None, None] + biases[l][:, None, :]`` and hidden
        layers apply ``activation(z)``. Differentiable in ``x``, weights, biases and scales.

    Grouped by member (``members=``): in MBPO-style rollouts each sample uses one randomly
    chosen ensemble member. Pass ``x`` as ``[B, d_0]`` and ``members`` as an int64 ``[B]`` tensor of
    member indices; the result is ``[B, d_L]`` with ``y[b] = MLP_{members[b]}(x[b])``. Samples are
    sorted by member and each member's MLP runs only on its own samples, so the cost is that of
    one MLP on ``B`` rows instead of ``E`` MLPs on ``B`` rows each; members that receive no sample
    cost nothing and get zero weight gradients.

    The ``"triton"`` backend runs the whole forward in one fused launch (scale, bias and
    activation fused around the GEMMs; hidden pre-activations kept for the backward) and the
    backward in two (data gradients; per-member weight/bias/scale reductions), reading the
    parameters in place. When that fused grid (16 rows per program) would leave SMs of the GPU
    idle, the forward and the data gradients run one launch per layer instead, each layer's
    columns split across programs (``fastrp.kernels.ensemble_mlp.split_layers``). Inputs must be
    float32 (float64 also works).

    Accuracy against a float64 reference (tested per output and gradient): ``"ieee"`` within 2x
    the float32 torch reference's error; ``"tf32x3"`` within 2x the larger of that and the error
    of the reference done in emulated 3xTF32; ``"tf32"`` within 2x the error of the reference with
    matmul operands truncated to TF32 plus 2^-10 of the largest magnitude (about 1e-3 relative).
    """
    (E, widths, impl), biases, scales = _prepare(x, weights, biases, scales, activation, members, backend, precision)
    if eager_autograd(backend, impl, x):
        if members is None:
            return ensemble_mlp_ref(x, weights, biases, scales, activation)
        return _grouped_autograd(x, members, weights, biases, scales, activation)
    if members is None:
        B = x.shape[1]
        y = _apply(x.reshape(E * B, widths[0]), None, weights, biases, scales, activation, impl, precision)
        return y.view(E, B, widths[-1])
    R = x.shape[0]
    sorted_members, order = torch.sort(members, stable=True)
    seg = torch.searchsorted(sorted_members, torch.arange(E + 1, device=x.device, dtype=members.dtype))
    y_sorted = _apply(x.index_select(0, order), seg, weights, biases, scales, activation, impl, precision)
    return y_sorted.new_empty(R, widths[-1]).index_copy(0, order, y_sorted)


def _grouped_autograd(x, members, weights, biases, scales, activation) -> torch.Tensor:
    """CPU path of the grouped call under plain autograd: rows sorted by member, each member's
    MLP on its own rows only (one host read of the per-member counts, fine on CPU)."""
    E = weights[0].shape[0]
    order = torch.argsort(members, stable=True)
    counts = torch.bincount(members, minlength=E).tolist()
    outs = []
    for e, h in enumerate(x.index_select(0, order).split(counts)):
        for l, w in enumerate(weights):
            if scales[l] is None and biases[l] is not None:
                h = torch.addmm(biases[l][e], h, w[e])
            else:
                h = h @ w[e]
                if scales[l] is not None:
                    h = h * scales[l][e]
                if biases[l] is not None:
                    h = h + biases[l][e]
            if l < len(weights) - 1:
                h = _act(h, activation)
        outs.append(h)
    return torch.cat(outs).index_select(0, torch.argsort(order))


def ensemble_mlp_ref(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]],
    scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
    activation: str = "silu",
    *,
    members: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`ensemble_mlp` (plain autograd), what an eager user writes.

    With ``members``, every member runs on all ``B`` samples and the wanted row is gathered
    (``E`` times the work of the grouped kernel, by design: this is the eager baseline).
    """
    L = len(weights)
    biases = [None] * L if biases is None else list(biases)
    scales = [None] * L if scales is None else list(scales)
    if members is not None:
        E = weights[0].shape[0]
        y_all = ensemble_mlp_ref(x.unsqueeze(0).expand(E, -1, -1), weights, biases, scales, activation)
        return y_all[members, torch.arange(x.shape[0], device=x.device)]
    h = x
    for l in range(L):
        h = ensemble_linear_ref(h, weights[l], biases[l], scales[l])
        if l < L - 1:
            h = _act(h, activation)
    return h
