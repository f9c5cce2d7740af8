"""fastrp.nn.normalizer.RunningNormalizer and fastrp.nn.model.ProbabilisticEnsemble: statistics
against numpy, NLL against torch.distributions, log-variance bounds, grouped prediction, bad
inputs (fitting: tests/test_model_fit.py)."""

import math

import numpy as np
import pytest
import torch

from fastrp.nn.model import ProbabilisticEnsemble, gaussian_nll, soft_bound_logvar
from fastrp.nn.normalizer import RunningNormalizer


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_data(n, obs_dim=3, act_dim=2, seed=0, noise=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g, dtype=dtype) * 2.0 + 1.0
    act = torch.rand(n, act_dim, generator=g, dtype=dtype) * 2.0 - 1.0
    A = torch.randn(obs_dim + act_dim, obs_dim, generator=g, dtype=dtype) * 0.5
    w = torch.randn(obs_dim + act_dim, generator=g, dtype=dtype)
    x = torch.cat([obs, act], -1)
    next_obs = obs + x @ A + noise * torch.randn(n, obs_dim, generator=g, dtype=dtype)
    reward = x @ w
    return obs, act, next_obs, reward, A, w


def _small_model(**kw):
    args = dict(hidden_dim=32, num_layers=2, ensemble_size=4, num_elites=2)
    args.update(kw)
    return ProbabilisticEnsemble(3, 2, **args)


# ---------------------------------------------------------------------------------------------
# RunningNormalizer
@pytest.mark.parametrize("dim", [1, 5])
def test_normalizer_matches_numpy_over_batches(dim):
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(b, dim)) * rng.uniform(0.5, 4, size=dim) for b in (1, 37, 256, 7)]
    norm = RunningNormalizer(dim)
    for b in batches:
        norm.update(torch.as_tensor(b, dtype=torch.float32))
    data = np.concatenate(batches)
    np.testing.assert_allclose(norm.mean.numpy(), data.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.var.numpy(), data.var(0), rtol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), data.std(0), rtol=1e-5)
    assert float(norm.count) == len(data)
    x = torch.as_tensor(data, dtype=torch.float64)
    z = norm.normalize(x)
    np.testing.assert_allclose(z.mean(0).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(norm.denormalize(z), x)
    assert z.dtype == torch.float64


def test_normalizer_clip_and_floor_and_reset():
    x = torch.cat([torch.zeros(50, 1), torch.randn(50, 1) * 1e3, torch.randn(50, 1)], dim=1)
    clipped = RunningNormalizer(3, clip_std=(0.1, 10.0))
    clipped.update(x)
    assert clipped.std[0] == pytest.approx(0.1) and clipped.std[1] == pytest.approx(10.0)
    assert 0.1 < clipped.std[2] < 10.0
    floored = RunningNormalizer(3, eps=1e-4)
    floored.update(x)
    assert floored.std[0] == pytest.approx(1e-4) and floored.std[1] > 100
    assert torch.isfinite(floored.normalize(x)).all()
    floored.reset()
    assert float(floored.count) == 0 and (floored.std == 1).all() and (floored.mean == 0).all()
    floored.update(x[:0])  # an empty batch changes nothing
    assert float(floored.count) == 0


def test_normalizer_state_dict_round_trip():
    a = RunningNormalizer(4, clip_std=(0.1, 10.0))
    a.update(torch.randn(100, 4) * 3 + 2)
    b = RunningNormalizer(4, clip_std=(0.1, 10.0))
    b.load_state_dict(a.state_dict())
    for name in ("count", "mean", "var", "std"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name))
    more = torch.randn(9, 4)
    a.update(more)
    b.update(more)
    torch.testing.assert_close(b.mean, a.mean)
    torch.testing.assert_close(b.var, a.var)


def test_normalizer_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        RunningNormalizer(0)
    with pytest.raises(ValueError, match="clip_std"):
        RunningNormalizer(2, clip_std=(1.0, 0.5))
    with pytest.raises(ValueError, match="eps"):
        RunningNormalizer(2, eps=0.0)
    norm = RunningNormalizer(3)
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 3\]"):
        norm.update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dtype"):
        norm.update(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 3\]"):
        norm.normalize(torch.zeros(4, 2))


# ---------------------------------------------------------------------------------------------
# loss pieces
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 37, 5), (3, 256, 1)])
def test_gaussian_nll_matches_torch_distributions(shape):
    mean, logvar, target = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64), \
        torch.randn(shape, dtype=torch.float64)
    ref = -torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(target).flatten(1).mean(1)
    torch.testing.assert_close(gaussian_nll(mean, logvar, target), ref)
    shared = gaussian_nll(mean, logvar, target[0])  # a target without the member dimension
    ref_shared = -torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(target[0]).flatten(1).mean(1)
    torch.testing.assert_close(shared, ref_shared)


def test_soft_bounds_keep_logvar_in_range():
    raw = torch.linspace(-1e4, 1e4, 20001, dtype=torch.float64).unsqueeze(-1).expand(-1, 3)
    lo = torch.tensor([-10.0, -5.0, -1.0], dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
    lv = soft_bound_logvar(raw, lo, hi)
    assert torch.isfinite(lv).all()
    assert (lv >= lo).all()
    assert (lv <= hi + math.log(2.0)).all()  # softplus(z) <= z + log 2 bounds the overshoot
    assert (lv[:, 0] <= hi[0] + 1e-4).all()  # negligible when max - min is large (MBPO's bounds)
    assert (lv.diff(dim=0) >= 0).all()  # monotone in raw
    mid = soft_bound_logvar(torch.zeros(1, 3, dtype=torch.float64), lo, hi)
    assert ((mid > lo) & (mid < hi)).all()
    lv.sum().backward()
    assert lo.grad is not None and hi.grad is not None


@pytest.mark.parametrize("B", [1, 37, 256])
def test_predict_members_equals_dense_pick(B):
    obs, act, _, _, _, _ = _linear_data(B)
    model = _small_model(spectral_norm="hidden").eval()
    model.input_normalizer.update(torch.cat([obs, act], -1))
    members = torch.randint(0, model.ensemble_size, (B,))
    next_obs, reward = model.predict(obs, act, members=members)
    mean, logvar = model(torch.cat([obs, act], -1))  # all members
    picked = mean[members, torch.arange(B)]
    torch.testing.assert_close(next_obs, obs + picked[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward, picked[:, 3], rtol=1e-5, atol=1e-5)
    noise = torch.randn(B, 4)
    next_s, reward_s = model.predict(obs, act, members=members, deterministic=False, noise=noise)
    std = (0.5 * logvar[members, torch.arange(B)]).exp()
    torch.testing.assert_close(next_s, obs + picked[:, :3] + std[:, :3] * noise[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reward_s, picked[:, 3] + std[:, 3] * noise[:, 3], rtol=1e-5, atol=1e-5)
    # members=None: moment-matched mixture of the elites
    mix_obs, _ = model.predict(obs, act)
    torch.testing.assert_close(mix_obs, obs + mean[model.elite_idx].mean(0)[:, :3], rtol=1e-5, atol=1e-5)


def test_predict_is_differentiable_in_inputs():
    obs, act, _, _, _, _ = _linear_data(8, dtype=torch.float64)
    model = _small_model().double()
    members = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    obs.requires_grad_(True)
    act.requires_grad_(True)

    def f(o, a):
        s, r = model.predict(o, a, members=members)
        return s, r

    assert torch.autograd.gradcheck(f, (obs, act))


def test_model_bad_inputs():
    with pytest.raises(ValueError, match="num_elites"):
        ProbabilisticEnsemble(3, 2, ensemble_size=3, num_elites=4)
    with pytest.raises(ValueError, match="spectral_norm"):
        ProbabilisticEnsemble(3, 2, spectral_norm="some")
    model = _small_model()
    obs, act, next_obs, reward, _, _ = _linear_data(20)
    with pytest.raises(ValueError, match=r"act must have shape \[20, 2\]"):
        model.predict(obs, act[:5])
    with pytest.raises(ValueError, match=r"obs must have shape \[\*, 3\]"):
        model.predict(obs[:, :2], act)
    with pytest.raises(ValueError, match="members must have dtype torch.int64"):
        model.predict(obs, act, members=torch.zeros(20, dtype=torch.int32))
    with pytest.raises(ValueError, match="members must be None, 'random'"):
        model.predict(obs, act, members="all")
    with pytest.raises(ValueError, match="noise must have shape"):
        model.predict(obs, act, members="random", deterministic=False, noise=torch.zeros(20, 3))
