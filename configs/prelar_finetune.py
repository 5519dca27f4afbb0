"""PreLAR fine-tuning on a Meta-World task (spec sections 5-7, 10).

    python experiments/finetune.py --config=configs/prelar_finetune.py:paper \
        --config.task=drawer-open --config.pretrained=runs/pretrain --workdir=runs/drawer-open

``pretrained`` is a pre-training workdir: its encoder, decoder and RSSM are loaded (the
implicit-action encoder is not). The preset must match the pre-training preset (same sizes).
Presets: ``paper`` (the original protocol: 256k environment steps, batch 50 x 50), ``small``
(the ``small`` world model, 100k steps), ``cpu`` (learning runs on a 2-core CPU: 30k steps,
batch 16 x 16, ~75 min) and ``tiny`` (a CPU smoke run of a few minutes).
Rendering: ``paper`` keeps the paper's look (shadows, reflections, 4x multisampling); ``small``,
``cpu`` and ``tiny`` (CPU runs, tests, quickstart) render lean, ~10x faster in software OpenGL.
DreamerV2 from scratch is ``configs/dreamerv2.py``, a configuration of the same code.
"""

import ml_collections

from prelar_jax.runtime import config as config_lib
from prelar_jax.envs import rendering

PRESETS = config_lib.MODEL_PRESETS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "prelar"
    c.preset = "paper"
    c.seed = 0
    c.task = "drawer-open"
    c.pretrained = ""  # a pre-training workdir (its latest checkpoint is loaded); '' = from scratch

    # Environment steps (prefill included), as the original counts them.
    c.steps = 256_000
    c.prefill = 5000  # uniform random actions before learning starts
    c.pretrain = 100  # world-model warm-up updates on prefill data; also the encoder/RSSM LR-0 phase
    c.train_every = 5  # one update every `train_every` environment steps ...
    c.train_steps = 1  # ... of this many (world model + actor-critic) updates
    c.eval_every = 10_000
    c.eval_eps = 10
    c.batch_size = 50
    c.sequence_length = 50
    c.image_size = 64
    # Updates with a non-finite loss or gradient are skipped; this many in a row stop the run.
    c.nonfinite_limit = 20

    c.env = ml_collections.ConfigDict()
    c.env.num_envs = 1  # training environments, each in its own worker process
    c.env.eval_envs = 1  # evaluation workers (eval_eps episodes are spread over them)
    c.env.time_limit = 500  # control steps per episode
    # Each policy action is applied for this many control steps (Dreamer's action repeat; the
    # original protocol repeats none; it must divide env.time_limit). The step counts (steps,
    # prefill, train_every, eval_every, log.*_every) stay in control steps; the replay stores one
    # frame per action (replay.capacity and sequence_length count those), so an episode holds
    # time_limit / action_repeat + 1 frames. A pre-training at data.frame_stride k matches k here.
    c.env.action_repeat = 1
    c.env.camera = "corner"
    # Rendering (prelar_jax.envs.rendering.RenderSettings): True = as the Meta-World model defines it,
    # the look of the original runs. Software OpenGL renders ~16 frames/s per core with all of them on,
    # ~170 with all off (the `lean` settings of the small and tiny presets below; frames differ by
    # ~5/255 on average: shadows and anti-aliasing); per-setting costs in experiments/BENCHMARKS.md.
    c.env.render = ml_collections.ConfigDict(rendering.PAPER.to_dict())  # shadows, reflections,
    #   multisampling (4x MSAA), full_buffer (the model's 640x480 offscreen buffer)
    c.env.step_timeout = 120.0  # seconds before a silent worker is restarted

    c.replay = ml_collections.ConfigDict()
    c.replay.capacity = 1_000_000  # environment steps
    c.replay.prioritize_ends = True
    # Keep a copy of the replay on the accelerator(s) and draw every batch there
    # (prelar_jax/runtime/device_replay.py): no host gather and no host->device batch copy per update.
    # The host replay still writes the episode files and checkpoints. The device ring is replicated:
    # device_capacity steps (0 = replay.capacity) x ~12.3 kB per 64x64 step on every device.
    c.replay.on_device = False
    c.replay.device_capacity = 0

    c.model = config_lib.model_config("paper")

    # Real actions -> the RSSM's action slot. 'mlp': Linear(4->hidden), ELU, Linear(hidden->code)
    # (the original ActionEncoder, deter 64); 'none': raw actions (DreamerV2); 'pad': zero-padded
    # to code_size (APV's fill_action 50).
    c.action_encoder = ml_collections.ConfigDict()
    c.action_encoder.kind = "mlp"
    c.action_encoder.code_size = 64
    c.action_encoder.hidden = 1024
    c.action_dim = 4
    # APV (configs/apv_finetune.py): the pre-trained RSSM becomes an action-free RSSM under a new
    # action-conditional one (spec 9.1).
    c.stacked = False

    c.heads = ml_collections.ConfigDict()
    c.heads.layers = 4
    c.heads.units = 400

    c.loss = ml_collections.ConfigDict()
    c.loss.kl_scale = 1.0
    c.loss.kl_balance = 0.8
    c.loss.kl_free = 0.0
    c.loss.image_scale = 1.0
    c.loss.reward_scale = 1.0
    c.loss.aux_reward_scale = 1.0  # 0 removes the auxiliary (extrinsic-only) reward head

    # APV's video-based intrinsic bonus (spec 5.4); beta = 0 turns it off.
    c.intrinsic = ml_collections.ConfigDict()
    c.intrinsic.beta = 1.0
    c.intrinsic.window = 5
    c.intrinsic.k = 16
    c.intrinsic.queue_dim = 128
    c.intrinsic.capacity = 4096
    c.intrinsic.momentum = 0.99

    c.actor_critic = ml_collections.ConfigDict()
    c.actor_critic.horizon = 15
    c.actor_critic.discount = 0.99
    c.actor_critic.lambda_ = 0.95
    c.actor_critic.actor_ent = 1e-4
    c.actor_critic.slow_update_every = 100
    c.actor_critic.actor_lr = 8e-5
    c.actor_critic.critic_lr = 8e-5
    c.actor_critic.min_std = 0.1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-4
    c.optimizer.eps = 1e-5
    c.optimizer.clip = 100.0
    c.optimizer.weight_decay = 1e-6
    # Modules in the "pre-trained" optimiser group: their own clip, learning rate 0 for the first
    # `pretrain` updates (spec 5.2). Empty: one group over the whole world model (DreamerV2).
    c.optimizer.pretrained_group = "encoder,rssm"

    c.log = ml_collections.ConfigDict()
    c.log.every = 100  # updates between metric lines
    c.log.media_every = 50_000  # environment steps between open-loop prediction grids
    c.log.media_examples = 4
    c.log.media_context = 5
    # One evaluation episode (worker 0's first) per evaluation as media/eval_<step>.gif and to W&B.
    c.log.eval_video = True
    c.log.eval_video_fps = 20.0
    c.log.checkpoint_every = 10_000  # environment steps
    c.log.keep_checkpoints = 2
    c.log.wandb_mode = "offline"
    c.log.wandb_project = "prelar-jax"
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for fine-tuning; choose one of {PRESETS}")
    c.preset = preset
    encoder = c.model.encoder
    c.model = config_lib.model_config(preset)
    if preset != "cpu":  # the cpu preset uses one encoder for every method (the plain CNN)
        c.model.encoder = encoder
    c.action_encoder.code_size, c.action_encoder.hidden = config_lib.action_sizes(preset)
    if preset in ("small", "cpu", "tiny"):  # CPU runs: lean rendering, ~10x faster than the paper's look
        c.env.render.update(rendering.LEAN.to_dict())
    if preset == "small":
        c.steps = 100_000
        c.heads.units = 200
        c.log.media_every = 20_000
    elif preset == "cpu":  # learning runs on a 2-core CPU (README "Learning")
        # The settings with which DreamerV2 learned door-close (eval success 0.83-1.00 at 28.5-30k
        # steps in ~67 min: experiments/results/dreamerv2_cpu_door-close_2026-12-05): batch
        # 16 x 16 and one update every 10 steps keep a run within ~75 min on 2 cores.
        c.steps = 30_000
        c.prefill = 1500
        c.train_every = 10
        c.eval_every = 3000
        c.eval_eps = 6
        c.batch_size = 16
        c.sequence_length = 16
        c.env.time_limit = 150
        c.env.eval_envs = 2
        c.heads.layers = 2
        c.heads.units = 256
        c.log.every = 50
        c.log.media_every = 10_000
        c.log.checkpoint_every = 5000
    elif preset == "tiny":
        c.steps = 600
        c.prefill = 200
        c.pretrain = 5
        c.train_every = 10
        c.eval_every = 300
        c.eval_eps = 2
        c.batch_size = 4
        c.sequence_length = 8
        c.env.time_limit = 50
        c.intrinsic.window = 3
        c.intrinsic.k = 4
        c.intrinsic.queue_dim = 8
        c.intrinsic.capacity = 64
        c.actor_critic.horizon = 5
        c.actor_critic.slow_update_every = 10
        c.heads.layers = 2
        c.heads.units = 32
        c.log.every = 5
        c.log.media_every = 300
        c.log.media_examples = 2
        c.log.media_context = 3
        c.log.checkpoint_every = 200
    return c


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    return apply_preset(base_config(), preset or "paper")
