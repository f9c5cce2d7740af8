"""``EnsembleMLP``: E independent MLPs in one fused call, with optional spectral normalization."""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastrp.ops._common import check_activation, check_precision
from fastrp.ops.jvp import ensemble_mlp_jvp
from fastrp.ops.mlp import ensemble_mlp
from fastrp.ops.spectral import spectral_norm_layers

__all__ = ["EnsembleMLP"]

_SN_MODES = ("none", "hidden", "all")
# Power iterations run at initialisation so that u, v start close to the singular vectors
# (the same warm start as torch.nn.utils.parametrizations.spectral_norm).
_INIT_POWER_ITERATIONS = 15


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class EnsembleMLP(nn.Module):
    """``ensemble_size`` independent MLPs ``in_dim -> hidden_dim x num_layers -> out_dim``.

    ``num_layers`` counts the hidden layers, so the network has ``num_layers + 1`` linear layers
    (DDPPO's 4x200 model is ``num_layers=4, hidden_dim=200``; ``num_layers=0`` is one linear
    layer). Hidden layers apply ``activation`` (``"silu" | "relu" | "tanh"``), the output layer is
    linear. The forward is one :func:`fastrp.ops.ensemble_mlp` call (one fused launch on GPU).

    Parameters: ``weights[l]`` of shape ``[E, d_l, d_{l+1}]`` (the layer computes
    ``h @ weights[l][e]``) and ``biases[l]`` of shape ``[E, d_{l+1}]``, initialised per member like
    ``nn.Linear``: both uniform in ``(-1/sqrt(d_l), 1/sqrt(d_l))``.

    Spectral normalization (``spectral_norm=``): ``"none"``; ``"hidden"`` normalizes every layer
    but the output layer (RP-PGM's model placement); ``"all"`` every layer. A normalized layer
    computes ``h @ weights[l][e] / sigma_l[e]`` with ``sigma`` the spectral norm of the member's
    weight estimated exactly like ``torch.nn.utils.parametrizations.spectral_norm`` does for an
    ``nn.Linear`` holding ``weights[l][e].T``: buffers ``sn_u_{l}`` (``[E, d_{l+1}]``) and
    ``sn_v_{l}`` (``[E, d_l]``) hold the power-iteration vectors (random unit vectors refined by
    15 power iterations at initialisation). In training mode each forward runs
    ``n_power_iterations`` iterations from the stored ``v``, overwrites both buffers in place
    (without autograd) and uses ``sigma = u^T W v`` of the new vectors; in eval mode the buffers
    are left alone and ``sigma = u^T W v`` uses the stored ``u`` and ``v``. Both vectors are in
    the ``state_dict``, so a module saved in training mode and loaded into eval mode computes the
    same ``sigma`` as the saved module would in eval mode. The power iterations of all normalized
    layers run in one :func:`fastrp.ops.spectral_norm_layers` launch.

    Args:
        in_dim, out_dim, hidden_dim: widths.
        num_layers: number of hidden layers (``>= 0``).
        ensemble_size: number of members ``E``.
        activation: hidden activation.
        spectral_norm: ``"none" | "hidden" | "all"``.
        n_power_iterations: power iterations per training-mode forward (``>= 1``).
        eps: ``eps`` of the normalization ``x / max(||x||, eps)``.
        backend: forwarded to the ops (None: auto, Triton on CUDA, torch on CPU).
        precision: forwarded to every :func:`~fastrp.ops.ensemble_mlp` /
            :func:`~fastrp.ops.ensemble_mlp_jvp` call: the Triton matmuls' input precision,
            ``"ieee"`` (exact float32 products, the default), ``"tf32"`` or ``"tf32x3"`` (tensor
            cores). The torch backend (the CPU default) and float64 always compute in full
            precision, so on CPU every mode gives the ``"ieee"`` result. The power iteration of
            spectral norm is not a matmul kernel and always runs in full precision.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        num_layers: int,
        ensemble_size: int,
        activation: str = "silu",
        spectral_norm: str = "none",
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        backend: Optional[str] = None,
        precision: str = "ieee",
    ) -> None:
        super().__init__()
        _positive_int("in_dim", in_dim)
        _positive_int("out_dim", out_dim)
        _positive_int("hidden_dim", hidden_dim)
        _positive_int("num_layers", num_layers, minimum=0)
        _positive_int("ensemble_size", ensemble_size)
        _positive_int("n_power_iterations", n_power_iterations)
        check_activation(activation)
        check_precision(precision)
        if spectral_norm not in _SN_MODES:
            raise ValueError(f"spectral_norm must be one of {_SN_MODES}, got {spectral_norm!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a float > 0, got {eps!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.ensemble_size = ensemble_size
        self.activation = activation
        self.spectral_norm = spectral_norm
        self.n_power_iterations = n_power_iterations
        self.eps = float(eps)
        self.backend = backend
        self.precision = precision
        self.dims: Tuple[int, ...] = (in_dim,) + (hidden_dim,) * num_layers + (out_dim,)
        num_linear = num_layers + 1
        if spectral_norm == "all":
            self.sn_layers: Tuple[int, ...] = tuple(range(num_linear))
        elif spectral_norm == "hidden":
            self.sn_layers = tuple(range(num_linear - 1))
        else:
            self.sn_layers = ()

        E = ensemble_size
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(E, d_in, d_out)) for d_in, d_out in zip(self.dims[:-1], self.dims[1:])]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(E, d_out)) for d_out in self.dims[1:]])
        for layer in self.sn_layers:
            self.register_buffer(f"sn_u_{layer}", torch.empty(E, self.dims[layer + 1]))
            self.register_buffer(f"sn_v_{layer}", torch.empty(E, self.dims[layer]))
        self._scale_cache: Optional[List[Optional[torch.Tensor]]] = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-draw weights and biases (``nn.Linear`` init per member) and the SN vectors."""
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases):
                bound = 1.0 / math.sqrt(weight.shape[1])
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)
            if self.sn_layers:
                for layer in self.sn_layers:
                    self._sn_u(layer).copy_(F.normalize(torch.randn_like(self._sn_u(layer)), dim=-1, eps=self.eps))
                    self._sn_v(layer).copy_(F.normalize(torch.randn_like(self._sn_v(layer)), dim=-1, eps=self.eps))
                _, us, vs = spectral_norm_layers(
                    [self.weights[layer] for layer in self.sn_layers],
                    [self._sn_v(layer) for layer in self.sn_layers],
                    _INIT_POWER_ITERATIONS,
                    self.eps,
                    backend="torch",
                )
                self._store_vectors(us, vs)

    def _sn_u(self, layer: int) -> torch.Tensor:
        return getattr(self, f"sn_u_{layer}")

    def _sn_v(self, layer: int) -> torch.Tensor:
        return getattr(self, f"sn_v_{layer}")

    def _store_vectors(self, us: List[torch.Tensor], vs: List[torch.Tensor]) -> None:
        dst = [self._sn_u(layer) for layer in self.sn_layers] + [self._sn_v(layer) for layer in self.sn_layers]
        with torch.no_grad():
            torch._foreach_copy_(dst, list(us) + list(vs))  # one launch for all buffers

    def _sigmas(self, update: bool) -> List[torch.Tensor]:
        """Per normalized layer ``sigma[E]``: power iteration + buffer update when ``update``,
        else ``u^T W v`` from the stored vectors."""
        weights = [self.weights[layer] for layer in self.sn_layers]
        vs = [self._sn_v(layer) for layer in self.sn_layers]
        if update:
            sigmas, us, vs = spectral_norm_layers(weights, vs, self.n_power_iterations, self.eps, backend=self._sn_backend())
            self._store_vectors(us, vs)
            return sigmas
        us = [self._sn_u(layer) for layer in self.sn_layers]
        sigmas, _, _ = spectral_norm_layers(weights, vs, 0, self.eps, us=us, backend=self._sn_backend())
        return sigmas

    def _sn_backend(self) -> Optional[str]:
        return self.backend if self.backend in (None, "torch", "triton") else None

    def scales(self) -> Optional[List[Optional[torch.Tensor]]]:
        """Per-layer ``[E]`` multipliers ``1 / sigma`` (None for layers without SN), or None when
        no layer is normalized. In training mode this runs the power iteration and updates the
        buffers, exactly as :meth:`forward` does."""
        if not self.sn_layers:
            return None
        if self._scale_cache is not None:
            return self._scale_cache
        scales: List[Optional[torch.Tensor]] = [None] * (self.num_layers + 1)
        for layer, sigma in zip(self.sn_layers, self._sigmas(update=self.training)):
            scales[layer] = sigma.reciprocal()
        return scales

    @contextlib.contextmanager
    def cached_scales(self) -> Iterator[None]:
        """Inside the block every forward reuses one set of spectral-norm scales, computed on
        entry (one power iteration in training mode, as a single forward would run), like
        ``torch.nn.utils.parametrize.cached()``. For several forwards with unchanged weights, e.g.
        the steps of a policy unroll; the scales stay in the autograd graph, so gradients through
        ``1 / sigma`` are those of the uncached forwards. Nesting keeps the outer cache. Enter it
        with gradients enabled when the forwards inside need weight gradients: scales cached
        under ``no_grad`` carry no graph."""
        if not self.sn_layers or self._scale_cache is not None:
            yield
            return
        self._scale_cache = self.scales()
        try:
            yield
        finally:
            self._scale_cache = None

    def spectral_norm_sigmas(self) -> Dict[int, torch.Tensor]:
        """``{layer: sigma[E]}`` for the normalized layers, as eval mode computes them from the
        stored ``u``, ``v`` (detached; the buffers are not updated). For logging."""
        if not self.sn_layers:
            return {}
        with torch.no_grad():
            sigmas = self._sigmas(update=False)
        return {layer: sigma.detach() for layer, sigma in zip(self.sn_layers, sigmas)}

    # ------------------------------------------------------------------------------------------
    def _broadcast(self, x: torch.Tensor, ndim_with_members: int) -> torch.Tensor:
        """``x`` without the member dimension is expanded (not copied) to every member."""
        if x.dim() == ndim_with_members - 1:
            return x.unsqueeze(0).expand(self.ensemble_size, *x.shape)
        return x

    def forward(self, x: torch.Tensor, members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the ensemble.

        Args:
            x: ``[E, B, in]`` (member ``e`` gets its own batch ``x[e]``), or ``[B, in]``: without
                ``members`` the same batch goes through every member, with ``members`` (int64
                ``[B]`` in ``[0, E)``) sample ``b`` goes through member ``members[b]`` only.

        Returns:
            ``[E, B, out]``, or ``[B, out]`` with ``members``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [E, B, in] or [B, in] (with or without members), got {got}")
        if members is None:
            x = self._broadcast(x, 3)
        return ensemble_mlp(
            x, list(self.weights), list(self.biases), self.scales(), self.activation, members=members, backend=self.backend,
            precision=self.precision,
        )

    def forward_jvp(self, x: torch.Tensor, tangents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output and ``K`` forward-mode directional derivatives (:func:`fastrp.ops.ensemble_mlp_jvp`)
        with the same spectral-norm scales as :meth:`forward`.

        Args:
            x: ``[E, B, in]``, or ``[B, in]`` broadcast to every member.
            tangents: ``[E, B, K, in]``, or ``[B, K, in]`` broadcast to every member.

        Returns:
            ``(y[E, B, out], jy[E, B, K, out])``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [E, B, in] or [B, in], got {got}")
        if not isinstance(tangents, torch.Tensor) or tangents.dim() != x.dim() + 1:
            got = tuple(tangents.shape) if isinstance(tangents, torch.Tensor) else type(tangents).__name__
            raise ValueError(f"tangents must be [E, B, K, in] for x [E, B, in] (or [B, K, in] for x [B, in]), got {got}")
        x = self._broadcast(x, 3)
        tangents = self._broadcast(tangents, 4)
        return ensemble_mlp_jvp(
            x, tangents, list(self.weights), list(self.biases), self.scales(), self.activation, backend=self.backend,
            precision=self.precision,
        )

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, hidden_dim={self.hidden_dim}, "
            f"num_layers={self.num_layers}, ensemble_size={self.ensemble_size}, activation={self.activation!r}, "
            f"spectral_norm={self.spectral_norm!r}, n_power_iterations={self.n_power_iterations}, "
            f"precision={self.precision!r}"
        )
