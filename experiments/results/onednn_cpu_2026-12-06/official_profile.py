"""Op-by-op profile and FLOP count of the original PyTorch PreLAR pre-training step.

Usage: python official_profile.py REF_DIR [size=full] [batch=16] [length=25] [steps=2]
Builds the step as ../shared/bench/official_pretrain_step.py does (same overrides), then
times `steps` steps under torch.profiler and counts FLOPs with FlopCounterMode.
"""
import sys, time, pathlib, types, json, collections
ref = pathlib.Path(sys.argv[1]); size = sys.argv[2] if len(sys.argv) > 2 else 'full'
B = int(sys.argv[3]) if len(sys.argv) > 3 else 16; T = int(sys.argv[4]) if len(sys.argv) > 4 else 25
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 2
sys.path.insert(0, str(ref)); sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4] / "shared" / "bench"))
import numpy as np, torch
import ruamel.yaml as Y
import gym_stub  # noqa
import wmlib, wmlib.agents as agents, wmlib.utils as utils
loader = Y.YAML(typ="safe", pure=True)
configs = loader.load((ref / 'configs' / 'prelar_pretraining.yaml').read_text())
config = utils.Config(configs['defaults']).update(configs['rlbench_pretrain'])
over = {'precision': 32, 'device': 'cpu', 'vanet.type_': 'stoch', 'vanet.discrete': 0, 'vanet.stoch': 64,
        'rank_loss': 'sign', 'dataset.batch': B, 'dataset.length': T}
config = config.update(over)
torch.manual_seed(0)
agent = agents.PreLARPretrain(config, {'image': types.SimpleNamespace(shape=(64, 64, 3))},
                              {'action': types.SimpleNamespace(shape=(4,))}, utils.Counter(0))
agent.init_optimizers()
rng = np.random.default_rng(0)
def batch():
    img = torch.from_numpy(rng.integers(0, 255, (B, T, 3, 64, 64), dtype=np.uint8))
    first = torch.zeros(B, T, dtype=torch.bool); first[:, 0] = True
    return {'image': img, 'is_first': first, 'action': torch.zeros(B, T, 4)}
data = batch()
agent.train(data)
from torch.utils.flop_counter import FlopCounterMode
fc = FlopCounterMode(display=False)
with fc:
    agent.train(data)
flops = fc.get_total_flops()
by_op = {str(k): v for k, v in fc.get_flop_counts().get('Global', {}).items()}
ts = []
for _ in range(steps):
    t = time.perf_counter(); agent.train(data); ts.append(time.perf_counter() - t)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
    for _ in range(steps):
        agent.train(data)
rows = []
for e in prof.key_averages():
    rows.append((e.key, e.self_cpu_time_total / 1e6 / steps, e.count / steps))
rows.sort(key=lambda r: -r[1])
total = sum(r[1] for r in rows)
print(f'steps (unprofiled) s: {[round(t, 3) for t in ts]}; threads={torch.get_num_threads()}')
print(f'GFLOP per step (FlopCounterMode): {flops / 1e9:.1f}')
for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]):
    print(f'  {k}: {v / 1e9:.1f} GFLOP')
print(f'profiled self time per step: {total:.2f} s')
for k, s, c in rows[:25]:
    print(f'  {s:8.3f} s {100 * s / total:5.1f}%  x{c:6.0f}  {k}')
json.dump({'step_seconds': ts, 'gflop': flops / 1e9, 'gflop_by_op': {k: v / 1e9 for k, v in by_op.items()},
           'self_seconds_per_step': {k: s for k, s, c in rows}}, open(sys.argv[6] if len(sys.argv) > 6 else '/tmp/official_profile.json', 'w'), indent=1)
