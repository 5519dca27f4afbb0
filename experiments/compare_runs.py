"""Report of a few fine-tuning runs side by side, e.g. two methods on one task outside the benchmark
driver: results.csv, summary.md and the success / return plots of ``prelar_jax.analysis.report``.

    python experiments/compare_runs.py --run dreamerv2=runs/dv2_door_close --run prelar_fm=runs/fm_door_close \
        --random_policy=experiments/results/random_policy_2026-12-05/random_policy.json --random_policy_steps=150 \
        --out=experiments/results/door-close_comparison

Each ``--run LABEL=DIR`` is a fine-tuning workdir or its archived copy (``metrics.jsonl`` and
``config.json``); the label is the method shown, the task and seed come from its config.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--out", required=True)
    parser.add_argument("--random_policy", default="", help="experiments/random_policy.py output to draw")
    parser.add_argument("--random_policy_steps", type=int, default=500, help="its episode length to use")
    args = parser.parse_args(argv)

    from prelar_jax import errors
    from prelar_jax.analysis import report
    from prelar_jax.launch import runner

    def run() -> dict:
        specs = []
        for item in args.run:
            label, sep, directory = item.partition("=")
            if not sep or not label or not os.path.isfile(os.path.join(directory, runner.METRICS_FILE)):
                raise report.ResultsFileError(
                    f"--run {item!r}: expected LABEL=DIR with DIR/{runner.METRICS_FILE} (a fine-tuning workdir)"
                )
            specs.append(runner.RunSpec(name=label, command=[], workdir=directory, labels={"method": label}))
        baselines = (
            report.random_policy_baselines(args.random_policy, args.random_policy_steps) if args.random_policy else None
        )
        os.makedirs(args.out, exist_ok=True)
        csv_path = os.path.join(args.out, "results.csv")
        runner.write_results_csv(runner.collect_results(specs), csv_path)
        paths = report.write_report(csv_path, args.out, reference=False, baselines=baselines)
        print("\n".join(f"{key}: {path}" for key, path in {"results": csv_path, **paths}.items()))
        return paths

    return errors.exit_on_user_error(run)


if __name__ == "__main__":
    main()
