"""fastrp.nn: modules built on :mod:`fastrp.ops`.

* :class:`EnsembleMLP` - E independent MLPs in one fused call, optional spectral normalization
  (power-iteration vectors as buffers, updated in training mode only) and a forward-mode
  tangent path (``forward_jvp``).
"""

from .ensemble import EnsembleMLP

__all__ = ["EnsembleMLP"]
