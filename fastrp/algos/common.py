"""Machinery shared by the algorithm files: the non-finite guard around an optimizer step, Polyak
averaging, device-side metric accumulation and optional compilation of update closures."""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, device: torch.device, weight_decay: float = 0.0):
    """Adam, ``capturable`` on CUDA (its step counter stays on the device, so the update can be
    captured in a CUDA graph). Every parameter gets a zeroed ``.grad`` now: :func:`guarded_step`
    zeroes gradients in place, so they are allocated once, here, outside any CUDA-graph memory
    pool (a ``.grad`` first created by a compiled backward would be a graph output that the next
    replay overwrites)."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    kwargs = dict(lr=lr, weight_decay=weight_decay)
    if device.type == "cuda":
        kwargs["capturable"] = True
    return torch.optim.Adam(params, **kwargs)


def guarded_step(optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter],
                 loss: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Back-propagate ``loss`` and step ``optimizer`` unless the loss or any gradient is non-finite.

    Everything stays on the device: ``ok = isfinite(loss) & isfinite(||grad||)``; when not ``ok``
    the gradients are zeroed (so Adam's moments stay finite) and the parameters are put back to
    their values before the step. Returns ``(ok, grad_norm)`` as 0-dim tensors.
    """
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
    zero = torch.zeros((), device=loss.device, dtype=loss.dtype)
    with torch.no_grad():
        for g in grads:
            g.copy_(torch.where(ok, g, zero))
        before = [p.detach().clone() for p in params]
    optimizer.step()
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(torch.where(ok, p, b))
    return ok, grad_norm.detach()


@torch.no_grad()
def soft_update(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """``target <- (1 - tau) target + tau source`` for all parameters (one fused foreach call)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class DeviceMetrics:
    """Sums and counts of per-update scalars kept as device tensors; :meth:`pop` reads them to the
    host once (the only synchronisation), returning ``key`` (mean), ``key_sum`` and ``key_count``,
    and resets."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def add(self, values: Dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float()
            if key in self.sums:
                self.sums[key] += value
                self.counts[key] += 1
            else:
                self.sums[key] = value.clone()
                self.counts[key] = 1

    def pop(self) -> Dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        host = torch.stack([self.sums[k] for k in keys]).cpu().tolist()
        out = {k: v / self.counts[k] for k, v in zip(keys, host)}
        out.update({k + "_sum": v for k, v in zip(keys, host)})
        out.update({k + "_count": self.counts[k] for k in keys})
        self.sums, self.counts = {}, {}
        return out

    def state_dict(self) -> Dict[str, object]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])


def maybe_compile(fn: Callable, enabled: bool, cuda_graphs: bool) -> Callable:
    """``torch.compile(fn)`` when ``enabled`` (``mode="reduce-overhead"``, i.e. CUDA graphs, when
    ``cuda_graphs``), specialised to static shapes; ``fn`` itself otherwise.

    With ``cuda_graphs`` the first call runs ``fn`` eagerly: the fastrp ops cache small device
    tables per shape (layer layouts, row segments) on first use, and those must be allocated in
    ordinary memory, not in the CUDA-graph trees' private pool during their warm-up run."""
    if not enabled:
        return fn
    # static shapes: the trainer's batch sizes never change, and a closure traced again for another
    # agent's batch size (tests, benchmarks) must not turn dynamic (torch.randint rejects symbolic sizes)
    compiled = torch.compile(fn, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    if not cuda_graphs:
        return compiled
    warmed = []

    def call(*args, **kwargs):
        if not warmed:
            out = fn(*args, **kwargs)
            warmed.append(True)  # only once a warm-up call has completed
            return out
        return compiled(*args, **kwargs)

    return call


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
