"""Step 02 checks what the data means, not only its types: plausible ranges, foreign keys that find their row, rules
within a row, and a comparison with the last accepted snapshot. Each failure names the table, the column or rule, and
counts; the real data's tables pass (verified on the full data), and so does the slice below."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run
from lib.data_acquisition import TABLES, ContractError, acquire, sample_households
from lib.sources import files_source, package_source

SAMPLE, SEED, KEY = 40, 42, b"test-key"


@pytest.fixture(scope="module")
def slice_tables():
    """The package's tables for a seeded sample of households; promotions cut to their first rows."""
    src = package_source()
    tables = {t: pd.read_parquet(src.files[t]) for t in TABLES if t != "promotions"}
    tables["promotions"] = next(pq.ParquetFile(src.files["promotions"]).iter_batches(50_000)).to_pandas()
    households = sample_households(tables["transactions"].household_id, SAMPLE, SEED)
    return {
        t: (f[f.household_id.isin(households)] if "household_id" in f else f).reset_index(drop=True)
        for t, f in tables.items()
    }


def acquire_tables(folder, tables):
    """Write `tables` as the parquet files of a source in `folder/source` and acquire them."""
    (folder / "source").mkdir(parents=True)
    for name, frame in tables.items():
        frame.to_parquet(folder / "source" / f"{name}.parquet", index=False)
    return acquire(files_source(folder / "source"), folder / "raw", 0, SEED, KEY, chunk_rows=50_000)


def expect_contract_error(tmp_path, tables, message):
    with pytest.raises(ContractError) as err:
        acquire_tables(tmp_path, tables)
    assert message in str(err.value), str(err.value)


def test_the_slice_passes_every_meaning_rule(tmp_path, slice_tables):
    card = acquire_tables(tmp_path, slice_tables).scorecard
    assert {"foreign_key", "interval_order", "within_campaign", "week_matches_date"} <= set(card.rule)
    assert card.passed.all()


def test_a_value_far_outside_its_plausible_range_is_named(tmp_path, slice_tables):
    tx = slice_tables["transactions"]
    bad = {**slice_tables, "transactions": tx.assign(sales_value=tx.sales_value.mask(tx.index == 0, 50_000.0))}
    expect_contract_error(tmp_path, bad, f"transactions.sales_value: rule range failed for 1 of {len(tx)}")


def test_a_foreign_key_that_points_nowhere_is_named(tmp_path, slice_tables):
    campaigns = slice_tables["campaigns"]
    orphan = campaigns.head(1).assign(campaign_id=99)  # a targeting for a campaign no description has
    bad = {**slice_tables, "campaigns": pd.concat([campaigns, orphan], ignore_index=True)}
    expect_contract_error(
        tmp_path,
        bad,
        "campaigns.campaign_id → campaign_descriptions.campaign_id: rule foreign_key failed for 1 of "
        f"{len(campaigns) + 1}",
    )


def test_an_interval_that_ends_before_it_starts_is_named(tmp_path, slice_tables):
    cd = slice_tables["campaign_descriptions"]
    backwards = cd.assign(end_date=cd.end_date.mask(cd.campaign_id == 26, cd.start_date - pd.Timedelta(days=3)))
    expect_contract_error(
        tmp_path,
        {**slice_tables, "campaign_descriptions": backwards},
        f"campaign_descriptions.start_date ≤ end_date: rule interval_order failed for 1 of {len(cd)}",
    )


def test_a_table_far_from_the_last_accepted_snapshot_stops_and_a_smaller_change_warns(tmp_path, slice_tables):
    from lib.data_acquisition import SnapshotError, check_snapshot, take_snapshot

    settings = {"source": "slice", "households_sample": 0}
    limits = {"rows_warn": 0.05, "rows_fail": 0.5, "psi_warn": 0.1, "psi_fail": 1.0}
    accepted = take_snapshot(acquire_tables(tmp_path / "first", slice_tables).processed, settings)
    tx = slice_tables["transactions"]
    same = acquire_tables(tmp_path / "same", slice_tables).processed
    changes, note = check_snapshot(accepted, same, settings, limits)
    assert set(changes.level) == {"ok"} and "0 warning(s)" in note
    fewer = {**slice_tables, "transactions": tx.sample(frac=0.4, random_state=1)}
    with pytest.raises(SnapshotError) as err:
        check_snapshot(accepted, acquire_tables(tmp_path / "fewer", fewer).processed, settings, limits)
    kept = round(len(tx) * 0.4)
    assert f"transactions.*: rule snapshot_rows — {kept:,} rows against {len(tx):,}" in str(err.value), str(err.value)
    tenfold = {**slice_tables, "transactions": tx.assign(sales_value=tx.sales_value * 10)}  # dollars became dimes
    with pytest.raises(SnapshotError, match=r"transactions\.sales_value: rule snapshot_distribution — PSI"):
        check_snapshot(accepted, acquire_tables(tmp_path / "tenfold", tenfold).processed, settings, limits)
    some = {**slice_tables, "transactions": tx.sample(frac=0.9, random_state=1)}
    with pytest.warns(UserWarning, match=r"transactions\.\*: rule snapshot_rows"):
        check_snapshot(accepted, acquire_tables(tmp_path / "some", some).processed, settings, limits)


@pytest.mark.pipeline
def test_the_stage_compares_with_the_snapshot_it_accepted_last(project_copy, slice_tables):
    folder = project_copy / "source"
    folder.mkdir()
    for name, frame in slice_tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["data_acquisition"]["source"].update(kind="files", path="source")
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "data_acquisition"], project_copy)
    accepted = (project_copy / "data/snapshot.json").read_text()
    assert json.loads(accepted)["tables"]["transactions"]["rows"] == len(slice_tables["transactions"])
    assert "No accepted snapshot yet" in (project_copy / "reports/html/02_data_acquisition.html").read_text()
    locked = yaml.safe_load((project_copy / "dvc.lock").read_text())["stages"]["data_acquisition"]
    tx = slice_tables["transactions"]
    tx.sample(frac=0.4, random_state=1).to_parquet(folder / "transactions.parquet", index=False)
    proc = run(["dvc", "repro", "-f", "-s", "data_acquisition"], project_copy, check=False)
    assert proc.returncode != 0
    assert "data moved away from the last accepted snapshot" in proc.stderr
    assert f"rows against {len(tx):,}" in proc.stderr
    assert (project_copy / "data/snapshot.json").read_text() == accepted
    assert yaml.safe_load((project_copy / "dvc.lock").read_text())["stages"]["data_acquisition"] == locked
