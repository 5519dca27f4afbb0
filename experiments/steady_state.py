"""Steady-state throughput: does a training run slow down the longer it runs?

    python experiments/steady_state.py --config=configs/prelar_pretrain.py:tiny --config.steps=2000 \\
        --config.log.every=50 --out=/tmp/steady.json
    python experiments/steady_state.py --nopretrain --finetune \\
        --finetune_config=configs/prelar_finetune.py:tiny --finetune_config.steps=4000 --out=/tmp/ft.json
    python experiments/steady_state.py --analyze=runs/prelar_tiny        # an existing run, no training

Runs the real training scripts as subprocesses and fits their logged rates against step (README,
"Performance", "Steady state": windows, warm-up, fits, CPU time, the paired control, the verdict).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from prelar_jax.perf.steady_state import (
    RATE_KEY,
    analyze,
    loadavg,
    paired_comparison,  # noqa: E402
    report,
    run_sampled,
)

PRETRAIN_DEFAULT = "configs/prelar_pretrain.py:tiny"
FINETUNE_DEFAULT = "configs/prelar_finetune.py:tiny"

_CONFIG = config_flags.DEFINE_config_file("config", PRETRAIN_DEFAULT, "Pre-training config and preset.")
_FT_CONFIG = config_flags.DEFINE_config_file("finetune_config", FINETUNE_DEFAULT, "Fine-tuning config and preset.")
_PRETRAIN = flags.DEFINE_bool("pretrain", True, "Run and measure pre-training.")
_FINETUNE = flags.DEFINE_bool("finetune", False, "Run and measure fine-tuning.")
_FROM_PRETRAIN = flags.DEFINE_bool(
    "finetune_from_pretrain", True, "With both runs, fine-tune from the pre-training run's checkpoint."
)
_WORKDIR = flags.DEFINE_string("workdir", "", "Directory for the runs ('' = a temporary one, removed after).")
_KEEP = flags.DEFINE_bool("keep_workdir", False, "Keep the temporary workdir.")
_ANALYZE = flags.DEFINE_list("analyze", [], "Only analyse these existing run workdirs (no training).")
_WARMUP_STEP = flags.DEFINE_integer(
    "warmup_step",
    -1,
    "Leave out windows ending at or before this step (-1: 0 for pre-training, prefill for fine-tuning).",
)
_WARMUP_WINDOWS = flags.DEFINE_integer("warmup_windows", 1, "Then leave out this many more windows.")
_TOLERANCE = flags.DEFINE_float("tolerance", 10.0, "Drift (%) over the measured run still called steady.")
_STRICT = flags.DEFINE_bool("strict", False, "Exit 1 when a fit slows down by more than --tolerance.")
_MAX_ROWS = flags.DEFINE_integer("max_rows", 30, "Table rows per run (more windows are shown in groups).")
_CPU = flags.DEFINE_bool("cpu", True, "Sample the run's CPU time (with its workers) at every throughput line.")
_POLL = flags.DEFINE_float("poll", 0.25, "Seconds between looks at metrics.jsonl for --cpu.")
_CONTROL_AT = flags.DEFINE_integer(
    "control_at",
    0,
    "When the run has logged this step, start a fresh control run of the same config beside it "
    "and compare the two over the same wall-clock time (0 = off; needs --cpu).",
)
_CONTROL_WARMUP = flags.DEFINE_integer(
    "control_warmup",
    150,
    "Steps of the control run (after its warm-up step) left out of the comparison: "
    "its first steps, policy compiles and first media grid.",
)
_OUT = flags.DEFINE_string("out", "", "Write the JSON record here.")

# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def _config_args(argv: list[str], flag: str, default: str) -> tuple[str, list[str]]:
    """``(FILE:PRESET, ['--config.KEY=VALUE', ...])`` for ``--{flag}`` and its overrides in
    ``argv``, renamed to the training scripts' ``--config``."""
    spec, overrides = default, []
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{flag}" and i + 1 < len(argv):
            spec, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{flag}="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith(f"--{flag}."):
            overrides.append("--config." + arg[len(flag) + 3 :])
        i += 1
    return spec, overrides


def _fresh(path: str) -> str:
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise SystemExit(
            f"error: {path} already holds a run (metrics.jsonl); a resumed run would mix two "
            "runs' windows. Use a new --workdir, or --analyze to analyse it."
        )
    return path


def pretrain_run(workdir: str) -> dict[str, Any]:
    spec, overrides = _config_args(sys.argv, "config", PRETRAIN_DEFAULT)
    run_dir = _fresh(os.path.join(workdir, "pretrain"))
    if not _CONFIG.value.data.root:
        videos = os.path.join(workdir, "videos")
        if not os.path.isdir(videos):
            run_sampled(
                [
                    sys.executable,
                    os.path.join(ROOT, "experiments", "generate_videos.py"),
                    "--out",
                    videos,
                    "--tasks",
                    "reach-wall,push",
                    "--episodes",
                    "2",
                    "--max-steps",
                    "50",
                    "--quiet",
                ]
            )
        overrides.append(f"--config.data.root={videos}")
    command = [sys.executable, os.path.join(ROOT, "experiments", "pretrain.py"), f"--config={spec}", *overrides]
    return _measured_run(command, run_dir, "pretrain")


def finetune_run(workdir: str, pretrained: str | None) -> dict[str, Any]:
    spec, overrides = _config_args(sys.argv, "finetune_config", FINETUNE_DEFAULT)
    run_dir = _fresh(os.path.join(workdir, "finetune"))
    if pretrained and not _FT_CONFIG.value.pretrained:
        overrides.append(f"--config.pretrained={pretrained}")
    command = [sys.executable, os.path.join(ROOT, "experiments", "finetune.py"), f"--config={spec}", *overrides]
    return _measured_run(command, run_dir, "finetune")


def _measured_run(command: list[str], run_dir: str, kind: str) -> dict[str, Any]:
    """The run (and with ``--control_at``, its control run beside it) with CPU-time samples."""
    control = None
    if _CONTROL_AT.value > 0:
        control_dir = _fresh(run_dir + "_control")
        control = {
            "command": [*command, f"--workdir={control_dir}"],
            "workdir": control_dir,
            "metrics_path": os.path.join(control_dir, "metrics.jsonl"),
            "at": _CONTROL_AT.value,
            "log": control_dir + ".log",
            "samples": None,
        }
    command = [*command, f"--workdir={run_dir}"]
    seconds, samples = run_sampled(
        command, os.path.join(run_dir, "metrics.jsonl"), RATE_KEY[kind], control, cpu=_CPU.value, poll=_POLL.value
    )
    return {"command": command, "wall_seconds": seconds, "workdir": run_dir, "cpu_samples": samples, "control": control}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from prelar_jax.runtime import config as config_lib
    from prelar_jax import errors

    def check():
        config_lib.check_override_flags(sys.argv, PRETRAIN_DEFAULT, "config")
        config_lib.check_override_flags(sys.argv, FINETUNE_DEFAULT, "finetune_config")

    errors.exit_on_user_error(check)
    load_before = loadavg()
    settings = (_WARMUP_STEP.value, _WARMUP_WINDOWS.value, _TOLERANCE.value)
    runs: list[dict[str, Any]] = []
    temporary = None
    if _ANALYZE.value:
        for path in _ANALYZE.value:
            runs.append({"command": None, "wall_seconds": None, "workdir": path})
    else:
        if not (_PRETRAIN.value or _FINETUNE.value):
            raise app.UsageError("nothing to run: --nopretrain without --finetune")
        if _CONTROL_AT.value > 0 and not _CPU.value:
            raise app.UsageError("--control_at needs --cpu (the comparison uses its samples)")
        workdir = _WORKDIR.value
        if not workdir:
            workdir = temporary = tempfile.mkdtemp(prefix="steady_state_")
        os.makedirs(workdir, exist_ok=True)
        print(f"[steady_state] runs in {workdir}; load average before: {load_before}", flush=True)
        pretrained = None
        if _PRETRAIN.value:
            runs.append(pretrain_run(workdir))
            if _FROM_PRETRAIN.value:
                pretrained = runs[-1]["workdir"]
        if _FINETUNE.value:
            runs.append(finetune_run(workdir, pretrained))
    load_after = loadavg()

    results = []
    for run in runs:
        analysis = analyze(run["workdir"], None, *settings, cpu_samples=run.get("cpu_samples"))
        control = run.get("control")
        if control is not None:
            from_step = analysis["warmup_step"] + _CONTROL_WARMUP.value
            analysis["paired"] = paired_comparison(
                run["cpu_samples"] or [], control["samples"] or [], from_step, _TOLERANCE.value
            )
            analysis["paired"].update(
                {"control_from_step": from_step, "control_started_at_step": control.get("started_at_step")}
            )
        results.append({**run, **analysis})
        report(analysis, _MAX_ROWS.value)
    print(f"\nload average (1, 5, 15 min) before: {load_before}, after: {load_after} on {os.cpu_count()} CPU(s)")
    verdicts = []  # (run label, fit name, fit) over every run
    for r in results:
        label = r["kind"] if len(results) == 1 else f"{r['kind']} ({os.path.basename(r['workdir'])})"
        verdicts += [(label, name, fit) for name, fit in r["fits"].items()]
        if "paired" in r:
            verdicts.append((label, "paired with a fresh run", r["paired"]))
    slow = [f"{label}: {name}" for label, name, fit in verdicts if "slows down" in fit["verdict"]]
    unsteady = [
        f"{label}: {name} {fit['verdict']}" + (" (noisy)" if fit.get("noisy") else "")
        for label, name, fit in verdicts
        if fit["verdict"] != "steady"
    ]
    print(
        "verdict: " + ("steady" if not unsteady else "; ".join(unsteady)) + f" (tolerance {_TOLERANCE.value:g}%)",
        flush=True,
    )

    record = {
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "tolerance_pct": _TOLERANCE.value,
        "runs": results,
        "steady": not unsteady,
        "slows_down": bool(slow),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
        print(f"wrote {_OUT.value}")
    if temporary and not _KEEP.value:
        shutil.rmtree(temporary, ignore_errors=True)
    if _STRICT.value and slow:
        sys.exit(1)


if __name__ == "__main__":
    from prelar_jax.runtime import xla_setup

    xla_setup.use_fast_allocator()  # tcmalloc when installed, as the training scripts run
    app.run(main)
