"""The benchmark grid: its plan (every pre-training, diagnostics and fine-tuning run, from the
benchmark config and its methods table), running it through the runner with each finished run
archived at once, and the report built from the archive and the workdir.

``experiments/benchmark.py`` is the command line; ``configs/benchmark.py`` holds the presets and
the methods table (README "Benchmark and sweeps").
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import NamedTuple

import numpy as np

from prelar_jax.analysis import diagnostics_report, report as report_lib
from prelar_jax.data.generate import DEFAULT_TASKS, generate_videos
from prelar_jax.launch import archive as archive_lib
from prelar_jax.launch.runner import (
    FINISHED,
    SKIPPED,
    RunSpec,
    collect_results,
    is_finished,
    read_summary,
    run_all,
    write_results_csv,
)
from prelar_jax.launch.sweep import flag_value
from prelar_jax.runtime import config as config_lib
from prelar_jax.runtime.config import REPO_ROOT, ConfigError
from prelar_jax.runtime.logger import atomic_write_json


def _from_repo(path: str) -> str:
    """``path``, with a relative one taken from the repository root (config paths name files there)."""
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


class Plan(NamedTuple):
    """Every run of a benchmark, in the order they run; ``plan`` makes it without side effects."""

    videos: str  # directory of the action-free pre-training videos
    pretrain: list  # RunSpec per distinct pre-training configuration
    finetune: list  # RunSpec per (method, task, seed)
    pretrained: dict  # method -> pre-training workdir it fine-tunes from
    diagnostics: list  # zero or one RunSpec of experiments/diagnostics.py


def plan(config, workdir: str, methods_table, original_presets) -> Plan:
    """The runs of the benchmark ``config`` under ``workdir``; no side effects."""
    methods = [m.strip() for m in config.methods.split(",") if m.strip()]
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    unknown = [m for m in methods if m not in methods_table]
    if unknown:
        raise ConfigError(f"config.methods: unknown method(s) {unknown}; known: {sorted(methods_table)}")
    if not tasks or config.seeds < 1:
        raise ConfigError("config.tasks must name at least one task and config.seeds be >= 1")
    python = sys.executable
    video_root = config.videos.root or os.path.join(workdir, "videos")

    def flags_in_order(settings):
        return [f"--config.{key}={flag_value(value)}" for key, value in settings.items()]

    def flags_of(overrides):
        return flags_in_order(dict(sorted(overrides.items())))

    pretrain_specs, pretrain_of_method = {}, {}
    for method in methods:
        pre, _ = methods_table[method]
        if pre is None:
            continue
        path, overrides = pre
        path = _from_repo(path)
        preset = original_presets.get(method, {}).get(config.preset, config.preset)
        reuse = config.pretrain.get("apv" if os.path.basename(path).startswith("apv") else "prelar", "")
        if reuse and not overrides and preset == config.preset:
            pretrain_of_method[method] = os.path.abspath(reuse)
            continue
        name = os.path.basename(path)[:-3].replace("_pretrain", "") + (f"_{preset}" if preset != config.preset else "")
        name += "".join(f"_{k.split('.')[-1]}={flag_value(v)}" for k, v in sorted(overrides.items()))
        run_dir = os.path.join(workdir, "pretrain", name)
        settings = {"data.root": video_root, "steps": config.pretrain.steps, "log.wandb_mode": config.wandb_mode}
        _check_settings(
            method, "pre-training", f"{path}:{preset}", {**settings, **overrides}, config_lib.validate_pretrain_config
        )
        pretrain_of_method[method] = run_dir
        pretrain_specs[name] = RunSpec(
            name=f"pretrain/{name}",
            workdir=run_dir,
            labels={"stage": "pretrain", "name": name},
            command=[
                python,
                os.path.join(REPO_ROOT, "experiments", "pretrain.py"),
                f"--config={path}:{preset}",
                *flags_in_order(settings),
                *flags_of(overrides),
                f"--workdir={run_dir}",
            ],
        )
    # Seed-major order (every method and task gets seed 0 before any gets seed 1): a grid that is
    # stopped part-way, as a long one on a small machine always is, leaves a balanced comparison.
    finetune_specs = []
    for seed in range(config.seeds):
        for task in tasks:
            for method in methods:
                _, (path, overrides) = methods_table[method]
                path = _from_repo(path)
                preset = original_presets.get(method, {}).get(config.preset, config.preset)
                run_dir = os.path.join(workdir, "runs", method, task, f"seed_{seed}")
                settings = {
                    "task": task,
                    "seed": seed,
                    "steps": config.finetune.steps,
                    "eval_every": config.finetune.eval_every,
                    "eval_eps": config.finetune.eval_eps,
                    **({"env.time_limit": config.finetune.time_limit} if config.finetune.time_limit else {}),
                    "log.wandb_mode": config.wandb_mode,
                }
                if seed == 0:  # every method's settings on every task, checked before anything runs
                    _check_settings(
                        method,
                        "fine-tuning",
                        f"{path}:{preset}",
                        {**settings, **overrides},
                        config_lib.validate_finetune_config,
                    )
                command = [
                    python,
                    os.path.join(REPO_ROOT, "experiments", "finetune.py"),
                    f"--config={path}:{preset}",
                    *flags_in_order(settings),
                    *flags_of(overrides),
                ]
                if method in pretrain_of_method:
                    command.append(f"--config.pretrained={pretrain_of_method[method]}")
                command.append(f"--workdir={run_dir}")
                finetune_specs.append(
                    RunSpec(
                        name=f"{method}/{task}/seed_{seed}",
                        workdir=run_dir,
                        command=command,
                        labels={"method": method, "task": task, "seed": seed},
                    )
                )
    return Plan(
        video_root,
        list(pretrain_specs.values()),
        finetune_specs,
        pretrain_of_method,
        diagnostics_specs(config, workdir, tasks, pretrain_of_method, _plain_prelar_pretraining(config, workdir)),
    )


def _check_settings(method: str, stage: str, spec: str, settings: dict, validate) -> None:
    """A ``ConfigError`` naming the method now, rather than one per run once the grid runs."""
    try:
        validate(config_lib.load_config(spec, settings))
    except ConfigError as error:
        raise ConfigError(f"method {method!r}, {stage} ({spec}): {error}") from error


def _plain_prelar_pretraining(config, workdir: str) -> str:
    """Where the pre-training of ``prelar`` (its config file, no overrides) is, whichever methods
    use it (``prelar``, ``prelar_naive``)."""
    reuse = config.pretrain.get("prelar", "")
    return os.path.abspath(reuse) if reuse else os.path.join(workdir, "pretrain", "prelar")


def diagnostics_specs(config, workdir: str, tasks, pretrain_of_method, plain_prelar: str = "") -> list:
    """The diagnostics runs, one per distinct pre-training: ``diagnostics`` for PreLAR's plain one
    (``plain_prelar``: the implicit-action probe, and the world-model transfer beside no
    pre-training) and ``diagnostics_<method>`` for each other one (the probe where it has implicit
    actions; the transfer). The report merges their tables."""
    d = config.diagnostics
    if not d.enabled or not pretrain_of_method:
        return []
    task = d.task or tasks[0]
    settings = [
        f"--updates={d.updates}",
        f"--train_episodes={d.train_episodes}",
        f"--eval_episodes={d.eval_episodes}",
        f"--probe_episodes={d.probe_episodes}",
        f"--probe_steps={d.probe_steps}",
    ]
    script = os.path.join(REPO_ROOT, "experiments", "diagnostics.py")
    specs, seen = [], set()
    # PreLAR's plain pre-training first (its run holds the no-pre-training transfer), under one name
    # whichever method brought it (prelar, prelar_naive); then the others in config order.
    for method in sorted(pretrain_of_method, key=lambda m: pretrain_of_method[m] != plain_prelar):
        pretrained = pretrain_of_method[method]
        if pretrained in seen:
            continue  # shares a pre-training already diagnosed (e.g. prelar_naive)
        seen.add(pretrained)
        plain = pretrained == plain_prelar
        name = "diagnostics" if plain else f"diagnostics_{method}"
        out = os.path.join(workdir, name)
        command = [sys.executable, script, f"--pretrained={pretrained}", f"--task={task}", f"--out={out}", *settings]
        labels = {"stage": "diagnostics", "task": task}
        if not plain:
            command += [f"--label={method}"] + (["--no_scratch"] if specs else [])
            labels["of"] = method
        specs.append(RunSpec(name=name, workdir=out, command=command, labels=labels))
    return specs


WEIGHTS_FILE = "weights.json"  # beside a finished pre-training (and its archived copy): its weights' sha256


def pretraining_weights(pretrain_dir: str, copies=()) -> str | None:
    """The sha256 of a finished pre-training's final weights (``runtime.pretrained.weights_sha256``):
    read from ``weights.json`` in ``pretrain_dir`` or one of its archived ``copies`` (where it was
    written at the step that place's ``summary.json`` names), else computed from its checkpoint
    and written there. None when it has not finished, or its checkpoint is gone and nothing
    recorded the sum (a later machine without the checkpoint then cannot compare it)."""

    def recorded(place):  # the record in a place, if it is one
        try:
            with open(os.path.join(place, WEIGHTS_FILE), encoding="utf-8") as handle:
                candidate = json.load(handle)
            str(candidate["sha256"])
            return candidate
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # Each place read once: its record, and the step its summary names.
    found = {place: (recorded(place), (read_summary(place) or {}).get("step")) for place in [pretrain_dir, *copies]}
    record = next(  # the first one written at its place's step, not at an earlier end of the run
        (current for current, step in found.values() if current is not None and current.get("step") == step), None
    )
    if record is None:
        if not is_finished(pretrain_dir):
            return None
        from absl import logging as absl_logging

        from prelar_jax.runtime import pretrained as pretrained_lib  # local: imports jax and the models

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every restore step at INFO
        try:
            sha, step = pretrained_lib.pretrain_weights_sha256(pretrain_dir)
        except pretrained_lib.PretrainedNotFoundError:
            return None
        finally:
            absl_logging.set_verbosity(verbosity)
        record = {"sha256": sha, "step": step}
    for place, (current, step) in found.items():  # written where missing or stale, a current one left alone
        if os.path.isdir(place) and step == record.get("step") and current != record:
            try:
                atomic_write_json(os.path.join(place, WEIGHTS_FILE), record)
            except OSError:
                pass  # a read-only reused pre-training: the sum is recomputed next time
    return str(record["sha256"])


def identical_methods(config, runs: Plan, workdir: str, archive: str = "") -> dict[str, tuple[str, str]]:
    """The methods whose fine-tuning runs would repeat another method's, run for run: the same
    fine-tuning settings (``archive.settings``: the command less its per-run flags) and bit-identical
    pre-trained weights (or no pre-training for either). Returns ``{method: (the first such method in
    config order, the weights' sha256 or '')}``; empty with ``config.skip_identical`` False.

    PreLAR with the released ``sign`` consistency loss is the case in point: that loss has zero
    gradient, so it pre-trains bit-identically to PreLAR without the loss. Only finished
    pre-trainings compare; the weights are compared, not the configs, so a loss that does change
    training is never skipped."""
    if not config.get("skip_identical", True):
        return {}
    first_of: dict[tuple, str] = {}
    same: dict[str, tuple[str, str]] = {}
    for spec in runs.finetune:
        method = spec.labels.get("method")
        if method in same or method in first_of.values():
            continue
        sha = ""
        if method in runs.pretrained:
            pretrain_dir = runs.pretrained[method]
            relative = os.path.relpath(pretrain_dir, workdir)
            copies = [os.path.join(archive, relative)] if archive and not relative.startswith("..") else []
            sha = pretraining_weights(pretrain_dir, copies)
            if sha is None:
                continue  # not comparable (yet): it runs
        key = (tuple(archive_lib.settings(spec.command)), sha)
        if key in first_of:
            same[method] = (first_of[key], sha)
        else:
            first_of[key] = method
    return same


def identical_section(same: dict[str, tuple[str, str]]) -> str:
    """Markdown: the methods not fine-tuned because their runs would repeat another's."""
    if not same:
        return ""
    lines = ["# Methods whose runs would repeat another's", ""]
    lines += [f"- {not_run_because(method, original, sha)}" for method, (original, sha) in same.items()]
    return "\n".join(lines) + "\n\n"


def not_run_because(method: str, original: str, sha: str) -> str:
    weights = (
        f"its pre-trained weights are bit-identical to {original}'s (sha256 {sha[:16]}, {WEIGHTS_FILE} in "
        "both pre-training directories)"
        if sha
        else f"neither it nor {original} is pre-trained"
    )
    return (
        f"{method} is not fine-tuned: {weights} and its fine-tuning settings are the same, so its runs "
        f"would repeat {original}'s seed for seed. The report shows them once, as '{original} = {method}'; "
        "--config.skip_identical=False runs it anyway."
    )


def _labelled_as_one(specs, same: dict[str, tuple[str, str]]) -> list:
    """``specs`` with each method that others repeat relabelled ``<method> = <repeat> ...``."""
    names: dict[str, list[str]] = {}
    for method, (original, _) in same.items():
        names.setdefault(original, [original]).append(method)
    return [
        dataclasses.replace(s, labels={**s.labels, "method": " = ".join(names[s.labels["method"]])})
        if s.labels.get("method") in names
        else s
        for s in specs
    ]


def random_policy_baselines(config):
    """The random policy's results to draw beside the curves (``config.random_policy``), read
    before anything runs so that a wrong path fails at once; None when not configured."""
    if not config.random_policy:
        return None
    path = config.random_policy
    path = _from_repo(path)
    return report_lib.random_policy_baselines(path, config.random_policy_steps)


NOTES_FILE = "notes.md"  # in the results directory: what the numbers show, written by people


def report(workdir: str, finetune_specs, archive: str = "", baselines=None, same=None) -> dict:
    """The report of every finished evaluation: with an archive, of the archived runs (all
    machines' work so far) and written into the archive; else of the runs under ``workdir``.
    ``same`` (``identical_methods``) names the methods reported as the one whose runs they repeat."""
    out = archive or workdir
    same = same or {}
    planned = [s for s in finetune_specs if s.labels.get("method") not in same]
    finetune_specs = _labelled_as_one(finetune_specs, same)
    if archive:
        counts = archive_lib.check_archive(archive)
        specs = archive_lib.archived_specs(finetune_specs, workdir, archive)
        rows = collect_results(specs, finished_only=True)
    else:
        rows = collect_results(finetune_specs)
    csv_path = os.path.join(out, "results.csv")
    write_results_csv(rows, csv_path)
    if not rows:
        print(f"[benchmark] no evaluations finished yet; {csv_path} has only its header", flush=True)
        return {"results": csv_path}
    appendix, diagnostics = diagnostics_section(out)
    appendix = identical_section(same) + appendix
    if archive:
        remaining = [s for s in planned if not archive_lib.is_archived(s, workdir, archive)]
        appendix = cost_section(archive, counts, remaining) + appendix
    notes = os.path.join(out, NOTES_FILE)
    preface = open(notes, encoding="utf-8").read() if os.path.exists(notes) else ""
    paths = report_lib.write_report(csv_path, out, appendix=appendix, baselines=baselines, preface=preface)
    if diagnostics:
        paths["diagnostics"] = diagnostics
    return {"results": csv_path, **paths}


def diagnostics_section(out: str) -> tuple[str, list[str]]:
    """Markdown: the finished diagnostics runs under ``out`` (``diagnostics`` first, then
    ``diagnostics_<method>``) merged into one probe table and one transfer table, and their
    ``diagnostics.json`` paths. A further run's random-init probe row is kept only where its values
    differ (another implicit-action config), named after its pre-training."""
    names = ["diagnostics"] + sorted(
        d for d in (os.listdir(out) if os.path.isdir(out) else []) if d.startswith("diagnostics_")
    )
    merged: dict | None = None
    paths = []
    for name in names:
        path = os.path.join(out, name, "diagnostics.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        paths.append(path)
        if merged is None:
            merged = {**data, "probe": dict(data.get("probe") or {}), "transfer": dict(data.get("transfer") or {})}
            continue
        label = (data.get("args") or {}).get("label") or name
        for row, res in (data.get("probe") or {}).items():
            if row == "random init":
                if any(res.get("r2") == other.get("r2") for other in merged["probe"].values()):
                    continue
                row = f"random init ({label})"
            merged["probe"][row] = res
        merged["transfer"].update(data.get("transfer") or {})
    if merged is None:
        return "", []
    return diagnostics_report.format_markdown(merged), paths


def cost_section(archive: str, counts, remaining=()) -> str:
    """Markdown: archived runs and their recorded wall time per method / pre-training, and the
    planned fine-tuning runs not archived yet (``remaining``, specs) with an estimate of their
    cost from the median archived run of their method (of all fine-tuning runs for a method
    without one)."""
    seconds = archive_lib.run_seconds(archive)
    lines = [
        "# Runs and their cost",
        "",
        "Archived runs (the results directory), with the wall time of the attempt that finished "
        "each (a resumed run counts its last attempt only). Runs made side by side "
        "(`max_parallel` > 1) overlap, so the time the grid took is less than these sums:",
        "",
        "| runs of | count | wall time (h) |",
        "|---|---|---|",
    ]
    for group, count in counts.items():
        lines.append(f"| {group} | {count} | {sum(seconds.get(group, [])) / 3600:.2f} |")
    done = sum(sum(values) for values in seconds.values())
    lines.append(f"| total | {sum(counts.values())} | {done / 3600:.2f} |")
    if remaining:
        finetune = [t for group, values in seconds.items() if archive_lib.is_finetune_group(group) for t in values]
        finetune = [t for t in finetune if t > 0] or [0.0]
        per_method: dict[str, int] = {}
        for spec in remaining:
            per_method[spec.labels["method"]] = per_method.get(spec.labels["method"], 0) + 1
        estimate = 0.0
        lines += [
            "",
            "Planned fine-tuning runs not archived yet, at the median wall time of their method's archived runs:",
            "",
        ]
        lines += ["| still to run | count | estimated wall time (h) |", "|---|---|---|"]
        for method, count in per_method.items():
            known = [t for t in seconds.get(method, []) if t > 0]
            hours = count * float(np.median(known or finetune)) / 3600
            estimate += hours
            lines.append(f"| {method} | {count} | {hours:.2f}{'' if known else ' (median of all methods)'} |")
        lines.append(f"| total | {len(remaining)} | {estimate:.2f} |")
        lines += ["", f"The whole grid: {done / 3600 + estimate:.2f} h, {done / 3600:.2f} h of it done."]
    return "\n".join(lines) + "\n\n"


def archive_dir(config) -> str:
    results = config.get("results", "")
    if not results:
        return ""
    return os.path.abspath(_from_repo(results))


def video_tasks(config, default_tasks) -> list:
    """The tasks whose scripted videos pre-training sees: the default video tasks less the
    benchmarked ones (fine-tuning must not see its own task's videos), up to ``videos.tasks_limit``."""
    benchmarked = {t.strip().lower() for t in config.tasks.split(",")}
    return [t for t in default_tasks if t not in benchmarked][: config.videos.tasks_limit or None]


def without_archived(runs: Plan, workdir: str, archive: str) -> Plan:
    """The plan less what the archive already holds: archived fine-tuning runs and diagnostics,
    and the pre-trainings no remaining run needs."""
    finetune = [s for s in runs.finetune if not archive_lib.is_archived(s, workdir, archive)]
    diagnostics = [s for s in runs.diagnostics if not archive_lib.is_archived(s, workdir, archive)]
    needed = {
        arg.split("=", 1)[1]
        for s in finetune + diagnostics
        for arg in s.command
        if arg.startswith(("--config.pretrained=", "--pretrained=", "--apv_pretrained="))
    }
    pretrain = [s for s in runs.pretrain if s.workdir in needed]
    return runs._replace(pretrain=pretrain, finetune=finetune, diagnostics=diagnostics)


def run_grid(config, workdir: str, runs, archive: str = "", full: Plan | None = None) -> dict[str, tuple[str, str]]:
    """Runs ``runs`` (``full``: the whole plan, archived runs included, when ``runs`` is less),
    except the fine-tuning and diagnostics of ``identical_methods``, which would repeat another's.
    Returns those methods (``identical_methods``' answer once pre-training has ended)."""

    def archived(spec, result=None):  # copy a finished run's small results into the archive now
        if archive and archive_lib.export(spec, workdir, archive, REPO_ROOT, result.seconds if result else None):
            print(f"[benchmark] archived {spec.name} -> {archive_lib.archived_dir(spec, workdir, archive)}", flush=True)

    if archive:
        for spec in runs.pretrain + runs.diagnostics + runs.finetune:  # finished here before, not archived yet
            archived(spec)

    video_root, pretrain_specs, finetune_specs = runs.videos, runs.pretrain, runs.finetune
    if pretrain_specs and not config.videos.root and not os.path.isdir(video_root):
        tasks = video_tasks(config, DEFAULT_TASKS)
        print(
            f"[benchmark] rendering {config.videos.episodes} scripted-expert episodes for each of "
            f"{len(tasks)} tasks into {video_root}",
            flush=True,
        )
        generate_videos(
            video_root + ".partial",
            tasks=tasks,
            episodes_per_task=config.videos.episodes,
            max_steps=config.videos.max_steps,
            workers=config.videos.workers,
            verbose=False,
        )
        os.replace(video_root + ".partial", video_root)
    results = run_all(pretrain_specs, config.max_parallel, os.path.join(workdir, "logs", "pretrain"), on_end=archived)
    failed = {r.workdir for r in results if r.status not in (FINISHED, SKIPPED)}

    def without_failed(specs):  # the runs none of whose arguments names a failed pre-training
        return [s for s in specs if not any(arg.split("=", 1)[-1] in failed for arg in s.command)]

    same = identical_methods(config, full or runs, workdir, archive)
    for method, (original, sha) in same.items():
        print(f"[benchmark] {not_run_because(method, original, sha)}", flush=True)
    run_all(
        [s for s in without_failed(runs.diagnostics) if s.labels.get("of") not in same],
        1,
        os.path.join(workdir, "logs", "diagnostics"),
        on_end=archived,
    )
    runnable = [s for s in without_failed(finetune_specs) if s.labels.get("method") not in same]
    failed_runs = len(finetune_specs) - len(without_failed(finetune_specs))
    if failed_runs:
        print(
            f"[benchmark] {failed_runs} fine-tuning runs skipped: their "
            f"pre-training failed (see {workdir}/logs/pretrain/runs.json)",
            flush=True,
        )
    run_all(runnable, config.max_parallel, os.path.join(workdir, "logs", "finetune"), on_end=archived)
    return same
