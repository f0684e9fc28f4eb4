#!/usr/bin/env bash
# The whole test suite, in tiers: lint, notebook unit tests (nbdev-test), then pytest
# (lib behaviour, params and charter validation, repository hygiene, end-to-end DVC runs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
ruff check lib tests benchmarks
echo "== nbdev-test"
nbdev-test --n-workers 1
echo "== pytest"
pytest "$@"
