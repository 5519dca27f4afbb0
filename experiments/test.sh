#!/usr/bin/env bash
# Run the test suite (sets up the environment first). Extra arguments go to pytest.
#   bash experiments/test.sh            # whole suite
#   bash experiments/test.sh -k rssm    # a subset
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/experiments/setup_env.sh"
cd "$ROOT"
# The formatter and the linter first (ruff.toml; under a second each): unformatted code or a finding
# fails the run before the tests start.
"${PRELAR_VENV:-$ROOT/.venv}/bin/ruff" format --check --quiet . \
  || { echo "ruff format --check failed: run '.venv/bin/ruff format .' to format the files above" >&2; exit 1; }
"${PRELAR_VENV:-$ROOT/.venv}/bin/ruff" check --quiet . \
  || { echo "ruff check failed: fix the findings above (ruff check --fix fixes some)" >&2; exit 1; }
# Two workers (compilation is mostly single-threaded); work stealing keeps the tests of one file
# on one worker (they share compiled steps and fixtures) until a worker runs out of its own.
exec "${PRELAR_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -n "${PRELAR_TEST_WORKERS:-2}" --dist worksteal "$@"
