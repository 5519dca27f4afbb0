"""experiments/throughput.py end to end on the tiny presets, 1 and 2 devices.

The script runs as a subprocess (it requests its fake CPU devices before JAX starts; here the
conftest's four are inherited) with the persistent compilation cache, so a warm machine compiles
nothing. Besides the record's shape, it checks that the world-model half and the actor-critic
half of a fine-tuning update, timed separately, compute the same losses as the whole update on
the same fresh state and batch: the split measures the same computation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINETUNE_ROWS = ("world_model", "actor_critic", "update", "imagination", "policy")


def _run(tmp_path, config, *extra):
    out = tmp_path / "record.json"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "throughput.py"),
        f"--config={config}",
        "--devices=1,2",
        "--steps=2",
        "--warmup=1",
        "--compile_cache",
        f"--out={out}",
        *extra,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text()), result.stdout


def _check_rows(record, names):
    assert record["devices"] == [1, 2] and record["global_batch_fixed"] is True
    rows = {(r["name"], r["devices"]): r for r in record["rows"]}
    assert sorted(rows) == sorted((name, n) for name in names for n in (1, 2))
    for (name, n), row in rows.items():
        assert len(row["step_seconds_all"]) == 2 and min(row["step_seconds_all"]) > 0, (name, n)
        assert row["step_seconds_median"] > 0 and row["compile_seconds"] > 0, (name, n)
        assert row["flops_per_step"] > 0 and row["flops_per_second"] > 0, (name, n)
        assert row["compiled_peak_bytes"] > 0 and row["host_max_rss_bytes"] > 0, (name, n)
        assert row["runtime_peak_bytes"] is None or row["runtime_peak_bytes"] > 0
        if row["per_device_batch"] is not None:  # the global batch is split, not replicated
            assert row["per_device_batch"] * n == record["batch"]
    return rows


@pytest.mark.slow
def test_pretrain_step_table_and_record(tmp_path):
    record, stdout = _run(tmp_path, "configs/prelar_pretrain.py:tiny", "--reference_matmul=64")
    rows = _check_rows(record, ("pretrain_step",))
    assert record["kind"] == "pretrain"
    reference = record["reference_matmul"]
    assert reference["side"] == 64 and reference["dtype"] == "float32" and reference["flops_per_second"] > 0
    assert "% of ref" in stdout and record["protocol_estimate"] == []
    assert "pretrain_step" in stdout and "GFLOP/s" in stdout and "fixed at every device count" in stdout
    # Same first step (same seed, per-example keys) on 1 and 2 devices.
    one, two = rows["pretrain_step", 1]["first_metrics"], rows["pretrain_step", 2]["first_metrics"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-4)


@pytest.mark.slow
def test_finetune_parts_equal_the_whole_update(tmp_path):
    record, stdout = _run(
        tmp_path, "configs/prelar_finetune.py:tiny", "--num_envs=3", "--env_workers=1", "--env_steps=5"
    )
    rows = _check_rows(record, FINETUNE_ROWS)
    assert record["kind"] == "finetune" and record["num_envs"] == 3
    # The environment is measured with the config's rendering settings, and the whole-protocol
    # estimate is built from this run's own 1-device rows and frames/s.
    (env,) = record["env"]["results"]
    assert env["workers"] == 1 and env["render"] == "lean" and env["fps"] > 0
    (estimate,) = record["protocol_estimate"]
    assert estimate["env_fps"] == env["fps"] and "whole protocol" in stdout
    update, policy = rows["update", 1]["step_seconds_median"], rows["policy", 1]["step_seconds_median"]
    assert estimate["seconds"]["updates"] == pytest.approx(estimate["updates"] * update)
    assert estimate["seconds"]["policy"] == pytest.approx(estimate["policy_calls"] * policy)
    assert estimate["total_seconds"] == pytest.approx(sum(estimate["seconds"].values()))
    assert rows["policy", 1]["num_envs"] == 3
    for n in (1, 2):
        wm = rows["world_model", n]["first_metrics"]
        ac = rows["actor_critic", n]["first_metrics"]
        full = rows["update", n]["first_metrics"]
        assert wm["nonfinite"] == ac["nonfinite"] == full["nonfinite"] == 0.0
        for key in ("model_loss", "kl", "image_loss", "reward_loss", "model_grad_norm"):
            assert wm[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), (n, key)
        for key in ("actor_loss", "critic_loss", "lambda_return", "actor_grad_norm", "critic_grad_norm"):
            assert ac[key] == pytest.approx(full[key], rel=1e-4, abs=1e-6), (n, key)
        assert set(wm).isdisjoint({"actor_loss", "critic_loss"}) and "model_loss" not in ac
    # The halves together cost about what the update costs: not a tiny fraction, not many times.
    for n in (1, 2):
        halves = rows["world_model", n]["flops_per_step"] + rows["actor_critic", n]["flops_per_step"]
        assert 0.5 < halves / rows["update", n]["flops_per_step"] < 2.0
        assert rows["imagination", n]["flops_per_step"] < rows["actor_critic", n]["flops_per_step"]
