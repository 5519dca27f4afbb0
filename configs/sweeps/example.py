"""Example sweep: the KL scale of the world-model loss against the actor's entropy bonus,
2 x 2 values x 2 seeds = 8 tiny fine-tuning runs of PreLAR's agent on drawer-open (from scratch
here, so that it runs without a pre-training workdir; see "pretrained" below).

    python experiments/sweep.py --sweep=configs/sweeps/example.py --out=runs/sweep_example --print
    python experiments/sweep.py --sweep=configs/sweeps/example.py --out=runs/sweep_example --max_parallel=2

The first prints one shell command per run (for a cluster scheduler: each command resumes its
own workdir when re-run); the second runs them here, two at a time, and writes
runs/sweep_example/runs.json (status of every run) and results.csv (evaluation success rate and
return per run and step). Each run's workdir is named after its overrides, e.g.
runs/sweep_example/kl_scale=0.5,actor_ent=0.0001,seed=0, and its output is in run.log there.
Re-running the same command skips finished runs and resumes the others.

The keys a sweep dict may have:
  base    config file and preset every run starts from (any key of it can be swept).
  script  the training entry point (default experiments/finetune.py).
  fixed   overrides for every run, not part of the run names.
  grid    key -> list of values; the runs are the cartesian product.
  list    a list of override dicts, one per run; with a grid, each entry is crossed with the grid
          (a key belongs to one of them), e.g.
          "list": [{"intrinsic.beta": 0.0, "loss.aux_reward_scale": 0.0}, {"intrinsic.beta": 1.0}].
Keys are dotted config keys, exactly as in --config.<key>=<value>; a key the base config does
not have is an error before anything runs.
"""


def get_sweep():
    return {
        "base": "configs/prelar_finetune.py:tiny",
        "script": "experiments/finetune.py",
        # Add "pretrained": "runs/quickstart/pretrain" (a tiny pre-training workdir, e.g. from
        # experiments/quickstart.sh) to fine-tune a pre-trained world model instead.
        "fixed": {"task": "drawer-open"},
        "grid": {
            "loss.kl_scale": [0.5, 1.0],
            "actor_critic.actor_ent": [1e-4, 1e-3],
            "seed": [0, 1],
        },
    }
