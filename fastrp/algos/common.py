"""Machinery shared by every agent: a traceable Adam, the non-finite guard around an update, the
typed per-interval update statistics, compilation of update steps and module freezing."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch


# ---- optimizer ---------------------------------------------------------------------------------
class Adam(torch.optim.Adam):
    """``torch.optim.Adam`` whose update is a plain function of tensors (:meth:`masked_step`).

    The state (``step``, ``exp_avg``, ``exp_avg_sq``) and every parameter's ``.grad`` are created
    here, up front, on the parameters' device: nothing is allocated lazily inside a compiled or
    CUDA-graph-captured update (a ``.grad`` first created by a compiled backward would live in
    the graph's memory pool). :meth:`masked_step` has no host synchronisation and no Python
    branch on tensor values, so ``torch.compile`` traces it into the same graph as the loss and
    its backward (torch's own ``step()`` inserts graph breaks on purpose). On CPU its result is
    bit-identical to ``torch.optim.Adam.step()`` (tested). ``state_dict()`` / ``load_state_dict()``
    are torch's, so checkpoints of either load into the other.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0):
        super().__init__(list(params), lr=lr, weight_decay=weight_decay)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # torch may leave `step` on the CPU: keep it with its parameter
            for p in group["params"]:
                st = self.state[p]
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def masked_step(self, ok: torch.Tensor) -> None:
        """One Adam step (coupled L2 ``weight_decay`` as torch's) from the parameters' ``.grad``
        when ``ok`` (0-d bool tensor); when not ``ok`` the parameters, both moments and the step
        count are left exactly as they were (the gradients should then be finite, e.g. zeroed)."""
        for group in self.param_groups:
            params = list(group["params"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avg = [s["exp_avg"] for s in states]
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            before = [t.clone() for t in params + exp_avg + exp_avg_sq + steps]
            if weight_decay != 0:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
            torch._foreach_add_(steps, 1.0)
            # bias corrections in float64, as torch computes them from the step count on the host
            step = torch.stack(steps).double()
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
            step_size = (lr / bias_correction1).neg().float()
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, list(bias_correction2_sqrt.float().unbind()))
            torch._foreach_add_(denom, eps)
            update = torch._foreach_mul(exp_avg, list(step_size.unbind()))
            torch._foreach_div_(update, denom)
            torch._foreach_add_(params, update)
            after = params + exp_avg + exp_avg_sq + steps
            torch._foreach_copy_(after, [torch.where(ok, a, b) for a, b in zip(after, before)])


def guarded_update(optimizer: Adam, loss: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate ``loss`` into ``optimizer``'s parameters and step it unless the loss or the
    gradient is non-finite.

    Everything stays on the device: ``ok = isfinite(loss) & isfinite(||grad||)``; when not
    ``ok`` the gradients are zeroed and the step leaves parameters and Adam's state untouched.
    Returns ``(ok, grad_norm)`` as 0-d tensors."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    torch._foreach_zero_(grads)
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    zero = torch.zeros((), device=loss.device, dtype=loss.dtype)
    with torch.no_grad():
        torch._foreach_copy_(grads, [torch.where(ok, g, zero) for g in grads])
    optimizer.masked_step(ok)
    return ok, grad_norm.detach()


# ---- per-interval update statistics ------------------------------------------------------------
@dataclasses.dataclass
class KindStats:
    """One kind of update (critic or policy) over a log interval: how many ran, how many were
    skipped by the non-finite guard, and the means of its scalar metrics."""

    updates: int = 0
    skipped: int = 0
    means: Dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def mostly_skipped(self) -> bool:
        """More than half of this interval's updates of this kind were non-finite."""
        return self.updates > 0 and self.skipped > 0.5 * self.updates


@dataclasses.dataclass
class IntervalStats:
    """The updates of one log interval, read from the device once (:meth:`UpdateStats.pop`)."""

    critic: KindStats
    policy: KindStats

    @property
    def updates(self) -> int:
        return self.critic.updates + self.policy.updates

    @property
    def skipped(self) -> int:
        return self.critic.skipped + self.policy.skipped

    @property
    def bad(self) -> bool:
        """Most critic updates or most policy updates of the interval were skipped."""
        return self.critic.mostly_skipped or self.policy.mostly_skipped

    def means(self) -> Dict[str, float]:
        return {**self.critic.means, **self.policy.means}


class _KindAccumulator:
    """Device-side sums of one kind's ``ok`` flags and scalar metrics (no host read)."""

    def __init__(self) -> None:
        self.count = 0
        self.ok: Optional[torch.Tensor] = None
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, ok: torch.Tensor, values: Dict[str, torch.Tensor]) -> None:
        ok = ok.detach().float()
        self.ok = ok.clone() if self.ok is None else self.ok + ok
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = value.clone() if key not in self.sums else self.sums[key] + value
        self.count += 1

    def tensors(self) -> List[torch.Tensor]:
        return ([self.ok] if self.ok is not None else []) + list(self.sums.values())

    def read(self, host: List[float]) -> KindStats:
        if self.ok is None:
            return KindStats()
        ok, sums = host[0], host[1:]
        return KindStats(updates=self.count, skipped=int(round(self.count - ok)),
                         means={k: v / self.count for k, v in zip(self.sums, sums)})

    def state_dict(self) -> Dict[str, object]:
        return {"count": self.count, "ok": None if self.ok is None else self.ok.cpu(),
                "sums": {k: v.cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: Dict[str, object], device: torch.device) -> None:
        self.count = int(state["count"])
        self.ok = None if state["ok"] is None else state["ok"].to(device)
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}


class UpdateStats:
    """The critic and policy updates of the current log interval, accumulated on the device:
    ``critic.add(ok, metrics)`` / ``policy.add(ok, metrics)`` after each update; :meth:`pop`
    reads everything to the host in one transfer (the only synchronisation) and resets."""

    def __init__(self, device: torch.device):
        self.device = device
        self.critic = _KindAccumulator()
        self.policy = _KindAccumulator()

    def pop(self) -> IntervalStats:
        kinds = (self.critic, self.policy)
        tensors = [t for kind in kinds for t in kind.tensors()]
        host = torch.stack(tensors).cpu().tolist() if tensors else []
        out = []
        for kind in kinds:
            n = len(kind.tensors())
            out.append(kind.read(host[:n]))
            host = host[n:]
        self.critic, self.policy = _KindAccumulator(), _KindAccumulator()
        return IntervalStats(critic=out[0], policy=out[1])

    def state_dict(self) -> Dict[str, object]:
        return {"critic": self.critic.state_dict(), "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.critic.load_state_dict(state["critic"], self.device)
        self.policy.load_state_dict(state["policy"], self.device)


# ---- compilation ---------------------------------------------------------------------------------
def _trace_autograd_ops():
    """Let dynamo trace ``loss.backward()`` into the graph (torch >= 2.11); a no-op before."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


def compile_update(fn: Callable, enabled: bool, cuda_graphs: bool) -> Callable:
    """``fn`` (an update step: loss, backward, optimizer step) compiled as one region when
    ``enabled``, specialised to static shapes; ``mode="reduce-overhead"`` (CUDA graphs) when
    ``cuda_graphs``. ``fn`` itself otherwise.

    Dynamo traces the backward in-graph (``trace_autograd_ops``, torch >= 2.11) and
    :meth:`Adam.masked_step` has no graph breaks, so the whole step is one graph.
    With ``cuda_graphs`` the first call runs ``fn`` eagerly: the fastrp ops cache small device
    tables per shape (layer layouts, row segments) on first use, and those must be allocated in
    ordinary memory, not in the CUDA-graph trees' private pool during their warm-up run."""
    if not enabled:
        return fn
    # static shapes: the trainer's batch sizes never change, and a closure traced again for another
    # agent's batch size (tests, benchmarks) must not turn dynamic (torch.randint rejects symbolic sizes)
    compiled = torch.compile(fn, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    warmed = [not cuda_graphs]

    def call(*args, **kwargs):
        if not warmed[0]:
            out = fn(*args, **kwargs)
            warmed[0] = True  # only once a warm-up call has completed
            return out
        with _trace_autograd_ops():
            return compiled(*args, **kwargs)

    call.compiled = compiled  # for inspection (tests: torch._dynamo.explain on the same function)
    return call


# ---- module state ----------------------------------------------------------------------------------
def finite_module(*modules: Optional[torch.nn.Module]) -> bool:
    """True when every parameter of the modules is finite and no floating buffer holds a NaN
    (buffers may hold inf, e.g. a model's holdout score before its first fit). A host read, used
    only around model fits and before writing a checkpoint."""
    checks = []
    for m in modules:
        if m is None:
            continue
        checks += [torch.isfinite(p).all() for p in m.parameters()]
        checks += [~torch.isnan(b).any() for b in m.buffers() if b.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


@contextlib.contextmanager
def frozen_modules(modules: Iterable[Optional[torch.nn.Module]],
                   trainable: Optional[torch.nn.Module] = None) -> Iterator[None]:
    """Put every module (None entries are skipped) in ``eval()`` mode and ``requires_grad_(False)``,
    except ``trainable`` whose parameters are set to require grad (it is also put in ``eval()``);
    on exit every module's training flag and every parameter's ``requires_grad`` are restored to
    what they were, even after an exception.

    Eval mode matters: a spectrally normalised module updates its power-iteration vectors on
    every training-mode forward, so measuring in training mode would change the trained model.
    """
    mods = [m for m in modules if m is not None]
    if trainable is not None and all(m is not trainable for m in mods):
        mods.append(trainable)
    saved_modes = [(m, [sub.training for sub in m.modules()]) for m in mods]
    saved_flags = [(p, p.requires_grad) for m in mods for p in m.parameters()]
    try:
        for m in mods:
            m.eval()
            m.requires_grad_(m is trainable)
        yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for m, modes in saved_modes:
            for sub, mode in zip(m.modules(), modes):
                sub.training = mode
