"""The grid of a sweep: parsing ``--grid`` / ``--set``, one validated trainer command line per
trial, trial names, and the sweep's record on disk (``DIR/.sweep/sweep.json``).

No Ray here: this module only needs the trainer's config (:mod:`fastrp.config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import os
import re
from typing import Dict, List, Sequence, Tuple

from fastrp.config import CliError, Config, parse_args

STATE_DIR = ".sweep"
"""Folder of ``DIR`` that holds the sweep's own files (the grid, Ray Tune's experiment state,
per-trial attempt records and trainer logs); every other folder of ``DIR`` is a run directory."""
SPEC_NAME = "sweep.json"
SPEC_VERSION = 1

RESERVED = {
    "logdir": "every trial's run directory is DIR/<trial name>",
    "run_name": "trials are named after their grid values",
    "resume": "use python -m fastrp.sweep --resume DIR",
    "cpu_threads": "each trial gets --cpu-threads equal to --cpus-per-trial",
    "device": "trials run on cuda when --gpus-per-trial > 0, else on cpu",
}
"""Config fields the sweep sets itself, with the reason (neither ``--set`` nor ``--grid`` may give them)."""

_RANGE = re.compile(r"^(\d+)-(\d+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


class SweepError(CliError):
    """A bad sweep command line or grid (one line on stderr, exit code 2)."""


@dataclasses.dataclass
class Trial:
    """One run of the grid: its directory name, its grid values (canonical, in grid order), the
    trainer's command line that starts it, and the env, seed and env steps it resolves to."""

    name: str
    values: Dict[str, object]
    argv: List[str]
    env: str
    seed: int
    steps: int


def _field_types() -> Dict[str, str]:
    return {f.name: (f.type if isinstance(f.type, str) else f.type.__name__) for f in dataclasses.fields(Config)}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _split(text: str, option: str) -> Tuple[str, str]:
    """``KEY=VALUE`` -> (field name, value text); the key may be written with - or _."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise SweepError(f"{option} {text!r}: expected KEY=VALUE")
    types = _field_types()
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SweepError(f"{option} {key}: unknown field{hint}; python -m fastrp.train --help lists the fields")
    if key in RESERVED:
        raise SweepError(f"{option} {key}: set by the sweep itself ({RESERVED[key]})")
    return key, value.strip()


def _expand(key: str, text: str) -> List[str]:
    """The values of ``--grid KEY=text``: comma-separated, an integer field also takes ranges
    ``A-B`` (both ends included)."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(item == "" for item in items):
        raise SweepError(f"--grid {key}={text}: empty value; expected {key}=V1,V2,... (or A-B for an integer field)")
    out: List[str] = []
    is_int = _field_types()[key] == "int"
    for item in items:
        match = _RANGE.match(item) if is_int else None
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise SweepError(f"--grid {key}={text}: empty range {item} (expected A-B with A <= B)")
            out.extend(str(v) for v in range(lo, hi + 1))
        else:
            out.append(item)
    return out


def _canonical(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def trial_name(values: Dict[str, object]) -> str:
    """Directory name of a trial: ``key=value`` for each grid field in grid order, comma-joined
    (characters other than letters, digits and ``._=,+-`` become ``_``)."""
    return _UNSAFE.sub("_", ",".join(f"{k}={_canonical(v)}" for k, v in values.items()))


def _resolve(argv: Sequence[str], context: str) -> Config:
    try:
        return parse_args(list(argv))
    except CliError as err:
        raise SweepError(f"{context}: {err}") from None


def build_trials(sets: Sequence[str], grids: Sequence[str], sweep_dir: str, cpus_per_trial: int,
                 gpus_per_trial: float) -> List[Trial]:
    """Every trial of the grid, each resolved and validated by the trainer's own config code
    before anything starts; raises :class:`SweepError` naming the first problem."""
    fixed: Dict[str, str] = {}
    for text in sets:
        key, value = _split(text, "--set")
        if key in fixed:
            raise SweepError(f"--set {key}: given twice")
        fixed[key] = value
    axes: Dict[str, List[str]] = {}
    for text in grids:
        key, value = _split(text, "--grid")
        if key in fixed:
            raise SweepError(f"--set {key} and --grid {key}: give a field either one value (--set) or a grid (--grid)")
        if key in axes:
            raise SweepError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2,...")
        axes[key] = _expand(key, value)
    if not axes:
        raise SweepError("nothing to sweep: give at least one --grid KEY=V1,V2,...")
    placement = ["--cpu-threads", str(cpus_per_trial), "--device", "cuda" if gpus_per_trial > 0 else "cpu"]
    base = [tok for key, value in fixed.items() for tok in (_flag(key), value)]
    _resolve(base + placement, "--set")
    # each value on its own first, so that a bad value is named as such
    canonical: Dict[str, List[object]] = {}
    for key, values in axes.items():
        seen: Dict[str, str] = {}
        canonical[key] = []
        for value in values:
            cfg = _resolve(base + placement + [_flag(key), value], f"--grid {key}={value}")
            canon = getattr(cfg, key)
            label = _canonical(canon)
            if label in seen:
                raise SweepError(f"--grid {key}: {seen[label]} and {value} are the same value")
            seen[label] = value
            canonical[key].append(canon)
    trials: List[Trial] = []
    for combo in itertools.product(*canonical.values()):
        values = dict(zip(axes, combo))
        name = trial_name(values)
        grid_args = [tok for key, value in values.items() for tok in (_flag(key), _canonical(value))]
        argv = base + grid_args + placement + ["--logdir", sweep_dir, "--run-name", name]
        cfg = _resolve(argv, f"--grid: trial {name}")
        trials.append(Trial(name, values, argv, cfg.env, cfg.seed, cfg.steps))
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SweepError(f"--grid: two trials would share the directory name {dup!r}")
    return trials


# ---- the sweep's record on disk ------------------------------------------------------------------
def state_dir(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, STATE_DIR)


def spec_path(sweep_dir: str) -> str:
    return os.path.join(state_dir(sweep_dir), SPEC_NAME)


def write_json_atomic(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def save_spec(sweep_dir: str, spec: Dict[str, object]) -> None:
    write_json_atomic(spec_path(sweep_dir), spec)


def load_spec(sweep_dir: str, option: str) -> Dict[str, object]:
    """The sweep's ``sweep.json``; :class:`SweepError` when ``sweep_dir`` holds no sweep."""
    path = spec_path(sweep_dir)
    if not os.path.isfile(path):
        raise SweepError(f"{option} {sweep_dir}: not a sweep directory (no {os.path.join(STATE_DIR, SPEC_NAME)})")
    try:
        with open(path) as fh:
            spec = json.load(fh)
    except ValueError as err:
        raise SweepError(f"{path}: unreadable ({err})") from None
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION:
        raise SweepError(f"{path}: not a sweep record of this fastrp version (version {SPEC_VERSION})")
    return spec


def record_path(sweep_dir: str, name: str) -> str:
    return os.path.join(state_dir(sweep_dir), "trials", f"{name}.json")


def log_path(sweep_dir: str, name: str) -> str:
    """The trial's trainer output, every attempt appended."""
    return os.path.join(state_dir(sweep_dir), "logs", f"{name}.log")


def read_record(sweep_dir: str, name: str) -> Dict[str, object]:
    """The trial's record: ``status`` (pending, running, done, diverged, failed) and ``attempts``
    (each with its start and end time, host, worker and trainer pid, whether it resumed from the
    run's checkpoint, the trainer's arguments and exit code)."""
    try:
        with open(record_path(sweep_dir, name)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return {"status": "pending", "attempts": []}


def trials_of(spec: Dict[str, object]) -> List[Trial]:
    return [Trial(**t) for t in spec["trials"]]  # type: ignore[arg-type]


def revalidate(trials: Sequence[Trial]) -> None:
    """Check every trial's command line against the installed trainer (a resumed sweep may run a
    newer fastrp than the one that started it)."""
    for t in trials:
        _resolve(t.argv, f"--resume: trial {t.name}")


def group_keys(spec: Dict[str, object]) -> List[str]:
    """The fields that split trials into groups of the summary: every grid field but ``seed``."""
    return [key for key, _ in spec["grid"] if key != "seed"]  # type: ignore[misc]

