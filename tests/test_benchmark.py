"""The benchmark's budget: a stage that needs more than 4 GB of memory fails `make bench`, and the smoke run's own
figures are held to the same budget."""

import json
import sys

import pytest

from conftest import ROOT
from lib.core import pipeline_stages

sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmark import PEAK_MEMORY_BUDGET_MB, check_budget, over_budget  # noqa: E402

WITHIN = {"stages": {"data_acquisition": {"seconds": 56.0, "peak_rss_mb": 2900.0}}, "full_repro": {"peak_rss_mb": 2900}}


def test_the_budget_is_4_gb():
    assert PEAK_MEMORY_BUDGET_MB == 4096


def test_a_stage_over_the_budget_fails_the_benchmark_naming_it():
    results = {**WITHIN, "stages": {**WITHIN["stages"], "model_development": {"seconds": 1, "peak_rss_mb": 5120.0}}}
    assert over_budget(results) == ["stage model_development: peak memory 5,120 MB is over the 4,096 MB budget"]
    with pytest.raises(SystemExit) as stopped:
        check_budget(results)
    assert "stage model_development: peak memory 5,120 MB" in str(stopped.value.code)


def test_figures_within_the_budget_pass():
    assert over_budget(WITHIN) == []
    check_budget(WITHIN)


@pytest.mark.pipeline
def test_every_stage_of_the_smoke_run_stays_within_the_memory_budget(smoke_pipeline):
    figures = json.loads((smoke_pipeline.parent / "smoke_figures.json").read_text())
    assert set(figures["stages"]) == set(pipeline_stages(smoke_pipeline))
    assert all(f["peak_rss_mb"] > 50 for f in figures["stages"].values())  # a real measurement, not a placeholder
    assert over_budget(figures) == []
