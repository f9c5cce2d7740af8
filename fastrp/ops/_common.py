"""Shared argument validation, backend selection and torch activations for :mod:`fastrp.ops`.

Every public op validates its inputs with these helpers so that a bad call raises a
``ValueError`` naming the argument and what was expected, and resolves ``backend=`` the same way.
The torch activations and their derivatives are shared by the torch backends of the dense ops.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _ext

BACKENDS = ("torch", "triton", "cpp", "cuda")
ACTIVATIONS = ("silu", "relu", "tanh")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str,
    t,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = (torch.float32, torch.float64),
    device: Optional[torch.device] = None,
    what: str = "",
) -> torch.Tensor:
    """Check a tensor argument and raise ``ValueError`` naming it and the expectation.

    ``shape`` entries of ``None`` match any size. ``what`` describes the expected layout, e.g.
    ``"[E, B, in]"``, and is included in the message.
    """
    layout = f" {what}" if what else ""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor{layout}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-d tensor{layout}, got {_describe(t)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            exp = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {exp}{layout}, got {_describe(t)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = " or ".join(str(d) for d in dtypes)
            raise ValueError(f"{name} must have dtype {names}, got {_describe(t)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on device {device} (like the other inputs), got {_describe(t)}")
    return t


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


PRECISIONS = ("ieee", "tf32", "tf32x3")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def split_optional(tensors):
    """A per-layer list with None entries -> ``(present tensors, bit mask of present layers)``."""
    present = [t for t in tensors if t is not None]
    return present, sum(1 << l for l, t in enumerate(tensors) if t is not None)


def merge_optional(present, mask: int, L: int) -> list:
    """Inverse of :func:`split_optional`."""
    it = iter(present)
    return [next(it) if (mask >> l) & 1 else None for l in range(L)]


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation


def check_layer_list(name: str, seq, L: int) -> list:
    """A per-layer argument (biases, scales): None means ``L`` Nones; otherwise a list or tuple
    of ``L`` entries (each may be None), returned as a list."""
    if seq is None:
        return [None] * L
    if not isinstance(seq, (list, tuple)) or len(seq) != L:
        got = f"{len(seq)} entries" if isinstance(seq, (list, tuple)) else type(seq).__name__
        raise ValueError(
            f"{name} must be None or a list of {L} entries (one per layer, like weights; entries may be None), "
            f"got {got}"
        )
    return list(seq)


def check_layers(weights, biases, scales, E: int, d_in: int, dtype: torch.dtype, device: torch.device):
    """Check an ensemble MLP's per-layer arguments: ``weights`` a non-empty list of
    ``[E, d_l, d_{l+1}]`` tensors chained from ``d_0 = d_in``; ``biases`` / ``scales`` None or
    per-layer lists of ``[E, d_{l+1}]`` / ``[E]`` tensors or None; all of ``dtype`` on ``device``.
    Returns ``(widths [d_0, ..., d_L], biases, scales)`` with None lists expanded."""
    if not isinstance(weights, (list, tuple)) or len(weights) == 0:
        raise ValueError(f"weights must be a non-empty list of [E, d_l, d_l+1] tensors, got {type(weights).__name__}")
    L = len(weights)
    widths = [d_in]
    for l, w in enumerate(weights):
        check_tensor(f"weights[{l}]", w, ndim=3, shape=[E, widths[-1], None], dtypes=[dtype], device=device,
                     what=f"[E={E}, d_{l}={widths[-1]}, d_{l + 1}] (E members, d_{l} the width of the previous layer)")
        widths.append(int(w.shape[2]))
    biases = check_layer_list("biases", biases, L)
    scales = check_layer_list("scales", scales, L)
    for l in range(L):
        if biases[l] is not None:
            check_tensor(f"biases[{l}]", biases[l], shape=[E, widths[l + 1]], dtypes=[dtype], device=device,
                         what=f"[E={E}, d_{l + 1}={widths[l + 1]}] like x's dtype")
        if scales[l] is not None:
            check_tensor(f"scales[{l}]", scales[l], shape=[E], dtypes=[dtype], device=device,
                         what=f"[E={E}] like x's dtype")
    return widths, biases, scales


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn is not None and fn())


_FORCE_CUSTOM_OPS = os.environ.get("FASTRP_CPU_CUSTOM_OPS", "") not in ("", "0")


def eager_autograd(backend: Optional[str], impl: str, t: torch.Tensor) -> bool:
    """Whether an op with automatic backend choice (``backend=None``) should run its torch
    formulas under plain autograd instead of through its registered custom op: on CPU, outside
    torch.compile. There the custom op's Python dispatch and explicit backward cost a few hundred
    microseconds per call, more than the whole op at the network sizes of RL on CPU, and autograd
    through the same formulas is the fastest correct choice. ``FASTRP_CPU_CUSTOM_OPS=1`` forces
    the registered op (an explicit ``backend="torch"`` always uses it)."""
    return (backend is None and impl == "torch" and t.device.type == "cpu" and not _FORCE_CUSTOM_OPS
            and not is_compiling())


def device_side(t: torch.Tensor) -> bool:
    """Whether an op must keep ``t``'s values on the device, with no read back to the host: on
    every device but the CPU (on CUDA a read is a synchronisation, and illegal while a CUDA graph
    is captured). Op hot paths ask this (through the module attribute, so a test can make a CPU
    run take the device-side path) before any ``.item()``, ``.tolist()`` or ``nonzero``."""
    return t.device.type != "cpu"


def value_checks_allowed(t: torch.Tensor) -> bool:
    """Whether a data-dependent check may read ``t``'s values back to the host: not while
    torch.compile traces, nor while a CUDA graph is being captured (both forbid the sync)."""
    if is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def act(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(z)`` for ``"silu" | "relu" | "tanh"``."""
    if activation == "silu":
        return F.silu(z)
    if activation == "relu":
        return torch.relu(z)
    return torch.tanh(z)


def act_backward(g: torch.Tensor, z: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """``g * act'(z)`` given the pre-activation ``z`` and ``h = act(z)`` (fused aten kernels)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(g, z)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(g, z, 0)
    return torch.ops.aten.tanh_backward(g, h)


def act_d1(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(z)``."""
    if activation == "silu":
        sg = torch.sigmoid(z)
        return sg * (1 + z * (1 - sg))
    if activation == "relu":
        return (z > 0).to(z.dtype)
    th = torch.tanh(z)
    return 1 - th * th


def act_d2(z: torch.Tensor, activation: str) -> torch.Tensor:
    """``act''(z)`` (zero for relu)."""
    if activation == "silu":
        sg = torch.sigmoid(z)
        return sg * (1 - sg) * (2 + z * (1 - 2 * sg))
    if activation == "relu":
        return torch.zeros_like(z)
    th = torch.tanh(z)
    return -2 * th * (1 - th * th)


def triton_available() -> bool:
    """Triton importable (Linux)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton can run kernels on tensors of ``device``: CUDA, or CPU under TRITON_INTERPRET=1."""
    if not triton_available():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret()


def resolve_backend(op: str, backend: Optional[str], device: torch.device, supported: Sequence[str]) -> str:
    """Pick the backend for ``op`` on ``device``.

    ``supported`` lists the backends ``op`` implements, in order of preference for auto
    selection. ``None`` picks the first usable one; an explicit choice that cannot run raises a
    ``ValueError`` saying why.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None (auto) or one of {BACKENDS}, got {backend!r}")
    if backend is None:
        for cand in supported:
            if _usable(cand, device, auto=True):
                return cand
        return "torch"
    if backend not in supported:
        raise ValueError(f"{op}: backend={backend!r} is not implemented; choose one of {tuple(supported)} or None")
    if not _usable(backend, device, auto=False):
        raise ValueError(f"{op}: backend={backend!r} cannot run on device {device}: {_why_unusable(backend, device)}")
    return backend


def _usable(backend: str, device: torch.device, auto: bool) -> bool:
    if backend == "torch":
        return True
    if backend == "triton":
        if auto:  # auto never picks the (slow) interpreter on CPU
            return device.type == "cuda" and triton_available()
        return triton_usable(device)
    if backend == "cpp":
        return device.type == "cpu" and _ext.has_ext()
    if backend == "cuda":
        return device.type == "cuda" and _ext.has_cuda_ext()
    return False


def _why_unusable(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if not triton_available():
            return "triton is not installed"
        return "triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 set before import"
    if backend == "cpp":
        if device.type != "cpu":
            return "the C++ backend takes CPU tensors"
        return "the compiled extension fastrp._C is not available"
    if backend == "cuda":
        if device.type != "cuda":
            return "the CUDA backend takes CUDA tensors"
        return "fastrp._C was built without its CUDA sources"
    return "unknown backend"
