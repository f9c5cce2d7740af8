"""fastrp.rl.unroll: the imagined H-step objective (termination masking against hand-computed
values, prediction/gradient-model split, no NaN) and MBPO model rollouts."""

import copy

import pytest
import torch
from torch import nn

from fastrp.nn.critic import TwinQ
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp.nn.policy import TanhGaussianPolicy
from fastrp.algos.losses import imagined_objective
from fastrp.rl.unroll import model_rollout

OBS, ACT = 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")


class ConstPolicy(nn.Module):
    """``a = theta`` for every state, ``logp = lp`` (a parameter, so the entropy terms carry
    gradient)."""

    def __init__(self, lp=-0.5):
        super().__init__()
        self.act_dim = ACT
        self.theta = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.lp = nn.Parameter(torch.tensor(float(lp)))

    def forward(self, obs, noise=None):
        B = obs.shape[0]
        return self.theta.expand(B, ACT) + 0 * obs[:, :ACT], self.lp.expand(B)


class SumCritic(nn.Module):
    """``min_q(s, a) = c * sum(s)``."""

    def __init__(self, c=2.0):
        super().__init__()
        self.c = c

    def min_q(self, obs, act):
        return self.c * obs.sum(-1)


def _const_model(delta, reward):
    """A linear (one-layer) model whose mean is the constant ``[delta, reward]`` for any input."""
    model = ProbabilisticEnsemble(OBS, ACT, hidden_dim=4, num_layers=0, ensemble_size=3, num_elites=2).eval()
    with torch.no_grad():
        model.net.weights[0].zero_()
        model.net.biases[0][:, :OBS] = torch.tensor(delta)
        model.net.biases[0][:, OBS] = reward
    return model


def _step_counter_termination(fire_at, rows=None):
    """Terminates on the ``fire_at``-th call (0-based) for ``rows`` (all when None)."""
    calls = {"n": 0}

    def fn(obs, act, next_obs):
        done = torch.zeros(next_obs.shape[0], dtype=torch.bool)
        if calls["n"] == fire_at:
            if rows is None:
                done[:] = True
            else:
                done[rows] = True
        calls["n"] += 1
        return done

    return fn


def _never(obs, act, next_obs):
    return torch.zeros(next_obs.shape[0], dtype=torch.bool)


def _hand_value(s0, delta, r, lp, alpha, gamma, H, c, terminate_after=None):
    """Hand-computed J for the constant model / policy / sum critic: reward of the transition
    that terminates (index ``terminate_after``) still counts, later ones and the terminal value
    do not."""
    J = 0.0
    for t in range(H):
        J += gamma ** t * (r - alpha * lp)
        if terminate_after is not None and t == terminate_after:
            return J
    s_H = s0 + H * torch.tensor(delta)
    return J + gamma ** H * (c * float(s_H.sum()) - alpha * lp)


@pytest.mark.parametrize("H", [1, 3])
def test_objective_matches_hand_computed_value(H):
    delta, r, lp, alpha, gamma, c = [0.1, -0.2, 0.3], 1.5, -0.5, 0.2, 0.9, 2.0
    model, policy, critic = _const_model(delta, r), ConstPolicy(lp), SumCritic(c)
    s0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]])
    loss, info = imagined_objective(policy, model, critic, s0, H, gamma, alpha, _never)
    ref = [_hand_value(s, delta, r, lp, alpha, gamma, H, c) for s in s0]
    assert float(loss.detach()) == pytest.approx(-sum(ref) / 2, rel=1e-6)
    assert float(info["return"]) == pytest.approx(sum(ref) / 2, rel=1e-6)
    assert float(info["alive"]) == 1.0
    assert float(info["entropy"]) == pytest.approx(-lp)
    assert float(info["model_reward"]) == pytest.approx(sum(gamma ** t * r for t in range(H)), rel=1e-6)


@pytest.mark.parametrize("fire_at", [0, 1])
def test_termination_stops_reward_accumulation(fire_at):
    H = 3
    delta, r, lp, alpha, gamma, c = [0.1, -0.2, 0.3], 1.5, -0.5, 0.2, 0.9, 2.0
    model, policy, critic = _const_model(delta, r), ConstPolicy(lp), SumCritic(c)
    s0 = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5], [4.0, 0.0, 0.0]])
    term = _step_counter_termination(fire_at, rows=[0, 2])  # row 1 never terminates
    loss, info = imagined_objective(policy, model, critic, s0, H, gamma, alpha, term)
    ref = [
        _hand_value(s0[0], delta, r, lp, alpha, gamma, H, c, terminate_after=fire_at),
        _hand_value(s0[1], delta, r, lp, alpha, gamma, H, c),
        _hand_value(s0[2], delta, r, lp, alpha, gamma, H, c, terminate_after=fire_at),
    ]
    assert float(loss.detach()) == pytest.approx(-sum(ref) / 3, rel=1e-6)
    assert float(info["alive"]) == pytest.approx(1 / 3)
    # the terminal value of a terminated row does not count: its gradient to the critic scale is 0
    assert ref[0] == pytest.approx(sum(gamma ** t * (r - alpha * lp) for t in range(fire_at + 1)))
    loss.backward()
    # d(-J)/d(lp) = alpha * mean(sum of the alive discounts)
    alive_weights = [sum(gamma ** t for t in range(fire_at + 1))] * 2 + [sum(gamma ** t for t in range(H + 1))]
    assert float(policy.lp.grad) == pytest.approx(alpha * sum(alive_weights) / 3, rel=1e-6)


def _learned_setup(seed=0, sn=False):
    torch.manual_seed(seed)
    pred = ProbabilisticEnsemble(OBS, ACT, hidden_dim=16, num_layers=2, ensemble_size=3, num_elites=2,
                                 spectral_norm="hidden" if sn else "none")
    grad = ProbabilisticEnsemble(OBS, ACT, hidden_dim=16, num_layers=2, ensemble_size=3, num_elites=2)
    policy = TanhGaussianPolicy(OBS, ACT, hidden_dim=16, num_layers=2, spectral_norm=sn)
    critic = TwinQ(OBS, ACT, hidden_dim=16, num_layers=2)
    for m in (pred, grad):
        m.input_normalizer.update(torch.randn(64, OBS + ACT))
        m.eval()
    return policy, pred, grad, critic


def _run(policy, pred, critic, grad=None, seed=7, H=3, deterministic_model=True):
    g = torch.Generator().manual_seed(seed)
    s0 = torch.randn(37, OBS, generator=torch.Generator().manual_seed(1))
    return imagined_objective(policy, pred, critic, s0, H, 0.99, 0.1, _never, grad_model=grad, generator=g,
                              deterministic_model=deterministic_model)


def _grads(module):
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("deterministic_model", [True, False])
def test_grad_model_gives_values_of_pred_and_gradients_of_grad(deterministic_model):
    policy, pred, grad, critic = _learned_setup()
    loss_p, info_p = _run(policy, pred, critic, deterministic_model=deterministic_model)
    loss_p.backward()
    g_pred_only = _grads(policy)
    policy.zero_grad(set_to_none=True)
    pred.zero_grad(set_to_none=True)

    loss_g, info_g = _run(policy, pred, critic, grad=grad, deterministic_model=deterministic_model)
    torch.testing.assert_close(loss_g, loss_p)  # values come from the prediction model
    for k in info_p:
        torch.testing.assert_close(info_g[k], info_p[k])
    loss_g.backward()
    assert all(p.grad is None for p in pred.parameters())  # no gradient through the prediction model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in grad.parameters())
    g_with_grad = _grads(policy)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(g_pred_only, g_with_grad))

    # a gradient model identical to the prediction model reproduces the plain policy gradient
    policy.zero_grad(set_to_none=True)
    twin = copy.deepcopy(pred)
    loss_t, _ = _run(policy, pred, critic, grad=twin, deterministic_model=deterministic_model)
    loss_t.backward()
    for a, b in zip(_grads(policy), g_pred_only):
        torch.testing.assert_close(a, b)


def test_objective_finite_with_real_termination_and_sn():
    from fastrp.envs import termination_fn as env_termination_fn

    term = env_termination_fn("Hopper")
    pred = ProbabilisticEnsemble(11, 3, hidden_dim=16, num_layers=2, ensemble_size=3, num_elites=2,
                                 spectral_norm="hidden")
    policy = TanhGaussianPolicy(11, 3, hidden_dim=16, num_layers=2, spectral_norm=True)
    critic = TwinQ(11, 3, hidden_dim=16, num_layers=2)
    s0 = torch.randn(256, 11) * 0.1
    s0[:, 0] += 1.25
    loss, info = imagined_objective(policy, pred, critic, s0, 3, 0.99, torch.tensor(0.2), term,
                                    generator=torch.Generator().manual_seed(0), deterministic_model=False)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v).all() and not v.requires_grad for v in info.values())
    assert 0.0 <= float(info["alive"]) <= 1.0
    for p in policy.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_horizon_zero_is_the_sac_actor_loss():
    policy, pred, _, critic = _learned_setup()
    s0 = torch.randn(5, OBS)
    noise = torch.randn(5, ACT, generator=torch.Generator().manual_seed(3))
    loss, _ = imagined_objective(policy, pred, critic, s0, 0, 0.99, 0.1, _never,
                                 generator=torch.Generator().manual_seed(3))
    a, logp = policy(s0, noise=noise)
    torch.testing.assert_close(loss, -(critic.min_q(s0, a) - 0.1 * logp).mean())


def test_objective_bad_inputs():
    policy, pred, _, critic = _learned_setup()
    with pytest.raises(ValueError, match=r"start_obs must have shape \[\*, 3\]"):
        imagined_objective(policy, pred, critic, torch.zeros(4, 2), 2, 0.99, 0.1, _never)
    with pytest.raises(ValueError, match="horizon"):
        imagined_objective(policy, pred, critic, torch.zeros(4, 3), -1, 0.99, 0.1, _never)
    other = ProbabilisticEnsemble(OBS, ACT, hidden_dim=8, num_layers=1, ensemble_size=5, num_elites=2)
    with pytest.raises(ValueError, match="grad_model must have ensemble_size=3"):
        imagined_objective(policy, pred, critic, torch.zeros(4, 3), 2, 0.99, 0.1, _never, grad_model=other)
    no_reward = ProbabilisticEnsemble(OBS, ACT, hidden_dim=8, num_layers=1, ensemble_size=3, num_elites=2,
                                      learn_reward=False)
    with pytest.raises(ValueError, match="reward_fn"):
        imagined_objective(policy, no_reward, critic, torch.zeros(4, 3), 2, 0.99, 0.1, _never)
    with pytest.raises(ValueError, match="length"):
        model_rollout(policy, pred, torch.zeros(4, 3), 0, _never)


def test_model_rollout_stops_per_sample_at_termination():
    policy = _learned_setup()[0]
    pred = _const_model([1.0, 0.0, 0.0], 0.5)
    B, length = 37, 4
    s0 = torch.zeros(B, OBS)
    s0[:, 0] = torch.arange(B, dtype=torch.float32) % 4 - 3.0  # x0 in {-3, -2, -1, 0}

    def term(obs, act, next_obs):  # fires once x reaches 0
        return next_obs[:, 0] >= 0

    out = model_rollout(policy, pred, s0, length, term, generator=torch.Generator().manual_seed(0),
                        deterministic_model=True)
    # a start at x0 runs max(-x0, 1) steps: 3, 2, 1, 1
    steps = {-3.0: 3, -2.0: 2, -1.0: 1, 0.0: 1}
    expected = sum(steps[float(x)] for x in s0[:, 0])
    assert out["obs"].shape == (expected, OBS) and out["action"].shape == (expected, ACT)
    assert out["reward"].shape == (expected,) and out["terminated"].dtype == torch.bool
    assert int(out["terminated"].sum()) == B  # every sample ends with exactly one terminal transition
    torch.testing.assert_close(out["next_obs"] - out["obs"], torch.tensor([1.0, 0.0, 0.0]).expand(expected, OBS))
    assert not any(v.requires_grad for v in out.values())
    never = model_rollout(policy, pred, s0, length, _never, generator=torch.Generator().manual_seed(0))
    assert never["obs"].shape[0] == B * length and not never["terminated"].any()


class _MeanPolicy(nn.Module):
    """The deterministic (mean) action of a policy, so CPU and CUDA runs draw nothing."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.act_dim = policy.act_dim

    def forward(self, obs, noise=None):
        return self.policy(obs, deterministic=True)


@pytest.mark.cuda
def test_unroll_cuda_matches_cpu():
    policy, pred, grad, critic = _learned_setup()
    s0 = torch.randn(64, OBS)
    gpu = [copy.deepcopy(m).cuda() for m in (policy, pred, grad, critic)]
    loss_g, info_g = imagined_objective(gpu[0], gpu[1], gpu[3], s0.cuda(), 3, 0.99, 0.1, _never, grad_model=gpu[2],
                                        generator=torch.Generator(device="cuda").manual_seed(0))
    loss_g.backward()
    assert torch.isfinite(loss_g) and all(torch.isfinite(v) for v in info_g.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu[0].parameters())
    # identical draws on both devices: the mean action and a one-member ensemble
    one = ProbabilisticEnsemble(OBS, ACT, hidden_dim=16, num_layers=2, ensemble_size=1, num_elites=1).eval()
    one.input_normalizer.update(torch.randn(64, OBS + ACT))
    mean_policy = _MeanPolicy(policy)
    ref, _ = imagined_objective(mean_policy, one, critic, s0, 3, 0.99, 0.1, _never, grad_model=copy.deepcopy(one))
    out, _ = imagined_objective(copy.deepcopy(mean_policy).cuda(), copy.deepcopy(one).cuda(),
                                copy.deepcopy(critic).cuda(), s0.cuda(), 3, 0.99, 0.1, _never,
                                grad_model=copy.deepcopy(one).cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    rollout = model_rollout(gpu[0], gpu[1], s0.cuda(), 3, _never, generator=torch.Generator(device="cuda").manual_seed(0))
    assert rollout["obs"].shape == (64 * 3, OBS) and rollout["obs"].is_cuda
