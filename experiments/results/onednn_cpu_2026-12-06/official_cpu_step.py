"""The original PyTorch PreLAR pre-training step at the sizes of prelar-jax's `cpu` preset, timed.

Usage: python official_cpu_step.py REF_DIR [steps=20]
Plain DreamerV2 CNN encoder/decoder at depth 16, RSSM 200 units with 16x16 categorical latents, a
depth-16 implicit-action ResNet with a 16-dimensional Gaussian code (hidden 256), batch 16 x 16,
float32 on the CPU, synthetic frames; otherwise ../shared/bench/official_pretrain_step.py.
"""
import pathlib, sys, time, types
ref = pathlib.Path(sys.argv[1]); steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
sys.path.insert(0, str(ref)); sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[4] / "shared" / "bench"))
import numpy as np, torch
import ruamel.yaml as Y
import gym_stub  # noqa: a minimal 'gym' so wmlib imports
import functools
import wmlib.agents as agents, wmlib.nets as nets, wmlib.utils as utils
# The plain decoder's input width is a constructor argument the config does not carry: deter + stoch * classes.
nets.PlainCNNDecoder = functools.partial(nets.PlainCNNDecoder, cnn_input_dim=200 + 16 * 16)
configs = Y.YAML(typ='safe', pure=True).load((ref / 'configs' / 'prelar_pretraining.yaml').read_text())
config = utils.Config(configs['defaults']).update(configs['rlbench_pretrain'])
B, T = 16, 16
config = config.update({
    'precision': 32, 'device': 'cpu', 'rank_loss': 'sign', 'dataset.batch': B, 'dataset.length': T,
    'encoder_type': 'plaincnn', 'decoder_type': 'plaincnn', 'encoder.cnn_depth': 16, 'decoder.cnn_depth': 16,
    'rssm.hidden': 200, 'rssm.deter': 200, 'rssm.stoch': 16, 'rssm.discrete': 16, 'rssm.embed_dim': 512,
    'vanet.cnn_depth': 16, 'vanet.hidden_dim': 256, 'vanet.type_': 'stoch', 'vanet.discrete': 0, 'vanet.stoch': 16,
})
torch.manual_seed(0)
agent = agents.PreLARPretrain(config, {'image': types.SimpleNamespace(shape=(64, 64, 3))},
                              {'action': types.SimpleNamespace(shape=(4,))}, utils.Counter(0))
agent.init_optimizers()
rng = np.random.default_rng(0)
def batch():
    first = torch.zeros(B, T, dtype=torch.bool); first[:, 0] = True
    return {'image': torch.from_numpy(rng.integers(0, 255, (B, T, 3, 64, 64), dtype=np.uint8)),
            'is_first': first, 'action': torch.zeros(B, T, 4)}
data = [batch() for _ in range(2)]
for i in range(3):
    agent.train(data[i % 2])  # warm-up
times = []
for i in range(steps):
    t = time.perf_counter(); _, mets = agent.train(data[i % 2]); times.append(time.perf_counter() - t)
print(f'params={sum(p.numel() for p in agent.parameters())} loss={float(mets["wm/model_loss"]):.3f} threads={torch.get_num_threads()}')
print(f'official_cpu_step B={B} T={T} ms_per_step_median={1000 * float(np.median(times)):.1f}')
