"""Fused Triton forward of ``ensemble_mlp_jvp``: the MLP output and K forward-mode tangents.

One launch computes the whole MLP. A program owns one ensemble member and a block of
``BLOCK_B`` batch rows; it stacks each primal row with its K tangent rows into one row group
(slot 0 = primal, slots 1..K = tangents, padded to ``GROUP`` = next power of two of K + 1), so
every weight tile is loaded once and multiplied into all 1 + K rows with a single exact fp32
``tl.dot``. The epilogue of a hidden layer reads the primal pre-activation ``z`` of each group
and applies ``h' = act(z)`` to slot 0 and ``t' = act'(z) * (t W) s`` to the tangent slots.

Between layers the pre-activations of a program (slot 0 ``z``, tangent slots ``w = (t W) s``) go
to a buffer ``[L - 1, E, B, K + 1, DMAX]`` that is private to the program (written and re-read by
the same program, so it stays in L1/L2 on the GPU); the next layer applies ``act(z)`` and
``act'(z) * w`` on load. The buffer is returned: it is what the backward needs, so the backward
recomputes no GEMM. The layer loop runs inside the kernel, so there is no width threshold and no
per-layer launch. The number
of layers is a compile-time constant: weights, biases and scales are passed as tuple kernel
arguments, and bit masks say which biases and scales are present.

The backward of the op does not use a Triton kernel; see ``fastrp/ops/jvp.py``. ``PRECISION`` is
``tl.dot``'s input precision (``"ieee"``, ``"tf32"``, ``"tf32x3"``; float64 always ``"ieee"``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._activations import ACT_CODES
from ._activations import act_and_grad as _act_and_grad
from ._target import gpu_sms
from .ensemble_mlp import device_guard


@triton.jit
def _mlp_jvp_fwd_kernel(
    x_ptr, t_ptr, y_ptr, jy_ptr, scratch_ptr,
    Ws, Bs, Ss,
    B, K,
    DIMS: tl.constexpr, DMAX: tl.constexpr,
    NUM_LAYERS: tl.constexpr, BIAS_MASK: tl.constexpr, SCALE_MASK: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_b = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    ROWS: tl.constexpr = BLOCK_B * GROUP
    dtype = x_ptr.dtype.element_ty

    # Row r of the stacked tile is slot j = r % GROUP of batch row b = b0 + r // GROUP.
    r = tl.arange(0, ROWS)
    b = pid_b * BLOCK_B + r // GROUP
    j = r % GROUP
    row_ok = (b < B) & (j <= K)
    is_primal = j == 0
    # Buffer row of (member e, batch row b, slot j) in a [E, B, K + 1, DMAX] layer block, and of
    # the primal slot of the same batch row.
    prow = (e * B + b) * (K + 1) * DMAX
    srow = prow + j * DMAX
    buf_stride = tl.num_programs(1).to(tl.int64) * B * (K + 1) * DMAX

    ks = tl.arange(0, BLOCK_K)
    ns = tl.arange(0, BLOCK_N)
    # 3-d view [BLOCK_B, GROUP, BLOCK_N] of the output tile for the epilogue.
    j3 = tl.arange(0, GROUP)[None, :, None]
    b3 = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
    n3 = tl.arange(0, BLOCK_N)[None, None, :]
    ok3 = (b3 < B) & (j3 <= K)

    for layer in tl.static_range(NUM_LAYERS):
        din = DIMS[layer]
        dout = DIMS[layer + 1]
        w_base = Ws[layer] + e * din * dout
        if layer == 0:
            h_rows = x_ptr + (e * B + b) * din
            t_rows = t_ptr + ((e * B + b) * K + tl.maximum(j - 1, 0)) * din
        else:
            in_rows = scratch_ptr + (layer - 1) * buf_stride + srow
            primal_rows = scratch_ptr + (layer - 1) * buf_stride + prow
        if (SCALE_MASK >> layer) & 1:
            s = tl.load(Ss[layer] + e)
        for n0 in range(0, dout, BLOCK_N):
            n = n0 + ns
            acc = tl.zeros([ROWS, BLOCK_N], dtype=dtype)
            for k0 in range(0, din, BLOCK_K):
                k = k0 + ks
                kmask = k[None, :] < din
                if layer == 0:
                    a = tl.load(h_rows[:, None] + k[None, :], mask=row_ok[:, None] & is_primal[:, None] & kmask,
                                other=0.0)
                    a += tl.load(t_rows[:, None] + k[None, :],
                                 mask=row_ok[:, None] & (j[:, None] > 0) & kmask, other=0.0)
                else:
                    zw = tl.load(in_rows[:, None] + k[None, :], mask=row_ok[:, None] & kmask, other=0.0)
                    zp = tl.load(primal_rows[:, None] + k[None, :], mask=row_ok[:, None] & kmask, other=0.0)
                    h, dh = _act_and_grad(zp, ACT)
                    a = tl.where(is_primal[:, None], h, dh * zw)
                w = tl.load(w_base + k[:, None] * dout + n[None, :],
                            mask=(k[:, None] < din) & (n[None, :] < dout), other=0.0)
                acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=dtype)
            acc3 = tl.reshape(acc, [BLOCK_B, GROUP, BLOCK_N])
            if (SCALE_MASK >> layer) & 1:
                acc3 = acc3 * s
            nn = n0 + n3
            mask3 = ok3 & (nn < dout)
            z = tl.sum(tl.where(j3 == 0, acc3, 0.0), axis=1)[:, None, :]
            if (BIAS_MASK >> layer) & 1:
                z += tl.load(Bs[layer] + e * dout + nn, mask=nn < dout, other=0.0)
            if layer == NUM_LAYERS - 1:
                tl.store(y_ptr + (e * B + b3) * dout + nn, z, mask=(b3 < B) & (nn < dout))
                tl.store(jy_ptr + ((e * B + b3) * K + tl.maximum(j3 - 1, 0)) * dout + nn, acc3,
                         mask=mask3 & (j3 > 0))
            else:
                out3 = tl.where(j3 == 0, z, acc3)
                dst = scratch_ptr + layer * buf_stride + ((e * B + b3) * (K + 1) + j3) * DMAX + nn
                tl.store(dst, out3, mask=mask3)
        # The next layer reads what the other threads of this program just wrote.
        tl.debug_barrier()


def _tiles(device: torch.device, group: int, dmax: int, batch: int) -> Tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps) for a launch.

    On the GPU the stacked row tile holds ~32 rows (at least 16, the minimum ``tl.dot`` size)
    and weight tiles are 16 x 32 (larger tiles spill registers in the fp32 FFMA path). Under the CPU interpreter every Triton op costs a Python call,
    so the tiles are as large as the problem (one tile per layer for widths up to 256).
    """
    if gpu_sms(device) is not None:
        rows = 32 if group <= 32 else group
        block_b = max(1, rows // group)
        block_b = min(block_b, max(1, triton.next_power_of_2(batch)))
        while block_b * group < 16:
            block_b *= 2
        return block_b, 32, 16, 4
    width = min(max(16, triton.next_power_of_2(dmax)), 256)
    block_b = max(1, min(triton.next_power_of_2(batch), max(1, 512 // group)))
    while block_b * group < 16:
        block_b *= 2
    return block_b, width, width, 1


def mlp_jvp_forward(
    x: torch.Tensor,
    tangents: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[Optional[torch.Tensor]],
    scales: Sequence[Optional[torch.Tensor]],
    activation: str,
    precision: str = "ieee",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host launcher: ``(y[E,B,o], jy[E,B,K,o], saved)`` of the MLP and its JVP along
    ``tangents``; ``saved [L - 1, E, B, K + 1, DMAX]`` holds every hidden layer's pre-activations
    (slot 0 the primal ``z``, slots ``1..K`` the tangents' ``w``).

    Inputs are assumed validated by :func:`fastrp.ops.jvp.ensemble_mlp_jvp` (same dtype and
    device, chained widths, ``len(biases) == len(scales) == len(weights)``); they are made
    contiguous here. One kernel launch for the whole MLP, under the tensors' CUDA device.
    """
    E, B, _ = x.shape
    K = tangents.shape[2]
    dims = [x.shape[2]] + [w.shape[2] for w in weights]
    y = x.new_empty((E, B, dims[-1]))
    jy = x.new_empty((E, B, K, dims[-1]))
    hidden = dims[1:-1]
    dmax = max(hidden) if hidden else 1
    # every element is written when the hidden widths are equal; otherwise zero the padding
    alloc = x.new_empty if len(set(hidden)) <= 1 else x.new_zeros
    scratch = alloc((len(hidden), E, B, K + 1, dmax))
    if E == 0 or B == 0 or dims[-1] == 0:
        return y, jy, scratch
    x = x.contiguous()
    tangents = tangents.contiguous()
    ws: List[torch.Tensor] = [w.contiguous() for w in weights]
    bs = [x if bb is None else bb.contiguous() for bb in biases]
    ss = [x if sc is None else sc.contiguous() for sc in scales]
    group = triton.next_power_of_2(K + 1)
    block_b, block_n, block_k, num_warps = _tiles(x.device, group, max(dims), B)
    grid = (triton.cdiv(B, block_b), E)
    with device_guard(x.device):
        _mlp_jvp_fwd_kernel[grid](
            x, tangents, y, jy, scratch,
            tuple(ws), tuple(bs), tuple(ss),
            B, K,
            DIMS=tuple(dims), DMAX=dmax,
            NUM_LAYERS=len(ws),
            BIAS_MASK=sum(1 << i for i, bb in enumerate(biases) if bb is not None),
            SCALE_MASK=sum(1 << i for i, sc in enumerate(scales) if sc is not None),
            ACT=ACT_CODES[activation],
            BLOCK_B=block_b, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k,
            PRECISION="ieee" if x.dtype == torch.float64 else precision, num_warps=num_warps,
        )
    return y, jy, scratch
