"""fastrp.nn.normalizer.RunningNormalizer and fastrp.nn.model.ProbabilisticEnsemble: statistics
against numpy, NLL against torch.distributions, log-variance bounds, fitting, early stopping,
elites, grouped prediction, checkpoint round trip, DDPPO's finite-difference gradient loss."""

import copy
import io
import math

import numpy as np
import pytest
import torch

from fastrp.nn.model import ProbabilisticEnsemble, fd_gradient_loss, gaussian_nll, soft_bound_logvar
from fastrp.nn.normalizer import RunningNormalizer
from fastrp.ops.knn import fd_targets


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


# ---------------------------------------------------------------------------------------------
# fitting
def test_fit_learns_linear_dynamics():
    obs, act, next_obs, reward, _, _ = _linear_data(1500)
    model = _small_model()
    g = torch.Generator().manual_seed(1)
    stats = model.fit(obs, act, next_obs, reward, max_epochs=40, batch_size=64, generator=g)
    targets = model.make_targets(obs, next_obs, reward)
    assert stats["epochs"] <= 40 and stats["steps"] > 0
    assert stats["num_holdout"] == 300 and stats["num_train"] == 1200
    assert math.isfinite(stats["train_nll"])
    assert stats["holdout_mse"] < 0.02 * float(targets.var(0).mean())
    with torch.no_grad():
        pred_obs, pred_rew = model.predict(obs[:200], act[:200], members="random", generator=g)
    assert (pred_obs - next_obs[:200]).square().mean() < 0.02 * float((next_obs - obs).var(0).mean())
    assert (pred_rew - reward[:200]).square().mean() < 0.02 * float(reward.var())


def test_elites_are_best_holdout_members_and_snapshots_restored():
    obs, act, next_obs, reward, _, _ = _linear_data(600, noise=0.1)
    model = _small_model(ensemble_size=5, num_elites=3)
    stats = model.fit(obs, act, next_obs, reward, max_epochs=6, batch_size=64,
                      generator=torch.Generator().manual_seed(3))
    # the first draw of fit's generator is the holdout permutation
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(3))
    hold = perm[: stats["num_holdout"]]
    model.eval()
    with torch.no_grad():
        mean, _ = model(torch.cat([obs[hold], act[hold]], -1))
    mse = (mean - model.make_targets(obs[hold], next_obs[hold], reward[hold])).square().mean(dim=(1, 2))
    torch.testing.assert_close(mse, model.holdout_mse, rtol=1e-4, atol=1e-7)  # restored best snapshot
    torch.testing.assert_close(torch.tensor(stats["holdout_mse_members"]), model.holdout_mse)
    assert sorted(model.elite_idx.tolist()) == sorted(torch.argsort(mse)[:3].tolist())
    assert stats["holdout_mse"] == pytest.approx(float(mse[model.elite_idx].mean()), rel=1e-4)
    picks = model.sample_elites(500, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == set(model.elite_idx.tolist())


def test_early_stopping_stops_after_patience():
    obs, act, next_obs, reward, _, _ = _linear_data(200)
    model = _small_model(lr=1e-12)  # no member can improve by 1%
    stats = model.fit(obs, act, next_obs, reward, max_epochs=50, patience=3, batch_size=64)
    assert stats["epochs"] == 1 + 3
    model = _small_model()
    stats = model.fit(obs, act, next_obs, reward, max_epochs=50, max_steps=5, batch_size=64)
    assert stats["steps"] == 5 and stats["epochs"] == 2


def test_fit_without_holdout_and_without_reward():
    obs, act, next_obs, _, _, _ = _linear_data(40)
    model = ProbabilisticEnsemble(3, 2, hidden_dim=8, num_layers=1, ensemble_size=2, num_elites=1,
                                  learn_reward=False, spectral_norm="hidden")
    stats = model.fit(obs, act, next_obs, holdout_ratio=0.0, max_epochs=2, batch_size=16)
    assert stats["num_holdout"] == 0 and stats["epochs"] == 2
    next_pred, reward = model.predict(obs, act, members="random")
    assert reward is None and next_pred.shape == obs.shape and torch.isfinite(next_pred).all()


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


def test_state_dict_round_trip_resumes_exactly():
    obs, act, next_obs, reward, _, _ = _linear_data(300)
    a = _small_model(spectral_norm="hidden")
    a.fit(obs, act, next_obs, reward, max_epochs=2, batch_size=64, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _small_model(spectral_norm="hidden")
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert torch.equal(a.elite_idx, b.elite_idx)
    torch.testing.assert_close(a.input_normalizer.std, b.input_normalizer.std)
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[k][name], sb[k][name])
    # an in-process load must not share Adam state tensors with the source
    c = _small_model(spectral_norm="hidden")
    c.load_state_dict(a.state_dict())
    assert c.optimizer.state_dict()["state"][0]["exp_avg"].data_ptr() != sa[0]["exp_avg"].data_ptr()
    # continuing both gives identical parameters
    for m in (a, b):
        m.fit(obs, act, next_obs, reward, max_epochs=1, batch_size=64, generator=torch.Generator().manual_seed(5))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(pa, torch.Tensor):
            torch.testing.assert_close(pa, pb, msg=name)
    d = copy.deepcopy(a)  # deep copies keep their optimizer bound to their own parameters
    assert d.optimizer.param_groups[0]["params"][0] is d.net.weights[0]


def test_model_bad_inputs():
    with pytest.raises(ValueError, match="num_elites"):
        ProbabilisticEnsemble(3, 2, ensemble_size=3, num_elites=4)
    with pytest.raises(ValueError, match="weight_decay"):
        ProbabilisticEnsemble(3, 2, num_layers=2, weight_decay=(1e-4, 1e-4))
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
    with pytest.raises(ValueError, match="reward must be given"):
        model.fit(obs, act, next_obs)
    with pytest.raises(ValueError, match=r"next_obs must have shape \[20, 3\]"):
        model.fit(obs, act, next_obs[:5], reward)
    with pytest.raises(ValueError, match="fd_k must be <="):
        model.fit(obs, act, next_obs, reward, fd_weight=1.0, fd_k=20, max_epochs=1)
    with pytest.raises(ValueError, match="holdout_ratio"):
        model.fit(obs, act, next_obs, reward, holdout_ratio=1.5)


# ---------------------------------------------------------------------------------------------
# DDPPO gradient-model loss
def _exact_linear_model(A, w, mean, std):
    """A one-layer model whose mean head is exactly ``x @ [A | w]`` for raw ``x`` under the
    input normaliser ``(mean, std)``: ``x = x_n * std + mean`` so the network weight is
    ``diag(std) @ M`` and its bias ``mean @ M``."""
    model = ProbabilisticEnsemble(3, 2, hidden_dim=4, num_layers=0, ensemble_size=3, num_elites=2).double()
    M = torch.cat([A, w[:, None]], dim=1)
    with torch.no_grad():
        model.input_normalizer.mean.copy_(mean)
        model.input_normalizer.std.copy_(std)
        model.net.weights[0][:, :, :4] = std[:, None] * M
        model.net.biases[0][:, :4] = mean @ M
    return model


def test_fd_gradient_loss_zero_for_exact_linear_model():
    obs, act, next_obs, reward, A, w = _linear_data(400, dtype=torch.float64)
    x = torch.cat([obs, act], -1)
    mean, std = x.mean(0), x.std(0) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    model = _exact_linear_model(A, w, mean, std)
    targets = model.make_targets(obs, next_obs, reward)
    q = torch.arange(0, 400, 7)
    directions, deltas, _ = fd_targets(x, targets, q, 5, scale=std)
    loss = fd_gradient_loss(model, x[q], directions, deltas)
    assert float(loss.detach()) < 1e-20
    m, _ = model(x)  # the mean head is the linear map
    torch.testing.assert_close(m[0], targets)
    with torch.no_grad():  # any other map gives a positive loss, with gradients to the parameters
        model.net.weights[0][1, 0, 0] += 0.3
    per = fd_gradient_loss(model, x[q], directions, deltas, per_member=True)
    assert per.shape == (3,) and per[1] > 1e-4 and per[0] < 1e-20 and per[2] < 1e-20
    per.sum().backward()
    assert model.net.weights[0].grad[1].abs().sum() > 0
    assert model.net.weights[0].grad[0].abs().max() < 1e-12 * model.net.weights[0].grad[1].abs().max()


def test_fd_gradient_loss_matches_autograd_jacobian():
    model = _small_model(spectral_norm="hidden").double().eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    model.input_normalizer.update(torch.randn(50, 5, dtype=torch.float64) * 3 + 1)
    directions = torch.randn(6, 4, 5, dtype=torch.float64)
    deltas = torch.randn(6, 4, 4, dtype=torch.float64)
    per = fd_gradient_loss(model, x, directions, deltas, per_member=True)
    ref = []
    for e in range(model.ensemble_size):
        def mean_e(xi):
            return model(xi.unsqueeze(0))[0][e, 0]

        jac = torch.stack([torch.autograd.functional.jacobian(mean_e, xi) for xi in x])  # [Q, out, in]
        jv = torch.einsum("qoi,qki->qko", jac, directions)
        ref.append((jv - deltas).square().mean())
    torch.testing.assert_close(per, torch.stack(ref))


def test_fit_with_gradient_loss():
    obs, act, next_obs, reward, _, _ = _linear_data(500, noise=0.05)
    model = _small_model()
    stats = model.fit(obs, act, next_obs, reward, max_epochs=3, batch_size=64, fd_weight=1.0, fd_k=4,
                      fd_window=300, generator=torch.Generator().manual_seed(0))
    assert stats["fd_loss"] > 0 and math.isfinite(stats["fd_loss"]) and math.isfinite(stats["train_nll"])
    for p in model.parameters():
        assert torch.isfinite(p).all()


# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_model_cuda_matches_cpu():
    obs, act, next_obs, reward, _, _ = _linear_data(400)
    cpu = _small_model(spectral_norm="hidden")
    cpu.fit(obs, act, next_obs, reward, max_epochs=2, batch_size=64)
    gpu = copy.deepcopy(cpu).cuda().eval()
    cpu.eval()
    members = torch.randint(0, 4, (400,))
    ref = cpu.predict(obs, act, members=members)
    out = gpu.predict(obs.cuda(), act.cuda(), members=members.cuda())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    stats = gpu.train().fit(obs.cuda(), act.cuda(), next_obs.cuda(), reward.cuda(), max_epochs=3, batch_size=64,
                            fd_weight=1.0, fd_k=4, generator=g)
    assert math.isfinite(stats["holdout_mse"]) and stats["fd_loss"] > 0
    x = torch.cat([obs, act], -1).cuda()
    q = torch.arange(0, 400, 9, device="cuda")
    d, dl, _ = fd_targets(x, gpu.make_targets(obs.cuda(), next_obs.cuda(), reward.cuda()), q, 4,
                          scale=gpu.input_normalizer.std)
    ref_loss = fd_gradient_loss(copy.deepcopy(gpu).cpu().eval(), x[q].cpu(), d.cpu(), dl.cpu())
    torch.testing.assert_close(fd_gradient_loss(gpu.eval(), x[q], d, dl).cpu(), ref_loss, rtol=1e-3, atol=1e-5)
