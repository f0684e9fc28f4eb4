"""The two test tiers: every test that needs a pipeline run (a project copy, the smoke pipeline, `dvc repro`, papermill,
`make lab`, an MLflow model server) is marked `pipeline`, so that `make test-fast` (`pytest -m "not pipeline"`) runs
none."""

import json
import sys
from pathlib import Path

from conftest import TIERS, run

TESTS = Path(__file__).parent


def tier_record(config, tmp_path) -> dict:
    """What conftest recorded at collection: this session's record when it collected every test module, else the record
    of a collection of the whole tests/ folder."""
    record = config.stash.get(TIERS, None)
    if record and {str(p) for p in TESTS.glob("test_*.py")} <= set(record["modules"]):
        return record
    report = tmp_path / "tiers.json"
    run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS)],
        TESTS.parent,
        env={"PIPELINE_TIER_REPORT": str(report)},
    )
    return json.loads(report.read_text())


def test_every_test_that_needs_a_pipeline_run_is_marked(request, tmp_path):
    record = tier_record(request.config, tmp_path)
    assert record["needs"], "the check recognizes no pipeline test at all: conftest.pipeline_needs is broken"
    unmarked = {nodeid: reasons for nodeid, reasons in record["needs"].items() if nodeid not in record["marked"]}
    assert not unmarked, (
        "mark these @pytest.mark.pipeline (or the module with pytestmark = pytest.mark.pipeline):\n"
        + "\n".join(f"{nodeid}: {'; '.join(reasons)}" for nodeid, reasons in sorted(unmarked.items()))
    )
