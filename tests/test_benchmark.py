"""The benchmark driver's plan: which pre-training runs, which fine-tuning runs, which commands."""

import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prelar_jax.runtime import config as config_lib
from tests.model_helpers import benchmark_modules as modules

pytestmark = pytest.mark.slow  # subprocesses or long training: skipped by -m "not slow"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_shares_pretraining_and_labels_every_cell(tmp_path):
    bench, table = modules()
    config = config_lib.load_config(
        "configs/benchmark.py:tiny",
        {
            "methods": "prelar,prelar_naive,prelar_wo_cl,apv_original,dreamerv2",
            "tasks": "drawer-open,reach",
            "seeds": 2,
        },
    )
    videos, pretrain, finetune, pretrained, diagnostics = bench.plan(
        config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS
    )
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
    # One diagnostics run on PreLAR's pre-training and the first task (no plain `apv` method here).
    assert len(diagnostics) == 1 and diagnostics[0].workdir == os.path.join(str(tmp_path), "diagnostics")
    assert f"--pretrained={pretrained['prelar']}" in diagnostics[0].command
    assert "--task=drawer-open" in diagnostics[0].command
    assert not any(a.startswith("--apv_pretrained") for a in diagnostics[0].command)
    # Every command's overrides name real keys of its config file.
    for spec in pretrain + finetune:
        config_arg = next(a for a in spec.command if a.startswith("--config="))
        overrides = {
            a[len("--config.") :].split("=", 1)[0]: a.split("=", 1)[1]
            for a in spec.command
            if a.startswith("--config.")
        }
        loaded = config_lib.load_config(config_arg.split("=", 1)[1])
        for key in overrides:
            node = loaded
            for part in key.split("."):
                assert part in node, (spec.name, key)
                node = node[part]


def test_unknown_method_is_one_clear_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments/benchmark.py"),
            "--config.methods=prelar,prelar_v2",
            f"--workdir={tmp_path}",
            "--print",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown method(s) ['prelar_v2']" in result.stderr and "Traceback" not in result.stderr


def test_print_lists_every_run(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments/benchmark.py"), f"--workdir={tmp_path}", "--print"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert len(lines) == 1 + 1 + 2 * 1 * 2  # one pre-training, the diagnostics, 2 methods x 1 task x 2 seeds
    assert lines[1][1].endswith("diagnostics.py")
    assert all(
        os.path.isabs(arg.split("=", 1)[-1].split(":")[0])
        for line in lines
        for arg in line
        if arg.startswith("--config=")
    )


def test_diagnostics_run_follows_the_methods(tmp_path):
    bench, table = modules()

    def diagnostics(**overrides):
        config = config_lib.load_config("configs/benchmark.py:tiny", overrides)
        return bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS).diagnostics

    with_apv = diagnostics(methods="prelar,apv", tasks="reach,drawer-open", **{"diagnostics.task": "lever-pull"})
    assert len(with_apv) == 1
    command = with_apv[0].command
    assert f"--apv_pretrained={os.path.join(str(tmp_path), 'pretrain', 'apv')}" in command
    assert "--task=lever-pull" in command and "--updates=5" in command
    assert diagnostics(methods="apv,dreamerv2") == []  # nothing to probe without PreLAR
    assert diagnostics(**{"diagnostics.enabled": False}) == []


def test_tiny_benchmark_end_to_end(tmp_path):
    """The `tiny` preset as a user runs it (2 methods x 1 task x 2 seeds, videos, pre-training,
    diagnostics, fine-tuning, report), then a re-run that finds everything finished."""
    workdir = tmp_path / "bench"
    command = [
        sys.executable,
        os.path.join(ROOT, "experiments/benchmark.py"),
        "--config=configs/benchmark.py:tiny",
        f"--workdir={workdir}",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # results.csv holds exactly the evaluations each fine-tuning run logged.
    with open(workdir / "results.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    expected = []
    for method in ("prelar", "dreamerv2"):
        for seed in (0, 1):
            with open(workdir / "runs" / method / "drawer-open" / f"seed_{seed}" / "metrics.jsonl") as handle:
                evals = [json.loads(line) for line in handle if '"eval/success_rate"' in line]
            assert evals, (method, seed)
            expected += [(method, seed, e["step"], e["eval/success_rate"], e["eval/return"]) for e in evals]
    got = [(r["method"], int(r["seed"]), int(r["step"]), float(r["success_rate"]), float(r["return"])) for r in rows]
    assert sorted(got) == sorted(expected) and all(r["task"] == "drawer-open" for r in rows)
    assert all(0.0 <= e[3] <= 1.0 for e in expected)

    summary = (workdir / "summary.md").read_text(encoding="utf-8")
    final_step = max(e[2] for e in expected)
    for method in ("prelar", "dreamerv2"):
        returns = np.array([e[4] for e in expected if e[0] == method and e[2] == final_step])
        assert len(returns) == 2
        # The per-task row: final step, 2 seeds, return mean ± std (ddof=1) of the runs' own logs.
        row = next(line for line in summary.splitlines() if line.startswith(f"| {method} | drawer-open |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:4] == [str(final_step), "2"]
        assert cells[5] == f"{returns.mean():.2f} ± {returns.std(ddof=1):.2f}"
    assert "## Pre-training diagnostics" in summary
    assert "### Implicit-action probe" in summary and "| PreLAR pre-trained |" in summary
    assert "### World-model transfer" in summary and "| scratch (DreamerV2) |" in summary
    for name in ("success_per_task.png", "return_per_task.png", "success_aggregate.png"):
        with Image.open(workdir / name) as image:
            assert image.format == "PNG" and min(image.size) > 200

    # Re-running starts nothing and rewrites the same results.
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage, count in (("pretrain", 1), ("diagnostics", 1), ("finetune", 4)):
        with open(workdir / "logs" / stage / "runs.json", encoding="utf-8") as handle:
            assert json.load(handle)["counts"] == {"skipped: finished": count}, stage
    with open(workdir / "results.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle)) == rows
