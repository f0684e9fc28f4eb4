"""The data ×N (`scale-data`, `make scale-data`): every table a folder of bounded parquet parts that the files source
reads; households cloned under new ids, so keys stay unique; cloned tables N times as long, shared ones unchanged; step
02's contracts and meaning rules hold; the same seed gives the same bytes; clone 0 is the original data."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, run
from lib.core import file_sha256, load_json
from lib.data_acquisition import (
    CONTRACTS,
    HOUSEHOLD_TABLES,
    acquire,
    generate_contacts,
    ingest_table,
    iter_source,
    sample_households,
    source_columns,
)
from lib.scale import CLONED_TABLES, MANIFEST, SHARED_TABLES, scale_data
from lib.sources import files_source, package_source, parquet_parts

SAMPLE, SEED, KEY, FACTOR = 40, 42, b"test-key", 3
PART_ROWS, CHUNK_ROWS = 20_000, 7_000  # several parts per large table, several chunks per part


def read(folder, table) -> pd.DataFrame:
    """`table` of the files source in `folder`, read the way step 02 reads it (chunk by chunk, part after part)."""
    source = files_source(folder)
    chunks = iter_source(source, table, source_columns(source, table), CHUNK_ROWS)
    return pd.concat(chunks, ignore_index=True)


def scale(source_dir, out, factor=FACTOR, seed=SEED) -> dict:
    source = files_source(source_dir)
    return scale_data(out, factor, seed, source, part_rows=PART_ROWS, chunk_rows=CHUNK_ROWS, say=lambda _: None)


def file_hashes(folder) -> dict:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A slice of the package as a files source: a seeded sample of households, promotions cut to their first rows."""
    package, folder = package_source(), tmp_path_factory.mktemp("source")
    population = pd.read_parquet(package.files["transactions"], columns=["household_id"]).household_id
    households = sample_households(population, SAMPLE, SEED)
    for table, path in package.files.items():
        if table == "promotions":
            frame = next(pq.ParquetFile(path).iter_batches(50_000)).to_pandas()
        else:
            frame = pd.read_parquet(path)
            frame = frame[frame.household_id.isin(households)] if table in HOUSEHOLD_TABLES else frame
        frame.reset_index(drop=True).to_parquet(folder / f"{table}.parquet", index=False)
    return folder


@pytest.fixture(scope="module")
def scaled(source_dir, tmp_path_factory):
    """The slice ×FACTOR, and its manifest."""
    out = tmp_path_factory.mktemp("scaled") / f"x{FACTOR}"
    return out, scale(source_dir, out)


def test_cloned_tables_grow_n_fold_and_shared_tables_stay_as_they_are(source_dir, scaled):
    out, manifest = scaled
    for table in CLONED_TABLES:
        assert len(read(out, table)) == FACTOR * len(read(source_dir, table)) == manifest["tables"][table]["rows"]
    for table in SHARED_TABLES:
        pd.testing.assert_frame_equal(read(out, table), read(source_dir, table), obj=table)
    population = read(source_dir, "transactions").household_id.nunique()
    assert len(read(out, "contacts")) == FACTOR * population == manifest["tables"]["contacts"]["rows"]
    assert manifest["factor"] == FACTOR and manifest["seed"] == SEED and load_json(out / MANIFEST) == manifest


def test_every_table_is_a_folder_of_parts_of_bounded_rows(scaled):
    out, manifest = scaled
    assert sorted(files_source(out).files) == sorted([*CLONED_TABLES, "contacts", *SHARED_TABLES])
    for table, written in manifest["tables"].items():
        parts = parquet_parts(out / table)
        assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(written["parts"])]
        rows = [pq.ParquetFile(p).metadata.num_rows for p in parts]
        assert sum(rows) == written["rows"] and max(rows) <= PART_ROWS, table
    assert manifest["tables"]["transactions"]["parts"] > 1 and manifest["tables"]["products"]["parts"] > 1
    assert not list(out.parent.glob("*.partial"))  # written beside, renamed when complete


def test_keys_stay_unique_across_clones(source_dir, scaled):
    out, manifest = scaled
    for table in (*CLONED_TABLES, "contacts", *SHARED_TABLES):
        key = CONTRACTS[table]["key"]
        distinct = read(out, table).drop_duplicates()  # the contract's rule: a unique key among distinct rows
        assert key is None or not distinct.duplicated(key).any(), table
    original, copy = read(source_dir, "transactions"), read(out, "transactions")
    assert copy.basket_id.nunique() == FACTOR * original.basket_id.nunique()
    assert (copy.groupby("basket_id").household_id.nunique() == 1).all()  # a basket belongs to one household
    block = manifest["id_blocks"]["household_id"]
    real = set(original.household_id)
    assert block > max(real)
    assert set(copy.household_id) == {h + c * block for c in range(FACTOR) for h in real}
    assert read(out, "contacts").email.is_unique


def test_step_02_contracts_and_meaning_rules_hold_on_the_scaled_data(scaled, tmp_path):
    out, _ = scaled
    source = files_source(out)
    for table in (*CLONED_TABLES, "contacts", *SHARED_TABLES):
        ingest_table(source, table, CONTRACTS, chunk_rows=CHUNK_ROWS)  # raises ContractError on any broken rule
    result = acquire(source, tmp_path / "raw", 0, SEED, KEY, chunk_rows=CHUNK_ROWS)  # processed contracts, meaning
    assert len(result.processed["households"]) == FACTOR * SAMPLE and not result.contacts_generated
    assert result.scorecard.passed.all()


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_contacts(source_dir, scaled, tmp_path):
    out, _ = scaled
    first = file_hashes(out)
    scale(source_dir, tmp_path / "again")
    assert file_hashes(tmp_path / "again") == first
    scale(source_dir, tmp_path / "other_seed", seed=SEED + 1)
    changed = {
        name.split("/")[0] for name, digest in file_hashes(tmp_path / "other_seed").items() if first[name] != digest
    }
    assert changed == {"contacts", MANIFEST}


def test_clone_zero_is_the_original_data(source_dir, scaled, tmp_path):
    out, _ = scaled
    for table in CLONED_TABLES:
        original = read(source_dir, table)
        pd.testing.assert_frame_equal(read(out, table).head(len(original)), original, obj=table)
    scale(source_dir, tmp_path / "x1", factor=1)
    for table in (*CLONED_TABLES, *SHARED_TABLES):
        pd.testing.assert_frame_equal(read(tmp_path / "x1", table), read(source_dir, table), obj=table)
    population = np.unique(read(source_dir, "transactions").household_id)
    pd.testing.assert_frame_equal(read(tmp_path / "x1", "contacts"), generate_contacts(population, SEED))


def test_the_command_reports_its_progress_and_replaces_only_a_scaled_copy(source_dir, tmp_path):
    out = tmp_path / "scaled/x2"
    command = ["scale-data", "--factor", "2", "--out", str(out), "--source", str(source_dir), "--part-rows", "30000"]
    proc = run(command, tmp_path)
    assert "transactions: clone 2 of 2 written" in proc.stderr and "promotions: shared by every clone" in proc.stderr
    assert load_json(out / MANIFEST)["factor"] == 2
    run(command, tmp_path)  # an earlier scaled copy is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("not a scaled copy")
    refused = run([*command[:3], "--out", str(tmp_path / "other"), *command[5:]], tmp_path, check=False)
    assert refused.returncode != 0 and "holds no _scale.json" in refused.stderr
    assert (tmp_path / "other/notes.txt").exists()


def test_make_scale_data_writes_to_a_folder_that_git_and_dvc_leave_alone():
    dry = run(["make", "-n", "scale-data", "FACTOR=7"], ROOT)
    assert "scale-data --factor 7 --out data/scaled/x7" in dry.stdout
    ignored = run(["git", "check-ignore", "data/scaled/x7/transactions/part-00000.parquet"], ROOT, check=False)
    assert ignored.returncode == 0
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for s in stages.values() for o in s.get("outs", [])]
    assert not [o for o in outs if o.startswith("data/scaled")]
