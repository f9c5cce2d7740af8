"""Atomic checkpoints, RNG state capture and environment state capture for exact resumes."""

from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save`` to ``path + ".tmp"``, flush it to disk, then ``os.replace`` onto ``path``: a
    crash at any moment leaves either the previous checkpoint or the new one, never a torn file;
    a failed write removes its temporary file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, read-only directory, interrupt: no partial file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path: str) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> Dict[str, Any]:
    """The global RNG states of python, numpy and torch (and CUDA when initialised)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
