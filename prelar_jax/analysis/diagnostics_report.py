"""The pre-training diagnostics' Markdown (``experiments/diagnostics.py`` writes it for one run; the
benchmark report writes it for all its diagnostics runs merged): the implicit-action probe and the
world-model transfer as tables."""

from __future__ import annotations

import math
from typing import Any

ACTION_NAMES = ("dx", "dy", "dz", "gripper")


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_markdown(results: dict[str, Any]) -> str:
    """The two diagnostics as Markdown tables (sections only for what was run)."""
    lines = ["# Pre-training diagnostics", ""]
    probe = results.get("probe")
    if probe:
        dims = len(next(iter(probe.values()))["r2"])
        names = list(ACTION_NAMES[:dims]) + [f"a{i}" for i in range(len(ACTION_NAMES), dims)]
        lines += [
            f"## Implicit-action probe (held-out R² of a linear map code -> action; {probe_summary(probe)})",
            "",
            "| encoder | " + " | ".join(f"R² {n}" for n in names) + " | mean R² | fit / held-out pairs |",
            "|---|" + "---|" * (dims + 2),
        ]
        for name, res in probe.items():
            lines.append(
                f"| {name} | "
                + " | ".join(_number(v, 3) for v in res["r2"])
                + f" | {_mean(res)} | {res['train_pairs']} / {res['eval_pairs']} |"
            )
        lines.append("")
        if all("hand" in res for res in probe.values()):
            lines += [
                "## The same probe to the hand's measured displacement between the pair's frames",
                "",
                "(the motion the frames show; the commanded action differs from it where the arm lags, "
                "touches something or the command is clipped)",
                "",
                "| encoder | R² dx | R² dy | R² dz | mean R² |",
                "|---|---|---|---|---|",
            ]
            for name, res in probe.items():
                lines.append(
                    f"| {name} | " + " | ".join(_number(v, 3) for v in res["hand"]["r2"]) + f" | {_mean(res['hand'])} |"
                )
            lines.append("")
    transfer = results.get("transfer")
    if transfer:
        first = next(iter(transfer.values()))
        lines += [
            f"## World-model transfer ({results.get('task', '?')}: {first['updates']} updates, open-loop "
            f"prediction after {first['context']} context frames over {first['eval_windows']} windows)",
            "",
            "| initialisation | config | MSE before | MSE after | PSNR before (dB) | PSNR after (dB) "
            "| reconstruction MSE after | mean-frame MSE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, res in transfer.items():
            lines.append(
                f"| {name} | {res.get('config') or res.get('method', '?')} | {_number(res['initial_mse'], 5)} | "
                f"{_number(res['mse'], 5)} | {_number(res['initial_psnr'], 2)} | "
                f"{_number(res['psnr'], 2)} | {_number(res.get('context_mse'), 5)} | "
                f"{_number(res.get('baseline_mse'), 5)} |"
            )
        lines += [
            "",
            "MSE per pixel in [0, 1] over the predicted frames only; reconstruction: the observed "
            "context frames; mean-frame: predicting the mean training frame everywhere.",
            "",
        ]
    return "\n".join(lines)


def _mean(res: dict[str, Any]) -> str:
    """A probe's mean R², with its standard deviation over the episode splits where there were several."""
    spread = res.get("r2_mean_std")
    return _number(res["r2_mean"], 3) + (f" ± {_number(spread, 3)}" if spread is not None else "")


def probe_summary(probe: dict[str, Any]) -> str:
    res = next(iter(probe.values()))
    splits = len(res.get("splits") or [None])
    over = f", mean ± std over {splits} random splits" if splits > 1 else ""
    return (
        f"{len(res['train_episodes'])} fit / {len(res['eval_episodes'])} held-out episodes{over}, "
        f"code {res['code_type']}"
    )
