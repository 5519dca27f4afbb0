"""Steady-state throughput analysis: a training run's ``metrics.jsonl`` read back as windows of
measured rates (and, for runs started here, CPU-time samples), least-squares fits of rate against
step or replay size, a paired comparison with a fresh control run, and their tables. The command
line and what each figure means: ``experiments/steady_state.py`` and the README ("Performance")."""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (fit name, window field, x, sense) per kind; x is "step" (window middle) or "replay" (mean
# replay size); sense "rate" (higher is faster) or "cost" (higher is slower). The CPU fits need the
# CPU-time samples of a run this script started.
FITS = {
    "pretrain": [
        ("steps/s vs step", "rate", "step", "rate"),
        ("steps per CPU-second vs step", "steps_per_cpu_second", "step", "rate"),
        ("main-thread CPU ms per step vs step", "main_thread_ms_per_step", "step", "cost"),
    ],
    "finetune": [
        ("updates/s vs env step", "rate", "step", "rate"),
        ("updates/s vs replay size", "rate", "replay", "rate"),
        ("env fps vs env step", "fps_env", "step", "rate"),
        ("env steps per CPU-second vs replay size", "steps_per_cpu_second", "replay", "rate"),
        ("main-thread CPU ms per env step vs replay size", "main_thread_ms_per_step", "replay", "cost"),
    ],
}
CPU_FIELDS = ("steps_per_cpu_second", "main_thread_ms_per_step")
RATE_KEY = {"pretrain": "perf/steps_per_second", "finetune": "updates/s"}

# ----------------------------------------------------------------------------------------------
# Analysis of a metrics.jsonl
# ----------------------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def detect_kind(rows: list[dict[str, Any]]) -> str:
    for kind, key in RATE_KEY.items():
        if any(key in row for row in rows):
            return kind
    raise ValueError("metrics.jsonl has no throughput lines (perf/steps_per_second or updates/s)")


def windows_of(rows: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """One window per line with the kind's rate: from the previous such line's step (0 for the
    first) to this line's step, with the rates and (fine-tuning) replay sizes at both ends."""
    key = RATE_KEY[kind]
    windows, start, replay_start = [], 0, None
    for row in rows:
        if key not in row:
            continue
        window = {"index": len(windows), "start": start, "end": int(row["step"]), "rate": float(row[key])}
        if kind == "pretrain":
            window["frames_per_second"] = row.get("perf/frames_per_second")
        else:
            replay = float(row["replay/steps"])
            window.update(
                {
                    "fps_env": float(row["fps/env"]),
                    "replay_end": replay,
                    "replay_start": replay if replay_start is None else replay_start,
                }
            )
            replay_start = replay
        windows.append(window)
        start = window["end"]
    return windows


def add_cpu(windows: list[dict[str, Any]], samples: list[dict[str, float]] | None) -> None:
    """Each window but the first and the last gets the CPU seconds the run (with its workers)
    spent in it, from the samples at its two ends: steps per CPU-second, CPU use (CPU seconds per
    wall second) and the main thread's CPU ms per step; None where a sample is missing."""
    by_step = {int(sample["step"]): sample for sample in samples or []}
    previous = None
    for index, window in enumerate(windows):
        # The last line is written just before the final checkpoint and the end of the run, which
        # its sample (taken up to --poll seconds later) would partly count: no CPU for it.
        here = by_step.get(window["end"]) if index < len(windows) - 1 else None
        for key in ("cpu_seconds", "steps_per_cpu_second", "cpu_utilization", "main_thread_ms_per_step"):
            window[key] = None
        if here is not None and previous is not None:
            steps = window["end"] - window["start"]
            cpu = here["cpu_seconds"] - previous["cpu_seconds"]
            wall = here["wall_seconds"] - previous["wall_seconds"]
            window["cpu_seconds"] = cpu
            if cpu > 0:
                window["steps_per_cpu_second"] = steps / cpu
            if wall > 0:
                window["cpu_utilization"] = cpu / wall
            if here.get("main_thread_seconds") is not None and previous.get("main_thread_seconds") is not None:
                window["main_thread_ms_per_step"] = (
                    1e3 * (here["main_thread_seconds"] - previous["main_thread_seconds"]) / max(steps, 1)
                )
        previous = here


def fit_line(x: list[float], y: list[float], tolerance: float, sense: str = "rate") -> dict[str, Any]:
    """Least-squares ``y = a + b x`` and what it says about drift (see the module docstring)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    result: dict[str, Any] = {
        "n": n,
        "first_rate": float(y[0]) if n else None,
        "last_rate": float(y[-1]) if n else None,
        "mean_rate": float(y.mean()) if n else None,
        "ratio_last_first": float(y[-1] / y[0]) if n and y[0] > 0 else None,
    }
    if n < 3 or np.ptp(x) == 0:
        result.update(
            {
                "slope": None,
                "intercept": None,
                "slope_pct_per_1000": None,
                "drift_pct": None,
                "drift_ci_pct": None,
                "verdict": f"too few windows ({n}) to fit",
            }
        )
        return result
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    slope_se = float(np.sqrt(np.sum(residuals**2) / (n - 2) / np.sum((x - x.mean()) ** 2)))
    span = x[-1] - x[0]
    drift = 100.0 * slope * span / y.mean()
    result.update(
        {
            "slope": float(slope),
            "intercept": float(intercept),
            "slope_se": slope_se,
            "x_first": float(x[0]),
            "x_last": float(x[-1]),
            "residual_std_pct": float(100.0 * residuals.std() / y.mean()),
            "slope_pct_per_1000": float(100.0 * 1000.0 * slope / y.mean()),
            "drift_pct": float(drift),
            "drift_ci_pct": float(100.0 * 2.0 * slope_se * abs(span) / y.mean()),
        }
    )
    if abs(drift) <= tolerance:
        result["verdict"] = "steady"
    elif sense == "cost":  # a cost per step that grows is a slowdown
        result["verdict"] = f"grows by {drift:.1f}% (slows down)" if drift > 0 else f"shrinks by {-drift:.1f}%"
    elif drift < 0:
        result["verdict"] = f"slows down by {-drift:.1f}%"
    else:
        result["verdict"] = f"speeds up by {drift:.1f}%"
    # Whether the windows can tell: the +-2 s.e. interval of the drift against the tolerance.
    result["noisy"] = bool(result["drift_ci_pct"] > tolerance)
    return result


def analyze(
    workdir: str,
    kind: str | None,
    warmup_step: int,
    warmup_windows: int,
    tolerance: float,
    cpu_samples: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    rows = read_metrics(workdir)
    kind = kind or detect_kind(rows)
    if warmup_step < 0:
        warmup_step = 0
        if kind == "finetune":
            with open(os.path.join(workdir, "config.json"), encoding="utf-8") as handle:
                warmup_step = int(json.load(handle)["prefill"])
    windows = windows_of(rows, kind)
    add_cpu(windows, cpu_samples)
    skip = sum(1 for w in windows if w["end"] <= warmup_step) + warmup_windows
    measured = windows[skip:]
    fits = {}
    for name, field, axis, sense in FITS[kind]:
        used = [w for w in measured if w.get(field) is not None]
        if field in CPU_FIELDS and not used:
            continue  # no CPU samples (--analyze, --nocpu)
        if axis == "step":
            x = [(w["start"] + w["end"]) / 2 for w in used]
        else:
            x = [(w["replay_start"] + w["replay_end"]) / 2 for w in used]
        fits[name] = {
            "field": field,
            "x": axis,
            "sense": sense,
            **fit_line(x, [w[field] for w in used], tolerance, sense),
        }
    record = {
        "kind": kind,
        "workdir": os.path.abspath(workdir),
        "warmup_step": warmup_step,
        "warmup_windows_left_out": min(skip, len(windows)),
        "windows": windows,
        "measured_windows": len(measured),
        "fits": fits,
        "tolerance_pct": tolerance,
    }
    if kind == "finetune" and measured:
        record["replay_growth"] = measured[-1]["replay_end"] / max(measured[0]["replay_start"], 1.0)
    return record


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def format_table(record: dict[str, Any], max_rows: int) -> str:
    kind, windows = record["kind"], record["windows"]
    skip = record["warmup_windows_left_out"]
    unit = "steps/s" if kind == "pretrain" else "updates/s"
    header = f"{'window':>9} {'steps':>17} {unit:>10}"
    if kind == "finetune":
        header += f" {'env fps':>9} {'replay steps':>17}"
    cpu = any(w.get("steps_per_cpu_second") is not None for w in windows)
    if cpu:
        header += f" {'steps/CPU-s':>11} {'CPU use':>7} {'loop ms/step':>12}"
    lines = [header, "-" * len(header)]

    def mean(group: list[dict[str, Any]], field: str, width: int, digits: int) -> str:
        values = [w[field] for w in group if w.get(field) is not None]
        return f"{np.mean(values):>{width}.{digits}f}" if values else f"{'-':>{width}}"

    def line(label: str, group: list[dict[str, Any]]) -> str:
        text = f"{label:>9} {group[0]['start']:>8}-{group[-1]['end']:<8} {mean(group, 'rate', 10, 3)}"
        if kind == "finetune":
            text += f" {mean(group, 'fps_env', 9, 2)} {group[0]['replay_start']:>8.0f}-{group[-1]['replay_end']:<8.0f}"
        if cpu:
            text += (
                f" {mean(group, 'steps_per_cpu_second', 11, 3)} {mean(group, 'cpu_utilization', 7, 2)}"
                f" {mean(group, 'main_thread_ms_per_step', 12, 2)}"
            )
        return text

    for w in windows[:skip]:
        lines.append(line(f"{w['index']} (w)", [w]))
    measured = windows[skip:]
    per_row = max(1, -(-len(measured) // max(max_rows, 1)))
    for i in range(0, len(measured), per_row):
        group = measured[i : i + per_row]
        label = str(group[0]["index"]) if len(group) == 1 else f"{group[0]['index']}-{group[-1]['index']}"
        lines.append(line(label, group))
    notes = ["(w) = warm-up, left out of the fits"]
    if per_row > 1:
        notes.append(f"groups of {per_row} windows show their mean rates")
    if cpu:
        notes.append(
            "steps/CPU-s: steps per CPU-second of the run and its workers; CPU use: their CPU-s "
            "per second; loop ms/step: CPU of the run's main thread (the host loop) per step"
        )
    lines.append("; ".join(notes))
    return "\n".join(lines)


def format_fits(record: dict[str, Any]) -> str:
    lines = []
    for name, fit in record["fits"].items():
        if fit["slope"] is None:
            lines.append(f"  {name}: {fit['verdict']}")
            continue
        per = "1000 replay steps" if fit["x"] == "replay" else "1000 steps"
        # None where the first window's value is 0 (a CPU reading that did not advance in it)
        ratio = "-" if fit["ratio_last_first"] is None else f"{fit['ratio_last_first']:.3f}"
        lines.append(
            f"  {name}: {fit['verdict']} (fitted drift {fit['drift_pct']:+.1f}% +- "
            f"{fit['drift_ci_pct']:.1f}% from x={fit['x_first']:.0f} to {fit['x_last']:.0f}; "
            f"tolerance {record['tolerance_pct']:g}%)"
        )
        lines.append(
            f"      slope {fit['slope_pct_per_1000']:+.2f}% per {per}; last/first window "
            f"{ratio}; mean {fit['mean_rate']:.3f} over {fit['n']} windows; "
            f"residual std {fit['residual_std_pct']:.1f}%"
        )
        if fit["noisy"]:
            lines.append("      noisy: the +- interval is wider than the tolerance (run longer or log less often)")
    paired = record.get("paired")
    if paired is not None:
        if "ratio" not in paired:
            lines.append(f"  paired with a fresh run: {paired['verdict']}")
        else:
            cpu = f"{paired['cpu_ratio']:.3f}" if paired["cpu_ratio"] is not None else "-"
            lines.append(
                f"  paired with a fresh run: {paired['verdict']} (tolerance {record['tolerance_pct']:g}%): "
                f"over the same {paired['seconds']:.0f} s the run went from step "
                f"{paired['main_steps'][0]:.0f} to {paired['main_steps'][1]:.0f} "
                f"({paired['main_rate']:.3f}/s), a fresh run of the same config from "
                f"{paired['control_steps'][0]} to {paired['control_steps'][1]} "
                f"({paired['control_rate']:.3f}/s): ratio {paired['ratio']:.3f}, per CPU-second {cpu}"
            )
            lines.append(
                f"      (the run's windows from step {paired['control_started_at_step']} on shared the "
                "machine with the control run)"
            )
    if record["kind"] == "finetune" and "replay_growth" in record:
        lines.append(f"  replay grew {record['replay_growth']:.1f}x over the measured windows")
    return "\n".join(lines)


def report(record: dict[str, Any], max_rows: int) -> None:
    title = "pre-training" if record["kind"] == "pretrain" else "fine-tuning"
    print(
        f"\n{title}: {record['workdir']} ({len(record['windows'])} windows, "
        f"{record['warmup_windows_left_out']} left out as warm-up, warm-up step {record['warmup_step']})"
    )
    print(format_table(record, max_rows))
    print(format_fits(record), flush=True)


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class CpuSampler:
    """The CPU seconds (user + system) of a process and all its descendants (environment
    workers, the W&B process), read with ``psutil`` each time the run's ``metrics.jsonl`` gets a
    new throughput line: one ``(step, cpu_seconds, wall_seconds)`` sample per line, at most
    ``poll`` seconds after the line was written. A descendant that exits keeps its last reading."""

    def __init__(self, pid: int, metrics_path: str, rate_key: str, poll: float):
        import psutil

        self._psutil, self._root = psutil, psutil.Process(pid)
        self.path, self.rate_key, self.poll = metrics_path, rate_key, poll
        self.samples: list[dict[str, float]] = []
        self._cpu: dict[int, float] = {}
        self._offset, self._partial = 0, ""
        self._start = time.perf_counter()

    def cpu_seconds(self) -> float:
        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            processes = []
        for process in processes:
            try:
                times = process.cpu_times()
                self._cpu[process.pid] = times.user + times.system
            except self._psutil.Error:  # exited between listing and reading
                pass
        return sum(self._cpu.values())

    def main_thread_seconds(self) -> float | None:
        """CPU seconds of the run's main thread: the training loop's host side (dispatch,
        logging, checkpoint calls, replay sampling in fine-tuning); XLA computes in other threads."""
        try:
            for thread in self._root.threads():
                if thread.id == self._root.pid:
                    return thread.user_time + thread.system_time
        except self._psutil.Error:
            pass
        return None

    def _new_steps(self) -> list[int]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                handle.seek(self._offset)
                text = handle.read()
                self._offset = handle.tell()
        except OSError:
            return []
        text, steps = self._partial + text, []
        *lines, self._partial = text.split("\n")
        for line in lines:
            if line.strip():
                row = json.loads(line)
                if self.rate_key in row:
                    steps.append(int(row["step"]))
        return steps

    def sample(self) -> None:
        steps = self._new_steps()
        if steps:
            cpu, main, wall = self.cpu_seconds(), self.main_thread_seconds(), time.perf_counter() - self._start
            now = time.time()
            self.samples.extend(
                {"step": step, "cpu_seconds": cpu, "main_thread_seconds": main, "wall_seconds": wall, "time": now}
                for step in steps
            )


def run_sampled(
    command: list[str],
    metrics_path: str | None = None,
    rate_key: str | None = None,
    control: dict[str, Any] | None = None,
    cpu: bool = True,
    poll: float = 0.25,
    cwd: str = ROOT,
) -> tuple[float, list[dict[str, float]] | None]:
    """Runs ``command`` (its output streams through); with ``metrics_path``, samples its CPU time
    at every new throughput line (``CpuSampler``, when ``cpu``; looking every ``poll`` seconds).
    With ``control`` (``command``, ``metrics_path``, ``at``, ``log``), starts that run, its output
    to ``log``, once the main run has logged step ``at``, samples it the same way into
    ``control["samples"]`` and stops it (SIGTERM: it saves and exits) when the main run ends.
    Returns (wall seconds, samples or None)."""
    print(f"[steady_state] $ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd)
    samples, other, other_sampler, log = None, None, None, None
    try:
        sampler = None
        if metrics_path is not None and cpu:
            try:
                sampler = CpuSampler(process.pid, metrics_path, rate_key, poll)
            except (ImportError, OSError) as error:  # no psutil, or the process is gone already
                print(f"[steady_state] no CPU-time samples: {error}", flush=True)
        while sampler is not None and process.poll() is None:
            sampler.sample()
            if (
                control is not None
                and other is None
                and sampler.samples
                and sampler.samples[-1]["step"] >= control["at"]
            ):
                print(
                    f"[steady_state] control run from step 0 beside the main run at step "
                    f"{sampler.samples[-1]['step']} (output: {control['log']}): "
                    f"$ {' '.join(control['command'])}",
                    flush=True,
                )
                log = open(control["log"], "w", encoding="utf-8")
                other = subprocess.Popen(control["command"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                other_sampler = CpuSampler(other.pid, control["metrics_path"], rate_key, poll)
                control["samples"] = other_sampler.samples
                control["started_at_step"] = sampler.samples[-1]["step"]
            if other_sampler is not None and other.poll() is None:
                other_sampler.sample()
            time.sleep(poll)
        if sampler is not None:
            samples = sampler.samples
        returncode = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        if other is not None:
            other.terminate()  # SIGTERM: the run saves a checkpoint and stops
            try:
                other.wait(timeout=300)
            except subprocess.TimeoutExpired:
                other.kill()
                other.wait()
            log.close()
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"error: the run failed with exit status {returncode}: {' '.join(command)}")
    print(f"[steady_state] the run took {seconds:.0f} s", flush=True)
    return seconds, samples


def paired_comparison(
    main: list[dict[str, float]], control: list[dict[str, float]], from_step: int, tolerance: float
) -> dict[str, Any]:
    """The main run's rate against the control run's over the same wall-clock interval: from the
    control's first throughput line at or after ``from_step`` (its warm-up over) to the end of
    the shorter of the two; steps and CPU seconds of the main run interpolated at those times."""
    control = [c for c in control if c["step"] >= from_step]
    if len(control) < 2 or len(main) < 2:
        return {"verdict": "no overlap to compare (the control run logged too little)"}
    t0, t1 = control[0]["time"], min(control[-1]["time"], main[-1]["time"])
    control = [c for c in control if c["time"] <= t1]
    if len(control) < 2 or t1 <= t0 or main[0]["time"] > t0:
        return {"verdict": "no overlap to compare"}
    t1 = control[-1]["time"]
    times = [m["time"] for m in main]

    def at(key, t):
        return float(np.interp(t, times, [m[key] for m in main]))

    seconds = t1 - t0
    main_steps, control_steps = at("step", t1) - at("step", t0), control[-1]["step"] - control[0]["step"]
    main_cpu = at("cpu_seconds", t1) - at("cpu_seconds", t0)
    control_cpu = control[-1]["cpu_seconds"] - control[0]["cpu_seconds"]
    result = {
        "seconds": seconds,
        "main_steps": [at("step", t0), at("step", t1)],
        "control_steps": [control[0]["step"], control[-1]["step"]],
        "main_rate": main_steps / seconds,
        "control_rate": control_steps / seconds,
        "ratio": (main_steps / control_steps) if control_steps else None,
        "cpu_ratio": (
            (main_steps / main_cpu) / (control_steps / control_cpu)
            if main_cpu > 0 and control_cpu > 0 and control_steps
            else None
        ),
    }
    ratio = result["ratio"]
    if ratio is None:
        result["verdict"] = "no control steps in the overlap"
    elif abs(ratio - 1.0) * 100.0 <= tolerance:
        result["verdict"] = "steady"
    elif ratio < 1.0:
        result["verdict"] = f"slows down by {100.0 * (1.0 - ratio):.1f}%"
    else:
        result["verdict"] = f"speeds up by {100.0 * (ratio - 1.0):.1f}%"
    return result
