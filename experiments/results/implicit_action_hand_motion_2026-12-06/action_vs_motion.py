"""How much of the commanded (dx, dy, dz) the hand's measured motion explains, on the probe's
episodes at frame stride K: the probe's own linear fit (episode split, 70 % fit) from the hand's
true displacement between two kept frames to the summed actions between them (an oracle that sees
the motion exactly), the same with the hand's position added through a k-NN fit, and the same per
task (first 4 episodes fit, the rest held out). Run from the repository root:

    python action_vs_motion.py PROBE_DIR K [PRETRAIN_WORKDIR]   (episodes generated with `hand`)

With a pre-training workdir (saved at data.frame_stride K), each split also probes its codes and
those of a random initialisation (random features) to the action and to the hand's displacement.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.getcwd())
from prelar_jax.evaluation import pretrain_eval, probe  # noqa: E402

episodes = probe.stride_episodes(probe.read_npz_episodes(sys.argv[1]), int(sys.argv[2]))
actions = [ep["action"][1:, :3].astype(np.float64) for ep in episodes]
moves = [np.diff(ep["hand"].astype(np.float64), axis=0) for ep in episodes]
with_position = [np.c_[m, ep["hand"][:-1]] for m, ep in zip(moves, episodes)]
encoders = {}
if len(sys.argv) > 3:
    import jax

    from prelar_jax.pretrain import PretrainModel

    config, (params, stats, _) = probe._probe_config(sys.argv[3], None)
    assert config.data.frame_stride == int(sys.argv[2]), "probe at the model's frame stride"
    random_model = PretrainModel(probe.random_features_config(config))
    random_params, random_stats = jax.jit(random_model.init)(jax.random.key(0))
    encoders = {"codes": probe.episode_codes(probe.make_code_fn(PretrainModel(config)), params, stats, episodes),
                "random features": probe.episode_codes(probe.make_code_fn(random_model), random_params, random_stats,
                                                       episodes)}
for seed in (0, 1, 2):
    train, held = probe.split_episodes(len(episodes), 0.7, np.random.default_rng(seed))
    for name, codes in encoders.items():
        print(f"split {seed}: {name} -> action R2 {probe.linear_probe(codes, actions, train, held)['r2_mean']:.3f}, "
              f"-> hand displacement R2 {probe.linear_probe(codes, moves, train, held)['r2_mean']:.3f}")
    linear = probe.linear_probe(moves, actions, train, held)
    print(f"split {seed}: hand displacement -> action, linear R2 {np.round(linear['r2'], 3).tolist()} mean "
          f"{linear['r2_mean']:.3f}; displacement and position -> action, k-NN R2 "
          f"{pretrain_eval.knn_probe(with_position, actions, train, held):.3f}; action -> displacement, linear R2 "
          f"{probe.linear_probe(actions, moves, train, held)['r2_mean']:.3f}")
for task in sorted({ep["task"] for ep in episodes}):
    index = [i for i, ep in enumerate(episodes) if ep["task"] == task]
    result = probe.linear_probe(moves, actions, index[:4], index[4:])
    spread = np.concatenate([actions[i] for i in index]).std(axis=0)
    print(f"{task}: displacement -> action R2 {np.round(result['r2'], 2).tolist()}, summed-action std "
          f"{np.round(spread, 2).tolist()}")
