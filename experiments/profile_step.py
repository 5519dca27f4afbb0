"""Where one compiled training step's time goes, op by op: a ``jax.profiler`` trace of a few
steps, its XLA ops summed by op class and by model module (``prelar_jax.perf.op_profile``).

    python experiments/profile_step.py --config=configs/prelar_pretrain.py:cpu --steps=5 --out=/tmp/prof_pre
    python experiments/profile_step.py --config=configs/dreamerv2.py:cpu --steps=5 --out=/tmp/prof_ft

A fine-tuning config profiles the whole update (world model + actor-critic). One device, a fixed
random batch; writes the trace, ``profile.json`` and ``profile.md`` into ``--out``.
"""

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
from absl import app, flags
from ml_collections import config_flags

from prelar_jax.learners import finetune as agent_lib
from prelar_jax.learners import pretrain
from prelar_jax.perf import op_profile
from prelar_jax.perf.throughput_report import random_batch
from prelar_jax.runtime import parallel, steps

_CONFIG = config_flags.DEFINE_config_file("config", "configs/prelar_pretrain.py:tiny", "Config and preset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Traced calls.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untraced calls after compilation.")
_OUT = flags.DEFINE_string("out", "/tmp/prelar_profile", "Directory for the trace and the report.")
_TOP = flags.DEFINE_integer("top", 15, "Longest ops listed.")


def main(argv):
    del argv
    config = _CONFIG.value
    finetune = "actor_critic" in config
    mesh = parallel.make_mesh(jax.devices()[:1])
    if finetune:
        agent = agent_lib.FinetuneAgent(config, bn_axis_name=parallel.AXIS)
        state = agent.init_state(jax.random.key(0))
        step = steps.make_finetune_step(agent, mesh, seed=0)
    else:
        model = pretrain.PretrainModel(config, bn_axis_name=parallel.AXIS)
        optimizer = pretrain.make_optimizer(config)
        state = model.init_state(jax.random.key(0), optimizer)
        step = steps.make_pretrain_step(model.loss, optimizer, mesh, seed=0)
    state = parallel.put_replicated(state, mesh)
    batch = parallel.put_batch(random_batch(config, finetune), mesh)
    compiled = step.lower(state, batch).compile()
    for _ in range(_WARMUP.value):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    out = os.path.abspath(_OUT.value)
    with jax.profiler.trace(out, create_perfetto_trace=True):
        for _ in range(_STEPS.value):
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
    trace = sorted(glob.glob(os.path.join(out, "plugins", "profile", "*", "perfetto_trace.json.gz")))[-1]
    result = op_profile.breakdown(
        op_profile.hlo_ops(compiled.as_text()),
        op_profile.trace_op_times(op_profile.read_trace(trace)),
        top_ops=_TOP.value,
    )
    title = f"{config.method} {'fine-tuning update' if finetune else 'pre-training step'}, preset {config.preset}"
    report = f"# {title}\n\n{op_profile.format_breakdown(result, _STEPS.value)}\n"
    with open(os.path.join(out, "profile.json"), "w") as handle:
        json.dump({"title": title, "calls": _STEPS.value, "trace": trace, **result}, handle, indent=1)
    with open(os.path.join(out, "profile.md"), "w") as handle:
        handle.write(report)
    print(report)


if __name__ == "__main__":
    from prelar_jax.runtime import xla_setup

    xla_setup.use_fast_allocator()  # tcmalloc when installed, as the training scripts run
    app.run(main)
