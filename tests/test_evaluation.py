"""Aggregate statistics (IQM, stratified bootstrap CIs) and the benchmark report.

Numbers are checked against scipy / rliable and a small numpy bootstrap written here, on hand cases
whose answers can be worked out on paper; the report against statistics recomputed from the csv.
"""

import csv
import json
import math
import os
import re

import numpy as np
import pytest
import scipy.stats
from PIL import Image
from rliable import metrics as rliable_metrics

from prelar_jax.errors import UserError
from prelar_jax.analysis import report, stats

SPEC = "/work/shared/reference/prelar_spec.md"


# ----------------------------------------------------------------------------------------------
# IQM


def test_iqm_hand_cases():
    # 8 values: the middle 50% are 3, 4, 5, 6 whatever the order and however extreme the tails.
    assert stats.iqm(np.array([8, 1, 7, 2, 6, 3, 5, 4])) == pytest.approx(4.5)
    assert stats.iqm(np.array([-100, 0, 3, 4, 5, 6, 100, 1e6])) == pytest.approx(4.5)
    # Ties straddling the quartiles: sorted 1,1,1,1,2,2,2,2 -> middle 1,1,2,2.
    assert stats.iqm(np.array([2, 1, 2, 1, 2, 1, 2, 1])) == pytest.approx(1.5)
    # 10 values: int(2.5) = 2 trimmed from each side -> mean of 3..8.
    assert stats.iqm(np.arange(1, 11)) == pytest.approx(5.5)
    # A [runs, tasks] matrix is pooled over all entries.
    assert stats.iqm(np.array([[1.0, 8.0], [2.0, 7.0], [3.0, 6.0], [4.0, 5.0]])) == pytest.approx(4.5)
    # Fewer than 4 values: nothing is trimmed.
    assert stats.iqm(np.array([0.0, 1.0, 5.0])) == pytest.approx(2.0)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 5), (7, 2), (10, 6), (13,)])
def test_iqm_matches_scipy_trim_mean_and_rliable(shape):
    scores = np.random.default_rng(sum(shape)).random(shape).round(1)  # rounded: many ties
    expected = scipy.stats.trim_mean(scores, 0.25, axis=None)
    assert stats.iqm(scores) == pytest.approx(expected, abs=1e-12)
    assert stats.iqm(scores) == pytest.approx(rliable_metrics.aggregate_iqm(scores), abs=1e-12)


def test_mean_and_median_are_rliables():
    scores = np.random.default_rng(3).random((5, 4))
    estimates = stats.aggregate_all({"m": scores}, reps=10)["m"]
    assert estimates["mean"].point == pytest.approx(rliable_metrics.aggregate_mean(scores))
    assert estimates["median"].point == pytest.approx(rliable_metrics.aggregate_median(scores))
    assert estimates["iqm"].point == pytest.approx(rliable_metrics.aggregate_iqm(scores))


@pytest.mark.parametrize("bad", [np.array([]), np.array([0.5, np.nan]), np.array([[np.inf]])])
def test_iqm_rejects_bad_scores(bad):
    with pytest.raises(UserError):
        stats.iqm(bad)


# ----------------------------------------------------------------------------------------------
# Stratified bootstrap


def numpy_stratified_bootstrap(scores, statistic, reps, rng, confidence=0.95):
    """Independent reference: resample runs within each task (column) separately, percentile CI."""
    runs, tasks = scores.shape
    samples = []
    for _ in range(reps):
        rows = rng.integers(0, runs, size=(runs, tasks))  # a row index per (run, task) slot
        samples.append(statistic(scores[rows, np.arange(tasks)]))
    alpha = (1.0 - confidence) / 2.0
    return np.percentile(samples, [100 * alpha, 100 * (1 - alpha)])


def pooled_bootstrap(scores, statistic, reps, rng, confidence=0.95):
    """Ignores the tasks: resamples all entries together (what stratification must not do)."""
    flat = scores.ravel()
    samples = [statistic(flat[rng.integers(0, flat.size, flat.size)].reshape(scores.shape)) for _ in range(reps)]
    alpha = (1.0 - confidence) / 2.0
    return np.percentile(samples, [100 * alpha, 100 * (1 - alpha)])


def task_mean(scores):
    return float(np.mean(np.mean(scores, axis=0)))


def test_ci_contains_point_and_is_deterministic():
    rng = np.random.default_rng(0)
    scores = {"a": rng.random((5, 3)), "b": rng.random((4, 3))}
    state_before = np.random.get_state()[1].copy()
    first = stats.aggregate_all(scores, reps=500, seed=7)
    assert np.array_equal(np.random.get_state()[1], state_before), "global numpy RNG state must be restored"
    again = stats.aggregate_all(scores, reps=500, seed=7)
    other_seed = stats.aggregate_all(scores, reps=500, seed=8)
    alone = stats.aggregate_all({"b": scores["b"]}, reps=500, seed=7)
    for method in scores:
        for metric in stats.METRICS:
            point, low, high = first[method][metric]
            assert low <= point <= high and low < high
            assert again[method][metric] == first[method][metric]
        assert other_seed[method]["iqm"] != first[method]["iqm"]
    assert alone["b"] == first["b"], "a method's CI must not depend on the other methods passed"
    assert stats.aggregate(scores, reps=500, seed=7)["a"] == first["a"]["iqm"]
    assert stats.aggregate(scores, reps=500, seed=7, metric="median")["b"] == first["b"]["median"]


def test_ci_shrinks_with_more_runs():
    rng = np.random.default_rng(1)
    few, many = rng.random((4, 3)), rng.random((64, 3))
    result = stats.aggregate_all({"few": few, "many": many}, reps=1000)
    for metric in ("iqm", "mean"):
        width_few = result["few"][metric].high - result["few"][metric].low
        width_many = result["many"][metric].high - result["many"][metric].low
        assert width_many < 0.5 * width_few, (metric, width_few, width_many)


def test_identical_runs_collapse_the_ci_and_strata_are_tasks():
    # Every run has the same score on a task, tasks differ: resampling runs within a task changes
    # nothing, so the stratified CI is the point. A bootstrap that pooled tasks would not collapse.
    scores = np.tile([0.2, 0.9, 0.5], (3, 1))  # [3 runs, 3 tasks]
    result = stats.aggregate_all({"m": scores}, reps=300)["m"]
    for metric in stats.METRICS:
        assert result[metric].low == pytest.approx(result[metric].point)
        assert result[metric].high == pytest.approx(result[metric].point)
    low, high = numpy_stratified_bootstrap(scores, task_mean, 300, np.random.default_rng(0))
    assert low == pytest.approx(result["mean"].point) and high == pytest.approx(result["mean"].point)
    pooled_low, pooled_high = pooled_bootstrap(scores, task_mean, 300, np.random.default_rng(0))
    assert pooled_high - pooled_low > 0.2  # the hand case does tell the two apart


def test_independent_resampling_per_task_hand_case():
    # scores [[0, 0], [1, 1]]: each resampled entry is an independent fair coin, so the mean of 4
    # entries is 0, .25, .5, .75, 1 with probabilities 1, 4, 6, 4, 1 (/16). Its 10% and 90% quantiles
    # are .25 and .75. Resampling whole runs (rows) instead would give 0, .5, 1 (1/4, 1/2, 1/4) and
    # an 80% interval of [0, 1].
    scores = np.array([[0.0, 0.0], [1.0, 1.0]])
    mean = stats.aggregate({"m": scores}, reps=2000, metric="mean", confidence=0.8)["m"]
    assert (mean.low, mean.high) == (0.25, 0.75)
    reference = numpy_stratified_bootstrap(scores, task_mean, 2000, np.random.default_rng(0), confidence=0.8)
    np.testing.assert_array_equal(reference, [0.25, 0.75])


def test_matches_numpy_stratified_bootstrap_on_random_scores():
    scores = np.random.default_rng(2).random((8, 4))
    result = stats.aggregate_all({"m": scores}, reps=3000, seed=0)["m"]
    rng = np.random.default_rng(123)
    for metric, statistic in (("iqm", lambda x: scipy.stats.trim_mean(x, 0.25, axis=None)), ("mean", task_mean)):
        low, high = numpy_stratified_bootstrap(scores, statistic, 3000, rng)
        # Different random numbers, same distribution: Monte-Carlo error of the 2.5% quantile is ~0.005.
        assert result[metric].low == pytest.approx(low, abs=0.03), metric
        assert result[metric].high == pytest.approx(high, abs=0.03), metric


def test_single_run_has_no_ci():
    scores = np.array([[0.1, 0.7, 0.4, 0.9]])  # [1 run, 4 tasks]
    result = stats.aggregate_all({"m": scores}, reps=100)["m"]
    assert result["iqm"].point == pytest.approx(scipy.stats.trim_mean(scores, 0.25, axis=None))
    for metric in stats.METRICS:
        assert math.isnan(result[metric].low) and math.isnan(result[metric].high)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scores_by_method={"m": np.ones(4)}),
        dict(scores_by_method={"m": np.array([[0.5, np.nan]])}),
        dict(scores_by_method={"m": np.zeros((0, 3))}),
        dict(scores_by_method={"m": np.ones((2, 2))}, reps=0),
        dict(scores_by_method={"m": np.ones((2, 2))}, metric="max"),
    ],
)
def test_aggregate_rejects_bad_input(kwargs):
    with pytest.raises(UserError):
        stats.aggregate(**kwargs)


# ----------------------------------------------------------------------------------------------
# Report


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(report.COLUMNS)
        writer.writerows(rows)


def synthetic_rows(seed=0):
    """alpha, beta: 2 tasks x 2 seeds x 3 steps; gamma: the same with a single seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, seeds in (("alpha", (0, 1)), ("beta", (0, 1)), ("gamma", (0,))):
        for task in ("drawer_open", "custom-task"):
            for run in seeds:
                for step in (10000, 20000, 30000):
                    success, episode_return = round(float(rng.random()), 1), round(float(rng.normal(100, 30)), 3)
                    rows.append([method, task, run, step, success, episode_return])
    return rows


def section(markdown, title):
    """The text of the '## title' section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.S | re.M)
    assert match, f"no section {title!r} in\n{markdown}"
    return match.group(1)


def table_row(text, *first_cells):
    """The cells of the first markdown table row whose leading cells are ``first_cells``."""
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and tuple(cells[: len(first_cells)]) == tuple(first_cells):
            return cells
    raise AssertionError(f"no row starting with {first_cells} in\n{text}")


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    std = f"{np.std(values, ddof=1):.2f}" if values.size > 1 else "n/a"
    return f"{np.mean(values):.2f} ± {std}"


def parse_interval(cell):
    """'0.50 [0.30, 0.70] (n=2)' -> (0.5, 0.3, 0.7); '[n/a]' -> NaN bounds."""
    match = re.match(r"(-?[\d.]+) \[(?:(-?[\d.]+), (-?[\d.]+)|n/a)\]", cell)
    assert match, cell
    point, low, high = match.groups()
    return float(point), float(low) if low else math.nan, float(high) if high else math.nan


def test_report_writes_table_and_plots(tmp_path):
    rows = synthetic_rows()
    results = tmp_path / "results.csv"
    write_csv(results, rows)
    paths = report.write_report(results, tmp_path / "report", reps=300)
    assert set(paths) == {"summary", "success_per_task", "return_per_task", "success_aggregate"}
    for key in ("success_per_task", "return_per_task", "success_aggregate"):
        assert os.path.getsize(paths[key]) > 1000
        with Image.open(paths[key]) as image:
            image.verify()
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and min(image.size) > 200
    markdown = open(paths["summary"], encoding="utf-8").read()

    def values(method, task, step, column=4):
        return [r[column] for r in rows if r[0] == method and r[1] == task and r[3] == step]

    per_task = section(markdown, "Final success rate per task")
    for method, n_seeds in (("alpha", 2), ("beta", 2), ("gamma", 1)):
        for task in ("drawer_open", "custom-task"):
            cells = table_row(per_task, method, task)
            success, returns = values(method, task, 30000), values(method, task, 30000, column=5)
            assert cells[2:] == ["30000", str(n_seeds), mean_std(success), mean_std(returns)]

    def matrix(method, step):  # [seeds, tasks]
        return np.array([values(method, task, step) for task in ("drawer_open", "custom-task")]).T

    final = section(markdown, "Aggregate over tasks and seeds at the final common step")
    # The aggregate lists the seed ids it used (gamma's one seed is "0", not a count of zero).
    assert table_row(final, "method")[:4] == ["method", "step", "tasks", "seed ids"]
    for method, seeds in (("alpha", "0, 1"), ("beta", "0, 1"), ("gamma", "0")):
        cells = table_row(final, method)
        assert cells[1:4] == ["30000", "2", seeds]
        scores = matrix(method, 30000)
        expected = (scipy.stats.trim_mean(scores, 0.25, axis=None), scores.mean(), np.median(scores.mean(axis=0)))
        for cell, point in zip(cells[4:7], expected):
            got, low, high = parse_interval(cell)
            assert got == pytest.approx(point, abs=0.005 + 1e-9)
            if method == "gamma":
                assert cell.endswith("[n/a]")
            else:
                assert low <= got <= high

    every_step = section(markdown, "IQM [95% CI] at every evaluation step")
    header = table_row(every_step, "step")
    assert header == ["step", "alpha", "beta", "gamma"]
    for step in (10000, 20000, 30000):
        cells = table_row(every_step, str(step))
        for column, method in enumerate(("alpha", "beta", "gamma"), start=1):
            point, _, _ = parse_interval(cells[column])
            expected = scipy.stats.trim_mean(matrix(method, step), 0.25, axis=None)
            assert point == pytest.approx(expected, abs=0.005 + 1e-9)
            assert cells[column].endswith(f"(n={2 if method != 'gamma' else 1})")

    references = section(markdown, f"Reference points: {report.REFERENCE_SOURCE}")
    assert table_row(references, "drawer_open")[1:] == ["0.29", "0.81", "0.70", "1.00"]
    assert "custom-task" not in references


def test_report_with_unfinished_and_missing_runs(tmp_path):
    rows = [r for r in synthetic_rows(1) if r[:4] != ["beta", "custom-task", 1, 30000]]  # seed 1 still running
    rows += [["beta", "drawer_open", 2, step, 0.5, 1.0] for step in (10000, 20000, 30000)]  # seed 2 lacks a task
    # delta: only one task; its one step was evaluated twice (a resumed run): the last row wins.
    rows += [["delta", "custom-task", 0, 10000, 0.3, 1.0], ["delta", "custom-task", 0, 10000, 0.6, 2.0]]
    results = tmp_path / "results.csv"
    write_csv(results, rows)
    paths = report.write_report(results, tmp_path, reps=200, reference=False)
    markdown = open(paths["summary"], encoding="utf-8").read()

    per_task = section(markdown, "Final success rate per task")
    # beta/custom-task: seed 1 is still at 20k, so 20k (2 seeds) wins over 30k (1 seed).
    beta_custom = [r[4] for r in rows if r[:2] == ["beta", "custom-task"] and r[3] == 20000]
    assert table_row(per_task, "beta", "custom-task")[2:5] == ["20000", "2", mean_std(beta_custom)]
    assert table_row(per_task, "beta", "drawer_open")[2:4] == ["30000", "3"]
    assert table_row(per_task, "delta", "custom-task")[2:5] == ["10000", "1", "0.60 ± n/a"]

    final = section(markdown, "Aggregate over tasks and seeds at the final common step")
    # beta: seeds complete on both tasks are {0, 1} up to 20k, only {0} at 30k; seed 2 never is.
    assert table_row(final, "beta")[1:4] == ["20000", "2", "0, 1"]
    assert table_row(final, "delta")[1:5] == ["10000", "1", "0", "0.60 [n/a]"]
    assert "the methods cover different tasks" in markdown
    assert "Reference points" not in markdown
    every_step = section(markdown, "IQM [95% CI] at every evaluation step")
    assert table_row(every_step, "30000")[2].endswith("(n=1)")  # beta
    assert table_row(every_step, "20000")[4] == "–"  # delta has no 20k


def test_report_appendix_becomes_a_section(tmp_path):
    results = tmp_path / "results.csv"
    write_csv(results, synthetic_rows(1))
    appendix = "# Pre-training diagnostics\n\n## Probe\n\n```\n# a comment, not a heading\n```\n| a | b |\n"
    paths = report.write_report(results, tmp_path, reps=100, appendix=appendix)
    markdown = open(paths["summary"], encoding="utf-8").read()
    before, after = markdown.split("## Pre-training diagnostics\n")
    assert "## Aggregate over tasks" in before  # appended after the benchmark's own sections
    assert "\n### Probe\n" in after and "\n# a comment, not a heading\n" in after and "| a | b |" in after
    plain = report.write_report(results, tmp_path / "plain", reps=100)
    assert "diagnostics" not in open(plain["summary"], encoding="utf-8").read()
    # A preface (people's notes on what the numbers show) comes right after the title.
    notes = report.write_report(results, tmp_path / "notes", reps=100, preface="# What this shows\n\nLittle.\n")
    lines = open(notes["summary"], encoding="utf-8").read().splitlines()
    assert lines[0] == "# Benchmark summary" and lines[2:5] == ["## What this shows", "", "Little."]
    assert lines.index("## What this shows") < min(i for i, line in enumerate(lines) if line.startswith("| "))


def test_per_task_plot_marks_reference_points():
    table = report.group_results(report.ResultRow(*r[:4], r[4], r[5]) for r in synthetic_rows())
    figure = report.per_task_figure(table, reference=True)
    labels = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert "APV, original APV code (TF), 8 seeds (seed mean)" in labels
    assert "DreamerV2, original APV code (TF), 8 seeds (seed mean)" in labels
    by_title = {axes.get_title(): axes for axes in figure.axes if axes.get_visible()}
    assert set(by_title) == {"drawer_open", "custom-task"}
    markers = by_title["drawer_open"].collections
    drawer = {c.get_label(): c.get_offsets().tolist() for c in markers if "original" in c.get_label()}
    assert drawer["APV, original APV code (TF), 8 seeds (seed mean)"] == [[105000, 0.70], [245000, 1.00]]
    assert drawer["DreamerV2, original APV code (TF), 8 seeds (seed mean)"] == [[105000, 0.29], [245000, 0.81]]
    assert not [c for c in by_title["custom-task"].collections if "original" in c.get_label()]
    without = report.per_task_figure(table, reference=False)
    assert not [t for legend in without.legends for t in legend.get_texts() if "original" in t.get_text()]
    # Runs far shorter than the reference steps: no markers (they would squash the curves), a note instead.
    short = report.group_results(report.ResultRow(*r[:4], r[4], r[5]) for r in synthetic_rows() if r[3] <= 10000)
    assert 105000 > report.REFERENCE_RANGE * 10000
    by_title = {axes.get_title(): axes for axes in report.per_task_figure(short).axes if axes.get_visible()}
    assert "drawer_open\n(reference points beyond these steps: see summary.md)" in by_title
    assert not [c for axes in by_title.values() for c in axes.collections if "original" in c.get_label()]


def test_per_task_mean_stops_where_a_seed_stops():
    """A seed that ended earlier (here alpha's seed 1 at 20k) must not make the mean jump to the
    remaining seed's values: the mean line ends at the shortest run, longer seeds go on dotted."""
    rows = [r for r in synthetic_rows() if not (r[0] == "alpha" and r[2] == 1 and r[3] == 30000)]
    figure = report.per_task_figure(report.group_results(report.ResultRow(*r[:4], r[4], r[5]) for r in rows))
    axes = next(a for a in figure.axes if a.get_title() == "drawer_open")
    mean = next(line for line in axes.get_lines() if line.get_label() == "alpha")
    assert list(mean.get_xdata()) == [10000, 20000]
    value = {(r[2], r[3]): r[4] for r in rows if r[0] == "alpha" and r[1] == "drawer_open"}
    np.testing.assert_allclose(mean.get_ydata(), [(value[0, s] + value[1, s]) / 2 for s in (10000, 20000)])
    dotted = [line for line in axes.get_lines() if line.get_linestyle() == ":"]
    assert [line.get_label() for line in dotted] == ["_alpha seed 0"]
    assert list(dotted[0].get_xdata()) == [20000, 30000]
    assert list(dotted[0].get_ydata()) == [value[0, 20000], value[0, 30000]]
    beta = next(line for line in axes.get_lines() if line.get_label() == "beta")
    assert list(beta.get_xdata()) == [10000, 20000, 30000]  # complete runs: unchanged
    assert "dotted: single seeds" in figure._suptitle.get_text()
    full = report.per_task_figure(report.group_results(report.ResultRow(*r[:4], r[4], r[5]) for r in synthetic_rows()))
    assert "dotted" not in full._suptitle.get_text()


def test_per_task_legend_fits_the_figure():
    """One task (a one-column figure) and long method names: the legend keeps inside the figure
    (fewer columns) and the axes keep their height (the figure grows instead)."""
    names = ["prelar", "prelar_naive", "apv", "dreamerv2", "prelar_wo_cl = prelar_sign", "a_rather_long_method_name"]
    rows = [report.ResultRow(m, "door-close", 0, step, 0.5, 1.0) for m in names for step in (1500, 3000)]
    baselines = {report.normalise_task("door-close"): report.Baseline(0.0, 8.7, "random policy (20 episodes)")}
    short = report.per_task_figure(report.group_results(rows[:4]), baselines=baselines)
    figure = report.per_task_figure(report.group_results(rows), baselines=baselines)
    for fig in (short, figure):
        fig.canvas.draw()
        (legend,) = fig.legends
        box, page = legend.get_window_extent(), fig.bbox
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, (box, page)
    assert figure.legends[0]._ncols < short.legends[0]._ncols
    axes_height = [next(a for a in f.axes if a.get_visible()).get_window_extent().height for f in (short, figure)]
    assert figure.get_size_inches()[1] > short.get_size_inches()[1]
    np.testing.assert_allclose(axes_height[1], axes_height[0], rtol=0.15)


def test_reference_values_match_the_spec_table():
    if not os.path.exists(SPEC):
        pytest.skip("the spec is not in this checkout")
    text = open(SPEC, encoding="utf-8").read()
    rows = re.findall(r"^\| ([a-z_]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.M)
    rows = {task: values for task, *values in rows if task != "mean"}
    assert len(rows) == 6
    for task, (dv2_105, dv2_245, apv_105, apv_245) in rows.items():
        points = report.reference_points(task)
        assert points["DreamerV2"] == {105000: float(dv2_105), 245000: float(dv2_245)}
        assert points["APV"] == {105000: float(apv_105), 245000: float(apv_245)}
    assert report.reference_points("drawer-open-v3") == report.reference_points("drawer_open")
    assert report.reference_points("hammer") == {}


def test_load_results_errors(tmp_path):
    with pytest.raises(UserError, match="no results file"):
        report.load_results(tmp_path / "missing.csv")
    bad_header = tmp_path / "header.csv"
    bad_header.write_text("method,task,seed,step,success_rate\nm,t,0,1,0.5\n")
    with pytest.raises(UserError, match="missing column.*return"):
        report.load_results(bad_header)
    bad_value = tmp_path / "value.csv"
    write_csv(bad_value, [["m", "t", 0, 1000, 0.5, 1.0], ["m", "t", 0, 2000, 1.5, 1.0]])
    with pytest.raises(UserError, match="line 3: success_rate"):
        report.load_results(bad_value)
    bad_seed = tmp_path / "seed.csv"
    write_csv(bad_seed, [["m", "t", "zero", 1000, 0.5, 1.0]])
    with pytest.raises(UserError, match="line 2: seed"):
        report.load_results(bad_seed)
    empty = tmp_path / "empty.csv"
    write_csv(empty, [])
    assert report.load_results(empty) == []
    with pytest.raises(UserError, match="no results yet"):
        report.write_report(empty, tmp_path / "out")


def test_same_interval_as_rliables_own_entry_point():
    # stats.aggregate_all is rliable's bootstrap with the global generator seeded: the same numbers as
    # calling rliable.library.get_interval_estimates with rliable's metrics after np.random.seed.
    from rliable import library as rliable_library

    scores = np.random.default_rng(4).random((6, 3))

    def rliable_statistics(x):
        metrics = (rliable_metrics.aggregate_iqm, rliable_metrics.aggregate_mean, rliable_metrics.aggregate_median)
        return np.array([metric(x) for metric in metrics])

    saved = np.random.get_state()
    np.random.seed(5)
    points, intervals = rliable_library.get_interval_estimates({"m": scores}, rliable_statistics, reps=300)
    np.random.set_state(saved)
    ours = stats.aggregate_all({"m": scores}, reps=300, seed=5)["m"]
    for index, metric in enumerate(stats.METRICS):
        assert ours[metric].point == pytest.approx(points["m"][index], abs=1e-12)
        assert ours[metric].low == pytest.approx(intervals["m"][0, index], abs=1e-12)
        assert ours[metric].high == pytest.approx(intervals["m"][1, index], abs=1e-12)


def test_random_policy_baseline_is_drawn_and_listed(tmp_path):
    results = tmp_path / "results.csv"
    write_csv(results, synthetic_rows())
    random_file = tmp_path / "random_policy.json"
    random_file.write_text(
        json.dumps(
            {
                "results": {
                    "drawer-open": {
                        "150": {"success_rate": 0.05, "return": 12.0, "episodes": 20},
                        "500": {"success_rate": 0.2, "return": 40.0, "episodes": 20},
                    },
                    "reach": {"150": {"success_rate": 0.0, "return": 245.0, "episodes": 20}},
                }
            }
        )
    )
    baselines = report.random_policy_baselines(random_file, 150)
    assert baselines["drawer-open"].success_rate == 0.05 and baselines["reach"].returns == 245.0

    paths = report.write_report(results, tmp_path / "report", reps=100, baselines=baselines)
    markdown = open(paths["summary"], encoding="utf-8").read()
    assert "drawer_open: random policy (20 episodes), success 0.05, return 12.0" in markdown
    assert "reach: random" not in markdown  # not a task of these results
    figure = report.per_task_figure(report.group_results(report.load_results(results)), baselines=baselines)
    dashed = {
        axes.get_title().splitlines()[0]: [
            tuple(line.get_ydata()) for line in axes.get_lines() if line.get_linestyle() == "--"
        ]
        for axes in figure.axes
    }
    assert dashed["drawer_open"] == [(0.05, 0.05)] and dashed["custom-task"] == []
    returns = report.per_task_figure(
        report.group_results(report.load_results(results)), baselines=baselines, metric="return"
    )
    axes = next(a for a in returns.axes if a.get_title().startswith("drawer_open"))
    assert [tuple(line.get_ydata()) for line in axes.get_lines() if line.get_linestyle() == "--"] == [(12.0, 12.0)]
    alpha = next(line for line in axes.get_lines() if line.get_label() == "alpha")
    expected = [
        np.mean([r[5] for r in synthetic_rows() if r[0] == "alpha" and r[1] == "drawer_open" and r[3] == step])
        for step in alpha.get_xdata()
    ]
    np.testing.assert_allclose(alpha.get_ydata(), expected)
    low, high = axes.get_ylim()  # the returns are on the plot, not clipped to a rate's [0, 1]
    assert low <= min(expected) and high >= max(expected) > 1

    with pytest.raises(report.ResultsFileError, match="--time_limits 100"):
        report.random_policy_baselines(random_file, 100)
    with pytest.raises(report.ResultsFileError, match="random_policy.py"):
        report.random_policy_baselines(tmp_path / "missing.json", 150)


def test_compare_runs_reports_labelled_workdirs(tmp_path, capsys):
    from prelar_jax.runtime.config import config_module

    compare = config_module("experiments/compare_runs.py")
    dirs = {}
    for label, seed, successes in (("dreamerv2", 0, (0.0, 0.5)), ("prelar_fm", 3, (0.25, 1.0))):
        run = tmp_path / label
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"method": "whatever", "task": "door-close", "seed": seed}))
        lines = [{"step": 10, "train/return": 1.0}]  # not an evaluation
        lines += [
            {"step": 1000 * (i + 1), "eval/success_rate": s, "eval/return": 100.0 * s} for i, s in enumerate(successes)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        dirs[label] = run
    out = tmp_path / "out"
    paths = compare.main(
        [f"--run=dreamerv2={dirs['dreamerv2']}", f"--run=prelar_fm={dirs['prelar_fm']}", f"--out={out}"]
    )
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["task"], r["seed"], r["step"], r["success_rate"]) for r in rows] == [
        ("dreamerv2", "door-close", "0", "1000", "0.0"),
        ("dreamerv2", "door-close", "0", "2000", "0.5"),
        ("prelar_fm", "door-close", "3", "1000", "0.25"),
        ("prelar_fm", "door-close", "3", "2000", "1.0"),
    ]
    assert os.path.getsize(paths["return_per_task"]) > 1000
    with pytest.raises(SystemExit) as exit_info:
        compare.main([f"--run={dirs['dreamerv2']}", f"--out={out}"])  # no label
    assert exit_info.value.code == 2 and "LABEL=DIR" in capsys.readouterr().err
