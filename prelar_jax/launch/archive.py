"""A benchmark's committed results: the small files of each finished run, kept where git keeps them.

A benchmark grid is longer than one sitting on a small machine, and the machine (with its
workdirs, checkpoints and replays) may be gone before the next one. So each finished run's small
results are copied into a results directory meant to be committed (e.g.
``experiments/results/benchmark_cpu``), under the run's own relative path (``runs/<method>/<task>/
seed_<n>``, ``pretrain/<name>``, ``diagnostics``):

* ``metrics.jsonl``, ``config.json``, ``summary.json``, ``attempts.jsonl`` (and
  ``diagnostics.md``/``diagnostics.json`` for the diagnostics, ``weights.json`` for a
  pre-training), never checkpoints, replay or media;
* ``provenance.json``: the run's command line, the code version (git commit, and whether the
  tree had uncommitted changes) that the attempt which finished the run loaded when it started
  (``code_version_from: "run start"``; for runs without ``attempts.jsonl``, the checkout at export:
  ``"export"``), the host, the wall time of the attempt that finished it, the
  settings fingerprint (``settings``, below) and when it was archived.

A run found in the archive is done: the benchmark does not run it again on another machine, and
the report is built from the archive. Runs of one method must share their settings: the command
line without the per-run flags (seed, task, workdir, pre-trained workdir, data root and the
interpreter path). ``check_settings`` refuses a planned run whose settings differ from the
archived runs of its method, and ``check_archive`` refuses an archive that mixes them, each with
one error naming the runs and the differing flags.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
from typing import Any, Mapping, Sequence

from prelar_jax.runtime import run_utils
from prelar_jax.errors import UserError
from prelar_jax.launch import runner

PROVENANCE = "provenance.json"
SMALL_FILES = (
    "metrics.jsonl",
    "config.json",
    "summary.json",
    "diagnostics.md",
    "diagnostics.json",
    "weights.json",  # a pre-training's weights sha256 (launch.benchmark.WEIGHTS_FILE)
    run_utils.ATTEMPTS,
)
# Flags that differ between the runs of one method by design; everything else must match.
PER_RUN_FLAGS = (
    "--config.seed",
    "--config.task",
    "--workdir",
    "--config.pretrained",
    "--config.data.root",
    "--pretrained",
    "--apv_pretrained",
    "--out",
    "--task",
)


class ArchiveError(UserError, ValueError):
    """An archive that cannot be used as it is (mixed settings, a damaged file)."""


def settings(command: Sequence[str]) -> list[str]:
    """The flags of a run's command that must be equal across the runs of one method: the
    command without the interpreter and script paths and without ``PER_RUN_FLAGS``."""
    kept = []
    for arg in command[1:]:
        if arg.endswith(".py") and not arg.startswith("--"):
            kept.append(os.path.basename(arg))  # the script, not where the checkout lives
            continue
        name = arg.split("=", 1)[0]
        if name in PER_RUN_FLAGS:
            continue
        if name == "--config" and "=" in arg:  # the config file, not where the checkout lives
            path, _, preset = arg.split("=", 1)[1].partition(":")
            arg = f"--config={os.path.basename(path)}:{preset}"
        kept.append(arg)
    return kept


def _code_version(run_workdir: str, root: str) -> dict[str, Any]:
    """The code the run's finishing attempt ran (its ``attempts.jsonl``, written when it started),
    else, for runs made before that record existed, the checkout at ``root`` now; ``code_version_from``
    says which."""
    attempt = run_utils.last_attempt(run_workdir)
    if attempt is not None and "commit" in attempt:
        return {"commit": attempt["commit"], "dirty": attempt.get("dirty"), "code_version_from": "run start"}
    return {**run_utils.code_version(root), "code_version_from": "export"}


def _relative(spec: runner.RunSpec, workdir: str) -> str:
    relative = os.path.relpath(spec.workdir, workdir)
    if relative.startswith(".."):
        raise ArchiveError(
            f"run {spec.name}: its workdir {spec.workdir} is outside the benchmark directory "
            f"{workdir}, so it has no place in the archive"
        )
    return relative


def archived_dir(spec: runner.RunSpec, workdir: str, archive: str) -> str:
    return os.path.join(archive, _relative(spec, workdir))


def read_provenance(path: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(path, PROVENANCE), encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ArchiveError(
            f"{os.path.join(path, PROVENANCE)} is unreadable ({error}); restore it from git "
            "(git checkout -- <file>) or delete that run's directory to run it again"
        ) from error
    return data if isinstance(data, dict) else None


def is_archived(spec: runner.RunSpec, workdir: str, archive: str) -> bool:
    """The run's results are in the archive and say it finished."""
    path = archived_dir(spec, workdir, archive)
    return read_provenance(path) is not None and runner.is_finished(path)


def export(spec: runner.RunSpec, workdir: str, archive: str, root: str, seconds: float | None = None) -> bool:
    """Copies a finished run's small files into the archive (atomically: a run appears there
    whole or not at all). Returns False (and copies nothing) when the run has not finished or is
    archived already."""
    if not runner.is_finished(spec.workdir) or is_archived(spec, workdir, archive):
        return False
    target = archived_dir(spec, workdir, archive)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for name in SMALL_FILES:
        source = os.path.join(spec.workdir, name)
        if os.path.isfile(source):
            shutil.copy2(source, os.path.join(partial, name))
    provenance = {
        "name": spec.name,
        "labels": dict(spec.labels),
        "command": list(spec.command),
        "settings": settings(spec.command),
        **_code_version(spec.workdir, root),
        "host": socket.gethostname(),
        "wall_seconds": seconds,
        "archived_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(partial, PROVENANCE), "w", encoding="utf-8") as handle:
        json.dump(provenance, handle, indent=1)
    shutil.rmtree(target, ignore_errors=True)  # an unfinished leftover (no provenance) of an older export
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(partial, target)
    return True


def archived_specs(specs: Sequence[runner.RunSpec], workdir: str, archive: str) -> list[runner.RunSpec]:
    """The specs whose archived copies exist, pointed at those copies (for ``collect_results``)."""
    return [
        runner.RunSpec(name=s.name, command=s.command, workdir=archived_dir(s, workdir, archive), labels=s.labels)
        for s in specs
        if is_archived(s, workdir, archive)
    ]


def _group_of(labels: Mapping[str, Any], name: str) -> str:
    """Runs that must share their settings: a method's fine-tuning runs, one pre-training (by
    name), the diagnostics."""
    if labels.get("stage") == "pretrain":
        return f"pretrain/{labels.get('name', name)}"
    if labels.get("stage") == "diagnostics" and labels.get("of"):
        return f"diagnostics/{labels['of']}"  # one diagnostics run per pre-training
    return str(labels.get("method") or labels.get("stage") or name)


def _group(spec: runner.RunSpec) -> str:
    return _group_of(spec.labels, spec.name)


def is_finetune_group(group: str) -> bool:
    """Whether a group ``_group_of`` named holds fine-tuning runs (a method's), not a
    pre-training's or the diagnostics'."""
    return not (group.startswith("pretrain/") or group == "diagnostics" or group.startswith("diagnostics/"))


def _difference(a: Sequence[str], b: Sequence[str]) -> str:
    only_a = [x for x in a if x not in b]
    only_b = [x for x in b if x not in a]
    return f"{only_a or '[]'} vs {only_b or '[]'}"


def check_settings(specs: Sequence[runner.RunSpec], workdir: str, archive: str) -> None:
    """Refuses planned runs whose settings differ from the archived runs of their method (or
    pre-training name): the report would otherwise mix two configurations under one name."""
    reference: dict[str, tuple[str, list[str]]] = {}
    for spec in specs:
        provenance = read_provenance(archived_dir(spec, workdir, archive))
        if provenance is not None:
            reference.setdefault(_group(spec), (spec.name, provenance.get("settings", [])))
    for spec in specs:
        group = _group(spec)
        if group in reference and settings(spec.command) != reference[group][1]:
            name, archived = reference[group]
            raise ArchiveError(
                f"{spec.name} would run with other settings than the archived {name} in {archive}: "
                f"{_difference(settings(spec.command), archived)}. Results of one method must share "
                "their settings: use a new results directory (config.results) for the new settings, "
                "or run with the archived ones."
            )


def check_archive(archive: str) -> dict[str, int]:
    """Every run in the archive, grouped by method (or stage): refuses a group whose runs were
    made with different settings. Returns the number of runs per group."""
    groups: dict[str, list[tuple[str, list[str]]]] = {}
    for directory, _, files in os.walk(archive):
        if PROVENANCE in files and not directory.endswith(".partial"):
            provenance = read_provenance(directory) or {}
            group = _group_of(provenance.get("labels", {}), provenance.get("name", directory))
            groups.setdefault(group, []).append((os.path.relpath(directory, archive), provenance.get("settings", [])))
    for group, runs in groups.items():
        first_name, first = runs[0]
        for name, flags in runs[1:]:
            if flags != first:
                raise ArchiveError(
                    f"{archive} mixes settings for {group!r}: {name} vs {first_name}: "
                    f"{_difference(flags, first)}. Move one set of runs to another results "
                    "directory; a report must not mix configurations."
                )
    return {group: len(runs) for group, runs in sorted(groups.items())}


def run_seconds(archive: str) -> dict[str, list[float]]:
    """The recorded wall time of each archived run, in seconds, per group (method or stage)."""
    runs: dict[str, list[float]] = {}
    for directory, _, files in os.walk(archive):
        if PROVENANCE in files and not directory.endswith(".partial"):
            provenance = read_provenance(directory) or {}
            group = _group_of(provenance.get("labels", {}), provenance.get("name", directory))
            runs.setdefault(group, []).append(float(provenance.get("wall_seconds") or 0.0))
    return runs
