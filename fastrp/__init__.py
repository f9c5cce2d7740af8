"""fastrp: fast model-based reparameterization policy gradients.

* :mod:`fastrp.ops` - fused ensemble-MLP, spectral-norm, JVP, kNN and finite-difference kernels.
* :mod:`fastrp.nn`  - modules built on those ops.
"""

__version__ = "0.1.0"

from . import _ext  # noqa: F401  (soft import of the compiled extension)
from ._ext import has_cuda_ext, has_ext  # noqa: F401

_ext.warn_missing_ext()
