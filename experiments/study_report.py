"""One markdown table from several ``experiments/pretrain_study.py`` outputs (one row per run: its
overrides, the first and last evaluation).

    python experiments/study_report.py runs/study_a runs/study_b > table.md
"""

from __future__ import annotations

import json
import math
import os
import sys

HIDDEN_PREFIXES = ("data.root",)


def _fmt(value, digits: int = 5) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(directories: list[str]) -> str:
    lines = ["| run | overrides | step | implicit KL | probe R² action: init → trained | probe R² position: init → "
             "trained | open-loop MSE | recon MSE | mean-frame MSE | last-frame MSE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for directory in directories:
        if not os.path.exists(os.path.join(directory, "study.jsonl")):
            print(f"skipped {directory}: no study.jsonl", file=sys.stderr)
            continue
        with open(os.path.join(directory, "config.json")) as f:
            meta = json.load(f)
        with open(os.path.join(directory, "study.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        overrides = ", ".join(f"{k}={v}" for k, v in meta["overrides"].items() if not k.startswith(HIDDEN_PREFIXES))
        lines.append(
            f"| {os.path.basename(os.path.normpath(directory))} | {overrides or '(preset)'} | {last['step']} | "
            f"{_fmt(last.get('implicit_kl'), 3)} | "
            f"{_fmt(first.get('probe_r2_mean'), 2)} → {_fmt(last.get('probe_r2_mean'), 2)} | "
            f"{_fmt(first.get('probe_position_r2_mean'), 2)} → {_fmt(last.get('probe_position_r2_mean'), 2)} | "
            f"{_fmt(last['open_loop_mse'])} | {_fmt(last['recon_mse'])} | {_fmt(last['mean_frame_mse'])} | "
            f"{_fmt(last['last_frame_mse'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
