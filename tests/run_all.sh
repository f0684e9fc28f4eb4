#!/usr/bin/env bash
# The test suite in two tiers; arguments after the tier go to pytest.
#   fast (make test-fast): ruff (lint and format), lib/ in sync with the notebooks, then nbdev-test (the notebooks'
#                          demonstrations) beside every pytest test not marked `pipeline`; no pipeline run.
#   all  (make test):      the fast tier, then the pipeline tier: `pytest -m pipeline` (DVC runs in disposable copies of
#                          the project, stage faults, serving, JupyterLab, reports in Chromium), its slowest tests named.
set -euo pipefail
cd "$(dirname "$0")/.."
tier="${1:-all}"
[ $# -gt 0 ] && shift
case "$tier" in fast|all) ;; *) echo "usage: $0 [fast|all] [pytest arguments]" >&2; exit 2 ;; esac
SYNC=tests/test_repo.py::test_nbdev_export_and_clean_change_nothing
echo "== ruff: lint, and the format of notebooks, tests and benchmarks (120 columns)"
ruff check lib tests benchmarks notebooks
ruff format --check --quiet notebooks tests benchmarks
echo "== lib/ and notebooks/ in sync (nbdev-export and nbdev-clean change nothing)"
pytest -q --no-header "$SYNC"
echo "== pytest, unit tier (-m 'not pipeline'), with nbdev-test (the notebooks' demonstrations) beside it on the other core"
# nbdev-test runs the notebooks in its own process (0 workers): a forked worker would wait, when it ends, for the idle
# joblib workers of a notebook's parallel search to time out (300 s). Its output follows the unit tier's.
notebook_log=$(mktemp)
nbdev-test --n-workers 0 >"$notebook_log" 2>&1 &
notebooks=$!
trap 'kill "$notebooks" 2>/dev/null || true; rm -f "$notebook_log"' EXIT
unit=0
pytest -m "not pipeline" --deselect "$SYNC" "$@" || unit=$?
notebook=0
wait "$notebooks" || notebook=$?
echo "== nbdev-test"
cat "$notebook_log"
[ "$notebook" -eq 0 ] || { echo "nbdev-test failed (exit $notebook)" >&2; exit "$notebook"; }
[ "$unit" -eq 0 ] || exit "$unit"
echo "== fast tier passed in ${SECONDS} s"
[ "$tier" = fast ] && exit 0
echo "== pytest, pipeline tier (-m pipeline)"
pytest -m pipeline --durations=15 "$@"
echo "== all tests passed in ${SECONDS} s"
