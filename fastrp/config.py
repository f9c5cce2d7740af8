"""Typed trainer configuration, the presets as data, the CLI parser built from them, and where
each resolved value came from.

Precedence, lowest first: the :class:`Config` defaults; the algorithm layer (``ALGO_PRESETS[algo]``,
from the algorithm table :data:`fastrp.algos.SPECS`: updates per env step and spectral-norm
flags); the env layer (``ENV_PRESETS[env]``: only what the papers tie to the task - H, n, w, the
rollout-length schedule, warm-up and run length); the size layer (``SIZE_PRESETS[preset]``: network
and update sizes for a machine - ``paper`` (none), ``cpu``, ``tiny``; a size preset may have
entries for one algorithm or one env); then every flag given on the command line.
``--preset auto`` (the default) picks ``paper`` when training on CUDA and ``cpu`` otherwise.

:func:`resolve` returns the config and, per field, where its value came from; the run
directory's ``config.json`` holds both (``"sources"``), and ``--help`` lists every preset value
of each flag. Each field's docstring (read from this file's source) is its ``--help`` text.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from fastrp.algos import ALGORITHMS, SPECS

ALGOS = ALGORITHMS
DEVICES = ("auto", "cpu", "cuda")
ENV_NAMES = ("InvertedPendulum", "Hopper", "Walker2d", "HalfCheetah", "Ant", "Humanoid")
PRESETS = ("auto", "paper", "cpu", "tiny")
PRECISIONS = ("ieee", "tf32", "tf32x3")
"""Matmul input precisions of the fused ops (``fastrp.ops``' ``precision=``)."""
MAX_SEED = 2 ** 32 - 1 - 10_000
"""Largest seed: numpy and gymnasium take 32-bit seeds, and evaluation uses ``seed + 10_000``."""


@dataclass
class Config:
    # ---- run -------------------------------------------------------------------------------------
    env: str = "HalfCheetah"
    """Task: InvertedPendulum, Hopper, Walker2d, HalfCheetah, Ant or Humanoid (gymnasium v5)."""
    algo: str = "ddppo-sn"
    """Algorithm: sac, mbpo, maac (RP-DP / SVG(H)), rp-sn (maac + spectral norm), ddppo, ddppo-sn."""
    preset: str = "auto"
    """Size preset on top of the algorithm and env presets: paper (the papers' sizes), cpu (sized for a CPU), tiny (tests), or auto (paper when training on CUDA, cpu otherwise)."""
    seed: int = 0
    """Seed of torch, numpy, python and the environments."""
    steps: int = 100_000
    """Total environment steps of the run (a resumed run continues up to this count)."""
    warmup_steps: int = 5000
    """Environment steps with uniformly random actions before any update."""
    device: str = "auto"
    """Training device: auto (cuda when available), cpu or cuda."""
    logdir: str = "runs"
    """Parent folder of the run directories."""
    run_name: str = ""
    """Run directory name under logdir (empty: <env>_<algo>_s<seed>_<time>)."""
    resume: str = ""
    """Continue the run in this run directory from its last checkpoint (its config is reused; --steps may be raised)."""
    eval_every: int = 5000
    """Evaluate the deterministic policy every this many env steps (and at the end); each evaluation writes a metrics row."""
    eval_episodes: int = 5
    """Episodes per evaluation."""
    log_every: int = 1000
    """Write a metrics row every this many env steps (host reads the device-side metrics only here)."""
    checkpoint_every: int = 10_000
    """Checkpoint every this many env steps; the end of a run, an interrupt and every checkpoint_minutes of wall time are checkpointed too."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint when this many minutes of wall time have passed since the last checkpoint (0 = only by env steps)."""
    max_bad_intervals: int = 3
    """Stop the run after this many consecutive log intervals in which most updates were non-finite and skipped."""
    cpu_threads: int = 1
    """torch intra-op threads (small networks run fastest on one thread; MuJoCo has its own pool)."""
    progress: bool = True
    """Print a live progress line on stderr."""
    compile: bool = False
    """torch.compile the update closures (critic step; policy + temperature step, with the model unroll)."""
    cuda_graphs: bool = False
    """Capture the compiled update closures in CUDA graphs (mode=reduce-overhead; needs --compile and CUDA)."""
    precision: str = "ieee"
    """Matmul input precision of the fused network kernels on CUDA: ieee (exact float32 products), tf32 (tensor cores, inputs rounded to a 10-bit mantissa, about 1e-3 relative error per layer) or tf32x3 (three TF32 products, about float32 accuracy). Policy, critics and both models; no effect on CPU, where the networks run torch matmuls in float32."""
    # ---- SAC ---------------------------------------------------------------------------------------
    batch_size: int = 256
    """Minibatch size of the critic and policy updates."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critic."""
    actor_lr: float = 3e-4
    """Policy learning rate (Adam)."""
    critic_lr: float = 3e-4
    """Twin-Q learning rate (Adam)."""
    alpha_lr: float = 3e-4
    """Temperature learning rate (Adam on log alpha)."""
    init_alpha: float = 1.0
    """Initial entropy temperature."""
    target_entropy_scale: float = 1.0
    """Target entropy is -target_entropy_scale * act_dim."""
    hidden_dim: int = 256
    """Width of the policy and Q hidden layers."""
    num_layers: int = 2
    """Hidden layers of the policy and Q networks."""
    policy_updates: int = 1
    """Policy (and temperature) updates per env step (G1 of DDPPO's Table 1)."""
    critic_updates: int = 1
    """Critic updates per env step (G2 of DDPPO's Table 1)."""
    obs_norm: bool = True
    """Normalise the observations the policy and critic see by running mean / std over every real observation (std clipped to [0.1, 10]; RP-PGM)."""
    policy_spectral_norm: bool = False
    """Spectral normalization on the policy (its layers: policy_sn_layers)."""
    policy_sn_layers: str = "hidden"
    """Policy layers spectral normalization covers: hidden (RP-PGM's code: all but the output layer) or all (paper 000's text)."""
    # ---- models ------------------------------------------------------------------------------------
    ensemble_size: int = 7
    """Members of the prediction (and gradient) ensemble."""
    num_elites: int = 5
    """Elite members (lowest holdout loss) used for rollouts."""
    model_hidden_dim: int = 200
    """Width of the model's hidden layers."""
    model_num_layers: int = 4
    """Hidden layers of the model (SiLU)."""
    model_lr: float = 1e-3
    """Model learning rate (Adam)."""
    model_batch_size: int = 256
    """Model training minibatch size."""
    model_train_every: int = 250
    """Retrain the model(s) every this many env steps."""
    model_holdout: float = 0.2
    """Fraction of the data held out to rank elites and stop early."""
    model_max_epochs: int = 20
    """Cap on model epochs per retraining (early stopping usually ends sooner)."""
    model_max_steps: int = 0
    """Cap on gradient steps per model refit (0 = no cap; for CPU-sized presets)."""
    model_patience: int = 5
    """Early stopping: epochs without a 1% holdout improvement before stopping."""
    model_spectral_norm: bool = False
    """Spectral normalization on all but the output layer of the model(s) (RP-PGM's placement)."""
    model_target_norm: bool = False
    """The model(s) predict standardised targets (per-output mean / std of the training rows, refit every model fit) instead of raw units (MBPO)."""
    rollout_batch_size: int = 10_000
    """Start states per model rollout (MBPO's model buffer)."""
    rollout_min_len: int = 1
    """Rollout length before rollout_min_epoch (MBPO schedule; an epoch is 1000 env steps)."""
    rollout_max_len: int = 1
    """Rollout length after rollout_max_epoch (linear in between)."""
    rollout_min_epoch: int = 20
    """Epoch at which the rollout length starts growing."""
    rollout_max_epoch: int = 100
    """Epoch at which the rollout length reaches rollout_max_len."""
    model_retain_epochs: int = 1
    """Model buffer keeps the rollouts of this many epochs."""
    real_ratio: float = 0.05
    """Fraction of real transitions in a critic minibatch (the rest from the model buffer)."""
    horizon: int = 3
    """H: model steps of the policy objective's unroll (paper 003 eq. 11; DDPPO's --H 4 is 3); 0 is SAC's actor loss on real states."""
    fd_k: int = 10
    """n: neighbours (directional derivatives) per point in the gradient-model loss."""
    fd_weight: float = 1.0
    """w: weight of the directional-derivative loss of the gradient model."""
    fd_window: int = 10_000
    """Neighbours are searched among the latest this many transitions."""
    fd_batch_size: int = 256
    """Query points of the directional-derivative loss per gradient-model step (each brings fd_k tangents)."""
    # ---- diagnostics -------------------------------------------------------------------------------
    diag_every: int = 10_000
    """Run the gradient diagnostics (fastrp.diagnostics) every this many env steps after warm-up (at the first log row at or past each multiple), rows in <run_dir>/diagnostics.csv (0 = off)."""
    diag_states: int = 1024
    """Gradient variance: real start states drawn once per pass from the replay buffer (the fixed pool)."""
    diag_batch: int = 64
    """Gradient variance: start states per minibatch (drawn with replacement from the pool)."""
    diag_samples: int = 10
    """Gradient variance: independent minibatch gradients per unroll length H (>= 2)."""
    diag_max_horizon: int = 10
    """Gradient variance: unroll lengths H = 1 .. diag_max_horizon."""
    diag_transitions: int = 256
    """Model gradient error: held-out real transitions from fresh rollouts of the current policy."""
    diag_rollout_steps: int = 200
    """Model gradient error: length of those fresh rollouts (transitions are drawn uniformly from them)."""


def _field_docs() -> Dict[str, str]:
    """Each field's docstring, read from the class source (the string right after the field)."""
    tree = ast.parse(inspect.getsource(Config))
    body = tree.body[0].body
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs



# ---- presets as data ------------------------------------------------------------------------------
# Env layer: only what the papers tie to the task. DDPPO Table 1 (paper 003): H, n, w per env
# (the text of Table 1's n row is garbled in our copy; read as 10 / 25 / 25 / 25 / 5 / 5); warm-up
# 5000 steps (200 for InvertedPendulum, Appendix B.2.2); MBPO's rollout-length schedules (Hopper
# 1 -> 15 over epochs 20 -> 100, Humanoid 1 -> 25 over 20 -> 300, the others fixed); run length =
# MBPO's epochs x 1000 steps.
ENV_PRESETS: Dict[str, Dict[str, object]] = {
    "InvertedPendulum": dict(steps=10_000, warmup_steps=200, horizon=3, fd_k=10, fd_weight=10.0,
                             rollout_min_len=1, rollout_max_len=1),
    "Hopper": dict(steps=100_000, horizon=2, fd_k=25, fd_weight=50.0,
                   rollout_min_len=1, rollout_max_len=15, rollout_min_epoch=20, rollout_max_epoch=100),
    "Walker2d": dict(steps=100_000, horizon=3, fd_k=25, fd_weight=0.1, rollout_min_len=1, rollout_max_len=1),
    "HalfCheetah": dict(steps=100_000, horizon=3, fd_k=25, fd_weight=1.0, rollout_min_len=1, rollout_max_len=1),
    "Ant": dict(steps=150_000, horizon=3, fd_k=5, fd_weight=0.1,
                rollout_min_len=1, rollout_max_len=25, rollout_min_epoch=20, rollout_max_epoch=100),
    "Humanoid": dict(steps=150_000, horizon=3, fd_k=5, fd_weight=0.1,
                     rollout_min_len=1, rollout_max_len=25, rollout_min_epoch=20, rollout_max_epoch=300),
}

# Algorithm layer: from the algorithm table (fastrp.algos.SPECS): 1 + 1 updates per env step for
# SAC, 10 + 10 for the model-based algorithms (DDPPO Table 1), RP-PGM's spectral-norm flags.
ALGO_PRESETS: Dict[str, Dict[str, object]] = {name: dict(spec.preset) for name, spec in SPECS.items()}

# Size layer. Each size preset is a dict of entries: "" applies to every run, an algorithm name to
# that algorithm, an env name to that env (applied in that order, so the env entry wins).
SIZE_PRESETS: Dict[str, Dict[str, Dict[str, object]]] = {
    "paper": {},
    # A 2-core CPU: the model-based algorithms with 128-wide networks, 3 x 128 models refit every
    # 1000 steps (capped at 30 epochs / 400 gradient steps, 64 FD queries and 10 neighbours per
    # gradient-model step), 1 policy + 2 critic updates per env step at a policy learning rate of
    # 1e-4, and the critic on real transitions (95 % data from the young models made it diverge).
    # The policy unrolls H = 1 model step: through 2-3 steps of these small models the policy
    # gradient was nearly uncorrelated with the true one (cosine ~0 at H = 3, 0.2-0.5 at H = 1 on
    # HalfCheetah). The models fit standardised targets (--model-target-norm): a capped refit on
    # raw-unit targets left them far from converged, and a spectrally normalised model could not
    # reach the target scales at all. 20k steps (about 11 min for ddppo-sn on HalfCheetah on one
    # core). SAC keeps its own sizes (it is cheap). InvertedPendulum has its own tuned entry
    # (10k steps in about 10 minutes, H = 3 on raw targets).
    "cpu": {
        "": dict(steps=20_000, warmup_steps=2000, hidden_dim=128, model_hidden_dim=128, model_num_layers=3,
                 policy_updates=1, critic_updates=2, actor_lr=1e-4, model_train_every=1000, model_max_epochs=30,
                 model_max_steps=400, fd_batch_size=64, fd_k=10, real_ratio=1.0, rollout_batch_size=1000,
                 eval_every=2000, eval_episodes=3, horizon=1, model_target_norm=True),
        "sac": dict(hidden_dim=256, policy_updates=1, critic_updates=1, actor_lr=3e-4),
        # MBPO's only use of its model is the critic's (and policy's) data: half of each batch
        # from model rollouts (with the real-only mix above, mbpo would be SAC)
        "mbpo": dict(real_ratio=0.5),
        # 64-wide networks, 3 x 64 models, 1 policy + 4 critic updates per step with 1e-3 critic /
        # temperature learning rates, a faster target (tau 0.01) and a low initial temperature;
        # policy learning rate 3e-4 (1e-3 reached 1000 as fast but kept falling back); model
        # refits capped at 30 epochs / 200 steps, 64 FD queries per gradient-model step, half of
        # each critic batch real (the critic leans less on the young model)
        "InvertedPendulum": dict(steps=10_000, warmup_steps=200, horizon=3, model_target_norm=False, fd_k=10, eval_every=1000, eval_episodes=5,
                                 hidden_dim=64, model_hidden_dim=64, model_num_layers=3, policy_updates=1,
                                 critic_updates=4, model_train_every=250, model_max_epochs=30, model_max_steps=200,
                                 fd_batch_size=64, real_ratio=0.5, rollout_batch_size=10_000, tau=0.01,
                                 actor_lr=3e-4, critic_lr=1e-3, alpha_lr=1e-3, init_alpha=0.1),
    },
    "tiny": {
        "": dict(hidden_dim=32, num_layers=2, batch_size=32, ensemble_size=3, num_elites=2, model_hidden_dim=32,
                 model_num_layers=2, model_batch_size=64, model_train_every=50, model_max_epochs=3,
                 rollout_batch_size=64, policy_updates=1, critic_updates=1, fd_k=3, fd_window=500,
                 warmup_steps=50, log_every=50, eval_every=100, eval_episodes=2, checkpoint_every=100,
                 diag_states=64, diag_batch=8, diag_samples=4, diag_max_horizon=3, diag_transitions=16,
                 diag_rollout_steps=20),
    },
}


# ---- CLI ------------------------------------------------------------------------------------------
class CliError(Exception):
    """An invalid command line or config value (reported as one line, exit code 2)."""


# argparse takes "-1e-3" for an option unless it looks like a negative number: widen the pattern to
# every float spelling so that "--actor-lr -1e-3" reaches the range check ("must be > 0")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str):  # one line on stderr, exit code 2, no usage dump
        raise CliError(message)


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _preset_notes(name: str) -> str:
    """Every preset value of field ``name``, for ``--help``: ``algo sac/mbpo: 1; env Hopper: 2; ...``."""
    parts: List[str] = []
    by_value: Dict[str, List[str]] = {}
    for algo, layer in ALGO_PRESETS.items():
        if name in layer:
            by_value.setdefault(repr(layer[name]), []).append(algo)
    parts += [f"algo {'/'.join(algos)}: {value}" for value, algos in by_value.items()]
    by_value = {}
    for env, layer in ENV_PRESETS.items():
        if name in layer:
            by_value.setdefault(repr(layer[name]), []).append(env)
    parts += [f"env {'/'.join(envs)}: {value}" for value, envs in by_value.items()]
    for preset, entries in SIZE_PRESETS.items():
        for key, layer in entries.items():
            if name in layer:
                parts.append(f"size {preset}{'/' + key if key else ''}: {layer[name]!r}")
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one ``--flag`` per :class:`Config` field; every default is None so that
    only the flags actually given override the presets."""
    parser = _Parser(prog="python -m fastrp.train", allow_abbrev=False,
                     description="Train SAC / MBPO / MAAC / RP-SN / DDPPO on MuJoCo. Values come from the Config "
                                 "defaults, then the algorithm, env and size presets, then these flags; the run's "
                                 "config.json records where each value came from.")
    docs = _field_docs()
    defaults = Config()
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        notes = _preset_notes(f.name)
        help_text = f"{docs.get(f.name, '')} (default: {default!r}{'; ' + notes if notes else ''})"
        kind = {"bool": bool, "int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        kwargs = dict(default=None, help=help_text.replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag, type=_bool, nargs="?", const=True, metavar="BOOL", **kwargs)
        elif f.name == "algo":
            parser.add_argument(flag, choices=ALGOS, **kwargs)
        elif f.name == "device":
            parser.add_argument(flag, choices=DEVICES, **kwargs)
        elif f.name == "preset":
            parser.add_argument(flag, choices=PRESETS, **kwargs)
        elif f.name == "policy_sn_layers":
            parser.add_argument(flag, choices=("hidden", "all"), **kwargs)
        elif f.name == "precision":
            parser.add_argument(flag, choices=PRECISIONS, **kwargs)
        else:
            parser.add_argument(flag, type=kind, **kwargs)
    return parser


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch)."""
    import torch

    return torch.cuda.is_available()


def auto_preset(device: str) -> Tuple[str, str]:
    """The size preset ``--preset auto`` picks for ``device`` and why: ``paper`` when training on
    CUDA, ``cpu`` otherwise."""
    on_cuda = device == "cuda" or (device == "auto" and cuda_available())
    if on_cuda:
        return "paper", "training on CUDA"
    return "cpu", "no CUDA device" if device == "auto" else "--device cpu"


def preset_layers(env: str, algo: str, preset: str) -> List[Tuple[str, Dict[str, object]]]:
    """The ``(source name, values)`` layers for ``env`` / ``algo`` / size ``preset`` (not auto), lowest first."""
    layers: List[Tuple[str, Dict[str, object]]] = [(f"algo {algo}", ALGO_PRESETS[algo]), (f"env {env}", ENV_PRESETS[env])]
    entries = SIZE_PRESETS[preset]
    for key in ("", algo, env):
        if key in entries:
            layers.append((f"size {preset}" + (f" ({key})" if key else ""), entries[key]))
    return layers


def resolve_with_sources(overrides: Dict[str, object]) -> Tuple["Config", Dict[str, str]]:
    """Defaults <- algo preset <- env preset <- size preset <- ``overrides`` (non-None values).

    Returns the validated config and, per field, where its value came from: ``default``,
    ``algo NAME``, ``env NAME``, ``size PRESET`` or ``size PRESET (ENTRY)``, or ``flag``; with
    ``preset auto``, the ``preset`` field's source says which preset auto chose and why."""
    given = {k: v for k, v in overrides.items() if v is not None}
    env = str(given.get("env", Config.env))
    algo = str(given.get("algo", Config.algo))
    preset = str(given.get("preset", Config.preset))
    device = str(given.get("device", Config.device))
    if env not in ENV_PRESETS:
        raise CliError(f"--env: unknown environment {env!r}; choose from {', '.join(ENV_NAMES)}")
    if algo not in ALGO_PRESETS:
        raise CliError(f"--algo: unknown algorithm {algo!r}; choose from {', '.join(ALGOS)}")
    if preset not in PRESETS:
        raise CliError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    sources = {f.name: "default" for f in dataclasses.fields(Config)}
    values: Dict[str, object] = {}
    preset_note = "flag" if "preset" in given else "default"
    if preset == "auto":
        preset, why = auto_preset(device)
        preset_note = f"auto: {why}"
    for source, layer in preset_layers(env, algo, preset) + [("flag", given)]:
        values.update(layer)
        sources.update({k: source for k in layer})
    values["preset"] = preset
    sources["preset"] = preset_note
    cfg = Config(**values)
    validate(cfg)
    return cfg, sources


def resolve(overrides: Dict[str, object]) -> "Config":
    """The validated config of ``overrides`` (see :func:`resolve_with_sources`)."""
    return resolve_with_sources(overrides)[0]


_POSITIVE = ["steps", "eval_every", "eval_episodes", "log_every", "checkpoint_every", "max_bad_intervals",
             "batch_size", "hidden_dim", "num_layers", "ensemble_size", "num_elites", "model_hidden_dim",
             "model_batch_size", "model_train_every", "model_max_epochs", "model_patience",
             "rollout_batch_size", "rollout_min_len", "rollout_max_len", "model_retain_epochs",
             "fd_k", "fd_window", "fd_batch_size", "cpu_threads", "diag_states", "diag_batch", "diag_max_horizon",
             "diag_transitions", "diag_rollout_steps"]
_NONNEG = ["warmup_steps", "seed", "policy_updates", "critic_updates", "model_num_layers", "model_max_steps",
           "diag_every", "rollout_min_epoch", "rollout_max_epoch", "horizon"]
# sizes beyond these cannot run on any machine fastrp targets (or overflow the RNG / index types)
_UPPER = {"steps": 10 ** 9, "warmup_steps": 10 ** 9, "eval_every": 10 ** 9, "eval_episodes": 10_000,
          "log_every": 10 ** 9, "checkpoint_every": 10 ** 9, "max_bad_intervals": 10 ** 6, "batch_size": 1 << 20,
          "hidden_dim": 1 << 14, "num_layers": 64, "policy_updates": 10_000, "critic_updates": 10_000,
          "ensemble_size": 1024, "num_elites": 1024, "model_hidden_dim": 1 << 14, "model_num_layers": 64,
          "model_batch_size": 1 << 20, "model_train_every": 10 ** 9, "model_max_epochs": 10 ** 6,
          "model_max_steps": 10 ** 9, "model_patience": 10 ** 6, "rollout_batch_size": 1 << 24,
          "rollout_min_len": 10_000, "rollout_max_len": 10_000, "rollout_min_epoch": 10 ** 6,
          "rollout_max_epoch": 10 ** 6, "model_retain_epochs": 10_000, "horizon": 10_000, "fd_k": 4096,
          "fd_window": 10 ** 8, "fd_batch_size": 1 << 20, "diag_every": 10 ** 9, "diag_states": 1 << 20,
          "diag_batch": 1 << 20, "diag_samples": 1 << 20, "diag_max_horizon": 10_000, "diag_transitions": 1 << 20,
          "diag_rollout_steps": 10 ** 7, "seed": MAX_SEED, "cpu_threads": 4096}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: "Config") -> None:
    """Raise :class:`CliError` naming the first invalid field (and what it must be)."""
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "float" and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise CliError(f"{_flag(f.name)}: must be a finite number, got {value!r}")
    for name in _POSITIVE:
        if getattr(cfg, name) < 1:
            raise CliError(f"{_flag(name)}: must be >= 1, got {getattr(cfg, name)}")
    for name in _NONNEG:
        if getattr(cfg, name) < 0:
            raise CliError(f"{_flag(name)}: must be >= 0, got {getattr(cfg, name)}")
    for name, top in _UPPER.items():
        if getattr(cfg, name) > top:
            raise CliError(f"{_flag(name)}: must be <= {top}, got {getattr(cfg, name)}")
    for name in ("actor_lr", "critic_lr", "alpha_lr", "model_lr", "init_alpha", "tau"):
        if not getattr(cfg, name) > 0:
            raise CliError(f"{_flag(name)}: must be > 0, got {getattr(cfg, name)}")
    name_ok = cfg.run_name == "" or (os.path.basename(cfg.run_name) == cfg.run_name and cfg.run_name not in (".", "..")
                                     and "/" not in cfg.run_name and "\\" not in cfg.run_name)
    checks = [
        (0 < cfg.gamma <= 1, f"--gamma: must be in (0, 1], got {cfg.gamma}"),
        (cfg.tau <= 1, f"--tau: must be in (0, 1], got {cfg.tau}"),
        (0 <= cfg.real_ratio <= 1, f"--real-ratio: must be in [0, 1], got {cfg.real_ratio}"),
        (0 < cfg.model_holdout < 1, f"--model-holdout: must be in (0, 1), got {cfg.model_holdout}"),
        (cfg.fd_weight >= 0, f"--fd-weight: must be >= 0, got {cfg.fd_weight}"),
        (cfg.target_entropy_scale >= 0, f"--target-entropy-scale: must be >= 0, got {cfg.target_entropy_scale}"),
        (cfg.checkpoint_minutes >= 0, f"--checkpoint-minutes: must be >= 0, got {cfg.checkpoint_minutes}"),
        (cfg.num_elites <= cfg.ensemble_size, "--num-elites: must be <= --ensemble-size"),
        (cfg.rollout_min_len <= cfg.rollout_max_len, "--rollout-min-len: must be <= --rollout-max-len"),
        (cfg.rollout_min_epoch <= cfg.rollout_max_epoch, "--rollout-min-epoch: must be <= --rollout-max-epoch"),
        (not cfg.cuda_graphs or cfg.compile, "--cuda-graphs: needs --compile"),
        (cfg.diag_samples >= 2, f"--diag-samples: must be >= 2 (a sample variance), got {cfg.diag_samples}"),
        (cfg.device in DEVICES, f"--device: choose from {', '.join(DEVICES)}"),
        (cfg.preset in PRESETS, f"--preset: choose from {', '.join(PRESETS)}"),
        (cfg.policy_sn_layers in ("hidden", "all"), f"--policy-sn-layers: choose from hidden, all, got {cfg.policy_sn_layers!r}"),
        (cfg.precision in PRECISIONS, f"--precision: choose from {', '.join(PRECISIONS)}, got {cfg.precision!r}"),
        (name_ok, f"--run-name: must be a plain directory name inside --logdir (no '/', '..'), got {cfg.run_name!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise CliError(message)


def parse_args(argv: Optional[Sequence[str]] = None) -> "Config":
    """The resolved :class:`Config` for ``argv`` (``sys.argv[1:]`` when None); raises
    :class:`CliError` on an unknown flag or an invalid value."""
    return parse_args_with_sources(argv)[0]


def parse_args_with_sources(argv: Optional[Sequence[str]] = None) -> Tuple["Config", Dict[str, str]]:
    """:func:`parse_args` plus where each value came from (:func:`resolve_with_sources`)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return resolve_with_sources(vars(args))


# Fields added after the first release, with the value that reproduces how runs without them
# behaved (checkpoints of such runs hold a config without these keys).
_LEGACY_DEFAULTS: Dict[str, object] = {"obs_norm": False, "model_max_steps": 0, "diag_every": 0,
                                       "checkpoint_minutes": 0.0, "policy_sn_layers": "hidden", "precision": "ieee",
                                       "model_target_norm": False}
# Fields that no longer exist (ignored when an old config is read): the trainer's fault-injection
# flag moved into the tests.
_REMOVED_FIELDS = ("fault_nan_at",)
_METADATA_KEYS = ("sources",)
"""Keys of ``config.json`` that are not config fields."""

RESUME_FIXED = ("env", "algo", "seed", "preset", "obs_norm", "hidden_dim", "num_layers", "ensemble_size",
                "num_elites", "model_hidden_dim", "model_num_layers", "policy_spectral_norm", "model_spectral_norm",
                "policy_sn_layers", "model_target_norm")
"""Fields a resumed run cannot change: they decide which networks the checkpoint holds."""


def config_from_checkpoint(values: Dict[str, object]) -> "Config":
    """The :class:`Config` of a checkpoint's ``config`` dict (or a ``config.json``). Fields the
    writing version did not have get the value that reproduces its behaviour (e.g. no
    observation normalisation, the FD query batch equal to ``model_batch_size``), not today's
    defaults; fields that no longer exist and ``config.json``'s ``sources`` are dropped; unknown
    keys (from a newer version) raise :class:`CliError`."""
    if not isinstance(values, dict):
        raise CliError(f"the config is not a mapping of fields (got {type(values).__name__})")
    values = {k: v for k, v in values.items() if k not in _REMOVED_FIELDS + _METADATA_KEYS}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CliError(f"the checkpoint's config has fields this fastrp version does not know: {', '.join(unknown)}")
    for key, value in _LEGACY_DEFAULTS.items():
        values.setdefault(key, value)
    values.setdefault("fd_batch_size", values.get("model_batch_size", Config.model_batch_size))
    return Config(**values)


def given_flags(argv: Sequence[str]) -> List[str]:
    """Field names set explicitly in ``argv`` (used by ``--resume`` to apply only those)."""
    args = vars(build_parser().parse_args(list(argv)))
    return [k for k, v in args.items() if v is not None]
