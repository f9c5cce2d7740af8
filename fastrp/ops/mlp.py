"""Ensemble MLP: ``ensemble_mlp`` (fused Triton forward + backward, or torch) and its reference.

Layers of the op, per ``shared/style.md``:

* kernels and host launchers: ``fastrp.kernels.ensemble_mlp`` (imported lazily, so fastrp imports
  without triton);
* the torch backend: :func:`_torch_forward` / :func:`_torch_backward`, explicit ``bmm`` formulas;
* registered ops ``fastrp::ensemble_mlp_fwd`` / ``fastrp::ensemble_mlp_bwd`` (``torch.library``
  custom ops with fake implementations, autograd wired with ``register_autograd``), so
  ``torch.compile(fullgraph=True)`` traces through the op;
* the public function :func:`ensemble_mlp` (validation, backend choice, the grouped-by-member
  sort) and the pure-torch reference :func:`ensemble_mlp_ref`.

The op works on rows ``x2d [R, d_0]`` plus an optional segment table ``seg [E + 1]`` (member ``e``
owns rows ``seg[e]:seg[e+1]``); ``seg=None`` means the dense layout, ``R = E·B`` rows with member
``e`` owning rows ``e·B:(e+1)·B``. :func:`fastrp.ops.ensemble_linear` is the same op with one layer.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import (
    act as _act,
    act_backward as _act_backward,
    check_activation,
    check_layers,
    check_tensor,
    eager_autograd,
    resolve_backend,
    value_checks_allowed,
)
from .linear import ensemble_linear_ref

__all__ = ["ensemble_mlp", "ensemble_mlp_ref"]

_BACKENDS = ("triton", "torch")


# ----------------------------------------------------------------------------------------------
# torch backend: explicit formulas, writing into the packed outputs of the registered ops


def _segments(seg: Optional[torch.Tensor], E: int, R: int) -> List[Tuple[int, int]]:
    """Row range of each member. Grouped rows read ``seg`` back to the host (one sync per call;
    the torch backend is the CPU path, where that costs nothing)."""
    if seg is None:
        B = R // E
        return [(e * B, (e + 1) * B) for e in range(E)]
    bounds = seg.tolist()
    return [(bounds[e], bounds[e + 1]) for e in range(E)]


class _Rows:
    """Views of row-major ``[R, d]`` activations per member: dense ``[E, B, d]`` (``seg=None``)
    or grouped rows with member ``e`` owning ``bounds[e]``."""

    def __init__(self, seg: Optional[torch.Tensor], E: int, R: int):
        self.dense = seg is None
        self.E, self.R = E, R
        self.bounds = _segments(seg, E, R)

    def view(self, t: torch.Tensor, d: int) -> torch.Tensor:
        return t.view(self.E, self.R // self.E, d) if self.dense else t.view(self.R, d)

    def matmul_into(self, out, a, b, transpose_a=False, transpose_b=False):
        """``out[e] = a[e] @ b[e]`` per member (``a``/``b`` rows or weights, optionally transposed)."""
        if self.dense:
            torch.bmm(a.transpose(1, 2) if transpose_a else a, b.transpose(1, 2) if transpose_b else b, out=out)
            return
        for e, (r0, r1) in enumerate(self.bounds):
            if transpose_a:  # a: rows, b: rows -> out[e] weight-shaped
                torch.mm(a[r0:r1].T, b[r0:r1], out=out[e])
            else:  # a: rows, b: weights -> out rows
                torch.mm(a[r0:r1], b[e].T if transpose_b else b[e], out=out[r0:r1])

    def scale_rows_(self, t, s):
        if self.dense:
            t.mul_(s[:, None, None])
        else:
            for e, (r0, r1) in enumerate(self.bounds):
                t[r0:r1].mul_(s[e])

    def add_bias_(self, t, b):
        if self.dense:
            t.add_(b[:, None, :])
        else:
            for e, (r0, r1) in enumerate(self.bounds):
                t[r0:r1].add_(b[e])

    def sum_rows_into(self, out, t):
        if self.dense:
            torch.sum(t, 1, out=out)
        else:
            for e, (r0, r1) in enumerate(self.bounds):
                torch.sum(t[r0:r1], 0, out=out[e])


def _torch_forward(x, seg, weights, biases, scales, activation):
    E, R, L = weights[0].shape[0], x.shape[0], len(weights)
    dims = [x.shape[1]] + [int(w.shape[2]) for w in weights]
    rows = _Rows(seg, E, R)
    x = x.contiguous()
    y = x.new_empty(R, dims[-1])
    zflat = x.new_empty(R * sum(dims[1:-1]))
    h, off = rows.view(x, dims[0]), 0
    for l in range(L):
        d = dims[l + 1]
        z = rows.view(y if l == L - 1 else zflat[off:off + R * d], d)
        rows.matmul_into(z, h, weights[l])
        if scales[l] is not None:
            rows.scale_rows_(z, scales[l])
        if biases[l] is not None:
            rows.add_bias_(z, biases[l])
        if l < L - 1:
            h = _act(z, activation)
            off += R * d
    return y, zflat


def _torch_backward(grad_y, x, seg, weights, scales, zflat, activation, need_dx, need_params):
    E, R, L = weights[0].shape[0], x.shape[0], len(weights)
    dims = [x.shape[1]] + [int(w.shape[2]) for w in weights]
    rows = _Rows(seg, E, R)
    x, zflat = x.contiguous(), zflat.contiguous()
    dx = x.new_empty(R if need_dx else 0, dims[0])
    dw = x.new_empty(sum(w.numel() for w in weights) if need_params else 0)
    db = x.new_empty(E * sum(dims[1:]) if need_params else 0)
    ds = x.new_zeros(E, L if need_params else 0)
    z_offs = [0]
    for l in range(L - 1):
        z_offs.append(z_offs[-1] + R * dims[l + 1])
    w_offs, b_offs = [0], [0]
    for l in range(L):
        w_offs.append(w_offs[-1] + E * dims[l] * dims[l + 1])
        b_offs.append(b_offs[-1] + E * dims[l + 1])
    dz = rows.view(grad_y.contiguous(), dims[-1])
    for l in reversed(range(L)):
        d_in, d_out = dims[l], dims[l + 1]
        w, s = weights[l], scales[l]
        if l == 0:
            z_in, h = None, rows.view(x, d_in)
        else:
            z_in = rows.view(zflat[z_offs[l - 1]:z_offs[l]], d_in)
            h = _act(z_in, activation)
        if need_params:
            dw_l = dw[w_offs[l]:w_offs[l + 1]].view(E, d_in, d_out)
            rows.matmul_into(dw_l, h, dz, transpose_a=True)  # A = h^T dz
            rows.sum_rows_into(db[b_offs[l]:b_offs[l + 1]].view(E, d_out), dz)
            if s is not None:
                ds[:, l] = (dw_l * w).sum((1, 2))  # <A, W>
                dw_l.mul_(s[:, None, None])
        if l == 0 and not need_dx:
            break
        g = rows.view(dx, d_in) if l == 0 else torch.empty_like(h)
        rows.matmul_into(g, dz, w, transpose_b=True)  # dz W^T
        if s is not None:
            rows.scale_rows_(g, s)
        if l > 0:
            dz = _act_backward(g, z_in, h, activation)
    return dx, dw, db, ds


# ----------------------------------------------------------------------------------------------
# registered ops


@functools.lru_cache(maxsize=None)
def _dense_seg(E: int, R: int, device: torch.device) -> torch.Tensor:
    """``seg`` of the dense layout (member ``e`` owns rows ``e·B:(e+1)·B``), cached per shape so
    the forward and backward launch no ``arange``. Never evicted (a few bytes per shape): a table
    re-created inside a CUDA-graph trees' warm-up would be allocated in their private pool."""
    B = R // E
    return torch.arange(E + 1, device=device, dtype=torch.int64) * B


def _expand(present: List[torch.Tensor], layers: List[int], L: int) -> List[Optional[torch.Tensor]]:
    full: List[Optional[torch.Tensor]] = [None] * L
    for t, l in zip(present, layers):
        full[l] = t
    return full


# Optional biases / scales travel as the list of present tensors plus their layer indices: a
# ``Tensor?[]`` argument holding None is not differentiable through ``register_autograd``.


@torch.library.custom_op("fastrp::ensemble_mlp_fwd", mutates_args=())
def _mlp_fwd_op(
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    biases: List[torch.Tensor],
    bias_layers: List[int],
    scales: List[torch.Tensor],
    scale_layers: List[int],
    activation: str,
    impl: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``x [R, d_0]`` -> ``(y [R, d_L], hidden pre-activations packed flat, packed weights,
    packed scales)``. The Triton backend returns the flat weight buffer and the ``[L, E]`` scale
    table its kernels read, so the backward reuses them instead of packing again; the torch
    backend returns them empty."""
    L = len(weights)
    b_full, s_full = _expand(biases, bias_layers, L), _expand(scales, scale_layers, L)
    if impl == "triton":
        from fastrp.kernels import ensemble_mlp as kern

        E, R = weights[0].shape[0], x.shape[0]
        seg_t = _dense_seg(E, R, x.device) if seg is None else seg
        return kern.mlp_forward(x, seg_t, seg is not None, weights, b_full, s_full, activation)
    y, zflat = _torch_forward(x, seg, weights, b_full, s_full, activation)
    return y, zflat, x.new_empty(0), x.new_empty(0, 0)


@_mlp_fwd_op.register_fake
def _(x, seg, weights, biases, bias_layers, scales, scale_layers, activation, impl):
    R, E, L = x.shape[0], weights[0].shape[0], len(weights)
    hidden = sum(int(w.shape[2]) for w in weights[:-1])
    triton = impl == "triton"
    return (x.new_empty(R, weights[-1].shape[2]), x.new_empty(R * hidden),
            x.new_empty(sum(w.numel() for w in weights) if triton else 0), x.new_empty((L, E) if triton else (0, 0)))


@torch.library.custom_op("fastrp::ensemble_mlp_bwd", mutates_args=())
def _mlp_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: List[torch.Tensor],
    scales: List[torch.Tensor],
    scale_layers: List[int],
    zflat: torch.Tensor,
    w_packed: torch.Tensor,
    s_packed: torch.Tensor,
    activation: str,
    impl: str,
    need_dx: bool,
    need_params: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_mlp_fwd_op` for every layer, packed: ``dx [R, d_0]``, the weight
    gradients flat (layer after layer, each ``[E, d_l, d_{l+1}]``), the bias gradients flat
    (``[E, d_{l+1}]`` each) and the scale gradients ``[E, L]``. Packed outputs let the fused
    backward write straight into them; :func:`_backward` splits them into views. ``w_packed`` /
    ``s_packed`` are the packed parameters returned by the Triton forward (unused by torch).

    ``need_dx=False`` skips the first layer's data GEMM (``dx`` has 0 rows); ``need_params=False``
    skips the weight/bias/scale reductions (those three outputs have 0 elements, ``ds`` is
    ``[E, 0]``): the backward of frozen parameters costs no weight-gradient work."""
    s_full = _expand(scales, scale_layers, len(weights))
    if impl == "triton":
        from fastrp.kernels import ensemble_mlp as kern

        E, R = weights[0].shape[0], x.shape[0]
        seg_t = _dense_seg(E, R, x.device) if seg is None else seg
        return kern.mlp_backward(grad_y, x, seg_t, seg is not None, weights, w_packed, s_packed, zflat, activation,
                                 need_dx, need_params)
    return _torch_backward(grad_y, x, seg, weights, s_full, zflat, activation, need_dx, need_params)


@_mlp_bwd_op.register_fake
def _(grad_y, x, seg, weights, scales, scale_layers, zflat, w_packed, s_packed, activation, impl, need_dx, need_params):
    E, L = weights[0].shape[0], len(weights)
    n_w = sum(w.numel() for w in weights) if need_params else 0
    n_b = E * sum(int(w.shape[2]) for w in weights) if need_params else 0
    return (x.new_empty(x.shape[0] if need_dx else 0, x.shape[1]), x.new_empty(n_w), x.new_empty(n_b),
            x.new_empty(E, L if need_params else 0))


def _setup_context(ctx, inputs, output):
    x, seg, weights, biases, bias_layers, scales, scale_layers, activation, impl = inputs
    _, zflat, w_packed, s_packed = output
    ctx.mark_non_differentiable(zflat, w_packed, s_packed)
    ctx.save_for_backward(x, seg, zflat, w_packed, s_packed, *weights, *scales)
    ctx.bias_layers = list(bias_layers)
    ctx.scale_layers = list(scale_layers)
    ctx.activation = activation
    ctx.impl = impl
    ctx.L = len(weights)


def _any(flag) -> bool:
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _needs(ctx) -> Tuple[bool, bool]:
    """``(x needs a gradient, some weight / bias / scale does)`` from ``ctx.needs_input_grad``
    (one entry per op argument, a list of flags for a list argument); both True when its layout
    is not that."""
    nig = ctx.needs_input_grad
    if len(nig) != 9:
        return True, True
    return _any(nig[0]), _any(nig[2]) or _any(nig[3]) or _any(nig[5])


def _backward(ctx, grad_y, grad_z, grad_w_packed, grad_s_packed):
    x, seg, zflat, w_packed, s_packed, *rest = ctx.saved_tensors
    weights, scales = list(rest[: ctx.L]), list(rest[ctx.L:])
    if grad_y is None:
        grad_y = x.new_zeros(x.shape[0], weights[-1].shape[2])
    need_dx, need_params = _needs(ctx)
    dx, dw, db, ds = _mlp_bwd_op(
        grad_y, x, seg, weights, scales, ctx.scale_layers, zflat, w_packed, s_packed, ctx.activation, ctx.impl,
        need_dx, need_params,
    )
    no_grad_b = [] if not ctx.bias_layers else None
    no_grad_s = [] if not ctx.scale_layers else None
    if not need_params:
        return (dx if need_dx else None, None, [None] * ctx.L, [None] * len(ctx.bias_layers), no_grad_b,
                [None] * len(ctx.scale_layers), no_grad_s, None, None)
    dws, dbs, wo, bo = [], [], 0, 0
    for w in weights:
        E, d_in, d_out = w.shape
        dws.append(dw[wo:wo + E * d_in * d_out].view(E, d_in, d_out))
        dbs.append(db[bo:bo + E * d_out].view(E, d_out))
        wo += E * d_in * d_out
        bo += E * d_out
    dbs = [dbs[l] for l in ctx.bias_layers]
    dss = [ds[:, l] for l in ctx.scale_layers]
    # an empty int list is flattened like an (empty) tensor list, so its "gradient" is [] too
    return dx if need_dx else None, None, dws, dbs, no_grad_b, dss, no_grad_s, None, None


torch.library.register_autograd("fastrp::ensemble_mlp_fwd", _backward, setup_context=_setup_context)


def _apply(
    x2d: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    activation: str,
    impl: str,
) -> torch.Tensor:
    """Run the registered op on validated rows; returns ``y [R, d_L]``."""
    bias_layers = [l for l, b in enumerate(biases) if b is not None]
    scale_layers = [l for l, s in enumerate(scales) if s is not None]
    y, _, _, _ = _mlp_fwd_op(
        x2d, seg, list(weights),
        [biases[l] for l in bias_layers], bias_layers,
        [scales[l] for l in scale_layers], scale_layers,
        activation, impl,
    )
    return y


# ----------------------------------------------------------------------------------------------
# validation


def _validate(x, weights, biases, scales, activation, members):
    """Check every argument; returns ``(E, widths, biases, scales)`` with None lists expanded."""
    check_activation(activation)
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
        _check_members_range(members, E)
    return E, widths, biases, scales


def _check_members_range(members: torch.Tensor, E: int) -> None:
    """``members`` must lie in ``[0, E)``. With a host read allowed on CPU: one ``aminmax`` read
    and a ``ValueError``. On CUDA, and while torch.compile traces or a CUDA graph is captured, a
    device-side ``torch._assert_async`` (no host sync; a failure surfaces as a device-side assert
    error, on CPU as a ``RuntimeError``): rows with a member out of range are never computed on
    uninitialised memory silently."""
    if members.numel() == 0:
        return
    if members.is_cuda or not value_checks_allowed(members):
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
            (the registered op with its explicit backward). ``"triton"`` also runs on CPU tensors
            under ``TRITON_INTERPRET=1``.

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
    backward in two (data gradients; per-member weight/bias/scale reductions). Matmuls use exact
    fp32 (``input_precision="ieee"``). Inputs must be float32 (float64 also works).
    """
    E, widths, biases, scales = _validate(x, weights, biases, scales, activation, members)
    impl = resolve_backend("ensemble_mlp", backend, x.device, _BACKENDS)
    if eager_autograd(backend, impl, x):
        if members is None:
            return ensemble_mlp_ref(x, weights, biases, scales, activation)
        return _grouped_autograd(x, members, weights, biases, scales, activation)
    if members is None:
        B = x.shape[1]
        y = _apply(x.reshape(E * B, widths[0]), None, weights, biases, scales, activation, impl)
        return y.view(E, B, widths[-1])
    R = x.shape[0]
    sorted_members, order = torch.sort(members, stable=True)
    seg = torch.searchsorted(sorted_members, torch.arange(E + 1, device=x.device, dtype=members.dtype))
    y_sorted = _apply(x.index_select(0, order), seg, weights, biases, scales, activation, impl)
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
