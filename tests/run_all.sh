#!/usr/bin/env bash
# The test suite in two tiers; arguments after the tier go to pytest.
#   fast (make test-fast): ruff (lint and format), then nbdev-test (the notebooks' demonstrations) beside every pytest
#                          test not marked `pipeline` (lib/ in sync with the notebooks among them) on two workers; no
#                          pipeline run.
#   all  (make test):      the fast tier, then the pipeline tier: `pytest -m pipeline` on three workers (DVC runs in
#                          disposable copies of the project, stage faults, serving, JupyterLab, reports in Chromium), its
#                          slowest tests named.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests run beside each other on few cores: an OpenMP thread (scikit-learn's boosting) that waits for work sleeps
# instead of spinning on a core another test needs (2.5 times faster under load; the same results).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
tier="${1:-all}"
[ $# -gt 0 ] && shift
case "$tier" in fast|all) ;; *) echo "usage: $0 [fast|all] [pytest arguments]" >&2; exit 2 ;; esac
echo "== ruff: lint, and the format of notebooks, tests and benchmarks (120 columns)"
ruff check lib tests benchmarks notebooks
ruff format --check --quiet notebooks tests benchmarks
echo "== pytest, unit tier (-m 'not pipeline', lib/ in sync with the notebooks among them) on two workers, nbdev-test (the"
echo "   notebooks' demonstrations) beside it"
# nbdev-test runs the notebooks in its own process (0 workers): a forked worker would wait, when it ends, for the idle
# joblib workers of a notebook's parallel search to time out (300 s). Its output follows the unit tier's.
notebook_log=$(mktemp)
nbdev-test --n-workers 0 >"$notebook_log" 2>&1 &
notebooks=$!
trap 'kill "$notebooks" 2>/dev/null || true; rm -f "$notebook_log"' EXIT
unit=0
# Two workers, each test file on one of them, so a module's fixtures are built once; files start in collection order,
# the Spark tests (the longest file here) first.
pytest -m "not pipeline" -n 2 --dist loadfile --no-loadscope-reorder "$@" || unit=$?
notebook=0
wait "$notebooks" || notebook=$?
echo "== nbdev-test"
cat "$notebook_log"
[ "$notebook" -eq 0 ] || { echo "nbdev-test failed (exit $notebook)" >&2; exit "$notebook"; }
[ "$unit" -eq 0 ] || exit "$unit"
echo "== fast tier passed in ${SECONDS} s"
[ "$tier" = fast ] && exit 0
echo "== pytest, pipeline tier (-m pipeline) on three workers"
# Each test file on one worker: a module's project copy, smoke run or team stack is built once; the session's shared
# smoke run is built once, by the first worker that needs it. Files start longest first (LONGEST_FIRST in
# conftest.py). Three workers on two cores: a pipeline test spends part of its time waiting (for a server to answer,
# Chromium to print, a lock, a database to start), and the third worker uses those waits.
pytest -m pipeline -n 3 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
echo "== all tests passed in ${SECONDS} s"
