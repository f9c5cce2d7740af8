"""No op hot path reads a device value back to the host (a sync on CUDA, illegal in graph capture).

On the CPU the ops may read values (validation, the torch backend's grouped rows): they ask
``fastrp.ops._common.device_side(t)`` first. Here that answer is forced to True, as on a GPU, and
every way of reading a value back raises: ``aten._local_scalar_dense`` (``.item()``, ``int()``,
``bool()`` of a tensor), ``aten.nonzero`` and ``aten.is_nonzero`` at the dispatcher, and
``Tensor.tolist`` / ``item`` / ``__bool__`` (which reach data without dispatching on the CPU). The
ops then run forward and backward; their results still match the host-reading CPU path. The CUDA
tests of the suite run the same calls under ``torch.cuda.set_sync_debug_mode("error")``.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastrp.ops as ops
from fastrp.nn.ensemble import EnsembleMLP
from fastrp.ops import _common
from utils import no_host_sync

SYNCS = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.is_nonzero, torch.ops.aten.item}


class HostReadError(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCS:
            raise HostReadError(f"host read in an op hot path: {func}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__bool__")}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} in an op hot path")
        return method

    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        with NoHostReads():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture
def as_on_gpu(monkeypatch):
    """Ops take their device-side paths; inside ``with as_on_gpu():`` any read back to the host
    raises (checks of the results run outside it)."""
    monkeypatch.setattr(_common, "device_side", lambda t: True)
    return _no_host_reads


def _mlp_problem(E=3, dims=(4, 6, 5, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, a, b, generator=g).requires_grad_() for a, b in zip(dims[:-1], dims[1:])]
    bs = [torch.randn(E, b, generator=g).requires_grad_() for b in dims[1:]]
    ss = [torch.rand(E, generator=g) + 0.5, None, torch.rand(E, generator=g) + 0.5]
    return ws, bs, ss


def test_the_guard_catches_host_reads(as_on_gpu):
    """The fixture is not vacuous: each kind of host read raises under it."""
    t = torch.tensor([1, 0, 2])
    for read in (lambda: t.tolist(), lambda: t.sum().item(), lambda: bool(t.all()), lambda: t.nonzero(),
                 lambda: int(t[0])):
        with pytest.raises(HostReadError), as_on_gpu():
            read()


@pytest.mark.parametrize("grouped", [False, True])
def test_ensemble_mlp_reads_nothing_back(as_on_gpu, grouped):
    ws, bs, ss = _mlp_problem()
    if grouped:
        x = torch.randn(7, 4, requires_grad=True)
        members = torch.tensor([2, 0, 2, 2, 0, 2, 0])  # member 1 gets no row
    else:
        x, members = torch.randn(3, 5, 4, requires_grad=True), None
    with as_on_gpu():
        y = ops.ensemble_mlp(x, ws, bs, ss, "tanh", members=members, backend="torch")
        grads = torch.autograd.grad(y.square().sum(), [x] + ws + bs[:1])
    ref = ops.ensemble_mlp_ref(x, ws, bs, ss, "tanh", members=members)
    want = torch.autograd.grad(ref.square().sum(), [x] + ws + bs[:1])
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_linear_jvp_and_spectral_norm_read_nothing_back(as_on_gpu):
    ws, bs, ss = _mlp_problem(seed=1)
    x = torch.randn(3, 5, 4, requires_grad=True)
    t = torch.randn(3, 5, 2, 4)
    vs = [torch.nn.functional.normalize(torch.randn(3, w.shape[1]), dim=1) for w in ws]
    with as_on_gpu():
        y = ops.ensemble_linear(x, ws[0], bs[0], ss[0], backend="torch")
        g_lin = torch.autograd.grad(y.sum(), [x, ws[0]])
        y, jy = ops.ensemble_mlp_jvp(x, t, ws, bs, ss, "silu", backend="torch")
        g_jvp = torch.autograd.grad(y.sum() + jy.square().sum(), [x] + ws)
        sigmas, _, _ = ops.spectral_norm_layers(ws, vs, 1, backend="torch")
        g_sn = torch.autograd.grad(sum(s.sum() for s in sigmas), ws)
        sigma, _, _ = ops.spectral_norm(ws[0], vs[0], 2, backend="torch")
        torch.autograd.grad(sigma.sum(), ws[0])
    yr, jyr = ops.ensemble_mlp_jvp_ref(x, t, ws, bs, ss, "silu")
    for a, b in zip(g_jvp, torch.autograd.grad(yr.sum() + jyr.square().sum(), [x] + ws)):
        torch.testing.assert_close(a, b)
    for a, b in zip(g_lin, torch.autograd.grad(ops.ensemble_linear_ref(x, ws[0], bs[0], ss[0]).sum(), [x, ws[0]])):
        torch.testing.assert_close(a, b)
    assert all(g.abs().sum() > 0 for g in g_sn[:1])


def test_members_range_checked_on_the_device(as_on_gpu):
    ws, bs, ss = _mlp_problem()
    with pytest.raises(RuntimeError, match="members must lie in"), as_on_gpu():
        ops.ensemble_mlp(torch.randn(2, 4), ws, bs, ss, members=torch.tensor([0, 3]), backend="torch")


def test_knn_and_fd_targets_validate_on_the_device(as_on_gpu):
    q, p = torch.randn(6, 3), torch.randn(20, 3)
    inputs, outputs = torch.randn(30, 3), torch.randn(30, 2)
    with as_on_gpu():
        dist, idx = ops.knn(q, p, 4, backend="torch")
        d, dy, i = ops.fd_targets(inputs, outputs, torch.arange(5), 3, backend="torch")
    want = ops.knn_ref(q, p, 4)
    torch.testing.assert_close(dist, want[0])
    assert torch.equal(idx, want[1]) and d.shape == (5, 3, 3) and dy.shape == (5, 3, 2)
    with pytest.raises(RuntimeError, match="points must be finite"), as_on_gpu():
        ops.knn(q, torch.full((20, 3), float("nan")), 4, backend="torch")
    with pytest.raises(RuntimeError, match="query_idx entries must be in"), as_on_gpu():
        ops.fd_targets(inputs, outputs, torch.tensor([0, 30]), 3, backend="torch")


@pytest.mark.parametrize("training", [True, False])
def test_ensemble_module_reads_nothing_back(as_on_gpu, training):
    """EnsembleMLP with spectral norm: power iteration, buffer update, forward, JVP, backward."""
    net = EnsembleMLP(4, 2, 8, 2, 3, spectral_norm="hidden", backend="torch").train(training)
    x, t, x2 = torch.randn(3, 5, 4), torch.randn(3, 5, 2, 4), torch.randn(4, 4)
    members = torch.tensor([0, 2, 2, 1])
    with as_on_gpu():
        y = net(x)
        y_j, jy = net.forward_jvp(x, t)
        torch.autograd.grad(y.sum() + y_j.sum() + jy.sum(), list(net.parameters()))
        torch.autograd.grad(net(x2, members=members).sum(), list(net.parameters()))
    assert torch.isfinite(y).all() and torch.isfinite(jy).all()


@pytest.mark.cuda
def test_cuda_ops_do_not_sync():
    """On a GPU, every op's forward and backward under torch.cuda.set_sync_debug_mode("error"),
    the first call of each shape included (it compiles the kernels and builds their small cached
    tables on the device); the results equal a second, unguarded call's."""
    dev = torch.device("cuda")
    ws, bs, ss = _mlp_problem()
    ws = [w.detach().to(dev).requires_grad_() for w in ws]
    bs = [b.detach().to(dev).requires_grad_() for b in bs]
    ss = [None if s is None else s.to(dev) for s in ss]
    x = torch.randn(3, 5, 4, device=dev, requires_grad=True)
    xg, members = torch.randn(7, 4, device=dev, requires_grad=True), torch.tensor([2, 0, 2, 2, 0, 2, 0], device=dev)
    t = torch.randn(3, 5, 2, 4, device=dev)
    vs = [torch.nn.functional.normalize(torch.randn(3, w.shape[1], device=dev), dim=1) for w in ws]
    q, p = torch.randn(64, 3, device=dev), torch.randn(256, 3, device=dev)

    def calls():
        out = []
        for backend in ("triton", "torch"):
            y = ops.ensemble_mlp(x, ws, bs, ss, members=None, backend=backend)
            out += torch.autograd.grad(y.sum(), [x] + ws)
            y = ops.ensemble_mlp(xg, ws, bs, ss, members=members, backend=backend)
            out += torch.autograd.grad(y.sum(), [xg] + ws)
            y, jy = ops.ensemble_mlp_jvp(x, t, ws, bs, ss, backend=backend)
            out += torch.autograd.grad(y.sum() + jy.sum(), [x] + ws)
            sigmas, _, _ = ops.spectral_norm_layers(ws, vs, 1, backend=backend)
            out += torch.autograd.grad(sum(s.sum() for s in sigmas), ws)
        out += ops.knn(q, p, 4, torch.arange(64, device=dev))
        return out

    with no_host_sync():
        got = calls()
    want = calls()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
