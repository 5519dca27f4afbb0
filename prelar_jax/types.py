"""Type names shared by the modules (one definition)."""

from __future__ import annotations

from typing import Any

import jax

Params = Any  # a pytree of arrays: module name -> its flax parameters (or BatchNorm statistics)
Metrics = dict[str, jax.Array]  # scalar metrics of one update, averaged over devices
