"""Lipschitz constants behind the RP gradient's variance (paper 000), bound and measured.

Paper 000 bounds the variance of the model-based RP gradient by a polynomial in the Lipschitz
constants of the model and the policy, of degree growing with the unroll length H; spectral
normalization keeps those constants near 1. Two views of them:

* **The bound the theory uses**: the product over layers of each layer's spectral norm
  (:func:`layer_spectral_norms`, effective weights: a spectrally normalised layer counts with its
  ``1 / sigma`` scale as the network uses it in eval mode), :func:`lipschitz_bound`. It is in the
  network's own coordinates (the model sees normalised inputs; its activations' own Lipschitz
  constants, 1 for ReLU and about 1.1 for SiLU, are not included).
* **Measured along real unrolls**: the spectral norm of the Jacobian of one model step
  ``d s' / d [s, a]`` at real states and the policy's actions (:func:`step_jacobian_norms`), and
  of the closed-loop H-step map ``d s_H / d s_0`` with ``s_{t+1} = model(s_t, pi(s_t))``
  (:func:`unroll_jacobian_norms`), in raw observation units, one elite member per sample and
  step, the deterministic policy (its mean action) and the model's mean.
"""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["layer_spectral_norms", "lipschitz_bound", "step_jacobian_norms", "unroll_jacobian_norms"]


@torch.no_grad()
def layer_spectral_norms(net, out_columns: Optional[int] = None) -> torch.Tensor:
    """``[E, L]`` spectral norm of every member's effective weight per linear layer of an
    :class:`fastrp.nn.EnsembleMLP` (weights times the spectral-norm scale the network applies in
    eval mode). ``out_columns`` keeps only the first columns of the output layer (e.g. a policy's
    or a model's mean head)."""
    was_training = net.training
    net.eval()
    try:
        scales = net.scales() or [None] * len(net.weights)
        norms = []
        for layer, weight in enumerate(net.weights):
            w = weight.detach().double()
            if layer == len(net.weights) - 1 and out_columns is not None:
                w = w[..., :out_columns]
            if scales[layer] is not None:
                w = w * scales[layer].detach().double().view(-1, 1, 1)
            norms.append(torch.linalg.matrix_norm(w, ord=2))
        return torch.stack(norms, dim=1)
    finally:
        net.train(was_training)


def lipschitz_bound(net, out_columns: Optional[int] = None) -> torch.Tensor:
    """``[E]`` product over layers of the spectral norms (:func:`layer_spectral_norms`)."""
    return layer_spectral_norms(net, out_columns).prod(dim=1)


def _spectral(jac: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(jac.double(), ord=2)


def _rows_jacobian(outputs: torch.Tensor, inputs: torch.Tensor, retain: bool) -> torch.Tensor:
    """``[B, o, i]`` Jacobian of ``outputs[B, o]`` w.r.t. ``inputs[B, i]`` for row-independent maps
    (one backward pass per output dimension)."""
    rows = []
    for k in range(outputs.shape[1]):
        (g,) = torch.autograd.grad(outputs[:, k].sum(), (inputs,), retain_graph=retain or k + 1 < outputs.shape[1],
                                   allow_unused=True)
        rows.append(torch.zeros_like(inputs) if g is None else g)
    return torch.stack(rows, dim=1)


def step_jacobian_norms(model, policy, states: torch.Tensor, generator: Optional[torch.Generator] = None
                        ) -> torch.Tensor:
    """``[B]`` spectral norm of ``d s' / d [s, a]`` (one model step, the model's mean, one random
    elite per sample) at ``states`` and the deterministic policy's actions there."""
    with torch.no_grad():
        actions, _ = policy(states, deterministic=True)
    members = model.sample_elites(states.shape[0], generator)
    x = torch.cat([states, actions], dim=-1).detach().requires_grad_(True)
    with torch.enable_grad():
        nxt, _ = model.predict(x[:, : model.obs_dim], x[:, model.obs_dim:], members=members)
        jac = _rows_jacobian(nxt, x, retain=False)
    return _spectral(jac)


def unroll_jacobian_norms(model, policy, states: torch.Tensor, horizon: int,
                          generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """For ``h = 1 .. horizon``: ``[B]`` spectral norm of ``d s_h / d s_0`` of the closed loop
    ``s_{t+1} = model(s_t, pi(s_t))`` (deterministic policy, the model's mean, one random elite
    per sample and step, drawn from ``generator``)."""
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ValueError(f"horizon must be an int >= 1, got {horizon!r}")
    s0 = states.detach().clone().requires_grad_(True)
    out: List[torch.Tensor] = []
    with torch.enable_grad():
        s = s0
        for h in range(horizon):
            a, _ = policy(s, deterministic=True)
            members = model.sample_elites(s.shape[0], generator)
            s, _ = model.predict(s, a, members=members)
            out.append(_spectral(_rows_jacobian(s, s0, retain=True)).detach())
    return out
