"""Model bias of the imagined objective: the H-step value the policy maximises, computed through
the learned model and through the real simulator from the same states with the same policy noise.

The policy's objective (paper 003 eq. 11, :func:`fastrp.algos.losses.imagined_objective`) is

    ``J = sum_{t<H} gamma^t alive_t (r_t - alpha logp_t) + gamma^H alive_H (min Q(s_H, a_H) - alpha logp_H)``

with ``s_{t+1}, r_t`` from the prediction model. :func:`imagined_vs_real` evaluates the same
expression twice from on-policy states ``s_0`` of fresh copies of the task: once with the model
(as training does, the model's means and one random elite per sample) and once with MuJoCo
stepping the very states that produced ``s_0`` (:class:`RealDynamics`). Both passes draw the
policy noise from generators seeded alike, and the real pass draws the same elite indices (unused)
so that the two random streams stay aligned: at ``H = 0`` the two values are equal, and for
``H >= 1`` their difference is the model's bias in what the policy optimises, split into the
reward part and the terminal-value part.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from fastrp.algos import losses
from fastrp.algos.common import frozen_modules


class RealDynamics:
    """The simulator as a stand-in for a :class:`~fastrp.nn.model.ProbabilisticEnsemble` in
    :func:`~fastrp.algos.losses.imagined_objective`: ``predict(obs, act)`` steps ``env`` (a
    :class:`~fastrp.envs.MujocoVectorEnv` whose current observations are ``obs``) with ``act``
    and returns the reached observations and rewards. ``sample_elites`` draws what ``model``'s
    would (and returns ``model``'s indices, which the simulator ignores), so that a generator
    shared with the policy stays aligned with a pass through ``model``."""

    learn_reward = True

    def __init__(self, env, model):
        self.env, self.model = env, model
        self.obs_dim, self.ensemble_size = env.obs_dim, model.ensemble_size
        self.finished = np.zeros(env.num_envs, dtype=bool)  # episodes that ended (and were reset) since

    def sample_elites(self, batch_size: int, generator=None) -> torch.Tensor:
        return self.model.sample_elites(batch_size, generator)

    def predict(self, obs: torch.Tensor, act: torch.Tensor, members=None, deterministic=True, noise=None):
        # rows whose episode ended were reset by the env: their later steps are masked by alive
        current = torch.as_tensor(self.env.obs, dtype=obs.dtype, device=obs.device)
        live = torch.as_tensor(~self.finished, device=obs.device)
        if obs.shape != current.shape or not torch.equal(obs[live], current[live]):
            raise ValueError("RealDynamics.predict: obs must be the env's current observations")
        tr = self.env.step_transition(act.detach().cpu().numpy().astype(np.float64))
        self.finished |= np.asarray(tr.terminated, dtype=bool) | np.asarray(tr.truncated, dtype=bool)
        as_t = lambda x: torch.as_tensor(np.asarray(x), dtype=obs.dtype, device=obs.device)  # noqa: E731
        return as_t(tr.next_obs), as_t(tr.reward)


@torch.no_grad()
def imagined_vs_real(agent, env, horizon: int, seed: int, warmup_steps: int = 100) -> Dict[str, float]:
    """The imagined objective of ``agent`` (policy, prediction model, critic, temperature,
    termination function) through its model and through the simulator, from the same states.

    ``env`` is a fresh :class:`~fastrp.envs.MujocoVectorEnv` (``N`` copies of the run's task);
    it is reset with ``seed`` and run ``warmup_steps`` steps of the current stochastic policy, so
    that the start states are states the policy visits; its ``N`` observations then start both
    passes. ``warmup_steps + horizon`` must stay below the task's time limit (an episode that is
    truncated inside the window would restart the real pass). Returns the means over the ``N``
    states: ``model_return`` / ``real_return`` (``J``), ``model_reward`` / ``real_reward`` (the
    discounted masked reward sum), ``model_terminal`` / ``real_terminal`` (``gamma^H alive_H min
    Q``), ``model_alive`` / ``real_alive``; per state: ``rms_error`` (root mean square of ``J``'s
    model - real difference), ``real_spread`` (the standard deviation of the real ``J`` over the
    states, the scale ``rms_error`` compares with) and ``correlation`` (Pearson's, of the model's
    and the real ``J`` over the states); and ``states`` (``N``).
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
        raise ValueError(f"horizon must be an int >= 0, got {horizon!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    limit = env.max_episode_steps
    if limit is not None and warmup_steps + horizon >= limit:
        raise ValueError(f"warmup_steps + horizon must be < the time limit {limit}, got {warmup_steps + horizon}")
    model = agent.model
    device = model.elite_idx.device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    env.reset(seed=int(seed) % (2 ** 31))
    out: Dict[str, float] = {}
    values = {}
    with frozen_modules([agent.policy, model, agent.critic]):
        for _ in range(warmup_steps):
            obs = torch.as_tensor(env.obs, dtype=torch.float32, device=device)
            action, _ = losses.sample_policy(agent.policy, obs, gen)
            env.step(action.cpu().numpy().astype(np.float64))
        start = torch.as_tensor(env.obs, dtype=torch.float32, device=device)
        pass_seed = int(torch.randint(2 ** 62, (1,), generator=gen, device=device))
        for name, dynamics in (("model", model), ("real", RealDynamics(env, model))):
            g = torch.Generator(device=device)
            g.manual_seed(pass_seed)
            _, info = losses.imagined_objective(agent.policy, dynamics, agent.critic, start, horizon, agent.cfg.gamma,
                                                agent.alpha, agent.termination, generator=g)
            out[f"{name}_return"] = float(info["return"])
            out[f"{name}_reward"] = float(info["model_reward"])
            out[f"{name}_terminal"] = float(info["terminal_value"])
            out[f"{name}_alive"] = float(info["alive"])
            values[name] = info["return_per_sample"].double()
    diff = values["model"] - values["real"]
    out["rms_error"] = float(diff.square().mean().sqrt())
    out["real_spread"] = float(values["real"].std(unbiased=False))
    centred = [v - v.mean() for v in (values["model"], values["real"])]
    denom = float(centred[0].norm() * centred[1].norm())
    out["correlation"] = float((centred[0] * centred[1]).sum()) / denom if denom > 0 else float("nan")
    out["states"] = int(start.shape[0])
    return out
