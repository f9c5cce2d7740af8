"""The six MuJoCo v5 tasks: names, parameters, and their observation / reward / termination maps.

Every map here is a batched numpy transcription of the matching ``gymnasium/envs/mujoco/*_v5.py``
method, written operation for operation in the same order so that results are bit-identical to
gymnasium's for the same physics state (``tests/test_envs.py`` checks this for every task).
Parameters (weights, healthy ranges, noise scales, observation switches) are read from the
gymnasium environment constructed with the caller's keyword arguments, so a kwarg that gymnasium
accepts changes fastrp's maps the same way.
"""

from __future__ import annotations

import inspect
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from ._physics import mujoco_warnings


# short name -> (gymnasium id, kwargs that select MBPO's truncated observation)
TASKS: Dict[str, Tuple[str, Dict[str, bool]]] = {
    "InvertedPendulum": ("InvertedPendulum-v5", {}),
    "Hopper": ("Hopper-v5", {}),
    "Walker2d": ("Walker2d-v5", {}),
    "HalfCheetah": ("HalfCheetah-v5", {}),
    "Ant": ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
    "Humanoid": (
        "Humanoid-v5",
        {
            "include_cinert_in_observation": False,
            "include_cvel_in_observation": False,
            "include_qfrc_actuator_in_observation": False,
            "include_cfrc_ext_in_observation": False,
        },
    ),
}

ENV_NAMES = tuple(TASKS)
ENV_IDS = tuple(env_id for env_id, _ in TASKS.values())

# Leading qpos entries an observation can exclude (x for planar tasks, x and y for Ant/Humanoid).
SKIPPED_QPOS = {"InvertedPendulum": 0, "Hopper": 1, "Walker2d": 1, "HalfCheetah": 1, "Ant": 2, "Humanoid": 2}
# Distribution of the reset noise added to init_qvel ("normal": scale * standard_normal).
_QVEL_NOISE = {"InvertedPendulum": "uniform", "Hopper": "uniform", "Walker2d": "uniform",
               "HalfCheetah": "normal", "Ant": "normal", "Humanoid": "uniform"}
# Observation velocities clipped to [-10, 10] by gymnasium.
_CLIP_QVEL = {"Hopper", "Walker2d"}
# gymnasium keyword arguments fastrp does not model (rendering only).
_RENDER_KWARGS = {"render_mode", "width", "height", "camera_id", "camera_name", "default_camera_config",
                  "max_geom", "visual_options"}


def resolve_name(name: str) -> str:
    """Short task name for a short name or a gymnasium id; ``ValueError`` listing the valid ones."""
    if isinstance(name, str):
        if name in TASKS:
            return name
        for short, (env_id, _) in TASKS.items():
            if name == env_id:
                return short
    raise ValueError(
        f"unknown environment {name!r}: expected one of {', '.join(ENV_NAMES)} "
        f"or the gymnasium ids {', '.join(ENV_IDS)}"
    )


def env_class(name: str):
    """The gymnasium environment class of a task (for its constructor defaults)."""
    import gymnasium

    entry = gymnasium.spec(TASKS[resolve_name(name)][0]).entry_point
    module, cls = entry.split(":")
    return getattr(__import__(module, fromlist=[cls]), cls)


def _constructor_params(name: str) -> Dict[str, inspect.Parameter]:
    """The gymnasium constructor's parameters of a task that fastrp models (rendering left out),
    with their annotations evaluated where gymnasium writes them as strings."""
    init = env_class(name).__init__
    try:
        signature = inspect.signature(init, eval_str=True)
    except Exception:  # an annotation this Python cannot evaluate: defaults still give the types
        signature = inspect.signature(init)
    return {p.name: p for p in signature.parameters.values()
            if p.name not in ("self", "kwargs") and p.name not in _RENDER_KWARGS}


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _kind(param: inspect.Parameter) -> Optional[str]:
    """What a constructor parameter takes: from its annotation, else from its default's type."""
    ann, default = param.annotation, param.default
    if ann is inspect.Parameter.empty or isinstance(ann, str):  # no usable annotation
        # an int default may stand for a float (Ant's forward_reward_weight) or a name (main_body)
        for kind, name in ((bool, "bool"), (float, "float"), (str, "str"), (tuple, "range")):
            if isinstance(default, kind):
                return name
        return None
    if typing.get_origin(ann) is tuple:
        return "range"
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and set(typing.get_args(ann)) == {int, str}:
        return "index or name"
    if ann in (bool, int, float, str):
        return ann.__name__
    return None


_EXPECTED = {
    "bool": "a bool",
    "int": "a positive int",
    "float": "a finite float",
    "str": "a path (str)",
    "index or name": "an int index or a str name",
    "range": "a (low, high) pair of floats, not NaN, with low <= high",
}


def _valid(kind: Optional[str], value) -> bool:
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if kind == "int":
        return _is_int(value) and value >= 1
    if kind == "float":
        return _is_real(value) and bool(np.isfinite(value))
    if kind == "str":
        return isinstance(value, (str, os.PathLike))
    if kind == "index or name":
        return _is_int(value) or isinstance(value, str)
    if kind == "range":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
            return False
        low, high = value[0], value[1]
        return _is_real(low) and _is_real(high) and bool(low <= high)  # False for NaN
    return True


def task_kwargs(name: str, full_obs: bool = False, **kwargs) -> Dict[str, object]:
    """Keyword arguments for the gymnasium constructor: MBPO's truncation unless ``full_obs``,
    then the caller's ``kwargs`` (which always win).

    Unknown or rendering kwargs, and values of the wrong type for the gymnasium constructor's
    parameter (judged by its annotation and default: a finite float for weights, a bool for
    switches, a ``(low, high)`` pair for ranges, where +-inf is allowed, ...) raise ValueError."""
    short = resolve_name(name)
    if not isinstance(full_obs, (bool, np.bool_)):
        raise ValueError(f"full_obs: expected a bool, got {full_obs!r}")
    params = _constructor_params(short)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(
            f"kwargs: {', '.join(unknown)} not accepted by {TASKS[short][0]}; "
            f"expected some of {', '.join(sorted(params))}"
        )
    for key, value in kwargs.items():
        kind = _kind(params[key])
        if not _valid(kind, value):
            raise ValueError(f"{key}: expected {_EXPECTED[kind]} ({TASKS[short][0]}), got {value!r}")
    out = {} if full_obs else dict(TASKS[short][1])
    out.update(kwargs)
    return out


def task_params(name: str, full_obs: bool = False, **kwargs) -> Dict[str, object]:
    """All constructor parameters of a task (gymnasium defaults, then MBPO truncation, then kwargs)."""
    short = resolve_name(name)
    params = {p.name: p.default for p in _constructor_params(short).values()
              if p.default is not inspect.Parameter.empty}
    params.update(task_kwargs(short, full_obs, **kwargs))
    return params


@dataclass
class Task:
    """One configured task: its MuJoCo model and the batched maps of its gymnasium v5 env.

    Built from the unwrapped gymnasium env so that the model (XML, frame_skip, options) and
    every parameter are exactly gymnasium's.
    """

    name: str
    env_id: str
    kwargs: Dict[str, object]
    model: object
    frame_skip: int
    dt: float
    init_qpos: np.ndarray
    init_qvel: np.ndarray
    reset_noise_scale: float
    max_episode_steps: Optional[int]
    observation_space: object
    action_space: object
    gym_env: object  # the unwrapped gymnasium env, for its private parameters

    @classmethod
    def build(cls, name: str, full_obs: bool = False, **kwargs) -> "Task":
        import gymnasium

        short = resolve_name(name)
        env_id = TASKS[short][0]
        resolved = task_kwargs(short, full_obs, **kwargs)
        try:
            with mujoco_warnings():
                env = gymnasium.make(env_id, **resolved)
        except TypeError as exc:  # gymnasium rejects a value
            raise ValueError(f"kwargs: {exc}") from exc
        except OSError as exc:  # gymnasium's MujocoEnv: the XML file does not exist
            raise ValueError(f"xml_file: expected an existing MuJoCo XML file, got {resolved.get('xml_file')!r} "
                             f"({exc})") from exc
        raw = env.unwrapped
        if short == "Ant":  # gymnasium looks the body up only when stepping
            try:
                raw.model.body(raw._main_body)
            except (KeyError, IndexError) as exc:
                raise ValueError(f"main_body: expected a body name or index of the model "
                                 f"(0 to {raw.model.nbody - 1}), got {raw._main_body!r}") from exc
        return cls(
            name=short,
            env_id=env_id,
            kwargs=resolved,
            model=raw.model,
            frame_skip=int(raw.frame_skip),
            dt=float(raw.dt),
            init_qpos=raw.init_qpos.copy(),
            init_qvel=raw.init_qvel.copy(),
            reset_noise_scale=float(raw._reset_noise_scale),
            max_episode_steps=env.spec.max_episode_steps if env.spec is not None else None,
            observation_space=raw.observation_space,
            action_space=raw.action_space,
            gym_env=raw,
        )

    # ---- structure --------------------------------------------------------------------------
    @property
    def skipped_qpos(self) -> int:
        """qpos entries left out of the observation (0 when positions are included)."""
        if self.name == "InvertedPendulum" or not self.gym_env._exclude_current_positions_from_observation:
            return 0
        return SKIPPED_QPOS[self.name]

    @property
    def needs_cfrc_ext(self) -> bool:
        """Whether rewards or observations read ``cfrc_ext`` (computed after each step)."""
        return self.name in ("Ant", "Humanoid")

    @property
    def obs_reads_cfrc_ext(self) -> bool:
        """Whether observations contain contact forces (Ant/Humanoid with full observations)."""
        return self.needs_cfrc_ext and bool(self.gym_env._include_cfrc_ext_in_observation)

    @property
    def derived_fields(self) -> Tuple[str, ...]:
        """MjData outputs (besides qpos/qvel/cfrc_ext) that rewards or observations read."""
        if self.name == "Ant":
            return ("xpos",)
        if self.name == "Humanoid":
            p = self.gym_env
            extra = [
                field
                for field, flag in (
                    ("cinert", p._include_cinert_in_observation),
                    ("cvel", p._include_cvel_in_observation),
                    ("qfrc_actuator", p._include_qfrc_actuator_in_observation),
                )
                if flag
            ]
            return ("xipos", *extra)
        return ()

    def obs_state_index(self) -> Tuple[np.ndarray, np.ndarray]:
        """For each observation entry: ``(kind, index)`` with kind 0 = qpos, 1 = qvel, 2 = derived
        (contact forces, inertias, ...), and index the qpos/qvel entry it reads (-1 for derived)."""
        nq, nv = self.model.nq, self.model.nv
        skip = self.skipped_qpos
        dim = self.observation_space.shape[0]
        kind = np.full(dim, 2, dtype=np.int64)
        index = np.full(dim, -1, dtype=np.int64)
        npos = nq - skip
        kind[:npos] = 0
        index[:npos] = np.arange(skip, nq)
        kind[npos:npos + nv] = 1
        index[npos:npos + nv] = np.arange(nv)
        return kind, index

    # ---- reset noise ------------------------------------------------------------------------
    def reset_state(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """One env's reset ``(qpos, qvel)`` drawn from ``rng`` exactly as ``reset_model`` does."""
        scale = self.reset_noise_scale
        qpos = self.init_qpos + rng.uniform(low=-scale, high=scale, size=self.model.nq)
        if _QVEL_NOISE[self.name] == "normal":
            qvel = self.init_qvel + scale * rng.standard_normal(self.model.nv)
        else:
            qvel = self.init_qvel + rng.uniform(low=-scale, high=scale, size=self.model.nv)
        return qpos, qvel

    # ---- batched maps -----------------------------------------------------------------------
    def observe(self, qpos: np.ndarray, qvel: np.ndarray, derived: Dict[str, np.ndarray]) -> np.ndarray:
        """Observations ``[n, obs_dim]`` float64 from ``qpos [n, nq]``, ``qvel [n, nv]`` and the
        derived fields (``cfrc_ext [n, nbody, 6]``, ``cinert``, ...) of the same envs."""
        n = qpos.shape[0]
        vel = np.clip(qvel, -10, 10) if self.name in _CLIP_QVEL else qvel
        parts = [qpos[:, self.skipped_qpos:], vel]
        p = self.gym_env
        if self.name == "Ant" and p._include_cfrc_ext_in_observation:
            lo, hi = p._contact_force_range
            parts.append(np.clip(derived["cfrc_ext"], lo, hi)[:, 1:].reshape(n, -1))
        elif self.name == "Humanoid":
            for field, flag, start in (
                ("cinert", p._include_cinert_in_observation, 1),
                ("cvel", p._include_cvel_in_observation, 1),
                ("qfrc_actuator", p._include_qfrc_actuator_in_observation, 6),
                ("cfrc_ext", p._include_cfrc_ext_in_observation, 1),
            ):
                if flag:
                    parts.append(derived[field][:, start:].reshape(n, -1))
        return np.concatenate(parts, axis=1)

    def position(self, qpos: np.ndarray, derived: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        """The position whose change rewards forward motion: ``[n]`` x or ``[n, 2]`` xy (copied)."""
        if self.name in ("Hopper", "Walker2d", "HalfCheetah"):
            return qpos[:, 0].copy()
        if self.name == "Ant":
            body = self.model.body(self.gym_env._main_body).id
            return derived["xpos"][:, body, :2].copy()
        if self.name == "Humanoid":
            mass = self.model.body_mass
            return (np.einsum("b,nbj->nj", mass, derived["xipos"]) / mass.sum())[:, 0:2].copy()
        return None

    def healthy(self, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
        """``is_healthy`` of each env, ``[n]`` bool."""
        p = self.gym_env
        if self.name == "Hopper":
            z, angle = qpos[:, 1], qpos[:, 2]
            state = np.concatenate([qpos, qvel], axis=1)[:, 2:]
            lo, hi = p._healthy_state_range
            zlo, zhi = p._healthy_z_range
            alo, ahi = p._healthy_angle_range
            ok_state = np.all(np.logical_and(lo < state, state < hi), axis=1)
            return ok_state & (zlo < z) & (z < zhi) & (alo < angle) & (angle < ahi)
        if self.name == "Walker2d":
            z, angle = qpos[:, 1], qpos[:, 2]
            zlo, zhi = p._healthy_z_range
            alo, ahi = p._healthy_angle_range
            return (zlo < z) & (z < zhi) & (alo < angle) & (angle < ahi)
        if self.name == "Ant":
            zlo, zhi = p._healthy_z_range
            finite = np.isfinite(qpos).all(axis=1) & np.isfinite(qvel).all(axis=1)
            return finite & (zlo <= qpos[:, 2]) & (qpos[:, 2] <= zhi)
        if self.name == "Humanoid":
            zlo, zhi = p._healthy_z_range
            return (zlo < qpos[:, 2]) & (qpos[:, 2] < zhi)
        return np.ones(qpos.shape[0], dtype=bool)

    def reward_terminated(
        self,
        before: Optional[np.ndarray],
        qpos: np.ndarray,
        qvel: np.ndarray,
        obs: np.ndarray,
        derived: Dict[str, np.ndarray],
        action: np.ndarray,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(reward [n] float64, terminated [n] bool)`` of a step, as the v5 ``step`` computes
        them; ``before`` is :meth:`position` before the step, ``action`` the actions as given."""
        p = self.gym_env
        n = qpos.shape[0]
        if self.name == "InvertedPendulum":
            terminated = ~np.isfinite(obs).all(axis=1) | (np.abs(obs[:, 1]) > 0.2)
            return (~terminated).astype(np.float64), terminated
        ctrl_cost = p._ctrl_cost_weight * np.sum(np.square(action), axis=1)
        if self.name == "HalfCheetah":
            x_velocity = (qpos[:, 0] - before) / self.dt
            forward_reward = p._forward_reward_weight * x_velocity
            return (forward_reward - ctrl_cost).astype(np.float64), np.zeros(n, dtype=bool)
        healthy = self.healthy(qpos, qvel)
        healthy_reward = healthy * p._healthy_reward
        if self.name in ("Hopper", "Walker2d"):
            x_velocity = (qpos[:, 0] - before) / self.dt
            forward_reward = p._forward_reward_weight * x_velocity
            costs = ctrl_cost
        elif self.name == "Ant":
            xy_velocity = (derived["xpos"][:, self.model.body(p._main_body).id, :2] - before) / self.dt
            forward_reward = xy_velocity[:, 0] * p._forward_reward_weight
            lo, hi = p._contact_force_range
            forces = np.clip(derived["cfrc_ext"], lo, hi).reshape(n, -1)
            costs = ctrl_cost + p._contact_cost_weight * np.sum(np.square(forces), axis=1)
        else:  # Humanoid: control cost on data.ctrl (float64), clipped contact cost
            ctrl_cost = p._ctrl_cost_weight * np.sum(np.square(action.astype(np.float64)), axis=1)
            xy_velocity = (self.position(qpos, derived) - before) / self.dt
            forward_reward = p._forward_reward_weight * xy_velocity[:, 0]
            contact = p._contact_cost_weight * np.sum(np.square(derived["cfrc_ext"].reshape(n, -1)), axis=1)
            lo, hi = p._contact_cost_range
            costs = ctrl_cost + np.clip(contact, lo, hi)
        rewards = forward_reward + healthy_reward
        reward = (rewards - costs).astype(np.float64)
        terminated = ~healthy & bool(p._terminate_when_unhealthy)
        return reward, terminated
