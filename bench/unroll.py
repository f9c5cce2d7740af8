"""Unroll benchmark: the policy-gradient unroll of the trainer, forward and backward.

    python bench/unroll.py                       # CPU: small sizes, a couple of minutes
    python bench/unroll.py --device cuda --json bench/results/h200-unroll.json
    python bench/unroll.py --quick               # smoke test

The unroll is the RP-DP / SVG(H) objective (paper 003 eq. 11, paper 000): from start states
``s0[B, 17]`` (HalfCheetah: obs 17, act 6), for ``t < H``: ``a, logp = pi(s)`` (reparameterized
tanh-Gaussian, 2x256 ReLU, spectral norm on the hidden layers); the 7-member model (4x200 SiLU,
spectral norm on the hidden layers, mean head of ``[ds, r]``) predicts with one random member per
sample; ``s' = s + ds``; the return accumulates ``gamma^t mask_t (r - alpha logp)`` with ``mask``
the running product of Hopper-v5's healthy rule (``fastrp.envs.termination_fn("Hopper")`` on the
first 11 state dims: HalfCheetah never terminates, this keeps a real termination function in the
loop).  Terminal value ``gamma^H mask_H (min(Q1, Q2)(s_H, a_H) -
alpha logp_H)`` from a twin Q (two 2x256 ReLU MLPs).  ``loss = -mean(return)``; the backward takes
the gradient of the policy parameters only (model and critic frozen, ``requires_grad=False``, as
in training; the gradient still flows through them to states and actions).  Spectral norm runs in
training mode (one power iteration per network call), as in the reference codes.

Providers, on the same inputs and the same weights, in one process:

* ``eager``             what one writes in PyTorch: ``nn.Linear`` members stacked into ``bmm``,
                        ``torch.nn.utils.parametrizations.spectral_norm``, all 7 members computed
                        and one picked per sample, two separate Q networks
* ``compile-default``   ``torch.compile`` of that code
* ``compile-max-autotune``  ``torch.compile(mode="max-autotune-no-cudagraphs")`` (CUDA)
* ``compile-reduce-overhead``  ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; CUDA)
* ``fastrp``            :class:`fastrp.nn.policy.TanhGaussianPolicy`, the 7-member
                        :class:`fastrp.nn.ensemble.EnsembleMLP` with ``members=`` (only the chosen
                        member is computed), :class:`fastrp.nn.critic.TwinQ`
* ``fastrp-cudagraph``  the same, forward and backward captured in one CUDA graph (CUDA)
* ``trainer``           the trainer's own policy objective, ``Agent.policy_loss`` of a
                        ``ddppo-sn`` agent with HalfCheetah's paper preset (the same network sizes)
                        at this H and B: :func:`fastrp.rl.unroll.imagined_objective` with the
                        observation normaliser, the prediction ensemble (mean and log-variance
                        heads, no graph) plus the gradient model (differentiated), an elite drawn
                        per sample, SN scales cached per update, HalfCheetah's termination function
                        (never fires); then the policy gradient.  It does more work than the other
                        providers (two models per step) on different weights, so it is not compared
                        with ``eager``, only checked finite; its FLOPs are counted on its own work.

Before timing, each provider's loss and policy gradient are compared with ``eager`` (run from the
same spectral-norm state); a provider that disagrees is not timed.  On CPU the providers' calls
are interleaved round-robin so that load from other processes hits them alike.  FLOPs are counted
analytically per unroll, provider-independent and only the useful work: the chosen member of the
model, policy and critic, forward x 3 for forward + backward.  Phases run inside NVTX ranges
(``policy``, ``model``, ``critic``, ``backward``) in the eager and fastrp providers for Nsight
Systems; compiled and graphed providers get one range per call.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OBS_DIM, ACT_DIM = 17, 6  # HalfCheetah-v5
POLICY_HIDDEN, POLICY_LAYERS = 256, 2
MODEL_HIDDEN, MODEL_LAYERS, ENSEMBLE = 200, 4, 7
CRITIC_HIDDEN, CRITIC_LAYERS = 256, 2
GAMMA, ALPHA = 0.99, 0.2
LOG_STD_BOUNDS = (-5.0, 2.0)
ALL_PROVIDERS = ("eager", "compile-default", "compile-max-autotune", "compile-reduce-overhead", "fastrp", "fastrp-cudagraph",
                 "trainer")
CUDA_ONLY = ("compile-max-autotune", "compile-reduce-overhead", "fastrp-cudagraph")
COMPILE_MODES = {"compile-default": None, "compile-max-autotune": "max-autotune-no-cudagraphs",
                 "compile-reduce-overhead": "reduce-overhead"}
LOSS_RTOL, GRAD_RTOL = 1e-3, 1e-2


# --------------------------------------------------------------------------------------------
# The unroll, shared by every provider: only the three networks differ.
# --------------------------------------------------------------------------------------------
_HOPPER_OBS = 11


def termination_fn(name: str):
    """``fastrp.envs.termination_fn``, imported on first use (the rest of the benchmark imports
    without the simulator packages)."""
    from fastrp.envs import termination_fn as make

    return make(name)


def healthy_mask(s: torch.Tensor) -> torch.Tensor:
    """1.0 where Hopper-v5's termination rule (``fastrp.envs.termination_fn("Hopper")``: height,
    angle and state ranges) applied to the first 11 state dims keeps the episode alive, else 0.0."""
    global _HOPPER_TERMINATED
    if _HOPPER_TERMINATED is None:
        _HOPPER_TERMINATED = termination_fn("Hopper")
    head = s[:, :_HOPPER_OBS]
    return (~_HOPPER_TERMINATED(head, None, head)).to(s.dtype)


_HOPPER_TERMINATED = None


def _no_range(name: str):
    return contextlib.nullcontext()


def unroll(policy, model, critic, s0, noise, members, nvtx: bool = True) -> torch.Tensor:
    """``-mean`` of the H-step model-value-expansion return; H = ``members.shape[0]``.

    ``policy(s, noise=eps) -> (a, logp)``; ``model(x[B, obs+act], members[B]) -> [B, obs+1]``;
    ``critic(s, a) -> (q1, q2)``; ``noise[H + 1, B, act]``, ``members[H, B]``."""
    rng = common.nvtx_range if nvtx else _no_range
    s, ret, mask, disc = s0, torch.zeros_like(s0[:, 0]), torch.ones_like(s0[:, 0]), 1.0
    for t in range(members.shape[0]):
        with rng("policy"):
            a, logp = policy(s, noise=noise[t])
        with rng("model"):
            out = model(torch.cat([s, a], dim=-1), members[t])
        s = s + out[:, :-1]
        ret = ret + disc * mask * (out[:, -1] - ALPHA * logp)
        mask = mask * healthy_mask(s)
        disc *= GAMMA
    with rng("policy"):
        a, logp = policy(s, noise=noise[-1])
    with rng("critic"):
        q1, q2 = critic(s, a)
    ret = ret + disc * mask * (torch.minimum(q1, q2) - ALPHA * logp)
    return -ret.mean()


def _mlp_flops(i: int, h: int, n: int, o: int) -> float:
    dims = [i] + [h] * n + [o]
    return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])))


def unroll_flops(H: int, B: int) -> float:
    """Useful FLOPs of one unroll, forward + backward (= 3 x forward GEMM FLOPs)."""
    policy = _mlp_flops(OBS_DIM, POLICY_HIDDEN, POLICY_LAYERS, 2 * ACT_DIM)
    model = _mlp_flops(OBS_DIM + ACT_DIM, MODEL_HIDDEN, MODEL_LAYERS, OBS_DIM + 1)
    critic = 2 * _mlp_flops(OBS_DIM + ACT_DIM, CRITIC_HIDDEN, CRITIC_LAYERS, 1)
    return 3.0 * B * (H * (policy + model) + policy + critic)


def trainer_flops(cfg, H: int, B: int) -> float:
    """Useful FLOPs of the trainer's objective + policy gradient: policy and critic forward x 3,
    the prediction model forward only (no graph), the gradient model forward x 3; both models with
    their mean and log-variance heads."""
    policy = _mlp_flops(OBS_DIM, cfg.hidden_dim, cfg.num_layers, 2 * ACT_DIM)
    critic = 2 * _mlp_flops(OBS_DIM + ACT_DIM, cfg.hidden_dim, cfg.num_layers, 1)
    model = _mlp_flops(OBS_DIM + ACT_DIM, cfg.model_hidden_dim, cfg.model_num_layers, 2 * (OBS_DIM + 1))
    return B * (3.0 * ((H + 1) * policy + critic) + H * (model + 3.0 * model))


# --------------------------------------------------------------------------------------------
# Eager PyTorch, as a user writes it.
# --------------------------------------------------------------------------------------------
def squash(mean, raw_log_std, eps):
    """Tanh-Gaussian sample and log-density from the network's two heads (user-written)."""
    lo, hi = LOG_STD_BOUNDS
    log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw_log_std) + 1.0)
    dist = torch.distributions.Normal(mean, log_std.exp())
    u = mean + log_std.exp() * eps
    a = torch.tanh(u)
    logp = (dist.log_prob(u) - torch.log1p(-a.square() + 1e-12)).sum(-1)
    return a, logp


def sn_linear(i: int, o: int, sn: bool) -> nn.Module:
    lin = nn.Linear(i, o)
    return torch_spectral_norm(lin) if sn else lin


class EagerPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        dims = [OBS_DIM] + [POLICY_HIDDEN] * POLICY_LAYERS
        self.hidden = nn.ModuleList(sn_linear(a, b, True) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(POLICY_HIDDEN, 2 * ACT_DIM)

    def forward(self, s, noise):
        h = s
        for lin in self.hidden:
            h = F.relu(lin(h))
        mean, raw = self.out(h).chunk(2, dim=-1)
        return squash(mean, raw, noise)


class EagerEnsembleLinear(nn.Module):
    """E ``nn.Linear`` members (spectral-normed or not), applied together with one ``baddbmm``."""

    def __init__(self, E: int, i: int, o: int, sn: bool):
        super().__init__()
        self.members = nn.ModuleList(sn_linear(i, o, sn) for _ in range(E))

    def forward(self, x):  # [E, B, i] -> [E, B, o]
        w = torch.stack([m.weight for m in self.members])
        b = torch.stack([m.bias for m in self.members])
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


class EagerEnsembleModel(nn.Module):
    def __init__(self):
        super().__init__()
        dims = [OBS_DIM + ACT_DIM] + [MODEL_HIDDEN] * MODEL_LAYERS + [OBS_DIM + 1]
        self.layers = nn.ModuleList(
            EagerEnsembleLinear(ENSEMBLE, a, b, sn=l < MODEL_LAYERS) for l, (a, b) in enumerate(zip(dims[:-1], dims[1:])))

    def forward(self, x, members):  # every member on every sample, then pick one per sample
        h = x.unsqueeze(0).expand(ENSEMBLE, -1, -1)
        for layer in self.layers[:-1]:
            h = F.silu(layer(h))
        out = self.layers[-1](h)
        return out[members, torch.arange(x.shape[0], device=x.device)]


class EagerTwinQ(nn.Module):
    def __init__(self):
        super().__init__()

        def mlp():
            dims = [OBS_DIM + ACT_DIM] + [CRITIC_HIDDEN] * CRITIC_LAYERS
            layers = []
            for a, b in zip(dims[:-1], dims[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(CRITIC_HIDDEN, 1))

        self.q1, self.q2 = mlp(), mlp()

    def forward(self, s, a):
        x = torch.cat([s, a], dim=-1)
        return self.q1(x)[:, 0], self.q2(x)[:, 0]


# --------------------------------------------------------------------------------------------
# fastrp, with the eager weights copied in.
# --------------------------------------------------------------------------------------------
def build_fastrp(eager: Dict[str, nn.Module], device):
    """fastrp's policy, model and critic holding the eager networks' parameters and power-iteration
    vectors.  Returns ``(modules, grad_map)``: ``grad_map`` holds ``(eager param index, fastrp
    param index, member, transposed)`` for each policy parameter, to compare gradients."""
    from fastrp.nn.critic import TwinQ
    from fastrp.nn.ensemble import EnsembleMLP
    from fastrp.nn.policy import TanhGaussianPolicy

    policy = TanhGaussianPolicy(OBS_DIM, ACT_DIM, POLICY_HIDDEN, POLICY_LAYERS, spectral_norm=True,
                                log_std_bounds=LOG_STD_BOUNDS).to(device)
    model = EnsembleMLP(OBS_DIM + ACT_DIM, OBS_DIM + 1, MODEL_HIDDEN, MODEL_LAYERS, ENSEMBLE, activation="silu",
                        spectral_norm="hidden").to(device)
    critic = TwinQ(OBS_DIM, ACT_DIM, CRITIC_HIDDEN, CRITIC_LAYERS).to(device)
    ep, em, ec = eager["policy"], eager["model"], eager["critic"]
    pairs = []
    with torch.no_grad():
        pairs += load_members(policy.net, [list(ep.hidden) + [ep.out]])
        load_members(model, [[layer.members[e] for layer in em.layers] for e in range(ENSEMBLE)])
        load_members(critic.net, [[m for m in q if isinstance(m, nn.Linear)] for q in (ec.q1, ec.q2)])
    model.requires_grad_(False)
    critic.requires_grad_(False)
    eager_index = {id(t): i for i, t in enumerate(ep.parameters())}
    fast_index = {id(t): i for i, t in enumerate(policy.parameters())}
    grad_map = [(eager_index[id(a)], fast_index[id(b)], e, tr) for a, b, e, tr in pairs]
    return {"policy": policy, "model": model, "critic": critic}, grad_map


def load_members(ens, members: List[List[nn.Module]]):
    """Copy member ``e``'s ``nn.Linear`` layers (spectral-normed or not) into ``ens``: weights
    transposed to ``[in, out]``, and the power-iteration vector ``_v`` of each spectral-normed
    layer (buffers ``sn_u_{l}`` / ``sn_v_{l}``).  Returns ``(eager param, fastrp param, member,
    transposed)`` for every copied parameter."""
    pairs = []
    weights, biases = ens.weights, ens.biases
    for e, layers in enumerate(members):
        for l, lin in enumerate(layers):
            if hasattr(lin, "parametrizations"):
                w = lin.parametrizations.weight.original
                getattr(ens, f"sn_u_{l}")[e].copy_(lin.parametrizations.weight[0]._u)
                getattr(ens, f"sn_v_{l}")[e].copy_(lin.parametrizations.weight[0]._v)
            else:
                w = lin.weight
            weights[l][e].copy_(w.t())
            biases[l][e].copy_(lin.bias)
            pairs += [(w, weights[l], e, True), (lin.bias, biases[l], e, False)]
    return pairs


# --------------------------------------------------------------------------------------------
# The trainer's own objective.
# --------------------------------------------------------------------------------------------
TRAINER_ENV, TRAINER_ALGO = "HalfCheetah", "ddppo-sn"


def trainer_config(H: int, B: int, device):
    """The trainer's resolved config: ``ddppo-sn`` with HalfCheetah's paper preset, at H and B."""
    from fastrp.config import resolve

    return resolve({"env": TRAINER_ENV, "algo": TRAINER_ALGO, "preset": "paper", "device": device.type, "horizon": H,
                    "batch_size": B})


def build_trainer(H: int, B: int, device, seed: int):
    """``step()`` running the trainer's policy objective (``Agent.policy_loss``, forward) and the policy gradient on the
    benchmark's start states; the agent is freshly initialised (models not fitted: the timing does
    not depend on the weights' values)."""
    from fastrp import algos

    cfg = trainer_config(H, B, device)
    torch.manual_seed(seed)
    agent = algos.get(TRAINER_ALGO)(cfg, OBS_DIM, ACT_DIM, [-1.0] * ACT_DIM, [1.0] * ACT_DIM, device,
                                    termination=termination_fn(TRAINER_ENV))
    params = list(agent.policy.parameters())

    def step(s0):
        with common.nvtx_range("trainer/forward"), agent.policy_update_mode(), agent.policy.net.cached_scales():
            loss, _ = agent.policy_loss(s0)
        with common.nvtx_range("trainer/backward"):
            grads = torch.autograd.grad(loss, params)
        return loss, grads

    return step


def check_finite(out) -> Optional[str]:
    """None when the loss and every gradient are finite, else why not."""
    loss, grads = out
    if not (torch.isfinite(loss).item() and all(torch.isfinite(g).all().item() for g in grads)):
        return "non-finite loss or policy gradient; not timed"
    print(f"  check {'trainer':<24} loss {loss.item():.4g}, policy gradient finite (not compared: other networks)")
    return None


# --------------------------------------------------------------------------------------------
# Providers: each is a ``step()`` returning ``(loss, policy_grads)``.
# --------------------------------------------------------------------------------------------
def make_step(forward: Callable[[], torch.Tensor], params: List[torch.Tensor], nvtx: bool):
    def step():
        loss = forward()
        with common.nvtx_range("backward") if nvtx else _no_range("backward"):
            grads = torch.autograd.grad(loss, params)
        return loss, grads

    return step


def graphed(step, device):
    """Capture ``step`` (forward + backward) in a CUDA graph; replaying it returns the same
    static output tensors."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    def replay():
        with common.nvtx_range("graph-replay"):
            graph.replay()
        return out

    return replay


def build_provider(name, nets, inputs, device):
    """A ``step()`` for provider ``name``, or a string saying why it cannot run here."""
    if name not in ALL_PROVIDERS:
        return f"unknown provider (choose from {', '.join(ALL_PROVIDERS)})"
    if name in CUDA_ONLY and device.type != "cuda":
        return "CUDA only"
    s0, noise, members = inputs
    if name == "trainer":
        step = build_trainer(members.shape[0], s0.shape[0], device, 0)
        return lambda: step(s0)
    if name.startswith("fastrp"):
        if isinstance(nets["fastrp"], str):
            return nets["fastrp"]
        p, m, c = (nets["fastrp"][k] for k in ("policy", "model", "critic"))
        params = list(p.parameters())
        nvtx = name == "fastrp"
        step = make_step(lambda: unroll(p, lambda x, mem: m(x, members=mem), c, s0, noise, members, nvtx), params, nvtx)
        return graphed(step, device) if name == "fastrp-cudagraph" else step
    p, m, c = (nets["eager"][k] for k in ("policy", "model", "critic"))
    params = list(p.parameters())
    if name == "eager":
        return make_step(lambda: unroll(p, m, c, s0, noise, members, True), params, True)
    fwd = torch.compile(lambda s0_, noise_, members_: unroll(p, m, c, s0_, noise_, members_, False), mode=COMPILE_MODES[name])
    return make_step(lambda: fwd(s0, noise, members), params, False)


def compare(name, out, ref, grad_map) -> Optional[str]:
    """None when provider ``name``'s ``(loss, grads)`` match eager's, else why not.  ``grad_map``
    lays fastrp's policy gradients out like eager's (see :func:`build_fastrp`)."""
    loss, grads = out
    ref_loss, ref_grads = ref
    loss_err = abs(loss.item() - ref_loss.item()) / max(1.0, abs(ref_loss.item()))
    if name.startswith("fastrp"):
        got = [None] * len(ref_grads)
        for eager_i, fast_i, e, transpose in grad_map:
            g = grads[fast_i][e]
            got[eager_i] = g.t() if transpose else g
    else:
        got = list(grads)
    scale = max(g.abs().max().item() for g in ref_grads)
    grad_err = max((a - b).abs().max().item() for a, b in zip(got, ref_grads)) / max(scale, 1e-12)
    print(f"  check {name:<24} loss rel. diff {loss_err:.2e}   policy grad max-abs-diff / max|grad| {grad_err:.2e}")
    if not (loss_err <= LOSS_RTOL and grad_err <= GRAD_RTOL):
        return f"disagrees with eager (loss {loss_err:.1e}, grad {grad_err:.1e}); not timed"
    return None


# --------------------------------------------------------------------------------------------
# Running it.
# --------------------------------------------------------------------------------------------
def make_inputs(H: int, B: int, device, seed: int):
    """Start states inside Hopper's healthy range, policy noise ``[H+1, B, act]``, members ``[H, B]``."""
    gen = torch.Generator().manual_seed(seed + 1000 * H + B)
    s0 = 0.05 * torch.randn(B, OBS_DIM, generator=gen)
    s0[:, 0] += 1.25
    noise = torch.randn(H + 1, B, ACT_DIM, generator=gen)
    members = torch.randint(0, ENSEMBLE, (H, B), generator=gen)
    return s0.to(device), noise.to(device), members.to(device)


def snapshot(nets) -> Dict:
    return {kind: {k: copy.deepcopy(m.state_dict()) for k, m in mods.items()}
            for kind, mods in nets.items() if isinstance(mods, dict)}


def restore(nets, snap) -> None:
    for kind, mods in snap.items():
        for k, state in mods.items():
            nets[kind][k].load_state_dict(state)


def time_phases(nets, kind, inputs, device, target_s):
    """Per-phase times (ms) of provider ``kind`` (eager / fastrp): each network's forward at the
    unroll's shapes, multiplied by its number of calls per unroll, and the backward as the
    remainder of a full step."""
    s0, noise, members = inputs
    H = members.shape[0]
    p, m, c = (nets[kind][k] for k in ("policy", "model", "critic"))
    model = m if kind == "eager" else (lambda x, mem: m(x, members=mem))
    a = torch.tanh(noise[0])
    x = torch.cat([s0, a], dim=-1)
    params = list(p.parameters())
    t_policy = common.measure(lambda: p(s0, noise=noise[0]), device, target_s)["median_ms"] * (H + 1)
    t_model = common.measure(lambda: model(x, members[0]), device, target_s)["median_ms"] * H
    t_critic = common.measure(lambda: c(s0, a), device, target_s)["median_ms"]
    t_fwd = common.measure(lambda: unroll(p, model, c, s0, noise, members, False), device, target_s)["median_ms"]
    t_step = common.measure(make_step(lambda: unroll(p, model, c, s0, noise, members, False), params, False),
                            device, target_s)["median_ms"]
    return {"policy_fwd_ms": t_policy, "model_fwd_ms": t_model, "critic_fwd_ms": t_critic,
            "other_fwd_ms": t_fwd - t_policy - t_model - t_critic, "forward_ms": t_fwd, "backward_ms": t_step - t_fwd}


COLUMNS = ["H", "B", "provider", "median ms", "p20 ms", "p80 ms", "transitions/s", "vs eager", "TFLOP/s", "% peak", "note"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--horizons", default=None, help="H values (default: 1,3,5,10 on CUDA, 1,3,10 on CPU)")
    ap.add_argument("--batches", default=None, help="B values (default: 256,1024,4096 on CUDA, 256 on CPU)")
    ap.add_argument("--providers", default=None, help=f"comma separated, from {','.join(ALL_PROVIDERS)} (default: all on CUDA; eager,fastrp,trainer on CPU, "
                    "where torch.compile takes minutes per size)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, eager + fastrp + trainer only: a smoke test")
    ap.add_argument("--phases", action="store_true", help="also time each phase of eager and fastrp (where the time goes)")
    ap.add_argument("--time", type=float, default=1.0, help="seconds of repetitions per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        horizons, batches = [1, 2], [8]
        names = ["eager", "fastrp", "trainer"]
        args.time = min(args.time, 0.2)
    else:
        horizons = common.parse_list(args.horizons or ("1,3,5,10" if cuda else "1,3,10"))
        batches = common.parse_list(args.batches or ("256,1024,4096" if cuda else "256"))
        # torch.compile takes minutes per (H, B) on a small CPU: opt-in there (--providers)
        default = ALL_PROVIDERS if cuda else ("eager", "fastrp", "trainer")
        names = [n.strip() for n in (args.providers or ",".join(default)).split(",") if n.strip()]
    if "eager" not in names:
        names.insert(0, "eager")  # the reference every provider is checked against
    peak = common.peak_tflops(device)
    print(f"device: {common.device_name(device)}  torch {torch.__version__}  "
          f"peak fp32: {f'{peak} TFLOP/s' if peak else 'unknown (no % column)'}")

    torch.manual_seed(args.seed)
    eager = {"policy": EagerPolicy(), "model": EagerEnsembleModel(), "critic": EagerTwinQ()}
    for k, mod in eager.items():
        mod.to(device).train()
        if k != "policy":
            mod.requires_grad_(False)
    nets = {"eager": eager}
    try:
        nets["fastrp"], grad_map = build_fastrp(eager, device)
    except Exception as exc:
        traceback.print_exc()
        nets["fastrp"], grad_map = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}", None
    snap = snapshot(nets)

    results, rows, summary = [], [], []
    for H in horizons:
        for B in batches:
            inputs = make_inputs(H, B, device, args.seed)
            flops = unroll_flops(H, B)
            print(f"H={H} B={B}: {flops / 1e9:.2f} GFLOP per unroll (forward + backward, useful work)")
            restore(nets, snap)
            ref = build_provider("eager", nets, inputs, device)()
            ref = (ref[0].detach().clone(), [g.detach().clone() for g in ref[1]])
            torch._dynamo.reset()  # one compiled entry per mode and size: stay under dynamo's cache limit
            block, steps = [], {}
            for name in names:  # build and check every provider, then time them together
                entry = {"H": H, "B": B, "provider": name, "gflop": flops / 1e9}
                try:
                    t0 = time.perf_counter()
                    step = build_provider(name, nets, inputs, device)
                    if isinstance(step, str):
                        entry["status"] = step
                    else:
                        restore(nets, snap)
                        why = check_finite(step()) if name == "trainer" else compare(name, step(), ref, grad_map)
                        if name == "trainer":
                            entry["gflop"] = trainer_flops(trainer_config(H, B, device), H, B) / 1e9
                        entry["first_call_s"] = time.perf_counter() - t0
                        entry["status"] = why or "ok"
                        if not why:
                            steps[name] = step
                except Exception as exc:
                    traceback.print_exc()
                    entry["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
                block.append(entry)
            timings = common.measure_interleaved(steps, device, target_s=args.time)
            for entry in block:
                entry.update(timings.get(entry["provider"], {}))
                entry["load_avg_1min"] = common.load_average()
            _derive(block, peak, B * H)
            if args.phases:
                for kind in ("eager", "fastrp"):
                    if kind in names and not isinstance(nets[kind], str):
                        restore(nets, snap)
                        phases = time_phases(nets, kind, inputs, device, args.time)
                        next(e for e in block if e["provider"] == kind)["phases_ms"] = phases
                        print(f"  phases {kind:<7} " + "  ".join(f"{k[:-3]} {v:.3f}" for k, v in phases.items()) + "  (ms)")
            results += block
            rows += [_row(e, peak) for e in block]
            summary.append(_summary(block, H, B))
            print(common.format_table(rows[-len(block):], COLUMNS if peak else COLUMNS[:-2] + COLUMNS[-1:]))
            print(summary[-1])
            print()
            if args.json:  # what is measured so far survives a run stopped by a time limit
                _write(args.json, device, results, peak, complete=False)
    print(common.format_table(rows, COLUMNS if peak else COLUMNS[:-2] + COLUMNS[-1:]))
    print("\n".join(summary))
    if args.json:
        _write(args.json, device, results, peak, complete=True)


def _write(path, device, results, peak, complete: bool) -> None:
    common.write_json(path, device, results, quiet=not complete, complete=complete, peak_fp32_tflops=peak,
                      config={"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "policy": f"{POLICY_LAYERS}x{POLICY_HIDDEN} relu, SN hidden",
                              "model": f"{ENSEMBLE} members, {MODEL_LAYERS}x{MODEL_HIDDEN} silu, SN hidden",
                              "critic": f"twin {CRITIC_LAYERS}x{CRITIC_HIDDEN} relu", "gamma": GAMMA, "alpha": ALPHA})


def _derive(block, peak, transitions):
    eager_ms = next((e["median_ms"] for e in block if e["provider"] == "eager" and "median_ms" in e), None)
    for e in block:
        if "median_ms" not in e:
            continue
        sec = e["median_ms"] / 1e3
        e["transitions_per_s"] = transitions / sec
        e["tflops"] = e["gflop"] / 1e3 / sec
        e["pct_peak"] = 100.0 * e["tflops"] / peak if peak else None
        e["speedup_vs_eager"] = eager_ms / e["median_ms"] if eager_ms else None


def _row(e, peak):
    row = {"H": str(e["H"]), "B": str(e["B"]), "provider": e["provider"]}
    if "median_ms" not in e:
        row["note"] = e["status"]
        return row
    row.update({"median ms": common.fmt_ms(e["median_ms"]), "p20 ms": common.fmt_ms(e["p20_ms"]),
                "p80 ms": common.fmt_ms(e["p80_ms"]), "transitions/s": common.fmt_num(e["transitions_per_s"]),
                "vs eager": f"{e['speedup_vs_eager']:.2f}x" if e.get("speedup_vs_eager") else "-",
                "TFLOP/s": f"{e['tflops']:.3g}", "% peak": f"{e['pct_peak']:.1f}" if peak else ""})
    if e["provider"].startswith("compile"):
        row["note"] = f"first call (compile) {e['first_call_s']:.0f} s"
    elif e["provider"] == "trainer":
        row["note"] = "+ gradient model; own FLOPs"
    return row


def _summary(block, H, B) -> str:
    timed = {e["provider"]: e["median_ms"] for e in block if "median_ms" in e}
    best_fast = min((v, k) for k, v in timed.items() if k.startswith("fastrp")) if any(k.startswith("fastrp") for k in timed) else None
    if best_fast is None:
        return f"H={H} B={B}: no fastrp provider timed"
    line = f"H={H} B={B}: best fastrp ({best_fast[1]}) {timed['eager'] / best_fast[0]:.2f}x eager" if "eager" in timed else ""
    compiled = [(v, k) for k, v in timed.items() if k.startswith("compile")]
    if compiled:
        v, k = min(compiled)
        line += f", {v / best_fast[0]:.2f}x the best torch.compile ({k})"
    if "trainer" in timed and "eager" in timed:
        line += f"; the trainer's own objective (prediction + gradient model) {timed['eager'] / timed['trainer']:.2f}x eager"
    return line


if __name__ == "__main__":
    main()
