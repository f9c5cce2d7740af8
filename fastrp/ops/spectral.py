"""Spectral normalization of ensemble layers by power iteration.

``spectral_norm(weight[E, i, o], v[E, i], n_power_iterations=1, eps=1e-12)`` returns
``(sigma[E], u[E, o], v[E, i])``. Per member, with ``W = weight[e].T`` (``[o, i]``, the layout of
``nn.Linear.weight``), it repeats ``n`` times ``u = normalize(W v)``, ``v = normalize(W^T u)`` and
then sets ``sigma = u^T W v``, where ``normalize(x) = x / max(||x||, eps)``: exactly the
training-mode forward of ``torch.nn.utils.parametrizations.spectral_norm`` on ``W`` with
``_v = v``. ``sigma`` is differentiable in ``weight`` with ``u`` and ``v`` held constant
(``d sigma / d weight[e] = v[e] u[e]^T``), ``u`` and ``v`` carry no gradient.

``n_power_iterations = 0`` is the evaluation-mode forward: ``v`` is returned unchanged and
``sigma = u^T W v`` uses the ``u`` passed as keyword (torch's parametrization in eval mode uses
its stored ``_u`` and ``_v``); without ``u``, ``u = normalize(W v)`` is computed once.

``spectral_norm_layers`` does the same for a list of layers (different shapes, same ensemble
size) in one kernel launch on the Triton backend; ``spectral_norm`` is its one-layer case (one
registered op, ``fastrp::spectral_norm_layers``).

Composed with ``ensemble_linear(x, weight, bias, scale=1/sigma)``, i.e. ``y = x W / sigma``
with ``A = x^T G``, autograd yields the weight gradient ``A / sigma - (<A, W> / sigma^2) v u^T``
of the spectrally normalized layer.

Backends: ``"torch"`` (batched torch ops) and ``"triton"`` (one program per (layer, member);
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Auto: Triton on CUDA, torch on CPU.
The backward is the outer product ``grad_sigma * v u^T`` for every backend.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._common import check_tensor, eager_autograd, resolve_backend

__all__ = ["spectral_norm", "spectral_norm_layers", "spectral_norm_ref"]

_SUPPORTED = ("triton", "torch")
_FLOATS = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Host functions (the torch backend's forward and the backward shared by all backends)
# --------------------------------------------------------------------------------------------
def _power_iteration_torch(
    weight: torch.Tensor, v: torch.Tensor, u: Optional[torch.Tensor], n_power_iterations: int, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(u[E, o], v[E, i])`` after ``n`` power iterations on ``W = weight[e].T``, no grad."""
    with torch.no_grad():
        weight = weight.detach()
        v = v.detach()
        for _ in range(n_power_iterations):
            u = F.normalize(torch.einsum("eio,ei->eo", weight, v), dim=-1, eps=eps)
            v = F.normalize(torch.einsum("eio,eo->ei", weight, u), dim=-1, eps=eps)
        if u is None:
            u = F.normalize(torch.einsum("eio,ei->eo", weight, v), dim=-1, eps=eps)
        return u.detach().clone(), v.detach().clone()


def _sigma_torch(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sigma[e] = u[e]^T W[e] v[e]`` with ``W[e] = weight[e].T`` (differentiable in weight)."""
    return (u * torch.einsum("eio,ei->eo", weight, v)).sum(-1)


def _forward_torch(weights, vs, us, n_power_iterations, eps):
    sigmas, us_out, vs_out = [], [], []
    for layer, (weight, v) in enumerate(zip(weights, vs)):
        u0 = us[layer] if len(us) else None
        u, v = _power_iteration_torch(weight, v, u0, n_power_iterations, eps)
        with torch.no_grad():
            sigmas.append(_sigma_torch(weight.detach(), u, v))
        us_out.append(u)
        vs_out.append(v)
    return sigmas, us_out, vs_out


def _forward(weights, vs, us, n_power_iterations, eps, backend):
    if backend == "triton":
        from fastrp.kernels import spectral_norm as kernel

        return kernel.spectral_norm_layers_fwd(weights, vs, us, n_power_iterations, eps)
    return _forward_torch(weights, vs, us, n_power_iterations, eps)


def _backward(grad_sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``grad_weight[e] = grad_sigma[e] * v[e] u[e]^T`` (``[E, i, o]``)."""
    return grad_sigma[:, None, None] * v[:, :, None] * u[:, None, :]


# --------------------------------------------------------------------------------------------
# Registered ops (torch.compile traces them; autograd through register_autograd)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrp::spectral_norm_layers", mutates_args=())
def _spectral_norm_layers_op(
    weights: List[torch.Tensor],
    vs: List[torch.Tensor],
    us: List[torch.Tensor],
    n_power_iterations: int,
    eps: float,
    backend: str,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    sigmas, us_out, vs_out = _forward(weights, vs, us, n_power_iterations, eps, backend)
    return list(sigmas), list(us_out), list(vs_out)


@_spectral_norm_layers_op.register_fake
def _(weights, vs, us, n_power_iterations, eps, backend):
    sigmas = [w.new_empty(w.shape[0]) for w in weights]
    us_out = [w.new_empty(w.shape[0], w.shape[2]) for w in weights]
    vs_out = [torch.empty_like(v) for v in vs]
    return sigmas, us_out, vs_out


def _layers_setup_context(ctx, inputs, output):
    _, us_out, vs_out = output
    ctx.mark_non_differentiable(*us_out, *vs_out)
    ctx.num_layers = len(us_out)
    ctx.num_us = len(inputs[2])
    ctx.save_for_backward(*us_out, *vs_out)


def _layers_backward(ctx, grad_sigmas, grad_us, grad_vs):
    saved = ctx.saved_tensors
    n = ctx.num_layers
    grads = []
    for layer in range(n):
        g = grad_sigmas[layer]
        grads.append(None if g is None else _backward(g, saved[layer], saved[n + layer]))
    return grads, [None] * n, [None] * ctx.num_us, None, None, None


_spectral_norm_layers_op.register_autograd(_layers_backward, setup_context=_layers_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_layer(layer: str, weight, v, u, ensemble: Optional[int], ref: Optional[torch.Tensor]):
    w = check_tensor(f"weight{layer}", weight, ndim=3, dtypes=_FLOATS, what="[E, in, out]")
    if ensemble is not None and w.shape[0] != ensemble:
        raise ValueError(
            f"weight{layer} must have ensemble size {ensemble} like the first layer ([E, in, out]), "
            f"got shape {tuple(w.shape)}"
        )
    if ref is not None:
        if w.dtype != ref.dtype:
            raise ValueError(f"weight{layer} must have the same dtype as the first layer ({ref.dtype}), got {w.dtype}")
        if w.device != ref.device:
            raise ValueError(f"weight{layer} must be on device {ref.device} like the first layer, got {w.device}")
    e, i, o = w.shape
    check_tensor(f"v{layer}", v, shape=(e, i), dtypes=(w.dtype,), device=w.device, what="[E, in] (same dtype as weight)")
    if u is not None:
        check_tensor(f"u{layer}", u, shape=(e, o), dtypes=(w.dtype,), device=w.device, what="[E, out] (same dtype as weight)")


def _check_scalars(n_power_iterations, eps):
    if (isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, numbers.Integral)
            or n_power_iterations < 0):
        raise ValueError(f"n_power_iterations must be an int >= 0, got {n_power_iterations!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")


def spectral_norm(
    weight: torch.Tensor,
    v: torch.Tensor,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    *,
    u: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectral norm of every member of an ensemble layer by power iteration.

    Args:
        weight: ``[E, in, out]`` float32 (float64 works too), the layer computes ``x @ weight[e]``.
        v: ``[E, in]`` right singular vector estimates (unit vectors), same dtype and device.
        n_power_iterations: ``n >= 0`` iterations ``u = normalize(W v)``, ``v = normalize(W^T u)``
            with ``W = weight[e].T``.
        eps: ``normalize(x) = x / max(||x||, eps)``, as in ``torch.nn.functional.normalize``.
        u: ``[E, out]`` stored left singular vectors, read only when ``n_power_iterations == 0``
            (eval mode of torch's parametrization: ``sigma = u^T W v`` with stored ``u``, ``v``).
            When ``n == 0`` and ``u`` is None, ``u = normalize(W v)``.
        backend: None (auto: Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.

    Returns:
        ``(sigma[E], u[E, out], v[E, in])``: ``sigma = u^T W v`` differentiable in ``weight``
        (gradient ``v u^T`` per member), the updated ``u`` and ``v`` without gradient. The inputs
        are not modified.
    """
    _check_layer("", weight, v, u, None, None)
    _check_scalars(n_power_iterations, eps)
    impl = resolve_backend("spectral_norm", backend, weight.device, _SUPPORTED)
    if eager_autograd(backend, impl, weight):
        return spectral_norm_ref(weight, v, int(n_power_iterations), float(eps), u=u)
    sigmas, us, vs = _spectral_norm_layers_op([weight], [v], [] if u is None else [u], int(n_power_iterations),
                                              float(eps), impl)
    return sigmas[0], us[0], vs[0]


def spectral_norm_layers(
    weights: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    *,
    us: Optional[Sequence[torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """:func:`spectral_norm` of several ensemble layers at once (one launch on Triton).

    Args:
        weights: list of ``[E, in_l, out_l]`` weights (same E, dtype and device; shapes differ).
        vs: list of ``[E, in_l]`` vectors, one per layer.
        n_power_iterations, eps, backend: as in :func:`spectral_norm`.
        us: None, or a list of ``[E, out_l]`` stored ``u`` per layer, read when ``n == 0``.

    Returns:
        ``(sigmas, us, vs)``: lists with ``[E]``, ``[E, out_l]`` and ``[E, in_l]`` per layer,
        each equal to ``spectral_norm(weights[l], vs[l], ...)``.
    """
    if not isinstance(weights, (list, tuple)) or not isinstance(vs, (list, tuple)):
        raise ValueError("weights and vs must be lists of tensors ([E, in_l, out_l] and [E, in_l])")
    if len(vs) != len(weights):
        raise ValueError(f"vs must have one [E, in_l] tensor per layer: {len(weights)} weights, got {len(vs)} vs")
    if us is not None:
        if not isinstance(us, (list, tuple)) or len(us) != len(weights):
            got = len(us) if isinstance(us, (list, tuple)) else type(us).__name__
            raise ValueError(f"us must be None or a list of one [E, out_l] tensor per layer ({len(weights)}), got {got}")
    _check_scalars(n_power_iterations, eps)
    if len(weights) == 0:
        return [], [], []
    first = weights[0]
    for layer, (weight, v) in enumerate(zip(weights, vs)):
        ref = None if layer == 0 else first
        _check_layer(f"s[{layer}]", weight, v, None if us is None else us[layer], None if layer == 0 else first.shape[0], ref)
    impl = resolve_backend("spectral_norm_layers", backend, first.device, _SUPPORTED)
    if eager_autograd(backend, impl, first):
        out = [spectral_norm_ref(w, v, int(n_power_iterations), float(eps), u=None if us is None else us[layer])
               for layer, (w, v) in enumerate(zip(weights, vs))]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
    backend = impl
    sigmas, us_out, vs_out = _spectral_norm_layers_op(
        list(weights), list(vs), [] if us is None else list(us), int(n_power_iterations), float(eps), backend
    )
    return list(sigmas), list(us_out), list(vs_out)


def spectral_norm_ref(
    weight: torch.Tensor,
    v: torch.Tensor,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    *,
    u: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`spectral_norm`; ``sigma``'s gradient comes from autograd
    through ``u^T W v`` with the power-iteration vectors computed under ``no_grad``."""
    u, v = _power_iteration_torch(weight, v, u, n_power_iterations, eps)
    return _sigma_torch(weight, u, v), u, v
