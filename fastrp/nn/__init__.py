"""fastrp.nn: modules built on :mod:`fastrp.ops`.

* :class:`EnsembleMLP` - E independent MLPs in one fused call, optional spectral normalization
  (power-iteration vectors as buffers, updated in training mode only) and a forward-mode
  tangent path (``forward_jvp``).
* :class:`TanhGaussianPolicy`, :class:`TwinQ` - actor and twin critic on the fused ops.
* :class:`ProbabilisticEnsemble` - Gaussian ensemble dynamics model (prediction or DDPPO gradient
  model; trained by :class:`fastrp.rl.model_fit.ModelFitter`); :class:`RunningNormalizer` for
  input statistics.
"""

from .critic import TwinQ
from .ensemble import EnsembleMLP
from .model import ProbabilisticEnsemble
from .normalizer import RunningNormalizer
from .policy import TanhGaussianPolicy

__all__ = ["EnsembleMLP", "TanhGaussianPolicy", "TwinQ", "ProbabilisticEnsemble", "RunningNormalizer"]
