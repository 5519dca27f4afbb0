"""A benchmark's results accumulate in a committed results directory across machines: archived runs
are not run again, the report is built from the archive, runs of one method never mix settings.
Fake run directories stand in for training (each test well under a second, plus one tiny
subprocess for the runner hook)."""

import csv
import json
import os
import sys

import pytest

from prelar_jax.runtime import config as config_lib, run_utils
from prelar_jax.launch import archive, runner
from tests.model_helpers import benchmark_modules as modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan(workdir, **overrides):
    bench, table = modules()
    config = config_lib.load_config(
        "configs/benchmark.py:cpu", {"methods": "prelar,dreamerv2", "seeds": 2, "results": "", **overrides}
    )
    return config, bench.plan(config, str(workdir), table.METHODS, table.ORIGINAL_PRESETS)


def _finish(spec, success=(0.0, 0.5)):
    """What a finished fine-tuning run leaves behind, plus files the archive must not copy."""
    os.makedirs(os.path.join(spec.workdir, "checkpoints", "3000"), exist_ok=True)
    with open(os.path.join(spec.workdir, "checkpoints", "3000", "big.bin"), "wb") as handle:
        handle.write(b"\0" * 1000)
    with open(os.path.join(spec.workdir, "metrics.jsonl"), "w") as handle:
        for step, rate in zip((1500, 3000), success):
            handle.write(json.dumps({"step": step, "eval/success_rate": rate, "eval/return": 100 * rate}) + "\n")
    with open(os.path.join(spec.workdir, "config.json"), "w") as handle:
        json.dump({"method": spec.labels.get("method"), "seed": spec.labels.get("seed")}, handle)
    with open(os.path.join(spec.workdir, "summary.json"), "w") as handle:
        json.dump({"finished": True}, handle)


def test_cpu_preset_plans_the_issue_grid(tmp_path):
    bench, table = modules()
    config = config_lib.load_config("configs/benchmark.py:cpu")
    runs = bench.plan(config, str(tmp_path), table.METHODS, table.ORIGINAL_PRESETS)
    assert len(runs.finetune) == 5 * 2 * 3 and len(runs.pretrain) == 4  # prelar, wo_cl, sign, apv
    assert config.results == "experiments/results/benchmark_cpu"
    assert all("--config.steps=30000" in s.command for s in runs.finetune)
    assert all(any(a.endswith(":cpu") for a in s.command) for s in runs.pretrain + runs.finetune)
    # Seed-major: all 10 (method, task) pairs get seed 0 before any gets seed 1, so a grid stopped
    # part-way compares every method on the same seeds.
    seeds = [s.labels["seed"] for s in runs.finetune]
    assert seeds == sorted(seeds)
    assert len({(s.labels["method"], s.labels["task"]) for s in runs.finetune[:10]}) == 10


def test_provenance_names_the_code_the_run_started_with(tmp_path):
    """A run records its code version when it starts (attempts.jsonl); the archive reports that
    one, not the checkout's at export time, which may have moved on meanwhile."""
    work, results = tmp_path / "machine1", str(tmp_path / "results")
    _, runs = _plan(work)
    with_record, without = runs.finetune[:2]
    for spec in (with_record, without):
        _finish(spec)
    with open(os.path.join(with_record.workdir, "attempts.jsonl"), "w") as handle:
        for commit in ("a" * 40, "b" * 40):  # a first attempt, then the resumed one that finished
            handle.write(json.dumps({"started": "t", "host": "h", "commit": commit, "dirty": False}) + "\n")
    for spec in (with_record, without):
        assert archive.export(spec, str(work), results, ROOT)
    recorded = json.load(open(os.path.join(archive.archived_dir(with_record, str(work), results), "provenance.json")))
    assert recorded["commit"] == "b" * 40 and recorded["code_version_from"] == "run start"
    assert os.path.exists(os.path.join(archive.archived_dir(with_record, str(work), results), "attempts.jsonl"))
    fallback = json.load(open(os.path.join(archive.archived_dir(without, str(work), results), "provenance.json")))
    assert fallback["code_version_from"] == "export"
    assert fallback["commit"] == run_utils.code_version(ROOT)["commit"]


def test_archived_runs_are_not_run_again_and_the_report_reads_the_archive(tmp_path):
    bench, _ = modules()
    work, results = tmp_path / "machine1", str(tmp_path / "results")
    _, runs = _plan(work)
    done = [s for s in runs.finetune if s.labels["method"] == "prelar"]
    for spec in done:
        _finish(spec)
    unfinished = next(s for s in runs.finetune if s.labels["method"] == "dreamerv2")
    os.makedirs(unfinished.workdir)
    with open(os.path.join(unfinished.workdir, "summary.json"), "w") as handle:
        json.dump({"finished": False}, handle)
    exported = [archive.export(s, str(work), results, ROOT, seconds=60.0) for s in runs.finetune]
    assert exported == [s in done for s in runs.finetune]
    assert not any(archive.export(s, str(work), results, ROOT) for s in done)  # once only
    first = archive.archived_dir(done[0], str(work), results)
    assert sorted(os.listdir(first)) == ["config.json", "metrics.jsonl", "provenance.json", "summary.json"]
    provenance = json.load(open(os.path.join(first, "provenance.json")))
    assert provenance["command"] == done[0].command and provenance["wall_seconds"] == 60.0
    assert provenance["labels"]["method"] == "prelar" and len(provenance["commit"] or "x" * 40) == 40

    # A new machine: nothing of machine1 is left but the archive.
    work2 = tmp_path / "machine2"
    _, runs2 = _plan(work2)
    remaining = bench.without_archived(runs2, str(work2), results)
    assert {s.labels["method"] for s in remaining.finetune} == {"dreamerv2"}
    # The diagnostics are still to do, so PreLAR's pre-training is needed again (checkpoints are
    # never archived); without them no pre-training runs: every PreLAR fine-tuning run is archived.
    assert remaining.diagnostics == runs2.diagnostics
    assert [s.labels["name"] for s in remaining.pretrain] == ["prelar"]
    assert bench.without_archived(runs2._replace(diagnostics=[]), str(work2), results).pretrain == []
    paths = bench.report(str(work2), runs2.finetune, results)
    with open(paths["results"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(done) * 2 and {r["method"] for r in rows} == {"prelar"}
    summary = open(paths["summary"]).read()
    assert "Runs and their cost" in summary and "| prelar | 4 | 0.07 |" in summary
    # The rest of the plan, priced at the archived runs' median (DreamerV2 has none: all methods').
    assert "| dreamerv2 | 4 | 0.07 (median of all methods) |" in summary
    assert "The whole grid: 0.13 h, 0.07 h of it done." in summary
    # Only fine-tuning runs price fine-tuning: pre-training and diagnostics groups are not methods.
    groups = [archive._group(s) for s in runs.pretrain + runs.diagnostics + runs.finetune]
    assert [g for g in groups if archive.is_finetune_group(g)] == [s.labels["method"] for s in runs.finetune]
    assert len(groups) > len(runs.finetune)


def test_other_settings_for_an_archived_method_are_refused(tmp_path):
    results = str(tmp_path / "results")
    _, runs = _plan(tmp_path / "a")
    spec = runs.finetune[0]
    _finish(spec)
    assert archive.export(spec, str(tmp_path / "a"), results, ROOT)
    _, same = _plan(tmp_path / "b")  # another machine, other paths: same settings
    archive.check_settings(same.finetune + same.pretrain, str(tmp_path / "b"), results)
    _, longer = _plan(tmp_path / "b", **{"finetune.steps": 40_000})
    with pytest.raises(archive.ArchiveError, match=r"other settings.*--config.steps=40000.*--config.steps=30000"):
        archive.check_settings(longer.finetune, str(tmp_path / "b"), results)

    # An archive that already mixes them (copied together by hand) is refused by the report.
    other = next(s for s in longer.finetune if s.labels["method"] == "prelar" and s.labels["seed"] == 1)
    _finish(other)
    assert archive.export(other, str(tmp_path / "b"), results, ROOT)
    with pytest.raises(archive.ArchiveError, match="mixes settings for 'prelar'"):
        archive.check_archive(results)


def test_runner_hook_archives_each_run_as_it_ends(tmp_path):
    script = (
        "import json, os, sys; w = sys.argv[1].split('=', 1)[1]; os.makedirs(w, exist_ok=True); "
        "json.dump({'finished': True}, open(os.path.join(w, 'summary.json'), 'w'))"
    )
    specs = [
        runner.RunSpec(
            name=f"runs/m/t/seed_{i}",
            workdir=str(tmp_path / "w" / "runs" / "m" / "t" / f"seed_{i}"),
            command=[sys.executable, "-c", script, f"--workdir={tmp_path}/w/runs/m/t/seed_{i}"],
            labels={"method": "m", "task": "t", "seed": i},
        )
        for i in range(2)
    ]
    seen = []

    def on_end(spec, result):
        seen.append((spec.name, result.status))
        assert archive.export(spec, str(tmp_path / "w"), str(tmp_path / "results"), ROOT, result.seconds)
        if spec.name.endswith("0"):
            raise OSError("disk full")  # reported, the other run still runs

    lines = []
    runner.run_all(specs, 1, str(tmp_path / "logs"), on_end=on_end, echo=lines.append)
    assert seen == [("runs/m/t/seed_0", runner.FINISHED), ("runs/m/t/seed_1", runner.FINISHED)]
    assert any("warning: after runs/m/t/seed_0: OSError: disk full" in line for line in lines)
    assert archive.check_archive(str(tmp_path / "results")) == {"m": 2}


def test_a_method_whose_runs_would_repeat_another_runs_once(tmp_path):
    """prelar_sign's released loss has zero gradient, so it pre-trains bit-identically to
    prelar_wo_cl; with the same fine-tuning settings its runs would repeat prelar_wo_cl's. Such a
    method is not fine-tuned (nor diagnosed) and the report shows the two as one. Weights that
    differ in the last bit, other fine-tuning settings, an unfinished pre-training or
    ``skip_identical=False`` keep it running."""
    bench, _ = modules()
    work = tmp_path / "work"
    config, runs = _plan(work, methods="prelar_wo_cl,prelar_sign,prelar,dreamerv2", seeds=1, tasks="door-close")

    def pretraining(method, sha, finished=True):
        directory = runs.pretrained[method]
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "summary.json"), "w") as handle:
            json.dump({"finished": finished}, handle)
        if sha:
            with open(os.path.join(directory, bench.WEIGHTS_FILE), "w") as handle:
                json.dump({"sha256": sha}, handle)
        elif os.path.exists(os.path.join(directory, bench.WEIGHTS_FILE)):
            os.remove(os.path.join(directory, bench.WEIGHTS_FILE))

    for method, sha in (("prelar_wo_cl", "a" * 64), ("prelar_sign", "a" * 64), ("prelar", "b" * 64)):
        pretraining(method, sha)
    same = bench.identical_methods(config, runs, str(work))
    assert same == {"prelar_sign": ("prelar_wo_cl", "a" * 64)}
    assert (
        bench.identical_methods(
            config_lib.load_config("configs/benchmark.py:cpu", {"skip_identical": False}), runs, str(work)
        )
        == {}
    )
    pretraining("prelar_sign", "a" * 63 + "b")  # one bit of one weight is enough to run it
    assert bench.identical_methods(config, runs, str(work)) == {}
    pretraining("prelar_sign", "", finished=False)  # not comparable yet: it runs
    assert bench.identical_methods(config, runs, str(work)) == {}
    # A record from an earlier end of the run (it went on to more steps since) is not trusted; with
    # no checkpoint to sum here, the method is not comparable.
    pretraining("prelar_sign", "a" * 64)
    with open(os.path.join(runs.pretrained["prelar_sign"], "summary.json"), "w") as handle:
        json.dump({"finished": True, "step": 4000}, handle)
    assert bench.identical_methods(config, runs, str(work)) == {}
    # Same weights, other fine-tuning settings: prelar_naive fine-tunes prelar's pre-training.
    _, naive = _plan(work, methods="prelar,prelar_naive", seeds=1, tasks="door-close")
    assert naive.pretrained["prelar"] == naive.pretrained["prelar_naive"]
    assert bench.identical_methods(config, naive, str(work)) == {}
    # On a machine without the pre-training's workdir the archived copy's record serves.
    pretraining("prelar_sign", "a" * 64)
    results = tmp_path / "results"
    for method in ("prelar_wo_cl", "prelar_sign"):
        relative = os.path.relpath(runs.pretrained[method], work)
        os.makedirs(results / relative)
        os.replace(os.path.join(runs.pretrained[method], bench.WEIGHTS_FILE), results / relative / bench.WEIGHTS_FILE)
        os.remove(os.path.join(runs.pretrained[method], "summary.json"))
    assert bench.identical_methods(config, runs, str(work), str(results)) == same
    # A current record is read, not written again; a stale one is replaced by the trusted record.
    archived_record = results / os.path.relpath(runs.pretrained["prelar_sign"], work) / bench.WEIGHTS_FILE
    inode = os.stat(archived_record).st_ino
    wo_cl = runs.pretrained["prelar_wo_cl"]
    wo_cl_copy = results / os.path.relpath(wo_cl, work)
    for place, sha, step in ((wo_cl, "d" * 64, 4), (wo_cl_copy, "a" * 64, 5)):
        with open(os.path.join(place, "summary.json"), "w") as handle:
            json.dump({"finished": True, "step": 5}, handle)
        with open(os.path.join(place, bench.WEIGHTS_FILE), "w") as handle:
            json.dump({"sha256": sha, "step": step}, handle)
    assert bench.identical_methods(config, runs, str(work), str(results)) == same
    assert os.stat(archived_record).st_ino == inode
    with open(os.path.join(wo_cl, bench.WEIGHTS_FILE)) as handle:
        assert json.load(handle) == {"sha256": "a" * 64, "step": 5}

    # The grid: fake fine-tuning and diagnostics runs that log two evaluations.
    script = (
        "import json, os, sys; w = sys.argv[1].split('=', 1)[1]; os.makedirs(w, exist_ok=True); "
        "open(os.path.join(w, 'metrics.jsonl'), 'w').write(''.join(json.dumps({'step': s, "
        "'eval/success_rate': 0.5, 'eval/return': 10.0}) + chr(10) for s in (1500, 3000))); "
        "json.dump({'finished': True}, open(os.path.join(w, 'summary.json'), 'w'))"
    )

    def fake(spec):
        kept = [a for a in spec.command if a.startswith("--config.pretrained=")]
        return runner.RunSpec(
            spec.name, [sys.executable, "-c", script, f"--workdir={spec.workdir}", *kept], spec.workdir, spec.labels
        )

    diagnostics = [fake(s) for s in runs.diagnostics]
    assert [s.labels.get("of") for s in diagnostics] == [None, "prelar_wo_cl", "prelar_sign"]
    grid = runs._replace(pretrain=[], finetune=[fake(s) for s in runs.finetune], diagnostics=diagnostics)
    assert bench.run_grid(config, str(work), grid, str(results)) == same
    ran = {s.labels.get("method") or s.name for s in grid.finetune + grid.diagnostics if runner.is_finished(s.workdir)}
    assert ran == {"prelar_wo_cl", "prelar", "dreamerv2", "diagnostics", "diagnostics_prelar_wo_cl"}
    paths = bench.report(str(work), grid.finetune, "", None, same)
    with open(paths["results"]) as handle:
        methods = {row["method"] for row in csv.DictReader(handle)}
    assert methods == {"prelar_wo_cl = prelar_sign", "prelar", "dreamerv2"}
    summary = open(paths["summary"]).read()
    assert "prelar_sign is not fine-tuned: its pre-trained weights are bit-identical to prelar_wo_cl's" in summary


def test_pretraining_videos_leave_out_the_benchmarked_tasks():
    from prelar_jax.data.generate import DEFAULT_TASKS

    bench, _ = modules()
    config = config_lib.load_config("configs/benchmark.py:cpu")
    tasks = bench.video_tasks(config, DEFAULT_TASKS)
    assert "door-close" in DEFAULT_TASKS and "door-close" not in tasks and "window-close" not in tasks
    assert len(tasks) == len(DEFAULT_TASKS) - 2
    limited = config_lib.load_config("configs/benchmark.py:cpu", {"videos.tasks_limit": 3})
    assert bench.video_tasks(limited, DEFAULT_TASKS) == tasks[:3]
