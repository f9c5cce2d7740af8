"""Exact k nearest neighbours and finite-difference targets for the gradient model (DDPPO).

``knn`` finds, for each query row, the ``k`` point rows with the smallest squared Euclidean
distance; ``fd_targets`` uses it to build the directional finite differences
``(x_i - x, y_i - y)`` to the ``k`` nearest neighbours ``x_i`` of replay-buffer rows ``x``.

Backends (``backend=None`` picks the first usable one for the tensors' device):

* ``"cuda"``: CUDA C++ kernel of ``fastrp._C`` (``csrc/cuda/knn_kernel.cu``): tiled distances in
  shared memory, per-warp top-k selection; CUDA tensors, extension built with its CUDA sources.
* ``"cpp"``: C++/OpenMP kernel of ``fastrp._C`` (``csrc/knn_cpu.cpp``): GEMM tiles plus a
  bounded per-query heap behind a threshold filter; CPU tensors.
* ``"torch"``: the chunked pure-torch reference :func:`knn_ref` (any device).

All backends are tiled: extra memory is O(Q * k + tile), never a Q x N distance matrix. Neither
op is differentiable: the outputs carry no gradient (``directions`` and ``deltas`` are plain
differences of the detached inputs, to be used as regression targets). Searched values must be
finite: eager calls check it (``ValueError``), see :func:`knn` for what every backend does with
NaN or inf rows when the checks are skipped (``torch.compile``, CUDA-graph capture, direct op
calls).
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch

from .. import _ext
from . import _common
from ._common import check_tensor, resolve_backend, value_checks_allowed

__all__ = ["knn", "knn_ref", "fd_targets", "fd_targets_ref"]

_SUPPORTED = ("cuda", "cpp", "torch")
# Element budget of one tile of the torch reference (distances of a query chunk to a point chunk,
# plus the gathered neighbour rows used to recompute exact distances).
_TILE_ELEMENTS = 1 << 22
_POINT_CHUNK = 4096


def _register_fake() -> None:
    """Shape/dtype (meta) implementation of ``fastrp_C::knn`` so that it traces under
    ``torch.compile``."""
    if not _ext.has_ext():
        return
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register("fastrp_C::knn")
    def _knn_fake(queries, points, k, exclude):
        q = queries.shape[0]
        return queries.new_empty((q, k)), queries.new_empty((q, k), dtype=torch.int64)


_register_fake()


def _host_read(**values: torch.Tensor) -> dict:
    """The 0-d tensors ``values`` (flags, bounds) as Python ints, read with a single
    device-to-host transfer."""
    return dict(zip(values, torch.stack([v.to(torch.int64) for v in values.values()]).tolist()))


def _check_k(k, upper: int, what: str) -> int:
    if isinstance(k, (bool, torch.Tensor)) or not (isinstance(k, torch.SymInt) or hasattr(k, "__index__")):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not isinstance(k, torch.SymInt):
        k = operator.index(k)
    if not 1 <= k <= upper:
        raise ValueError(f"k must be in [1, {what}={upper}], got {k}")
    return k


def _check_knn_args(queries, points, k, exclude) -> int:
    check_tensor("queries", queries, ndim=2, what="[Q, d]")
    d = queries.shape[1]
    if d < 1:
        raise ValueError(f"queries must have at least one column (d >= 1), got shape {tuple(queries.shape)}")
    check_tensor("points", points, ndim=2, what="[N, d]")
    check_tensor("points", points, shape=(None, d), dtypes=(queries.dtype,), device=queries.device,
                 what="[N, d] with the d, dtype and device of queries")
    n = points.shape[0]
    k = _check_k(k, n, "N")
    if exclude is not None:
        check_tensor("exclude", exclude, shape=(queries.shape[0],), dtypes=(torch.int64,), device=queries.device,
                     what="[Q] int64 point indices (-1: nothing to skip)")
    if not _common.device_side(queries) and not value_checks_allowed(queries):
        return k  # CPU under torch.compile: unchecked, as documented
    if _common.device_side(queries):
        # no host read (a sync on CUDA, illegal in graph capture): device-side asserts
        torch._assert_async(torch.isfinite(queries).all(), "queries must be finite (no NaN or inf entries)")
        torch._assert_async(torch.isfinite(points).all(), "points must be finite (no NaN or inf entries)")
        if exclude is not None and exclude.numel():
            lo, hi = torch.aminmax(exclude)
            torch._assert_async((lo >= -1) & (hi < n), "exclude entries must be in [-1, N) (-1: nothing to skip)")
            if k > n - 1:
                torch._assert_async(hi < 0, "k must be at most N - 1 when exclude removes a point")
        return k
    checks = {"queries": torch.isfinite(queries).all(), "points": torch.isfinite(points).all()}
    if exclude is not None and exclude.numel():
        checks["lo"], checks["hi"] = torch.aminmax(exclude)
    got = _host_read(**checks)
    if "lo" in got:
        lo, hi = got["lo"], got["hi"]
        if lo < -1 or hi >= n:
            raise ValueError(f"exclude entries must be in [-1, N={n}) (-1: nothing to skip), got range [{lo}, {hi}]")
        if hi >= 0 and k > n - 1:
            raise ValueError(f"k must be at most N - 1 = {n - 1} when exclude removes a point, got {k}")
    for name in ("queries", "points"):
        if not got[name]:
            raise ValueError(f"{name} must be finite (no NaN or inf entries)")
    return k


def _knn_torch(queries: torch.Tensor, points: torch.Tensor, k: int,
               exclude: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Chunked mm + topk; the selected distances are recomputed as sum((q - p)^2) and sorted.

    Candidates whose recomputed distance is not finite (NaN or inf rows) or that are the excluded
    point (picked only when fewer than k candidates remain) become ``(+inf, -1)``, as in the
    compiled kernels."""
    q_count, d = queries.shape
    n = points.shape[0]
    if q_count == 0:
        return queries.new_empty((0, k)), queries.new_empty((0, k), dtype=torch.int64)
    center = points.mean(0)
    center = torch.where(torch.isfinite(center), center, torch.zeros_like(center))  # NaN/inf points
    pc = points - center
    qc = queries - center
    pnorm = (pc * pc).sum(1)
    nb = min(n, _POINT_CHUNK)
    qb = max(1, min(q_count, _TILE_ELEMENTS // (nb + k * (d + 2))))
    dists, idxs = [], []
    for q0 in range(0, q_count, qb):
        q1 = min(q_count, q0 + qb)
        best_s = best_i = None
        for p0 in range(0, n, nb):
            p1 = min(n, p0 + nb)
            # |p - c|^2 - 2 (q - c).(p - c): the squared distance minus a per-query constant.
            s = torch.addmm(pnorm[p0:p1], qc[q0:q1], pc[p0:p1].t(), alpha=-2)
            if exclude is not None:
                cols = torch.arange(p0, p1, device=points.device)
                s = s.masked_fill(exclude[q0:q1, None] == cols, float("inf"))
            s, i = s.topk(min(k, p1 - p0), dim=1, largest=False)
            i = i + p0
            if best_s is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                if s.shape[1] > k:
                    s, j = s.topk(k, dim=1, largest=False)
                    i = i.gather(1, j)
            best_s, best_i = s, i
        diff = queries[q0:q1, None, :] - points[best_i]
        dist = (diff * diff).sum(-1)
        invalid = ~torch.isfinite(dist)
        if exclude is not None:
            invalid |= best_i == exclude[q0:q1, None]
        dist, order = dist.masked_fill(invalid, float("inf")).sort(dim=1)
        dists.append(dist)
        idxs.append(best_i.masked_fill(invalid, -1).gather(1, order))
    return torch.cat(dists), torch.cat(idxs)


def _knn_dispatch(queries, points, k, exclude, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    queries, points = queries.detach(), points.detach()
    if backend == "torch":
        return _knn_torch(queries, points, k, exclude)
    return torch.ops.fastrp_C.knn(queries.contiguous(), points.contiguous(), k,
                                  None if exclude is None else exclude.contiguous())


def _resolve(op: str, backend: Optional[str], device: torch.device) -> str:
    chosen = resolve_backend(op, backend, device, _SUPPORTED)
    if backend is None and chosen == "torch":
        _ext.warn_missing_ext()
    return chosen


def knn(queries: torch.Tensor, points: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None, *,
        backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours by squared Euclidean distance.

    Args:
        queries: ``[Q, d]`` float32 (or float64), finite.
        points: ``[N, d]``, finite, same dtype and device as ``queries``.
        k: number of neighbours, ``1 <= k <= N``; at most ``N - 1`` when ``exclude`` holds any
            entry ``>= 0`` (every query must keep ``k`` candidates).
        exclude: optional ``[Q]`` int64: ``exclude[q]`` is a row of ``points`` skipped for query
            ``q`` (typically the query's own row when queries are taken from points), or ``-1``
            to skip nothing. Only that index is skipped: other rows equal to it (duplicates) are
            still neighbours, at distance 0.
        backend: ``None`` (auto: ``"cuda"`` for CUDA tensors, ``"cpp"`` for CPU tensors, when the
            compiled extension has them, else ``"torch"``), ``"cuda"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(dist2, idx)``: ``dist2[Q, k]`` (dtype of ``queries``) squared distances ascending
        along each row, recomputed exactly as ``sum((q - p)^2)``; ``idx[Q, k]`` int64 row indices
        into ``points``. Equal distances may come in any order. Candidates whose distances differ
        by less than float rounding (~1e-6 relative for float32) may be swapped at the k-th
        boundary by the GEMM-based backends (``"cpp"``, ``"torch"``). No gradient flows through
        either output.

    Memory is tiled: O(Q * k) for the outputs plus a tile (no ``Q x N`` matrix). Arguments are
    validated before dispatch (``ValueError`` naming the argument). The value checks (``queries``
    and ``points`` finite, ``exclude``'s range) are read back together: one device sync per call.
    They are skipped under ``torch.compile`` and CUDA-graph capture; a NaN or inf there is not an
    error, and every backend then treats it alike: a point is a neighbour only at a finite squared
    distance, and the slots a query cannot fill (a non-finite query row, or fewer than ``k``
    points at a finite distance) hold ``dist2 = +inf`` and ``idx = -1``. Finite values whose
    squared distances overflow the dtype (beyond ~1e19 in float32) are not supported.
    """
    k = _check_knn_args(queries, points, k, exclude)
    return _knn_dispatch(queries, points, k, exclude, _resolve("knn", backend, queries.device))


def knn_ref(queries: torch.Tensor, points: torch.Tensor, k: int,
            exclude: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`knn` (same arguments, checks and outputs).

    Chunked over queries and points (``addmm`` distance tiles, running ``topk`` merge), then the
    kept distances are recomputed as ``sum((q - p)^2)`` and sorted. In float64 it is the ground
    truth of the tests; it runs on any device.
    """
    k = _check_knn_args(queries, points, k, exclude)
    return _knn_dispatch(queries, points, k, exclude, "torch")


def _check_fd_args(inputs, outputs, query_idx, k, scale) -> int:
    check_tensor("inputs", inputs, ndim=2, what="[N, i]")
    n, width = inputs.shape
    if width < 1:
        raise ValueError(f"inputs must have at least one column, got shape {tuple(inputs.shape)}")
    check_tensor("outputs", outputs, ndim=2, what="[N, o]")
    check_tensor("outputs", outputs, shape=(n, None), dtypes=(inputs.dtype,), device=inputs.device,
                 what="[N, o] with the N, dtype and device of inputs")
    check_tensor("query_idx", query_idx, ndim=1, dtypes=(torch.int64,), device=inputs.device,
                 what="[Q] int64 row indices into inputs")
    k = _check_k(k, n - 1, "N - 1")
    if scale is not None:
        check_tensor("scale", scale, shape=(width,), dtypes=(inputs.dtype,), device=inputs.device,
                     what="[i] positive per-column scale of inputs")
    if not _common.device_side(inputs) and not value_checks_allowed(inputs):
        return k
    if _common.device_side(inputs):
        torch._assert_async(torch.isfinite(inputs).all(), "inputs must be finite (no NaN or inf entries)")
        if scale is not None:
            torch._assert_async(((scale > 0) & torch.isfinite(scale)).all(), "scale entries must be positive and finite")
        if query_idx.numel():
            lo, hi = torch.aminmax(query_idx)
            torch._assert_async((lo >= 0) & (hi < n), "query_idx entries must be in [0, N)")
        return k
    checks = {"inputs": torch.isfinite(inputs).all()}
    if scale is not None:
        checks["scale"] = ((scale > 0) & torch.isfinite(scale)).all()
    if query_idx.numel():
        checks["lo"], checks["hi"] = torch.aminmax(query_idx)
    got = _host_read(**checks)
    if "lo" in got and (got["lo"] < 0 or got["hi"] >= n):
        raise ValueError(f"query_idx entries must be in [0, N={n}), got range [{got['lo']}, {got['hi']}]")
    if not got["inputs"]:
        raise ValueError("inputs must be finite (no NaN or inf entries)")
    if not got.get("scale", True):
        raise ValueError("scale entries must be positive and finite")
    return k


def _fd_targets(inputs, outputs, query_idx, k, scale, backend: str):
    inputs, outputs = inputs.detach(), outputs.detach()
    x = inputs if scale is None else inputs / scale.detach()
    _, idx = _knn_dispatch(x[query_idx], x, k, query_idx, backend)
    directions = inputs[idx] - inputs[query_idx].unsqueeze(1)
    deltas = outputs[idx] - outputs[query_idx].unsqueeze(1)
    return directions, deltas, idx


def fd_targets(inputs: torch.Tensor, outputs: torch.Tensor, query_idx: torch.Tensor, k: int,
               scale: Optional[torch.Tensor] = None, *,
               backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Finite-difference targets to the k nearest neighbours (DDPPO gradient-model loss).

    For each query row ``x = inputs[q]`` (``q`` in ``query_idx``), find its ``k`` nearest rows
    ``x_i`` among ``inputs`` with its own row ``q`` excluded (duplicates of ``x`` at other rows
    remain and give zero directions), searching on ``inputs / scale`` when ``scale`` is given
    (e.g. the observation-normaliser std), and return the unscaled differences.

    Args:
        inputs: ``[N, i]`` float32 (or float64), finite, e.g. replay-buffer ``(s, a)`` rows.
        outputs: ``[N, o]``, same dtype and device, e.g. the model targets of those rows. Not
            checked for NaN or inf: they do not take part in the search, and a non-finite row
            only makes the ``deltas`` that use it non-finite (for the caller to mask).
        query_idx: ``[Q]`` int64 rows of ``inputs`` to build targets for, each in ``[0, N)``.
        k: neighbours per query, ``1 <= k <= N - 1``.
        scale: optional ``[i]`` positive, finite per-column scale; neighbours are searched on
            ``inputs / scale``.
        backend: as for :func:`knn` (``None``, ``"cuda"``, ``"cpp"``, ``"torch"``).

    Returns:
        ``(directions[Q, k, i], deltas[Q, k, o], idx[Q, k])`` with
        ``directions = inputs[idx] - inputs[query_idx, None]``,
        ``deltas = outputs[idx] - outputs[query_idx, None]``, neighbours ascending by distance.
        No gradient flows through the outputs.

    The value checks (``inputs`` finite, ``scale`` positive and finite, ``query_idx`` in range)
    are read back together: one device sync per call, raising ``ValueError`` naming the argument.
    They are skipped under ``torch.compile`` and CUDA-graph capture, where out-of-range or
    non-finite values give unspecified results (a query without ``k`` finite neighbours gets
    ``idx = -1`` slots, see :func:`knn`, and its ``directions``/``deltas`` there then use the
    last row).
    """
    k = _check_fd_args(inputs, outputs, query_idx, k, scale)
    return _fd_targets(inputs, outputs, query_idx, k, scale, _resolve("fd_targets", backend, inputs.device))


def fd_targets_ref(inputs: torch.Tensor, outputs: torch.Tensor, query_idx: torch.Tensor, k: int,
                   scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`fd_targets` (neighbours from :func:`knn_ref`)."""
    k = _check_fd_args(inputs, outputs, query_idx, k, scale)
    return _fd_targets(inputs, outputs, query_idx, k, scale, "torch")
