"""Benchmark report: ``results.csv`` -> ``summary.md``, ``success_per_task.png``, ``return_per_task.png``,
``success_aggregate.png``.

``results.csv`` has one row per evaluation: ``method,task,seed,step,success_rate,return``. The report
is meant to be re-run while the benchmark is still going, so it makes do with whatever is there:
runs with fewer evaluation points, failed or missing seeds, a single seed, tasks without reference
values. The rules that decide which numbers are shown:

- A later row for the same (method, task, seed, step) replaces an earlier one: a resumed run may
  append a step it had already evaluated before it was interrupted.
- **Final step of a (method, task)**: the evaluation step reached by the most seeds, the latest such
  step on ties. So a run that is still going does not hide the seeds that are further along, and a
  seed that is ahead does not turn the table into a single-seed number.
- **Aggregates** (IQM, mean, median over tasks x seeds) at a step use, per method, the seeds that
  have a result at that step on *every* task of that method (the bootstrap needs a [runs, tasks]
  matrix); the "final common step" is the step with the most such seeds (latest on ties). Each method
  is aggregated over its own tasks; the summary says when methods cover different tasks.
- Standard deviations are over seeds with ``ddof=1``; with one seed they, like the confidence
  intervals, are "n/a" rather than a misleading 0.

The per-task plot also marks the seed-mean success of the original APV and DreamerV2 runs (APV's
own TensorFlow code, 8 seeds, ``apv:data/metaworld_raw_data.pkl``; spec section 11) at 105k and 245k
steps for the six tasks they cover. They come from a different code base and encoder, so they are
reference points, not a baseline of this code. Plots use matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from prelar_jax.errors import UserError
from prelar_jax.analysis import stats

COLUMNS: tuple[str, ...] = ("method", "task", "seed", "step", "success_rate", "return")
SUMMARY_FILE = "summary.md"
PER_TASK_PLOT = "success_per_task.png"
RETURN_PLOT = "return_per_task.png"
AGGREGATE_PLOT = "success_aggregate.png"

# Seed-mean success of the original runs (spec section 11): {method: {task: {env step: success}}}.
REFERENCE_SOURCE = "original APV code (TF), 8 seeds"
REFERENCE_SUCCESS: dict[str, dict[str, dict[int, float]]] = {
    "DreamerV2": {
        "lever-pull": {105_000: 0.00, 245_000: 0.10},
        "drawer-open": {105_000: 0.29, 245_000: 0.81},
        "door-lock": {105_000: 0.65, 245_000: 0.88},
        "button-press-topdown-wall": {105_000: 0.38, 245_000: 0.97},
        "reach": {105_000: 0.38, 245_000: 0.70},
        "dial-turn": {105_000: 0.14, 245_000: 0.11},
    },
    "APV": {
        "lever-pull": {105_000: 0.15, 245_000: 0.68},
        "drawer-open": {105_000: 0.70, 245_000: 1.00},
        "door-lock": {105_000: 0.91, 245_000: 0.99},
        "button-press-topdown-wall": {105_000: 0.74, 245_000: 1.00},
        "reach": {105_000: 0.70, 245_000: 0.90},
        "dial-turn": {105_000: 0.47, 245_000: 0.58},
    },
}
_REFERENCE_STYLE = {"DreamerV2": dict(marker="X", color="0.35"), "APV": dict(marker="*", color="black")}


class ResultsFileError(UserError, ValueError):
    """``results.csv`` is missing, empty, or has a malformed row."""


class ResultRow(NamedTuple):
    """One evaluation of one run (``return_`` is the csv column ``return``)."""

    method: str
    task: str
    seed: int
    step: int
    success_rate: float
    return_: float


# method -> task -> seed -> step -> row, in order of first appearance in the csv.
Table = dict[str, dict[str, dict[int, dict[int, ResultRow]]]]


def normalise_task(task: str) -> str:
    """'drawer_open', 'drawer-open-v2' and 'Drawer-Open' all give 'drawer-open' (for reference look-up)."""
    return re.sub(r"-v\d+$", "", task.strip().lower().replace("_", "-"))


def reference_points(task: str) -> dict[str, dict[int, float]]:
    """``{method: {step: seed-mean success}}`` of the original runs for ``task``; empty if none."""
    name = normalise_task(task)
    return {method: dict(by_task[name]) for method, by_task in REFERENCE_SUCCESS.items() if name in by_task}


class Baseline(NamedTuple):
    """A policy's success rate and return on one task, drawn beside the learning curves."""

    success_rate: float
    returns: float
    label: str


def random_policy_baselines(path: str | os.PathLike, time_limit: int) -> dict[str, Baseline]:
    """Task -> the uniform random policy's ``Baseline`` at episodes of ``time_limit`` steps, read
    from an ``experiments/random_policy.py`` output (``ResultsFileError`` if it lacks that limit)."""
    import json

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        results = data["results"]
    except (OSError, ValueError, KeyError) as error:
        raise ResultsFileError(
            f"cannot read random-policy results {path}: {error}; make them with experiments/random_policy.py --out FILE"
        ) from error
    baselines = {}
    for task, by_limit in results.items():
        if str(time_limit) in by_limit:
            entry = by_limit[str(time_limit)]
            baselines[normalise_task(task)] = Baseline(
                float(entry["success_rate"]),
                float(entry["return"]),
                f"random policy ({entry.get('episodes', '?')} episodes)",
            )
    if not baselines:
        limits = sorted({limit for by_limit in results.values() for limit in by_limit}, key=int)
        raise ResultsFileError(
            f"{path} has no random-policy results for {time_limit}-step episodes (it has "
            f"{', '.join(limits) or 'none'}); run experiments/random_policy.py --time_limits "
            f"{time_limit}"
        )
    return baselines


def _parse_int(text: str, column: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ResultsFileError(f"{where}: {column} must be an integer, got {text!r}.") from None
    if not math.isfinite(value) or value != int(value):
        raise ResultsFileError(f"{where}: {column} must be an integer, got {text!r}.")
    return int(value)


def _parse_float(text: str, column: str, where: str) -> float:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        raise ResultsFileError(f"{where}: {column} must be a number, got {text!r}.") from None


def load_results(path: str | os.PathLike) -> list[ResultRow]:
    """The rows of ``results.csv``, validated; a later row for the same run and step replaces an earlier one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ResultsFileError(f"no results file at {path}: run the benchmark first (it writes results.csv).")
    rows: dict[tuple[str, str, int, int], ResultRow] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise ResultsFileError(
                f"{path}: missing column(s) {', '.join(missing)}; the header must contain {','.join(COLUMNS)}."
            )
        for line_number, record in enumerate(reader, start=2):
            where = f"{path}, line {line_number}"
            if any(record.get(column) is None for column in COLUMNS):
                raise ResultsFileError(f"{where}: expected {len(COLUMNS)} fields ({','.join(COLUMNS)}).")
            method, task = record["method"].strip(), record["task"].strip()
            if not method or not task:
                raise ResultsFileError(f"{where}: method and task must not be empty.")
            seed = _parse_int(record["seed"], "seed", where)
            step = _parse_int(record["step"], "step", where)
            success = _parse_float(record["success_rate"], "success_rate", where)
            if not 0.0 <= success <= 1.0:
                raise ResultsFileError(f"{where}: success_rate must lie in [0, 1], got {record['success_rate']!r}.")
            episode_return = _parse_float(record["return"], "return", where)
            rows[(method, task, seed, step)] = ResultRow(method, task, seed, step, success, episode_return)
    return list(rows.values())


def group_results(rows: Iterable[ResultRow]) -> Table:
    """``table[method][task][seed][step] = row``, keeping the csv's order of methods, tasks and seeds."""
    table: Table = {}
    for row in rows:
        table.setdefault(row.method, {}).setdefault(row.task, {}).setdefault(row.seed, {})[row.step] = row
    return table


def _best_step(seeds_by_step: Mapping[int, Sequence[int]]) -> int:
    """The step with the most seeds, the latest one on ties."""
    return max(seeds_by_step, key=lambda step: (len(seeds_by_step[step]), step))


def _seeds_by_step(runs: Mapping[int, Mapping[int, ResultRow]]) -> dict[int, list[int]]:
    """``{step: [seeds with a result at step]}`` for one (method, task), steps ascending."""
    steps = sorted({step for by_step in runs.values() for step in by_step})
    return {step: [seed for seed, by_step in runs.items() if step in by_step] for step in steps}


def _complete_seeds_by_step(tasks: Mapping[str, Mapping[int, Mapping[int, ResultRow]]]) -> dict[int, list[int]]:
    """``{step: [seeds with a result at step on every task]}`` for one method; steps with none left out."""
    per_task = [_seeds_by_step(runs) for runs in tasks.values()]
    all_steps = sorted({step for seeds in per_task for step in seeds})
    complete = {}
    for step in all_steps:
        seeds = [
            seed for seed in per_task[0].get(step, []) if all(seed in other.get(step, []) for other in per_task[1:])
        ]
        if seeds:
            complete[step] = sorted(seeds)
    return complete


class TaskFinal(NamedTuple):
    """Success and return of one (method, task) at its final step, one entry per seed."""

    method: str
    task: str
    step: int
    seeds: list[int]
    success: np.ndarray  # [seeds]
    returns: np.ndarray  # [seeds]


def final_per_task(table: Table) -> list[TaskFinal]:
    """Per (method, task): the values at the step reached by the most seeds (see module docstring)."""
    finals = []
    for method, tasks in table.items():
        for task, runs in tasks.items():
            seeds_by_step = _seeds_by_step(runs)
            step = _best_step(seeds_by_step)
            seeds = sorted(seeds_by_step[step])
            success = np.array([runs[seed][step].success_rate for seed in seeds])
            returns = np.array([runs[seed][step].return_ for seed in seeds])
            finals.append(TaskFinal(method, task, step, seeds, success, returns))
    return finals


class StepAggregate(NamedTuple):
    """Aggregates of one method at one step over ``tasks`` x ``seeds``."""

    step: int
    tasks: list[str]
    seeds: list[int]
    estimates: dict[str, stats.Interval]  # "iqm" | "mean" | "median"


def aggregate_per_step(table: Table, reps: int = 2000, seed: int = 0) -> dict[str, list[StepAggregate]]:
    """``{method: [StepAggregate per step with at least one seed complete across tasks]}``, steps ascending."""
    result: dict[str, list[StepAggregate]] = {}
    for method, tasks in table.items():
        task_names = list(tasks)
        result[method] = []
        for step, seeds in _complete_seeds_by_step(tasks).items():
            scores = np.array(
                [[tasks[task][run][step].success_rate for task in task_names] for run in seeds]
            )  # [runs, tasks]
            estimates = stats.aggregate_all({method: scores}, reps=reps, seed=seed)[method]
            result[method].append(StepAggregate(step, task_names, seeds, estimates))
    return result


def final_aggregate(per_step: Sequence[StepAggregate]) -> StepAggregate:
    """The aggregate at the final common step: most complete seeds, latest on ties."""
    return max(per_step, key=lambda aggregate: (len(aggregate.seeds), aggregate.step))


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


def format_mean_std(values: np.ndarray) -> str:
    """``"0.50 ± 0.10"`` over seeds (ddof=1); the std is "n/a" for a single seed."""
    values = np.asarray(values, dtype=np.float64)
    spread = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return f"{_number(float(np.mean(values)))} ± {_number(spread)}"


def format_interval(interval: stats.Interval) -> str:
    """``"0.50 [0.30, 0.70]"``, or ``"0.50 [n/a]"`` when there is no interval (a single seed)."""
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return f"{_number(interval.point)} [n/a]"
    return f"{_number(interval.point)} [{_number(interval.low)}, {_number(interval.high)}]"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_markdown(
    table: Table,
    per_step: Mapping[str, Sequence[StepAggregate]],
    source: str,
    reps: int,
    seed: int,
    reference: bool = True,
    baselines: Mapping[str, Baseline] | None = None,
) -> str:
    """The text of ``summary.md``."""
    methods = list(table)
    tasks = list(dict.fromkeys(task for by_task in table.values() for task in by_task))
    n_rows = sum(len(by_step) for by_task in table.values() for runs in by_task.values() for by_step in runs.values())
    lines = [
        "# Benchmark summary",
        "",
        f"From `{source}`: {n_rows} evaluations of {len(methods)} method(s) on {len(tasks)} task(s).",
        "",
        "## Final success rate per task",
        "",
        "At the evaluation step reached by the most seeds (the latest on ties); mean ± standard deviation",
        "over seeds (ddof=1, n/a for one seed).",
        "",
    ]
    lines += _markdown_table(
        ("method", "task", "step", "seeds", "success rate", "return"),
        (
            (f.method, f.task, str(f.step), str(len(f.seeds)), format_mean_std(f.success), format_mean_std(f.returns))
            for f in final_per_task(table)
        ),
    )
    shown = {task: (baselines or {}).get(normalise_task(task)) for task in tasks}
    if any(shown.values()):
        lines += [
            "",
            "Baselines on the same tasks (dashed in the per-task plot): "
            + "; ".join(
                f"{task}: {b.label}, success {b.success_rate:.2f}, return {b.returns:.1f}"
                for task, b in shown.items()
                if b
            )
            + ".",
        ]
    lines += [
        "",
        "## Aggregate over tasks and seeds at the final common step",
        "",
        "Interquartile mean (IQM), mean and median (over tasks, of the per-task mean over seeds) of the",
        f"success rate, with 95% stratified bootstrap confidence intervals ({reps} resamples, seed {seed};",
        "rliable, Agarwal et al. 2021). Uses the seeds that have this step on every task of the method;",
        "n/a with a single seed.",
        "",
    ]
    final_rows = []
    for method in methods:
        if not per_step.get(method):
            no_seeds = (method, "n/a", str(len(table[method])), "none complete across tasks", "n/a", "n/a", "n/a")
            final_rows.append(no_seeds)
            continue
        final = final_aggregate(per_step[method])
        final_rows.append(
            (
                method,
                str(final.step),
                str(len(final.tasks)),
                ", ".join(str(s) for s in final.seeds),
                format_interval(final.estimates["iqm"]),
                format_interval(final.estimates["mean"]),
                format_interval(final.estimates["median"]),
            )
        )
    header = ("method", "step", "tasks", "seed ids", "IQM [95% CI]", "mean [95% CI]", "median [95% CI]")
    lines += _markdown_table(header, final_rows)
    task_sets = {method: tuple(by_task) for method, by_task in table.items()}
    if len(set(map(frozenset, task_sets.values()))) > 1:
        lines += ["", "Note: the methods cover different tasks, so their aggregates are not directly comparable:"]
        lines += [f"- {method}: {', '.join(names)}" for method, names in task_sets.items()]

    steps = sorted({aggregate.step for aggregates in per_step.values() for aggregate in aggregates})
    lines += [
        "",
        "## IQM [95% CI] at every evaluation step",
        "",
        "Over tasks x seeds; `n` is the number of seeds complete across the method's tasks at that step.",
        "",
    ]
    cells = {
        (method, a.step): f"{format_interval(a.estimates['iqm'])} (n={len(a.seeds)})"
        for method in methods
        for a in per_step.get(method, ())
    }
    step_rows = ((str(step), *(cells.get((method, step), "–") for method in methods)) for step in steps)
    lines += _markdown_table(("step", *methods), step_rows)

    covered = [task for task in tasks if reference_points(task)]
    if reference and covered:
        lines += [
            "",
            f"## Reference points: {REFERENCE_SOURCE}",
            "",
            "Seed-mean success of the original APV and DreamerV2 runs (APV's TensorFlow code, plain CNN;",
            "spec section 11). A different code base: for orientation, not a baseline of this code.",
            "",
        ]
        rows = []
        for task in covered:
            points = reference_points(task)
            rows.append((task, *(_number(points[m][s]) for m in ("DreamerV2", "APV") for s in sorted(points[m]))))
        lines += _markdown_table(("task", "DreamerV2 @105k", "@245k", "APV @105k", "@245k"), rows)
    return "\n".join(lines) + "\n"


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {method: f"C{index % 10}" for index, method in enumerate(methods)}


def _steps_axis(axes, rate: bool = True) -> None:
    """Environment steps on x; ``rate``: a success rate on y, shown from 0 to 1."""
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    axes.set_xlabel("environment steps")
    if rate:
        axes.set_ylim(-0.03, 1.03)
    axes.grid(alpha=0.3)


# Reference points are drawn on a task's plot only if they lie within this factor of its last step.
REFERENCE_RANGE = 4.0


def per_task_figure(
    table: Table, reference: bool = True, baselines: Mapping[str, Baseline] | None = None, metric: str = "success_rate"
) -> Figure:
    """One subplot per task: per method the mean ``metric`` (``success_rate`` or ``return``) over
    seeds, shaded from min to max over seeds; a task's ``baselines`` entry (e.g. the random policy)
    as a dashed line. Reference points (success only) where they fall in range."""
    if metric not in ("success_rate", "return"):
        raise ValueError(f"metric must be 'success_rate' or 'return', not {metric!r}")
    reference = reference and metric == "success_rate"
    methods = list(table)
    colors = _colors(methods)
    tasks = list(dict.fromkeys(task for by_task in table.values() for task in by_task))
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows + 0.6), layout="constrained")  # + the legend's height
    FigureCanvasAgg(figure)
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    handles: dict[str, Line2D] = {}
    partial = False  # some seed went on beyond a shorter one
    for index, task in enumerate(tasks):
        axes = axes_grid[index // columns][index % columns]
        for method in methods:
            runs = table[method].get(task)
            if not runs:
                continue

            def value(seed: int, step: int, runs=runs) -> float:
                row = runs[seed][step]
                return row.success_rate if metric == "success_rate" else row.return_

            # The mean and band only where every seed has a result: beyond the shortest run a mean
            # over the remaining seeds would jump with the seed set. Longer seeds go on dotted.
            complete = [step for step, seeds in _seeds_by_step(runs).items() if len(seeds) == len(runs)]
            values = [np.array([value(seed, step) for seed in runs]) for step in complete]  # [steps][seeds]
            line = axes.plot(
                complete, [v.mean() for v in values], color=colors[method], marker="o", markersize=3, label=method
            )[0]
            if len(runs) > 1 and complete:
                axes.fill_between(
                    complete,
                    [v.min() for v in values],
                    [v.max() for v in values],
                    color=colors[method],
                    alpha=0.2,
                    linewidth=0,
                )
            last = complete[-1] if complete else -1
            for seed, by_step in runs.items():
                beyond = [step for step in sorted(by_step) if step > last]
                if beyond:
                    start = [last] if complete else []
                    axes.plot(
                        start + beyond,
                        [value(seed, step) for step in start + beyond],
                        color=colors[method],
                        linestyle=":",
                        linewidth=1.2,
                        label=f"_{method} seed {seed}",
                    )
                    partial = True
            handles.setdefault(method, line)
        baseline = (baselines or {}).get(normalise_task(task))
        if baseline is not None:
            level = baseline.success_rate if metric == "success_rate" else baseline.returns
            handles.setdefault(
                baseline.label, axes.axhline(level, color="grey", linestyle="--", linewidth=1.2, label=baseline.label)
            )
        # Reference points far beyond these runs (a short run against 105k/245k) would squash the
        # curves into the left edge; they are then left to the summary's table, and the title says so.
        last_step = max(
            (
                step
                for runs in (table[m].get(task) for m in methods)
                if runs
                for by_step in runs.values()
                for step in by_step
            ),
            default=0,
        )
        beyond = (
            reference
            and reference_points(task)
            and min(step for points in reference_points(task).values() for step in points) > REFERENCE_RANGE * last_step
        )
        if reference and not beyond:
            for ref_method, points in reference_points(task).items():
                label = f"{ref_method}, {REFERENCE_SOURCE} (seed mean)"
                marker = axes.scatter(
                    list(points), list(points.values()), s=80, zorder=5, label=label, **_REFERENCE_STYLE[ref_method]
                )
                handles.setdefault(label, marker)
        axes.set_title(
            f"{task}\n(reference points beyond these steps: see summary.md)" if beyond else task, fontsize="medium"
        )
        axes.set_ylabel("success rate" if metric == "success_rate" else "return")
        _steps_axis(axes, rate=metric == "success_rate")
    for index in range(len(tasks), rows * columns):
        axes_grid[index // columns][index % columns].set_visible(False)
    _legend_below(figure, handles)
    figure.suptitle(
        f"{'Success rate' if metric == 'success_rate' else 'Evaluation return'} per task\n"
        "(line: mean over seeds, band: min to max over seeds"
        + (";\ndotted: single seeds past the shortest run)" if partial else ")")
    )
    return figure


def _legend_below(figure: Figure, handles: Mapping[str, Line2D]) -> None:
    """The figure's legend below its axes, in as many columns (at most 4) as fit its width, the
    figure made taller by the legend's height so that the axes keep theirs."""
    renderer = figure.canvas.get_renderer()
    for columns in range(min(4, len(handles)), 0, -1):
        legend = figure.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncol=columns, fontsize="small"
        )
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * figure.bbox.width or columns == 1:
            break
        legend.remove()
    width, height = figure.get_size_inches()
    figure.set_size_inches(width, height + box.height / figure.dpi)


def aggregate_figure(per_step: Mapping[str, Sequence[StepAggregate]]) -> Figure:
    """Per method, the IQM over tasks x seeds against environment steps, shaded with its 95% CI."""
    colors = _colors(list(per_step))
    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for method, aggregates in per_step.items():
        if not aggregates:
            continue
        steps = np.array([a.step for a in aggregates])  # [steps]
        iqms = [a.estimates["iqm"] for a in aggregates]
        most_seeds = max(len(a.seeds) for a in aggregates)
        no_ci = ", no CI" if most_seeds < 2 else ""
        label = f"{method} ({len(aggregates[-1].tasks)} task(s), up to {most_seeds} seed(s){no_ci})"
        axes.plot(steps, [i.point for i in iqms], color=colors[method], marker="o", markersize=3, label=label)
        low, high = np.array([i.low for i in iqms]), np.array([i.high for i in iqms])
        has_ci = np.isfinite(low) & np.isfinite(high)
        if has_ci.any():
            axes.fill_between(steps, low, high, where=has_ci, color=colors[method], alpha=0.2, linewidth=0)
    axes.set_ylabel("IQM success rate")
    axes.set_title("IQM over tasks x seeds, 95% stratified bootstrap CI")
    _steps_axis(axes)
    axes.legend(fontsize="small", loc="best")
    return figure


def _save_png(figure: Figure, path: str) -> None:
    """Writes to a temporary name and renames, so a reader never sees a half-written image."""
    temporary = path + ".tmp"
    figure.savefig(temporary, format="png", dpi=110)
    os.replace(temporary, path)


def _write_text(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def demote_headings(markdown: str) -> str:
    """``# A`` -> ``## A`` for every heading line (not inside code fences)."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(lines) + "\n"


def write_report(
    results_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    reference: bool = True,
    reps: int = 2000,
    seed: int = 0,
    appendix: str = "",
    baselines: Mapping[str, Baseline] | None = None,
    preface: str = "",
) -> dict[str, str]:
    """Writes the summary table and both plots into ``out_dir``; returns their paths.

    Keys: ``"summary"`` (``summary.md``), ``"success_per_task"``, ``"return_per_task"`` and
    ``"success_aggregate"`` (PNGs).
    ``reference`` draws (and tabulates) the original APV/DreamerV2 reference points. ``appendix``
    (Markdown, e.g. the pre-training diagnostics) is added at the end of ``summary.md`` with its
    headings demoted one level, so that it reads as a section of the summary. ``baselines``
    (task -> ``Baseline``, e.g. ``random_policy_baselines``) are drawn and listed beside the methods.
    ``preface`` (Markdown written by people: what the numbers show and do not show) goes right
    after the title, headings demoted likewise.
    """
    rows = load_results(results_csv)
    if not rows:
        raise ResultsFileError(f"{os.fspath(results_csv)} has no results yet: wait for the first evaluation.")
    table = group_results(rows)
    per_step = aggregate_per_step(table, reps=reps, seed=seed)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "summary": os.path.join(out_dir, SUMMARY_FILE),
        "success_per_task": os.path.join(out_dir, PER_TASK_PLOT),
        "return_per_task": os.path.join(out_dir, RETURN_PLOT),
        "success_aggregate": os.path.join(out_dir, AGGREGATE_PLOT),
    }
    markdown = summary_markdown(
        table, per_step, os.path.basename(os.fspath(results_csv)), reps, seed, reference, baselines
    )
    if preface.strip():
        title, _, rest = markdown.partition("\n")
        markdown = f"{title}\n\n{demote_headings(preface).strip()}\n{rest}"
    if appendix.strip():
        markdown += "\n" + demote_headings(appendix).rstrip("\n") + "\n"
    _write_text(paths["summary"], markdown)
    _save_png(per_task_figure(table, reference=reference, baselines=baselines), paths["success_per_task"])
    _save_png(per_task_figure(table, baselines=baselines, metric="return"), paths["return_per_task"])
    _save_png(aggregate_figure(per_step), paths["success_aggregate"])
    return paths
