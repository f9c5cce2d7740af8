"""TanhGaussianPolicy and TwinQ: shapes, log-densities, spectral norm, twin-Q semantics, gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import AffineTransform, ComposeTransform, Normal, TanhTransform, TransformedDistribution
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

from fastrp.nn.critic import TwinQ
from fastrp.nn.policy import TanhGaussianPolicy
from utils import no_host_sync


def _torch_linears(ens, member):
    """``nn.Linear`` copies of one member of an EnsembleMLP (weights transposed to ``[out, in]``)."""
    layers = []
    for w, b in zip(ens.weights, ens.biases):
        lin = nn.Linear(w.shape[1], w.shape[2]).to(w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[member].t())
            lin.bias.copy_(b[member])
        layers.append(lin)
    return layers


def _mlp(layers, x, act):
    for lin in layers[:-1]:
        x = act(lin(x))
    return layers[-1](x)


@pytest.mark.parametrize("B,obs_dim,act_dim,hidden,num_layers", [(1, 3, 1, 5, 1), (37, 17, 6, 32, 2), (7, 11, 3, 1, 3)])
def test_policy_shapes_and_bounds(B, obs_dim, act_dim, hidden, num_layers):
    scale = torch.linspace(0.4, 2.0, act_dim)
    bias = torch.linspace(-1.0, 1.0, act_dim)
    pi = TanhGaussianPolicy(obs_dim, act_dim, hidden, num_layers, action_scale=scale.tolist(), action_bias=bias.tolist())
    obs = torch.randn(B, obs_dim)
    a, logp = pi(obs)
    assert a.shape == (B, act_dim) and logp.shape == (B,)
    assert a.dtype == logp.dtype == torch.float32
    assert bool(((a > bias - scale) & (a < bias + scale)).all())
    mean, log_std = pi.distribution(obs)
    assert mean.shape == log_std.shape == (B, act_dim)
    lo, hi = pi.log_std_bounds
    assert bool(((log_std >= lo) & (log_std <= hi)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_policy_log_prob_matches_torch_distributions(dtype):
    act_dim = 4
    pi = TanhGaussianPolicy(9, act_dim, 16, 2, action_scale=[0.4, 1.0, 2.0, 0.5], action_bias=[0.0, 0.5, -1.0, 0.1]).to(dtype)
    obs = 3 * torch.randn(64, 9, dtype=dtype)
    noise = torch.randn(64, act_dim, dtype=dtype)
    a, logp = pi(obs, noise=noise)
    mean, log_std = pi.distribution(obs)
    squash = ComposeTransform([TanhTransform(cache_size=1),
                               AffineTransform(pi.action_bias, pi.action_scale, cache_size=1)])
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [squash])
    u = mean + log_std.exp() * noise
    a_ref = squash(u)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(a, a_ref, **tol)
    torch.testing.assert_close(logp, dist.log_prob(a_ref).sum(-1), **tol)
    # the tanh correction written out in float64: log N(u) - sum log(scale * (1 - tanh(u)^2))
    u64 = u.double()
    direct = (Normal(mean.double(), log_std.double().exp()).log_prob(u64)
              - torch.log(pi.action_scale.double() * (1 - torch.tanh(u64) ** 2))).sum(-1)
    torch.testing.assert_close(logp.double(), direct, **tol)


def test_policy_log_prob_is_finite_when_saturated():
    pi = TanhGaussianPolicy(3, 2, 8, 1)
    with torch.no_grad():
        pi.net.biases[-1][0, :2].fill_(40.0)  # mean far in the tanh tail
    a, logp = pi(torch.randn(5, 3), noise=torch.zeros(5, 2))
    assert bool(torch.isfinite(logp).all())
    assert bool((a == 1.0).all())


def test_policy_deterministic_and_noise():
    pi = TanhGaussianPolicy(5, 3, 16, 2)
    obs = torch.randn(10, 5)
    a1, lp1 = pi(obs, deterministic=True)
    a2, lp2 = pi(obs, deterministic=True)
    mean, _ = pi.distribution(obs)
    torch.testing.assert_close(a1, torch.tanh(mean))
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(lp1, lp2)
    noise = torch.randn(10, 3)
    torch.testing.assert_close(pi(obs, noise=noise)[0], pi(obs, noise=noise)[0])
    assert not torch.allclose(pi(obs)[0], pi(obs)[0])


def test_policy_matches_plain_mlp_without_spectral_norm():
    pi = TanhGaussianPolicy(6, 2, 32, 2, activation="relu")
    assert not pi.net.sn_layers
    obs = torch.randn(7, 6)
    out = _mlp(_torch_linears(pi.net, 0), obs, F.relu)
    mean, log_std = pi.distribution(obs)
    torch.testing.assert_close(mean, out[:, :2])
    lo, hi = pi.log_std_bounds
    torch.testing.assert_close(log_std, lo + 0.5 * (hi - lo) * (torch.tanh(out[:, 2:]) + 1))


def test_policy_spectral_norm_matches_torch_parametrization_and_updates_in_train_only():
    pi = TanhGaussianPolicy(6, 2, 32, 2, spectral_norm=True)
    assert pi.net.sn_layers == (0, 1)  # hidden layers only, not the output layer
    layers = _torch_linears(pi.net, 0)
    for l in pi.net.sn_layers:
        torch_spectral_norm(layers[l])
        with torch.no_grad():
            layers[l].parametrizations.weight[0]._u.copy_(getattr(pi.net, f"sn_u_{l}")[0])
            layers[l].parametrizations.weight[0]._v.copy_(getattr(pi.net, f"sn_v_{l}")[0])
    obs = torch.randn(9, 6)
    for _ in range(3):  # training mode: one power iteration per call, on both sides
        v_before = pi.net.sn_v_0.clone()
        mean, _ = pi.distribution(obs)
        torch.testing.assert_close(mean, _mlp(layers, obs, F.relu)[:, :2], atol=1e-5, rtol=1e-5)
        assert not torch.equal(v_before, pi.net.sn_v_0)
    for l in pi.net.sn_layers:
        torch.testing.assert_close(getattr(pi.net, f"sn_v_{l}")[0], layers[l].parametrizations.weight[0]._v)
    pi.eval()
    for m in layers:
        m.eval()
    v_before = [getattr(pi.net, f"sn_v_{l}").clone() for l in pi.net.sn_layers]
    mean, _ = pi.distribution(obs)
    torch.testing.assert_close(mean, _mlp(layers, obs, F.relu)[:, :2], atol=1e-5, rtol=1e-5)
    for l, v in zip(pi.net.sn_layers, v_before):
        assert torch.equal(v, getattr(pi.net, f"sn_v_{l}"))


def test_policy_spectral_norm_bounds_hidden_layers():
    pi = TanhGaussianPolicy(8, 3, 64, 2, spectral_norm=True)
    with torch.no_grad():
        for w in pi.net.weights:
            w.mul_(10.0)
        for _ in range(60):
            pi.distribution(torch.randn(4, 8))
    scales = pi.net.scales()
    for l in pi.net.sn_layers:
        sigma = torch.linalg.matrix_norm(pi.net.weights[l][0].detach(), ord=2)
        torch.testing.assert_close(1.0 / scales[l][0].detach(), sigma, rtol=1e-3, atol=0)
    assert scales[-1] is None


def test_policy_gradients_flow():
    pi = TanhGaussianPolicy(5, 2, 16, 2, spectral_norm=True)
    obs = torch.randn(11, 5, requires_grad=True)
    a, logp = pi(obs)
    (a.square().sum() + logp.sum()).backward()
    for name, p in pi.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, name
    assert obs.grad is not None and obs.grad.abs().sum() > 0


def test_policy_gradcheck_float64():
    pi = TanhGaussianPolicy(3, 2, 4, 1, spectral_norm=True, action_scale=[0.5, 2.0]).double().eval()
    obs = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda o: pi(o, noise=noise), (obs,))
    w0 = pi.net.weights[0].detach().clone().requires_grad_()
    obs = obs.detach()
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(pi, {"net.weights.0": w}, (obs,), {"noise": noise}), (w0,))


@pytest.mark.parametrize("B,hidden,num_layers", [(1, 5, 1), (37, 64, 2), (256, 256, 2)])
def test_twin_q_equals_two_separate_mlps(B, hidden, num_layers):
    q = TwinQ(17, 6, hidden, num_layers)
    obs, act = torch.randn(B, 17), torch.rand(B, 6) * 2 - 1
    q1, q2 = q(obs, act)
    assert q1.shape == q2.shape == (B,)
    x = torch.cat([obs, act], -1)
    ref1 = _mlp(_torch_linears(q.net, 0), x, F.relu)[:, 0]
    ref2 = _mlp(_torch_linears(q.net, 1), x, F.relu)[:, 0]
    torch.testing.assert_close(q1, ref1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q2, ref2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q1, q2)  # independent initialisations
    torch.testing.assert_close(q.min_q(obs, act), torch.minimum(ref1, ref2), atol=1e-5, rtol=1e-5)


def test_twin_q_gradients_reach_actions_through_frozen_critic():
    q = TwinQ(4, 2, 16, 2).requires_grad_(False)
    pi = TanhGaussianPolicy(4, 2, 16, 2)
    obs = torch.randn(8, 4)
    a, _ = pi(obs)
    q.min_q(obs, a).mean().backward()
    assert all(p.grad is None for p in q.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pi.parameters())


def test_twin_q_gradcheck_float64():
    q = TwinQ(3, 2, 4, 1).double()
    obs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    act = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, a: q(o, a), (obs, act))


def test_triton_backend_matches_torch():
    pytest.importorskip("triton")
    torch.manual_seed(1)
    pi_t = TanhGaussianPolicy(5, 2, 16, 2, spectral_norm=True, backend="torch")
    pi_k = TanhGaussianPolicy(5, 2, 16, 2, spectral_norm=True, backend="triton")
    pi_k.load_state_dict(pi_t.state_dict())
    q_t, q_k = TwinQ(5, 2, 16, 1, backend="torch"), TwinQ(5, 2, 16, 1, backend="triton")
    q_k.load_state_dict(q_t.state_dict())
    obs, noise = torch.randn(7, 5), torch.randn(7, 2)
    outs = []
    for pi, q in ((pi_t, q_t), (pi_k, q_k)):
        a, logp = pi(obs, noise=noise)
        loss = (q.min_q(obs, a) - logp).mean()
        grads = torch.autograd.grad(loss, list(pi.parameters()))
        outs.append((a, logp, loss, grads))
    for x, y in zip(outs[0][:3], outs[1][:3]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    for x, y in zip(outs[0][3], outs[1][3]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_value_error():
    pi = TanhGaussianPolicy(5, 2, 8, 1)
    with pytest.raises(ValueError, match="obs"):
        pi(torch.randn(3, 4))
    with pytest.raises(ValueError, match="obs"):
        pi(torch.randn(5))
    with pytest.raises(ValueError, match="dtype"):
        pi(torch.randn(3, 5).half())
    with pytest.raises(ValueError, match="noise"):
        pi(torch.randn(3, 5), noise=torch.randn(3, 3))
    with pytest.raises(ValueError, match="log_std_bounds"):
        TanhGaussianPolicy(5, 2, log_std_bounds=(2.0, -5.0))
    with pytest.raises(ValueError, match="action_scale"):
        TanhGaussianPolicy(5, 2, action_scale=0.0)
    q = TwinQ(5, 2, 8, 1)
    with pytest.raises(ValueError, match="action"):
        q(torch.randn(3, 5), torch.randn(3, 3))
    with pytest.raises(ValueError, match="action"):
        q(torch.randn(3, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="obs"):
        q(torch.randn(3, 6), torch.randn(3, 2))


def test_compiles_fullgraph():
    pi = TanhGaussianPolicy(5, 2, 16, 2, spectral_norm=True, backend="torch")
    q = TwinQ(5, 2, 16, 1, backend="torch")
    obs, noise = torch.randn(6, 5), torch.randn(6, 2)

    def objective(o, n):
        a, logp = pi(o, noise=n)
        return (q.min_q(o, a) - 0.2 * logp).mean()

    ref_pi = {k: v.clone() for k, v in pi.state_dict().items()}
    expected = objective(obs, noise)
    pi.load_state_dict(ref_pi)
    compiled = torch.compile(objective, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(obs, noise), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    pi = TanhGaussianPolicy(17, 6, 64, 2, spectral_norm=True)
    q = TwinQ(17, 6, 64, 2)
    obs, noise = torch.randn(37, 17), torch.randn(37, 6)
    outs = []
    for dev in ("cpu", "cuda"):
        pi_d, q_d = pi.to(dev).eval(), q.to(dev)
        obs_d, noise_d = obs.to(dev), noise.to(dev)
        with no_host_sync(dev):  # the networks' forward and backward on CUDA: no sync
            a, logp = pi_d(obs_d, noise=noise_d)
            loss = (q_d.min_q(obs_d, a) - logp).mean()
            grads = torch.autograd.grad(loss, list(pi_d.parameters()))
        outs.append([t.detach().cpu() for t in (a, logp, loss, *grads)])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-3)
