"""Benchmark PreLAR against APV and DreamerV2 (and ablations) on Meta-World over tasks and seeds:
render videos, pre-train each distinct configuration once, run the pre-training diagnostics,
fine-tune every (method, task, seed), then write results.csv, summary.md and plots.

    python experiments/benchmark.py --config=configs/benchmark.py:tiny --workdir=runs/bench_tiny
    python experiments/benchmark.py --config=configs/benchmark.py:paper --workdir=runs/bench --report

Finished runs are skipped and unfinished ones resume; ``--report`` aggregates what has finished,
``--print`` prints every run's command line. README "Benchmark and sweeps" has the details.
"""

import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("MUJOCO_GL", "egl")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = "configs/benchmark.py:tiny"
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Benchmark config and preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Benchmark directory (re-use it to resume).", required=True)
_REPORT = flags.DEFINE_bool("report", False, "Only aggregate the finished evaluations into the report.")
_PRINT = flags.DEFINE_bool(
    "print",
    False,
    "Print one command line per run still to do (not finished in --workdir nor archived) and exit.",
)


def _methods_table(config_path: str):
    from prelar_jax.runtime.config import config_module

    module = config_module(config_path)
    return module.METHODS, getattr(module, "ORIGINAL_PRESETS", {})


def _config_path() -> str:
    for arg in sys.argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":")[0]
            break
    else:
        path = DEFAULT_CONFIG.split(":")[0]
    return path if os.path.exists(path) else os.path.join(ROOT, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from prelar_jax import errors

    errors.exit_on_user_error(lambda: _main())


def _main():
    from prelar_jax.launch import benchmark as bench

    config, workdir = _CONFIG.value, os.path.abspath(_WORKDIR.value)
    methods_table, original_presets = _methods_table(_config_path())
    runs = bench.plan(config, workdir, methods_table, original_presets)
    archive = bench.archive_dir(config)
    full = runs
    if archive:
        from prelar_jax.launch import archive as archive_lib

        archive_lib.check_archive(archive)
        archive_lib.check_settings(runs.pretrain + runs.diagnostics + runs.finetune, workdir, archive)
        runs = bench.without_archived(runs, workdir, archive)
    baselines = bench.random_policy_baselines(config)
    if _PRINT.value:  # less the runs of methods whose runs would repeat another's (said on stderr)
        same = bench.identical_methods(config, full, workdir, archive)
        for method, (original, sha) in same.items():
            print(f"[benchmark] {bench.not_run_because(method, original, sha)}", file=sys.stderr)
        from prelar_jax.launch import runner

        finished = 0
        for spec in runs.pretrain + runs.diagnostics + runs.finetune:
            if spec.labels.get("method") in same or spec.labels.get("of") in same:
                continue
            if runner.is_finished(spec.workdir):
                finished += 1
            else:
                print(shlex.join(spec.command))
        if finished:
            print(
                f"[benchmark] not listed: {finished} run{'s' if finished > 1 else ''} finished in {workdir} already",
                file=sys.stderr,
            )
        return
    if _REPORT.value:
        same = bench.identical_methods(config, full, workdir, archive)
    else:
        from prelar_jax.runtime import workdir_lock

        with workdir_lock.hold(workdir, "benchmark"):  # one benchmark per directory
            same = bench.run_grid(config, workdir, runs, archive, full)
    paths = bench.report(workdir, full.finetune, archive, baselines, same)
    print("[benchmark] " + ", ".join(f"{k}: {v}" for k, v in paths.items()), flush=True)


if __name__ == "__main__":
    from prelar_jax.runtime import config as config_lib
    from prelar_jax import errors

    errors.exit_on_user_error(lambda: config_lib.check_override_flags(sys.argv, DEFAULT_CONFIG))
    app.run(main)
