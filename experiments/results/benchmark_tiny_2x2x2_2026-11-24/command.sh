.venv/bin/python experiments/benchmark.py --config=configs/benchmark.py:tiny \
  --workdir=runs/bench_cpu --config.methods=prelar,apv,dreamerv2 --config.tasks=drawer-open,reach \
  --config.seeds=2 --config.max_parallel=2 --config.videos.episodes=2 --config.videos.tasks_limit=10 \
  --config.videos.max_steps=100 --config.pretrain.steps=1000 --config.finetune.steps=2000 \
  --config.finetune.eval_every=500 --config.finetune.eval_eps=3 --config.diagnostics.updates=200 \
  --config.diagnostics.train_episodes=4 --config.diagnostics.eval_episodes=2 \
  --config.diagnostics.probe_episodes=3 --config.diagnostics.probe_steps=100
