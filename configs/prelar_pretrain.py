"""PreLAR pre-training config (spec sections 1-4, 8, 10, 13).

Select a preset after a colon and override any leaf on the command line::

    python experiments/pretrain.py --config=configs/prelar_pretrain.py:tiny --workdir=runs/tiny \
        --config.data.root=runs/videos --config.steps=200

Presets: ``paper`` (the original sizes: batch 16 x length 25, 600k updates), ``small`` (quarter
widths at the paper's batch, for quick GPU runs: 3.3 s per step on a 2-core CPU) and ``tiny`` (CPU
smoke tests, about 0.1 s per step).
"""

import ml_collections

from prelar_jax.runtime import config as config_lib

PRESETS = ("paper", "small", "cpu", "tiny")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "prelar"
    c.preset = "paper"
    c.seed = 0
    c.steps = 600_000
    c.batch_size = 16
    c.sequence_length = 25
    c.image_size = 64
    # Updates with a non-finite loss or gradient are skipped; this many in a row stop the run.
    c.nonfinite_limit = 20

    c.model = config_lib.model_config("paper")

    c.implicit_action = ml_collections.ConfigDict()
    c.implicit_action.code_type = "stoch"  # 'stoch' | 'deter' | 'mix' | 'none' (APV: zeros)
    c.implicit_action.input = "pixels"  # 'pixels' (released VANet) | 'embed' (MLP on embeddings)
    c.implicit_action.stoch = 64
    c.implicit_action.deter = 64
    c.implicit_action.hidden = 1024
    c.implicit_action.embed_layers = 2
    # Std of the code's KL prior N(0, s0^2). The original builds it with raw std 1 passed through
    # sigmoid2, so the effective s0 = 2 * sigmoid(0.5) = 1.2449 (spec 3.7); 1.0 is the textbook choice.
    c.implicit_action.prior_std = 1.2449186624037092
    c.implicit_action.action_dim = 50  # only for code_type 'none' (APV's fill_action 50)
    # Initial scale of the code network's output layer: 1 = the original; 0 = every code starts at
    # zero and grows only where the networks it feeds use it (implicit-action study, follow-up 2).
    c.implicit_action.head_init_scale = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.kl_scale = 1.0
    c.loss.kl_balance = 0.8
    c.loss.kl_free = 0.0
    c.loss.image_scale = 1.0
    # Image loss of the one-step prior prediction (decode the prior of o_t, built from o_{t-1}'s
    # posterior and the code of (o_{t-1}, o_t)). 0 in the original.
    c.loss.prior_image_scale = 0.0
    c.loss.implicit_kl_scale = 1.0
    # Free nats of the implicit-action KL (mean over pairs of the KL summed over code dimensions):
    # below it the KL has no gradient. 0 in the original, where the codes collapse onto the prior.
    c.loss.implicit_kl_free = 0.0
    # Updates over which the implicit-KL scale ramps linearly from 0 (KL annealing); 0 = off (original).
    c.loss.implicit_kl_warmup = 0
    # Forward model of the code (0 = off, the original): a small network predicts o_t from o_{t-1}
    # and the code a~_t; its error, as a fraction of the change o_t - o_{t-1}, is added with this
    # scale. It trains only the code network and itself, and makes the change between frames the
    # cheap thing for the code to carry (LAPO's principle). Space: 'pixels' (a small U-Net on the
    # frames) or 'embed' (an MLP on the stopped world-model embeddings).
    c.loss.code_forward_scale = 0.0
    c.loss.code_forward_space = "pixels"
    c.loss.consistency = "tanh"  # 'off' | 'sign' (released: zero gradient) | 'tanh' | 'ranknet' | 'soft_spearman'
    c.loss.consistency_scale = 1.0
    c.loss.consistency_temperature = 0.2

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 3e-4
    c.optimizer.eps = 1e-5
    c.optimizer.clip = 100.0
    c.optimizer.weight_decay = 1e-6

    c.data = ml_collections.ConfigDict()
    c.data.kind = "npz"  # 'npz' (our generated shards, APV's RLBench episodes) | 'something'
    c.data.root = ""  # directory (or comma-separated directories) of videos
    c.data.video_list = ""  # Something-Something-V2: train_video_folder.txt
    # Every k-th frame of the videos (1/k of their frame rate). One control step of Meta-World moves
    # the arm by under a pixel or two at 64x64; k > 1 makes each frame pair show k steps of motion.
    # The implicit-action probe reads the same pairs (summing the k actions between them).
    c.data.frame_stride = 1
    c.data.prefetch_threads = 2
    c.data.prefetch_buffer = 4

    c.log = ml_collections.ConfigDict()
    c.log.every = 100  # metrics.jsonl / wandb / console
    c.log.media_every = 5000  # open-loop prediction grids under media/
    c.log.media_examples = 4
    c.log.media_context = 5
    c.log.checkpoint_every = 5000
    c.log.keep_checkpoints = 3
    c.log.wandb_mode = "offline"  # 'online' | 'offline' | 'disabled'
    c.log.wandb_project = "prelar-jax"
    return c


def apply_preset(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} for {c.method} pre-training; choose one of {PRESETS}")
    c.preset = preset
    c.model = config_lib.model_config(preset)
    code, hidden = config_lib.action_sizes(preset)
    c.implicit_action.stoch = c.implicit_action.deter = code
    c.implicit_action.hidden = hidden
    if preset == "small":
        c.steps = 100_000
        c.log.every = 50
        c.log.media_every = 1000
        c.log.checkpoint_every = 1000
    elif preset == "cpu":
        c.steps = 5000
        c.sequence_length = 16
        c.log.every = 50
        c.log.media_every = 1000
        c.log.checkpoint_every = 1000
    elif preset == "tiny":
        c.steps = 200
        c.batch_size = 4
        c.sequence_length = 8
        c.log.every = 10
        c.log.media_every = 100
        c.log.media_examples = 2
        c.log.media_context = 3
        c.log.checkpoint_every = 50
    return c


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
    return apply_preset(base_config(), preset or "paper")
