"""Tests of fastrp.ops.knn / fd_targets: every backend against the chunked torch reference and an
independent float64 brute force, tie-safe checks, exclusion, validation (including NaN/inf and
the single host read of the value checks), the kernels' shared behaviour on non-finite rows,
opcheck, torch.compile, the memory bound, and CUDA parity (marked ``cuda``)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastrp import _ext
from fastrp.ops.knn import _knn_dispatch, fd_targets, fd_targets_ref, knn, knn_ref
from utils import assert_close_to_ref, no_host_sync

needs_ext = pytest.mark.skipif(not _ext.has_ext(), reason="compiled extension fastrp._C not available")
needs_cuda_ext = pytest.mark.skipif(not _ext.has_cuda_ext(), reason="fastrp._C built without CUDA sources")
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=needs_ext)]


def brute_force(queries, points, k, exclude=None):
    """Full float64 distance matrix + sort: the independent ground truth for small sizes."""
    d2 = ((queries.double()[:, None, :] - points.double()[None, :, :]) ** 2).sum(-1)
    if exclude is not None:
        rows = torch.arange(len(queries), device=queries.device)
        keep = exclude >= 0
        d2[rows[keep], exclude[keep]] = float("inf")
    return d2.sort(dim=1).values[:, :k]


def check_knn_result(queries, points, k, exclude, dist2, idx):
    """Tie-safe validity: shapes, valid distinct indices, no excluded index, ascending, and the
    returned distances are the true distances of the returned indices."""
    q_count, n = queries.shape[0], points.shape[0]
    assert dist2.shape == (q_count, k) and idx.shape == (q_count, k)
    assert dist2.dtype == queries.dtype and idx.dtype == torch.int64
    assert dist2.device == queries.device and idx.device == queries.device
    assert not dist2.requires_grad and not idx.requires_grad
    assert bool(((idx >= 0) & (idx < n)).all()), "index out of range"
    if k > 1:
        assert bool((idx.sort(1).values.diff(dim=1) != 0).all()), "repeated neighbour"
        assert bool((dist2.diff(dim=1) >= 0).all()), "distances not ascending"
    if exclude is not None:
        assert not bool((idx == exclude[:, None]).any()), "excluded point returned"
    true = ((queries.double()[:, None, :] - points.double()[idx]) ** 2).sum(-1)
    scale = max(1.0, true.abs().max().item())
    tol = (1e-5 if queries.dtype == torch.float32 else 1e-12) * scale
    assert (dist2.double() - true).abs().max().item() <= tol


def check_against_refs(queries, points, k, exclude, backend):
    dist2, idx = knn(queries, points, k, exclude, backend=backend)
    check_knn_result(queries, points, k, exclude, dist2, idx)
    ref32, _ = knn_ref(queries.float(), points.float(), k, exclude)
    ref64 = brute_force(queries, points, k, exclude)
    assert_close_to_ref(dist2, ref32, ref64, name=f"dist2[{backend}]")
    return dist2, idx


SHAPES = [  # (Q, N, d)
    (1, 1, 1),
    (1, 7, 5),
    (7, 1, 23),
    (7, 37, 1),
    (37, 7, 5),
    (37, 257, 23),
    (257, 37, 5),
    (257, 257, 1),
    (257, 1000, 23),
    (600, 1300, 5),  # several query blocks and point tiles of the C++ kernel
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "Q{}-N{}-d{}".format(*s))
def test_knn_matches_reference(backend, shape):
    q_count, n, d = shape
    queries, points = torch.randn(q_count, d), torch.randn(n, d)
    for k in sorted({1, min(5, n), n}):
        check_against_refs(queries, points, k, None, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,d", [(2, 1), (37, 5), (257, 23), (700, 5)])
def test_knn_exclude_self(backend, n, d):
    points = torch.randn(n, d)
    exclude = torch.arange(n)
    for k in sorted({1, min(3, n - 1), n - 1}):
        check_against_refs(points, points, k, exclude, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn_exclude_mixed_and_none(backend):
    queries, points = torch.randn(37, 5), torch.randn(57, 5)
    exclude = torch.randint(0, 57, (37,))
    exclude[::3] = -1
    check_against_refs(queries, points, 56, exclude, backend)
    check_against_refs(queries, points, 4, exclude, backend)
    # All -1: nothing is skipped, so k = N is allowed.
    check_against_refs(queries, points, 57, torch.full((37,), -1), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn_duplicates_and_ties(backend):
    base = torch.randn(13, 5)
    points = base[torch.randint(0, 13, (300,))]  # every row repeated ~23 times
    queries = torch.cat([base[:4], torch.randn(5, 5)])
    for k in (1, 10, 40, 300):
        check_against_refs(queries, points, k, None, backend)
    dist2, _ = knn(queries, points, 10, backend=backend)
    assert bool((dist2[:4] == 0).all()), "exact duplicates of a query must be at distance 0"
    exclude = torch.arange(300)
    check_against_refs(points, points, 25, exclude, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn_float64_and_offset(backend):
    # Far from the origin: centering keeps the GEMM-based selection accurate.
    queries = torch.randn(37, 23, dtype=torch.float64) + 1000.0
    points = torch.randn(257, 23, dtype=torch.float64) + 1000.0
    dist2, idx = knn(queries, points, 9, backend=backend)
    check_knn_result(queries, points, 9, None, dist2, idx)
    torch.testing.assert_close(dist2, brute_force(queries, points, 9), rtol=1e-10, atol=1e-10)
    check_against_refs(queries.float(), points.float(), 9, None, backend)


@needs_ext
def test_knn_cpp_equals_torch_indices_without_ties():
    queries, points = torch.randn(300, 23, dtype=torch.float64), torch.randn(2000, 23, dtype=torch.float64)
    d_cpp, i_cpp = knn(queries, points, 16, backend="cpp")
    d_ref, i_ref = knn_ref(queries, points, 16)
    assert torch.equal(i_cpp, i_ref)
    torch.testing.assert_close(d_cpp, d_ref, rtol=1e-12, atol=1e-12)


def test_knn_auto_backend():
    queries, points = torch.randn(7, 5), torch.randn(37, 5)
    dist2, idx = knn(queries, points, 3)
    check_knn_result(queries, points, 3, None, dist2, idx)
    if not _ext.has_ext():
        with pytest.raises(ValueError, match="backend='cpp'"):
            knn(queries, points, 3, backend="cpp")


def test_knn_k_accepts_integer_types():
    queries, points = torch.randn(7, 5), torch.randn(37, 5)
    dist2, idx = knn(queries, points, np.int64(4))
    check_knn_result(queries, points, 4, None, dist2, idx)


def test_knn_empty_queries():
    dist2, idx = knn(torch.randn(0, 5), torch.randn(9, 5), 4)
    assert dist2.shape == (0, 4) and idx.shape == (0, 4)


def _fd_data(n=300, i=6, o=4, q=37, dtype=torch.float32):
    inputs = torch.randn(n, i, dtype=dtype)
    inputs[n // 2] = inputs[0]  # a duplicate row: a neighbour at distance 0, not excluded
    outputs = torch.randn(n, o, dtype=dtype)
    query_idx = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (q - 2,))])
    return inputs, outputs, query_idx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("use_scale", [False, True])
def test_fd_targets(backend, use_scale):
    inputs, outputs, query_idx = _fd_data()
    scale = torch.rand(inputs.shape[1]) * 3 + 0.1 if use_scale else None
    k = 7
    directions, deltas, idx = fd_targets(inputs, outputs, query_idx, k, scale, backend=backend)
    assert directions.shape == (len(query_idx), k, inputs.shape[1])
    assert deltas.shape == (len(query_idx), k, outputs.shape[1])
    torch.testing.assert_close(directions, inputs[idx] - inputs[query_idx, None], rtol=0, atol=0)
    torch.testing.assert_close(deltas, outputs[idx] - outputs[query_idx, None], rtol=0, atol=0)
    x = inputs if scale is None else inputs / scale
    check_knn_result(x[query_idx], x, k, query_idx, *knn(x[query_idx], x, k, query_idx, backend=backend))
    searched = ((x[idx] - x[query_idx, None]) ** 2).sum(-1)
    ref64 = brute_force(x[query_idx], x, k, query_idx)
    ref32 = ((x[fd_targets_ref(inputs, outputs, query_idx, k, scale)[2]] - x[query_idx, None]) ** 2).sum(-1)
    assert_close_to_ref(searched, ref32, ref64, name="searched distances")
    assert idx[0, 0].item() == inputs.shape[0] // 2, "the duplicate row of query 0 is its nearest neighbour"
    assert not bool((idx == query_idx[:, None]).any())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fd_targets_scale_changes_neighbours(backend):
    inputs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.5], [3.0, 3.0]])
    outputs = torch.arange(8.0).reshape(4, 2)
    query_idx = torch.tensor([0])
    _, _, idx = fd_targets(inputs, outputs, query_idx, 1, backend=backend)
    assert idx.tolist() == [[2]]  # unscaled: (0, 0.5) is nearest
    directions, deltas, idx = fd_targets(inputs, outputs, query_idx, 1, torch.tensor([1.0, 0.1]), backend=backend)
    assert idx.tolist() == [[1]]  # second column divided by 0.1: (1, 0) is nearest
    assert directions.tolist() == [[[1.0, 0.0]]]  # unscaled difference
    assert deltas.tolist() == [[[2.0, 2.0]]]


def test_fd_targets_no_grad():
    inputs = torch.randn(40, 3, requires_grad=True)
    outputs = torch.randn(40, 2, requires_grad=True)
    directions, deltas, _ = fd_targets(inputs, outputs, torch.arange(5), 3)
    assert not directions.requires_grad and not deltas.requires_grad


def _bad_knn_cases():
    q, p = torch.randn(4, 3), torch.randn(10, 3)
    return [
        ((torch.randn(4), p, 2), {}, "queries must be a 2-d tensor"),
        ((q, torch.randn(10, 3, 1), 2), {}, "points must be a 2-d tensor"),
        ((q, torch.randn(10, 4), 2), {}, r"points must have shape \[\*, 3\]"),
        ((torch.randn(4, 0), torch.randn(10, 0), 2), {}, "at least one column"),
        ((q.int(), p.int(), 2), {}, "queries must have dtype"),
        ((q.half(), p.half(), 2), {}, "queries must have dtype"),
        ((q, p.double(), 2), {}, "points must have dtype torch.float32"),
        ((q, p.to("meta"), 2), {}, "points must be on device cpu"),
        ((q, p, 2, torch.arange(4, device="meta")), {}, "exclude must be on device cpu"),
        ((q, p, 0), {}, r"k must be in \[1, N=10\]"),
        ((q, p, 11), {}, r"k must be in \[1, N=10\]"),
        ((q, p, 2.0), {}, "k must be an int"),
        ((q, p, torch.tensor(2)), {}, "k must be an int"),
        ((q, p, True), {}, "k must be an int"),
        ((q, p, 2, torch.arange(3)), {}, r"exclude must have shape \[4\]"),
        ((q, p, 2, torch.arange(4).int()), {}, "exclude must have dtype torch.int64"),
        ((q, p, 2, torch.tensor([0, 1, 2, 10])), {}, r"exclude entries must be in \[-1, N=10\)"),
        ((q, p, 2, torch.tensor([0, 1, 2, -2])), {}, r"exclude entries must be in \[-1, N=10\)"),
        ((q, p, 10, torch.tensor([-1, -1, 3, -1])), {}, "k must be at most N - 1 = 9"),
        ((q, p, 2), {"backend": "triton"}, "not implemented"),
        ((q, p, 2), {"backend": "cuda"}, "cannot run on device cpu"),
        ((q, p, 2), {"backend": "numpy"}, "backend must be None"),
    ]


@pytest.mark.parametrize("args,kwargs,match", _bad_knn_cases())
def test_knn_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        knn(*args, **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=match):
            knn_ref(*args)


def _bad_fd_cases():
    x, y, qi = torch.randn(10, 3), torch.randn(10, 2), torch.arange(4)
    return [
        ((torch.randn(10), y, qi, 2), "inputs must be a 2-d tensor"),
        ((x, torch.randn(9, 2), qi, 2), r"outputs must have shape \[10, \*\]"),
        ((x, y.double(), qi, 2), "outputs must have dtype torch.float32"),
        ((x, y, qi.float(), 2), "query_idx must have dtype torch.int64"),
        ((x, y, qi[None], 2), "query_idx must be a 1-d tensor"),
        ((x, y.to("meta"), qi, 2), "outputs must be on device cpu"),
        ((x, y, qi.to("meta"), 2), "query_idx must be on device cpu"),
        ((x, y, qi, 2, torch.ones(3, device="meta")), "scale must be on device cpu"),
        ((x, y, torch.tensor([0, 10]), 2), r"query_idx entries must be in \[0, N=10\)"),
        ((x, y, torch.tensor([-1, 3]), 2), r"query_idx entries must be in \[0, N=10\)"),
        ((x, y, qi, 10), r"k must be in \[1, N - 1=9\]"),
        ((x, y, qi, 0), r"k must be in \[1, N - 1=9\]"),
        ((x, y, qi, 2, torch.ones(2)), r"scale must have shape \[3\]"),
        ((x, y, qi, 2, torch.tensor([1.0, 0.0, 1.0])), "scale entries must be positive"),
        ((x, y, qi, 2, torch.ones(3, dtype=torch.float64)), "scale must have dtype torch.float32"),
        ((x, y, qi, 2, torch.tensor([1.0, float("inf"), 1.0])), "scale entries must be positive and finite"),
        ((x, y, qi, 2, torch.tensor([1.0, float("nan"), 1.0])), "scale entries must be positive and finite"),
    ]


@pytest.mark.parametrize("args,match", _bad_fd_cases())
def test_fd_targets_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        fd_targets(*args)
    with pytest.raises(ValueError, match=match):
        fd_targets_ref(*args)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
@pytest.mark.parametrize("name", ["queries", "points"])
def test_knn_rejects_non_finite(name, value):
    args = {"queries": torch.randn(4, 3), "points": torch.randn(10, 3)}
    args[name][2, 1] = value
    for fn in (knn, knn_ref):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            fn(args["queries"], args["points"], 2)
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            fn(args["queries"], args["points"], 2, torch.tensor([0, -1, 3, 9]))


@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_fd_targets_rejects_non_finite_inputs(value):
    inputs, outputs, query_idx = _fd_data(n=40, q=5)
    inputs[7, 2] = value
    for fn in (fd_targets, fd_targets_ref):
        with pytest.raises(ValueError, match="inputs must be finite"):
            fn(inputs, outputs, query_idx, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fd_targets_accepts_non_finite_outputs(backend):
    """outputs take no part in the search: the neighbours are unchanged and only the deltas that
    use the non-finite row are non-finite."""
    inputs, outputs, query_idx = _fd_data(n=60, q=9)
    query_idx[2] = 5
    bad = outputs.clone()
    bad[5, 1] = float("nan")
    bad[11, 0] = float("inf")
    directions, deltas, idx = fd_targets(inputs, bad, query_idx, 4, backend=backend)
    want = fd_targets(inputs, outputs, query_idx, 4, backend=backend)
    assert torch.equal(idx, want[2]) and torch.equal(directions, want[0])
    torch.testing.assert_close(deltas, bad[idx] - bad[query_idx, None], equal_nan=True)
    uses_bad = (idx == 5) | (idx == 11) | (query_idx[:, None] == 5) | (query_idx[:, None] == 11)
    assert bool(torch.isfinite(deltas[~uses_bad]).all())
    assert not bool(torch.isfinite(deltas[uses_bad]).all(-1).any())


class _HostReads:
    """Counts the ways a tensor value reaches Python (each one a device sync on CUDA)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, fn):
        def wrapper(t, *args, **kwargs):
            self.calls.append(name)
            return fn(t, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_value_checks_read_the_host_once(backend, monkeypatch):
    inputs, outputs, query_idx = _fd_data(n=80, q=9)
    scale = torch.rand(inputs.shape[1]) + 0.5
    x = inputs[query_idx]
    reads = _HostReads(monkeypatch)
    knn(x, inputs, 3, backend=backend)
    assert reads.calls == ["tolist"]
    reads.calls.clear()
    knn(x, inputs, 3, query_idx, backend=backend)
    assert reads.calls == ["tolist"]
    reads.calls.clear()
    fd_targets(inputs, outputs, query_idx, 3, scale, backend=backend)
    assert reads.calls == ["tolist"]


def _non_finite_case(dtype, device):
    """Points 1 and 4 hold NaN, point 6 an inf: only 5 points are at a finite distance. Query 1
    holds a NaN and query 2 an inf: they have no neighbour at all."""
    points = torch.randn(8, 3, dtype=dtype)
    points[1, 0] = float("nan")
    points[4, 2] = float("nan")
    points[6, 1] = float("inf")
    queries = torch.randn(4, 3, dtype=dtype)
    queries[1, 2] = float("nan")
    queries[2, 0] = float("-inf")
    return queries.to(device), points.to(device)


KERNEL_BACKENDS = CPU_BACKENDS + [pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda_ext])]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_agree_on_non_finite_rows(backend, dtype):
    """Without the Python checks (direct op calls, torch.compile) every backend returns only points
    at a finite distance and pads with (+inf, -1)."""
    device = "cuda" if backend == "cuda" else "cpu"
    queries, points = _non_finite_case(dtype, device)
    finite_rows = torch.tensor([0, 2, 3, 5, 7])
    for k, exclude in ((3, None), (7, None), (7, torch.tensor([0, -1, 5, 3])), (8, None)):
        ex = None if exclude is None else exclude.to(device)
        with no_host_sync(device):
            dist2, idx = _knn_dispatch(queries, points, k, ex, backend)
        dist2, idx = dist2.cpu(), idx.cpu()
        assert dist2.dtype == dtype and idx.dtype == torch.int64 and dist2.shape == idx.shape == (4, k)
        for q in (1, 2):
            assert idx[q].tolist() == [-1] * k and bool(torch.isinf(dist2[q]).all() & (dist2[q] > 0).all())
        for q in (0, 3):
            candidates = finite_rows
            if exclude is not None:
                candidates = candidates[candidates != exclude[q]]
            want = ((queries[q].cpu()[None] - points.cpu()[candidates]) ** 2).sum(-1).sort().values[:k]
            found = min(k, len(candidates))
            assert set(idx[q, :found].tolist()) <= set(candidates.tolist())
            assert idx[q, found:].tolist() == [-1] * (k - found)
            assert bool(torch.isinf(dist2[q, found:]).all())
            torch.testing.assert_close(dist2[q, :found], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_skips_value_checks(backend):
    queries, points = _non_finite_case(torch.float32, "cpu")
    compiled = torch.compile(lambda q, p: knn(q, p, 7, backend=backend), fullgraph=True, backend="aot_eager")
    dist2, idx = compiled(queries, points)
    want = _knn_dispatch(queries, points, 7, None, backend)
    torch.testing.assert_close(dist2, want[0])
    assert torch.equal(idx, want[1]) and idx[1].tolist() == [-1] * 7


@needs_ext
def test_knn_opcheck():
    op = torch.ops.fastrp_C.knn.default
    queries, points = torch.randn(9, 5), torch.randn(40, 5)
    torch.library.opcheck(op, (queries, points, 4, None))
    torch.library.opcheck(op, (queries, points, 39, torch.arange(9)))
    torch.library.opcheck(op, (queries.double(), points.double(), 1, None))


@needs_ext
def test_cpp_kernel_checks_its_invariants():
    with pytest.raises(RuntimeError, match="exclude"):
        torch.ops.fastrp_C.knn(torch.randn(2, 3), torch.randn(5, 3), 2, torch.tensor([0, 7]))
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.fastrp_C.knn(torch.randn(2, 3), torch.randn(5, 3), 6, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    inputs, outputs, query_idx = _fd_data(n=120, q=9)

    def step(x, y, qi):
        dist2, idx = knn(x[qi], x, 5, qi, backend=backend)
        directions, deltas, _ = fd_targets(x, y, qi, 5, backend=backend)
        return dist2, idx, directions, deltas

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(inputs, outputs, query_idx)
    want = step(inputs, outputs, query_idx)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from fastrp.ops.knn import knn, knn_ref

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    queries, points = torch.randn(n, d), torch.randn(n, d)
    fn = knn_ref if backend == "ref" else (lambda *a: knn(*a, backend=backend))
    fn(queries[:300], points[:300], 10)  # warm-up: allocator pools, thread pools
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    rss_before = status_kib("VmRSS")
    dist2, idx = fn(queries, points, 10)
    print(max(0, status_kib("VmHWM") - rss_before) * 1024)
    """
)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpp", marks=needs_ext)])
def test_memory_is_tiled(backend):
    """Q = N = 12,000: a full float32 distance matrix would take 576 MB; the peak RSS growth of
    the call (VmHWM, reset just before it, in a fresh process) must stay far below it. A fixed
    glibc mmap threshold makes freed tiles leave the RSS at once, so the peak measures live
    memory, not malloc's caching."""
    n, d = 12_000, 23
    full_matrix = n * n * 4
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(d), backend], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < full_matrix / 8, f"peak RSS grew by {growth / 2**20:.0f} MiB (full matrix {full_matrix / 2**20:.0f} MiB)"


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 37, 5), (37, 257, 23), (257, 1000, 23), (5, 50_000, 23),
                                   (1000, 3000, 40), (300, 900, 129)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(shape, dtype):
    q_count, n, d = shape
    queries, points = torch.randn(q_count, d, dtype=dtype), torch.randn(n, d, dtype=dtype)
    qc, pc = queries.cuda(), points.cuda()
    for k in sorted({1, min(10, n), min(n, 100)}):
        with no_host_sync():
            dist2, idx = knn(qc, pc, k, backend="cuda")
        check_knn_result(qc, pc, k, None, dist2, idx)
        ref32, _ = knn_ref(queries.float(), points.float(), k)
        assert_close_to_ref(dist2.cpu(), ref32, knn_ref(queries.double(), points.double(), k)[0], name="cuda dist2")
    exclude = torch.randint(-1, n, (q_count,)).cuda()
    if n > 1:
        with no_host_sync():
            dist2, idx = knn(qc, pc, n - 1, exclude, backend="cuda")
        check_knn_result(qc, pc, n - 1, exclude, dist2, idx)
        cpu_dist2, _ = knn(queries, points, n - 1, exclude.cpu(), backend="torch")
        torch.testing.assert_close(dist2.cpu(), cpu_dist2, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_large_k_and_duplicates():
    base = torch.randn(50, 7)
    points = base[torch.randint(0, 50, (3000,))].cuda()
    for k in (3000, 1500, 257):
        with no_host_sync():
            dist2, idx = knn(points[:64], points, k, backend="cuda")
        check_knn_result(points[:64], points, k, None, dist2, idx)
        torch.testing.assert_close(dist2.cpu(), brute_force(points[:64].cpu(), points.cpu(), k).float(),
                                   rtol=1e-5, atol=1e-5)
    exclude = torch.arange(3000, device="cuda")
    with no_host_sync():
        dist2, idx = knn(points, points, 2999, exclude, backend="cuda")
    check_knn_result(points, points, 2999, exclude, dist2, idx)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_fd_targets_auto_backend_and_opcheck():
    inputs, outputs, query_idx = _fd_data(n=5000, q=256)
    scale = torch.rand(inputs.shape[1]) + 0.5
    on_gpu = inputs.cuda(), outputs.cuda(), query_idx.cuda(), 10, scale.cuda()
    with no_host_sync():
        got = fd_targets(*on_gpu)
    want = fd_targets(inputs, outputs, query_idx, 10, scale, backend="torch")
    x = inputs / scale
    searched = ((x[got[2].cpu()] - x[query_idx, None]) ** 2).sum(-1)
    torch.testing.assert_close(searched, ((x[want[2]] - x[query_idx, None]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].cpu(), inputs[got[2].cpu()] - inputs[query_idx, None])
    torch.library.opcheck(torch.ops.fastrp_C.knn.default,
                          (inputs[:9].cuda(), inputs.cuda(), 4, torch.arange(9, device="cuda")))
