"""Tests of fastrp.ops.ensemble_mlp_jvp (torch and Triton backends; Triton via the interpreter on CPU)."""

import pytest
import torch

from fastrp.ops.jvp import _jvp_backward_op, _jvp_op, ensemble_mlp_jvp, ensemble_mlp_jvp_ref

from utils import assert_close_to_ref, needs_triton, no_host_sync

ACTS = ("silu", "relu", "tanh")


def make_problem(E, B, K, dims, bias="all", scale="none", dtype=torch.float32, device="cpu", seed=0):
    """Random MLP problem; ``bias``/``scale`` in {"all", "none", "some"} (``"some"``: every other layer)."""
    g = torch.Generator().manual_seed(seed)
    L = len(dims) - 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = rnd(E, B, dims[0])
    t = rnd(E, B, K, dims[0])
    weights = [rnd(E, a, b) / a**0.5 * 1.2 for a, b in zip(dims[:-1], dims[1:])]

    def pick(mode, l):
        return mode == "all" or (mode == "some" and l % 2 == 0)

    biases = [0.3 * rnd(E, dims[l + 1]) if pick(bias, l) else None for l in range(L)]
    scales = [0.5 + torch.rand(E, generator=g, dtype=torch.float64) if pick(scale, l) else None for l in range(L)]
    if scale == "none":
        scales = None
    return cast((x, t, weights, biases, scales), dtype, device)


def cast(problem, dtype, device="cpu"):
    def c(v):
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            return [c(u) for u in v]
        return v.detach().to(device=device, dtype=dtype)

    return tuple(c(v) for v in problem)


def params_of(problem):
    """Leaves that get gradients: x, tangents, weights, present biases, present scales."""
    x, t, weights, biases, scales = problem
    return [x, t] + list(weights) + [b for b in biases if b is not None] + [s for s in (scales or []) if s is not None]


def requires_grad(problem):
    for p in params_of(problem):
        p.requires_grad_(True)
    return problem


def grads(fn, problem, cot):
    """Gradients of ``<y, gy> + <jy, gjy>`` w.r.t. :func:`params_of`, plus the outputs."""
    problem = requires_grad(problem)
    y, jy = fn(*problem)
    gy, gjy = cast(cot, y.dtype, y.device)
    return (y, jy), torch.autograd.grad((y, jy), params_of(problem), (gy, gjy))


def check_forward(problem, activation, backend):
    p32 = cast(problem, torch.float32)
    p64 = cast(problem, torch.float64)
    y, jy = ensemble_mlp_jvp(*p32, activation=activation, backend=backend)
    y32, jy32 = ensemble_mlp_jvp_ref(*p32, activation=activation)
    y64, jy64 = ensemble_mlp_jvp_ref(*p64, activation=activation)
    assert y.dtype == torch.float32 and jy.dtype == torch.float32
    assert_close_to_ref(y, y32, y64, name="y")
    assert_close_to_ref(jy, jy32, jy64, name="jy")


def check_backward(problem, activation, backend):
    y64 = ensemble_mlp_jvp_ref(*cast(problem, torch.float64), activation=activation)
    cot = (torch.randn_like(y64[0]), torch.randn_like(y64[1]))
    _, g = grads(lambda *a: ensemble_mlp_jvp(*a, activation=activation, backend=backend),
                 cast(problem, torch.float32), cot)
    _, g32 = grads(lambda *a: ensemble_mlp_jvp_ref(*a, activation=activation), cast(problem, torch.float32), cot)
    _, g64 = grads(lambda *a: ensemble_mlp_jvp_ref(*a, activation=activation), cast(problem, torch.float64), cot)
    assert len(g) == len(g64)
    for i, (a, b, c) in enumerate(zip(g, g32, g64)):
        assert_close_to_ref(a, b, c, name=f"grad[{i}]")


# (E, B, K, dims, bias, scale, activation): a wide spread for the (fast) torch path.
TORCH_CASES = [
    (1, 1, 1, [1, 1], "all", "none", "silu"),
    (7, 37, 3, [5, 200, 1], "all", "all", "silu"),
    (1, 256, 10, [7, 257, 5], "none", "some", "tanh"),
    (7, 1, 10, [3, 5, 5, 4], "some", "all", "relu"),
    (7, 256, 3, [17, 200, 200, 200, 200, 18], "all", "all", "silu"),
    (1, 37, 1, [200, 257, 257, 1], "all", "some", "tanh"),
    (7, 37, 10, [1, 5, 1, 5, 1, 5], "none", "none", "relu"),
    (1, 256, 3, [5, 257, 200, 7], "some", "none", "silu"),
    (7, 256, 10, [9, 64, 64, 64, 9], "all", "all", "tanh"),
    (7, 37, 1, [4, 1, 200], "all", "some", "relu"),
]

# A representative, interpreter-friendly subset for the Triton path.
TRITON_CASES = [
    (1, 1, 1, [1, 1], "all", "none", "silu"),
    (7, 37, 3, [5, 200, 1], "all", "all", "silu"),
    (1, 37, 10, [7, 257, 5], "none", "some", "tanh"),
    (7, 5, 10, [3, 5, 5, 4], "some", "all", "relu"),
    (2, 256, 3, [6, 200, 200, 200, 200, 5], "all", "all", "silu"),
    (1, 3, 1, [1, 5, 1, 5, 1, 5], "none", "none", "relu"),
]


def case_id(c):
    E, B, K, dims, bias, scale, act = c
    return f"E{E}-B{B}-K{K}-{'x'.join(map(str, dims))}-b{bias}-s{scale}-{act}"


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_forward_torch(case):
    E, B, K, dims, bias, scale, act = case
    check_forward(make_problem(E, B, K, dims, bias, scale), act, "torch")


@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
def test_backward_torch(case):
    E, B, K, dims, bias, scale, act = case
    check_backward(make_problem(E, B, K, dims, bias, scale), act, "torch")


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_forward_triton(case):
    E, B, K, dims, bias, scale, act = case
    check_forward(make_problem(E, B, K, dims, bias, scale), act, "triton")


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES[1:4], ids=case_id)
def test_backward_triton(case):
    E, B, K, dims, bias, scale, act = case
    check_backward(make_problem(E, B, K, dims, bias, scale), act, "triton")


def _jvp_by_torch_func(x, t, weights, biases, scales, activation):
    """``torch.func.jvp`` of the plain ensemble MLP, one tangent direction at a time."""
    from fastrp.ops.mlp import ensemble_mlp_ref

    def f(inp):
        return ensemble_mlp_ref(inp, weights, biases, scales, activation)

    outs = [torch.func.jvp(f, (x,), (t[:, :, k].contiguous(),)) for k in range(t.shape[2])]
    return outs[0][0], torch.stack([o[1] for o in outs], dim=2)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_matches_torch_func_jvp(act, backend):
    problem = make_problem(7, 37, 3, [5, 200, 257, 4], "some", "some", seed=3)
    p32, p64 = cast(problem, torch.float32), cast(problem, torch.float64)
    y, jy = ensemble_mlp_jvp(*p32, activation=act, backend=backend)
    y32, jy32 = _jvp_by_torch_func(*p32, act)
    y64, jy64 = _jvp_by_torch_func(*p64, act)
    r64 = ensemble_mlp_jvp_ref(*p64, activation=act)
    torch.testing.assert_close(r64[0], y64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r64[1], jy64, rtol=1e-12, atol=1e-12)
    assert_close_to_ref(y, y32, y64, name="y")
    assert_close_to_ref(jy, jy32, jy64, name="jy")


def _gradcheck(act, backend, bias, scale, fast_mode=False):
    x, t, weights, biases, scales = requires_grad(
        make_problem(2, 3, 2, [3, 4, 5, 2], bias, scale, dtype=torch.float64, seed=1))
    L = len(weights)
    b_idx = [i for i, b in enumerate(biases) if b is not None]
    s_idx = [i for i, s in enumerate(scales or []) if s is not None]

    def fn(x, t, *flat):
        ws = list(flat[:L])
        bs = [None] * L
        for i, b in zip(b_idx, flat[L:L + len(b_idx)]):
            bs[i] = b
        ss = [None] * L
        for i, s in zip(s_idx, flat[L + len(b_idx):]):
            ss[i] = s
        return ensemble_mlp_jvp(x, t, ws, bs, ss, act, backend=backend)

    inputs = (x, t, *weights, *[biases[i] for i in b_idx], *[scales[i] for i in s_idx])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_torch(act):
    _gradcheck(act, "torch", "some", "some")
    _gradcheck(act, "torch", "all", "all")


@needs_triton
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_triton(act):
    # fast mode (random projections): a few interpreted launches instead of one per input element
    _gradcheck(act, "triton", "some", "all", fast_mode=True)


def _op_args(problem, activation, backend):
    x, t, weights, biases, scales = problem
    scales = scales if scales is not None else [None] * len(weights)
    return (x, t, weights, list(biases), list(scales), activation, backend, "ieee")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_opcheck(backend):
    problem = make_problem(2, 3, 2, [3, 5, 4, 2], "some", "some", seed=2)
    torch.library.opcheck(_jvp_op, _op_args(problem, "silu", backend))
    nograd = make_problem(1, 2, 3, [2, 3], "none", "none", seed=4)
    torch.library.opcheck(_jvp_op, _op_args(nograd, "tanh", backend))


@pytest.mark.parametrize("need_params", [True, False])
def test_opcheck_backward_non_contiguous(need_params):
    """The backward op's fake returns contiguous tensors, like the real op, for strided inputs."""
    x, t, weights, biases, scales = make_problem(2, 3, 2, [3, 5, 2], "some", "all", seed=3)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    ts = t.transpose(2, 3).contiguous().transpose(2, 3)
    ws = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in weights]
    assert not (xs.is_contiguous() or ts.is_contiguous() or ws[0].is_contiguous())
    _, _, saved = _jvp_op(xs, ts, ws, list(biases), list(scales), "silu", "torch", "ieee")
    args = (torch.randn(2, 3, 2), torch.randn(2, 3, 2, 2), xs, ts, ws, list(scales), saved, "silu", "torch",
            need_params)
    torch.library.opcheck(_jvp_backward_op, args)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_frozen_parameters_skip_weight_gradients(monkeypatch, backend):
    import fastrp.ops.jvp as jvp_mod

    flags = []
    real = jvp_mod._backward_torch

    def spy(*args):
        flags.append(args[-1])  # need_params
        return real(*args)

    monkeypatch.setattr(jvp_mod, "_backward_torch", spy)
    x, t, weights, biases, scales = make_problem(2, 4, 3, [3, 6, 2], "all", "all", seed=7)
    x.requires_grad_(True)
    t.requires_grad_(True)
    y, jy = ensemble_mlp_jvp(x, t, weights, biases, scales, "tanh", backend=backend)
    gx, gt = torch.autograd.grad(y.sum() + jy.square().sum(), (x, t))
    assert flags == [False]
    xr, tr = x.detach().requires_grad_(True), t.detach().requires_grad_(True)
    yr, jyr = ensemble_mlp_jvp_ref(xr, tr, weights, biases, scales, "tanh")
    gxr, gtr = torch.autograd.grad(yr.sum() + jyr.square().sum(), (xr, tr))
    torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt, gtr, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph():
    problem = make_problem(2, 5, 3, [3, 8, 8, 2], "some", "all", seed=5)
    cot = cast((torch.randn(2, 5, 2), torch.randn(2, 5, 3, 2)), torch.float32)

    def fn(x, t, weights, biases, scales):
        y, jy = ensemble_mlp_jvp(x, t, weights, biases, scales, "silu", backend="torch")
        return y, jy

    compiled = torch.compile(fn, fullgraph=True)
    (y, jy), g = grads(lambda *a: compiled(*a), cast(problem, torch.float32), cot)
    (ye, jye), ge = grads(fn, cast(problem, torch.float32), cot)
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(jy, jye)
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


def test_auto_backend_on_cpu_is_torch():
    problem = make_problem(2, 4, 3, [3, 6, 2], "all", "all")
    y, jy = ensemble_mlp_jvp(*problem)
    yr, jyr = ensemble_mlp_jvp(*problem, backend="torch")
    assert torch.equal(y, yr) and torch.equal(jy, jyr)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_batch_and_no_tangents(backend):
    for E, B, K in ((2, 0, 3), (2, 4, 0)):
        problem = make_problem(E, B, K, [3, 6, 2], "all", "all")
        y, jy = ensemble_mlp_jvp(*problem, backend=backend)
        yr, jyr = ensemble_mlp_jvp_ref(*problem)
        assert y.shape == (E, B, 2) and jy.shape == (E, B, K, 2)
        torch.testing.assert_close(y, yr)
        torch.testing.assert_close(jy, jyr)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_strided_inputs_tuples_and_no_biases(backend):
    x, t, weights, _, scales = make_problem(3, 6, 4, [5, 9, 3], "none", "all", seed=6)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    ts = t.transpose(2, 3).contiguous().transpose(2, 3)
    ws = tuple(w.transpose(1, 2).contiguous().transpose(1, 2) for w in weights)
    assert not (ws[0].is_contiguous() or xs.is_contiguous() or ts.is_contiguous())
    y, jy = ensemble_mlp_jvp(xs, ts, ws, None, tuple(scales), "tanh", backend=backend)
    yr, jyr = ensemble_mlp_jvp_ref(x, t, list(weights), [None, None], scales, "tanh")
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(jy, jyr)


def test_tangents_grad_is_supported():
    x, t, weights, biases, scales = make_problem(2, 4, 3, [3, 6, 2], "all", "none")
    t.requires_grad_(True)
    _, jy = ensemble_mlp_jvp(x, t, weights, biases, scales, backend="torch")
    (gt,) = torch.autograd.grad(jy.sum(), t)
    _, jyr = ensemble_mlp_jvp_ref(x, t, weights, biases, scales)
    (gtr,) = torch.autograd.grad(jyr.sum(), t)
    torch.testing.assert_close(gt, gtr)


def test_double_backward_raises():
    x, t, weights, biases, scales = requires_grad(make_problem(2, 3, 2, [4, 5, 3], "all", "none"))
    _, jy = ensemble_mlp_jvp(x, t, weights, biases, scales, backend="torch")
    (gx,) = torch.autograd.grad(jy.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice|once_differentiable"):
        gx.sum().backward()


def _bad(**override):
    x, t, weights, biases, scales = make_problem(2, 3, 4, [5, 6, 2], "all", "all")
    args = dict(x=x, tangents=t, weights=weights, biases=biases, scales=scales, activation="silu", backend=None)
    args.update(override)
    return args


BAD_CASES = [
    ("tangents-K-shape", lambda: _bad(tangents=torch.randn(2, 3, 5)), "tangents"),
    ("tangents-B", lambda: _bad(tangents=torch.randn(2, 4, 4, 5)), r"tangents must have shape \[E, B, K, in\]"),
    ("tangents-in", lambda: _bad(tangents=torch.randn(2, 3, 4, 6)), r"tangents must have shape"),
    ("tangents-E", lambda: _bad(tangents=torch.randn(3, 3, 4, 5)), r"tangents must have shape"),
    ("x-dims", lambda: _bad(x=torch.randn(3, 5)), r"x must be a 3-d tensor"),
    ("x-dtype", lambda: _bad(x=torch.randn(2, 3, 5, dtype=torch.float16)), r"x must have dtype"),
    ("x-int", lambda: _bad(x=torch.ones(2, 3, 5, dtype=torch.int64)), r"x must have dtype"),
    ("tangents-dtype", lambda: _bad(tangents=torch.randn(2, 3, 4, 5, dtype=torch.float64)), r"tangents must have dtype"),
    ("weight-E", lambda: _bad(weights=[torch.randn(3, 5, 6), torch.randn(2, 6, 2)]), r"weights\[0\] must have shape"),
    ("width-chain", lambda: _bad(weights=[torch.randn(2, 5, 6), torch.randn(2, 7, 2)]), r"weights\[1\] must have shape \[2, 6"),
    ("weight-in", lambda: _bad(weights=[torch.randn(2, 4, 6), torch.randn(2, 6, 2)]), r"weights\[0\] must have shape \[2, 5"),
    ("weight-dims", lambda: _bad(weights=[torch.randn(5, 6), torch.randn(2, 6, 2)]), r"weights\[0\] must be a 3-d"),
    ("weight-dtype", lambda: _bad(weights=[torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(2, 6, 2)]),
     r"weights\[0\] must have dtype"),
    ("weights-empty", lambda: _bad(weights=[], biases=[], scales=[]), r"weights must be a non-empty list"),
    ("no-members", lambda: _bad(x=torch.randn(0, 3, 5), tangents=torch.randn(0, 3, 4, 5),
                                weights=[torch.randn(0, 5, 6), torch.randn(0, 6, 2)], biases=None, scales=None),
     r"x must have at least one member \(E >= 1\)"),
    ("weights-tensor", lambda: _bad(weights=torch.randn(2, 5, 6)), r"weights must be a non-empty list"),
    ("biases-length", lambda: _bad(biases=[None]), r"biases must be None or a list of 2 entries"),
    ("scales-length", lambda: _bad(scales=[None, None, None]), r"scales must be None or a list of 2"),
    ("bias-shape", lambda: _bad(biases=[torch.randn(2, 5), None]), r"biases\[0\] must have shape \[2, 6\]"),
    ("scale-shape", lambda: _bad(scales=[torch.randn(2, 1), None]), r"scales\[0\] must have shape \[2\]"),
    ("scale-dtype", lambda: _bad(scales=[None, torch.rand(2, dtype=torch.float64)]), r"scales\[1\] must have dtype"),
    ("activation", lambda: _bad(activation="gelu"), r"activation must be one of"),
    ("backend-name", lambda: _bad(backend="numpy"), r"backend must be None"),
    ("backend-cpp", lambda: _bad(backend="cpp"), r"not implemented"),
    ("backend-cuda", lambda: _bad(backend="cuda"), r"not implemented"),
]
if not torch.cuda.is_available():
    BAD_CASES.append(("device", lambda: _bad(tangents=torch.randn(2, 3, 4, 5, device="meta")),
                      r"tangents must be on device cpu"))


@pytest.mark.parametrize("make,match", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_inputs(make, match):
    args = make()
    with pytest.raises(ValueError, match=match):
        ensemble_mlp_jvp(args["x"], args["tangents"], args["weights"], args["biases"], args["scales"],
                         args["activation"], backend=args["backend"])


def test_bad_inputs_ref():
    args = _bad(tangents=torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match="tangents"):
        ensemble_mlp_jvp_ref(args["x"], args["tangents"], args["weights"], args["biases"], args["scales"])


# ---------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("case", TORCH_CASES, ids=case_id)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_forward_backward(case, backend):
    E, B, K, dims, bias, scale, act = case
    problem = cast(make_problem(E, B, K, dims, bias, scale), torch.float32, "cuda")
    p64 = cast(problem, torch.float64, "cuda")
    with no_host_sync():
        y, jy = ensemble_mlp_jvp(*problem, activation=act, backend=backend)
    y32, jy32 = ensemble_mlp_jvp_ref(*problem, activation=act)
    y64, jy64 = ensemble_mlp_jvp_ref(*p64, activation=act)
    assert_close_to_ref(y, y32, y64, name="y")
    assert_close_to_ref(jy, jy32, jy64, name="jy")
    cot = (torch.randn_like(y64), torch.randn_like(jy64))
    p32 = cast(problem, torch.float32, "cuda")
    with no_host_sync():
        _, g = grads(lambda *a: ensemble_mlp_jvp(*a, activation=act, backend=backend), p32, cot)
    _, g32 = grads(lambda *a: ensemble_mlp_jvp_ref(*a, activation=act), cast(problem, torch.float32, "cuda"), cot)
    _, g64 = grads(lambda *a: ensemble_mlp_jvp_ref(*a, activation=act), p64, cot)
    for i, (a, b, c) in enumerate(zip(g, g32, g64)):
        assert_close_to_ref(a, b, c, name=f"grad[{i}]")


@pytest.mark.cuda
@pytest.mark.parametrize("K", [5, 25])
def test_cuda_ddppo_shape_and_cpu_parity(K):
    problem = make_problem(7, 256, K, [23, 200, 200, 200, 200, 18], "all", "none", seed=7)
    y_cpu, jy_cpu = ensemble_mlp_jvp(*problem, backend="torch")
    on_gpu = cast(problem, torch.float32, "cuda")
    with no_host_sync():
        y, jy = ensemble_mlp_jvp(*on_gpu)
    y64, jy64 = ensemble_mlp_jvp_ref(*cast(problem, torch.float64))
    assert_close_to_ref(y.cpu(), y_cpu, y64, name="y")
    assert_close_to_ref(jy.cpu(), jy_cpu, jy64, name="jy")


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_cuda_gradcheck_triton(act):
    x, t, weights, biases, scales = requires_grad(
        cast(make_problem(2, 3, 2, [3, 4, 5, 2], "all", "all", dtype=torch.float64), torch.float64, "cuda"))
    L = len(weights)

    def fn(x, t, *flat):
        return ensemble_mlp_jvp(x, t, list(flat[:L]), list(flat[L:2 * L]), list(flat[2 * L:]), act, backend="triton")

    assert torch.autograd.gradcheck(fn, (x, t, *weights, *biases, *scales), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    problem = requires_grad(cast(make_problem(2, 3, 2, [3, 5, 4, 2], "some", "some", seed=2), torch.float32, "cuda"))
    torch.library.opcheck(_jvp_op, _op_args(problem, "silu", "triton"))

    def fn(x, t, weights, biases, scales):
        return ensemble_mlp_jvp(x, t, weights, biases, scales, "silu", backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    p = cast(problem, torch.float32, "cuda")
    compiled(*p)  # compiling may synchronise; running the compiled graph may not
    with no_host_sync():
        y, jy = compiled(*p)
        ye, jye = fn(*p)
    torch.testing.assert_close(y, ye)
    torch.testing.assert_close(jy, jye)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_backward_recomputes_no_forward_gemm(backend):
    """The backward reads the forward's saved pre-activations: per layer it runs the two GEMMs of
    the data gradients (primal and tangents) and the two of the weight gradient, and none of the
    forward's (which would add two per hidden layer)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.baddbmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    x, t, weights, biases, scales = requires_grad(make_problem(2, 4, 3, [3, 6, 5, 2], "all", "all", seed=8))
    y, jy = ensemble_mlp_jvp(x, t, weights, biases, scales, "silu", backend=backend)
    loss = y.square().sum() + jy.square().sum()
    with CountGemms() as counter:
        grads = torch.autograd.grad(loss, [x, t] + weights)
    assert counter.n == 4 * len(weights)
    yr, jyr = ensemble_mlp_jvp_ref(x, t, weights, biases, scales, "silu")
    want = torch.autograd.grad(yr.square().sum() + jyr.square().sum(), [x, t] + weights)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
