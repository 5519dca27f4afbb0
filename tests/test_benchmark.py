"""The benchmark driver's plan: which pre-training runs, which fine-tuning runs, which commands."""

import os
import shlex
import subprocess
import sys


from prelar_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_shares_pretraining_and_labels_every_cell(tmp_path):
    bench = config_lib.config_module("experiments/benchmark.py")
    table = config_lib.config_module("configs/benchmark.py")
    config = config_lib.load_config("configs/benchmark.py:tiny",
                                    {"methods": "prelar,prelar_naive,prelar_wo_cl,apv_original,dreamerv2",
                                     "tasks": "drawer-open,reach", "seeds": 2})
    videos, pretrain, finetune, pretrained = bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS)
    # prelar and prelar_naive share one pre-training; the ablation and APV-original get their own.
    assert sorted(s.labels["name"] for s in pretrain) == ["apv_original_tiny", "prelar", "prelar_consistency=off"]
    assert pretrained["prelar"] == pretrained["prelar_naive"] and "dreamerv2" not in pretrained
    assert len(finetune) == 5 * 2 * 2
    assert len({s.workdir for s in finetune}) == len(finetune)
    cells = {(s.labels["method"], s.labels["task"], s.labels["seed"]) for s in finetune}
    assert ("apv_original", "reach", 1) in cells
    naive = next(s for s in finetune if s.labels["method"] == "prelar_naive")
    assert "--config.intrinsic.beta=0.0" in naive.command and "--config.loss.aux_reward_scale=0.0" in naive.command
    apv = next(s for s in finetune if s.labels["method"] == "apv_original")
    assert any(arg.endswith("apv_finetune.py:original_tiny") for arg in apv.command)
    assert any(arg.startswith(f"--config.data.root={videos}") for s in pretrain for arg in s.command)
    # Every command's overrides name real keys of its config file.
    for spec in pretrain + finetune:
        config_arg = next(a for a in spec.command if a.startswith("--config="))
        overrides = {a[len("--config."):].split("=", 1)[0]: a.split("=", 1)[1]
                     for a in spec.command if a.startswith("--config.")}
        loaded = config_lib.load_config(config_arg.split("=", 1)[1])
        for key in overrides:
            node = loaded
            for part in key.split("."):
                assert part in node, (spec.name, key)
                node = node[part]


def test_unknown_method_is_one_clear_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments/benchmark.py"),
                             "--config.methods=prelar,prelar_v2", f"--workdir={tmp_path}", "--print"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "unknown method(s) ['prelar_v2']" in result.stderr and "Traceback" not in result.stderr


def test_print_lists_every_run(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments/benchmark.py"),
                             f"--workdir={tmp_path}", "--print"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert len(lines) == 1 + 2 * 1 * 2  # one pre-training, 2 methods x 1 task x 2 seeds
    assert all(os.path.isabs(arg.split("=", 1)[-1].split(":")[0]) for line in lines for arg in line
               if arg.startswith("--config="))
