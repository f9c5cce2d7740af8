"""Triton kernels for the fused ensemble MLP (and the single ensemble linear layer, ``L = 1``).

Three kernels, each one launch for the whole network whatever its depth:

* ``_mlp_fwd_kernel`` - a program per (member, block of its rows) runs every layer in turn:
  ``z_l = (h_l @ W_l) * s_l + b_l`` with the scale, bias and (on load, for the next layer) the
  activation fused around a K-looped ``tl.dot``. Each hidden pre-activation ``z_l`` is written to a
  scratch buffer that is private to the program (its own rows) and read straight back by the next
  layer after a block barrier, so it lives in L1/L2 between layers; the same buffer is what the
  backward needs, so nothing is recomputed there (see below).
* ``_mlp_bwd_data_kernel`` - same grid, layers in reverse: ``g_l = (dz_l @ W_lᵀ) * s_l`` and
  ``dz_{l-1} = g_l * act'(z_{l-1})`` with the scale and activation derivative fused into the GEMM
  epilogue; ``g_0`` is ``dx`` (skipped when ``x`` needs no gradient).
* ``_mlp_bwd_weight_kernel`` - a program per (member, tile of one layer's weight) reduces over the
  member's rows: ``A = h_lᵀ dz_l`` (with ``h_l = act(z_{l-1})`` applied on load),
  ``dW_l = s_l A``, ``db_l = Σ dz_l``, and a per-tile partial of ``ds_l = ⟨A, W_l⟩``; the partials
  are summed per layer through a cached one-hot ``[T, L]`` table. Deterministic: no
  atomics. Not launched when no weight, bias or scale needs a gradient (frozen parameters).

Grid of the row kernels: one axis, ``Σ_e cdiv(rows_e, BLOCK_M)`` programs (at most
``cdiv(R, BLOCK_M) + E``, see :func:`row_programs`); program ``p`` finds its member and row block
by a scan over ``seg`` (:func:`_row_block`). At most ``E`` programs find no rows (grouped
layout), and the row count is not bounded by CUDA's 65535 limit on the second and third grid axes.

Saving pre-activations instead of recomputing them: the forward has to materialise them anyway
(Triton cannot slice a register tensor along K, so layer l+1 reads layer l's output back tile by
tile), so keeping them costs no extra traffic and saves the backward one GEMM per layer.

Widths: every width is handled by masked, K-looped tiles, so there is no width above which a
per-layer fallback is needed; a very large width only makes the per-program scratch leave L1 for
L2. Rows are described by ``seg[E + 1]``: member ``e`` owns rows ``seg[e]:seg[e + 1]`` of the
row-major activations, which covers both the dense ``[E, B, ·]`` layout (``seg[e] = e·B``) and the
grouped-by-member layout (rows sorted by member).

Per-layer geometry is a runtime int64 table ``meta[L, 6]`` (see :func:`layer_meta`) and the
per-layer weights/biases/scales are packed into flat buffers, so the number of layers is a runtime
value and no Triton tuple arguments are needed (works on Triton 3.6 and later).

Numerics: products are exact fp32 (``input_precision="ieee"``, no TF32) so the results meet the
tolerance rule of the test suite; float64 inputs also work (gradcheck). Activations come from
``kernels/_activations.py`` (``tanh`` evaluated stably near 0). Launches run under the tensors'
CUDA device. The launchers cache two small per-network index tables on the device; the
first call for a network shape copies them host-to-device, so call once before capturing a CUDA
graph (which the Triton JIT needs anyway).
"""

from __future__ import annotations

import contextlib
import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._activations import ACT_CODES
from ._activations import act as _act
from ._activations import act_grad as _act_grad


@triton.jit
def _row_block(seg_ptr, E, BLOCK_M: tl.constexpr):
    """``(member, first row, end row)`` of this program's row block: program ``p`` takes the
    ``p``-th block when every member's rows ``seg[e]:seg[e+1]`` are cut into ``BLOCK_M``-row blocks
    one member after another; a program past the last block gets an empty range."""
    pid = tl.program_id(0).to(tl.int64)
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
def _mlp_fwd_kernel(
    x_ptr, y_ptr, z_ptr, w_ptr, b_ptr, s_ptr, seg_ptr, meta_ptr,
    R, E, L,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    e, row_start, row_end = _row_block(seg_ptr, E, BLOCK_M)
    if row_start < row_end:
        rows64 = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows64 < row_end
        dty = x_ptr.dtype.element_ty
        for l in range(0, L):
            d_in = tl.load(meta_ptr + l * 6 + 0)
            d_out = tl.load(meta_ptr + l * 6 + 1)
            w_base = w_ptr + tl.load(meta_ptr + l * 6 + 2) + e * d_in * d_out
            b_base = b_ptr + tl.load(meta_ptr + l * 6 + 3) + e * d_out
            scale = tl.load(s_ptr + l * E + e)
            if l == 0:
                src = x_ptr
            else:
                src = z_ptr + R * tl.load(meta_ptr + l * 6 + 4)
            if l == L - 1:
                dst = y_ptr
            else:
                dst = z_ptr + R * tl.load(meta_ptr + l * 6 + 5)
            for n0 in range(0, d_out, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                cmask = cols < d_out
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=dty)
                for k0 in range(0, d_in, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    kmask = ks < d_in
                    a = tl.load(src + rows64[:, None] * d_in + ks[None, :],
                                mask=rmask[:, None] & kmask[None, :], other=0.0)
                    if l > 0:
                        a = _act(a, ACT)  # act(0) = 0 for every activation: padding stays 0
                    w = tl.load(w_base + ks[:, None] * d_out + cols[None, :],
                                mask=kmask[:, None] & cmask[None, :], other=0.0)
                    acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=dty)
                bias = tl.load(b_base + cols, mask=cmask, other=0.0)
                out = acc * scale + bias[None, :]
                tl.store(dst + rows64[:, None] * d_out + cols[None, :], out,
                         mask=rmask[:, None] & cmask[None, :])
            tl.debug_barrier()


@triton.jit
def _mlp_bwd_data_kernel(
    g_ptr, dx_ptr, z_ptr, dz_ptr, w_ptr, s_ptr, seg_ptr, meta_ptr,
    R, E, L,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, NEED_DX: tl.constexpr,
):
    e, row_start, row_end = _row_block(seg_ptr, E, BLOCK_M)
    if row_start < row_end:
        rows64 = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows64 < row_end
        dty = g_ptr.dtype.element_ty
        # layer 0 writes dx: skipped (L - 1 layers) when x needs no gradient
        for li in range(0, L - 1 + NEED_DX):
            l = L - 1 - li
            d_in = tl.load(meta_ptr + l * 6 + 0)
            d_out = tl.load(meta_ptr + l * 6 + 1)
            w_base = w_ptr + tl.load(meta_ptr + l * 6 + 2) + e * d_in * d_out
            scale = tl.load(s_ptr + l * E + e)
            if l == L - 1:
                src = g_ptr
            else:
                src = dz_ptr + R * tl.load(meta_ptr + l * 6 + 5)
            if l == 0:
                dst = dx_ptr
                zin = z_ptr
            else:
                dst = dz_ptr + R * tl.load(meta_ptr + l * 6 + 4)
                zin = z_ptr + R * tl.load(meta_ptr + l * 6 + 4)
            # output tile over the layer's input features (k), reduction over its outputs (n)
            for k0 in range(0, d_in, BLOCK_N):
                ks = k0 + tl.arange(0, BLOCK_N)
                kmask = ks < d_in
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=dty)
                for n0 in range(0, d_out, BLOCK_K):
                    ns = n0 + tl.arange(0, BLOCK_K)
                    nmask = ns < d_out
                    dz = tl.load(src + rows64[:, None] * d_out + ns[None, :],
                                 mask=rmask[:, None] & nmask[None, :], other=0.0)
                    wt = tl.load(w_base + ks[None, :] * d_out + ns[:, None],
                                 mask=nmask[:, None] & kmask[None, :], other=0.0)
                    acc = tl.dot(dz, wt, acc, input_precision=PRECISION, out_dtype=dty)
                out = acc * scale
                omask = rmask[:, None] & kmask[None, :]
                if l > 0:
                    zp = tl.load(zin + rows64[:, None] * d_in + ks[None, :], mask=omask, other=0.0)
                    out = out * _act_grad(zp, ACT)
                tl.store(dst + rows64[:, None] * d_in + ks[None, :], out, mask=omask)
            tl.debug_barrier()


@triton.jit
def _mlp_bwd_weight_kernel(
    g_ptr, x_ptr, z_ptr, dz_ptr, w_ptr, dw_ptr, db_ptr, dsp_ptr, seg_ptr, meta_ptr, tiles_ptr, s_ptr,
    R, E, L, T,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.program_id(1)
    l = tl.load(tiles_ptr + t * 3 + 0)
    k0 = tl.load(tiles_ptr + t * 3 + 1)
    n0 = tl.load(tiles_ptr + t * 3 + 2)
    d_in = tl.load(meta_ptr + l * 6 + 0)
    d_out = tl.load(meta_ptr + l * 6 + 1)
    w_off = tl.load(meta_ptr + l * 6 + 2) + e * d_in * d_out
    b_off = tl.load(meta_ptr + l * 6 + 3) + e * d_out
    scale = tl.load(s_ptr + l * E + e)
    if l == 0:
        hsrc = x_ptr
    else:
        hsrc = z_ptr + R * tl.load(meta_ptr + l * 6 + 4)
    if l == L - 1:
        gsrc = g_ptr
    else:
        gsrc = dz_ptr + R * tl.load(meta_ptr + l * 6 + 5)
    row_start = tl.load(seg_ptr + e)
    row_end = tl.load(seg_ptr + e + 1)
    ks = k0 + tl.arange(0, BLOCK_K)
    kmask = ks < d_in
    cols = n0 + tl.arange(0, BLOCK_N)
    cmask = cols < d_out
    dty = g_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=dty)
    dbias = tl.zeros([BLOCK_N], dtype=dty)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        ht = tl.load(hsrc + rows64[None, :] * d_in + ks[:, None],
                     mask=kmask[:, None] & rmask[None, :], other=0.0)
        if l > 0:
            ht = _act(ht, ACT)
        dz = tl.load(gsrc + rows64[:, None] * d_out + cols[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(ht, dz, acc, input_precision=PRECISION, out_dtype=dty)
        dbias += tl.sum(dz, axis=0)
    wmask = kmask[:, None] & cmask[None, :]
    wtile = tl.load(w_ptr + w_off + ks[:, None] * d_out + cols[None, :], mask=wmask, other=0.0)
    tl.store(dw_ptr + w_off + ks[:, None] * d_out + cols[None, :], acc * scale, mask=wmask)
    tl.store(dsp_ptr + e * T + t, tl.sum(tl.sum(acc * wtile, axis=1), axis=0))
    if k0 == 0:
        tl.store(db_ptr + b_off + cols, dbias, mask=cmask)


# ----------------------------------------------------------------------------------------------
# host side


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def row_programs(E: int, R: int, block_m: int, grouped: bool) -> int:
    """Programs of the row kernels' one-axis grid: ``E · cdiv(R / E, block_m)`` for the dense
    layout (``R = E·B``), and the bound ``cdiv(R, block_m) + E`` on ``Σ_e cdiv(rows_e, block_m)``
    for grouped rows (whose split between members is known on the device only)."""
    if grouped:
        return triton.cdiv(R, block_m) + E
    return E * triton.cdiv(R // E, block_m) if E else 0


def device_guard(device: torch.device):
    """Context that makes ``device`` current for a launch (tensors on ``cuda:1`` and so on)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _blocks(dims: Sequence[int], device: torch.device, programs_m32: int) -> Tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N, BLOCK_K) for a network. On GPU, 16-row blocks when 32-row ones
    (``programs_m32`` programs) would leave most SMs idle (the per-row-block programs run the
    layers one after another); under the interpreter larger tiles, since its cost is per tile
    rather than per element."""
    widest = max(dims)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        bm = 16 if programs_m32 < sms else 32
        return bm, _pow2_block(widest, 16, 64), _pow2_block(widest, 16, 32)
    return 64, _pow2_block(widest, 16, 128), _pow2_block(widest, 16, 128)


@functools.lru_cache(maxsize=256)
def _meta_cpu(E: int, dims: Tuple[int, ...]) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    L = len(dims) - 1
    rows: List[List[int]] = []
    w_off = b_off = h_off = 0
    h_offsets = []
    for l in range(L):
        d_in, d_out = dims[l], dims[l + 1]
        prev_h = h_offsets[l - 1] if l > 0 else 0
        this_h = h_off if l < L - 1 else 0
        rows.append([d_in, d_out, w_off, b_off, prev_h, this_h])
        h_offsets.append(this_h)
        w_off += E * d_in * d_out
        b_off += E * d_out
        if l < L - 1:
            h_off += d_out
    return torch.tensor(rows, dtype=torch.int64).reshape(-1), (w_off, b_off, h_off)


_DEVICE_CACHE: dict = {}


def layer_meta(E: int, dims: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """Per-layer int64 table ``[L * 6]`` (``d_in, d_out, weight offset, bias offset, hidden
    offset of the layer input, hidden offset of its output``; hidden offsets are in units of
    rows) on ``device`` (cached, so repeated calls copy nothing host-to-device), and the total
    sizes ``(weights, biases, hidden width)``."""
    table, sizes = _meta_cpu(E, tuple(dims))
    key = ("meta", E, tuple(dims), str(device))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = table.to(device)
    return _DEVICE_CACHE[key], sizes


def _weight_tiles(dims: Tuple[int, ...], block_k: int, block_n: int, dtype: torch.dtype,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight-gradient tiles ``[T * 3]`` (``layer, k0, n0``) and the one-hot ``[T, L]`` table
    (``dtype``) that sums per-tile partials into per-layer values, both cached on ``device``."""
    key = ("tiles", tuple(dims), block_k, block_n, dtype, str(device))
    if key not in _DEVICE_CACHE:
        tiles = []
        for l in range(len(dims) - 1):
            for k0 in range(0, dims[l], block_k):
                for n0 in range(0, dims[l + 1], block_n):
                    tiles.append([l, k0, n0])
        t = torch.tensor(tiles, dtype=torch.int64)
        onehot = torch.nn.functional.one_hot(t[:, 0], len(dims) - 1).to(dtype)
        _DEVICE_CACHE[key] = (t.reshape(-1).to(device), onehot.to(device))
    return _DEVICE_CACHE[key]


def pack_params(
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat weight / bias buffers (layer after layer, each ``[E, d_in, d_out]`` / ``[E, d_out]``
    row-major; a missing bias is zeros) and a ``[L, E]`` scale table (missing scale = 1)."""
    E = weights[0].shape[0]
    w = torch.cat([wi.reshape(-1) for wi in weights])
    b = torch.cat([
        (bi if bi is not None else wi.new_zeros(E, wi.shape[2])).reshape(-1)
        for wi, bi in zip(weights, biases)
    ])
    s = torch.stack([si if si is not None else wi.new_ones(E) for wi, si in zip(weights, scales)])
    return w, b, s.contiguous()


def mlp_forward(
    x: torch.Tensor,
    seg: torch.Tensor,
    grouped: bool,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    activation: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward of the whole MLP in one launch.

    ``x``: ``[R, d_0]`` rows, member ``e`` owning rows ``seg[e]:seg[e+1]`` (``grouped``: rows
    grouped by member, any split; otherwise ``R / E`` rows each). Returns ``y [R, d_L]``, the
    hidden pre-activations packed flat (``[R * Σ_hidden d]``), and the packed weights and
    ``[L, E]`` scales of :func:`pack_params` (for :func:`mlp_backward`, which then packs nothing).
    """
    E = weights[0].shape[0]
    dims = (x.shape[1],) + tuple(int(w.shape[2]) for w in weights)
    L = len(weights)
    meta, (_, _, hidden) = layer_meta(E, dims, x.device)
    w, b, s = pack_params(weights, biases, scales)
    x = x.contiguous()
    R = x.shape[0]
    y = x.new_empty(R, dims[-1])
    z = x.new_empty(max(R * hidden, 1))
    BM, BN, BK = _blocks(dims, x.device, row_programs(E, R, 32, grouped))
    grid = (row_programs(E, R, BM, grouped),)
    if grid[0] > 0:
        with device_guard(x.device):
            _mlp_fwd_kernel[grid](
                x, y, z, w, b, s, seg, meta, R, E, L,
                ACT=ACT_CODES[activation], BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PRECISION="ieee",
            )
    return y, z[: R * hidden], w, s


def mlp_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    seg: torch.Tensor,
    grouped: bool,
    weights: Sequence[torch.Tensor],
    w: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    activation: str,
    need_dx: bool = True,
    need_params: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`mlp_forward` in two launches (data gradients, then per-member weight
    reductions). ``weights`` give the shapes; ``w`` / ``s`` are the packed weights and scales
    returned by :func:`mlp_forward`. Returns ``dx [R, d_0]``, the weight gradients packed flat like
    :func:`pack_params` packs the weights, the bias gradients packed flat and the scale gradients
    ``[E, L]`` (bias and scale gradients for every layer, whether or not it has one).

    ``need_dx=False`` skips the first layer's data GEMM and returns ``dx`` with 0 rows;
    ``need_params=False`` (frozen parameters) skips the weight-reduction launch and returns the
    three parameter gradients with 0 elements (``ds`` as ``[E, 0]``).
    """
    E = weights[0].shape[0]
    dims = (x.shape[1],) + tuple(int(w.shape[2]) for w in weights)
    L = len(weights)
    meta, (n_w, n_b, hidden) = layer_meta(E, dims, x.device)
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    z = z.contiguous()
    R = x.shape[0]
    dx = x.new_empty(R if need_dx else 0, dims[0])
    dz = x.new_empty(max(R * hidden, 1))
    if z.numel() == 0:
        z = dz
    BM, BN, BK = _blocks(dims, x.device, row_programs(E, R, 32, grouped))
    prec = "ieee"  # exact fp32 products: the tolerance rule holds; no TF32
    act = ACT_CODES[activation]
    grid = (row_programs(E, R, BM, grouped),)
    with device_guard(x.device):
        if grid[0] > 0 and (need_dx or (need_params and L > 1)):
            _mlp_bwd_data_kernel[grid](
                grad_y, dx, z, dz, w, s, seg, meta, R, E, L,
                ACT=act, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PRECISION=prec, NEED_DX=int(need_dx),
            )
        if not need_params:
            return dx, x.new_empty(0), x.new_empty(0), x.new_empty(E, 0)
        # weight tiles: [WK (layer inputs) x WN (layer outputs)], the member's rows reduced WM at
        # a time (independent of the forward's row block: here rows are the reduction dimension)
        WK = WN = BN
        WM = 32 if x.is_cuda else 64
        tiles, onehot = _weight_tiles(dims, WK, WN, x.dtype, x.device)
        T = onehot.shape[0]
        dw = x.new_empty(n_w)
        db = x.new_empty(n_b)
        ds_part = x.new_empty(E, T)
        _mlp_bwd_weight_kernel[(T, E)](
            grad_y, x, z, dz, w, dw, db, ds_part, seg, meta, tiles, s, R, E, L, T,
            ACT=act, BLOCK_M=WM, BLOCK_N=WN, BLOCK_K=WK, PRECISION=prec,
        )
    ds = (ds_part.unsqueeze(2) * onehot).sum(1)  # fixed-order sum (no TF32, no atomics)
    return dx, dw, db, ds
