"""Algorithm registry: ``--algo`` name -> agent class.

Classes are imported on first use so that ``sac`` does not need the model-based modules.
"""

from __future__ import annotations

import importlib

_REGISTRY = {
    "sac": ("fastrp.algos.sac", "SAC"),
    "mbpo": ("fastrp.algos.mbpo", "MBPO"),
    "maac": ("fastrp.algos.maac", "MAAC"),
    "rp-sn": ("fastrp.algos.maac", "MAAC"),
    "ddppo": ("fastrp.algos.ddppo", "DDPPO"),
    "ddppo-sn": ("fastrp.algos.ddppo", "DDPPO"),
}
"""``rp-sn`` and ``ddppo-sn`` are ``maac`` and ``ddppo`` with the spectral-norm flags set by their
presets (``fastrp.config.ALGO_PRESETS``)."""

ALGORITHMS = tuple(_REGISTRY)


def get(name: str):
    """The agent class of algorithm ``name`` (one of :data:`ALGORITHMS`)."""
    if name not in _REGISTRY:
        raise ValueError(f"algo: unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)
