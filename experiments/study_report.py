"""One markdown table from several ``experiments/pretrain_study.py`` outputs (one row per run: its
overrides, the first and last evaluation), and optionally their curves.

    python experiments/study_report.py runs/study_a runs/study_b > table.md
    python experiments/study_report.py --plot curves.png runs/study_a runs/study_b > table.md

``--plot``: open-loop and reconstruction MSE against updates, with each run's mean-frame and
last-frame baselines drawn as horizontal lines, and the implicit-action probe R² (step 0 is the
initialised network; dashed, where recorded, a random network with the code network's original
initialisation: the random-features baseline).
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


def read_study(directory: str) -> tuple[dict, list[dict]]:
    """``(config.json, evaluation rows)`` of one study output; rows empty if there are none yet."""
    with open(os.path.join(directory, "config.json")) as f:
        meta = json.load(f)
    with open(os.path.join(directory, "study.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return meta, rows


def plot(directories: list[str], path: str) -> None:
    """Writes the curves of the studies in ``directories`` as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    studies = [(directory, read_study(directory)[1]) for directory in directories]
    with_hand = any(rows and "probe_hand_r2_mean" in rows[-1] for _, rows in studies)
    figure = Figure(figsize=(18.5 if with_hand else 14, 4.2))
    FigureCanvasAgg(figure)
    mse_axes, recon_axes, probe_axes, *hand_axes = figure.subplots(1, 4 if with_hand else 3)
    colors = ["C%d" % i for i in range(10)]
    for index, (directory, rows) in enumerate(studies):
        if not rows:
            continue
        name, color = os.path.basename(os.path.normpath(directory)), colors[index % len(colors)]
        steps = [row["step"] for row in rows]
        for axes, key in ((mse_axes, "open_loop_mse"), (recon_axes, "recon_mse")):
            axes.plot(steps, [row[key] for row in rows], color=color, marker="o", label=name)
            axes.axhline(rows[-1]["mean_frame_mse"], color=color, linestyle="--", linewidth=1)
            axes.axhline(rows[-1]["last_frame_mse"], color=color, linestyle=":", linewidth=1)
        if "probe_r2_mean" in rows[0]:
            probe_axes.plot(steps, [row["probe_r2_mean"] for row in rows], color=color, marker="o", label=name)
            if "probe_r2_random_encoder_mean" in rows[0]:
                probe_axes.axhline(rows[0]["probe_r2_random_encoder_mean"], color=color, linestyle="--", linewidth=1)
        if hand_axes and "probe_hand_r2_mean" in rows[-1]:
            hand_axes[0].plot(
                steps,
                [row.get("probe_hand_r2_mean", float("nan")) for row in rows],
                color=color,
                marker="o",
                label=name,
            )
            if "probe_hand_r2_random_encoder_mean" in rows[0]:
                hand_axes[0].axhline(
                    rows[0]["probe_hand_r2_random_encoder_mean"], color=color, linestyle="--", linewidth=1
                )
    mse_axes.set_title("open-loop MSE\n(dashed: mean frame, dotted: last frame)", fontsize=10)
    recon_axes.set_title("reconstruction MSE\n(dashed: mean frame, dotted: last frame)", fontsize=10)
    probe_axes.set_title(
        "held-out probe R² of the codes\n(step 0: the initialisation; dashed: random features)", fontsize=10
    )
    probe_axes.axhline(0.0, color="grey", linewidth=0.8)
    for axes in hand_axes:
        axes.set_title("held-out probe R² to the hand's measured motion\n(dashed: random features)", fontsize=10)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.legend(fontsize=7)
    for axes in (mse_axes, recon_axes, probe_axes, *hand_axes):
        axes.set_xlabel("updates")
        axes.grid(alpha=0.3)
    mse_axes.set_yscale("log")
    recon_axes.set_yscale("log")
    probe_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)


def table(directories: list[str]) -> str:
    lines = [
        "| run | overrides | step | implicit KL | probe R² action: init → trained | probe R² random features | "
        "probe R² position: init → trained | probe R² hand motion: trained (random features) | "
        "open-loop MSE | recon MSE | mean-frame MSE | last-frame MSE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for directory in directories:
        if not os.path.exists(os.path.join(directory, "study.jsonl")):
            print(f"skipped {directory}: no study.jsonl", file=sys.stderr)
            continue
        meta, rows = read_study(directory)
        if not rows:
            continue
        first, last = rows[0], rows[-1]
        overrides = ", ".join(f"{k}={v}" for k, v in meta["overrides"].items() if not k.startswith(HIDDEN_PREFIXES))
        lines.append(
            f"| {os.path.basename(os.path.normpath(directory))} | {overrides or '(preset)'} | {last['step']} | "
            f"{_fmt(last.get('implicit_kl'), 3)} | "
            f"{_fmt(first.get('probe_r2_mean'), 2)} → {_fmt(last.get('probe_r2_mean'), 2)} | "
            f"{_fmt(first.get('probe_r2_random_encoder_mean'), 2)} | "
            f"{_fmt(first.get('probe_position_r2_mean'), 2)} → {_fmt(last.get('probe_position_r2_mean'), 2)} | "
            f"{_fmt(last.get('probe_hand_r2_mean'), 2)} ({_fmt(first.get('probe_hand_r2_random_encoder_mean'), 2)}) | "
            f"{_fmt(last['open_loop_mse'])} | {_fmt(last['recon_mse'])} | {_fmt(last['mean_frame_mse'])} | "
            f"{_fmt(last['last_frame_mse'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plot", default="", help="also write the curves as a PNG here")
    parser.add_argument("directories", nargs="+", help="pretrain_study.py outputs (--out)")
    args = parser.parse_args(argv)
    print(table(args.directories))
    if args.plot:
        plot([d for d in args.directories if os.path.exists(os.path.join(d, "study.jsonl"))], args.plot)
        print(f"curves: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
