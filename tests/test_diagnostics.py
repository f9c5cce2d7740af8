"""Gradient diagnostics: estimators on cases with a known answer, the training-time hook (rows,
resume, no effect on training) and the ``python -m fastrp.diagnostics`` command line."""

import csv
import math
import random
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco", reason="needs the simulator (the GPU machine has none)")
pytest.importorskip("gymnasium", reason="needs the simulator (the GPU machine has none)")

from fastrp import train
from fastrp.config import CliError, Config, parse_args
from fastrp.diagnostics import (DIAG_CSV, Settings, collect_transitions, ensemble_jacobian_errors, flat_gradient,
                                frozen_modules, gradient_covariance_trace, input_jacobians, jacobian_errors,
                                jacobian_rows, load_run, rp_gradient_stats, rp_gradient_variance,
                                TrainingDiagnostics, variance_rows)
from fastrp.diagnostics.run import RunError, load_run, measurement_device, read_config, trained_device
from fastrp.diagnostics import __main__ as cli_mod
from fastrp.diagnostics import run as run_mod
from fastrp.diagnostics.__main__ import CLI_COLUMNS, CLI_CSV
from fastrp.diagnostics.__main__ import main as diag_main
from fastrp.envs import dynamics_jacobians, make
from fastrp.nn.policy import TanhGaussianPolicy
from fastrp.rl.logger import TIMING_COLUMNS, read_metrics

TINY = ["--env", "InvertedPendulum", "--preset", "tiny", "--progress", "false"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- estimators with known answers -------------------------------------------------------------------
def test_variance_estimator_matches_analytic_variance():
    """J(w) = mean_b w.x_b with x_b ~ N(mu, diag(s2)): grad = mean_b x_b, trace cov = sum(s2) / B."""
    d, batch, n = 5, 8, 400
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
    s2 = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(1)

    def sample(_):
        x = mu + s2.sqrt() * torch.randn(batch, d, generator=gen, dtype=torch.float64)
        return flat_gradient((x @ w).mean(), [w])

    stats = gradient_covariance_trace(sample, n)
    expected = float(s2.sum()) / batch
    # each coordinate's sample variance is (s2/B) chi2_{n-1} / (n-1): Var = 2 (s2/B)^2 / (n-1)
    sd = math.sqrt(float((2 * (s2 / batch) ** 2 / (n - 1)).sum()))
    assert abs(stats.trace_cov - expected) < 4 * sd, (stats.trace_cov, expected, sd)
    assert torch.allclose(stats.mean_grad, mu, atol=float(5 * (s2.max() / (batch * n)).sqrt()))
    assert stats.num_samples == n and stats.mean_grad_norm > 0


def test_variance_estimator_is_unbiased_with_few_samples():
    """With n = 3 samples the (n - 1) normalisation matters: a biased (n) estimator would be 33% low.
    Isotropic case: (n - 1) * trace_hat / (s2 / B) ~ chi2 with d (n - 1) degrees of freedom, so the sum
    over R repetitions is chi2 with R d (n - 1) degrees of freedom."""
    d, batch, n, reps, s2 = 4, 2, 3, 300, 2.0
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(2)

    def sample(_):
        x = math.sqrt(s2) * torch.randn(batch, d, generator=gen, dtype=torch.float64) + 5.0
        return flat_gradient((x @ w).mean(), [w])

    total = sum((n - 1) * gradient_covariance_trace(sample, n).trace_cov / (s2 / batch) for _ in range(reps))
    dof = reps * d * (n - 1)
    assert abs(total - dof) < 4 * math.sqrt(2 * dof), (total, dof)


def test_gradients_are_zeroed_between_samples():
    """A deterministic objective: every sample is the same gradient, so the trace is exactly 0 and
    the mean norm is the single gradient's norm; ``.grad`` is neither read nor written."""
    layer = torch.nn.Linear(3, 2)
    x = torch.tensor([[0.3, -1.0, 2.0], [1.0, 0.5, -0.2]])
    for p in layer.parameters():
        p.grad = torch.full_like(p, 123.0)

    def grad(_=0):
        return flat_gradient(layer(x).square().sum(), list(layer.parameters()))

    stats = gradient_covariance_trace(grad, 6)
    assert stats.trace_cov == 0.0
    assert stats.mean_grad_norm == pytest.approx(float(torch.linalg.vector_norm(grad().double())), rel=1e-12)
    assert all(torch.equal(p.grad, torch.full_like(p, 123.0)) for p in layer.parameters())

    # the reference code's bug: .backward() without zeroing accumulates, and the "samples" differ
    for p in layer.parameters():
        p.grad = None

    def accumulating(_):
        layer(x).square().sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).clone()

    assert gradient_covariance_trace(accumulating, 6).trace_cov > 0


def test_estimator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_samples must be an int >= 2"):
        gradient_covariance_trace(lambda i: torch.zeros(3), 1)
    with pytest.raises(ValueError, match="1-D gradient tensor"):
        gradient_covariance_trace(lambda i: torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="same length"):
        gradient_covariance_trace(lambda i: torch.zeros(2 + i), 2)
    with pytest.raises(ValueError, match="loss must be a scalar"):
        flat_gradient(torch.zeros(2, requires_grad=True), [torch.zeros(1, requires_grad=True)])


def _linear_problem(B=32, o=4, a=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(o, o, generator=g, dtype=torch.float64)
    Bm = torch.randn(o, a, generator=g, dtype=torch.float64)
    s = torch.randn(B, o, generator=g, dtype=torch.float64)
    u = torch.randn(B, a, generator=g, dtype=torch.float64)
    return A, Bm, s, u


def test_linear_model_has_zero_jacobian_error_and_known_perturbed_error():
    A, Bm, s, u = _linear_problem()
    B, o, a = s.shape[0], A.shape[0], Bm.shape[1]
    true_next = s @ A.T + u @ Bm.T
    d_obs, d_act = A.expand(B, o, o), Bm.expand(B, o, a)
    exact = jacobian_errors(lambda x, y: x @ A.T + y @ Bm.T, s, u, d_obs, d_act, true_next)
    assert exact["jac_state_err"] < 1e-12 and exact["jac_action_err"] < 1e-12 and exact["pred_mse"] < 1e-24

    dA = 0.1 * torch.ones(o, o, dtype=torch.float64)
    dB = torch.zeros(o, a, dtype=torch.float64)
    dB[0, 1] = 0.5
    wrong = jacobian_errors(lambda x, y: x @ (A + dA).T + y @ (Bm + dB).T, s, u, d_obs, d_act, true_next)
    assert wrong["jac_state_err"] == pytest.approx(float(dA.norm() / A.norm()), rel=1e-10)
    assert wrong["jac_action_err"] == pytest.approx(float(dB.norm() / Bm.norm()), rel=1e-10)
    assert wrong["pred_mse"] == pytest.approx(float((s @ dA.T + u @ dB.T).square().mean()), rel=1e-10)


def test_derived_columns_are_excluded_from_the_state_error():
    A, Bm, s, u = _linear_problem()
    B, o, a = s.shape[0], A.shape[0], Bm.shape[1]
    A_true = A.clone()
    A_true[:, -1] = 0.0  # a derived observation entry: dynamics_jacobians leaves its column zero
    d_obs, d_act = A_true.expand(B, o, o), Bm.expand(B, o, a)
    mask = np.array([True] * (o - 1) + [False])
    model = lambda x, y: x @ A.T + y @ Bm.T  # noqa: E731 - the model does read the derived entry
    err = jacobian_errors(model, s, u, d_obs, d_act, s @ A.T + u @ Bm.T, state_cols=mask)
    assert err["jac_state_err"] < 1e-12
    err_all = jacobian_errors(model, s, u, d_obs, d_act, s @ A.T + u @ Bm.T)
    assert err_all["jac_state_err"] == pytest.approx(float(A[:, -1].norm() / A_true.norm()), rel=1e-10)
    with pytest.raises(ValueError, match="state_cols"):
        jacobian_errors(model, s, u, d_obs, d_act, s @ A.T, state_cols=np.array([True, False]))
    with pytest.raises(ValueError, match="d_obs_true"):
        jacobian_errors(model, s, u, d_obs[:, :2], d_act, s @ A.T)


class _LinearEnsemble(torch.nn.Module):
    """What the diagnostics see of a ProbabilisticEnsemble: member m predicts s' = A_m s + B a."""

    def __init__(self, As, Bm, elites):
        super().__init__()
        self.As, self.Bm = As, Bm
        self.register_buffer("elite_idx", torch.tensor(elites, dtype=torch.int64))

    def predict(self, obs, act, members=None, deterministic=True):
        A = self.As.to(obs.dtype)[members]  # [B, o, o]
        return torch.einsum("bij,bj->bi", A, obs) + act @ self.Bm.to(obs.dtype).T, None


def test_ensemble_errors_average_the_elite_members():
    A, Bm, s, u = _linear_problem()
    B, o, a = s.shape[0], A.shape[0], Bm.shape[1]
    dA = 0.2 * torch.eye(o, dtype=torch.float64)
    As = torch.stack([A, A + 5.0, A + dA])  # member 1 is not an elite: ignored
    err = ensemble_jacobian_errors(_LinearEnsemble(As, Bm, [0, 2]), s, u, A.expand(B, o, o), Bm.expand(B, o, a),
                                   s @ A.T + u @ Bm.T)
    assert err["members"] == 2
    assert err["jac_state_err"] == pytest.approx(0.5 * float(dA.norm() / A.norm()), rel=1e-5)  # float32 inside
    assert err["jac_action_err"] < 1e-6


def test_input_jacobians_match_autograd_on_a_nonlinear_map():
    g = torch.Generator().manual_seed(3)
    W, V = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    f = lambda s, u: torch.tanh(s @ W + u @ V)  # noqa: E731
    s, u = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    out, d_s, d_u = input_jacobians(f, s, u)
    for b in range(5):
        js, ju = torch.autograd.functional.jacobian(lambda x, y: f(x[None], y[None])[0], (s[b], u[b]))
        assert torch.allclose(d_s[b], js) and torch.allclose(d_u[b], ju)
    assert torch.allclose(out, f(s, u))


def test_held_out_transitions_pair_states_with_actions():
    env = make("InvertedPendulum", 4, seed=5, num_threads=1)
    env.reset(seed=5)
    policy = TanhGaussianPolicy(env.obs_dim, env.act_dim, 16, 1, action_scale=3.0).eval()
    held = collect_transitions(env, policy, 12, 10, torch.Generator().manual_seed(0), np.random.default_rng(0))
    assert held.states.shape[0] == held.obs.shape[0] == held.actions.shape[0] == 12
    truth = dynamics_jacobians(env, held.actions, held.states)
    np.testing.assert_allclose(truth.next_obs, held.next_obs, atol=1e-12)  # same state, same action, same step
    env.close()


# ---- rp_gradient_variance end to end on a linear system ------------------------------------------------
class _LinearDynamics(torch.nn.Module):
    """What imagined_objective sees of a ProbabilisticEnsemble: every member predicts
    s' = A s + B a and r = q.s + p.a (learned reward); elites are drawn from the generator."""

    def __init__(self, A, Bm, q, p, ensemble_size=3):
        super().__init__()
        self.A, self.Bm, self.q, self.p = A, Bm, q, p
        self.obs_dim, self.out_dim = A.shape[0], A.shape[0] + 1
        self.learn_reward, self.ensemble_size = True, ensemble_size

    def sample_elites(self, batch_size, generator=None):
        return torch.randint(self.ensemble_size, (batch_size,), generator=generator)

    def predict(self, obs, act, members=None, deterministic=True, noise=None):
        assert deterministic and noise is None and members.shape == (obs.shape[0],)
        return obs @ self.A.T + act @ self.Bm.T, obs @ self.q + act @ self.p


class _LinearPolicy(torch.nn.Module):
    """Deterministic a = K s with log_prob 0; insists on generator-driven noise like TanhGaussianPolicy gets."""

    def __init__(self, K):
        super().__init__()
        self.K = torch.nn.Parameter(K.clone())
        self.act_dim = K.shape[0]

    def forward(self, obs, noise=None):
        assert noise is not None and noise.shape == (obs.shape[0], self.act_dim)
        return obs @ self.K.T, torch.zeros(obs.shape[0], dtype=obs.dtype)


class _LinearCritic(torch.nn.Module):
    def __init__(self, c, d):
        super().__init__()
        self.c, self.d = c, d

    def min_q(self, obs, act):
        return obs @ self.c + act @ self.d


def _never(obs, act, next_obs):
    return torch.zeros(obs.shape[0], dtype=torch.bool)


def _analytic_gradient_map(K, pred, grad, critic, horizon, gamma):
    """L [a*o, o] with d loss / d K (flattened row-major) = L s0 for the start state s0.

    With M = A + B K the unroll is s_t = M_p^t s0 (values from the prediction model), a_t = K s_t,
    J = sum_{t<H} gamma^t (q + K^T p).s_t + gamma^H (c + K^T d).s_H, loss = -J. Differentiating,
    d s_{k+1} = M_g d s_k + B_g dK s_k (gradients through the gradient model), so
    dJ/dK = sum_t gamma^t [p_t s_t^T + sum_{k<t} (B_g^T (M_g^T)^{t-1-k} v_t) s_k^T], v_t = q_t + K^T p_t,
    (q_t, p_t) = (q, p) for t < H and (c, d) at t = H."""
    o = K.shape[1]
    Mp, Mg = pred.A + pred.Bm @ K, grad.A + grad.Bm @ K
    cols = []
    for j in range(o):
        traj = [torch.eye(o, dtype=K.dtype)[j]]
        for _ in range(horizon):
            traj.append(Mp @ traj[-1])
        G = torch.zeros_like(K)
        for t in range(horizon + 1):
            qt, pt = (grad.q, grad.p) if t < horizon else (critic.c, critic.d)
            back = qt + K.T @ pt
            G += gamma ** t * torch.outer(pt, traj[t])
            for k in range(t - 1, -1, -1):
                G += gamma ** t * torch.outer(grad.Bm.T @ back, traj[k])
                back = Mg.T @ back
        cols.append(-G.reshape(-1))
    return torch.stack(cols, 1)


def _linear_rp_problem(seed=0, o=3, a=2, pool_size=64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    model = _LinearDynamics(0.4 * r(o, o), 0.5 * r(o, a), r(o), r(a))
    policy, critic = _LinearPolicy(0.3 * r(a, o)), _LinearCritic(r(o), r(a))
    root = r(o, o) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # an anisotropic pool
    pool = r(pool_size, o) @ root.T + r(o)
    other = _LinearDynamics(model.A + 0.3 * r(o, o), model.Bm + 0.3 * r(o, a), model.q + r(o), model.p + r(a))
    return model, policy, critic, pool, other


def test_rp_gradient_variance_matches_the_closed_form_on_a_linear_system():
    """Linear model, policy a = K s (log_prob 0), linear reward and critic: the minibatch gradient
    w.r.t. K is g = L sbar with sbar the minibatch mean of the start states and L known in closed
    form, so over minibatches of B drawn with replacement from a pool with covariance S (ddof 0)
    and mean mu: Cov g = L S L^T / B, E g = L mu. trace_hat (n samples) is then a weighted sum of
    chi2_{n-1} / (n-1) (sbar is near Gaussian): sd = sqrt(2 tr(C^2) / (n-1))."""
    model, policy, critic, pool, _ = _linear_rp_problem()
    gamma, batch, n = 0.9, 16, 3000
    mu, cov = pool.mean(0), torch.cov(pool.T, correction=0)
    kw = dict(gamma=gamma, alpha=0.2, termination_fn=_never, batch_size=batch, seed=11)
    stats = rp_gradient_stats(policy, model, critic, pool, [1, 2, 3], num_samples=n, **kw)
    assert [h for h, _ in stats] == [1, 2, 3]
    traces = []
    for horizon, st in stats:
        L = _analytic_gradient_map(policy.K.detach(), model, model, critic, horizon, gamma)
        C = L @ cov @ L.T / batch
        expected, sd = float(torch.trace(C)), math.sqrt(2 * float(torch.trace(C @ C)) / (n - 1))
        assert abs(st.trace_cov - expected) < 5 * sd, (horizon, st.trace_cov, expected, sd)
        # mean: mean_grad - L mu = L e exactly (the gradient is linear in sbar through this L), and
        # n e^T (S / B)^-1 e ~ chi2 with o degrees of freedom (P(chi2_3 > 30) ~ 1e-6)
        diff = st.mean_grad - L @ mu
        e = torch.linalg.lstsq(L, diff.unsqueeze(1)).solution.squeeze(1)
        assert float((L @ e - diff).norm()) < 1e-9 * float((L @ mu).norm()), horizon
        assert n * float(e @ torch.linalg.solve(cov / batch, e)) < 30.0, horizon
        assert st.mean_grad_norm >= float(st.mean_grad.norm()) and st.num_samples == n
        traces.append(st.trace_cov)
    assert len(set(traces)) == 3  # H changes the answer (the gradient really goes through the unroll)

    # rp_gradient_variance (what the hook and the CLI record) is the same computation, as rows
    rows = rp_gradient_variance(policy, model, critic, pool, [1, 3], num_samples=5, **kw)
    few = rp_gradient_stats(policy, model, critic, pool, [1, 3], num_samples=5, **kw)
    sq = float(sum(p.detach().square().sum() for p in policy.parameters()))
    assert [{k: r[k] for k in ("horizon", "trace_cov", "mean_grad_norm", "samples", "batch", "trace_cov_norm")}
            for r in rows] == [{"horizon": h, "trace_cov": s.trace_cov, "mean_grad_norm": s.mean_grad_norm, "samples": 5,
                                "batch": batch, "trace_cov_norm": s.trace_cov / sq} for h, s in few]
    assert rows == rp_gradient_variance(policy, model, critic, pool, [1, 3], num_samples=5, **kw)  # seeded
    other_seed = rp_gradient_variance(policy, model, critic, pool, [1, 3], num_samples=5, **{**kw, "seed": 12})
    assert [r["trace_cov"] for r in other_seed] != [r["trace_cov"] for r in rows]
    assert all(p.grad is None and p.requires_grad for p in policy.parameters())


@pytest.mark.parametrize("horizon", [0, 1, 3])
def test_action_gradient_is_the_closed_form_on_a_linear_system(horizon):
    """With a linear model, policy a = K s and linear reward and critic, J is linear in the first
    action: dJ/da_0 = p + sum_{t=1}^{H-1} gamma^t B^T (M^T)^{t-1} (q + K^T p) + gamma^H B^T
    (M^T)^{H-1} (c + K^T d) (H >= 1; d for H = 0), the same for every start state: its mean
    squared norm is |g|^2 and the trace of its covariance 0. Scaling the policy's parameters
    changes trace_cov_norm's denominator exactly."""
    model, policy, critic, pool, _ = _linear_rp_problem()
    gamma = 0.9
    K = policy.K.detach()
    M = model.A + model.Bm @ K
    if horizon == 0:
        g = critic.d.clone()
    else:
        g = model.p.clone()
        back = [model.q + K.T @ model.p] * (horizon - 1) + [critic.c + K.T @ critic.d]
        for t in range(1, horizon + 1):
            g = g + gamma ** t * model.Bm.T @ torch.linalg.matrix_power(M.T, t - 1) @ back[t - 1]
    rows = rp_gradient_variance(policy, model, critic, pool, [horizon], gamma=gamma, alpha=0.2, termination_fn=_never,
                                num_samples=3, batch_size=8, seed=1)
    assert rows[0]["action_grad_sq"] == pytest.approx(float(g.square().sum()), rel=1e-10)
    assert abs(rows[0]["action_trace_cov"]) < 1e-20 * float(g.square().sum()) + 1e-24
    with torch.no_grad():
        policy.K.mul_(2.0)
    scaled = rp_gradient_variance(policy, model, critic, pool, [horizon], gamma=gamma, alpha=0.2, termination_fn=_never,
                                  num_samples=3, batch_size=8, seed=1)
    sq = float(policy.K.detach().square().sum())
    assert scaled[0]["trace_cov_norm"] == pytest.approx(scaled[0]["trace_cov"] / sq, rel=1e-12)


def test_lipschitz_constants_of_a_linear_model_and_policy():
    """One linear layer per member (all members equal), identity input normaliser and a linear
    policy a = K s: the layer-norm product is ||W_mean||_2, one step's Jacobian is
    [I + W_s^T, W_a^T] and the closed-loop H-step Jacobian is (I + W_s^T + W_a^T K)^H."""
    from fastrp.diagnostics.lipschitz import lipschitz_bound, step_jacobian_norms, unroll_jacobian_norms
    from fastrp.nn.model import ProbabilisticEnsemble

    o, a = 3, 2
    g = torch.Generator().manual_seed(3)
    model = ProbabilisticEnsemble(o, a, hidden_dim=4, num_layers=0, ensemble_size=3, num_elites=2).double().eval()
    W = 0.3 * torch.randn(o + a, 2 * (o + 1), generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.net.weights[0].copy_(W.expand(3, -1, -1))
    K = 0.5 * torch.randn(a, o, generator=g, dtype=torch.float64)

    class Linear(torch.nn.Module):
        act_dim = a

        def forward(self, obs, deterministic=False, noise=None):
            return obs @ K.T, torch.zeros(obs.shape[0], dtype=obs.dtype)

    states = torch.randn(5, o, generator=g, dtype=torch.float64)
    mean = W[:, : o + 1]
    bound = lipschitz_bound(model.net, model.out_dim)
    torch.testing.assert_close(bound, torch.linalg.matrix_norm(mean, ord=2).expand(3), rtol=1e-12, atol=0)
    Ws, Wa = W[:o, :o], W[o:, :o]
    step = torch.cat([torch.eye(o, dtype=torch.float64) + Ws.T, Wa.T], dim=1)
    norms = step_jacobian_norms(model, Linear(), states, torch.Generator().manual_seed(0))
    torch.testing.assert_close(norms, torch.linalg.matrix_norm(step, ord=2).expand(5), rtol=1e-10, atol=0)
    M = torch.eye(o, dtype=torch.float64) + Ws.T + Wa.T @ K
    for h, n in enumerate(unroll_jacobian_norms(model, Linear(), states, 4, torch.Generator().manual_seed(0)), start=1):
        torch.testing.assert_close(n, torch.linalg.matrix_norm(torch.linalg.matrix_power(M, h), ord=2).expand(5),
                                   rtol=1e-10, atol=0)


@pytest.mark.parametrize("with_grad_model", [False, True])
def test_rp_gradient_on_one_start_state_is_the_analytic_gradient(with_grad_model):
    """A pool of one state: every minibatch gives the same gradient, exactly L s0 - values from the
    prediction model, gradients through the gradient model when there is one (DDPPO)."""
    model, policy, critic, pool, other = _linear_rp_problem(seed=1)
    grad_model = other if with_grad_model else None
    stats = rp_gradient_stats(policy, model, critic, pool[:1], [0, 1, 2, 3], gamma=0.95, alpha=0.2,
                              termination_fn=_never, grad_model=grad_model, num_samples=3, batch_size=4)
    for horizon, st in stats:
        L = _analytic_gradient_map(policy.K.detach(), model, grad_model or model, critic, horizon, 0.95)
        expected = L @ pool[0]
        assert st.trace_cov == 0.0
        assert torch.allclose(st.mean_grad, expected, rtol=1e-10, atol=1e-12), (horizon, st.mean_grad, expected)
    if with_grad_model:  # the gradient model matters from H = 1 on
        plain = rp_gradient_stats(policy, model, critic, pool[:1], [1], gamma=0.95, alpha=0.2,
                                  termination_fn=_never, num_samples=2, batch_size=4)
        assert not torch.allclose(plain[0][1].mean_grad, stats[1][1].mean_grad)


# ---- runs, the training-time hook and the command line ---------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs made once for the module: ddppo-sn with diagnostics every 50 steps, the same without,
    the same interrupted at 100 and resumed to 200, maac with diagnostics, and sac."""
    root = tmp_path_factory.mktemp("diag_runs")
    common = [*TINY, "--logdir", str(root), "--seed", "1"]
    assert train.main([*common, "--algo", "ddppo-sn", "--steps", "200", "--diag-every", "50", "--run-name", "sn"]) == 0
    assert train.main([*common, "--algo", "ddppo-sn", "--steps", "200", "--diag-every", "0", "--run-name", "off"]) == 0
    assert train.main([*common, "--algo", "ddppo-sn", "--steps", "100", "--diag-every", "50", "--run-name", "half"]) == 0
    with open(root / "half" / DIAG_CSV, "a") as fh:  # a row the killed run wrote after its checkpoint
        fh.write("150,variance,gradient,1,999.0,999.0,,,,4,8\n")
    assert train.main(["--resume", str(root / "half"), "--steps", "200", "--progress", "false"]) == 0
    assert train.main([*common, "--algo", "maac", "--steps", "100", "--diag-every", "50", "--run-name", "maac"]) == 0
    assert train.main([*common, "--algo", "sac", "--steps", "50", "--run-name", "sac"]) == 0
    return root


def test_training_writes_diagnostics_rows(runs):
    rows = _rows(runs / "sn" / DIAG_CSV)
    assert sorted({int(r["env_steps"]) for r in rows}) == [50, 100, 150, 200]
    for step in (50, 200):
        var = [r for r in rows if int(r["env_steps"]) == step and r["kind"] == "variance"]
        assert [int(r["horizon"]) for r in var] == [1, 2, 3]  # tiny preset: diag_max_horizon = 3
        assert all(r["model"] == "gradient" and float(r["trace_cov"]) > 0 and float(r["mean_grad_norm"]) > 0
                   and r["jac_state_err"] == "" for r in var)
        jac = [r for r in rows if int(r["env_steps"]) == step and r["kind"] == "jacobian"]
        assert [r["model"] for r in jac] == ["prediction", "gradient"]
        for r in jac:
            assert r["horizon"] == "" and int(r["samples"]) == 16
            assert all(0 < float(r[k]) < math.inf for k in ("jac_state_err", "jac_action_err", "pred_mse"))
        assert all(float(r["action_grad_sq"]) > 0 and float(r["trace_cov_norm"]) > 0 for r in var)
        lip = [r for r in rows if int(r["env_steps"]) == step and r["kind"] == "lipschitz"]
        assert [int(r["horizon"]) for r in lip] == [1, 2, 3]
        assert all(0 < float(r[k]) < math.inf for r in lip for k in ("model_lip_bound", "policy_lip_bound",
                                                                      "step_jac_norm", "unroll_jac_norm"))
        assert len({r["model_lip_bound"] for r in lip}) == 1  # the constants, repeated on every H's row
    maac = _rows(runs / "maac" / DIAG_CSV)
    assert {r["model"] for r in maac} == {"prediction"}
    assert {r["kind"] for r in maac} == {"variance", "jacobian", "lipschitz"}
    assert not (runs / "sac" / DIAG_CSV).exists() and not (runs / "off" / DIAG_CSV).exists()


def test_diagnostics_do_not_change_training(runs):
    on, off = read_metrics(str(runs / "sn")), read_metrics(str(runs / "off"))
    assert len(on) == len(off) == 4
    for a, b in zip(on, off):
        assert {k: v for k, v in a.items() if k not in TIMING_COLUMNS} == \
               {k: v for k, v in b.items() if k not in TIMING_COLUMNS}


def test_resume_drops_rows_after_the_checkpoint_and_reproduces_them(runs):
    full, resumed = _rows(runs / "sn" / DIAG_CSV), _rows(runs / "half" / DIAG_CSV)
    assert all(r["trace_cov"] != "999.0" for r in resumed)
    assert resumed == full  # rows after step 100 dropped, then recomputed identically


def test_measurements_leave_the_agent_untouched(runs):
    run = load_run(str(runs / "sn"))
    agent = run.agent
    modules = {"policy": agent.policy, "model": agent.model, "grad_model": agent.grad_model, "critic": agent.critic}
    agent.model.eval()  # a mixed starting state: must come back as it was
    before = {k: {n: t.clone() for n, t in m.state_dict().items() if isinstance(t, torch.Tensor)}
              for k, m in modules.items()}
    modes = {k: m.training for k, m in modules.items()}
    flags = {k: [p.requires_grad for p in m.parameters()] for k, m in modules.items()}
    for m in modules.values():  # the optimizers allocate .grad up front: mark it to see any write
        for p in m.parameters():
            if p.grad is not None:
                p.grad.normal_()
    grads = {k: [None if p.grad is None else p.grad.clone() for p in m.parameters()] for k, m in modules.items()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    settings = Settings.from_config(run.cfg)
    var = variance_rows(agent, run.buffer, run.cfg, run.step, settings)
    jac = jacobian_rows(agent, run.cfg, run.step, settings)
    assert torch.equal(rng[0], torch.get_rng_state()) and np.array_equal(rng[1], np.random.get_state()[1])
    assert rng[2] == random.getstate()
    for k, m in modules.items():
        assert m.training == modes[k], k
        assert [p.requires_grad for p in m.parameters()] == flags[k], k
        after = [None if p.grad is None else p.grad for p in m.parameters()]
        assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                   for a, b in zip(after, grads[k])), k  # the optimizers' .grad tensors untouched
        for n, t in m.state_dict().items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, before[k][n]), (k, n)  # includes the spectral-norm u, v buffers
    # the checkpoint's step reproduces the training-time rows of that step
    train_rows = [r for r in _rows(runs / "sn" / DIAG_CSV) if int(r["env_steps"]) == run.step]
    assert [float(r["trace_cov"]) for r in train_rows if r["kind"] == "variance"] == [r["trace_cov"] for r in var]
    assert [float(r["jac_state_err"]) for r in train_rows if r["kind"] == "jacobian"] == \
           [r["jac_state_err"] for r in jac]


def test_rp_gradient_variance_arguments(runs):
    run = load_run(str(runs / "maac"))
    a = run.agent
    pool = run.buffer.all().obs[:32]
    kw = dict(gamma=0.99, alpha=a.alpha, termination_fn=a.termination, num_samples=3, batch_size=4, seed=7)
    first = rp_gradient_variance(a.policy, a.model, a.critic, pool, [0, 2], **kw)
    again = rp_gradient_variance(a.policy, a.model, a.critic, pool, [0, 2], **kw)
    assert first == again and [r["horizon"] for r in first] == [0, 2]  # seeded: reproducible
    with pytest.raises(ValueError, match="horizons"):
        rp_gradient_variance(a.policy, a.model, a.critic, pool, [-1], **kw)
    with pytest.raises(ValueError, match="start_states"):
        rp_gradient_variance(a.policy, a.model, a.critic, pool[0], [1], **kw)
    with frozen_modules([a.model], trainable=a.policy):
        assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert all(p.requires_grad for p in a.model.parameters())


def test_cli_variance_and_jacobian(runs, tmp_path, capsys):
    out = tmp_path / "var.png"
    assert diag_main(["variance", str(runs / "maac"), str(runs / "sn"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "maac s1 @100" in text and "ddppo-sn s1 @200" in text
    assert out.exists() and 0 < out.stat().st_size < 150_000
    rows = _rows(runs / "sn" / CLI_CSV)
    assert list(rows[0]) == CLI_COLUMNS and [int(r["horizon"]) for r in rows] == [1, 2, 3]
    assert rows[0]["algo"] == "ddppo-sn" and rows[0]["env_steps"] == "200"
    train_rows = [r for r in _rows(runs / "sn" / DIAG_CSV) if r["env_steps"] == "200" and r["kind"] == "variance"]
    assert [r["trace_cov"] for r in rows] == [r["trace_cov"] for r in train_rows]

    csv_path = tmp_path / "all.csv"
    assert diag_main(["variance", str(runs / "sn"), "--max-horizon", "5", "--samples", "3", "--min-horizon", "0",
                      "--csv", str(csv_path), "--out", str(tmp_path / "v2.png")]) == 0
    assert [int(r["horizon"]) for r in _rows(csv_path)] == [0, 1, 2, 3, 4, 5]

    assert diag_main(["jacobian", str(runs / "sn"), "--csv", str(tmp_path / "jac.csv")]) == 0
    assert (runs / "sn" / "jacobian.png").exists() and (runs / "sn" / "jacobian.png").stat().st_size < 150_000
    jac = _rows(tmp_path / "jac.csv")
    assert [r["model"] for r in jac] == ["prediction", "gradient"] and all(r["kind"] == "jacobian" for r in jac)
    assert "training-time rows" in capsys.readouterr().out


@pytest.mark.parametrize("failing", ["jacobian", "variance"])
def test_hook_keeps_the_rows_of_the_kind_that_worked(runs, tmp_path, monkeypatch, failing):
    run = load_run(str(runs / "sn"))
    expected = [r for r in _rows(runs / "sn" / DIAG_CSV) if int(r["env_steps"]) == run.step and r["kind"] != failing]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run_mod, f"{failing}_rows", broken)
    hook = TrainingDiagnostics(run.cfg, str(tmp_path))
    with pytest.warns(UserWarning, match=f"{failing} diagnostics at env step {run.step} failed and were skipped: "
                                         f"RuntimeError: boom"):
        rows = hook(run.agent, run.buffer, run.step, run.step - run.cfg.log_every)
    assert {r["kind"] for r in rows} == {"variance", "jacobian", "lipschitz"} - {failing}
    assert _rows(tmp_path / DIAG_CSV) == expected  # the other kind's rows are written, as in training


def test_cli_checks_every_run_first_then_loads_one_at_a_time(runs, tmp_path, monkeypatch, capsys):
    real_load = cli_mod.load_run
    alive = []

    def no_load(*args, **kwargs):
        raise AssertionError("a run was loaded before every run was checked")

    monkeypatch.setattr(cli_mod, "load_run", no_load)
    assert diag_main(["variance", str(runs / "maac"), str(runs / "sac"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "sac" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    assert diag_main(["variance", str(runs / "maac"), str(runs / "sn"), "--samples", "1"]) == 2
    assert "--samples must be an int >= 2" in capsys.readouterr().err

    def tracking_load(run_dir, device=None):
        assert all(ref() is None for ref in alive), "the previous run's agent is still alive"
        run = real_load(run_dir, device)
        alive.append(weakref.ref(run.agent))
        return run

    monkeypatch.setattr(cli_mod, "load_run", tracking_load)
    csv_path = tmp_path / "both.csv"
    assert diag_main(["variance", str(runs / "maac"), str(runs / "sn"), "--csv", str(csv_path),
                      "--out", str(tmp_path / "v.png")]) == 0
    assert len(alive) == 2 and [r["algo"] for r in _rows(csv_path)] == ["maac"] * 3 + ["ddppo-sn"] * 3
    assert capsys.readouterr().err == ""  # trained on cpu, measured on cpu: no device note


def test_measuring_device_defaults_to_the_training_device(runs, tmp_path, monkeypatch, capsys):
    assert trained_device("cpu", {}) == "cpu" and trained_device("cuda", {"rng": {}}) == "cuda"
    assert trained_device("auto", {"rng": {"torch": 0, "cuda": []}}) == "cuda"
    assert trained_device("auto", {"rng": {"torch": 0}}) == "cpu" and trained_device("auto", {}) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert measurement_device("cpu") == (torch.device("cpu"), "")
    assert measurement_device("auto") == (torch.device("cpu"), "")
    dev, note = measurement_device("cuda")
    assert dev == torch.device("cpu") and "no CUDA device here: measuring on cpu" in note
    with pytest.raises(RunError, match="--device: cuda requested"):
        measurement_device("cpu", "cuda")

    # a run whose config says cuda, diagnosed where there is none: cpu, with a note on stderr
    state = torch.load(str(runs / "sn" / "checkpoint.pt"), map_location="cpu", weights_only=False)
    state["config"]["device"] = "cuda"
    (tmp_path / "gpu_run").mkdir()
    torch.save(state, str(tmp_path / "gpu_run" / "checkpoint.pt"))
    assert diag_main(["variance", str(tmp_path / "gpu_run"), "--out", str(tmp_path / "v.png")]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("note: ") and "measuring on cpu" in captured.err and captured.err.count("\n") == 1
    assert "ddppo-sn s1 @200" in captured.out
    assert load_run(str(tmp_path / "gpu_run")).cfg.device == "cpu"
    assert diag_main(["variance", str(runs / "sn"), "--device", "cuda"]) == 2
    assert "--device: cuda requested but torch has no CUDA device" in capsys.readouterr().err


def test_old_checkpoints_load_with_their_old_behaviour(runs, tmp_path):
    """Fields missing from an old checkpoint's config take the value that reproduces the old version
    (fastrp.config.config_from_checkpoint), not today's defaults."""
    state = torch.load(str(runs / "maac" / "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert state["config"]["diag_every"] == 50
    del state["config"]["diag_every"]  # written before the diagnostics existed
    (tmp_path / "old").mkdir()
    torch.save(state, str(tmp_path / "old" / "checkpoint.pt"))
    assert load_run(str(tmp_path / "old")).cfg.diag_every == 0 != Config().diag_every
    assert read_config(str(tmp_path / "old")).diag_every == 0  # no config.json: the checkpoint's config
    assert read_config(str(runs / "maac")).diag_every == 50  # config.json


@pytest.mark.parametrize("argv, message", [
    (["variance", "{root}/missing"], "no such run directory"),
    (["variance", "{root}"], "no checkpoint.pt"),
    (["variance", "{root}/sac"], "variance needs maac, rp-sn, ddppo or ddppo-sn"),
    (["jacobian", "{root}/sac"], "the jacobian diagnostic needs mbpo"),
    (["variance", "{root}/sn", "--min-horizon", "4", "--max-horizon", "2"], "--max-horizon must be >= min-horizon"),
    (["variance", "{root}/sn", "--min-horizon", "-1"], "--min-horizon must be an int >= 0"),
    (["variance", "{root}/sn", "--samples", "1"], "--samples must be an int >= 2"),
    (["variance", "{root}/sn", "--batch", "0"], "--batch must be an int >= 1"),
    (["jacobian", "{root}/sn", "--transitions", "0"], "--transitions must be an int >= 1"),
    (["variance", "{root}/sn", "--csv", "{root}/sn/metrics.csv"], "--csv:"),
    (["variance", "{root}/sn", "--max-horizon", "x"], "invalid int value: 'x'"),
    (["gradients", "{root}/sn"], "invalid choice: 'gradients'"),
    (["bias", "{root}/sac"], "bias needs maac, rp-sn, ddppo or ddppo-sn"),
    (["bias", "{root}/sn", "--horizons", "1,x"], "--horizons: expected comma-separated ints >= 0"),
    (["bias", "{root}/sn", "--horizons", "-1"], "--horizons: expected comma-separated ints >= 0"),
    (["bias", "{root}/sn", "--states", "0"], "--states: must be in [1, 65536]"),
    (["bias", "{root}/sn", "--policy-steps", "990", "--horizons", "10"], "must be < the task's time limit 1000"),
    ([], "the following arguments are required"),
])
def test_cli_bad_input_exits_2_with_one_line(runs, capsys, argv, message):
    argv = [a.format(root=runs) for a in argv]
    assert diag_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_config_checks_diagnostics_fields():
    with pytest.raises(CliError, match="--diag-samples: must be >= 2"):
        parse_args(["--diag-samples", "1"])
    with pytest.raises(CliError, match="--diag-every: must be >= 0"):
        parse_args(["--diag-every", "-1000"])
    assert parse_args(["--diag-every", "0"]).diag_every == 0


def test_hook_runs_at_the_first_log_row_at_or_past_each_multiple(tmp_path):
    cfg = Config(algo="maac", diag_every=1500, log_every=1000, warmup_steps=2500, steps=10_500)
    hook = TrainingDiagnostics(cfg, str(tmp_path))
    assert [s for s in range(0, 10_001, 1000) if hook.due(s, s - 1000)] == [3000, 5000, 6000, 8000, 9000]  # 2000 < warm-up
    assert hook.due(10_500, 10_000)  # the last log row (not a multiple of log_every) crosses 10500
    assert hook.due(4600, 4400) and not hook.due(4400, 4200)  # an evaluation row between log rows
    assert not TrainingDiagnostics(Config(algo="maac", diag_every=1500, log_every=1000, warmup_steps=0),
                                   str(tmp_path)).due(2500, 2000)  # the span 2000..2500 crosses no multiple
    assert not TrainingDiagnostics(Config(algo="sac", diag_every=1000), str(tmp_path)).due(5000, 4000)
    assert not TrainingDiagnostics(Config(algo="maac", diag_every=0), str(tmp_path)).due(5000, 4000)


def test_unreadable_or_foreign_checkpoints_exit_2(runs, tmp_path, capsys):
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert diag_main(["jacobian", str(tmp_path / "torn")]) == 2
    assert "cannot read the checkpoint" in capsys.readouterr().err
    state = torch.load(str(runs / "maac" / "checkpoint.pt"), map_location="cpu", weights_only=False)
    del state["agent"]["policy"]["net.weights.0"]  # as if written by another fastrp version
    (tmp_path / "foreign").mkdir()
    torch.save(state, str(tmp_path / "foreign" / "checkpoint.pt"))
    assert diag_main(["variance", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err
    assert "does not match this fastrp's maac agent" in err and err.count("\n") == 1


def test_bias_passes_are_the_objective_through_the_model_and_through_mujoco(runs):
    """imagined_vs_real against the objective written out here: warm-up steps of the policy from a
    seeded reset, then eq. 11 with MuJoCo's own rewards and termination flags (real pass) and
    with imagined_objective through the prediction model (model pass), the same noise in both."""
    from fastrp.algos.losses import imagined_objective
    from fastrp.diagnostics.bias import imagined_vs_real

    run = load_run(str(runs / "sn"), "cpu")
    agent, cfg, n, horizon, warm, seed = run.agent, run.cfg, 6, 3, 7, 11
    out = imagined_vs_real(agent, make(cfg.env, n, seed=5), horizon, seed, warmup_steps=warm)

    env = make(cfg.env, n, seed=5)
    env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    agent.policy.eval(), agent.critic.eval(), agent.model.eval()  # as in training's policy step
    with torch.no_grad():
        for _ in range(warm):
            obs = torch.as_tensor(env.obs, dtype=torch.float32)
            action, _ = agent.policy(obs, noise=torch.randn(n, agent.act_dim, generator=gen))
            env.step(action.numpy().astype(np.float64))
        start = torch.as_tensor(env.obs, dtype=torch.float32)
        pass_seed = int(torch.randint(2 ** 62, (1,), generator=gen))
        g = torch.Generator().manual_seed(pass_seed)
        obs, alive, total, alpha = start, torch.ones(n), torch.zeros(n), agent.alpha
        for t in range(horizon):
            action, logp = agent.policy(obs, noise=torch.randn(n, agent.act_dim, generator=g))
            torch.randint(agent.model.num_elites, (n,), generator=g)  # the model pass's elite draw
            tr = env.step_transition(action.numpy().astype(np.float64))
            total += cfg.gamma ** t * alive * (torch.as_tensor(tr.reward, dtype=torch.float32) - alpha * logp)
            alive = alive * torch.as_tensor(~tr.terminated, dtype=torch.float32)
            obs = torch.as_tensor(tr.next_obs, dtype=torch.float32)
        action, logp = agent.policy(obs, noise=torch.randn(n, agent.act_dim, generator=g))
        total += cfg.gamma ** horizon * alive * (agent.critic.min_q(obs, action) - alpha * logp)
        _, info = imagined_objective(agent.policy, agent.model, agent.critic, start, horizon, cfg.gamma, alpha,
                                     agent.termination, generator=torch.Generator().manual_seed(pass_seed))
    assert out["real_return"] == pytest.approx(float(total.mean()), rel=1e-5)
    assert out["real_alive"] == pytest.approx(float(alive.mean()))
    assert out["model_return"] == pytest.approx(float(info["return"]), rel=1e-6)
    model_j = info["return_per_sample"].double()
    assert out["rms_error"] == pytest.approx(float((model_j - total.double()).square().mean().sqrt()), rel=1e-5)
    assert out["correlation"] == pytest.approx(float(np.corrcoef(model_j.numpy(), total.double().numpy())[0, 1]),
                                               rel=1e-5)
    # H = 0: both passes are Q(s_0, a_0) - alpha logp_0 with the same noise
    zero = imagined_vs_real(agent, make(cfg.env, n, seed=5), 0, seed, warmup_steps=warm)
    assert zero["model_return"] == zero["real_return"] and zero["rms_error"] == 0.0


def test_cli_bias(runs, tmp_path, capsys):
    from fastrp.diagnostics.__main__ import BIAS_COLUMNS

    path = tmp_path / "bias.csv"
    assert diag_main(["bias", str(runs / "maac"), "--horizons", "0,2", "--states", "4", "--policy-steps", "5",
                      "--csv", str(path)]) == 0
    rows = _rows(path)
    assert list(rows[0]) == BIAS_COLUMNS and [int(r["horizon"]) for r in rows] == [0, 2]
    assert rows[0]["algo"] == "maac" and rows[0]["env_steps"] == "100" and rows[0]["states"] == "4"
    assert float(rows[0]["rms_error"]) == 0.0 and rows[0]["model_return"] == rows[0]["real_return"]
    assert "rows appended to" in capsys.readouterr().out
