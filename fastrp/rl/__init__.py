"""fastrp.rl: the shared machinery of the trainer.

* :class:`~fastrp.rl.buffer.ReplayBuffer` - transitions on the training device.
* :mod:`~fastrp.rl.checkpoint` - atomic checkpoints, RNG and env state for exact resumes.
* :mod:`~fastrp.rl.logger` - metrics CSV, TensorBoard, progress line.
"""

from .buffer import Batch, ReplayBuffer

__all__ = ["Batch", "ReplayBuffer"]
