#!/usr/bin/env bash
# Run the test suite (sets up the environment first). Extra arguments go to pytest.
#   bash experiments/test.sh            # whole suite
#   bash experiments/test.sh -k rssm    # a subset
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/experiments/setup_env.sh"
cd "$ROOT"
# The linter first (ruff.toml; under a second): a finding fails the run before the tests start.
"${PRELAR_VENV:-$ROOT/.venv}/bin/ruff" check --quiet . \
  || { echo "ruff check failed: fix the findings above (ruff check --fix fixes some)" >&2; exit 1; }
# Two workers: compilation is mostly single-threaded, so two processes use both cores.
# Work stealing: each worker starts on its half of the tests in file order (tests of one file share
# compiled steps and fixtures) and takes over the end of the other's queue when its own runs out,
# so neither finishes long before the other (replaying the suite's test durations: ~14 s sooner
# than `--dist load`; experiments/BENCHMARKS.md).
exec "${PRELAR_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -n "${PRELAR_TEST_WORKERS:-2}" --dist worksteal "$@"
