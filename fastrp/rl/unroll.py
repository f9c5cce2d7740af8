"""MBPO's branched model rollouts for the model replay buffer (:func:`model_rollout`).

The H-step policy objective through a model (paper 003 eq. 11) is
:func:`fastrp.algos.losses.imagined_objective`. ``model_rollout`` does not synchronise with the
host inside its step loop; it filters the finished rows once at the end.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from fastrp.algos.losses import sample_policy
from fastrp.ops._common import check_tensor

__all__ = ["model_rollout"]

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
        act, _ = sample_policy(policy, obs, generator)
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
