"""The six algorithms as a table of parts.

Every algorithm is one :class:`fastrp.algos.agent.Agent` assembled from four choices (an
:class:`AlgoSpec`) plus the config values its papers fix (``preset``: updates per env step and
the spectral-norm flags):

========== ============= ================= ============== ===============================
algo       critic data   policy objective  policy states  models
========== ============= ================= ============== ===============================
sac        real          sac               real           none
mbpo       mixed         sac               mixed          prediction
maac       mixed         imagined          real           prediction
rp-sn      mixed         imagined          real           prediction (+ SN on policy/model)
ddppo      mixed         imagined          real           prediction + gradient
ddppo-sn   mixed         imagined          real           prediction + gradient (+ SN)
========== ============= ================= ============== ===============================

* critic data ``real``: minibatches of real transitions; ``mixed``: MBPO's ``real_ratio`` real
  rows, the rest from the model-rollout buffer.
* policy objective ``sac``: :func:`fastrp.algos.losses.sac_actor_loss`; ``imagined``: the H-step
  unroll through the prediction model of paper 003 eq. 11
  (:func:`fastrp.algos.losses.imagined_objective`), with gradients through the gradient model
  when there is one.
* policy states: where the policy objective's start states come from.
* models: ``prediction`` is the MBPO/DDPPO ensemble (NLL); ``gradient`` is DDPPO's second
  ensemble, fit with the NLL plus ``fd_weight`` x the directional-derivative loss.

This module is data only (it does not import torch), so the config can read the presets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Tuple

__all__ = ["AlgoSpec", "SPECS", "ALGORITHMS", "MODEL_BASED", "get"]


@dataclasses.dataclass(frozen=True)
class AlgoSpec:
    """The parts of one algorithm (see the module docstring)."""

    name: str
    critic_data: str        # "real" | "mixed"
    policy_objective: str   # "sac" | "imagined"
    policy_states: str      # "real" | "mixed"
    models: Tuple[str, ...]  # () | ("prediction",) | ("prediction", "gradient")
    preset: Dict[str, object]  # the algorithm's config values (the "algo" layer of fastrp.config)
    summary: str = ""

    @property
    def model_based(self) -> bool:
        return bool(self.models)

    @property
    def uses_model_buffer(self) -> bool:
        return self.critic_data == "mixed" or self.policy_states == "mixed"


# SAC runs 1 update per step (its paper); the model-based algorithms 10 + 10 (DDPPO Table 1: G1, G2).
# Spectral normalization per RP-PGM: the policy's hidden layers, all but the models' output layer.
_SN = dict(policy_spectral_norm=True, model_spectral_norm=True)
SPECS: Dict[str, AlgoSpec] = {spec.name: spec for spec in (
    AlgoSpec("sac", "real", "sac", "real", (), dict(policy_updates=1, critic_updates=1),
             "SAC on real data (model-free baseline)"),
    AlgoSpec("mbpo", "mixed", "sac", "mixed", ("prediction",), dict(policy_updates=10, critic_updates=10),
             "SAC on real + model-rollout data (MBPO)"),
    AlgoSpec("maac", "mixed", "imagined", "real", ("prediction",), dict(policy_updates=10, critic_updates=10),
             "H-step RP gradient through the prediction model (MAAC / RP-DP / SVG(H))"),
    AlgoSpec("rp-sn", "mixed", "imagined", "real", ("prediction",), dict(policy_updates=10, critic_updates=10, **_SN),
             "maac with spectral normalization (RP-PGM)"),
    AlgoSpec("ddppo", "mixed", "imagined", "real", ("prediction", "gradient"), dict(policy_updates=10, critic_updates=10),
             "values from the prediction model, gradients through the gradient model (DDPPO)"),
    AlgoSpec("ddppo-sn", "mixed", "imagined", "real", ("prediction", "gradient"),
             dict(policy_updates=10, critic_updates=10, **_SN), "ddppo with spectral normalization"),
)}

ALGORITHMS = tuple(SPECS)
MODEL_BASED = tuple(name for name, spec in SPECS.items() if spec.model_based)


def get(name: str):
    """A constructor ``(cfg, obs_dim, act_dim, action_low, action_high, device, termination=None)
    -> Agent`` for algorithm ``name`` (one of :data:`ALGORITHMS`)."""
    if name not in SPECS:
        raise ValueError(f"algo: unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    from fastrp.algos.agent import Agent

    return functools.partial(Agent, spec=SPECS[name])
