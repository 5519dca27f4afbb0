"""Aggregate scores over tasks and seeds: IQM, mean, median, stratified bootstrap confidence intervals.

These are the statistics of Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice" (NeurIPS 2021). A handful of seeds per task is too few for a per-task mean to
mean much, so a method is summarised by one number over all (run, task) scores, with a confidence
interval that says how much that number would move if the runs were repeated with new seeds:

- **IQM** (interquartile mean): the mean of the middle 50% of all run x task scores (25% trimmed
  from each side, ``scipy.stats.trim_mean(x, 0.25)``). Robust to a few outlier runs, yet uses half
  the data, unlike the median.
- **mean**: the mean over tasks of the per-task mean over runs; **median**: the median over tasks of
  the per-task mean over runs (rliable's definitions).
- **95% CI**: percentile intervals of the *stratified* bootstrap: each resample draws, for every task
  separately, as many runs as there are (with replacement) from that task's runs. Tasks are the
  strata, so the interval reflects seed-to-seed variation and not which tasks were picked.

The bootstrap (stratified resampling and percentile intervals) is Google's ``rliable``
(``rliable.library.StratifiedBootstrap``, as ``get_interval_estimates`` uses it), the reference
implementation of the paper. It installs here with one extra pin: rliable 1.2.0 requires
``arch < 8``, and arch 7.2 fails to import with pandas 3 (``deprecate_kwarg`` changed signature),
hence ``pandas==2.3.3`` in requirements.txt. The three statistics themselves are computed here with
plain numpy rather than with ``rliable.metrics``: they give the same numbers (the tests check it),
but ``scipy.stats.trim_mean`` costs about 0.2 ms per call, which, called once per resample, made a
report of every evaluation step take minutes; with numpy the bootstrap of one [runs, tasks] matrix
takes about 0.1 s at 2000 resamples.

rliable draws its bootstrap indices from numpy's *global* legacy generator (``np.random.choice``)
and ignores its ``random_state`` argument. To make results deterministic given ``seed`` without
disturbing anyone else's use of ``np.random``, :func:`aggregate_all` seeds the global generator per
method and restores its previous state afterwards. Not safe to call from several threads at once.

With a single run (one seed) there is nothing to resample: the bootstrap would return a zero-width
interval that looks like certainty, so the interval is reported as NaN ("n/a") instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from rliable import library as rliable_library

from prelar_jax.errors import UserError

METRICS: tuple[str, ...] = ("iqm", "mean", "median")


class BadScoresError(UserError, ValueError):
    """Scores that cannot be aggregated (wrong shape, empty, or not finite)."""


class Interval(NamedTuple):
    """A point estimate and its confidence interval; ``low``/``high`` are NaN when there is no CI."""

    point: float
    low: float
    high: float


def _as_scores(scores: np.ndarray, name: str, ndim: int | None) -> np.ndarray:
    """``scores`` as a float64 array, after checking it is non-empty, finite and of rank ``ndim``."""
    array = np.asarray(scores, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise BadScoresError(f"{name}: expected a [runs, tasks] array, got shape {array.shape}.")
    if array.size == 0:
        raise BadScoresError(f"{name}: no scores to aggregate (shape {array.shape}).")
    if not np.all(np.isfinite(array)):
        raise BadScoresError(f"{name}: scores must be finite, got {int(np.sum(~np.isfinite(array)))} NaN/inf values.")
    return array


def _trimmed_mean(scores: np.ndarray) -> float:
    """Mean of all entries after dropping ``int(n / 4)`` from each end (``scipy.stats.trim_mean(x, 0.25)``)."""
    ordered = np.sort(scores, axis=None)  # [n]
    cut = int(0.25 * ordered.size)
    return float(np.mean(ordered[cut : ordered.size - cut]))


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean over all entries of ``scores`` (any shape), as ``rliable.metrics.aggregate_iqm``."""
    return _trimmed_mean(_as_scores(scores, "iqm", None))


def _all_metrics(scores: np.ndarray) -> np.ndarray:
    """[3] IQM, mean and median of a [runs, tasks] score matrix, in the order of ``METRICS``.

    Mean and median are over tasks of the per-task mean over runs (``rliable.metrics.aggregate_mean``
    and ``aggregate_median``).
    """
    task_means = np.mean(scores, axis=0)  # [tasks]
    return np.array([_trimmed_mean(scores), np.mean(task_means), np.median(task_means)])


def aggregate_all(
    scores_by_method: Mapping[str, np.ndarray],
    reps: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Interval]]:
    """IQM, mean and median with stratified bootstrap CIs, per method.

    ``scores_by_method[method]`` is a [runs, tasks] array (every task needs the same runs; the report
    picks the seeds complete across tasks). Each method is bootstrapped from the same ``seed``, so its
    interval does not depend on which other methods are passed. Returns
    ``{method: {"iqm" | "mean" | "median": Interval}}``.
    """
    if not isinstance(reps, (int, np.integer)) or reps < 1:
        raise BadScoresError(f"reps must be a positive integer, got {reps!r}.")
    if not 0.0 < confidence < 1.0:
        raise BadScoresError(f"confidence must lie strictly between 0 and 1, got {confidence!r}.")
    results: dict[str, dict[str, Interval]] = {}
    for method, raw_scores in scores_by_method.items():
        scores = _as_scores(raw_scores, f"scores of {method!r}", ndim=2)  # [runs, tasks]
        points = _all_metrics(scores)  # [3]
        if scores.shape[0] < 2:
            lows = highs = np.full(len(METRICS), np.nan)
        else:
            saved_state = np.random.get_state()
            try:
                np.random.seed(seed)
                # What rliable.library.get_interval_estimates does, without its INFO log line per call.
                bootstrap = rliable_library.StratifiedBootstrap(scores)
                lows, highs = bootstrap.conf_int(_all_metrics, reps=int(reps), size=confidence, method="percentile")
            finally:
                np.random.set_state(saved_state)  # lows, highs: [3] each
        results[method] = {
            name: Interval(float(points[i]), float(lows[i]), float(highs[i])) for i, name in enumerate(METRICS)
        }
    return results


def aggregate(
    scores_by_method: Mapping[str, np.ndarray],
    reps: int = 2000,
    seed: int = 0,
    metric: str = "iqm",
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """One metric (default IQM) with its stratified bootstrap CI per method: ``{method: (point, low, high)}``."""
    if metric not in METRICS:
        raise BadScoresError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
    everything = aggregate_all(scores_by_method, reps=reps, seed=seed, confidence=confidence)
    return {method: estimates[metric] for method, estimates in everything.items()}
