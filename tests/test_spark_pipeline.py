"""Step 03 through DVC on the Spark engine gives the pandas run's development rows, metrics and reference. A module of
its own, like tests/test_spark_deployment.py (steps 04 and 05 on Spark): each reruns stages on Spark, and the pipeline
tier starts each on a worker of its own."""

import pandas as pd
import pytest

from conftest import run, use_spark
from lib.core import load_json
from lib.model_monitoring import reference_training_rows

DEVELOPED = ("metrics/model_development.json", "models/reference_stats.json")  # what step 03 measured on its rows


def _without_run_ids(document) -> dict:
    return {k: v for k, v in document.items() if k != "run_id"}


@pytest.mark.pipeline
def test_step_03_on_spark_writes_the_pandas_development_rows_and_measures_the_same(deployed_smoke):
    """Its copy of the smoke run switched to the Spark engine, step 03 writes the development rows itself (a folder of
    parts, not collected to the driver) and draws the training sample there: the same rows, metrics and reference as
    the pandas run, and step 05's drift reference reads the same training rows from Spark's folder."""
    project = deployed_smoke
    on_pandas = pd.read_parquet(project / "data/features/development.parquet")
    developed = [_without_run_ids(load_json(project / p)) for p in DEVELOPED]
    reference = reference_training_rows(project)
    use_spark(project)
    said = run(["dvc", "repro", "--single-item", "model_development"], project)
    assert "features on Spark (local[2])" in said.stdout + said.stderr
    assert (project / "data/features/development.parquet").is_dir()  # written by Spark, not collected to the driver
    on_spark = pd.read_parquet(project / "data/features/development.parquet")
    pd.testing.assert_frame_equal(on_spark, on_pandas, check_exact=True)
    assert [_without_run_ids(load_json(project / p)) for p in DEVELOPED] == developed  # the same sample, the same fits
    pd.testing.assert_frame_equal(reference_training_rows(project), reference, check_exact=True)
