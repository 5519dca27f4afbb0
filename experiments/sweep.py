"""Expand a sweep file (configs/sweeps/*.py) into runs, and run them here or print them.

    python experiments/sweep.py --sweep=configs/sweeps/example.py --out=runs/sweep_example --print
    python experiments/sweep.py --sweep=configs/sweeps/example.py --out=runs/sweep_example --max_parallel=2

One workdir per run in --out, runs.json (status of every run) and results.csv; re-running skips
finished runs and resumes the others. Exit status: 0 all finished, 1 some failed or unfinished, 130
interrupted, 2 a bad sweep file. README "An example sweep" has the details.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prelar_jax import errors  # noqa: E402
from prelar_jax.launch import runner, sweep as sweep_lib  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/example.py")
    parser.add_argument("--out", required=True, help="directory for the run workdirs, runs.json and results.csv")
    parser.add_argument(
        "--print", action="store_true", dest="print_only", help="print one shell command line per run and exit"
    )
    parser.add_argument("--max_parallel", type=int, default=1, help="runs at the same time (default 1)")
    parser.add_argument(
        "--grace_seconds",
        type=float,
        default=120.0,
        help="after Ctrl-C, how long runs get to save a checkpoint before they are killed",
    )
    parser.add_argument(
        "--include_unfinished",
        action="store_true",
        help="results.csv also gets the evaluations of runs that have not finished",
    )
    args = parser.parse_args(argv)

    specs = errors.exit_on_user_error(
        lambda: sweep_lib.expand(sweep_lib.load_sweep(args.sweep), args.out, source=args.sweep)
    )
    if args.print_only:
        for spec in specs:
            print(sweep_lib.command_line(spec))
        return 0
    results = errors.exit_on_user_error(
        lambda: runner.run_all(specs, args.max_parallel, args.out, grace_seconds=args.grace_seconds)
    )
    rows = runner.collect_results(specs, finished_only=not args.include_unfinished)
    csv_path = os.path.join(args.out, "results.csv")
    runner.write_results_csv(rows, csv_path)
    print(
        f"[sweep] {len(rows)} evaluation rows from {len({(r['method'], r['task'], r['seed']) for r in rows})} "
        f"run(s) in {csv_path}",
        flush=True,
    )
    statuses = {result.status for result in results}
    if runner.INTERRUPTED in statuses or runner.NOT_STARTED in statuses:
        return 130
    return 0 if statuses <= {runner.FINISHED, runner.SKIPPED} else 1


if __name__ == "__main__":
    sys.exit(main())
