"""Triton power iteration for spectral normalization of ensemble layers.

One launch covers every member of every layer: the grid is ``(E, L)`` and program ``(e, l)``
runs the power iteration of member ``e`` of layer ``l``. Layers have different shapes, so the
kernel takes tuples of tensors (one entry per layer) and unrolls a branch per layer; each branch
streams that layer's ``[i, o]`` weight tile by tile, keeping ``u`` (length ``o``) in registers
and ``v`` (length ``i``) in its output buffer.

Per member, with ``W = weight[e].T`` (``[o, i]``), the kernel computes exactly the training-mode
forward of ``torch.nn.utils.parametrizations.spectral_norm``::

    repeat n times:  u = normalize(W v);  v = normalize(W^T u)
    sigma = u . (W v)

where ``normalize(x) = x / max(||x||, eps)``. With ``n = 0`` it computes ``sigma`` from the
given ``u`` (or ``u = normalize(W v)`` when none is given) and returns ``v`` unchanged.

Host entry point: :func:`spectral_norm_layers_fwd`. The per-layer tuples of pointers and sizes
are plain (non-constexpr) tuple kernel arguments, supported since Triton 3.2; each distinct
number of layers compiles its own kernel.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._target import gpu_sms
from .ensemble_mlp import device_guard

# Elements of one weight tile held in registers by a program. The interpreter runs each tile as
# a handful of numpy calls, so larger tiles make it faster; on the GPU 4096 fp32 values fit the
# registers of 4 warps.
_TILE_ELEMS_GPU = 4096
_TILE_ELEMS_INTERPRET = 16384


@triton.jit
def _weight_t_times(w_ptr, vec_ptr, n_in, n_out, offs_o, mask_o, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    """``s[o] = sum_i w[i, o] * vec[i]`` (that is ``W vec`` with ``W = w.T``), tile by tile."""
    acc = tl.zeros([BLOCK_I, BLOCK_O], dtype=w_ptr.dtype.element_ty)
    for i0 in range(0, n_in, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        mask_i = rows < n_in
        vec = tl.load(vec_ptr + rows, mask=mask_i, other=0.0)
        w = tl.load(w_ptr + rows[:, None] * n_out + offs_o[None, :], mask=mask_i[:, None] & mask_o[None, :], other=0.0)
        acc += w * vec[:, None]
    return tl.sum(acc, axis=0)


@triton.jit
def _power_iteration_member(
    w_ptr, v_in_ptr, u_in_ptr, sigma_ptr, u_ptr, v_ptr,
    member, n_in, n_out, n_iter, eps,
    HAS_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    w_ptr += member * n_in * n_out
    v_in_ptr += member * n_in
    v_ptr += member * n_in
    u_in_ptr += member * n_out
    u_ptr += member * n_out
    dtype = w_ptr.dtype.element_ty
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < n_out

    # v lives in its output buffer: copy the input there, then iterate in place.
    for i0 in range(0, n_in, BLOCK_I):
        rows = i0 + tl.arange(0, BLOCK_I)
        mask_i = rows < n_in
        tl.store(v_ptr + rows, tl.load(v_in_ptr + rows, mask=mask_i), mask=mask_i)
    tl.debug_barrier()

    if HAS_U:
        u = tl.load(u_in_ptr + offs_o, mask=mask_o, other=0.0)
    else:
        u = tl.zeros([BLOCK_O], dtype=dtype)
    for _ in range(n_iter):
        s = _weight_t_times(w_ptr, v_ptr, n_in, n_out, offs_o, mask_o, BLOCK_I, BLOCK_O)
        # every thread has read v before the loop below overwrites it
        tl.debug_barrier()
        u = s / tl.maximum(tl.sqrt(tl.sum(s * s, axis=0)), eps)
        # t = W^T u, written unnormalized into v, then rescaled once its norm is known.
        sq = tl.zeros([BLOCK_I], dtype=dtype)
        for i0 in range(0, n_in, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            mask_i = rows < n_in
            w = tl.load(w_ptr + rows[:, None] * n_out + offs_o[None, :], mask=mask_i[:, None] & mask_o[None, :], other=0.0)
            t = tl.sum(w * u[None, :], axis=1)
            tl.store(v_ptr + rows, t, mask=mask_i)
            sq += t * t
        tl.debug_barrier()
        denom = tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
        for i0 in range(0, n_in, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            mask_i = rows < n_in
            tl.store(v_ptr + rows, tl.load(v_ptr + rows, mask=mask_i) / denom, mask=mask_i)
        tl.debug_barrier()

    s = _weight_t_times(w_ptr, v_ptr, n_in, n_out, offs_o, mask_o, BLOCK_I, BLOCK_O)
    if not HAS_U:
        if n_iter == 0:
            u = s / tl.maximum(tl.sqrt(tl.sum(s * s, axis=0)), eps)
    tl.store(u_ptr + offs_o, u, mask=mask_o)
    tl.store(sigma_ptr + member, tl.sum(u * s, axis=0))


@triton.jit
def _spectral_norm_layers_kernel(
    weights, vs_in, us_in, sigmas, us, vs,
    ins, outs, n_iter, eps,
    NUM_LAYERS: tl.constexpr, HAS_U: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr,
):
    member = tl.program_id(0)
    layer = tl.program_id(1)
    for l in tl.static_range(NUM_LAYERS):
        if layer == l:
            _power_iteration_member(
                weights[l], vs_in[l], us_in[l], sigmas[l], us[l], vs[l],
                member, ins[l], outs[l], n_iter, eps,
                HAS_U, BLOCK_I, BLOCK_O,
            )


def _tile_sizes(max_in: int, max_out: int, device: torch.device) -> Tuple[int, int]:
    block_o = triton.next_power_of_2(max(max_out, 1))
    elems = _TILE_ELEMS_GPU if gpu_sms(device) is not None else _TILE_ELEMS_INTERPRET
    block_i = max(1, min(triton.next_power_of_2(max(max_in, 1)), elems // block_o))
    return block_i, block_o


def spectral_norm_layers_fwd(
    weights: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    n_power_iterations: int,
    eps: float,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Power iteration of every member of every layer in one launch.

    ``weights[l]``: ``[E, i_l, o_l]``; ``vs[l]``: ``[E, i_l]``; ``us``: empty, or ``[E, o_l]``
    per layer (read only when ``n_power_iterations == 0``). All float32 (or float64), one device,
    validated by the caller. Returns new tensors ``(sigmas [E], us [E, o_l], vs [E, i_l])`` per
    layer.
    """
    num_layers = len(weights)
    if num_layers == 0:
        return [], [], []
    weights = tuple(w.contiguous() for w in weights)
    vs_in = tuple(v.contiguous() for v in vs)
    has_u = len(us) > 0
    ensemble = weights[0].shape[0]
    ins = tuple(int(w.shape[1]) for w in weights)
    outs = tuple(int(w.shape[2]) for w in weights)
    sigmas = tuple(w.new_empty(ensemble) for w in weights)
    us_out = tuple(w.new_empty(ensemble, o) for w, o in zip(weights, outs))
    vs_out = tuple(torch.empty_like(v) for v in vs_in)
    us_in = tuple(u.contiguous() for u in us) if has_u else us_out
    if ensemble > 0:
        block_i, block_o = _tile_sizes(max(ins), max(outs), weights[0].device)
        device = weights[0].device
        with device_guard(device):
            _spectral_norm_layers_kernel[(ensemble, num_layers)](
                weights, vs_in, us_in, sigmas, us_out, vs_out,
                ins, outs, int(n_power_iterations), float(eps),
                NUM_LAYERS=num_layers, HAS_U=has_u, BLOCK_I=block_i, BLOCK_O=block_o,
            )
    return list(sigmas), list(us_out), list(vs_out)

