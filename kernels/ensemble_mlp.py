"""Triton kernels for the fused ensemble MLP (and the single ensemble linear layer, ``L = 1``).

Three kernels, each one launch for the whole network whatever its depth (the two row kernels may
instead run one launch per layer, below):

* ``_mlp_fwd_kernel`` - a program per (member, block of its rows) runs every layer in turn:
  ``z_l = (h_l @ W_l) * s_l + b_l`` with the scale, bias and (on load, for the next layer) the
  activation fused around a K-looped ``tl.dot``. Each hidden pre-activation ``z_l`` is written to a
  scratch buffer that is private to the program (its own rows) and read straight back by the next
  layer after a block barrier, so it lives in L1/L2 between layers; the same buffer is what the
  backward needs, so nothing is recomputed there.
* ``_mlp_bwd_data_kernel`` - same grid, layers in reverse: ``g_l = (dz_l @ W_lᵀ) * s_l`` and
  ``dz_{l-1} = g_l * act'(z_{l-1})`` with the scale and activation derivative fused into the GEMM
  epilogue; ``g_0`` is ``dx`` (skipped when ``x`` needs no gradient).
* ``_mlp_bwd_weight_kernel`` - a program per (member, tile of one layer's weight) reduces over the
  member's rows: ``A = h_lᵀ dz_l`` (with ``h_l = act(z_{l-1})`` applied on load),
  ``dW_l = s_l A``, ``db_l = Σ dz_l``, and a per-tile partial of ``ds_l = ⟨A, W_l⟩``; the partials
  are summed per layer through a cached one-hot ``[T, L]`` table. Deterministic: no atomics. Not
  launched when no weight, bias or scale needs a gradient (frozen parameters).

Filling the GPU: ``tl.dot`` needs at least 16 rows, so the fused row kernels have at most
``E · cdiv(B, 16)`` programs (112 for E = 7, B = 256; 23 for 256 rows grouped by member), fewer than
the 132 SMs of an H200, and a program cannot split a layer's columns with other programs without
a grid-wide exchange before the next layer. When the fused grid would leave SMs idle
(:func:`split_layers`), the launchers run the same kernels once per layer (``FIRST``/``LAST``),
each program computing one ``BLOCK_N``-column block of that layer for its 16 rows
(``COL_BLOCKS`` programs per row block; 16 columns where 32 would still leave SMs idle): 784
programs per hidden layer of the model, the layer boundary being the launch boundary. ``L``
launches instead of one (host time: each is one Triton launch; inside a CUDA graph, one node
each), each of the wide layers' launches filling the SMs.

Parameters are read in place: the per-layer weights, biases and scales are tuple kernel arguments
(a pointer each), so no call concatenates or copies them. The layer widths are compile-time
constants (a tuple ``DIMS``): each network shape compiles its own kernels, the compiler knows every
row stride, and rows whose width is a multiple of 4 are read with 16-byte vector loads. Optional
biases and scales are compile-time bit masks (``BIAS_MASK``, ``SCALE_MASK``).

Rows are described by ``seg[E + 1]``: member ``e`` owns rows ``seg[e]:seg[e + 1]`` of the
row-major activations (the grouped-by-member layout, rows sorted by member, split known only on
the device). The dense ``[E, B, ·]`` layout needs no table: ``DENSE`` programs compute their member
and rows from ``B``. Grid of the row kernels: one axis, ``Σ_e cdiv(rows_e, BLOCK_M)`` programs (at
most ``cdiv(R, BLOCK_M) + E`` grouped, see :func:`row_programs`), so the row count is not bounded
by CUDA's 65535 limit on the second and third grid axes.

Numerics: ``precision`` is ``tl.dot``'s ``input_precision``: ``"ieee"`` (exact fp32 products,
FFMA, the default), ``"tf32"`` (tensor cores, 10-bit mantissa products) or ``"tf32x3"`` (three
TF32 products, close to fp32); float64 inputs always use ``"ieee"``. Activations come from
``kernels/_activations.py``. Launches run under the tensors' CUDA device; the launchers copy
nothing host-to-device (the one-hot table of the weight kernel is built on the device, once per
shape, and cached) and read nothing back, so no call synchronises with the host and a call can be
captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._activations import ACT_CODES
from ._activations import act as _act
from ._activations import act_grad as _act_grad
from ._target import gpu_sms


@triton.jit
def _row_block(pid, seg_ptr, E, B, BLOCK_M: tl.constexpr, DENSE: tl.constexpr):
    """``(member, first row, end row)`` of row block ``pid``. Dense: ``cdiv(B, BLOCK_M)`` blocks per
    member. Grouped: block ``p`` is the ``p``-th when every member's rows ``seg[e]:seg[e+1]`` are
    cut into ``BLOCK_M``-row blocks one member after another; a block past the last one gets an
    empty range."""
    if DENSE:
        b64 = pid * 0 + B  # int64 (B may be specialised to a constant)
        nb = (b64 + BLOCK_M - 1) // BLOCK_M
        e64 = pid // nb
        row_start = e64 * b64 + (pid - e64 * nb) * BLOCK_M
        row_end = (e64 + 1) * b64
        e = e64.to(tl.int32)
    else:
        e = tl.full([], 0, tl.int32)
        row_start = tl.full([], 0, tl.int64)
        row_end = tl.full([], 0, tl.int64)
        first = tl.full([], 0, tl.int64)
        for m in range(0, E):
            s0 = tl.load(seg_ptr + m)
            s1 = tl.load(seg_ptr + m + 1)
            nb = (s1 - s0 + BLOCK_M - 1) // BLOCK_M
            if (pid >= first) & (pid < first + nb):
                e = m
                row_start = s0 + (pid - first) * BLOCK_M
                row_end = s1
            first += nb
    return e, row_start, row_end


@triton.jit
def _fwd_tile(src, dst, w_base, s_ptr, b_ptr, e, rows, rmask, n0,
              K: tl.constexpr, N: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACT_IN: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Output columns ``n0:n0 + BLOCK_N`` of one layer for the block's rows:
    ``dst = (act?(src) @ W) * s + b`` (``act`` on load for hidden inputs)."""
    dty = src.dtype.element_ty
    cols = n0 + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=dty)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(src + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if ACT_IN:
            a = _act(a, ACT)  # act(0) = 0 for every activation: padding stays 0
        w = tl.load(w_base + ks[:, None] * N + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=dty)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + e)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * N + cols, mask=cmask, other=0.0)[None, :]
    tl.store(dst + rows[:, None] * N + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _mlp_fwd_kernel(
    x_ptr, y_ptr, z_ptr, seg_ptr, Ws, Bs, Ss,
    R, E, B,
    DIMS: tl.constexpr, HOFFS: tl.constexpr, NUM_LAYERS: tl.constexpr,
    BIAS_MASK: tl.constexpr, SCALE_MASK: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DENSE: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, COL_BLOCKS: tl.constexpr,
):
    # layers FIRST..LAST-1; COL_BLOCKS > 1 (one layer per launch): program = (row block, column block)
    pid = tl.program_id(0).to(tl.int64)
    e, row_start, row_end = _row_block(pid // COL_BLOCKS, seg_ptr, E, B, BLOCK_M, DENSE)
    if row_start < row_end:
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < row_end
        for l in tl.static_range(FIRST, LAST):
            w_base = Ws[l] + e * (DIMS[l] * DIMS[l + 1])
            if l == 0:
                src = x_ptr
            else:
                src = z_ptr + R * HOFFS[l - 1]
            if l == NUM_LAYERS - 1:
                dst = y_ptr
            else:
                dst = z_ptr + R * HOFFS[l]
            if COL_BLOCKS > 1:
                _fwd_tile(src, dst, w_base, Ss[l], Bs[l], e, rows, rmask, (pid % COL_BLOCKS) * BLOCK_N,
                          DIMS[l], DIMS[l + 1], (SCALE_MASK >> l) & 1, (BIAS_MASK >> l) & 1, l > 0, ACT,
                          BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            else:
                for n0 in range(0, DIMS[l + 1], BLOCK_N):
                    _fwd_tile(src, dst, w_base, Ss[l], Bs[l], e, rows, rmask, n0,
                              DIMS[l], DIMS[l + 1], (SCALE_MASK >> l) & 1, (BIAS_MASK >> l) & 1, l > 0, ACT,
                              BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            tl.debug_barrier()


@triton.jit
def _bwd_tile(src, dst, zp_src, w_base, s_ptr, e, rows, rmask, k0,
              K: tl.constexpr, N: tl.constexpr, HAS_SCALE: tl.constexpr, HIDDEN_IN: tl.constexpr,
              ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr):
    """Input-feature columns ``k0:k0 + BLOCK_N`` of one layer's data gradient for the block's rows:
    ``dst = (src @ Wᵀ) * s``, times ``act'(z)`` of the layer's input when it is a hidden layer."""
    dty = src.dtype.element_ty
    ks = k0 + tl.arange(0, BLOCK_N)
    kmask = ks < K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=dty)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nmask = ns < N
        dz = tl.load(src + rows[:, None] * N + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        wt = tl.load(w_base + ks[None, :] * N + ns[:, None], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(dz, wt, acc, input_precision=PRECISION, out_dtype=dty)
    if HAS_SCALE:
        acc = acc * tl.load(s_ptr + e)
    omask = rmask[:, None] & kmask[None, :]
    if HIDDEN_IN:
        zp = tl.load(zp_src + rows[:, None] * K + ks[None, :], mask=omask, other=0.0)
        acc = acc * _act_grad(zp, ACT)
    tl.store(dst + rows[:, None] * K + ks[None, :], acc, mask=omask)


@triton.jit
def _mlp_bwd_data_kernel(
    g_ptr, dx_ptr, z_ptr, dz_ptr, seg_ptr, Ws, Ss,
    R, E, B,
    DIMS: tl.constexpr, HOFFS: tl.constexpr, NUM_LAYERS: tl.constexpr, SCALE_MASK: tl.constexpr,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DENSE: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr, COL_BLOCKS: tl.constexpr,
):
    # layers LAST-1 down to FIRST (FIRST = 1 skips dx when x needs no gradient); COL_BLOCKS > 1
    # (one layer per launch): program = (row block, block of the layer's input features)
    pid = tl.program_id(0).to(tl.int64)
    e, row_start, row_end = _row_block(pid // COL_BLOCKS, seg_ptr, E, B, BLOCK_M, DENSE)
    if row_start < row_end:
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < row_end
        for l in tl.static_range(LAST - 1, FIRST - 1, -1):
            w_base = Ws[l] + e * (DIMS[l] * DIMS[l + 1])
            if l == NUM_LAYERS - 1:
                src = g_ptr
            else:
                src = dz_ptr + R * HOFFS[l]
            if l == 0:
                dst = dx_ptr
                zp_src = z_ptr  # unused: layer 0's input is x (no activation)
            else:
                dst = dz_ptr + R * HOFFS[l - 1]
                zp_src = z_ptr + R * HOFFS[l - 1]
            # output tile over the layer's input features (k), reduction over its outputs (n)
            if COL_BLOCKS > 1:
                _bwd_tile(src, dst, zp_src, w_base, Ss[l], e, rows, rmask, (pid % COL_BLOCKS) * BLOCK_N,
                          DIMS[l], DIMS[l + 1], (SCALE_MASK >> l) & 1, l > 0, ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                          PRECISION)
            else:
                for k0 in range(0, DIMS[l], BLOCK_N):
                    _bwd_tile(src, dst, zp_src, w_base, Ss[l], e, rows, rmask, k0,
                              DIMS[l], DIMS[l + 1], (SCALE_MASK >> l) & 1, l > 0, ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                              PRECISION)
            tl.debug_barrier()


@triton.jit
def _mlp_bwd_weight_kernel(
    g_ptr, x_ptr, z_ptr, dz_ptr, seg_ptr, dsp_ptr, Ws, Ss, DWs, DBs,
    R, E, B, T,
    DIMS: tl.constexpr, HOFFS: tl.constexpr, TILE_START: tl.constexpr, NUM_LAYERS: tl.constexpr,
    SCALE_MASK: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DENSE: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.program_id(1)
    if DENSE:
        row_start = e.to(tl.int64) * B
        row_end = row_start + B
    else:
        row_start = tl.load(seg_ptr + e)
        row_end = tl.load(seg_ptr + e + 1)
    dty = g_ptr.dtype.element_ty
    for l in tl.static_range(NUM_LAYERS):
        if (t >= TILE_START[l]) & (t < TILE_START[l + 1]):
            n_tiles_n = (DIMS[l + 1] + BLOCK_N - 1) // BLOCK_N
            tt = t - TILE_START[l]
            ks = (tt // n_tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
            kmask = ks < DIMS[l]
            cols = (tt % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            cmask = cols < DIMS[l + 1]
            if l == 0:
                hsrc = x_ptr
            else:
                hsrc = z_ptr + R * HOFFS[l - 1]
            if l == NUM_LAYERS - 1:
                gsrc = g_ptr
            else:
                gsrc = dz_ptr + R * HOFFS[l]
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=dty)
            dbias = tl.zeros([BLOCK_N], dtype=dty)
            for r0 in range(row_start, row_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
                rmask = rows < row_end
                ht = tl.load(hsrc + rows[None, :] * DIMS[l] + ks[:, None],
                             mask=kmask[:, None] & rmask[None, :], other=0.0)
                if l > 0:
                    ht = _act(ht, ACT)
                dz = tl.load(gsrc + rows[:, None] * DIMS[l + 1] + cols[None, :],
                             mask=rmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(ht, dz, acc, input_precision=PRECISION, out_dtype=dty)
                dbias += tl.sum(dz, axis=0)
            w_off = e * (DIMS[l] * DIMS[l + 1]) + ks[:, None] * DIMS[l + 1] + cols[None, :]
            wmask = kmask[:, None] & cmask[None, :]
            wtile = tl.load(Ws[l] + w_off, mask=wmask, other=0.0)
            if (SCALE_MASK >> l) & 1:
                dw = acc * tl.load(Ss[l] + e)
            else:
                dw = acc
            tl.store(DWs[l] + w_off, dw, mask=wmask)
            tl.store(dsp_ptr + e * T + t, tl.sum(tl.sum(acc * wtile, axis=1), axis=0))
            if tt < n_tiles_n:  # the first row of tiles (k0 = 0) writes the bias gradient
                tl.store(DBs[l] + e * DIMS[l + 1] + cols, dbias, mask=cmask)


# ----------------------------------------------------------------------------------------------
# host side

PRECISIONS = ("ieee", "tf32", "tf32x3")


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def row_programs(E: int, R: int, block_m: int, grouped: bool) -> int:
    """Programs of the row kernels' one-axis grid: ``E · cdiv(R / E, block_m)`` for the dense
    layout (``R = E·B``), and the bound ``cdiv(R, block_m) + E`` on ``Σ_e cdiv(rows_e, block_m)``
    for grouped rows (whose split between members is known on the device only)."""
    if grouped:
        return triton.cdiv(R, block_m) + E
    return E * triton.cdiv(R // E, block_m) if E else 0


_LAYOUT: Optional[bool] = None


@contextlib.contextmanager
def forced_layout(split: Optional[bool]):
    """Inside the block the row kernels run split (True), fused (False) or as
    :func:`split_layers` decides (None), e.g. to time both layouts side by side."""
    global _LAYOUT
    previous, _LAYOUT = _LAYOUT, split
    try:
        yield
    finally:
        _LAYOUT = previous


def split_layers(row_grid: int, device: torch.device, split: Optional[bool] = None) -> bool:
    """Whether the row kernels run one launch per layer with the layer's columns split across
    programs (``row_grid x column blocks`` programs each) instead of one launch for the whole
    network (``row_grid`` programs, each running every layer on its rows): on a GPU when the
    fused grid leaves streaming multiprocessors idle (``row_grid`` < SMs, e.g. 112 programs for
    E = 7, B = 256 on a 132-SM H200: ``tl.dot`` needs 16 rows, so rows cannot be cut finer).
    The choice depends on the shapes only, never on whether a CUDA graph is being captured (a
    kernel first compiled during a capture cannot be loaded). ``split`` True / False, or
    :func:`forced_layout`, forces it (the tests run both layouts on the interpreter)."""
    if split is None:
        split = _LAYOUT
    if split is not None:
        return bool(split)
    sms = gpu_sms(device)
    return sms is not None and row_grid < sms


def _launches(num_layers: int, first: int, dims: Sequence[int], block_n: int, split: bool, out_side: int,
              row_grid: int, device: torch.device):
    """``(FIRST, LAST, COL_BLOCKS, BLOCK_N)`` of each launch covering layers ``first..num_layers-1``:
    one launch, or one per layer with ``cdiv(width, BLOCK_N)`` column blocks of the layer's output
    (``out_side=1``, forward) or input (``out_side=0``, data backward) features; a layer whose
    ``block_n``-wide blocks would still leave SMs idle gets 16-column blocks."""
    if not split:
        return [(first, num_layers, 1, block_n)]
    sms = gpu_sms(device)
    out = []
    for l in range(first, num_layers):
        width, bn = dims[l + out_side], block_n
        if sms is not None and row_grid * triton.cdiv(width, bn) < sms:
            bn = 16
        out.append((l, l + 1, triton.cdiv(width, bn), bn))
    return out


def device_guard(device: torch.device):
    """Context that makes ``device`` current for a launch (tensors on ``cuda:1`` and so on)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def tiles(dims: Sequence[int], device: torch.device) -> Tuple[int, int, int, int]:
    """``(BLOCK_M rows, BLOCK_N, BLOCK_K, num_warps)`` of the row kernels. On a GPU, 16-row blocks
    (the smallest ``tl.dot`` tile, so the most programs: each runs the layers one after another)
    and 32 x 32 weight tiles; under the interpreter larger tiles, since its cost is per tile rather
    than per element."""
    widest = max(dims)
    if gpu_sms(device) is not None:
        return 16, _pow2_block(widest, 16, 32), _pow2_block(widest, 16, 32), 4
    return 64, _pow2_block(widest, 16, 128), _pow2_block(widest, 16, 128), 4


def weight_tiles(dims: Sequence[int], device: torch.device) -> Tuple[int, int, int, int]:
    """``(rows per step, BLOCK_N, BLOCK_K, num_warps)`` of the weight-gradient kernel."""
    widest = max(dims)
    if gpu_sms(device) is not None:
        return 32, _pow2_block(widest, 16, 32), _pow2_block(widest, 16, 32), 4
    return 64, _pow2_block(widest, 16, 128), _pow2_block(widest, 16, 128), 4


def hidden_offsets(dims: Sequence[int]) -> Tuple[int, ...]:
    """Offset (in units of rows) of each hidden layer's pre-activations in the flat scratch."""
    offs, acc = [], 0
    for d in dims[1:-1]:
        offs.append(acc)
        acc += d
    return tuple(offs) + (acc,)


_ONEHOT: dict = {}


def _tile_table(dims: Tuple[int, ...], block_k: int, block_n: int, dtype: torch.dtype,
                device: torch.device) -> Tuple[Tuple[int, ...], torch.Tensor]:
    """First weight-gradient tile of each layer (``TILE_START``, ``L + 1`` entries) and the one-hot
    ``[T, L]`` table (``dtype``, cached on ``device``) that sums per-tile partials per layer."""
    starts = [0]
    for l in range(len(dims) - 1):
        starts.append(starts[-1] + triton.cdiv(dims[l], block_k) * triton.cdiv(dims[l + 1], block_n))
    key = (tuple(starts), dtype, str(device))
    onehot = _ONEHOT.get(key)
    if onehot is None:  # built on the device from Python bounds: no host-to-device copy (a sync on CUDA)
        tile = torch.arange(starts[-1], device=device)
        onehot = torch.stack([(tile >= a) & (tile < b) for a, b in zip(starts[:-1], starts[1:])], dim=1).to(dtype)
        _ONEHOT[key] = onehot
    return tuple(starts), onehot


def _mask(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(1 << l for l, t in enumerate(tensors) if t is not None)


def _present_or(tensors: Sequence[Optional[torch.Tensor]], fill: torch.Tensor) -> tuple:
    """A kernel tuple argument: absent entries point at ``fill`` (never read: masked out)."""
    return tuple(fill if t is None else t for t in tensors)


def _dot_precision(precision: str, dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float64 else precision


def mlp_forward(
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    activation: str,
    precision: str = "ieee",
    split: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused forward of the whole MLP in one launch (or one per layer, see :func:`split_layers`).

    ``x``: ``[R, d_0]`` rows; ``seg`` None for the dense layout (``R / E`` rows per member), else
    the ``[E + 1]`` int64 row table of rows grouped by member. Parameters contiguous (read in
    place). Returns ``y [R, d_L]`` and the hidden pre-activations packed flat
    (``[R * Σ_hidden d]``, layer after layer, each ``[R, d]`` row-major) for :func:`mlp_backward`.
    """
    E = weights[0].shape[0]
    dims = (x.shape[1],) + tuple(w.shape[2] for w in weights)
    L = len(weights)
    hoffs = hidden_offsets(dims)
    x = x.contiguous()
    weights = [w.contiguous() for w in weights]  # no copy for parameters (already contiguous)
    biases = [None if b is None else b.contiguous() for b in biases]
    scales = [None if s is None else s.contiguous() for s in scales]
    R = x.shape[0]
    y = x.new_empty(R, dims[-1])
    z = x.new_empty(max(R * hoffs[-1], 1))
    BM, BN, BK, warps = tiles(dims, x.device)
    grouped = seg is not None
    rows = row_programs(E, R, BM, grouped)
    if rows > 0:
        with device_guard(x.device):
            for first, last, cols, bn in _launches(L, 0, dims, BN, split_layers(rows, x.device, split), 1, rows,
                                                   x.device):
                _mlp_fwd_kernel[(rows * cols,)](
                    x, y, z, seg if grouped else x, tuple(weights), _present_or(biases, x), _present_or(scales, x),
                    R, E, R // E if not grouped else 0,
                    DIMS=dims, HOFFS=hoffs, NUM_LAYERS=L, BIAS_MASK=_mask(biases), SCALE_MASK=_mask(scales),
                    ACT=ACT_CODES[activation], BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=BK,
                    PRECISION=_dot_precision(precision, x.dtype), DENSE=not grouped,
                    FIRST=first, LAST=last, COL_BLOCKS=cols, num_warps=warps,
                )
    return y, z[: R * hoffs[-1]]


def mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    seg: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    scales: Sequence[Optional[torch.Tensor]],
    z: torch.Tensor,
    activation: str,
    precision: str = "ieee",
    need_dx: bool = True,
    need_params: bool = True,
    split: Optional[bool] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Backward of :func:`mlp_forward` in two launches (data gradients, then per-member weight
    reductions; the data gradients one launch per layer when :func:`split_layers` says so). Returns ``dx [R, d_0]``, the weight gradients ``[E, d_l, d_{l+1}]`` and bias
    gradients ``[E, d_{l+1}]`` of every layer, and the scale gradients ``[E, L]`` (bias and scale
    gradients for every layer, whether or not it has one).

    ``need_dx=False`` skips the first layer's data GEMM and returns ``dx`` with 0 rows;
    ``need_params=False`` (frozen parameters) skips the weight-reduction launch and returns empty
    lists and an ``[E, 0]`` scale gradient.
    """
    E = weights[0].shape[0]
    dims = (x.shape[1],) + tuple(w.shape[2] for w in weights)
    L = len(weights)
    hoffs = hidden_offsets(dims)
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    weights = [w.contiguous() for w in weights]
    scales = [None if s is None else s.contiguous() for s in scales]
    R = x.shape[0]
    dx = x.new_empty(R if need_dx else 0, dims[0])
    dz = x.new_empty(max(R * hoffs[-1], 1))
    if z.numel() == 0:
        z = dz
    grouped = seg is not None
    seg_arg = seg if grouped else x
    B = R // E if not grouped else 0
    prec = _dot_precision(precision, x.dtype)
    act = ACT_CODES[activation]
    smask = _mask(scales)
    ss = _present_or(scales, x)
    BM, BN, BK, warps = tiles(dims, x.device)
    rows = row_programs(E, R, BM, grouped)
    with device_guard(x.device):
        if rows > 0 and (need_dx or (need_params and L > 1)):
            # layer 0 writes dx: skipped (L - 1 layers) when x needs no gradient
            launches = _launches(L, 0 if need_dx else 1, dims, BN, split_layers(rows, x.device, split), 0, rows,
                                 x.device)
            for first, last, cols, bn in reversed(launches):
                _mlp_bwd_data_kernel[(rows * cols,)](
                    grad_y, dx, z, dz, seg_arg, tuple(weights), ss, R, E, B,
                    DIMS=dims, HOFFS=hoffs, NUM_LAYERS=L, SCALE_MASK=smask, ACT=act,
                    BLOCK_M=BM, BLOCK_N=bn, BLOCK_K=BK, PRECISION=prec, DENSE=not grouped,
                    FIRST=first, LAST=last, COL_BLOCKS=cols, num_warps=warps,
                )
        if not need_params:
            return dx, [], [], x.new_empty(E, 0)
        WM, WN, WK, wwarps = weight_tiles(dims, x.device)
        starts, onehot = _tile_table(dims, WK, WN, x.dtype, x.device)
        T = starts[-1]
        dws = [w.new_empty(w.shape) for w in weights]
        dbs = [x.new_empty(E, d) for d in dims[1:]]
        ds_part = x.new_empty(E, T)
        _mlp_bwd_weight_kernel[(T, E)](
            grad_y, x, z, dz, seg_arg, ds_part, tuple(weights), ss, tuple(dws), tuple(dbs), R, E, B, T,
            DIMS=dims, HOFFS=hoffs, TILE_START=starts, NUM_LAYERS=L, SCALE_MASK=smask, ACT=act,
            BLOCK_M=WM, BLOCK_N=WN, BLOCK_K=WK, PRECISION=prec, DENSE=not grouped, num_warps=wwarps,
        )
    ds = (ds_part.unsqueeze(2) * onehot).sum(1)  # fixed-order sum (no TF32, no atomics)
    return dx, dws, dbs, ds
