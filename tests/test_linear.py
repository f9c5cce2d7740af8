"""ensemble_linear: torch and Triton (interpreted on CPU) backends against the reference, forward
and backward in every input, gradcheck, opcheck, torch.compile and bad inputs."""

import pytest
import torch

from fastrp.ops.linear import ensemble_linear, ensemble_linear_ref
from utils import assert_close_to_ref, backends, needs_triton, no_host_sync


def make_inputs(E, B, d_in, d_out, bias=True, scale=True, dtype=torch.float32):
    x = torch.randn(E, B, d_in, dtype=dtype)
    w = torch.randn(E, d_in, d_out, dtype=dtype) / d_in ** 0.5
    b = torch.randn(E, d_out, dtype=dtype) if bias else None
    s = 0.5 + torch.rand(E, dtype=dtype) if scale else None
    return x, w, b, s


def check_against_ref(backend, x, w, b, s, device="cpu"):
    present = [t for t in (x, w, b, s) if t is not None]
    names = [n for n, t in zip(("x", "weight", "bias", "scale"), (x, w, b, s)) if t is not None]
    grad = torch.randn(x.shape[0], x.shape[1], w.shape[2], dtype=torch.float64, device=device)
    results, grads = {}, {}
    for tag, dtype in (("out", torch.float32), ("ref32", torch.float32), ("ref64", torch.float64)):
        leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in present]
        it = iter(leaves)
        xi, wi, bi, si = (next(it) if t is not None else None for t in (x, w, b, s))
        g = grad.to(dtype)
        if tag == "out":
            with no_host_sync(device):  # on CUDA the op's forward and backward may not sync
                y = ensemble_linear(xi, wi, bi, si, backend=backend)
                grads[tag] = torch.autograd.grad(y, leaves, g)
        else:
            y = ensemble_linear_ref(xi, wi, bi, si)
            grads[tag] = torch.autograd.grad(y, leaves, g)
        results[tag] = y
    assert_close_to_ref(results["out"], results["ref32"], results["ref64"], name="y")
    for i, name in enumerate(names):
        assert_close_to_ref(grads["out"][i], grads["ref32"][i], grads["ref64"][i], name=f"grad {name}")


TORCH_CASES = [
    # E, B, in, out, bias, scale
    (1, 1, 1, 1, True, True),
    (7, 37, 5, 200, True, False),
    (7, 256, 200, 257, True, True),
    (1, 256, 257, 5, False, True),
    (7, 1, 257, 1, False, False),
    (1, 37, 200, 200, True, True),
]

TRITON_CASES = [
    (1, 1, 1, 1, True, True),
    (7, 37, 5, 7, True, False),
    (2, 3, 257, 5, False, True),
    (1, 5, 7, 200, True, True),
    (1, 256, 5, 3, True, True),
]


@pytest.mark.parametrize("E,B,d_in,d_out,bias,scale", TORCH_CASES)
def test_torch_backend_matches_reference(E, B, d_in, d_out, bias, scale):
    check_against_ref("torch", *make_inputs(E, B, d_in, d_out, bias, scale))


@needs_triton
@pytest.mark.parametrize("E,B,d_in,d_out,bias,scale", TRITON_CASES)
def test_triton_backend_matches_reference(E, B, d_in, d_out, bias, scale):
    check_against_ref("triton", *make_inputs(E, B, d_in, d_out, bias, scale))


def test_reference_formula():
    x, w, b, s = make_inputs(3, 4, 5, 6, dtype=torch.float64)
    want = torch.einsum("ebi,eio->ebo", x, w) * s[:, None, None] + b[:, None, :]
    torch.testing.assert_close(ensemble_linear_ref(x, w, b, s), want)
    torch.testing.assert_close(ensemble_linear(x, w, b, s), want)


@pytest.mark.parametrize("backend,fast", [("torch", False), pytest.param("triton", True, marks=needs_triton)])
@pytest.mark.parametrize("bias,scale", [(True, True), (False, True), (True, False)])
def test_gradcheck(backend, fast, bias, scale):
    x, w, b, s = make_inputs(2, 3, 4, 3, bias, scale, dtype=torch.float64)
    present = [t.requires_grad_(True) for t in (x, w, b, s) if t is not None]

    def f(*args):
        it = iter(args)
        xi, wi, bi, si = (next(it) if t is not None else None for t in (x, w, b, s))
        return ensemble_linear(xi, wi, bi, si, backend=backend)

    assert torch.autograd.gradcheck(f, present, fast_mode=fast)


@pytest.mark.parametrize("impl", backends("torch", "triton"))
def test_opcheck(impl):
    from fastrp.ops.mlp import _mlp_fwd_op  # noqa: F401  (registers the ops)

    x, w, b, s = make_inputs(2, 3, 4, 5)
    args = (x.reshape(6, 4), None, [w], [b], [s], "silu", impl, "ieee")
    torch.library.opcheck(torch.ops.fastrp.ensemble_mlp_fwd.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    x, w, b, s = make_inputs(3, 4, 5, 2)
    w.requires_grad_(True)

    def loss(x, w):
        return ensemble_linear(x, w, b, s, backend="torch").square().sum()

    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, w)
    (g_got,) = torch.autograd.grad(got, w)
    want = loss(x, w)
    (g_want,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_bad_inputs():
    x, w, b, s = make_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="x must be a 3-d tensor"):
        ensemble_linear(x[0], w, b, s)
    with pytest.raises(ValueError, match="weight must have shape"):
        ensemble_linear(x, torch.randn(3, 4, 5), b, s)  # E mismatch
    with pytest.raises(ValueError, match="weight must have shape"):
        ensemble_linear(x, torch.randn(2, 5, 5), b, s)  # in mismatch
    with pytest.raises(ValueError, match="bias must have shape"):
        ensemble_linear(x, w, torch.randn(2, 4), s)
    with pytest.raises(ValueError, match="scale must have shape"):
        ensemble_linear(x, w, b, torch.rand(2, 1))
    with pytest.raises(ValueError, match="x must have dtype"):
        ensemble_linear(x.to(torch.bfloat16), w, b, s)
    with pytest.raises(ValueError, match="weight must have dtype"):
        ensemble_linear(x, w.double(), b, s)
    with pytest.raises(ValueError, match="scale must have dtype"):
        ensemble_linear(x, w, b, s.double())
    with pytest.raises(ValueError, match="bias must be on device"):
        ensemble_linear(x, w, b.to("meta"), s)
    with pytest.raises(ValueError, match="backend"):
        ensemble_linear(x, w, b, s, backend="cpp")


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_no_members_is_a_value_error(backend):
    """E = 0 is rejected like ensemble_mlp rejects it (it crashed with ZeroDivisionError)."""
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_linear(torch.randn(0, 3, 4), torch.randn(0, 4, 5), backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("E,B,d_in,d_out,bias,scale", TORCH_CASES)
def test_cuda_matches_reference(backend, E, B, d_in, d_out, bias, scale):
    check_against_ref(backend, *make_inputs(E, B, d_in, d_out, bias, scale), device="cuda")


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x, w, b, s = make_inputs(7, 256, 200, 200)
    cpu = ensemble_linear(x, w, b, s, backend="torch")
    on_gpu = x.cuda(), w.cuda(), b.cuda(), s.cuda()
    with no_host_sync():
        gpu = ensemble_linear(*on_gpu)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weight must be on device"):
        ensemble_linear(x.cuda(), w, b, s)
