"""Imagined rollouts through a learned model: the RP-DP / DDPPO policy objective and MBPO's
model-rollout data.

* :func:`imagined_objective` - paper 003 eq. 11 (= RP-DP / SVG(H) / MAAC with a SAC entropy
  term): the policy is unrolled ``horizon`` steps through the prediction ensemble (one random
  elite per sample) and scored by the discounted entropy-regularised model rewards plus the
  discounted terminal ``min Q``. With a DDPPO gradient model the values still come from the
  prediction model while the gradients are taken through the gradient model
  (``s' = p.detach() + g - g.detach()``, same member per sample).
* :func:`model_rollout` - MBPO's branched rollouts for the model replay buffer (no gradient).

Neither function synchronises with the host inside its step loop; ``model_rollout`` filters the
finished rows once at the end.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from fastrp.ops._common import check_tensor

__all__ = ["imagined_objective", "model_rollout"]

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _policy_step(policy, obs: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
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
    counts, every later reward and the terminal value do not.

    Gradients reach the policy, and also every model / critic parameter that requires grad:
    this function does not freeze them. Step an optimizer that holds only the policy parameters
    (and zero the model and critic grads before their own updates, e.g. ``zero_grad`` with
    ``set_to_none=True``), or wrap the call with the other modules' ``requires_grad_(False)``
    and restore it afterwards. With ``grad_model`` the prediction model receives no gradient.

    Args:
        policy: ``policy(obs[B, o]) -> (action[B, a], log_prob[B])`` (e.g. ``TanhGaussianPolicy``;
            with ``generator`` it must accept ``noise=`` and have ``act_dim``).
        pred_model: :class:`fastrp.nn.model.ProbabilisticEnsemble` (prediction model).
        critic: ``critic.min_q(obs, action) -> [B]`` (e.g. ``TwinQ``).
        start_obs: ``[B, obs_dim]`` start states (e.g. sampled from the env buffer).
        horizon: model steps ``H >= 0`` (``H = 0`` is the SAC actor loss).
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
        tensors): ``"return"`` (mean J), ``"model_reward"`` (mean discounted, masked reward sum
        without the entropy terms), ``"terminal_value"`` (mean ``gamma^H alive_H min Q``),
        ``"alive"`` (mean ``alive_H``), ``"entropy"`` (mean ``-logp`` over the ``H + 1`` policy
        samples), ``"entropy_term"`` (mean discounted, masked ``-alpha logp`` sum).
    """
    check_tensor("start_obs", start_obs, shape=(None, pred_model.obs_dim), dtypes=(torch.float32, torch.float64),
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
        act, logp = _policy_step(policy, obs, generator)
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
    act, logp = _policy_step(policy, obs, generator)
    weight = discount * alive
    q = critic.min_q(obs, act)
    total = total + weight * (q - alpha * logp)
    entropy_sum = entropy_sum + (weight * (-alpha * logp)).detach()
    neg_logp = neg_logp - logp.detach()
    info = {
        "return": total.detach().mean(),
        "model_reward": reward_sum.mean(),
        "terminal_value": (weight * q).detach().mean(),
        "alive": alive.mean(),
        "entropy": neg_logp.mean() / (horizon + 1),
        "entropy_term": entropy_sum.mean(),
    }
    return -total.mean(), info


@torch.no_grad()
def model_rollout(
    policy,
    model,
    start_obs: torch.Tensor,
    length: int,
    termination_fn: TerminationFn,
    generator: Optional[torch.Generator] = None,
    deterministic_model: bool = False,
    reward_fn: Optional[RewardFn] = None,
) -> Dict[str, torch.Tensor]:
    """MBPO branched rollout of ``length`` steps from ``start_obs[B, obs_dim]`` (no gradient).

    Each step samples ``a ~ policy(s)``, one random elite per sample and (unless
    ``deterministic_model``) the model's Gaussian, and records the transition of every sample
    still running; a sample stops after the step on which ``termination_fn(s, a, s')`` fires
    (that terminal transition is recorded with ``terminated = True``). The batch keeps its
    shape during the loop (finished rows are computed but not recorded), so the only host
    synchronisation is the final filtering.

    Returns:
        dict of detached tensors with ``M <= B * length`` rows, step-major (all step-0 rows,
        then step 1, ...): ``"obs" [M, obs_dim]``, ``"action" [M, act_dim]``, ``"reward" [M]``,
        ``"next_obs" [M, obs_dim]``, ``"terminated" [M]`` bool.
    """
    check_tensor("start_obs", start_obs, shape=(None, model.obs_dim), dtypes=(torch.float32, torch.float64),
                 what=f"[B, obs_dim={model.obs_dim}]")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    if not model.learn_reward and reward_fn is None:
        raise ValueError("reward_fn must be given when the model does not learn the reward")
    B = start_obs.shape[0]
    obs = start_obs
    running = torch.ones(B, dtype=torch.bool, device=obs.device)
    rows = {"obs": [], "action": [], "reward": [], "next_obs": [], "terminated": [], "valid": []}
    for _ in range(length):
        act, _ = _policy_step(policy, obs, generator)
        members = model.sample_elites(B, generator)
        next_obs, reward = model.predict(obs, act, members=members, deterministic=deterministic_model,
                                         generator=generator)
        if reward is None:
            reward = reward_fn(obs, act, next_obs)
        done = termination_fn(obs, act, next_obs).to(torch.bool)
        for key, value in (("obs", obs), ("action", act), ("reward", reward), ("next_obs", next_obs),
                           ("terminated", done), ("valid", running)):
            rows[key].append(value)
        running = running & ~done
        obs = next_obs
    valid = torch.cat(rows.pop("valid"))
    return {key: torch.cat(values)[valid].detach() for key, values in rows.items()}
