"""Batched torch termination functions, one per task, for rollouts of a learned model.

``termination_fn(name, **env_kwargs)`` returns ``fn(obs, action, next_obs) -> terminated``:
``obs [..., obs_dim]``, ``action [..., act_dim]``, ``next_obs [..., obs_dim]`` tensors on any device
and of any float dtype; the result is a bool tensor ``[...]`` on the same device.  Only
``next_obs`` decides (the v5 envs judge the state the step reached); ``obs`` and ``action`` are
accepted so that every task has the same signature.  An ``obs`` or ``next_obs`` whose last
dimension is not the task's observation width raises ``ValueError``: a check of static shapes
only (no device sync, no branch on values), so the function stays ``torch.compile``-able with
``fullgraph=True``.

Each function is the v5 env's ``terminated`` written on observations, with the same (strict or
inclusive) comparisons and the parameters the env would use for the same kwargs
(``healthy_z_range``, ``terminate_when_unhealthy``, ``exclude_current_positions_from_observation``,
...).  What an observation cannot show is not judged: the excluded x (and y) positions, and for
Hopper the velocities beyond the observation's clip at +-10 (Hopper's ``healthy_state_range``
+-100 on them can then not fail; a NaN still terminates).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from ._tasks import SKIPPED_QPOS, Task, resolve_name, task_params

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_ANT_NQ, _ANT_NV = 15, 14  # ant.xml: free joint (7 qpos, 6 qvel) and 8 hinges


def _qpos_column(name: str, params: dict, k: int) -> int:
    """Observation column holding ``qpos[k]``."""
    if params.get("exclude_current_positions_from_observation", False):
        return k - SKIPPED_QPOS[name]
    return k


def _never(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


def _width_checked(fn: TerminationFn, obs_dim: int, task: str) -> TerminationFn:
    """``fn`` behind a check of the observations' last dimension (shapes only: compile-friendly)."""

    @functools.wraps(fn)
    def terminated(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        for arg, x in (("obs", obs), ("next_obs", next_obs)):
            if x.dim() == 0 or x.shape[-1] != obs_dim:
                raise ValueError(f"{arg}: expected shape [..., {obs_dim}] ({task} observations), "
                                 f"got {list(x.shape)}")
        return fn(obs, action, next_obs)

    return terminated


def termination_fn(name: str, full_obs: bool = False, **kwargs) -> TerminationFn:
    """The torch termination function of task ``name`` (short name or gymnasium id) configured
    like ``make(name, full_obs=full_obs, **kwargs)``; see the module docstring for its contract."""
    short = resolve_name(name)
    obs_dim = int(Task.build(short, full_obs, **kwargs).observation_space.shape[0])
    return _width_checked(_termination(short, task_params(short, full_obs, **kwargs)), obs_dim, short)


def _termination(short: str, params: dict) -> TerminationFn:
    """The unchecked termination function of task ``short`` with constructor parameters ``params``."""
    if short == "HalfCheetah" or (short != "InvertedPendulum" and not params["terminate_when_unhealthy"]):
        return _never

    if short == "InvertedPendulum":
        def inverted_pendulum(obs, action, next_obs):
            finite = torch.isfinite(next_obs).all(dim=-1)
            return ~finite | (next_obs[..., 1].abs() > 0.2)

        return inverted_pendulum

    z_col = _qpos_column(short, params, 1 if short in ("Hopper", "Walker2d") else 2)
    zlo, zhi = (float(v) for v in params["healthy_z_range"])

    if short == "Hopper":
        slo, shi = (float(v) for v in params["healthy_state_range"])
        alo, ahi = (float(v) for v in params["healthy_angle_range"])

        def hopper(obs, action, next_obs):
            z, angle = next_obs[..., z_col], next_obs[..., z_col + 1]
            state = next_obs[..., z_col + 1:]  # qpos[2:] and the (clipped) velocities
            healthy = ((slo < state) & (state < shi)).all(dim=-1)
            healthy = healthy & (zlo < z) & (z < zhi) & (alo < angle) & (angle < ahi)
            return ~healthy

        return hopper

    if short == "Walker2d":
        alo, ahi = (float(v) for v in params["healthy_angle_range"])

        def walker2d(obs, action, next_obs):
            z, angle = next_obs[..., z_col], next_obs[..., z_col + 1]
            return ~((zlo < z) & (z < zhi) & (alo < angle) & (angle < ahi))

        return walker2d

    if short == "Ant":
        skipped = 2 - z_col
        state_dim = _ANT_NQ - skipped + _ANT_NV  # the qpos and qvel entries of the observation

        def ant(obs, action, next_obs):
            z = next_obs[..., z_col]
            finite = torch.isfinite(next_obs[..., :state_dim]).all(dim=-1)
            return ~(finite & (zlo <= z) & (z <= zhi))

        return ant

    def humanoid(obs, action, next_obs):
        z = next_obs[..., z_col]
        return ~((zlo < z) & (z < zhi))

    return humanoid
