"""The benchmark: PreLAR against APV and DreamerV2 (and ablations) on Meta-World tasks over seeds.

    python experiments/benchmark.py --config=configs/benchmark.py:tiny --workdir=runs/bench_tiny
    python experiments/benchmark.py --config=configs/benchmark.py:paper --workdir=runs/bench \
        --config.methods=prelar,apv,dreamerv2,prelar_wo_cl --config.max_parallel=4
    python experiments/benchmark.py --config=configs/benchmark.py:paper --workdir=runs/bench --report

Every method is a pair (pre-training config + overrides, fine-tuning config + overrides) in
``METHODS`` below; methods sharing a pre-training share its run. Presets: ``tiny`` (CPU smoke run
of the whole pipeline in minutes), ``cpu`` (the 2-core CPU comparison, archived into
``experiments/results/benchmark_cpu`` run by run so that it accumulates over sittings), ``small``
(quarter-width models, 100k environment steps) and
``paper`` (the original protocol: 600k pre-training updates, 256k environment steps, evaluation
every 10k steps over 10 episodes, the six tasks of APV's reference results). After pre-training
the two pre-training diagnostics (``experiments/diagnostics.py``) run once and join the summary.
"""

import ml_collections

PRESETS = ("tiny", "cpu", "small", "paper")

# name -> pre-training (config file, overrides) or None, fine-tuning (config file, overrides).
METHODS = {
    "prelar": (("configs/prelar_pretrain.py", {}), ("configs/prelar_finetune.py", {})),
    # Ablations (spec 9.4 and the issue): same code, other configuration.
    "prelar_wo_cl": (("configs/prelar_pretrain.py", {"loss.consistency": "off"}), ("configs/prelar_finetune.py", {})),
    "prelar_wo_al_cl": (
        ("configs/prelar_pretrain.py", {"implicit_action.code_type": "deter", "loss.consistency": "off"}),
        ("configs/prelar_finetune.py", {}),
    ),
    "prelar_random_codes": (
        ("configs/prelar_pretrain.py", {"implicit_action.code_type": "random", "loss.consistency": "off"}),
        ("configs/prelar_finetune.py", {}),
    ),
    "prelar_sign": (("configs/prelar_pretrain.py", {"loss.consistency": "sign"}), ("configs/prelar_finetune.py", {})),
    # The implicit-action study's variant whose codes carry the action (follow-up 2, P15): the
    # code starts at zero, is deterministic and is shaped by a pixel forward model; no consistency.
    "prelar_fm": (
        (
            "configs/prelar_pretrain.py",
            {
                "implicit_action.head_init_scale": 0.0,
                "implicit_action.code_type": "deter",
                "loss.code_forward_scale": 30.0,
                "loss.consistency": "off",
            },
        ),
        ("configs/prelar_finetune.py", {}),
    ),
    "prelar_naive": (
        ("configs/prelar_pretrain.py", {}),
        ("configs/prelar_finetune.py", {"intrinsic.beta": 0.0, "loss.aux_reward_scale": 0.0}),
    ),
    # Every 4th frame: prelar_fm's losses at lr 1e-3 pre-trained on every 4th video frame, the one
    # setting whose implicit actions carried the hand's motion on Meta-World videos (probe R² 0.54
    # on new episodes of the pre-training tasks, 0.34 on unseen ones:
    # experiments/results/implicit_action_metaworld_stride_2026-12-06, run K4), fine-tuned with each
    # action held for 4 control steps so that one action spans what one implicit action did.
    # Its baseline is dreamerv2_repeat4. The time limit must be a multiple of 4
    # (--config.finetune.time_limit=152 at the cpu preset, whose 150 is not).
    "prelar_fm_stride4": (
        (
            "configs/prelar_pretrain.py",
            {
                "implicit_action.head_init_scale": 0.0,
                "implicit_action.code_type": "deter",
                "loss.code_forward_scale": 30.0,
                "loss.consistency": "off",
                "optimizer.lr": 1e-3,
                "data.frame_stride": 4,
            },
        ),
        ("configs/prelar_finetune.py", {"env.action_repeat": 4}),
    ),
    # Baselines.
    "apv": (("configs/apv_pretrain.py", {}), ("configs/apv_finetune.py", {})),
    "apv_original": (("configs/apv_pretrain.py", {}), ("configs/apv_finetune.py", {})),  # original presets
    "dreamerv2": (None, ("configs/dreamerv2.py", {})),
    "dreamerv2_repeat4": (None, ("configs/dreamerv2.py", {"env.action_repeat": 4})),
}
# Methods whose config files are used with the "original" variant of the size preset.
ORIGINAL_PRESETS = {"apv_original": {"paper": "original", "small": "original", "tiny": "original_tiny"}}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    preset = preset or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown benchmark preset {preset!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.methods = "prelar,apv,dreamerv2"
    c.tasks = "drawer-open,lever-pull,door-lock,button-press-topdown-wall,reach,dial-turn"
    c.seeds = 8
    c.max_parallel = 1  # runs at once; each fine-tuning run also starts its environment workers
    # Do not fine-tune a method whose pre-trained weights are bit-identical to an earlier method's
    # and whose fine-tuning settings are the same (its runs would repeat that method's; e.g.
    # prelar_sign = prelar_wo_cl); the report shows both as one. False runs every method.
    c.skip_identical = True
    c.wandb_mode = "offline"
    # Results directory to commit (e.g. experiments/results/benchmark_cpu; relative paths are from
    # the repository root): each finished run's small files are archived there as it ends, runs
    # found there are not run again on any machine, and the report is built from it
    # (prelar_jax/launch/archive.py). '' = report from the workdir only.
    c.results = ""
    # experiments/random_policy.py output whose success rate (at episodes of the fine-tuning
    # time limit, random_policy_steps) is drawn and listed beside each task's curves; '' = none.
    c.random_policy = ""
    c.random_policy_steps = 500

    c.videos = ml_collections.ConfigDict()
    c.videos.root = ""  # '' = render scripted-expert videos into <workdir>/videos
    c.videos.episodes = 50  # per task (the 40 non-benchmark tasks)
    c.videos.max_steps = 500
    c.videos.workers = 2
    c.videos.tasks_limit = 0  # 0 = all 40 default video tasks (the benchmark tasks are excluded)

    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.steps = 600_000
    c.pretrain.prelar = ""  # an existing pre-training workdir to reuse instead of pre-training
    c.pretrain.apv = ""

    # The two diagnostics of experiments/diagnostics.py, run once after pre-training (needs the
    # `prelar` method; APV's model joins the transfer diagnostic when `apv` is benchmarked too).
    c.diagnostics = ml_collections.ConfigDict()
    c.diagnostics.enabled = True
    c.diagnostics.task = ""  # target task of the transfer diagnostic; '' = the first benchmark task
    c.diagnostics.updates = 500  # world-model updates K (BatchNorm models need K in the hundreds)
    c.diagnostics.train_episodes = 10
    c.diagnostics.eval_episodes = 4
    c.diagnostics.probe_episodes = 4  # per probe task
    c.diagnostics.probe_steps = 100

    c.finetune = ml_collections.ConfigDict()
    c.finetune.steps = 256_000
    c.finetune.eval_every = 10_000
    c.finetune.eval_eps = 10
    # Control steps per episode of every fine-tuning run; 0 = the fine-tuning preset's own
    # (500; 150 at cpu). Methods that repeat actions need a multiple of their repeat.
    c.finetune.time_limit = 0
    if preset == "cpu":  # a grid that accumulates over sittings on a 2-core CPU (issue 13)
        # door-close: DreamerV2 learns it at the cpu preset in ~67 min (success 0.83-1.00 at
        # 28.5-30k steps); window-close: random success 0/20 in 150 steps, a dense reward.
        c.methods = "prelar,apv,dreamerv2,prelar_wo_cl,prelar_sign"
        c.tasks = "door-close,window-close"
        c.seeds = 3
        c.results = "experiments/results/benchmark_cpu"
        # Two runs side by side: ~1.25x the throughput of one at a time on 2 cores (a run alone
        # leaves ~1/4 of them idle while it steps its environments; notes.md there, "Cost").
        c.max_parallel = 2
        c.random_policy = "experiments/results/random_policy_2026-12-05/random_policy.json"
        c.random_policy_steps = 150
        c.videos.episodes = 4
        c.videos.max_steps = 150
        c.pretrain.steps = 2000  # ~40 min each on 2 cores (0.8 steps/s); 4 pre-trainings
        c.finetune.steps = 30_000
        c.finetune.eval_every = 3000
        c.finetune.eval_eps = 6
        c.diagnostics.task = "door-close"
        c.diagnostics.updates = 300
    elif preset == "small":
        c.seeds = 3
        c.pretrain.steps = 100_000
        c.finetune.steps = 100_000
        c.videos.episodes = 20
    elif preset == "tiny":
        c.methods = "prelar,dreamerv2"
        c.tasks = "drawer-open"
        c.seeds = 2
        c.max_parallel = 1  # seed 1 then reuses seed 0's compiled steps (XLA's persistent cache)
        c.videos.episodes = 1
        c.videos.max_steps = 40
        c.videos.tasks_limit = 4
        c.pretrain.steps = 20
        c.finetune.steps = 300
        c.finetune.eval_every = 100
        c.finetune.eval_eps = 1
        c.diagnostics.updates = 5
        c.diagnostics.train_episodes = 2
        c.diagnostics.eval_episodes = 1
        c.diagnostics.probe_episodes = 1
        c.diagnostics.probe_steps = 40
    return c
