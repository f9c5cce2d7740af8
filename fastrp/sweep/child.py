"""``python -m fastrp.sweep.child PARENT_PID -- TRAIN_ARGS...``: the trainer process of one trial.

Started by the trial's Ray worker; runs ``fastrp.train.main(TRAIN_ARGS)`` in its own main thread
(so the trainer's signal handling and torch thread settings are its own). On Linux it asks the
kernel to send it SIGTERM when the Ray worker that started it dies, and exits at once if that
worker is already gone: a killed worker leaves no trainer behind that could write into the run
directory next to the retry.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        sys.exit(128 + int(signal.SIGTERM))


def main(argv) -> int:
    if len(argv) < 2 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m fastrp.sweep.child PARENT_PID -- TRAIN_ARGS...", file=sys.stderr)
        return 2
    _die_with_parent(int(argv[0]))
    from fastrp.train import main as train_main

    return train_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
