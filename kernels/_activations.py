"""Activations shared by the Triton kernels: codes, ``act(z)``, ``act'(z)`` and both at once.

``tanh`` is a short Taylor series near 0 and ``sign(z) (1 - e) / (1 + e)`` with
``e = exp(-2|z|)`` elsewhere: relative accuracy near 0 (``2·sigmoid(2z) - 1`` has only absolute
accuracy there, and returns 0 for ``|z| < 3e-8``) and no overflow for large ``|z|``.
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "relu": 1, "tanh": 2}


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def tanh(z):
    """``tanh(z)``: its Taylor series for ``|z| < 1/16`` (terms to ``z^11``: relative accuracy
    near 0, where exp-based forms keep only absolute accuracy), ``sign(z) (1 - e) / (1 + e)`` with
    ``e = exp(-2|z|)`` beyond (no overflow for large ``|z|``)."""
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    r = (1.0 - e) / (1.0 + e)
    z2 = z * z
    p = -1382.0 / 155925.0
    p = p * z2 + 62.0 / 2835.0
    p = p * z2 - 17.0 / 315.0
    p = p * z2 + 2.0 / 15.0
    p = p * z2 - 1.0 / 3.0
    small = z + z * z2 * p
    return tl.where(a < 0.0625, small, tl.where(z < 0, -r, r))


@triton.jit
def act(z, ACT: tl.constexpr):
    """``act(z)`` for ACT 0 = silu, 1 = relu, 2 = tanh."""
    if ACT == 0:
        out = z * sigmoid(z)
    elif ACT == 1:
        out = tl.where(z > 0.0, z, 0.0 * z)  # NaN stays NaN (tl.maximum would return 0)
    else:
        out = tanh(z)
    return out


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """``act'(z)``."""
    if ACT == 0:
        sg = sigmoid(z)
        out = sg * (1.0 + z * (1.0 - sg))
    elif ACT == 1:
        out = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    else:
        t = tanh(z)
        out = 1.0 - t * t
    return out


@triton.jit
def act_and_grad(z, ACT: tl.constexpr):
    """``(act(z), act'(z))``."""
    if ACT == 0:
        sg = sigmoid(z)
        return z * sg, sg * (1.0 + z * (1.0 - sg))
    elif ACT == 1:
        pos = z > 0
        return tl.where(pos, z, 0.0 * z), tl.where(pos, 1.0, 0.0)
    else:
        th = tanh(z)
        return th, 1.0 - th * th
