"""ensemble_mlp: torch and Triton (interpreted on CPU) backends against the reference, forward and
backward, the grouped-by-member option, gradcheck, opcheck, torch.compile and bad inputs."""

import pytest
import torch

from fastrp.ops._common import resolve_backend
from fastrp.ops.mlp import ensemble_mlp, ensemble_mlp_ref
from utils import assert_close_to_ref, backends, needs_triton, no_host_sync


def make_params(E, dims, dtype=torch.float32, bias="all", scale="some", seed=0):
    """Weights ``[E, d_l, d_{l+1}]`` (Kaiming-like scale), biases/scales per mode:
    ``"none"``, ``"some"`` (every other layer) or ``"all"``."""
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1
    weights = [torch.randn(E, dims[l], dims[l + 1], generator=g, dtype=dtype) / dims[l] ** 0.5 for l in range(L)]

    def pick(l, mode):
        return mode == "all" or (mode == "some" and l % 2 == 0)

    biases = [0.3 * torch.randn(E, dims[l + 1], generator=g, dtype=dtype) if pick(l, bias) else None for l in range(L)]
    scales = [0.5 + torch.rand(E, generator=g, dtype=dtype) if pick(l, scale) else None for l in range(L)]
    return weights, biases, scales


def _leaves(x, weights, biases, scales, dtype):
    cast = lambda t: None if t is None else t.detach().to(dtype).clone().requires_grad_(True)  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases], [cast(s) for s in scales]


def _grads(out, grad, x, weights, biases, scales):
    inputs = [x] + weights + [b for b in biases if b is not None] + [s for s in scales if s is not None]
    names = ["x"] + [f"weights[{l}]" for l in range(len(weights))]
    names += [f"biases[{l}]" for l, b in enumerate(biases) if b is not None]
    names += [f"scales[{l}]" for l, s in enumerate(scales) if s is not None]
    return names, torch.autograd.grad(out, inputs, grad.to(out.dtype))


def check_against_ref(backend, x, weights, biases, scales, activation, members=None, device="cpu"):
    """Forward and all gradients of ``backend`` vs the float64 reference, with the tolerance of
    the float32 reference."""
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    x, weights, biases, scales = move(x), [move(w) for w in weights], [move(b) for b in biases], [move(s) for s in scales]
    members = move(members)
    grad = torch.randn(*x.shape[:-1], weights[-1].shape[2], dtype=torch.float64, device=device)
    runs, grads = {}, {}
    for tag, dtype in (("out", torch.float32), ("ref32", torch.float32), ("ref64", torch.float64)):
        xi, wi, bi, si = _leaves(x, weights, biases, scales, dtype)
        if tag == "out":
            with no_host_sync(device):  # on CUDA the op's forward and backward may not sync
                y = ensemble_mlp(xi, wi, bi, si, activation, members=members, backend=backend)
                grads[tag] = _grads(y, grad, xi, wi, bi, si)
        else:
            y = ensemble_mlp_ref(xi, wi, bi, si, activation, members=members)
            grads[tag] = _grads(y, grad, xi, wi, bi, si)
        runs[tag] = y
    assert_close_to_ref(runs["out"], runs["ref32"], runs["ref64"], name="y")
    (names, g_out), (_, g32), (_, g64) = grads["out"], grads["ref32"], grads["ref64"]
    for name, a, b, c in zip(names, g_out, g32, g64):
        assert a.dtype == torch.float32
        assert_close_to_ref(a, b, c, name=f"grad {name}")
    return runs["out"]


# ---------------------------------------------------------------------------------------------
# dense layout [E, B, in]

TORCH_CASES = [
    # E, B, dims (in, hidden..., out), activation, bias mode, scale mode
    (1, 1, [1, 5, 1], "silu", "all", "none"),
    (7, 37, [5, 200, 200, 3], "silu", "all", "some"),
    (7, 256, [23, 200, 200, 200, 200, 30], "silu", "all", "all"),
    (1, 37, [257, 257, 5], "relu", "none", "all"),
    (7, 1, [5, 1, 257, 7], "tanh", "some", "some"),
    (1, 256, [5, 200, 1], "tanh", "all", "none"),
    (7, 37, [1, 5, 5, 5, 5, 1], "relu", "some", "all"),
    (7, 256, [200, 257], "silu", "all", "all"),
]


@pytest.mark.parametrize("E,B,dims,activation,bias,scale", TORCH_CASES)
def test_torch_backend_matches_reference(E, B, dims, activation, bias, scale):
    weights, biases, scales = make_params(E, dims, bias=bias, scale=scale)
    x = torch.randn(E, B, dims[0])
    check_against_ref("torch", x, weights, biases, scales, activation)


# the interpreter is slow: small shapes that still cover ragged tiles, every activation, 1 to 4
# hidden layers, width 257 (three tiles) and 200, B = 1 / 37 / 256 and E = 1 / 7
TRITON_CASES = [
    (7, 37, [5, 7, 1], "silu", "all", "some"),
    (1, 1, [1, 5, 5, 5, 5, 3], "tanh", "some", "all"),
    (2, 3, [3, 257, 2], "relu", "none", "all"),
    (1, 5, [4, 200, 5], "silu", "all", "none"),
    (1, 256, [5, 16, 16, 2], "silu", "all", "all"),
    (7, 1, [2, 1], "silu", "none", "none"),
]


@needs_triton
@pytest.mark.parametrize("E,B,dims,activation,bias,scale", TRITON_CASES)
def test_triton_backend_matches_reference(E, B, dims, activation, bias, scale):
    weights, biases, scales = make_params(E, dims, bias=bias, scale=scale)
    x = torch.randn(E, B, dims[0])
    check_against_ref("triton", x, weights, biases, scales, activation)


@needs_triton
def test_triton_matches_torch_backend():
    weights, biases, scales = make_params(3, [6, 9, 4], bias="some", scale="all")
    x = torch.randn(3, 11, 6)
    a = ensemble_mlp(x, weights, biases, scales, backend="triton")
    b = ensemble_mlp(x, weights, biases, scales, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_backend_on_cpu_is_torch_and_biases_none_allowed():
    weights, _, _ = make_params(2, [3, 4, 2])
    x = torch.randn(2, 5, 3)
    y = ensemble_mlp(x, weights, None)
    torch.testing.assert_close(y, ensemble_mlp_ref(x, weights, None), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# grouped by member


def _members(kind, E, B):
    if kind == "random":  # with E = 7 and B = 5, at least two members get no sample
        return torch.randint(0, E, (B,))
    if kind == "one":
        return torch.full((B,), E - 1, dtype=torch.int64)
    return torch.zeros(B, dtype=torch.int64)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
@pytest.mark.parametrize("kind,E,B,dims", [
    ("random", 7, 5, [3, 6, 6, 2]),
    ("one", 7, 9, [4, 5, 3]),
    ("b1", 3, 1, [2, 7, 1]),
    ("random", 7, 37, [5, 200, 3]),
])
def test_members_matches_reference(backend, kind, E, B, dims):
    if backend == "triton" and dims[1] == 200:
        dims = [5, 17, 3]  # keep the interpreter quick
    weights, biases, scales = make_params(E, dims, bias="some", scale="some")
    x = torch.randn(B, dims[0])
    members = _members(kind, E, B)
    y = check_against_ref(backend, x, weights, biases, scales, "silu", members=members)
    assert y.shape == (B, dims[-1])


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_members_unused_member_gets_zero_weight_grad(backend):
    weights, biases, scales = make_params(4, [3, 5, 2], bias="all", scale="all")
    leaves = [t.requires_grad_(True) for t in weights + biases + scales]
    members = torch.tensor([0, 2, 2, 0, 2])
    y = ensemble_mlp(torch.randn(5, 3), weights, biases, scales, members=members, backend=backend)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    for g in grads:
        assert g[1].abs().max() == 0 and g[3].abs().max() == 0
        assert g[0].abs().max() > 0 and g[2].abs().max() > 0


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_members_isolated_from_other_members(backend):
    """A NaN in the weights of a member that no sample uses never reaches the output."""
    weights, biases, _ = make_params(3, [2, 4, 2])
    weights[0][1] = float("nan")
    members = torch.tensor([0, 2, 0, 2])
    y = ensemble_mlp(torch.randn(4, 2), weights, biases, members=members, backend=backend)
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# frozen parameters, inputs without gradient, determinism, tanh accuracy


def _spy_backward(monkeypatch, backend):
    """Record the ``(need_dx, need_params)`` flags of each backward call, and (Triton) count the
    weight-gradient kernel launches."""
    import fastrp.ops.mlp as mlp_mod

    calls = {"flags": [], "weight_launches": 0}
    if backend == "torch":
        real = mlp_mod._torch_backward

        def spy(*args):
            calls["flags"].append(args[-2:])
            return real(*args)

        monkeypatch.setattr(mlp_mod, "_torch_backward", spy)
    else:
        from fastrp.kernels import ensemble_mlp as kern

        real_bwd, real_kernel = kern.mlp_backward, kern._mlp_bwd_weight_kernel

        def spy(*args):
            calls["flags"].append(args[-2:])
            return real_bwd(*args)

        class Counting:
            def __getitem__(self, grid):
                calls["weight_launches"] += 1
                return real_kernel[grid]

        monkeypatch.setattr(kern, "mlp_backward", spy)
        monkeypatch.setattr(kern, "_mlp_bwd_weight_kernel", Counting())
    return calls


@pytest.mark.parametrize("backend", backends("torch", "triton"))
@pytest.mark.parametrize("grouped", [False, True])
def test_frozen_parameters_skip_weight_gradients(monkeypatch, backend, grouped):
    E, dims = 3, [4, 6, 2]
    weights, biases, scales = make_params(E, dims, bias="all", scale="all")
    members = torch.tensor([2, 0, 2, 1]) if grouped else None
    x = (torch.randn(4, dims[0]) if grouped else torch.randn(E, 4, dims[0])).requires_grad_(True)
    calls = _spy_backward(monkeypatch, backend)
    y = ensemble_mlp(x, weights, biases, scales, "tanh", members=members, backend=backend)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    assert calls["flags"] == [(True, False)]
    assert calls["weight_launches"] == 0
    x_ref = x.detach().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(
        ensemble_mlp_ref(x_ref, weights, biases, scales, "tanh", members=members), x_ref, g)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_input_without_grad_skips_dx(monkeypatch, backend):
    E, dims = 2, [3, 5, 5, 2]
    weights, biases, scales = make_params(E, dims, bias="some", scale="some")
    leaves = [t.requires_grad_(True) for t in weights]
    x = torch.randn(E, 6, dims[0])
    calls = _spy_backward(monkeypatch, backend)
    y = ensemble_mlp(x, weights, biases, scales, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    assert calls["flags"] == [(False, True)]
    want = torch.autograd.grad(ensemble_mlp_ref(x, leaves, biases, scales), leaves, g)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_weight_gradients_deterministic():
    weights, biases, scales = make_params(3, [40, 40, 3], bias="all", scale="all")
    leaves = [t.requires_grad_(True) for t in weights + biases + scales]
    x = torch.randn(3, 7, 40)
    runs = []
    for _ in range(2):
        y = ensemble_mlp(x, weights, biases, scales, backend="triton")
        runs.append(torch.autograd.grad(y.square().sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_tanh_accurate_near_zero(backend):
    """Tiny pre-activations keep their relative accuracy (``tanh(z) ≈ z``)."""
    E, d = 2, 16
    eye = torch.eye(d).expand(E, d, d).contiguous()
    x = torch.randn(E, 5, d) * 1e-6
    y = ensemble_mlp(x, [eye, eye], None, None, "tanh", backend=backend)
    want = torch.tanh(x.double())
    rel = ((y.double() - want).abs() / want.abs()).max().item()
    assert rel < 1e-6, rel


def test_row_grid_has_no_axis_limit():
    """The row kernels use one grid axis (2^31 - 1 programs), not the second one (65535)."""
    from fastrp.kernels.ensemble_mlp import row_programs

    big = 3_000_000  # rows per member: over 65535 blocks of 32 rows
    assert row_programs(1, big, 32, grouped=False) == triton_cdiv(big, 32) > 65535
    assert row_programs(7, 7 * big, 16, grouped=False) == 7 * triton_cdiv(big, 16)
    assert row_programs(7, 0, 16, grouped=False) == 0
    # grouped: the bound covers any split of the rows between members
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = torch.randint(0, 50, (7,), generator=g).tolist()
        need = sum(triton_cdiv(c, 16) for c in counts)
        assert need <= row_programs(7, sum(counts), 16, grouped=True)


def triton_cdiv(a, b):
    return -(-a // b)


def test_layers_split_only_when_the_fused_grid_leaves_sms_idle():
    pytest.importorskip("triton")
    from fastrp.kernels.ensemble_mlp import forced_layout, split_layers
    from fastrp.kernels._target import compile_for

    cpu = torch.device("cpu")
    assert not split_layers(112, cpu)  # the interpreter: one fused launch
    with compile_for(132):  # an H200: E = 7, B = 256 gives 112 row blocks of 16
        assert split_layers(112, cpu) and split_layers(23, cpu) and not split_layers(132, cpu)
        assert not split_layers(3, cpu, split=False)
        with forced_layout(False):
            assert not split_layers(112, cpu)
    assert split_layers(500, cpu, split=True)
    with forced_layout(True):
        assert split_layers(500, cpu) and not split_layers(500, cpu, split=False)


@needs_triton
@pytest.mark.parametrize("grouped", [False, True])
def test_layer_split_equals_the_fused_launch(grouped):
    """One launch per layer with its columns split across programs (what a GPU runs when the fused
    grid leaves SMs idle) gives bit for bit the fused launch's results, forward and backward, with
    and without dx; widths over the interpreter's 128-column tile so layers have several column
    blocks."""
    from fastrp.kernels.ensemble_mlp import mlp_backward, mlp_forward

    E, dims = 3, [5, 200, 257, 3]
    weights, biases, scales = make_params(E, dims, bias="some", scale="some")
    R = E * 37
    x = torch.randn(R, dims[0])
    seg = torch.tensor([0, 40, 40, R]) if grouped else None  # member 1 gets no row
    g = torch.randn(R, dims[-1])
    runs = []
    for split in (False, True):
        y, z = mlp_forward(x, seg, weights, biases, scales, "tanh", split=split)
        dx, dws, dbs, ds = mlp_backward(g, x, seg, weights, scales, z, "tanh", need_dx=True, split=split)
        dx0, dws0, _, _ = mlp_backward(g, x, seg, weights, scales, z, "tanh", need_dx=False, split=split)
        runs.append([y, z, dx, *dws, *dbs, ds, *dws0])
        assert dx0.shape == (0, dims[0])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = ensemble_mlp_ref(x.view(E, 37, -1) if not grouped else x, weights, biases, scales, "tanh",
                            members=None if not grouped else torch.repeat_interleave(torch.tensor([0, 2]),
                                                                                     torch.tensor([40, R - 40])))
    torch.testing.assert_close(runs[1][0], want.reshape(R, -1), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("members_kind", [None, "random"])
def test_op_with_layers_split_matches_reference(monkeypatch, members_kind):
    """The whole op (forward, data and weight gradients) through the per-layer launches."""
    import fastrp.kernels.ensemble_mlp as kern

    auto = kern.split_layers
    monkeypatch.setattr(kern, "split_layers", lambda rows, device, split=None: auto(rows, device, True))
    E, B, dims = 3, 37, [5, 200, 257, 3]
    weights, biases, scales = make_params(E, dims, bias="some", scale="all")
    members = None if members_kind is None else _members(members_kind, E, B)
    x = torch.randn(B, dims[0]) if members is not None else torch.randn(E, B, dims[0])
    check_against_ref("triton", x, weights, biases, scales, "silu", members=members)


# ---------------------------------------------------------------------------------------------
# gradcheck / opcheck / compile


def _gradcheck(backend, members=None, fast=False):
    E, dims = 2, [2, 3, 2, 2]
    weights, biases, scales = make_params(E, dims, dtype=torch.float64, bias="some", scale="some")
    B = 3
    x = torch.randn(E, B, dims[0], dtype=torch.float64) if members is None else torch.randn(B, dims[0], dtype=torch.float64)
    params = [x] + weights + [biases[0], biases[2], scales[0], scales[2]]
    params = [p.requires_grad_(True) for p in params]

    def f(x, w0, w1, w2, b0, b2, s0, s2):
        return ensemble_mlp(x, [w0, w1, w2], [b0, None, b2], [s0, None, s2], "silu", members=members, backend=backend)

    assert torch.autograd.gradcheck(f, params, fast_mode=fast)


def test_gradcheck_torch():
    _gradcheck("torch")


def test_gradcheck_torch_members():
    _gradcheck("torch", members=torch.tensor([1, 1, 0]))


@needs_triton
def test_gradcheck_triton():
    _gradcheck("triton", fast=True)


@needs_triton
def test_gradcheck_triton_members():
    _gradcheck("triton", members=torch.tensor([1, 1, 1]), fast=True)


@pytest.mark.parametrize("impl", backends("torch", "triton"))
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("need_dx,need_params", [(True, True), (False, True), (True, False)])
def test_opcheck(impl, grouped, need_dx, need_params):
    """The registered ops (what torch.compile traces; autograd is the op's one Function around
    them) against their fake implementations; optional biases / scales as ``Tensor?[]``."""
    from fastrp.ops.mlp import _mlp_fwd_op  # noqa: F401  (registers the ops)

    E, dims = 2, [3, 4, 2]
    weights, biases, scales = make_params(E, dims, bias="some", scale="all")
    seg = torch.tensor([0, 1, 3]) if grouped else None
    x = torch.randn(3 if grouped else E * 2, dims[0])
    args = (x, seg, weights, biases, scales, "tanh", impl, "ieee")
    torch.library.opcheck(torch.ops.fastrp.ensemble_mlp_fwd.default, args)
    y, saved = torch.ops.fastrp.ensemble_mlp_fwd(*args)
    bwd_args = (torch.randn_like(y), x, seg, weights, scales, saved, "tanh", impl, "ieee", need_dx, need_params)
    torch.library.opcheck(torch.ops.fastrp.ensemble_mlp_bwd.default, bwd_args)


@pytest.mark.parametrize("impl", backends("torch", "triton"))
def test_opcheck_non_contiguous_inputs(impl):
    """The fake kernels report the (contiguous) strides the real ones return."""
    from fastrp.ops.mlp import _mlp_fwd_op  # noqa: F401  (registers the ops)

    E, dims = 2, [3, 4, 2]
    weights, biases, scales = make_params(E, dims, bias="some", scale="all")
    weights = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in weights]
    x = torch.randn(dims[0], E * 2).T
    assert not x.is_contiguous() and not weights[0].is_contiguous()
    args = (x, None, weights, biases, scales, "silu", impl, "ieee")
    torch.library.opcheck(torch.ops.fastrp.ensemble_mlp_fwd.default, args)
    y, saved = torch.ops.fastrp.ensemble_mlp_fwd(*args)
    gy = torch.randn(y.shape[1], y.shape[0]).T
    bwd_args = (gy, x, None, weights, scales, saved, "silu", impl, "ieee", True, True)
    torch.library.opcheck(torch.ops.fastrp.ensemble_mlp_bwd.default, bwd_args)


@pytest.mark.parametrize("grouped", [False, True])
def test_torch_compile_fullgraph(grouped):
    torch._dynamo.reset()
    E, dims = 3, [4, 8, 8, 2]
    weights, biases, scales = make_params(E, dims, bias="all", scale="some")
    weights = [w.requires_grad_(True) for w in weights]
    members = torch.tensor([2, 0, 2, 2, 1]) if grouped else None
    x = torch.randn(5, dims[0]) if grouped else torch.randn(E, 5, dims[0])

    def loss(x, weights, members):
        return ensemble_mlp(x, weights, biases, scales, "silu", members=members, backend="torch").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x, weights, members)
    g_got = torch.autograd.grad(got, weights)
    want = loss(x, weights, members)
    g_want = torch.autograd.grad(want, weights)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# bad inputs


def _good(E=2, dims=(3, 4, 2), B=5):
    weights, biases, scales = make_params(E, list(dims), bias="all", scale="all")
    return torch.randn(E, B, dims[0]), weights, biases, scales


def test_bad_inputs():
    x, w, b, s = _good()
    with pytest.raises(ValueError, match="x must have shape"):
        ensemble_mlp(torch.randn(3, 5, 3), w, b, s)  # E mismatch
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        ensemble_mlp(x, [w[0], torch.randn(2, 5, 2)], b, s)  # widths chain
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        ensemble_mlp(x, [w[0], torch.randn(3, 4, 2)], b, s)  # E mismatch across layers
    with pytest.raises(ValueError, match="biases must be None or a list of 2 entries"):
        ensemble_mlp(x, w, b[:1], s)
    with pytest.raises(ValueError, match="scales must be None or a list of 2 entries"):
        ensemble_mlp(x, w, b, s + [None])
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_mlp(torch.randn(0, 5, 3), [torch.randn(0, 3, 2)], None)
    with pytest.raises(ValueError, match=r"biases\[0\] must have shape"):
        ensemble_mlp(x, w, [torch.randn(2, 5), b[1]], s)
    with pytest.raises(ValueError, match=r"scales\[1\] must have shape"):
        ensemble_mlp(x, w, b, [s[0], torch.rand(3)])
    with pytest.raises(ValueError, match="x must have dtype"):
        ensemble_mlp(x.half(), w, b, s)
    with pytest.raises(ValueError, match=r"weights\[0\] must have dtype"):
        ensemble_mlp(x, [w[0].double(), w[1]], b, s)
    with pytest.raises(ValueError, match=r"biases\[1\] must have dtype"):
        ensemble_mlp(x, w, [b[0], b[1].double()], s)
    with pytest.raises(ValueError, match="activation must be one of"):
        ensemble_mlp(x, w, b, s, "gelu")
    with pytest.raises(ValueError, match="weights must be a non-empty list"):
        ensemble_mlp(x, [], [], None)
    with pytest.raises(ValueError, match="backend"):
        ensemble_mlp(x, w, b, s, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ensemble_mlp(x, w, b, s, backend="nope")
    with pytest.raises(ValueError, match="x must be a 3-d tensor"):
        ensemble_mlp(x[0], w, b, s)


def test_bad_members():
    x, w, b, s = _good()
    x2 = x[0]
    with pytest.raises(ValueError, match="members must lie in"):
        ensemble_mlp(x2, w, b, s, members=torch.tensor([0, 1, 2, 0, 0]))
    with pytest.raises(ValueError, match="members must lie in"):
        ensemble_mlp(x2, w, b, s, members=torch.tensor([0, -1, 1, 0, 0]))
    with pytest.raises(ValueError, match="members must have dtype"):
        ensemble_mlp(x2, w, b, s, members=torch.tensor([0, 1, 1, 0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="members must have shape"):
        ensemble_mlp(x2, w, b, s, members=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="x must be a 2-d tensor"):
        ensemble_mlp(x, w, b, s, members=torch.tensor([0, 1, 1, 0, 0]))


def test_bad_members_under_compile():
    """Under torch.compile the range check cannot read values back; a device-side assert still
    rejects out-of-range members instead of returning uninitialised rows."""
    torch._dynamo.reset()
    x, w, b, s = _good()

    def f(x, members):
        return ensemble_mlp(x, w, b, s, members=members, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    good = torch.tensor([0, 1, 1, 0, 0])
    torch.testing.assert_close(compiled(x[0], good), f(x[0], good))
    with pytest.raises(RuntimeError, match="members must lie in"):
        compiled(x[0], torch.tensor([0, 1, 2, 0, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device")
def test_device_mismatch_cuda():
    x, w, b, s = _good()
    with pytest.raises(ValueError, match=r"weights\[0\] must be on device"):
        ensemble_mlp(x.cuda(), w, b, s)


def test_device_mismatch_meta():
    x, w, b, s = _good()
    with pytest.raises(ValueError, match=r"biases\[1\] must be on device"):
        ensemble_mlp(x, w, [b[0], b[1].to("meta")], s)
    with pytest.raises(ValueError, match="members must be on device"):
        ensemble_mlp(x[0], w, b, s, members=torch.zeros(5, dtype=torch.int64, device="meta"))


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("E,B,dims,activation,bias,scale", TORCH_CASES)
def test_cuda_matches_reference(backend, E, B, dims, activation, bias, scale):
    weights, biases, scales = make_params(E, dims, bias=bias, scale=scale)
    x = torch.randn(E, B, dims[0])
    check_against_ref(backend, x, weights, biases, scales, activation, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("kind,E,B", [("random", 7, 256), ("random", 7, 5), ("one", 7, 37), ("b1", 7, 1)])
def test_cuda_members_matches_reference(kind, E, B):
    dims = [23, 200, 200, 200, 200, 30]
    weights, biases, scales = make_params(E, dims, bias="all", scale="some")
    x = torch.randn(B, dims[0])
    check_against_ref("triton", x, weights, biases, scales, "silu", members=_members(kind, E, B), device="cuda")


@pytest.mark.cuda
def test_cuda_matches_cpu_and_auto_is_triton():
    E, dims = 7, [23, 200, 200, 200, 200, 30]
    weights, biases, scales = make_params(E, dims, bias="all", scale="all")
    x = torch.randn(E, 256, dims[0])
    cpu = ensemble_mlp(x, weights, biases, scales, backend="torch")
    cuda = [t.cuda() for t in weights], [t.cuda() for t in biases], [t.cuda() for t in scales]
    xc = x.cuda()
    with no_host_sync():
        gpu = ensemble_mlp(xc, *cuda)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    assert resolve_backend("ensemble_mlp", None, x.cuda().device, ("triton", "torch")) == "triton"


@pytest.mark.cuda
def test_cuda_gradcheck_triton():
    E, dims = 2, [2, 3, 2]
    weights, biases, scales = make_params(E, dims, dtype=torch.float64, bias="all", scale="all")
    params = [p.cuda().requires_grad_(True) for p in [torch.randn(E, 3, 2, dtype=torch.float64)] + weights + biases + scales]

    def f(x, w0, w1, b0, b1, s0, s1):
        return ensemble_mlp(x, [w0, w1], [b0, b1], [s0, s1], "tanh", backend="triton")

    assert torch.autograd.gradcheck(f, params, fast_mode=True)


@pytest.mark.cuda
def test_cuda_compile_triton():
    torch._dynamo.reset()
    weights, biases, scales = make_params(3, [4, 64, 2], bias="all", scale="all")
    weights = [w.cuda().requires_grad_(True) for w in weights]
    biases, scales = [b.cuda() for b in biases], [s.cuda() for s in scales]
    x = torch.randn(3, 16, 4, device="cuda")

    def loss(x, weights):
        return ensemble_mlp(x, weights, biases, scales, backend="triton").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    compiled(x, weights)  # compiling may synchronise; running the compiled graph may not
    with no_host_sync():
        got = compiled(x, weights)
        want = loss(x, weights)
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("grouped", [False, True])
def test_cuda_many_rows(grouped):
    """More than 65535 row blocks (the old grid's axis-1 limit) in the forward and backward."""
    E, B, dims = 2, 2_200_000, [3, 4, 2]
    weights, biases, scales = make_params(E, dims, bias="all", scale="all")
    weights = [w.cuda().requires_grad_(True) for w in weights]
    biases, scales = [b.cuda() for b in biases], [s.cuda() for s in scales]
    members = torch.randint(0, E, (B,), device="cuda") if grouped else None
    x = torch.randn(B, dims[0], device="cuda") if grouped else torch.randn(E, B, dims[0], device="cuda")
    x.requires_grad_(True)
    with no_host_sync():
        y = ensemble_mlp(x, weights, biases, scales, members=members, backend="triton")
        grads = torch.autograd.grad(y.sum(), [x] + weights)
        y_ref = ensemble_mlp(x, weights, biases, scales, members=members, backend="torch")
        grads_ref = torch.autograd.grad(y_ref.sum(), [x] + weights)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_second_device():
    """Launches run on the tensors' device, not the current one."""
    weights, biases, scales = make_params(2, [3, 8, 2], bias="all", scale="all")
    x = torch.randn(2, 5, 3)
    want = ensemble_mlp(x, weights, biases, scales, backend="torch")
    dev = torch.device("cuda", 1)
    args = x.to(dev), [w.to(dev) for w in weights], [b.to(dev) for b in biases], [s.to(dev) for s in scales]
    with no_host_sync(dev):
        got = ensemble_mlp(*args, backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_relu_propagates_nan(backend):
    """A NaN pre-activation stays NaN through ReLU (as torch.relu), instead of becoming 0 and
    hiding a diverged input; the other rows are unaffected."""
    weights, biases, _ = make_params(2, [3, 4, 2], bias="all", scale="none")
    x = torch.randn(2, 5, 3)
    x[1, 2, 0] = float("nan")
    y = ensemble_mlp(x, weights, biases, None, "relu", backend=backend)
    assert torch.isnan(y[1, 2]).all()
    nan_rows = torch.zeros(2, 5, dtype=torch.bool)
    nan_rows[1, 2] = True
    assert torch.isfinite(y[~nan_rows]).all()
    torch.testing.assert_close(y, ensemble_mlp_ref(x, weights, biases, None, "relu"), equal_nan=True)
