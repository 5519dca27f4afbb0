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
    # One diagnostics run per pre-training, PreLAR's first, on the first task.
    assert [s.name for s in diagnostics] == ["diagnostics", "diagnostics_prelar_wo_cl", "diagnostics_apv_original"]
    assert diagnostics[0].workdir == os.path.join(str(tmp_path), "diagnostics")
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


def test_every_setting_is_checked_before_anything_runs(tmp_path):
    """The stride-4 pair at the cpu preset: its 150-step episodes are not a multiple of the action
    repeat, which the plan refuses at once, naming the method (not one failed run per cell);
    ``finetune.time_limit=152`` passes it to every fine-tuning run and the plan is made."""
    bench, table = modules()
    settings = {"methods": "prelar_fm_stride4,dreamerv2_repeat4", "tasks": "door-close", "seeds": 1}
    config = config_lib.load_config("configs/benchmark.py:cpu", settings)
    with pytest.raises(config_lib.ConfigError, match=r"method 'prelar_fm_stride4', fine-tuning .*env.action_repeat"):
        bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS)
    config = config_lib.load_config("configs/benchmark.py:cpu", {**settings, "finetune.time_limit": 152})
    _, pretrain, finetune, pretrained, _ = bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS)
    assert [s.labels["method"] for s in finetune] == ["prelar_fm_stride4", "dreamerv2_repeat4"]
    for spec in finetune:
        assert "--config.env.time_limit=152" in spec.command and "--config.env.action_repeat=4" in spec.command
    assert "--config.data.frame_stride=4" in pretrain[0].command and list(pretrained) == ["prelar_fm_stride4"]
    # A pre-training setting is checked too.
    bad = {
        **table.METHODS,
        "bad": (("configs/prelar_pretrain.py", {"data.frame_stride": 0}), table.METHODS["prelar"][1]),
    }
    config = config_lib.load_config("configs/benchmark.py:cpu", {**settings, "methods": "bad"})
    with pytest.raises(config_lib.ConfigError, match=r"method 'bad', pre-training .*frame_stride"):
        bench.plan(config, str(tmp_path), bad, table.ORIGINAL_PRESETS)


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

    # Two pre-trainings that ended with the same weights: the second method's runs are not listed.
    for name in ("prelar_consistency=off", "prelar_consistency=sign"):
        os.makedirs(tmp_path / "pretrain" / name)
        (tmp_path / "pretrain" / name / "summary.json").write_text(json.dumps({"finished": True, "step": 5}))
        (tmp_path / "pretrain" / name / "weights.json").write_text(json.dumps({"sha256": "c" * 64, "step": 5}))
    methods = "--config.methods=prelar_wo_cl,prelar_sign"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments/benchmark.py"), f"--workdir={tmp_path}", methods, "--print"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    listed = result.stdout.strip().splitlines()
    assert sum("finetune.py" in line for line in listed) == 2 and "prelar_sign" not in result.stdout
    assert "prelar_sign is not fine-tuned" in result.stderr
    # The finished pre-trainings are not listed again (the runner would only skip it).
    assert not any("pretrain.py" in line for line in listed) and "not listed: 2 runs finished" in result.stderr
    assert any("diagnostics.py" in line for line in listed)


def test_one_diagnostics_run_per_pretraining(tmp_path):
    bench, table = modules()

    def diagnostics(**overrides):
        config = config_lib.load_config("configs/benchmark.py:tiny", overrides)
        return bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS).diagnostics

    pretrain = lambda name: os.path.join(str(tmp_path), "pretrain", name)  # noqa: E731
    runs = diagnostics(
        methods="apv,prelar,prelar_naive,prelar_wo_cl,dreamerv2",
        tasks="reach,drawer-open",
        **{"diagnostics.task": "lever-pull"},
    )
    # PreLAR's first, with the transfer from no pre-training; prelar_naive shares PreLAR's
    # pre-training and gets none; DreamerV2 has no pre-training.
    assert [r.name for r in runs] == ["diagnostics", "diagnostics_apv", "diagnostics_prelar_wo_cl"]
    first, apv, wo_cl = (r.command for r in runs)
    assert f"--pretrained={pretrain('prelar')}" in first and "--no_scratch" not in first
    assert not any(arg.startswith("--label") for arg in first)
    assert f"--pretrained={pretrain('apv')}" in apv and "--label=apv" in apv and "--no_scratch" in apv
    assert f"--pretrained={pretrain('prelar_consistency=off')}" in wo_cl and "--label=prelar_wo_cl" in wo_cl
    assert all("--task=lever-pull" in c and "--updates=5" in c for c in (first, apv, wo_cl))
    assert runs[1].workdir == os.path.join(str(tmp_path), "diagnostics_apv")
    # Each its own settings group in the archive (they differ in --label and --no_scratch).
    from prelar_jax.launch import archive

    assert [archive._group(r) for r in runs] == ["diagnostics", "diagnostics/apv", "diagnostics/prelar_wo_cl"]
    # Without PreLAR the first pre-training's run holds the no-pre-training transfer.
    alone = diagnostics(methods="apv,dreamerv2")
    assert [r.name for r in alone] == ["diagnostics_apv"] and "--no_scratch" not in alone[0].command
    assert diagnostics(methods="dreamerv2") == []
    # prelar_naive alone brings PreLAR's plain pre-training: its diagnostics are PreLAR's, by name.
    naive = diagnostics(
        methods="prelar_naive,dreamerv2", tasks="reach,drawer-open", **{"diagnostics.task": "lever-pull"}
    )
    assert [r.name for r in naive] == ["diagnostics"] and naive[0].command == first
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


def test_report_merges_the_diagnostics_runs(tmp_path):
    """The summary's diagnostics: every finished run's probe and transfer rows in one table each;
    a further run's random-init probe only where it differs."""
    bench, _ = modules()

    def probe_row(r2):
        return {
            "r2": r2,
            "r2_mean": sum(r2) / len(r2),
            "train_pairs": 10,
            "eval_pairs": 5,
            "train_episodes": [0, 1],
            "eval_episodes": [2],
            "code_type": "stoch",
        }

    def transfer_row(mse, config):
        return {
            "updates": 5,
            "context": 2,
            "eval_windows": 3,
            "initial_mse": 2 * mse,
            "mse": mse,
            "initial_psnr": 10.0,
            "psnr": 20.0,
            "config": config,
        }

    runs = {
        "diagnostics": {
            "task": "reach",
            "args": {"label": ""},
            "probe": {"PreLAR pre-trained": probe_row([0.5, 0.4]), "random init": probe_row([0.1, 0.2])},
            "transfer": {"PreLAR": transfer_row(0.011, "p"), "scratch (DreamerV2)": transfer_row(0.033, "d")},
        },
        "diagnostics_apv": {"task": "reach", "args": {"label": "apv"}, "transfer": {"apv": transfer_row(0.022, "a")}},
        "diagnostics_prelar_wo_al_cl": {
            "task": "reach",
            "args": {"label": "prelar_wo_al_cl"},
            "probe": {"prelar_wo_al_cl pre-trained": probe_row([0.3, 0.3]), "random init": probe_row([0.0, 0.1])},
            "transfer": {"prelar_wo_al_cl": transfer_row(0.044, "w")},
        },
        "diagnostics_prelar_wo_cl": {
            "task": "reach",
            "args": {"label": "prelar_wo_cl"},
            "probe": {"prelar_wo_cl pre-trained": probe_row([0.6, 0.6]), "random init": probe_row([0.1, 0.2])},
        },
    }
    for name, data in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "diagnostics.json").write_text(json.dumps(data))
    os.makedirs(tmp_path / "diagnostics_unfinished")  # no diagnostics.json: left out
    text, paths = bench.diagnostics_section(str(tmp_path))
    assert len(paths) == 4 and paths[0].endswith(os.path.join("diagnostics", "diagnostics.json"))
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| ")]
    probe = rows[rows.index("encoder") + 1 : rows.index("initialisation")]
    assert probe == [
        "PreLAR pre-trained",
        "random init",
        "prelar_wo_al_cl pre-trained",
        "random init (prelar_wo_al_cl)",  # another code type: its own random init
        "prelar_wo_cl pre-trained",  # the same random init as PreLAR's: not repeated
    ]
    transfer = rows[rows.index("initialisation") + 1 :]
    assert transfer == ["PreLAR", "scratch (DreamerV2)", "apv", "prelar_wo_al_cl"]
    assert "0.02200" in text and "0.04400" in text
    assert bench.diagnostics_section(str(tmp_path / "nothing")) == ("", [])
