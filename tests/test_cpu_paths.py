"""The CPU fast paths: automatic dispatch to plain autograd, cached spectral-norm scales, the
observation normaliser shared by policy and critics, and frozen models in the policy unroll."""

import pytest
import torch

from fastrp.nn.ensemble import EnsembleMLP
from fastrp.nn.policy import TanhGaussianPolicy
from fastrp.ops import ensemble_mlp, ensemble_mlp_jvp, spectral_norm, spectral_norm_layers
from fastrp.ops import _common


def _params(E, dims, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(E, a, b, generator=g, dtype=dtype) / a**0.5).requires_grad_() for a, b in zip(dims[:-1], dims[1:])]
    bs = [(0.1 * torch.randn(E, b, generator=g, dtype=dtype)).requires_grad_() for b in dims[1:]]
    ss = [None] + [(1.0 + 0.1 * torch.rand(E, generator=g, dtype=dtype)).requires_grad_() for _ in dims[2:]]
    return ws, bs, ss


def _grads(out, inputs):
    return torch.autograd.grad(out.square().sum(), [t for t in inputs if t is not None and t.requires_grad])


def test_auto_dispatch_uses_autograd_on_cpu_and_the_op_when_asked():
    x = torch.randn(3, 4)
    assert _common.eager_autograd(None, "torch", x)
    assert not _common.eager_autograd("torch", "torch", x)  # an explicit backend keeps the registered op
    assert not _common.eager_autograd(None, "triton", x)


@pytest.mark.parametrize("grouped", [False, True])
def test_ensemble_mlp_auto_matches_registered_op(grouped):
    E, B, dims = 5, 37, (7, 13, 11, 3)
    ws, bs, ss = _params(E, dims)
    if grouped:
        x = torch.randn(B, dims[0], dtype=torch.float64, requires_grad=True)
        members = torch.tensor([4, 0, 0, 2] * 9 + [4])  # member 1 and 3 get no rows
        kw = dict(members=members)
    else:
        x = torch.randn(E, B, dims[0], dtype=torch.float64, requires_grad=True)
        kw = {}
    auto = ensemble_mlp(x, ws, bs, ss, "silu", **kw)
    op = ensemble_mlp(x, ws, bs, ss, "silu", backend="torch", **kw)
    torch.testing.assert_close(auto, op, rtol=1e-12, atol=1e-12)
    for ga, go in zip(_grads(auto, [x] + ws + bs + ss), _grads(op, [x] + ws + bs + ss)):
        torch.testing.assert_close(ga, go, rtol=1e-10, atol=1e-12)


def test_grouped_autograd_gradcheck():
    E, dims = 3, (2, 4, 3)
    ws, bs, ss = _params(E, dims, seed=1)
    x = torch.randn(6, dims[0], dtype=torch.float64, requires_grad=True)
    members = torch.tensor([2, 0, 2, 2, 0, 2])
    fn = lambda x_, w0, w1, b0, b1, s1: ensemble_mlp(x_, [w0, w1], [b0, b1], [None, s1], "tanh", members=members)
    assert torch.autograd.gradcheck(fn, (x, ws[0], ws[1], bs[0], bs[1], ss[1]))


def test_jvp_auto_matches_registered_op():
    E, B, K, dims = 3, 9, 4, (5, 8, 2)
    ws, bs, ss = _params(E, dims, seed=2)
    x = torch.randn(E, B, dims[0], dtype=torch.float64, requires_grad=True)
    t = torch.randn(E, B, K, dims[0], dtype=torch.float64)
    y_a, j_a = ensemble_mlp_jvp(x, t, ws, bs, ss, "silu")
    y_o, j_o = ensemble_mlp_jvp(x, t, ws, bs, ss, "silu", backend="torch")
    torch.testing.assert_close(y_a, y_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(j_a, j_o, rtol=1e-12, atol=1e-12)
    loss_a = y_a.square().sum() + j_a.square().sum()
    loss_o = y_o.square().sum() + j_o.square().sum()
    for ga, go in zip(torch.autograd.grad(loss_a, [x] + ws), torch.autograd.grad(loss_o, [x] + ws)):
        torch.testing.assert_close(ga, go, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_spectral_norm_auto_matches_registered_op(n):
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True),
          torch.randn(4, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)]
    vs = [torch.nn.functional.normalize(torch.randn(4, w.shape[1], generator=g, dtype=torch.float64), dim=1) for w in ws]
    us = [torch.nn.functional.normalize(torch.randn(4, w.shape[2], generator=g, dtype=torch.float64), dim=1) for w in ws]
    auto = spectral_norm_layers(ws, vs, n, us=us)
    op = spectral_norm_layers(ws, vs, n, us=us, backend="torch")
    for a, o in zip(auto, op):
        for ta, to in zip(a, o):
            torch.testing.assert_close(ta, to, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(sum(s.sum() for s in auto[0]), ws)
    go = torch.autograd.grad(sum(s.sum() for s in op[0]), ws)
    for a, o in zip(ga, go):
        torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12)
    single = spectral_norm(ws[0], vs[0], n, u=us[0])
    for a, o in zip(single, spectral_norm(ws[0], vs[0], n, u=us[0], backend="torch")):
        torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12)


def test_cached_scales_reuse_one_power_iteration():
    torch.manual_seed(0)
    net = EnsembleMLP(4, 3, 8, 2, 2, spectral_norm="hidden")
    x = torch.randn(5, 4)
    ref = EnsembleMLP(4, 3, 8, 2, 2, spectral_norm="hidden")
    ref.load_state_dict(net.state_dict())
    # uncached: the first forward runs one power iteration; the cached block runs exactly one too
    y_ref = ref(x)
    with net.cached_scales():
        y1 = net(x)
        v_after_first = net.sn_v_0.clone()
        y2 = net(x)
        with net.cached_scales():  # nesting keeps the outer cache
            y3 = net(x)
    torch.testing.assert_close(y1, y_ref)
    torch.testing.assert_close(y2, y_ref)
    torch.testing.assert_close(y3, y_ref)
    torch.testing.assert_close(net.sn_v_0, v_after_first)
    torch.testing.assert_close(net.sn_v_0, ref.sn_v_0)
    assert net._scale_cache is None
    # gradients through the cached 1/sigma equal those of separate forwards in eval mode
    net.eval(), ref.eval()
    with net.cached_scales():
        loss = net(x).square().sum() + net(2 * x).square().sum()
    g_cached = torch.autograd.grad(loss, list(net.parameters()))
    g_plain = torch.autograd.grad(ref(x).square().sum() + ref(2 * x).square().sum(), list(ref.parameters()))
    for a, b in zip(g_cached, g_plain):
        torch.testing.assert_close(a, b)


def test_policy_sees_normalised_observations():
    from fastrp.nn.normalizer import RunningNormalizer

    torch.manual_seed(0)
    norm = RunningNormalizer(3, clip_std=(0.1, 10.0))
    norm.update(torch.randn(100, 3) * torch.tensor([0.01, 1.0, 50.0]) + 5.0)
    pi = TanhGaussianPolicy(3, 2, 16, 2, obs_normalizer=norm)
    plain = TanhGaussianPolicy(3, 2, 16, 2)
    plain.net.load_state_dict(pi.net.state_dict())
    obs = torch.randn(4, 3)
    a, _ = pi(obs, deterministic=True)
    b, _ = plain(norm.normalize(obs), deterministic=True)
    torch.testing.assert_close(a, b)


def test_agent_shares_one_observation_normaliser():
    from fastrp.algos import get as get_algo
    from fastrp.config import parse_args

    cfg = parse_args(["--env", "InvertedPendulum", "--algo", "maac", "--preset", "tiny"])
    agent = get_algo("maac")(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"))
    norm = agent.obs_normalizer
    assert norm is not None
    assert agent.policy.obs_normalizer is norm and agent.critic.obs_normalizer is norm
    assert agent.critic_target.obs_normalizer is norm  # the target critic is not a stale copy
    off = parse_args(["--env", "InvertedPendulum", "--algo", "sac", "--preset", "tiny", "--obs-norm", "false"])
    assert get_algo("sac")(off, 4, 1, [-3.0], [3.0], torch.device("cpu")).obs_normalizer is None


def test_policy_update_leaves_model_state_alone():
    from fastrp.algos import get as get_algo
    from fastrp.config import parse_args

    cfg = parse_args(["--env", "InvertedPendulum", "--algo", "ddppo-sn", "--preset", "tiny"])
    agent = get_algo("ddppo-sn")(cfg, 4, 1, [-3.0], [3.0], torch.device("cpu"),
                                 termination=lambda o, a, n: torch.zeros(o.shape[0], dtype=torch.bool))
    def model_state():
        return {f"{name}.{k}": v.clone() for name, m in (("model", agent.model), ("grad_model", agent.grad_model))
                for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}

    before = model_state()
    weights = [p.clone() for p in agent.policy.parameters()]
    with agent.policy_update_mode():
        agent.policy_update(torch.randn(8, 4))
    after = model_state()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v)  # weights and spectral-norm vectors untouched
    assert agent.model.training and agent.grad_model.training  # modes restored
    assert all(p.requires_grad for p in agent.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(weights, agent.policy.parameters()))


def test_ensemble_linear_auto_matches_registered_op():
    from fastrp.ops import ensemble_linear

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_()
    auto, op = ensemble_linear(x, w, b, s), ensemble_linear(x, w, b, s, backend="torch")
    torch.testing.assert_close(auto, op, rtol=1e-12, atol=1e-12)
    for ga, go in zip(_grads(auto, [x, w, b, s]), _grads(op, [x, w, b, s])):
        torch.testing.assert_close(ga, go, rtol=1e-12, atol=1e-12)
