"""Every objective of fastrp's algorithms as a pure function.

Arguments are tensors and modules; nothing here holds an optimizer or hidden state, and
randomness comes in as arguments (noise tensors or a ``torch.Generator``), so each function is
deterministic under test. ``tests/test_losses.py`` checks each against the papers' equations
written out independently.

* :func:`soft_bellman_target`, :func:`critic_loss` - SAC's clipped double-Q soft Bellman loss
  (paper 003 eq. 12).
* :func:`sac_actor_loss` - SAC's policy loss ``E[alpha log pi(a|s) - min Q(s, a)]``.
* :func:`temperature_loss` - SAC's automatic entropy temperature (paper 003 eq. 13).
* :func:`imagined_objective` - the H-step model value expansion of paper 003 eq. 11 (RP-DP /
  SVG(H) / MAAC), through a prediction model and optionally a DDPPO gradient model.
* :func:`model_nll_loss` - the ensemble's Gaussian NLL with MBPO's soft-bounded log-variance
  regulariser.
* :func:`fd_gradient_loss` - DDPPO's directional-derivative loss (paper 003 eq. 9-10).
* :func:`polyak_update` - the target network's exponential moving average.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from fastrp.nn.model import ProbabilisticEnsemble, gaussian_nll
from fastrp.ops._common import check_tensor

__all__ = ["soft_bellman_target", "critic_loss", "sac_actor_loss", "temperature_loss", "imagined_objective",
           "model_nll_loss", "fd_gradient_loss", "polyak_update"]

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_FLOATS = (torch.float32, torch.float64)


# ---- SAC: critic, policy, temperature ----------------------------------------------------------
def soft_bellman_target(reward: torch.Tensor, terminated: torch.Tensor, next_min_q: torch.Tensor,
                        next_log_prob: torch.Tensor, gamma: float, alpha) -> torch.Tensor:
    """``y = r + gamma (1 - done) (min_j Q'_j(s', a') - alpha log pi(a'|s'))``, ``a' ~ pi(s')``.

    Args:
        reward, terminated: ``[B]`` (``terminated`` 0/1: no bootstrap past a true terminal; a
            time-limit truncation is not a terminal).
        next_min_q: ``[B]`` ``min(Q'_1, Q'_2)`` of the target critic at ``(s', a')``.
        next_log_prob: ``[B]`` ``log pi(a'|s')``.
        gamma: discount; alpha: temperature (float or 0-d tensor).
    """
    return reward + gamma * (1.0 - terminated) * (next_min_q - alpha * next_log_prob)


def critic_loss(critic, target_critic, policy, batch, gamma: float, alpha,
                noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Clipped double-Q soft Bellman loss ``sum_j mean_b (Q_j(s, a) - y)^2`` (paper 003 eq. 12).

    The target ``y`` (:func:`soft_bellman_target`) is computed without gradient, with the next
    action drawn from the current ``policy`` and valued by ``target_critic``.

    Args:
        critic, target_critic: ``critic(obs, action) -> (q1[B], q2[B])`` and ``.min_q``
            (:class:`fastrp.nn.TwinQ`).
        policy: ``policy(obs, noise=...) -> (action, log_prob)`` (:class:`fastrp.nn.TanhGaussianPolicy`).
        batch: ``obs, action, reward, next_obs, terminated`` (:class:`fastrp.rl.buffer.Batch`).
        gamma, alpha: discount and temperature (pass a detached alpha).
        noise: optional standard-normal ``[B, act_dim]`` for the next action (drawn by the policy
            when None).

    Returns:
        ``(loss, {"q_mean": mean Q1 (detached)})``.
    """
    with torch.no_grad():
        next_action, next_log_prob = policy(batch.next_obs, noise=noise)
        next_q = target_critic.min_q(batch.next_obs, next_action)
        target = soft_bellman_target(batch.reward, batch.terminated, next_q, next_log_prob, gamma, alpha)
    q1, q2 = critic(batch.obs, batch.action)
    loss = (q1 - target).square().mean() + (q2 - target).square().mean()
    return loss, {"q_mean": q1.detach().mean()}


def sac_actor_loss(policy, critic, obs: torch.Tensor, alpha,
                   noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """SAC's policy loss ``mean_b (alpha log pi(a|s) - min_j Q_j(s, a))``, ``a ~ pi(s)`` reparameterized.

    Returns ``(loss, {"log_prob": mean log pi (detached)})``.
    """
    action, log_prob = policy(obs, noise=noise)
    q = critic.min_q(obs, action)
    return (alpha * log_prob - q).mean(), {"log_prob": log_prob.detach().mean()}


def temperature_loss(log_alpha: torch.Tensor, mean_log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    """SAC's temperature loss ``-log(alpha) (E[log pi] + H_target)`` (paper 003 eq. 13 with the
    usual log-parameterisation): its gradient raises alpha when the entropy ``-E[log pi]`` falls
    below ``H_target`` and lowers it above. ``mean_log_prob`` is treated as a constant."""
    return -log_alpha * (mean_log_prob.detach() + target_entropy)


@torch.no_grad()
def polyak_update(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """``theta_target <- (1 - tau) theta_target + tau theta_source`` for every parameter (in place)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


# ---- the model-based policy objective (paper 003 eq. 11) ---------------------------------------
def sample_policy(policy, obs: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``policy(obs) -> (action, log_prob)``, with the reparameterization noise drawn from
    ``generator`` (``TanhGaussianPolicy`` takes ``noise=``)."""
    if generator is None:
        return policy(obs)
    noise = torch.randn(obs.shape[0], policy.act_dim, generator=generator, device=obs.device, dtype=obs.dtype)
    return policy(obs, noise=noise)


def _model_step(model, obs, act, members, reward_fn, deterministic, noise):
    next_obs, reward = model.predict(obs, act, members=members, deterministic=deterministic, noise=noise)
    if reward is None:
        reward = reward_fn(obs, act, next_obs)
    return next_obs, reward


def imagined_objective(
    policy,
    pred_model,
    critic,
    start_obs: torch.Tensor,
    horizon: int,
    gamma: float,
    alpha,
    termination_fn: TerminationFn,
    grad_model=None,
    generator: Optional[torch.Generator] = None,
    reward_fn: Optional[RewardFn] = None,
    deterministic_model: bool = True,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Negative H-step model-value-expansion objective of the policy (paper 003, eq. 11).

    From ``s_0 = start_obs``, for ``t = 0 .. H-1``: ``a_t, logp_t = policy(s_t)``; one random
    elite ``m_t[b]`` per sample; ``s_{t+1}, r_t`` from ``pred_model.predict(s_t, a_t, m_t)``. With
    ``grad_model``, ``s_{t+1} = p.detach() + g - g.detach()`` (and the same for ``r_t``) where
    ``p`` is the prediction model's value and ``g`` the gradient model's with the same member
    indices (the two ensembles must have the same size): values from the prediction model,
    gradients from the gradient model. Termination: ``alive_0 = 1``,
    ``alive_{t+1} = alive_t * (1 - termination_fn(s_t, a_t, s_{t+1}))``. The objective per sample:

    ``J = sum_t gamma^t alive_t (r_t - alpha logp_t) + gamma^H alive_H (min Q(s_H, a_H) - alpha logp_H)``

    with ``a_H, logp_H = policy(s_H)``: the reward of the transition that terminates still
    counts, every later reward and the terminal value do not. ``H = 0`` is SAC's actor loss.

    Gradients reach the policy, and also every model / critic parameter that requires grad:
    this function does not freeze them (the agent freezes the critic and models around its
    policy update). With ``grad_model`` the prediction model receives no gradient.

    Args:
        policy: ``policy(obs[B, o]) -> (action[B, a], log_prob[B])`` (e.g. ``TanhGaussianPolicy``;
            with ``generator`` it must accept ``noise=`` and have ``act_dim``).
        pred_model: :class:`fastrp.nn.model.ProbabilisticEnsemble` (prediction model).
        critic: ``critic.min_q(obs, action) -> [B]`` (e.g. ``TwinQ``).
        start_obs: ``[B, obs_dim]`` start states (e.g. sampled from the env buffer).
        horizon: model steps ``H >= 0``.
        gamma: discount; alpha: entropy temperature (float or 0-d tensor, used as given - pass
            a detached value).
        termination_fn: ``fn(obs, action, next_obs) -> bool[B]`` (:func:`fastrp.envs.termination_fn`).
        grad_model: optional DDPPO gradient model (same class and ensemble size).
        generator: drives elite choice, policy noise and model noise (on ``start_obs``'s device).
        reward_fn: ``fn(obs, action, next_obs) -> [B]`` for models with ``learn_reward=False``.
        deterministic_model: use the models' means (default); else sample ``mean + std * eps``
            with one ``eps`` per step shared by the prediction and the gradient model.

    Returns:
        ``(loss, info)``: ``loss = -mean_b J`` (scalar, differentiable); ``info`` (detached 0-d
        tensors but one): ``"return"`` (mean J), ``"return_per_sample"`` (``J``, ``[B]``),
        ``"model_reward"`` (mean discounted, masked reward sum
        without the entropy terms), ``"terminal_value"`` (mean ``gamma^H alive_H min Q``),
        ``"alive"`` (mean ``alive_H``), ``"entropy"`` (mean ``-logp`` over the ``H + 1`` policy
        samples), ``"entropy_term"`` (mean discounted, masked ``-alpha logp`` sum).
    """
    check_tensor("start_obs", start_obs, shape=(None, pred_model.obs_dim), dtypes=_FLOATS,
                 what=f"[B, obs_dim={pred_model.obs_dim}]")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
        raise ValueError(f"horizon must be an int >= 0, got {horizon!r}")
    if grad_model is not None and grad_model.ensemble_size != pred_model.ensemble_size:
        raise ValueError(f"grad_model must have ensemble_size={pred_model.ensemble_size} like pred_model "
                         f"(members are shared per sample), got {grad_model.ensemble_size}")
    if not pred_model.learn_reward and reward_fn is None:
        raise ValueError("reward_fn must be given when pred_model does not learn the reward")
    B = start_obs.shape[0]
    dev, dtype = start_obs.device, start_obs.dtype
    obs = start_obs
    alive = torch.ones(B, device=dev, dtype=dtype)
    total = torch.zeros(B, device=dev, dtype=dtype)
    reward_sum = torch.zeros(B, device=dev, dtype=dtype)
    entropy_sum = torch.zeros(B, device=dev, dtype=dtype)
    neg_logp = torch.zeros(B, device=dev, dtype=dtype)
    discount = 1.0
    for _ in range(horizon):
        act, logp = sample_policy(policy, obs, generator)
        members = pred_model.sample_elites(B, generator)
        noise = None
        if not deterministic_model:
            noise = torch.randn(B, pred_model.out_dim, generator=generator, device=dev, dtype=dtype)
        with torch.set_grad_enabled(grad_model is None and torch.is_grad_enabled()):
            next_obs, reward = _model_step(pred_model, obs, act, members, reward_fn, deterministic_model, noise)
        if grad_model is not None:
            g_obs, g_reward = _model_step(grad_model, obs, act, members, reward_fn, deterministic_model, noise)
            next_obs = next_obs.detach() + g_obs - g_obs.detach()
            reward = reward.detach() + g_reward - g_reward.detach()
        weight = discount * alive
        total = total + weight * (reward - alpha * logp)
        reward_sum = reward_sum + (weight * reward).detach()
        entropy_sum = entropy_sum + (weight * (-alpha * logp)).detach()
        neg_logp = neg_logp - logp.detach()
        done = termination_fn(obs.detach(), act.detach(), next_obs.detach())
        alive = alive * (~done).to(dtype)
        obs = next_obs
        discount *= gamma
    act, logp = sample_policy(policy, obs, generator)
    weight = discount * alive
    q = critic.min_q(obs, act)
    total = total + weight * (q - alpha * logp)
    entropy_sum = entropy_sum + (weight * (-alpha * logp)).detach()
    neg_logp = neg_logp - logp.detach()
    info = {
        "return": total.detach().mean(),
        "return_per_sample": total.detach(),
        "model_reward": reward_sum.mean(),
        "terminal_value": (weight * q).detach().mean(),
        "alive": alive.mean(),
        "entropy": neg_logp.mean() / (horizon + 1),
        "entropy_term": entropy_sum.mean(),
    }
    return -total.mean(), info


# ---- model losses --------------------------------------------------------------------------------
def model_nll_loss(model: ProbabilisticEnsemble, inputs: torch.Tensor,
                   targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's training loss on one minibatch per member (MBPO / DDPPO prediction loss).

    ``loss = sum_e NLL_e + c (sum max_logvar - sum min_logvar)``: per member the Gaussian NLL
    (:func:`fastrp.nn.model.gaussian_nll`) of the targets under the model's mean and
    soft-bounded log-variance, plus ``c = model.logvar_bound_coef`` times the gap of the learned
    log-variance bounds (which pulls the bounds together).

    Args:
        model: the ensemble (its input normaliser is applied by its forward).
        inputs: ``[E, B, in]`` raw ``[obs, act]`` rows (member ``e`` gets ``inputs[e]``).
        targets: ``[E, B, out]`` (``model.make_targets``).

    Returns:
        ``(loss, nll[E])`` (``nll`` differentiable, as returned by ``gaussian_nll``).
    """
    mean, logvar = model(inputs)
    nll = gaussian_nll(mean, logvar, targets)
    loss = nll.sum() + model.logvar_bound_coef * (model.max_logvar.sum() - model.min_logvar.sum())
    return loss, nll


def fd_gradient_loss(
    model: ProbabilisticEnsemble,
    inputs: torch.Tensor,
    directions: torch.Tensor,
    deltas: torch.Tensor,
    per_member: bool = False,
) -> torch.Tensor:
    """DDPPO's directional-derivative loss ``R`` (paper 003, eq. 9) on the model's mean head.

    For each query ``x`` and neighbour ``x_i`` with direction ``v_i = x_i - x`` and
    finite-difference target ``d_i = y_i - y`` (from :func:`fastrp.ops.fd_targets`),
    ``R = mean_x (1/n) sum_i (1/d) || J(x) v_i - d_i ||^2`` with ``J`` the Jacobian of the
    predicted target mean with respect to the raw input ``x = [obs, act]``, ``n`` neighbours and
    ``d`` outputs (the paper's ``1/n`` and ``1/d``, expectation over the queries) - i.e. the mean
    of the squared residual over queries, neighbours and outputs, per member.

    Coordinates: the network sees ``x_n = (x - mean) / std``, so ``J(x) v = J_n(x_n) (v / std)``:
    the directions enter :meth:`fastrp.nn.EnsembleMLP.forward_jvp` divided by the normaliser std
    (no shift), all ``n`` of them as tangents of one fused pass. The mean head is in raw target
    units, so the deltas are used as they are.

    Args:
        model: a :class:`ProbabilisticEnsemble` (its fitted input normaliser is used).
        inputs: ``[Q, in]`` raw query rows ``[obs, act]``.
        directions: ``[Q, n, in]`` raw ``x_i - x``.
        deltas: ``[Q, n, out]`` target differences ``y_i - y`` (``y = [next_obs - obs, reward]``).
        per_member: return ``[E]`` instead of the mean over members.

    Returns:
        Scalar (mean over members) or ``[E]``; differentiable in the model parameters.
    """
    check_tensor("inputs", inputs, shape=(None, model.in_dim), dtypes=_FLOATS, device=model.elite_idx.device,
                 what=f"[Q, in={model.in_dim}] on the model's device")
    Q = inputs.shape[0]
    check_tensor("directions", directions, shape=(Q, None, model.in_dim), dtypes=(inputs.dtype,), device=inputs.device,
                 what=f"[Q, n, in={model.in_dim}] like inputs")
    check_tensor("deltas", deltas, shape=(Q, directions.shape[1], model.out_dim), dtypes=(inputs.dtype,),
                 device=inputs.device, what=f"[Q, n, out={model.out_dim}] like directions")
    norm = model.input_normalizer
    _, jy = model.net.forward_jvp(norm.normalize(inputs), norm.scale(directions))
    jy = jy[..., : model.out_dim]
    if model.normalize_targets:  # the network's mean head is standardised: back to raw units
        jy = jy * model.target_std.to(jy.dtype)
    residual = jy - deltas
    per = residual.square().flatten(1).mean(dim=1)
    return per if per_member else per.mean()
