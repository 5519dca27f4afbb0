"""Small pieces both training loops (pre-training, fine-tuning) share."""

from __future__ import annotations

import signal
from typing import Any

import jax
import numpy as np


def local_value(value: jax.Array) -> jax.Array:
    """This process's replica of a replicated array (a multi-host global array cannot be read
    whole by one process; on one process this is the array itself)."""
    return value.addressable_data(0)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived signal {signum}: saving a checkpoint and stopping "
              "(send it again to stop immediately)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
