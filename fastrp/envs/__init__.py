"""Vectorized MuJoCo v5 environments for model-based RL.

* :func:`make` / :class:`MujocoVectorEnv` - N copies of a task stepped on MuJoCo's C++ thread pool,
  equal to gymnasium's ``env.step`` for the same state and actions, with same-step autoreset that
  keeps the true final observation (``info["next_obs"]``, :meth:`MujocoVectorEnv.step_transition`).
* :func:`make_single` - one copy as a plain ``gymnasium.Env``.
* :func:`termination_fn` - batched torch termination functions for model rollouts.
* :func:`dynamics_jacobians` - true-dynamics Jacobians ``d next_obs / d obs`` and
  ``d next_obs / d action`` in observation coordinates.
"""

from ._tasks import ENV_IDS, ENV_NAMES
from .jacobian import Jacobians, dynamics_jacobians
from .termination import termination_fn
from .vector import MujocoSingleEnv, MujocoVectorEnv, Transition, make, make_single

__all__ = [
    "ENV_IDS",
    "ENV_NAMES",
    "Jacobians",
    "MujocoSingleEnv",
    "MujocoVectorEnv",
    "Transition",
    "dynamics_jacobians",
    "make",
    "make_single",
    "termination_fn",
]
