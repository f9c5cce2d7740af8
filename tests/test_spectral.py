"""spectral_norm / spectral_norm_layers: torch and Triton backends against the reference and
against torch.nn.utils.parametrizations.spectral_norm; gradients, registration, bad inputs."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastrp.ops.linear import ensemble_linear
from fastrp.ops.spectral import spectral_norm, spectral_norm_layers, spectral_norm_ref
from utils import assert_close_to_ref, backends, needs_triton, no_host_sync

WIDTHS = (1, 5, 200, 257)
ALL_SHAPES = [(E, i, o) for E in (1, 7) for i, o in itertools.product(WIDTHS, WIDTHS)]
# The interpreter is slow: a subset that still covers 1-wide, odd, tile-crossing widths.
TRITON_SHAPES = [(1, 1, 1), (7, 5, 257), (7, 257, 5), (1, 200, 257), (7, 1, 200)]


def _inputs(E, i, o, dtype=torch.float32, device="cpu"):
    weight = torch.randn(E, i, o, dtype=torch.float64) / (i ** 0.5)
    v = F.normalize(torch.randn(E, i, dtype=torch.float64), dim=-1)
    return weight.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def _torch_sn_linear(weight_io: torch.Tensor, v: torch.Tensor, n: int) -> nn.Module:
    """An nn.Linear holding ``weight_io.T`` under torch's spectral_norm parametrization, with
    ``_v = v`` (and ``_u`` recomputed from it, as the next training forward would)."""
    i, o = weight_io.shape
    lin = nn.Linear(i, o, bias=False).to(dtype=weight_io.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight_io.T)
    lin = nn.utils.parametrizations.spectral_norm(lin, n_power_iterations=n)
    param = lin.parametrizations.weight[0]
    with torch.no_grad():
        param._v.copy_(v)
        param._u.copy_(F.normalize(lin.parametrizations.weight.original @ v, dim=0, eps=param.eps))
    return lin


def _torch_forward_state(lin: nn.Module):
    """Run the parametrization's forward; return ``(sigma, u, v)`` it used."""
    w_sn = lin.weight
    param = lin.parametrizations.weight[0]
    w = lin.parametrizations.weight.original
    sigma = torch.vdot(param._u, torch.mv(w, param._v))
    return sigma.detach(), param._u.clone(), param._v.clone(), w_sn


# ----------------------------------------------------------------------------------------------
# forward against torch's parametrization
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("torch", "triton"))
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("i,o", [(1, 1), (5, 200), (257, 5), (200, 257)])
def test_matches_torch_parametrization_single(backend, n, i, o):
    weight, v = _inputs(1, i, o)
    lin = _torch_sn_linear(weight[0], v[0], n)
    lin.train()
    sigma_t, u_t, v_t, w_sn = _torch_forward_state(lin)
    sigma, u, v_out = spectral_norm(weight, v, n, backend=backend)
    torch.testing.assert_close(u[0], u_t)
    torch.testing.assert_close(v_out[0], v_t)
    torch.testing.assert_close(sigma[0], sigma_t)
    torch.testing.assert_close(weight[0].T / sigma[0], w_sn.detach())


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_matches_torch_parametrization_per_member(backend):
    E, i, o, n = 7, 37, 23, 3
    weight, v = _inputs(E, i, o)
    sigma, u, v_out = spectral_norm(weight, v, n, backend=backend)
    for e in range(E):
        lin = _torch_sn_linear(weight[e], v[e], n)
        sigma_t, u_t, v_t, _ = _torch_forward_state(lin)
        torch.testing.assert_close(u[e], u_t)
        torch.testing.assert_close(v_out[e], v_t)
        torch.testing.assert_close(sigma[e], sigma_t)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_eval_mode_uses_stored_vectors(backend):
    """n_power_iterations=0 with u: torch's eval mode (sigma = u^T W v, nothing updated)."""
    E, i, o = 7, 9, 13
    weight, v = _inputs(E, i, o)
    u = F.normalize(torch.randn(E, o), dim=-1)
    sigma, u_out, v_out = spectral_norm(weight, v, 0, u=u, backend=backend)
    assert torch.equal(u_out, u) and torch.equal(v_out, v)
    for e in range(E):
        lin = _torch_sn_linear(weight[e], v[e], 1)
        lin.parametrizations.weight[0]._u.copy_(u[e])
        lin.eval()
        w_sn = lin.weight.detach()
        param = lin.parametrizations.weight[0]
        assert torch.equal(param._u, u[e]) and torch.equal(param._v, v[e])  # eval: no update
        sigma_t = torch.vdot(param._u, torch.mv(lin.parametrizations.weight.original, param._v))
        torch.testing.assert_close(sigma[e], sigma_t.detach())
        torch.testing.assert_close(weight[e].T / sigma[e], w_sn, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_zero_iterations_without_u(backend):
    """n_power_iterations=0 without u: u = normalize(W v) once, v unchanged, sigma = ||W v||."""
    weight, v = _inputs(7, 6, 11)
    sigma, u, v_out = spectral_norm(weight, v, 0, backend=backend)
    wv = torch.einsum("eio,ei->eo", weight, v)
    torch.testing.assert_close(u, F.normalize(wv, dim=-1))
    torch.testing.assert_close(sigma, wv.norm(dim=-1))
    assert torch.equal(v_out, v)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_inputs_not_modified_and_outputs_without_grad(backend):
    weight, v = _inputs(7, 5, 6)
    weight.requires_grad_(True)
    v0 = v.clone()
    w0 = weight.detach().clone()
    sigma, u, v_out = spectral_norm(weight, v, 2, backend=backend)
    assert torch.equal(v, v0) and torch.equal(weight.detach(), w0)
    assert sigma.requires_grad and not u.requires_grad and not v_out.requires_grad


# ----------------------------------------------------------------------------------------------
# forward and backward against the reference (tolerance rule of style.md)
# ----------------------------------------------------------------------------------------------
def _check_against_ref(E, i, o, n, backend):
    weight, v = _inputs(E, i, o)
    weight.requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    grad = torch.randn(E)
    sigma, u, v_out = spectral_norm(weight, v, n, backend=backend)
    s32, u32, v32 = spectral_norm_ref(weight, v, n)
    s64, u64, v64 = spectral_norm_ref(w64, v.double(), n)
    assert_close_to_ref(sigma, s32, s64, name="sigma")
    assert_close_to_ref(u, u32, u64, name="u")
    assert_close_to_ref(v_out, v32, v64, name="v")
    (g_out,) = torch.autograd.grad(sigma, weight, grad)
    (g32,) = torch.autograd.grad(s32, weight, grad)
    (g64,) = torch.autograd.grad(s64, w64, grad.double())
    assert_close_to_ref(g_out, g32, g64, name="grad weight")


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("E,i,o", ALL_SHAPES)
def test_torch_backend_vs_reference(E, i, o, n):
    _check_against_ref(E, i, o, n, "torch")


@needs_triton
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("E,i,o", TRITON_SHAPES)
def test_triton_backend_vs_reference(E, i, o, n):
    _check_against_ref(E, i, o, n, "triton")


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_backward_formula(backend):
    """d sigma / d weight[e] = v[e] u[e]^T with the returned u, v."""
    weight, v = _inputs(7, 5, 8)
    weight.requires_grad_(True)
    grad = torch.randn(7)
    sigma, u, v_out = spectral_norm(weight, v, 2, backend=backend)
    (g,) = torch.autograd.grad(sigma, weight, grad)
    torch.testing.assert_close(g, grad[:, None, None] * v_out[:, :, None] * u[:, None, :])


@pytest.mark.parametrize("backend", backends("torch", "triton"))
@pytest.mark.parametrize("n", [1, 3])
def test_composed_gradient_matches_parametrization(backend, n):
    """y = ensemble_linear(x, W, b, scale=1/sigma): the weight gradient equals torch's
    parametrization's and the design formula A/sigma - (<A, W>/sigma^2) v u^T."""
    E, B, i, o = 7, 37, 5, 9
    weight, v = _inputs(E, i, o)
    weight.requires_grad_(True)
    bias = torch.randn(E, o, requires_grad=True)
    x = torch.randn(E, B, i)
    G = torch.randn(E, B, o)
    sigma, u, v_out = spectral_norm(weight, v, n, backend=backend)
    y = ensemble_linear(x, weight, bias, sigma.reciprocal(), backend="torch")
    (y * G).sum().backward()
    A = torch.einsum("ebi,ebo->eio", x, G)
    s = sigma.detach()[:, None, None]
    inner = (A * weight.detach()).sum((1, 2))[:, None, None]
    formula = A / s - inner / s**2 * v_out[:, :, None] * u[:, None, :]
    torch.testing.assert_close(weight.grad, formula, rtol=1e-4, atol=1e-5)
    for e in range(E):
        lin = _torch_sn_linear(weight[e].detach(), v[e], n)
        with torch.no_grad():
            lin.bias = nn.Parameter(bias[e].detach().clone())
        lin.train()
        y_t = lin(x[e])
        torch.testing.assert_close(y[e], y_t, rtol=1e-4, atol=1e-5)
        (y_t * G[e]).sum().backward()
        torch.testing.assert_close(weight.grad[e], lin.parametrizations.weight.original.grad.T, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_gradcheck_fixed_vectors(backend):
    """With n=0 and stored u, sigma = u^T W v is exactly linear in weight."""
    E, i, o = 2, 3, 4
    weight = torch.randn(E, i, o, dtype=torch.float64, requires_grad=True)
    v = F.normalize(torch.randn(E, i, dtype=torch.float64), dim=-1)
    u = F.normalize(torch.randn(E, o, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda w: spectral_norm(w, v, 0, u=u, backend=backend)[0], (weight,))


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_gradcheck_converged(backend):
    """At convergence u, v are the top singular vectors, and v u^T is the exact gradient of the
    top singular value: gradcheck of the whole op with u, v recomputed at every perturbation."""
    E, i, o = 2, 3, 4
    base = torch.randn(E, i, o, dtype=torch.float64)
    uu, ss, vh = torch.linalg.svd(base)
    ss = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64).expand(E, 3)
    weight = (uu[:, :, :3] * ss[:, None, :]) @ vh[:, :3, :]
    weight.requires_grad_(True)
    v = F.normalize(torch.randn(E, i, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda w: spectral_norm(w, v, 25, backend=backend)[0], (weight,), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_gradcheck_layers(backend):
    ws = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
          torch.randn(2, 4, 1, dtype=torch.float64, requires_grad=True)]
    vs = [F.normalize(torch.randn(2, w.shape[1], dtype=torch.float64), dim=-1) for w in ws]
    us = [F.normalize(torch.randn(2, w.shape[2], dtype=torch.float64), dim=-1) for w in ws]

    def f(w0, w1):
        sigmas, _, _ = spectral_norm_layers([w0, w1], vs, 0, us=us, backend=backend)
        return tuple(sigmas)

    assert torch.autograd.gradcheck(f, tuple(ws))


# ----------------------------------------------------------------------------------------------
# spectral_norm_layers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("torch", "triton"))
@pytest.mark.parametrize("n", [0, 1, 3])
def test_layers_equal_per_layer_calls(backend, n):
    E = 7
    shapes = [(5, 200), (200, 257), (257, 1), (1, 5)] if backend == "torch" else [(5, 37), (37, 257), (257, 1), (1, 5)]
    weights, vs = zip(*(_inputs(E, i, o) for i, o in shapes))
    weights = [w.requires_grad_(True) for w in weights]
    us = [F.normalize(torch.randn(E, o), dim=-1) for _, o in shapes] if n == 0 else None
    sigmas, us_out, vs_out = spectral_norm_layers(weights, list(vs), n, us=us, backend=backend)
    grads_out = torch.autograd.grad(sum((s * (k + 1)).sum() for k, s in enumerate(sigmas)), weights)
    for k, (w, v) in enumerate(zip(weights, vs)):
        sigma, u, v_out = spectral_norm(w, v, n, u=None if us is None else us[k], backend=backend)
        (g,) = torch.autograd.grad((sigma * (k + 1)).sum(), w)
        torch.testing.assert_close(sigmas[k], sigma)
        torch.testing.assert_close(us_out[k], u)
        torch.testing.assert_close(vs_out[k], v_out)
        torch.testing.assert_close(grads_out[k], g)


@needs_triton
def test_layers_backends_agree():
    E = 3
    shapes = [(7, 5), (5, 37), (37, 2)]
    weights, vs = zip(*(_inputs(E, i, o) for i, o in shapes))
    out_t = spectral_norm_layers(list(weights), list(vs), 2, backend="torch")
    out_k = spectral_norm_layers(list(weights), list(vs), 2, backend="triton")
    for a, b in zip(out_t, out_k):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_layers_empty():
    assert spectral_norm_layers([], []) == ([], [], [])


# ----------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("torch", "triton"))
def test_opcheck(backend):
    weight, v = _inputs(3, 5, 4)
    weight.requires_grad_(True)
    u = F.normalize(torch.randn(3, 4), dim=-1)
    torch.library.opcheck(torch.ops.fastrp.spectral_norm_layers.default, ([weight], [v], [], 2, 1e-12, backend))
    torch.library.opcheck(torch.ops.fastrp.spectral_norm_layers.default, ([weight], [v], [u], 0, 1e-12, backend))
    w2, v2 = _inputs(3, 4, 6)
    torch.library.opcheck(
        torch.ops.fastrp.spectral_norm_layers.default, ([weight, w2.requires_grad_(True)], [v, v2], [], 1, 1e-12, backend)
    )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    weight, v = _inputs(3, 5, 4)
    weight.requires_grad_(True)
    x = torch.randn(3, 6, 5)
    w2, v2 = _inputs(3, 4, 2)
    w2.requires_grad_(True)

    def f(weight, v, w2, v2, x):
        sigma, u, v_new = spectral_norm(weight, v, 1)
        sigmas, _, _ = spectral_norm_layers([weight, w2], [v_new, v2], 1)
        h = torch.bmm(x, weight) / sigma[:, None, None]
        return (h.sum() + sigmas[0].sum() + sigmas[1].sum()), u

    compiled = torch.compile(f, fullgraph=True)
    out_c, u_c = compiled(weight, v, w2, v2, x)
    g_c = torch.autograd.grad(out_c, (weight, w2))
    out_e, u_e = f(weight, v, w2, v2, x)
    g_e = torch.autograd.grad(out_e, (weight, w2))
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(u_c, u_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------
def test_bad_inputs():
    weight, v = _inputs(3, 5, 4)
    with pytest.raises(ValueError, match=r"weight must be a 3-d tensor"):
        spectral_norm(weight[0], v)
    with pytest.raises(ValueError, match=r"weight must have dtype"):
        spectral_norm(weight.half(), v)
    with pytest.raises(ValueError, match=r"v must have shape \[3, 5\]"):
        spectral_norm(weight, v[:, :4])
    with pytest.raises(ValueError, match=r"v must have dtype torch.float32"):
        spectral_norm(weight, v.double())
    with pytest.raises(ValueError, match=r"v must be on device cpu"):
        spectral_norm(weight, v.to("meta"))
    with pytest.raises(ValueError, match=r"u must have shape \[3, 4\]"):
        spectral_norm(weight, v, 0, u=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"n_power_iterations must be an int >= 0"):
        spectral_norm(weight, v, -1)
    with pytest.raises(ValueError, match=r"n_power_iterations must be an int >= 0"):
        spectral_norm(weight, v, 1.5)
    with pytest.raises(ValueError, match=r"n_power_iterations must be an int >= 0"):
        spectral_norm(weight, v, True)
    with pytest.raises(ValueError, match=r"eps must be a float > 0"):
        spectral_norm(weight, v, 1, 0.0)
    with pytest.raises(ValueError, match=r"backend='cuda' is not implemented"):
        spectral_norm(weight, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be None"):
        spectral_norm(weight, v, backend="bogus")


def test_bad_inputs_layers():
    w1, v1 = _inputs(3, 5, 4)
    w2, v2 = _inputs(3, 4, 2)
    with pytest.raises(ValueError, match=r"weights and vs must be lists"):
        spectral_norm_layers(w1, v1)
    with pytest.raises(ValueError, match=r"vs must have one \[E, in_l\] tensor per layer"):
        spectral_norm_layers([w1, w2], [v1])
    with pytest.raises(ValueError, match=r"us must be None or a list"):
        spectral_norm_layers([w1, w2], [v1, v2], 0, us=[torch.randn(3, 4)])
    with pytest.raises(ValueError, match=r"weights\[1\] must have ensemble size 3"):
        spectral_norm_layers([w1, w2[:2]], [v1, v2[:2]])
    with pytest.raises(ValueError, match=r"weights\[1\] must have the same dtype"):
        spectral_norm_layers([w1, w2.double()], [v1, v2.double()])
    with pytest.raises(ValueError, match=r"vs\[1\] must have shape \[3, 4\]"):
        spectral_norm_layers([w1, w2], [v1, v1])
    with pytest.raises(ValueError, match=r"us\[0\] must have shape \[3, 4\]"):
        spectral_norm_layers([w1, w2], [v1, v2], 0, us=[torch.randn(3, 5), torch.randn(3, 2)])


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("E,i,o", [(1, 1, 1), (7, 5, 257), (7, 257, 200), (1, 1024, 37)])
def test_cuda_matches_cpu_and_reference(E, i, o, n):
    weight, v = _inputs(E, i, o)
    u = F.normalize(torch.randn(E, o), dim=-1) if n == 0 else None
    wc, vc = weight.cuda().requires_grad_(True), v.cuda()
    uc = None if u is None else u.cuda()
    grad = torch.randn(E)
    gc = grad.cuda()
    with no_host_sync():
        sigma, u_out, v_out = spectral_norm(wc, vc, n, u=uc)  # auto: Triton on CUDA
        (g,) = torch.autograd.grad(sigma, wc, gc)
    w64 = weight.double().requires_grad_(True)
    s64, u64, v64 = spectral_norm_ref(w64, v.double(), n, u=None if u is None else u.double())
    (g64,) = torch.autograd.grad(s64, w64, grad.double())
    w32 = weight.clone().requires_grad_(True)
    s32, u32, v32 = spectral_norm_ref(w32, v, n, u=u)
    (g32,) = torch.autograd.grad(s32, w32, grad)
    assert_close_to_ref(sigma.cpu(), s32, s64, name="sigma")
    assert_close_to_ref(u_out.cpu(), u32, u64, name="u")
    assert_close_to_ref(v_out.cpu(), v32, v64, name="v")
    assert_close_to_ref(g.cpu(), g32, g64, name="grad weight")
    s_cpu, u_cpu, v_cpu = spectral_norm(weight, v, n, u=u, backend="torch")
    torch.testing.assert_close(sigma.cpu(), s_cpu)
    torch.testing.assert_close(u_out.cpu(), u_cpu)
    torch.testing.assert_close(v_out.cpu(), v_cpu)


@pytest.mark.cuda
def test_cuda_layers_and_gradcheck():
    E = 7
    shapes = [(17, 200), (200, 200), (200, 200), (200, 200), (200, 9)]
    weights, vs = zip(*(_inputs(E, i, o, device="cuda") for i, o in shapes))
    with no_host_sync():
        sigmas, us, vs_out = spectral_norm_layers(list(weights), list(vs), 1)
    for k, (w, v) in enumerate(zip(weights, vs)):
        s_ref, u_ref, v_ref = spectral_norm(w.cpu(), v.cpu(), 1, backend="torch")
        torch.testing.assert_close(sigmas[k].cpu(), s_ref)
        torch.testing.assert_close(us[k].cpu(), u_ref)
        torch.testing.assert_close(vs_out[k].cpu(), v_ref)
    weight = torch.randn(2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    v = F.normalize(torch.randn(2, 3, dtype=torch.float64, device="cuda"), dim=-1)
    u = F.normalize(torch.randn(2, 4, dtype=torch.float64, device="cuda"), dim=-1)
    assert torch.autograd.gradcheck(lambda w: spectral_norm(w, v, 0, u=u)[0], (weight,))
    torch.library.opcheck(torch.ops.fastrp.spectral_norm_layers.default, ([weight], [v], [], 2, 1e-12, "triton"))


@pytest.mark.parametrize("backend", ["torch", None])
def test_numpy_integer_iterations(backend):
    """Any integral count is accepted (numpy's int64 from a config array, for example) and gives
    what the same Python int gives."""
    import numpy as np

    weight = torch.randn(3, 5, 4)
    v = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    want = spectral_norm(weight, v, 3, backend=backend)
    for n in (np.int64(3), np.int32(3)):
        for a, b in zip(spectral_norm(weight, v, n, backend=backend), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(spectral_norm_layers([weight], [v], np.int64(3), backend=backend), ([t] for t in want)):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
