"""experiments/steady_state.py: a real tiny pre-training run read back from its metrics.jsonl,
and the analysis of a fine-tuning run's metrics (``--analyze``), checked against numpy.

No speed is asserted: the windows and fits must be what the run logged, computed independently
here (``numpy.polyfit`` on the logged rates), and the verdict must follow the tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_pretrain_loop import write_moving_squares

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "steady_state.py"


def _run(*args, check=True):
    env = dict(os.environ)
    # One device, as a plain run on this machine has (the conftest asks for four fake ones).
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _check_fit(fit, x, y, tolerance):  # a rate fit (higher is faster)
    """The record's fit equals an independent least-squares fit of the same numbers."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["n"] == len(x)
    assert fit["slope"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-12)
    assert fit["slope_pct_per_1000"] == pytest.approx(100 * 1000 * slope / y.mean(), rel=1e-9, abs=1e-9)
    drift = 100 * slope * (x[-1] - x[0]) / y.mean()
    assert fit["drift_pct"] == pytest.approx(drift, rel=1e-9, abs=1e-9)
    assert fit["ratio_last_first"] == pytest.approx(y[-1] / y[0])
    expected = (
        "steady"
        if abs(drift) <= tolerance
        else f"slows down by {-drift:.1f}%"
        if drift < 0
        else f"speeds up by {drift:.1f}%"
    )
    assert fit["verdict"] == expected
    return drift


@pytest.mark.slow
def test_pretrain_run_windows_and_fit_are_the_logged_rates(tmp_path):
    videos = write_moving_squares(str(tmp_path / "videos"))
    out, workdir = tmp_path / "steady.json", tmp_path / "runs"
    result = _run(
        "--config=configs/prelar_pretrain.py:tiny",
        f"--config.data.root={videos}",
        "--config.steps=20",
        "--config.log.every=4",
        "--config.log.checkpoint_every=8",
        "--config.log.media_every=12",
        "--config.log.wandb_mode=disabled",
        f"--workdir={workdir}",
        "--poll=0.05",
        "--tolerance=10",
        f"--out={out}",
    )
    record = json.loads(out.read_text())
    (run,) = record["runs"]
    assert run["kind"] == "pretrain" and run["workdir"] == str(workdir / "pretrain")
    assert "--config.steps=20" in run["command"] and run["command"][1].endswith("experiments/pretrain.py")
    # A normal run: progress on the console, checkpoints and media at their cadence.
    assert "step 20/20" in result.stdout
    assert {"8", "16", "20"} <= set(os.listdir(workdir / "pretrain" / "checkpoints"))
    assert os.path.exists(workdir / "pretrain" / "media" / "open_loop_00000012.png")

    logged = [r for r in _read_jsonl(workdir / "pretrain" / "metrics.jsonl") if "perf/steps_per_second" in r]
    windows = run["windows"]
    assert [(w["start"], w["end"]) for w in windows] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert [w["rate"] for w in windows] == [r["perf/steps_per_second"] for r in logged]
    assert run["warmup_windows_left_out"] == 1 and run["measured_windows"] == 4

    measured = windows[1:]
    fit = run["fits"]["steps/s vs step"]
    drift = _check_fit(fit, [(w["start"] + w["end"]) / 2 for w in measured], [w["rate"] for w in measured], 10)
    # The CPU-time column: steps per CPU-second of the run, where both ends were sampled.
    assert windows[0]["steps_per_cpu_second"] is None
    sampled = [w for w in measured if w["cpu_seconds"]]
    assert sampled, "no CPU-time samples"
    for w in sampled:
        assert w["steps_per_cpu_second"] == pytest.approx((w["end"] - w["start"]) / w["cpu_seconds"])

    # The table shows every window's logged rate; the verdict line follows the fit.
    for w in windows:
        assert f"{w['start']:>8}-{w['end']:<8} {w['rate']:>10.3f}" in result.stdout
    assert f"steps/s vs step: {fit['verdict']} (fitted drift {drift:+.1f}%" in result.stdout
    assert "verdict:" in result.stdout and "load average" in result.stdout
    assert record["steady"] == all(f["verdict"] == "steady" for f in run["fits"].values())


def _write_finetune_run(directory, rate_of_replay):
    """A fine-tuning workdir as the loop writes it: prefill 200, a throughput line every 50
    environment steps (a flush), train and evaluation lines in between, the replay growing."""
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump({"prefill": 200, "steps": 2000}, handle)
    lines = [{"step": 0, "compile_seconds": 3.0}]
    for step in range(200, 2001, 50):
        replay = step + step // 50  # one first frame per 50-step episode
        lines.append({"step": step, "train/return": 1.0})
        lines.append(
            {
                "step": step,
                "model_loss": 1.0,
                "updates/s": rate_of_replay(replay),
                "fps/env": 10 * rate_of_replay(replay),
                "replay/steps": replay,
                "replay/episodes": step // 50,
            }
        )
        if step % 300 == 0:
            lines.append({"step": step, "eval/success_rate": 0.0})
    with open(os.path.join(directory, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return [line for line in lines if "updates/s" in line]


@pytest.mark.slow
def test_finetune_analysis_fits_rate_against_replay_and_reports_a_slowdown(tmp_path):
    slowing, flat = str(tmp_path / "slowing"), str(tmp_path / "flat")
    logged = _write_finetune_run(slowing, lambda replay: 5.0 * (1.0 - replay / 4000.0))
    _write_finetune_run(flat, lambda replay: 5.0 + 0.01 * ((replay // 51) % 2))
    out = tmp_path / "analysis.json"
    result = _run(f"--analyze={slowing},{flat}", "--tolerance=10", f"--out={out}")
    record = json.loads(out.read_text())
    slow_run, flat_run = record["runs"]
    assert slow_run["kind"] == flat_run["kind"] == "finetune"

    windows = slow_run["windows"]
    assert [w["end"] for w in windows] == [r["step"] for r in logged]
    assert [w["rate"] for w in windows] == [r["updates/s"] for r in logged]
    assert [w["replay_end"] for w in windows] == [r["replay/steps"] for r in logged]
    assert all(b["replay_start"] == a["replay_end"] for a, b in zip(windows, windows[1:]))
    # Warm-up: the window ending at prefill (step 200), then one more.
    assert slow_run["warmup_step"] == 200 and slow_run["warmup_windows_left_out"] == 2
    measured = windows[2:]
    replay_x = [(w["replay_start"] + w["replay_end"]) / 2 for w in measured]
    drift = _check_fit(slow_run["fits"]["updates/s vs replay size"], replay_x, [w["rate"] for w in measured], 10)
    assert drift < -10  # 5 (1 - r / 4000) from r ~ 280 to ~ 2020: about -61% of the mean
    _check_fit(
        slow_run["fits"]["updates/s vs env step"],
        [(w["start"] + w["end"]) / 2 for w in measured],
        [w["rate"] for w in measured],
        10,
    )
    assert slow_run["replay_growth"] == pytest.approx(measured[-1]["replay_end"] / measured[0]["replay_start"])
    assert "env steps per CPU-second vs replay size" not in slow_run["fits"]  # no samples in --analyze

    assert all(f["verdict"] == "steady" for f in flat_run["fits"].values())
    assert not record["steady"] and record["slows_down"]
    assert f"slows down by {-drift:.1f}%" in result.stdout
    # Exit status: 0 unless --strict, then 1 for a slowdown only.
    assert _run(f"--analyze={slowing}", "--strict", check=False).returncode == 1
    assert _run(f"--analyze={flat}", "--strict").returncode == 0


def test_paired_comparison_uses_the_same_wall_clock_interval(tmp_path):
    """``--control_at``'s comparison on made-up samples: the run logs at 10 steps/s, the fresh
    control at 12.5 steps/s, both sampled at unaligned times (the run's steps are interpolated):
    the ratio is 0.8 over the interval from the control's first line past its warm-up to the
    end of the shorter run. A subprocess imports the script (its flags stay out of this one)."""
    main = [
        {"time": 5.0 + 10 * i, "step": 10 * (5.0 + 10 * i), "cpu_seconds": 0.5 * (5.0 + 10 * i)} for i in range(11)
    ]  # t = 5 ... 105
    control = [{"time": 30.0 + 10 * i, "step": 125 * i, "cpu_seconds": 4.0 * i} for i in range(12)]  # t = 30 ... 140
    code = (
        "import json, sys; from prelar_jax.perf import steady_state; "
        "args = json.load(sys.stdin); print(json.dumps(steady_state.paired_comparison(*args)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        input=json.dumps([main, control, 100, 10.0]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    paired = json.loads(result.stdout.strip().splitlines()[-1])
    # The control passes step 100 at its line of t = 40 (step 125); the run's last line is at t = 105,
    # so the interval ends at the control's last line before it, t = 100 (step 875).
    assert paired["control_steps"] == [125, 875] and paired["seconds"] == pytest.approx(60.0)
    assert paired["main_steps"] == pytest.approx([400.0, 1000.0])
    assert paired["main_rate"] == pytest.approx(10.0) and paired["control_rate"] == pytest.approx(12.5)
    assert paired["ratio"] == pytest.approx(0.8)
    assert paired["cpu_ratio"] == pytest.approx((600 / 30.0) / (750 / 24.0))  # CPU s: 0.5/s and 0.4/s
    assert paired["verdict"] == "slows down by 20.0%"


def test_a_fit_whose_first_value_is_zero_is_reported():
    """A CPU reading that did not advance in the first window gives it the value 0: the fit has no
    last/first ratio, and the report shows '-' there instead of failing (seen on a loaded machine)."""
    from prelar_jax.perf import steady_state

    fit = steady_state.fit_line([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.1, 1.9], tolerance=10)
    assert fit["ratio_last_first"] is None and fit["slope"] == pytest.approx(
        np.polyfit([1, 2, 3, 4], [0, 2, 2.1, 1.9], 1)[0]
    )
    record = {"fits": {"CPU use vs step": {"x": "step", **fit}}, "tolerance_pct": 10, "kind": "pretrain"}
    text = steady_state.format_fits(record)
    assert "last/first window -; mean 1.500 over 4 windows" in text
