"""fastrp.rl.model_fit: ModelFitter (MBPO's fit: holdout split, early stopping, elites, best
snapshots, optimizer state round trip) and DDPPO's gradient-model term (FDTerm), CPU/CUDA parity."""

import copy
import io
import math

import pytest
import torch

from fastrp.algos.losses import fd_gradient_loss
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp.ops.knn import fd_targets
from fastrp.rl.model_fit import FDTerm, ModelFitter
from test_model import _linear_data, _small_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(model, *args, lr=1e-3, fd_weight=0.0, fd_k=5, fd_window=10000, fd_batch_size=None, fitter=None, **kwargs):
    """``ModelFitter(model, lr).fit(...)`` with DDPPO's term when ``fd_weight > 0``; returns the stats."""
    fitter = fitter or ModelFitter(model, lr=lr)
    term = None
    if fd_weight > 0:
        term = FDTerm(fd_weight, fd_k, fd_window, fd_batch_size or kwargs.get("batch_size", 256))
    return fitter.fit(*args, extra_term=term, **kwargs)


# ---------------------------------------------------------------------------------------------
# fitting
def test_fit_learns_linear_dynamics():
    obs, act, next_obs, reward, _, _ = _linear_data(1500)
    model = _small_model()
    g = torch.Generator().manual_seed(1)
    stats = _fit(model, obs, act, next_obs, reward, max_epochs=40, batch_size=64, generator=g)
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
    stats = _fit(model, obs, act, next_obs, reward, max_epochs=6, batch_size=64,
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
    model = _small_model()
    stats = _fit(model, obs, act, next_obs, reward, lr=1e-12, max_epochs=50, patience=3, batch_size=64)  # no member can improve by 1%
    assert stats["epochs"] == 1 + 3
    model = _small_model()
    stats = _fit(model, obs, act, next_obs, reward, max_epochs=50, max_steps=5, batch_size=64)
    assert stats["steps"] == 5 and stats["epochs"] == 2


def test_fit_without_holdout_and_without_reward():
    obs, act, next_obs, _, _, _ = _linear_data(40)
    model = ProbabilisticEnsemble(3, 2, hidden_dim=8, num_layers=1, ensemble_size=2, num_elites=1,
                                  learn_reward=False, spectral_norm="hidden")
    stats = _fit(model, obs, act, next_obs, holdout_ratio=0.0, max_epochs=2, batch_size=16)
    assert stats["num_holdout"] == 0 and stats["epochs"] == 2
    next_pred, reward = model.predict(obs, act, members="random")
    assert reward is None and next_pred.shape == obs.shape and torch.isfinite(next_pred).all()


def test_state_dict_round_trip_resumes_exactly():
    obs, act, next_obs, reward, _, _ = _linear_data(300)
    a = _small_model(spectral_norm="hidden")
    fa = ModelFitter(a)
    fa.fit(obs, act, next_obs, reward, max_epochs=2, batch_size=64, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "fitter": fa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    b = _small_model(spectral_norm="hidden")
    b.load_state_dict(saved["model"])
    fb = ModelFitter(b)
    fb.load_state_dict(saved["fitter"])
    assert torch.equal(a.elite_idx, b.elite_idx)
    torch.testing.assert_close(a.input_normalizer.std, b.input_normalizer.std)
    sa, sb = fa.optimizer.state_dict()["state"], fb.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[k][name], sb[k][name])
    # an in-process load must not share Adam state tensors with the source
    c = _small_model(spectral_norm="hidden")
    c.load_state_dict(a.state_dict())
    fc = ModelFitter(c)
    fc.load_state_dict(fa.state_dict())
    assert fc.optimizer.state_dict()["state"][0]["exp_avg"].data_ptr() != sa[0]["exp_avg"].data_ptr()
    # continuing both gives identical parameters
    for f in (fa, fb):
        f.fit(obs, act, next_obs, reward, max_epochs=1, batch_size=64, generator=torch.Generator().manual_seed(5))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(pa, torch.Tensor):
            torch.testing.assert_close(pa, pb, msg=name)


def test_fitter_bad_inputs():
    with pytest.raises(ValueError, match="weight_decay"):
        ModelFitter(ProbabilisticEnsemble(3, 2, num_layers=2), weight_decay=(1e-4, 1e-4))
    with pytest.raises(ValueError, match="lr"):
        ModelFitter(_small_model(), lr=0.0)
    model = _small_model()
    obs, act, next_obs, reward, _, _ = _linear_data(20)
    with pytest.raises(ValueError, match="reward must be given"):
        _fit(model, obs, act, next_obs)
    with pytest.raises(ValueError, match=r"next_obs must have shape \[20, 3\]"):
        _fit(model, obs, act, next_obs[:5], reward)
    with pytest.raises(ValueError, match="fd_k must be <="):
        _fit(model, obs, act, next_obs, reward, fd_weight=1.0, fd_k=20, max_epochs=1)
    with pytest.raises(ValueError, match="holdout_ratio"):
        _fit(model, obs, act, next_obs, reward, holdout_ratio=1.5)


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
    stats = _fit(model, obs, act, next_obs, reward, max_epochs=3, batch_size=64, fd_weight=1.0, fd_k=4,
                 fd_window=300, generator=torch.Generator().manual_seed(0))
    assert stats["fd_loss"] > 0 and math.isfinite(stats["fd_loss"]) and math.isfinite(stats["train_nll"])
    for p in model.parameters():
        assert torch.isfinite(p).all()


# ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_model_cuda_matches_cpu():
    obs, act, next_obs, reward, _, _ = _linear_data(400)
    cpu = _small_model(spectral_norm="hidden")
    _fit(cpu, obs, act, next_obs, reward, max_epochs=2, batch_size=64)
    gpu = copy.deepcopy(cpu).cuda().eval()
    cpu.eval()
    members = torch.randint(0, 4, (400,))
    ref = cpu.predict(obs, act, members=members)
    out = gpu.predict(obs.cuda(), act.cuda(), members=members.cuda())
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    stats = _fit(gpu.train(), obs.cuda(), act.cuda(), next_obs.cuda(), reward.cuda(), max_epochs=3, batch_size=64,
                 fd_weight=1.0, fd_k=4, generator=g)
    assert math.isfinite(stats["holdout_mse"]) and stats["fd_loss"] > 0
    x = torch.cat([obs, act], -1).cuda()
    q = torch.arange(0, 400, 9, device="cuda")
    d, dl, _ = fd_targets(x, gpu.make_targets(obs.cuda(), next_obs.cuda(), reward.cuda()), q, 4,
                          scale=gpu.input_normalizer.std)
    ref_loss = fd_gradient_loss(copy.deepcopy(gpu).cpu().eval(), x[q].cpu(), d.cpu(), dl.cpu())
    torch.testing.assert_close(fd_gradient_loss(gpu.eval(), x[q], d, dl).cpu(), ref_loss, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sn", ["none", "hidden"])
def test_target_normalisation_maps_back_to_raw_units(sn):
    """normalize_targets: forward() = raw net mean * sigma_y + mu_y and logvar + 2 log sigma_y
    (the soft bounds applied in standardised units), predict() in raw units, and the gradient loss
    equal to the one computed from autograd Jacobians of the raw-unit mean."""
    model = _small_model(spectral_norm=sn, normalize_targets=True).double().eval()
    model.input_normalizer.update(torch.randn(50, 5, dtype=torch.float64) * 3 + 1)
    mu = torch.tensor([1.0, -2.0, 0.5, 10.0], dtype=torch.float64)
    sigma = torch.tensor([0.01, 3.0, 0.2, 40.0], dtype=torch.float64)
    model.target_mean.copy_(mu)
    model.target_std.copy_(sigma)
    x = torch.randn(6, 5, dtype=torch.float64)
    mean, logvar = model(x)
    out = model.net(model.input_normalizer.normalize(x))
    raw_mean, raw_lv = out[..., :4], out[..., 4:]
    lv = model.min_logvar + torch.nn.functional.softplus(
        (model.max_logvar - torch.nn.functional.softplus(model.max_logvar - raw_lv)) - model.min_logvar)
    torch.testing.assert_close(mean, raw_mean * sigma + mu)
    torch.testing.assert_close(logvar, lv + 2 * sigma.log())
    obs, act = x[:, :3], x[:, 3:]
    members = torch.arange(6) % model.ensemble_size
    next_obs, reward = model.predict(obs, act, members=members)
    picked = (raw_mean * sigma + mu)[members, torch.arange(6)]
    torch.testing.assert_close(next_obs, obs + picked[:, :3])
    torch.testing.assert_close(reward, picked[:, 3])
    directions = torch.randn(6, 4, 5, dtype=torch.float64)
    deltas = torch.randn(6, 4, 4, dtype=torch.float64) * sigma
    per = fd_gradient_loss(model, x, directions, deltas, per_member=True)
    ref = []
    for e in range(model.ensemble_size):
        jac = torch.stack([torch.autograd.functional.jacobian(lambda xi: model(xi.unsqueeze(0))[0][e, 0], xi)
                           for xi in x])
        ref.append((torch.einsum("qoi,qki->qko", jac, directions) - deltas).square().mean())
    torch.testing.assert_close(per, torch.stack(ref))


def test_fit_sets_target_statistics_and_learns_large_scale_targets():
    """fit() standardises with the training rows' target mean / std; on targets with scales from
    1e-2 to 1e2 a capped fit (400 steps) of a spectrally normalised model learns them, the raw-unit
    one does not."""
    obs, act, next_obs, reward, _, _ = _linear_data(1500)
    scale = torch.tensor([0.01, 1.0, 100.0])
    next_obs = obs + (next_obs - obs) * scale
    reward = reward * 50.0
    results = {}
    for norm in (False, True):
        torch.manual_seed(0)
        model = _small_model(spectral_norm="hidden", normalize_targets=norm)
        stats = _fit(model, obs, act, next_obs, reward, max_epochs=100, max_steps=400, batch_size=64,
                     holdout_ratio=0.2, generator=torch.Generator().manual_seed(1))
        results[norm] = stats["holdout_mse"]
        if norm:
            perm = torch.randperm(1500, generator=torch.Generator().manual_seed(1))[300:]
            targets = model.make_targets(obs, next_obs, reward)[perm]
            torch.testing.assert_close(model.target_mean, targets.mean(0))
            torch.testing.assert_close(model.target_std, targets.std(0, unbiased=False))
    targets = model.make_targets(obs, next_obs, reward)
    assert results[True] < 0.01 * float(targets.var(0).mean())
    assert results[True] < 0.01 * results[False]
