"""Variance of the model-based RP policy gradient as a function of the unroll length H (paper 000).

The quantity: for a fixed pool of real start states, draw ``num_samples`` independent minibatches
of ``batch_size`` states from the pool and compute, from scratch each time, the gradient ``g_i``
of the policy objective (:func:`fastrp.algos.losses.imagined_objective`: H steps through the model,
terminal min-Q) with respect to the policy parameters. Report

* ``trace_cov = sum_p Var_i(g_i[p])`` - the trace of the covariance matrix of the minibatch
  gradient, with the unbiased (``n - 1``) sample variance per parameter;
* ``mean_grad_norm = mean_i ||g_i||``.

Two mistakes of the public reference code are avoided: every ``g_i`` is computed with
:func:`torch.autograd.grad` (nothing accumulates in ``.grad``, so samples are independent), and
the start states are the states the training unroll starts from (see
:func:`rp_gradient_variance`).

:func:`gradient_covariance_trace` is the estimator on its own (any ``sample -> flat gradient``
function), :func:`rp_gradient_stats` applies it to a policy, model and critic (and
:func:`rp_gradient_variance` turns that into table rows), and
:func:`frozen_modules` (:mod:`fastrp.algos.common`, the same context the trainer's policy update uses) makes
all of this invisible to a training run.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from fastrp.algos.common import frozen_modules
from fastrp.algos.losses import imagined_objective

__all__ = ["GradientStats", "ActionGradientStats", "flat_gradient", "gradient_covariance_trace", "rp_gradient_stats",
           "rp_gradient_variance", "frozen_modules"]


class GradientStats(NamedTuple):
    """Result of :func:`gradient_covariance_trace`.

    ``trace_cov``: sum over parameters of the unbiased sample variance of the gradient samples;
    ``mean_grad_norm``: mean Euclidean norm of the samples; ``mean_grad``: ``[P]`` float64 mean
    gradient; ``num_samples``: how many samples were drawn.
    """

    trace_cov: float
    mean_grad_norm: float
    mean_grad: torch.Tensor
    num_samples: int


class ActionGradientStats(NamedTuple):
    """The RP gradient seen in action space, which does not depend on how the policy is
    parameterised (spectral normalization rescales the parameter gradient, not this).

    For every start state ``b`` of every minibatch, ``g_b = d J_b / d a_0`` with the first action
    ``a_0`` held as a leaf: how the imagined return through the model (reward, the model steps,
    the later actions and the terminal value) changes with the action the policy takes at the
    start state; ``log pi(a_0)`` is held fixed. ``grad_sq = mean_b ||g_b||^2`` and
    ``trace_cov = sum_d Var_b(g_b[d])`` (unbiased) over all ``num_samples x batch_size`` states.
    """

    grad_sq: float
    trace_cov: float
    count: int


class _FirstActionLeaf:
    """A policy whose first call returns its action detached as a leaf that requires grad (and a
    detached log-probability); later calls are the policy's own."""

    def __init__(self, policy):
        self.policy, self.act_dim = policy, policy.act_dim
        self.leaf: Optional[torch.Tensor] = None

    def __call__(self, obs, **kwargs):
        action, log_prob = self.policy(obs, **kwargs)
        if self.leaf is None:
            self.leaf = action.detach().requires_grad_(True)
            return self.leaf, log_prob.detach()
        return action, log_prob


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``d loss / d params`` flattened into one ``[P]`` vector (``P`` = total parameter count).

    Uses :func:`torch.autograd.grad`, so nothing is written to (or read from) the parameters'
    ``.grad``: every call is a fresh gradient, whatever happened before. Parameters the loss does
    not depend on contribute zeros.
    """
    if loss.dim() != 0:
        raise ValueError(f"loss must be a scalar tensor, got shape {tuple(loss.shape)}")
    params = list(params)
    if not params:
        raise ValueError("params must hold at least one tensor")
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def gradient_covariance_trace(sample_grad_fn: Callable[[int], torch.Tensor], num_samples: int) -> GradientStats:
    """Trace of the covariance and mean norm of a stochastic gradient, from independent samples.

    Args:
        sample_grad_fn: ``fn(i) -> [P]`` the ``i``-th independent gradient sample (a 1-D tensor,
            the same ``P`` every call), e.g. a :func:`flat_gradient` of a fresh minibatch loss.
        num_samples: ``n >= 2`` samples to draw.

    Returns:
        :class:`GradientStats` with ``trace_cov = sum_p (1/(n-1)) sum_i (g_i[p] - mean[p])^2``
        (accumulated in float64 with Welford's update) and ``mean_grad_norm = (1/n) sum_i ||g_i||``.
        Non-finite samples make the results non-finite (they are reported, not hidden).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2 (a sample variance needs two samples), got {num_samples!r}")
    mean = m2 = None
    norm_sum = 0.0
    for i in range(num_samples):
        g = sample_grad_fn(i)
        if not isinstance(g, torch.Tensor) or g.dim() != 1:
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"sample_grad_fn must return a 1-D gradient tensor [P], got {got}")
        g = g.detach().to(torch.float64)
        if mean is None:
            mean, m2 = torch.zeros_like(g), torch.zeros_like(g)
        elif g.shape != mean.shape:
            raise ValueError(f"sample_grad_fn returned [{g.shape[0]}] after [{mean.shape[0]}]: every sample "
                             f"must have the same length")
        delta = g - mean
        mean += delta / (i + 1)
        m2 += delta * (g - mean)
        norm_sum += float(torch.linalg.vector_norm(g))
    trace = float(m2.sum()) / (num_samples - 1)
    return GradientStats(trace, norm_sum / num_samples, mean, num_samples)


def rp_gradient_stats(
    policy: torch.nn.Module,
    model,
    critic,
    start_states: torch.Tensor,
    horizons: Sequence[int],
    *,
    gamma: float,
    alpha,
    termination_fn,
    grad_model=None,
    num_samples: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    action_stats: Optional[List[ActionGradientStats]] = None,
) -> List[Tuple[int, GradientStats]]:
    """Statistics of the RP policy gradient through ``model`` for each unroll length in ``horizons``.

    For each ``H``: a ``torch.Generator`` seeded with ``seed`` (the same for every H, so all
    lengths see the same minibatches: common random numbers) draws ``num_samples`` minibatches of
    ``batch_size`` rows of ``start_states`` (uniform, with replacement) and drives the policy
    noise and the per-sample elite choice of :func:`fastrp.algos.losses.imagined_objective`; each
    minibatch loss is differentiated on its own with :func:`flat_gradient` w.r.t. the policy
    parameters, and :func:`gradient_covariance_trace` summarises the samples. With ``grad_model``
    (DDPPO) values come from ``model`` and gradients flow through ``grad_model``, as in training.

    Start states: raw replay-buffer observations, exactly what the training unroll is fed. In
    fastrp every network normalises its own inputs - the policy and the critic with the run's
    running observation normaliser (``obs_norm``, RP-PGM's, a submodule they share), the model
    with its fitted input normaliser inside ``predict`` - so "normalised as in training" needs no
    extra step here and cannot drift from training (the reference code's bug was feeding
    unnormalised states to networks that expected normalised ones).

    All modules run in eval mode with only the policy requiring grad (:func:`frozen_modules`);
    the global RNGs are not touched and no ``.grad`` is left behind.

    Args:
        policy: ``policy(obs, noise=...) -> (action, log_prob)`` module with ``act_dim`` (e.g.
            ``TanhGaussianPolicy``).
        model: prediction model as :func:`~fastrp.algos.losses.imagined_objective` uses it
            (:class:`~fastrp.nn.model.ProbabilisticEnsemble`: ``predict``, ``sample_elites``,
            ``obs_dim``, ``out_dim``, ``learn_reward``, ``ensemble_size``), a ``torch.nn.Module``.
        critic: module with ``min_q(obs, action) -> [B]`` (e.g. ``TwinQ``).
        start_states: ``[N, obs_dim]`` pool of real states on the model's device.
        horizons: unroll lengths (ints ``>= 0``; 0 is the model-free SAC actor gradient).
        gamma, alpha: discount and entropy temperature (as in training).
        termination_fn: the task's ``fn(obs, act, next_obs) -> bool``.
        grad_model: DDPPO gradient model, or None.
        num_samples: gradient samples per H (``>= 2``).
        batch_size: start states per minibatch (``>= 1``).
        seed: generator seed.
        action_stats: when a list is given, one :class:`ActionGradientStats` per H is appended
            to it (each minibatch is then also unrolled with its first action as a leaf, from the
            same random draws; the parameter-gradient samples are unchanged).

    Returns:
        ``[(H, GradientStats), ...]`` in the order of ``horizons`` (``GradientStats.mean_grad``
        is the mean flat gradient over the policy parameters, in ``policy.parameters()`` order).
    """
    if not isinstance(start_states, torch.Tensor) or start_states.dim() != 2 or start_states.shape[0] < 1:
        got = tuple(start_states.shape) if isinstance(start_states, torch.Tensor) else type(start_states).__name__
        raise ValueError(f"start_states must be a non-empty [N, obs_dim] tensor, got {got}")
    horizons = list(horizons)
    if not horizons or any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in horizons):
        raise ValueError(f"horizons must be a non-empty sequence of ints >= 0, got {horizons!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    device = start_states.device
    states = start_states.detach()
    out: List[Tuple[int, GradientStats]] = []
    with frozen_modules([model, critic, grad_model], trainable=policy):
        params = [p for p in policy.parameters()]
        for horizon in horizons:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed))

            welford = {"n": 0, "mean": None, "m2": None, "sq": 0.0}

            def sample(_: int, horizon: int = horizon) -> torch.Tensor:
                idx = torch.randint(states.shape[0], (batch_size,), generator=gen, device=device)
                before = gen.get_state()
                loss, _ = imagined_objective(policy, model, critic, states[idx], horizon, gamma, alpha,
                                             termination_fn, grad_model=grad_model, generator=gen)
                flat = flat_gradient(loss, params)
                if action_stats is not None:
                    after = gen.get_state()
                    gen.set_state(before)  # the same draws, the first action as a leaf
                    leaf_policy = _FirstActionLeaf(policy)
                    leaf_loss, _ = imagined_objective(leaf_policy, model, critic, states[idx], horizon, gamma, alpha,
                                                      termination_fn, grad_model=grad_model, generator=gen)
                    (g,) = torch.autograd.grad(leaf_loss, [leaf_policy.leaf], allow_unused=True)
                    g = torch.zeros_like(leaf_policy.leaf) if g is None else g
                    per_state = (-batch_size * g).detach().double()  # loss = -mean_b J_b
                    _welford_rows(welford, per_state)
                    gen.set_state(after)
                return flat

            out.append((horizon, gradient_covariance_trace(sample, num_samples)))
            if action_stats is not None:
                n = welford["n"]
                trace = float(welford["m2"].sum()) / (n - 1) if n > 1 else float("nan")
                action_stats.append(ActionGradientStats(welford["sq"] / n, trace, n))
    return out


def _welford_rows(acc: Dict[str, object], rows: torch.Tensor) -> None:
    """Merge the rows of ``rows[B, d]`` into running count / mean / M2 and the sum of squared norms."""
    n_b = rows.shape[0]
    mean_b = rows.mean(dim=0)
    m2_b = (rows - mean_b).square().sum(dim=0)
    if acc["mean"] is None:
        acc["n"], acc["mean"], acc["m2"] = n_b, mean_b, m2_b
    else:
        n_a = acc["n"]
        delta = mean_b - acc["mean"]
        n = n_a + n_b
        acc["mean"] = acc["mean"] + delta * n_b / n
        acc["m2"] = acc["m2"] + m2_b + delta.square() * n_a * n_b / n
        acc["n"] = n
    acc["sq"] += float(rows.square().sum())


def rp_gradient_variance(*args, **kwargs) -> List[Dict[str, float]]:
    """:func:`rp_gradient_stats` as table rows (what the training hook and the CLI record).

    Takes exactly the arguments of :func:`rp_gradient_stats` and draws the same samples. Returns
    one dict per H, in order: ``{"horizon", "trace_cov", "trace_cov_norm", "mean_grad_norm",
    "action_grad_sq", "action_trace_cov", "samples", "batch"}``, where ``trace_cov_norm`` is
    ``trace_cov / ||theta||^2`` (the policy's parameter vector: a scale-free version) and the
    ``action_*`` entries are :class:`ActionGradientStats` (independent of the policy's
    parameterisation, so runs with and without spectral normalization compare fairly).
    """
    bound = inspect.signature(rp_gradient_stats).bind(*args, **kwargs)
    bound.apply_defaults()
    batch_size = bound.arguments["batch_size"]
    policy = bound.arguments["policy"]
    actions: List[ActionGradientStats] = []
    bound.arguments["action_stats"] = actions
    stats = rp_gradient_stats(*bound.args, **bound.kwargs)
    with torch.no_grad():
        sq_norm = float(sum(p.detach().double().square().sum() for p in policy.parameters()))
    return [{"horizon": h, "trace_cov": s.trace_cov, "trace_cov_norm": s.trace_cov / sq_norm if sq_norm > 0 else float("nan"),
             "mean_grad_norm": s.mean_grad_norm, "action_grad_sq": a.grad_sq, "action_trace_cov": a.trace_cov,
             "samples": s.num_samples, "batch": batch_size} for (h, s), a in zip(stats, actions)]
