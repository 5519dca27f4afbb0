"""The setting of tests/test_learning.py's square pre-training, with any overrides; used to choose
its learning rate and to check that its assertions fail when what they depend on is broken.
Run from the repository root:

    python square_study.py STEPS EVAL_EVERY [KEY=VALUE ...]
    BREAK=zero_code_in_rssm python square_study.py ...   # the RSSM sees zero codes (train + predict)
"""
import ast, json, os, sys, tempfile, time
sys.path.insert(0, os.getcwd())
from prelar_jax import config as config_lib
from prelar_jax.data import synthetic, videos
from prelar_jax.evaluation import pretrain_eval
if os.environ.get("BREAK") == "zero_code_in_rssm":
    from prelar_jax import world_model as wm
    _obs, _ima = wm.observe, wm.imagine
    wm.observe = lambda rssm, params, embed, action, *a, **k: _obs(rssm, params, embed, action * 0, *a, **k)
    wm.imagine = lambda rssm, params, action, *a, **k: _ima(rssm, params, action * 0, *a, **k)
    print("BROKEN: the RSSM sees zero codes")
steps, every = int(sys.argv[1]), int(sys.argv[2])
extra = {}
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    try: v = ast.literal_eval(v)
    except Exception: pass
    extra[k] = v
root = tempfile.mkdtemp()
synthetic.write_moving_square_videos(os.path.join(root, "train"), 40, 32, seed=0, smoothness=0.0, square=12, speed=3.0)
probe_episodes = synthetic.moving_square_episodes(12, 48, seed=1, smoothness=0.0, square=12, speed=3.0)
base = {"model.encoder": "plain", "model.depth": 8, "model.deter": 64, "model.hidden": 64,
        "model.stoch": 8, "model.classes": 8, "batch_size": 8, "log.wandb_mode": "disabled",
        "data.root": os.path.join(root, "train")}
config = config_lib.load_config("configs/prelar_pretrain.py:tiny", {**base, **extra})
dataset = videos.make_video_dataset("npz", os.path.join(root, "train"))
t = time.time()
rows = pretrain_eval.study(config, dataset, probe_episodes, steps=steps, eval_every=every, log=print)
print("wall", time.time() - t)
