"""Measure the pre-training step or the fine-tuning update: compile time, median step time,
FLOP/s and memory.

    python experiments/throughput.py --config=configs/prelar_pretrain.py:paper --devices=1 --steps=5
    python experiments/throughput.py --config=configs/prelar_finetune.py:paper --steps=2 --warmup=1

A fine-tuning config (``prelar_finetune.py``, ``dreamerv2.py``) measures one whole update (world
model + actor-critic with imagination from every posterior state). Environment throughput is
``experiments/env_throughput.py``.

Random uint8 batches are used (no data loading), so the figure is the device step alone. Each
measured step is synchronised with ``block_until_ready``; the median over ``--steps`` runs after
``--warmup`` runs is reported, and a JSON record is written with ``--out``.
"""

import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _early_device_flags(argv):
    # Fake CPU devices must be requested before JAX is imported.
    for arg in argv:
        if arg.startswith("--devices="):
            count = int(arg.split("=", 1)[1])
            flags = os.environ.get("XLA_FLAGS", "")
            if count > 1 and "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


_early_device_flags(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prelar_jax import agent as agent_lib, parallel, pretrain  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/prelar_pretrain.py:tiny", "Config and preset.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices in the data mesh (fake CPU devices on CPU).")
_STEPS = flags.DEFINE_integer("steps", 10, "Measured steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Unmeasured steps after compilation.")
_OUT = flags.DEFINE_string("out", "", "Write the JSON record here.")


def main(argv):
    del argv
    config = _CONFIG.value
    devices = jax.devices()[: _DEVICES.value]
    if len(devices) < _DEVICES.value:
        raise app.UsageError(f"asked for {_DEVICES.value} devices, found {len(jax.devices())}")
    mesh = parallel.make_mesh(devices)
    parallel.check_batch_divides(config.batch_size, mesh)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.sequence_length, config.image_size, config.image_size, 3)
    is_first = np.zeros(shape[:2], bool)
    is_first[:, 0] = True
    host_batch = {"image": rng.integers(0, 256, shape, dtype=np.uint8), "is_first": is_first}
    if "actor_critic" in config:  # a fine-tuning config: one world-model + actor-critic update
        kind, loss_key = "finetune update", "model_loss"
        agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
        state = parallel.put_replicated(agent.init_state(jax.random.key(0)), mesh)
        host_batch["action"] = rng.uniform(-1, 1, shape[:2] + (config.action_dim,)).astype(np.float32)
        host_batch["reward"] = rng.random(shape[:2]).astype(np.float32)
        step = agent_lib.make_update_step(agent, mesh, seed=0)
    else:
        kind, loss_key = "pretrain step", "loss"
        model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
        optimizer = pretrain.make_optimizer(config)
        state = parallel.put_replicated(model.init_state(jax.random.key(0), optimizer), mesh)
        step = parallel.make_train_step(model.loss, optimizer, mesh, seed=0)
    batch = parallel.put_batch(host_batch, mesh)
    compiled, info = parallel.compile_ahead(step, state, batch)
    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    record = {
        "kind": kind, "preset": config.preset, "method": config.method, "devices": len(devices),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "batch": config.batch_size, "length": config.sequence_length,
        "compute_dtype": config.model.compute_dtype,
        "compile_seconds": round(info.seconds, 2), "step_seconds_median": median,
        "step_seconds_all": times, "flops_per_step": info.flops,
        "flops_per_second": (info.flops / median) if info.flops else None,
        "memory_bytes": info.memory, "loss": float(metrics[loss_key]),
    }
    print(f"{kind} [{config.preset}, {len(devices)} x {devices[0].platform}]: "
          f"median {median * 1e3:.1f} ms over {len(times)} steps; {info.describe()}; "
          + (f"{record['flops_per_second'] / 1e9:.2f} GFLOP/s" if info.flops else ""))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    app.run(main)
