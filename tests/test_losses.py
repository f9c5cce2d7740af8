"""fastrp.algos.losses against the papers' equations written out independently here.

Each reference below is a per-sample loop in float64 over small stand-in networks with closed
forms and fixed noise, written from the equation (SAC's soft Bellman target and losses, paper
003 eq. 11-13, MBPO's soft-bounded Gaussian NLL, paper 003 eq. 9-10), never by calling the code
under test. Values and gradients are compared. ``tests/mutate_losses.py`` checks that these
tests fail for flipped signs, swapped operators, constants and dropped masks in losses.py.

The functions are called as ``losses.NAME`` (module attribute) so that the mutation script's
mutants are the ones tested.
"""

import math

import pytest
import torch
from torch import nn

from fastrp.algos import losses
from fastrp.nn.model import ProbabilisticEnsemble
from fastrp.rl.buffer import Batch

DT = torch.float64
OBS, ACT, E = 3, 2, 3

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- stand-ins with closed forms --------------------------------------------------------------
class TablePolicy(nn.Module):
    """``u = s K + k0 + exp(log_std) * eps``, ``a = tanh(u)``, ``logp = -0.5 |eps|^2 - sum(log_std)
    - A/2 log(2 pi) - sum log(1 - a^2)``. The k-th call without ``noise`` takes ``eps`` from
    ``table[k]`` (the reference replays the same table); ``noise=`` overrides it."""

    def __init__(self, B, calls, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.act_dim = ACT
        self.K = nn.Parameter(torch.randn(OBS, ACT, generator=g, dtype=DT) * 0.5)
        self.k0 = nn.Parameter(torch.randn(ACT, generator=g, dtype=DT) * 0.1)
        self.log_std = nn.Parameter(torch.randn(ACT, generator=g, dtype=DT) * 0.2 - 0.5)
        self.table = torch.randn(calls, B, ACT, generator=g, dtype=DT)
        self.calls = 0

    def act(self, s, eps):
        u = s @ self.K + self.k0 + self.log_std.exp() * eps
        a = torch.tanh(u)
        logp = -0.5 * eps.square().sum(-1) - self.log_std.sum() - 0.5 * ACT * math.log(2 * math.pi) \
            - torch.log(1 - a.square()).sum(-1)
        return a, logp

    def forward(self, obs, deterministic=False, noise=None):
        if noise is None:
            noise = self.table[self.calls][: obs.shape[0]]
            self.calls += 1
        return self.act(obs, noise)


class TwinCritic(nn.Module):
    """``Q_j(s, a) = s . w_j + |a|^2 c_j + a . v_j``; ``min_q`` is their minimum."""

    def __init__(self, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(2, OBS, generator=g, dtype=DT))
        self.c = nn.Parameter(torch.randn(2, generator=g, dtype=DT))
        self.v = nn.Parameter(torch.randn(2, ACT, generator=g, dtype=DT))

    def q(self, j, s, a):
        return s @ self.w[j] + a.square().sum(-1) * self.c[j] + a @ self.v[j]

    def forward(self, obs, action):
        return self.q(0, obs, action), self.q(1, obs, action)

    def min_q(self, obs, action):
        return torch.minimum(*self(obs, action))


class TableModel(nn.Module):
    """Ensemble ``s' = s + tanh(s A_m + a B_m + c_m)``, ``r = s . wr_m + a . ur_m + |a|^2 qr_m``;
    the k-th ``sample_elites`` call returns ``members[k]``."""

    learn_reward = True

    def __init__(self, B, calls, seed=2, scale=0.4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.obs_dim, self.act_dim, self.ensemble_size, self.out_dim = OBS, ACT, E, OBS + 1
        self.A = nn.Parameter(torch.randn(E, OBS, OBS, generator=g, dtype=DT) * scale)
        self.Bm = nn.Parameter(torch.randn(E, ACT, OBS, generator=g, dtype=DT) * scale)
        self.c = nn.Parameter(torch.randn(E, OBS, generator=g, dtype=DT) * 0.1)
        self.wr = nn.Parameter(torch.randn(E, OBS, generator=g, dtype=DT))
        self.ur = nn.Parameter(torch.randn(E, ACT, generator=g, dtype=DT))
        self.qr = nn.Parameter(torch.randn(E, generator=g, dtype=DT))
        self.members = torch.randint(0, E, (calls, B), generator=g)
        self.calls = 0

    def step(self, s, a, m):
        """One sample: ``s[1, o]``, ``a[1, a]``, member ``m`` (an int) -> ``(s'[1, o], r[1])``."""
        nxt = s + torch.tanh(s @ self.A[m] + a @ self.Bm[m] + self.c[m])
        r = s @ self.wr[m] + a @ self.ur[m] + a.square().sum(-1) * self.qr[m]
        return nxt, r

    def sample_elites(self, batch_size, generator=None):
        m = self.members[self.calls][:batch_size]
        self.calls += 1
        return m

    def predict(self, obs, act, members=None, deterministic=True, generator=None, noise=None):
        rows = [self.step(obs[b:b + 1], act[b:b + 1], int(members[b])) for b in range(obs.shape[0])]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def _reset(*modules):
    for m in modules:
        m.calls = 0


def _grads(value, params):
    return torch.autograd.grad(value, params, allow_unused=True)


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _batch(B, seed=3, terminal=(1,)):
    g = torch.Generator().manual_seed(seed)
    done = torch.zeros(B, dtype=DT)
    done[list(terminal)] = 1.0
    return Batch(torch.randn(B, OBS, generator=g, dtype=DT), torch.rand(B, ACT, generator=g, dtype=DT) * 2 - 1,
                 torch.randn(B, generator=g, dtype=DT), torch.randn(B, OBS, generator=g, dtype=DT), done)


# ---- SAC: soft Bellman target and critic loss (paper 003 eq. 12) ------------------------------
def test_soft_bellman_target_per_sample():
    r = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    d = torch.tensor([0.0, 1.0, 0.0], dtype=DT)
    q = torch.tensor([3.0, 7.0, -1.0], dtype=DT)
    lp = torch.tensor([-0.5, 0.3, 2.0], dtype=DT)
    y = losses.soft_bellman_target(r, d, q, lp, 0.9, 0.2)
    expected = [1.0 + 0.9 * (3.0 - 0.2 * -0.5), -2.0, 0.5 + 0.9 * (-1.0 - 0.2 * 2.0)]  # terminal: no bootstrap
    _close(y, torch.tensor(expected, dtype=DT))


@pytest.mark.parametrize("gamma, alpha", [(0.99, 0.2), (0.5, 1.3)])
def test_critic_loss_matches_the_soft_bellman_equation(gamma, alpha):
    B = 5
    batch = _batch(B, terminal=(1, 4))
    policy, critic, target = TablePolicy(B, 1), TwinCritic(1), TwinCritic(7)
    noise = torch.randn(B, ACT, generator=torch.Generator().manual_seed(9), dtype=DT)
    loss, info = losses.critic_loss(critic, target, policy, batch, gamma, alpha, noise=noise)

    ref = 0.0
    for b in range(B):
        s, a, r, s2, d = (x[b:b + 1] for x in batch)
        with torch.no_grad():
            a2, lp2 = policy.act(s2, noise[b:b + 1])
            q_next = min(float(target.q(0, s2, a2)), float(target.q(1, s2, a2)))
            y = float(r) + (0.0 if float(d) == 1.0 else gamma * (q_next - alpha * float(lp2)))
        ref = ref + (critic.q(0, s, a) - y).square() + (critic.q(1, s, a) - y).square()
    ref = (ref / B).squeeze()
    _close(loss, ref)
    params = list(critic.parameters())
    for got, want in zip(_grads(loss, params), _grads(ref, params)):
        _close(got, want)
    assert all(g is None for g in _grads(loss, list(target.parameters()) + list(policy.parameters())))
    _close(info["q_mean"], critic.q(0, batch.obs, batch.action).mean().detach())
    assert not info["q_mean"].requires_grad  # a metric, not part of any graph


def test_critic_loss_without_noise_draws_the_policys_own():
    B = 4
    batch = _batch(B)
    policy, critic = TablePolicy(B, 1), TwinCritic()
    loss, _ = losses.critic_loss(critic, critic, policy, batch, 0.9, 0.1)
    _reset(policy)
    again, _ = losses.critic_loss(critic, critic, policy, batch, 0.9, 0.1, noise=policy.table[0])
    _close(loss, again)


# ---- SAC actor and temperature (paper 003 eq. 13) --------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_sac_actor_loss_matches_the_equation(alpha):
    B = 6
    obs = torch.randn(B, OBS, generator=torch.Generator().manual_seed(4), dtype=DT)
    policy, critic = TablePolicy(B, 1), TwinCritic()
    noise = policy.table[0]
    loss, info = losses.sac_actor_loss(policy, critic, obs, alpha, noise=noise)
    ref, lps = 0.0, []
    for b in range(B):
        a, lp = policy.act(obs[b:b + 1], noise[b:b + 1])
        q = torch.minimum(critic.q(0, obs[b:b + 1], a), critic.q(1, obs[b:b + 1], a))
        ref = ref + alpha * lp - q
        lps.append(float(lp.detach()))
    ref = (ref / B).squeeze()
    _close(loss, ref)
    params = list(policy.parameters())
    for got, want in zip(_grads(loss, params), _grads(ref, params)):
        _close(got, want)
    assert info["log_prob"].item() == pytest.approx(sum(lps) / B, rel=1e-12)
    assert not info["log_prob"].requires_grad  # the temperature loss treats it as a constant


def test_temperature_loss_value_gradient_and_direction():
    log_alpha = torch.tensor(math.log(0.5), dtype=DT, requires_grad=True)
    mean_logp = torch.tensor(-1.5, dtype=DT)
    target = -2.0  # target entropy H = -2: the entropy 1.5 is above it, so alpha must fall
    loss = losses.temperature_loss(log_alpha, mean_logp, target)
    _close(loss, torch.tensor(-math.log(0.5) * (-1.5 - 2.0), dtype=DT))
    (grad,) = torch.autograd.grad(loss, [log_alpha])
    _close(grad, torch.tensor(-(-1.5 - 2.0), dtype=DT))
    assert grad > 0  # gradient descent lowers alpha when the entropy exceeds its target
    low = losses.temperature_loss(log_alpha, torch.tensor(3.0, dtype=DT), target)  # entropy -3 < -2: raise alpha
    assert torch.autograd.grad(low, [log_alpha])[0] < 0
    x = torch.tensor(-1.0, dtype=DT, requires_grad=True)  # the log-probability is a constant here
    assert torch.autograd.grad(losses.temperature_loss(log_alpha, x, target), [x], allow_unused=True)[0] is None


def test_polyak_update():
    target, source = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    old = [p.detach().clone() for p in target.parameters()]
    losses.polyak_update(target, source, 0.2)
    for p, o, s in zip(target.parameters(), old, source.parameters()):
        _close(p, 0.8 * o + 0.2 * s.detach())


# ---- the imagined objective (paper 003 eq. 11) ------------------------------------------------
def _reference_objective(policy, pred, critic, s0, H, gamma, alpha, term, grad=None):
    """Per sample: ``J = sum_t gamma^t alive_t (r_t - alpha logp_t) + gamma^H alive_H (minQ(s_H, a_H)
    - alpha logp_H)``, ``alive`` from the termination function (the terminating reward counts).
    With ``grad``: each step is the gradient model's ``g(s, a)`` plus the constant
    ``p(s, a) - g(s, a)`` (prediction model's value, gradient model's derivative)."""
    B = s0.shape[0]
    total = 0.0
    terms = {"model_reward": 0.0, "entropy": 0.0, "entropy_term": 0.0, "terminal_value": 0.0, "alive": 0.0}
    for b in range(B):
        s, alive, J = s0[b:b + 1], 1.0, 0.0
        for t in range(H):
            a, lp = policy.act(s, policy.table[t][b:b + 1])
            terms["entropy"] += -float(lp.detach()) / (H + 1) / B
            terms["entropy_term"] += gamma ** t * alive * -alpha * float(lp.detach()) / B
            m = int(pred.members[t][b])
            if grad is None:
                s2, r = pred.step(s, a, m)
            else:
                gs, gr = grad.step(s, a, m)
                with torch.no_grad():
                    ps, pr = pred.step(s, a, m)
                    off_s, off_r = ps - gs, pr - gr
                s2, r = gs + off_s, gr + off_r
            J = J + gamma ** t * alive * (r - alpha * lp)
            terms["model_reward"] += gamma ** t * alive * float(r.detach()) / B
            if bool(term(s.detach(), a.detach(), s2.detach())[0]):
                alive = 0.0
            s = s2
        a, lp = policy.act(s, policy.table[H][b:b + 1])
        q = torch.minimum(critic.q(0, s, a), critic.q(1, s, a))
        J = J + gamma ** H * alive * (q - alpha * lp)
        terms["entropy"] += -float(lp.detach()) / (H + 1) / B
        terms["entropy_term"] += gamma ** H * alive * -alpha * float(lp.detach()) / B
        terms["terminal_value"] += gamma ** H * alive * float(q.detach()) / B
        terms["alive"] += alive / B
        total = total + J
    _reference_objective.terms = terms  # the info values of the last call
    return -(total / B).squeeze()


def _never(o, a, n):
    return torch.zeros(n.shape[0], dtype=torch.bool)


def _imagined(policy, pred, critic, s0, H, gamma, alpha, term, grad=None):
    _reset(policy, pred)
    return losses.imagined_objective(policy, pred, critic, s0, H, gamma, alpha, term, grad_model=grad)


@pytest.mark.parametrize("H", [0, 1, 3])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_imagined_objective_matches_eq_11(H, alpha):
    B = 4
    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(5), dtype=DT)
    policy, pred, critic = TablePolicy(B, H + 1), TableModel(B, max(H, 1)), TwinCritic()
    loss, info = _imagined(policy, pred, critic, s0, H, 0.9, alpha, _never)
    ref = _reference_objective(policy, pred, critic, s0, H, 0.9, alpha, _never)
    _close(loss, ref)
    _close(info["return"], -ref.detach())
    for key, value in _reference_objective.terms.items():
        assert info[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key
        assert not info[key].requires_grad, key
    params = list(policy.parameters())
    for got, want in zip(_grads(loss, params), _grads(ref, params)):
        _close(got, want)


def test_generator_drives_the_noise_and_the_elites():
    """With a generator the policy noise is drawn per sample ([B, act_dim]) from it: two runs
    from the same seed agree, another seed differs; the returned metrics carry no graph."""
    B, H = 5, 2  # B != obs_dim

    class Elites(TableModel):
        def sample_elites(self, batch_size, generator=None):
            return torch.randint(E, (batch_size,), generator=generator)

    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(21), dtype=DT)
    policy, pred, critic = TablePolicy(B, H + 1), Elites(B, H), TwinCritic()

    def run(seed):
        loss, info = losses.imagined_objective(policy, pred, critic, s0, H, 0.9, 0.2, _never,
                                               generator=torch.Generator().manual_seed(seed))
        return loss, info

    (a, info), (b, _), (c, _) = run(3), run(3), run(4)
    _close(a, b)
    assert not torch.equal(a, c)
    assert all(not v.requires_grad for v in info.values())
    assert policy.calls == 0  # every noise came from the generator, none from the table


def test_horizon_zero_is_the_sac_actor_loss():
    B = 5
    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(6), dtype=DT)
    policy, pred, critic = TablePolicy(B, 1), TableModel(B, 1), TwinCritic()
    loss, _ = _imagined(policy, pred, critic, s0, 0, 0.9, 0.4, _never)
    sac, _ = losses.sac_actor_loss(policy, critic, s0, 0.4, noise=policy.table[0])
    _close(loss, sac)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.85])
def test_termination_inside_the_unroll_stops_rewards_and_the_terminal_value(threshold):
    """A state rule (as the envs' termination functions): a sample ends once its first state
    column passes ``threshold``; samples end at different steps or never."""
    B, H, gamma, alpha = 8, 4, 0.8, 0.3
    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(7), dtype=DT) * 0.5

    def term(o, a, n):
        return n[:, 0] > threshold

    policy, pred, critic = TablePolicy(B, H + 1), TableModel(B, H), TwinCritic()
    loss, info = _imagined(policy, pred, critic, s0, H, gamma, alpha, term)
    ref = _reference_objective(policy, pred, critic, s0, H, gamma, alpha, term)
    _close(loss, ref)
    for key, value in _reference_objective.terms.items():
        assert info[key].item() == pytest.approx(value, rel=1e-10, abs=1e-12), key
    params = list(policy.parameters())
    for got, want in zip(_grads(loss, params), _grads(ref, params)):
        _close(got, want)
    assert 0.0 < info["alive"].item() < 1.0  # some samples end inside the unroll, some do not


def test_terminal_transitions_drop_later_rewards_by_hand():
    """A closed case: rewards 1 per step, the transition at step 1 terminates -> J = r0 + gamma r1."""
    B, H, gamma = 2, 3, 0.5

    class One(TableModel):
        def step(self, s, a, m):
            return s + 1.0 + 0.0 * a.sum(), torch.ones(1, dtype=DT) + 0.0 * a.sum()

    class Flat(TwinCritic):
        def q(self, j, s, a):
            return torch.full((s.shape[0],), 10.0, dtype=DT) + 0.0 * a.sum(-1)

    s0 = torch.zeros(B, OBS, dtype=DT)
    s0[1] = 5.0  # row 1 runs 5 -> 6 -> 7 -> 8: the rule below never fires for it
    policy, pred, critic = TablePolicy(B, H + 1), One(B, H), Flat()

    def term(o, a, n):
        return (n[:, 0] > 1.5) & (n[:, 0] < 3.0)  # row 0: s 0 -> 1 -> 2 (fires at step 1); row 1 never

    _, info = _imagined(policy, pred, critic, s0, H, gamma, 0.0, term)
    # row 0: 1 + 0.5 * 1 (terminated, no later reward, no terminal value); row 1: 1 + .5 + .25 + .125 * 10
    assert info["model_reward"].item() == pytest.approx(((1 + 0.5) + (1 + 0.5 + 0.25)) / 2)
    assert info["terminal_value"].item() == pytest.approx((0.0 + gamma ** H * 10.0) / 2)
    assert info["alive"].item() == pytest.approx(0.5)


def test_gradient_model_carries_the_gradient_not_the_value():
    B, H = 4, 3
    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(8), dtype=DT)
    policy, pred, critic = TablePolicy(B, H + 1), TableModel(B, H, seed=2), TwinCritic()
    grad_a, grad_b = TableModel(B, H, seed=11, scale=0.9), TableModel(B, H, seed=12, scale=0.05)
    plain, _ = _imagined(policy, pred, critic, s0, H, 0.95, 0.2, _never)
    with_a, _ = _imagined(policy, pred, critic, s0, H, 0.95, 0.2, _never, grad=grad_a)
    with_b, _ = _imagined(policy, pred, critic, s0, H, 0.95, 0.2, _never, grad=grad_b)
    _close(with_a, plain)  # values: the prediction model's, whatever the gradient model is
    _close(with_b, plain)
    ref = _reference_objective(policy, pred, critic, s0, H, 0.95, 0.2, _never, grad=grad_a)
    params = list(policy.parameters())
    got_a, want_a = _grads(with_a, params), _grads(ref, params)
    for got, want in zip(got_a, want_a):
        _close(got, want)
    got_b = _grads(with_b, params)
    got_plain = _grads(plain, params)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(got_a, got_b))  # the gradient model's derivative counts
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(got_a, got_plain))
    # the prediction model gets no gradient when a gradient model is used; the gradient model does
    _, _ = _imagined(policy, pred, critic, s0, H, 0.95, 0.2, _never, grad=grad_a)
    loss, _ = _imagined(policy, pred, critic, s0, H, 0.95, 0.2, _never, grad=grad_a)
    assert all(g is None for g in _grads(loss, list(pred.parameters())))
    assert any(g is not None and g.abs().max() > 0 for g in _grads(loss, [grad_a.A, grad_a.wr]))


def test_gradient_model_equal_to_the_prediction_model_changes_nothing():
    B, H = 3, 2
    s0 = torch.randn(B, OBS, generator=torch.Generator().manual_seed(13), dtype=DT)
    policy, pred, critic = TablePolicy(B, H + 1), TableModel(B, H), TwinCritic()
    twin = TableModel(B, H)  # same seed: same weights and member table
    plain, _ = _imagined(policy, pred, critic, s0, H, 0.9, 0.1, _never)
    both, _ = _imagined(policy, pred, critic, s0, H, 0.9, 0.1, _never, grad=twin)
    params = list(policy.parameters())
    for a, b in zip(_grads(plain, params), _grads(both, params)):
        _close(a, b)


def test_imagined_objective_bad_inputs():
    policy, pred, critic = TablePolicy(2, 2), TableModel(2, 1), TwinCritic()
    with pytest.raises(ValueError, match="horizon must be an int >= 0"):
        losses.imagined_objective(policy, pred, critic, torch.zeros(2, OBS, dtype=DT), -1, 0.9, 0.1, _never)
    with pytest.raises(ValueError, match="start_obs must have shape"):
        losses.imagined_objective(policy, pred, critic, torch.zeros(2, OBS + 1, dtype=DT), 1, 0.9, 0.1, _never)


# ---- the model's Gaussian NLL with soft-bounded log-variance ----------------------------------
def _softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def test_model_nll_loss_matches_the_gaussian_likelihood():
    model = ProbabilisticEnsemble(OBS, ACT, hidden_dim=8, num_layers=1, ensemble_size=E, num_elites=2,
                                  logvar_bound_coef=0.05).double()
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        model.max_logvar.copy_(torch.randn(OBS + 1, generator=g, dtype=DT) * 0.3 + 0.5)
        model.min_logvar.copy_(torch.randn(OBS + 1, generator=g, dtype=DT) * 0.3 - 4.0)
        model.input_normalizer.update(torch.randn(40, OBS + ACT, generator=g, dtype=DT) * 2 + 1)
    B = 5
    x = torch.randn(E, B, OBS + ACT, generator=g, dtype=DT)
    y = torch.randn(E, B, OBS + 1, generator=g, dtype=DT)
    loss, nll = losses.model_nll_loss(model, x, y)

    out = model.net(model.input_normalizer.normalize(x))  # raw head: [mean | raw log-variance]
    hi, lo = model.max_logvar.tolist(), model.min_logvar.tolist()
    ref_members = []
    for e in range(E):
        total = 0.0
        for b in range(B):
            for o in range(OBS + 1):
                mu, raw = float(out[e, b, o].detach()), float(out[e, b, OBS + 1 + o].detach())
                lv = hi[o] - _softplus(hi[o] - raw)
                lv = lo[o] + _softplus(lv - lo[o])
                total += 0.5 * ((float(y[e, b, o]) - mu) ** 2 / math.exp(lv) + lv + math.log(2 * math.pi))
        ref_members.append(total / (B * (OBS + 1)))
    _close(nll.detach(), torch.tensor(ref_members, dtype=DT))
    ref = sum(ref_members) + 0.05 * (sum(hi) - sum(lo))
    assert float(loss) == pytest.approx(ref, rel=1e-12)
    # gradients: against autograd through an independent torch transcription of the same formula
    mean, raw = out[..., : OBS + 1], out[..., OBS + 1:]
    lv = model.max_logvar - nn.functional.softplus(model.max_logvar - raw)
    lv = model.min_logvar + nn.functional.softplus(lv - model.min_logvar)
    ref_t = (0.5 * ((y - mean).square() * torch.exp(-lv) + lv + math.log(2 * math.pi))).mean(dim=(1, 2)).sum() \
        + 0.05 * (model.max_logvar.sum() - model.min_logvar.sum())
    params = list(model.parameters())
    for got, want in zip(_grads(loss, params), _grads(ref_t, params)):
        _close(got, want)


# ---- DDPPO's directional-derivative loss (paper 003 eq. 9-10) ----------------------------------
@pytest.mark.parametrize("normalize_targets", [False, True])
def test_fd_gradient_loss_matches_jacobians_by_autograd(normalize_targets):
    """The loss compares the raw-unit Jacobian of the model's mean (what forward returns) with the
    finite differences: with standardised targets too (target std far from 1)."""
    model = ProbabilisticEnsemble(OBS, ACT, hidden_dim=8, num_layers=2, ensemble_size=E, num_elites=2,
                                  spectral_norm="hidden", normalize_targets=normalize_targets).double().eval()
    g = torch.Generator().manual_seed(15)
    model.input_normalizer.update(torch.randn(50, OBS + ACT, generator=g, dtype=DT) * 3 + 1)
    model.fit_target_statistics(torch.randn(40, OBS + 1, generator=g, dtype=DT) * torch.linspace(0.2, 9.0, OBS + 1,
                                                                                             dtype=DT) + 2.0)
    Q, n = 4, 3
    x = torch.randn(Q, OBS + ACT, generator=g, dtype=DT)
    directions = torch.randn(Q, n, OBS + ACT, generator=g, dtype=DT)
    deltas = torch.randn(Q, n, OBS + 1, generator=g, dtype=DT)
    per = losses.fd_gradient_loss(model, x, directions, deltas, per_member=True)
    ref = []
    for e in range(E):
        def mean_e(xi):
            return model(xi.unsqueeze(0))[0][e, 0]

        total = 0.0
        for q in range(Q):
            jac = torch.autograd.functional.jacobian(mean_e, x[q], create_graph=True)  # [out, in]
            for i in range(n):
                total = total + (jac @ directions[q, i] - deltas[q, i]).square().sum() / (OBS + 1)
        ref.append(total / (Q * n))
    ref = torch.stack(ref)
    _close(per, ref.detach())
    _close(losses.fd_gradient_loss(model, x, directions, deltas), ref.mean().detach())
    params = [model.net.weights[0], model.net.biases[1]]
    for got, want in zip(_grads(per.sum(), params), _grads(ref.sum(), params)):
        _close(got, want, tol=1e-9)
