"""``RunningNormalizer``: per-feature mean / std from streaming batches (parallel Welford).

Two uses in fastrp:

* RP-PGM's observation normalisation: a running estimate over everything seen, with the std
  clipped to ``[0.1, 10]`` (``clip_std=(0.1, 10.0)``).
* The learned model's input normalisation on ``[obs, act]``: refit on the training data before
  every model fit (``reset()`` then ``update(x)``), std floored at ``eps``.

All statistics are buffers (``count``, ``mean``, ``var``, ``std``), so they move with ``.to()``
and round-trip through ``state_dict()``. ``update`` never synchronises with the host.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from fastrp.ops._common import check_tensor

__all__ = ["RunningNormalizer"]


class RunningNormalizer(nn.Module):
    """Running per-feature mean and standard deviation of ``dim``-wide rows.

    Batches are merged with the parallel-variance formula (Chan et al.): for the running
    ``(n_a, mean_a, M2_a)`` and a batch ``(n_b, mean_b, M2_b)``,
    ``mean = mean_a + delta * n_b / n``, ``M2 = M2_a + M2_b + delta^2 n_a n_b / n`` with
    ``delta = mean_b - mean_a`` and ``n = n_a + n_b``; the merge runs in float64. ``var`` is the
    population variance ``M2 / n`` (numpy's ``x.var()``, ``ddof=0``).

    ``std`` is ``sqrt(var)`` clamped to ``clip_std = (lo, hi)`` when given, else floored at
    ``eps``. Before the first update ``mean = 0`` and ``std = 1`` (identity map).

    Args:
        dim: feature width.
        eps: lower bound on the std when ``clip_std`` is None (``> 0``).
        clip_std: optional ``(lo, hi)`` with ``0 < lo <= hi``; RP-PGM uses ``(0.1, 10.0)``.

    Buffers: ``count`` (float64 scalar, rows seen), ``mean[dim]`` and ``var[dim]`` (float64),
    ``std[dim]`` (float32).
    """

    def __init__(self, dim: int, eps: float = 1e-8, clip_std: Optional[Tuple[float, float]] = None) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a float > 0, got {eps!r}")
        if clip_std is not None:
            if len(clip_std) != 2 or not 0 < float(clip_std[0]) <= float(clip_std[1]):
                raise ValueError(f"clip_std must be (lo, hi) with 0 < lo <= hi, or None, got {clip_std!r}")
            clip_std = (float(clip_std[0]), float(clip_std[1]))
        self.dim = dim
        self.eps = float(eps)
        self.clip_std = clip_std
        # the running moments stay in float64: merged one row at a time over millions of env
        # steps, float32 storage would stop absorbing updates once delta / n drops below an ulp
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("std", torch.ones(dim))
        self.reset()

    def reset(self) -> None:
        """Forget every batch: ``count = 0``, ``mean = 0``, ``var = std = 1``."""
        with torch.no_grad():
            self.count.zero_()
            self.mean.zero_()
            self.var.fill_(1.0)
            self.std.copy_(self._bounded_std(self.var))

    def _bounded_std(self, var: torch.Tensor) -> torch.Tensor:
        std = var.sqrt()
        if self.clip_std is not None:
            return std.clamp(self.clip_std[0], self.clip_std[1])
        return std.clamp_min(self.eps)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x[B, dim]`` (any float dtype, the buffers' device) into the
        statistics. An empty batch changes nothing."""
        check_tensor("x", x, shape=(None, self.dim), dtypes=(torch.float32, torch.float64), device=self.mean.device,
                     what=f"[B, {self.dim}] float32/float64 on {self.mean.device}")
        n_b = x.shape[0]
        if n_b == 0:
            return
        xb = x.detach().to(torch.float64)
        mean_b = xb.mean(dim=0)
        m2_b = (xb - mean_b).square().sum(dim=0)
        n_a = self.count
        mean_a = self.mean
        m2_a = self.var * n_a
        n = n_a + n_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        m2 = m2_a + m2_b + delta.square() * (n_a * n_b / n)
        var = m2 / n
        self.count.copy_(n)
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.std.copy_(self._bounded_std(var))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` over the last dimension (``x[..., dim]``), in ``x``'s dtype;
        differentiable in ``x``."""
        self._check_last_dim(x)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean``."""
        self._check_last_dim(x)
        return x * self.std.to(x.dtype) + self.mean.to(x.dtype)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``x / std`` without the shift: maps differences (directions, tangents) of raw rows
        into normalised coordinates."""
        self._check_last_dim(x)
        return x / self.std.to(x.dtype)

    def _check_last_dim(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [..., {self.dim}], got {got}")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, clip_std={self.clip_std}"
