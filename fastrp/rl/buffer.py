"""Replay buffer living on the training device (uniform sampling, ring storage)."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np
import torch


class Batch(NamedTuple):
    """A minibatch of transitions: ``obs[B, obs_dim]``, ``action[B, act_dim]``, ``reward[B]``,
    ``next_obs[B, obs_dim]``, ``terminated[B]`` (float 0/1: no bootstrap past a true terminal)."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor


class ReplayBuffer:
    """Fixed-capacity ring buffer of float32 transitions on ``device``.

    ``add`` copies a batch of rows in (numpy or tensors); ``sample`` draws indices with
    ``torch.randint`` on the device (the host only knows the fill count, no synchronisation).
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dim, self.act_dim, self.capacity = int(obs_dim), int(act_dim), int(capacity)
        self.device = torch.device(device)
        kw = dict(dtype=torch.float32, device=self.device)
        self.obs = torch.zeros(capacity, obs_dim, **kw)
        self.action = torch.zeros(capacity, act_dim, **kw)
        self.reward = torch.zeros(capacity, **kw)
        self.next_obs = torch.zeros(capacity, obs_dim, **kw)
        self.terminated = torch.zeros(capacity, **kw)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _fields(self):
        return (self.obs, self.action, self.reward, self.next_obs, self.terminated)

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        """Append ``n`` rows (``obs[n, obs_dim]``, ..., ``terminated[n]``); the oldest are overwritten."""
        rows = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in
                (obs, action, reward, next_obs, terminated)]
        n = rows[0].shape[0]
        if n > self.capacity:
            rows = [r[-self.capacity:] for r in rows]
            n = self.capacity
        idx = (torch.arange(n) + self.pos) % self.capacity
        idx = idx.to(self.device)
        for dst, src in zip(self._fields(), rows):
            dst[idx] = src.to(device=self.device, dtype=torch.float32).reshape(dst[idx].shape)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        if self.size == 0:
            raise RuntimeError("sample() from an empty buffer")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device, generator=generator)
        return self.gather(idx)

    def gather(self, idx: torch.Tensor) -> Batch:
        """The transitions at storage indices ``idx``."""
        return Batch(*(f[idx] for f in self._fields()))

    def latest(self, n: int) -> Batch:
        """The ``min(n, size)`` most recently added transitions (oldest first)."""
        n = min(int(n), self.size)
        if n <= self.pos:  # contiguous: views, no index tensor (called every env step)
            return Batch(*(f[self.pos - n: self.pos] for f in self._fields()))
        idx = (torch.arange(self.pos - n, self.pos) % self.capacity).to(self.device)
        return self.gather(idx)

    def all(self) -> Batch:
        """Every stored transition (storage order)."""
        return Batch(*(f[: self.size] for f in self._fields()))

    def state_dict(self) -> Dict[str, object]:
        """The stored rows (only the filled part) and the ring position, on the CPU."""
        return {"pos": self.pos, "size": self.size, "capacity": self.capacity,
                "data": [f[: self.size].cpu() for f in self._fields()]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore rows saved by :meth:`state_dict`; the capacity may differ (a resumed run with more
        steps): rows are re-laid oldest first, keeping the latest ``capacity``."""
        size, pos = int(state["size"]), int(state["pos"])
        for dst, src in zip(self._fields(), state["data"]):
            if size == self.capacity and int(state["capacity"]) == self.capacity:
                dst.copy_(src.to(self.device))
                continue
            chrono = torch.roll(src, -pos, dims=0) if size == int(state["capacity"]) else src
            chrono = chrono[-self.capacity:]
            dst[: chrono.shape[0]] = chrono.to(self.device)
        if size == self.capacity and int(state["capacity"]) == self.capacity:
            self.pos, self.size = pos, size
        else:
            self.size = min(size, self.capacity)
            self.pos = self.size % self.capacity
