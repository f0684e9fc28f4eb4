"""Step 02 data acquisition: every source kind gives the same tables, bad input stops ingestion with a specific
error, contact details stay in data/raw/, pseudonyms are keyed and stable, and outputs are reproducible."""

import io
import json
import sqlite3
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

import lib.data_acquisition as da
from conftest import run
from lib.core import file_sha256, pipeline_stages
from lib.data_acquisition import (
    CONTRACTS,
    PROCESSED_CONTRACTS,
    PROCESSED_TABLES,
    TABLES,
    ContractError,
    DevelopmentKeyWarning,
    TransactionsFile,
    acquire,
    check_contract,
    generate_contacts,
    ingest_table,
    load_processed,
    pseudonym_key,
    sample_households,
    write_tables,
)
from lib.sources import files_source, package_source, source_fingerprint, sql_source

SAMPLE, SEED, KEY = 40, 42, b"test-key"
PROMOTION_ROWS = 50_000  # enough for thousands of promotions at the sampled home stores
CANARY = {"name": "Zebulon Canaryfield", "phone": "+1-311-555-0199", "email": "zebulon.canaryfield@example.com"}


# ---------------------------------------------------------------- a slice of the package, in every format


@pytest.fixture(scope="module")
def package_tables():
    """The package's tables, promotions cut to its first rows (the same rows every format gets)."""
    src = package_source()
    tables = {t: pd.read_parquet(src.files[t]) for t in TABLES if t != "promotions"}
    tables["promotions"] = next(pq.ParquetFile(src.files["promotions"]).iter_batches(PROMOTION_ROWS)).to_pandas()
    return tables


@pytest.fixture(scope="module")
def slice_tables(package_tables):
    """The package's tables restricted to the households the seeded sample picks from the whole population."""
    households = sample_households(package_tables["transactions"].household_id, SAMPLE, SEED)
    return {
        t: (f[f.household_id.isin(households)] if "household_id" in f else f).reset_index(drop=True)
        for t, f in package_tables.items()
    }


@pytest.fixture(scope="module")
def slice_dirs(slice_tables, tmp_path_factory):
    """The slice written as parquet files, as CSV files and as a SQLite database."""
    base = tmp_path_factory.mktemp("slice")
    for fmt in ("parquet", "csv"):
        (base / fmt).mkdir()
        for name, frame in slice_tables.items():
            frame.to_parquet(base / fmt / f"{name}.parquet", index=False) if fmt == "parquet" else frame.to_csv(
                base / fmt / f"{name}.csv", index=False
            )
    with sqlite3.connect(base / "slice.db") as conn:
        for name, frame in slice_tables.items():
            frame.to_sql(name, conn, index=False)
    return base


def loaded(table):
    "A delivered table as a frame: the transactions, delivered as a file, loaded."
    return table.frame() if isinstance(table, TransactionsFile) else table


def acquire_into(source, folder, sample=0, key=KEY, **kw):
    """Acquire from `source` with raw files in `folder/raw`; processed tables written to `folder/processed`."""
    result = acquire(source, folder / "raw", sample, SEED, key, chunk_rows=50_000, **kw)
    return result, write_tables(result.processed, folder / "processed")


@pytest.fixture(scope="module")
def acquired(package_tables, slice_dirs, tmp_path_factory):
    """The same data acquired from the package (sampled), from the parquet slice, from CSV and from SQLite."""
    base = tmp_path_factory.mktemp("acquired")
    package = package_source()
    package.files["promotions"] = slice_dirs / "parquet/promotions.parquet"  # the same promotion rows as the slice
    return {
        "package": acquire_into(package, base / "package", sample=SAMPLE),
        "csv": acquire_into(files_source("csv", slice_dirs), base / "csv"),
        "sqlite": acquire_into(sql_source(f"sqlite:///{slice_dirs / 'slice.db'}"), base / "sqlite"),
        "csv_again": acquire_into(files_source("csv/*.csv", slice_dirs), base / "csv_again"),
        # the transactions processed a basket range of about 1,000 lines at a time, not in one range
        "by_range": acquire_into(files_source("parquet", slice_dirs), base / "by_range", bucket_rows=1_000),
    }


def test_package_sqlite_and_csv_give_identical_processed_tables(acquired):
    reference, paths = acquired["package"]
    assert len(reference.processed["households"]) == SAMPLE
    for kind in ("csv", "sqlite"):
        other, other_paths = acquired[kind]
        for table in PROCESSED_TABLES:
            pd.testing.assert_frame_equal(
                loaded(other.processed[table]), loaded(reference.processed[table]), obj=f"{kind}: {table}"
            )
            assert file_sha256(other_paths[table]) == file_sha256(paths[table]), f"{kind}: {table} differs in bytes"


def test_basket_ranges_deliver_what_one_range_does(acquired):
    (whole, _), (by_range, _) = acquired["sqlite"], acquired["by_range"]  # the same slice, no sample
    assert len(by_range.processed["transactions"]) > 5_000  # several ranges
    for table in PROCESSED_TABLES:
        pd.testing.assert_frame_equal(loaded(by_range.processed[table]), loaded(whole.processed[table]), obj=table)
    rules = ["table", "column", "rule"]
    scores = (a.scorecard.set_index(rules)[["failed", "pass_rate", "passed"]].sort_index() for a in (whole, by_range))
    pd.testing.assert_frame_equal(*scores)  # the same rules, failing on the same rows
    assert whole.log == by_range.log


def test_same_input_twice_gives_the_same_content_hashes(acquired):
    (first, first_paths), (second, second_paths) = acquired["csv"], acquired["csv_again"]
    assert {t: file_sha256(p) for t, p in first_paths.items()} == {t: file_sha256(p) for t, p in second_paths.items()}
    assert {t: file_sha256(p) for t, p in first.raw_files.items()} == {
        t: file_sha256(p) for t, p in second.raw_files.items()
    }


def test_processed_tables_meet_the_delivery_contract(acquired):
    processed = acquired["package"][0].processed
    for table in PROCESSED_TABLES:
        check_contract(table, loaded(processed[table]), PROCESSED_CONTRACTS)
    assert list(processed["contacts"].columns) == ["household_id", "contact_key"]
    assert processed["demographics"].age.cat.ordered and processed["demographics"].age.cat.categories[0] == "Unknown"
    assert set(processed["households"].household_id) == set(loaded(processed["transactions"]).household_id)
    assert processed["promotions"].product_id.isin(processed["coupons"].product_id).all()
    assert processed["promotions"].store_id.isin(processed["households"].home_store_id).all()


def test_acquisition_says_each_part_and_how_far_each_long_table_got(slice_dirs, tmp_path, monkeypatch):
    """Ingestion is the longest silent part of a stage otherwise: each part is named as it starts, each table when it is
    in (with its rows), and a long table every `PROGRESS_ROWS` rows."""
    monkeypatch.setattr(da, "PROGRESS_ROWS", 10_000)
    heard = []
    result = acquire(
        files_source("csv", slice_dirs), tmp_path / "raw", 0, SEED, KEY, chunk_rows=5_000, say=heard.append
    )
    rows = {t: n["rows_read"] for t, n in result.notes.items() if "rows_read" in n}
    assert rows["transactions"] > 20_000 and rows["promotions"] == PROMOTION_ROWS  # long enough to report progress
    for table in ("transactions", "promotions"):
        assert [m for m in heard if m.endswith(" rows read") and m.startswith(f"{table}: ")] == [
            f"{table}: {n:,} rows read" for n in range(10_000, rows[table] + 1, 10_000)
        ]
    repeats = next(
        e["count"] for e in result.log if e["table"] == "promotions" and e["step"] == "drop exact duplicate rows"
    )
    kept = len(result.processed["promotions"]) + repeats
    done = [m for m in heard if "under its contract" in m]
    assert done == [  # the transactions are under their contract once their last basket range is checked
        *(f"{t}: {rows[t]:,} rows, under its contract" for t in rows if t not in ("transactions", "promotions")),
        f"transactions: {rows['transactions']:,} rows, under its contract",
        f"promotions: {rows['promotions']:,} rows read, {kept:,} kept, under its contract",
    ]
    parts = [
        m.split(":")[0]
        for m in heard
        if m.split(":")[0] in ("processing", "promotions", "checking the delivered tables")
    ]
    assert parts[0] == "processing" and parts[-1] == "checking the delivered tables"


def test_pseudonyms_are_stable_across_runs_and_differ_under_another_key(acquired, slice_dirs, tmp_path):
    first, second = acquired["csv"][0].processed["contacts"], acquired["sqlite"][0].processed["contacts"]
    pd.testing.assert_frame_equal(first, second)
    other = acquire(
        files_source("csv", slice_dirs), tmp_path / "raw", 0, SEED, b"another key", chunk_rows=50_000
    ).processed["contacts"]
    assert (other.household_id.to_numpy() == first.household_id.to_numpy()).all()
    assert not set(other.contact_key) & set(first.contact_key)


def test_missing_key_falls_back_to_the_development_key_loudly():
    with pytest.warns(DevelopmentKeyWarning, match="CONTACT_PSEUDONYM_KEY is not set"):
        key, is_default = pseudonym_key({"CONTACT_PSEUDONYM_KEY": ""})
    assert is_default and key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pseudonym_key({"CONTACT_PSEUDONYM_KEY": "secret"}) == (b"secret", False)


# ---------------------------------------------------------------- bad input: one table at a time


def ingest_written(tmp_path, table, frame, fmt="parquet", text=None, **kw):
    """Write `frame` (or raw `text`) as the only file of a fresh source folder and ingest it."""
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    path = folder / f"{table}.{fmt}"
    if text is not None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    csv = {name: kw.pop(name) for name in ("csv_delimiter", "csv_encoding") if name in kw}
    return ingest_table(files_source(folder, **csv), table, CONTRACTS, **kw)


def expect_error(tmp_path, table, frame, message, **kw):
    with pytest.raises(ContractError) as err:
        ingest_written(tmp_path, table, frame, **kw)
    assert message in str(err.value), str(err.value)
    return err.value


@pytest.fixture(scope="module")
def small(package_tables):
    return {
        "transactions": package_tables["transactions"].head(200).copy(),
        "demographics": package_tables["demographics"].head(100).copy(),
        "campaign_descriptions": package_tables["campaign_descriptions"].copy(),
        "products": package_tables["products"].head(300).copy(),
    }


def test_good_tables_ingest_from_parquet_and_csv(tmp_path, small):
    for fmt in ("parquet", "csv"):
        frame, card, notes = ingest_written(tmp_path, "transactions", small["transactions"], fmt)
        pd.testing.assert_frame_equal(frame, small["transactions"])
        assert card.passed.all() and not notes["dropped_columns"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop(columns="quantity"), "transactions.quantity: rule required_column failed for 1 of 1"),
        (lambda f: f.rename(columns={"quantity": "qty"}), "transactions.qty: rule unexpected_column"),
        (
            lambda f: f.assign(loyalty_tier="gold"),
            "transactions.loyalty_tier: rule unexpected_column failed for 1 of 1",
        ),
        (
            lambda f: f.assign(quantity=f.quantity.astype(str)),
            "transactions.quantity: rule dtype failed for 200 of 200",
        ),
        (
            lambda f: f.assign(transaction_timestamp=f.transaction_timestamp.astype(str)),
            "transactions.transaction_timestamp: rule dtype failed for 200 of 200",
        ),
        (
            lambda f: f.assign(sales_value=f.sales_value.mask(f.index < 3)),
            "transactions.sales_value: rule not_null failed for 3 of 200",
        ),
        (
            lambda f: f.assign(retail_disc=f.retail_disc.mask(f.index < 2, np.inf)),
            "transactions.retail_disc: rule finite failed for 2 of 200",
        ),
        (
            lambda f: f.assign(quantity=f.quantity.mask(f.index < 4, -1)),
            "transactions.quantity: rule range failed for 4 of 200",
        ),
        (
            lambda f: f.assign(
                transaction_timestamp=f.transaction_timestamp.mask(f.index < 1, pd.Timestamp("2031-05-01"))
            ),
            "transactions.transaction_timestamp: rule range failed for 1 of 200",
        ),
        (
            lambda f: pd.concat([f, f.head(2).assign(quantity=99)]),
            "transactions.basket_id+product_id: rule unique_key failed for 2 of 202",
        ),
        (lambda f: pd.concat([f] + [f.head(20)] * 2), "transactions.*: rule distinct_rows failed for 40 of 240"),
        (lambda f: f.iloc[:0], "transactions.*: rule non_empty failed"),
    ],
)
def test_each_bad_transactions_table_gets_its_specific_error(tmp_path, small, change, message):
    expect_error(tmp_path, "transactions", change(small["transactions"]), message)


def test_bad_categories_and_missing_values_are_named(tmp_path, small):
    dem = small["demographics"]
    expect_error(
        tmp_path,
        "demographics",
        dem.assign(income=dem.income.mask(dem.index < 2, "1M+")),
        "demographics.income: rule categories failed for 2 of 100",
    )
    expect_error(
        tmp_path,
        "demographics",
        dem.assign(age=dem.age.mask(dem.index < 1)),
        "demographics.age: rule not_null failed for 1 of 100",
    )
    expect_error(
        tmp_path,
        "demographics",
        dem.assign(marital_status=None),
        "demographics.marital_status: rule completeness failed for 100 of 100",
    )


def test_a_few_exact_duplicate_rows_are_dropped_and_counted(tmp_path, acquired, small):
    frame, card, _ = ingest_written(
        tmp_path, "transactions", pd.concat([small["transactions"], small["transactions"].head(3)])
    )
    assert card.set_index("rule").loc["distinct_rows", "failed"] == 3 and len(frame) == 203
    result = acquired["csv"][0]  # the CSV slice, whose coupons hold repeated rows
    coupons = next(e for e in result.log if e["table"] == "coupons" and e["step"] == "drop exact duplicate rows")
    assert coupons["count"] > 0 and not result.processed["coupons"].duplicated().any()


def test_extra_columns_can_be_dropped_by_policy(tmp_path, small):
    frame, _, notes = ingest_written(
        tmp_path, "transactions", small["transactions"].assign(loyalty_tier="gold"), extra_columns="drop"
    )
    assert notes["dropped_columns"] == ["loyalty_tier"] and "loyalty_tier" not in frame


def test_a_single_row_is_accepted(tmp_path, small):
    frame, card, _ = ingest_written(tmp_path, "campaign_descriptions", small["campaign_descriptions"].head(1))
    assert len(frame) == 1 and card.passed.all()


def csv_text(frame, sep=","):
    return frame.to_csv(index=False, sep=sep)


def test_csv_traps(tmp_path, small):
    cd = small["campaign_descriptions"]
    # a byte-order mark is ignored
    frame, _, _ = ingest_written(tmp_path, "campaign_descriptions", None, "csv", text="\ufeff" + csv_text(cd))
    pd.testing.assert_frame_equal(frame, cd)
    # another delimiter: a specific error, and it reads once the delimiter is declared
    expect_error(
        tmp_path,
        "campaign_descriptions",
        None,
        "campaign_descriptions.*: rule csv_delimiter",
        fmt="csv",
        text=csv_text(cd, ";"),
    )
    frame, _, _ = ingest_written(
        tmp_path, "campaign_descriptions", None, "csv", text=csv_text(cd, ";"), csv_delimiter=";"
    )
    pd.testing.assert_frame_equal(frame, cd)
    # leading-zero ids are the integers they stand for, and are counted
    padded = csv_text(cd.assign(campaign_id=cd.campaign_id.map(lambda i: f"{i:05d}")))
    frame, _, notes = ingest_written(tmp_path, "campaign_descriptions", None, "csv", text=padded)
    assert frame.campaign_id.tolist() == cd.campaign_id.tolist() and notes["leading_zero_ids"] == {
        "campaign_id": len(cd)
    }
    # a literal "NA" is text: an error in a numeric or categorical column, kept as is in free text; and an id beyond
    # int64 is no int64 (it is not wrapped around to a negative number)
    for bad_id in ("NA", str(2**63)):
        expect_error(
            tmp_path,
            "campaign_descriptions",
            None,
            "campaign_descriptions.campaign_id: rule dtype failed for 1 of 27",
            fmt="csv",
            text=csv_text(cd.astype({"campaign_id": object}).assign(campaign_id=[bad_id, *cd.campaign_id[1:]])),
        )
    expect_error(
        tmp_path,
        "campaign_descriptions",
        None,
        "campaign_descriptions.campaign_type: rule categories failed for 1 of 27",
        fmt="csv",
        text=csv_text(cd.assign(campaign_type=["NA", *cd.campaign_type[1:]])),
    )
    # a value holding the delimiter, unquoted: pandas would silently drop the fields beyond the header; an error naming
    # the row, in whichever chunk it comes
    lines = csv_text(small["products"]).splitlines(keepends=True)
    for inserted, where in ((",Private,", "data row 250 has more fields than the header's 7"), (",A, B,", "line 251")):
        text = "".join([*lines[:250], lines[250].replace(",", inserted, 1), *lines[251:]])
        err = expect_error(
            tmp_path, "products", None, "products.*: rule csv_fields", fmt="csv", text=text, chunk_rows=100
        )
        assert where in str(err) and "a value holding the delimiter must be quoted" in str(err), str(err)
    products = small["products"].assign(package_size=["NA", *small["products"].package_size[1:]])
    frame, _, _ = ingest_written(tmp_path, "products", None, "csv", text=csv_text(products))
    assert (
        frame.package_size.iloc[0] == "NA"
        and frame.package_size.isna().sum() == small["products"].package_size[1:].isna().sum()
    )


def test_empty_files_are_errors(tmp_path, small):
    cd = small["campaign_descriptions"]
    expect_error(
        tmp_path,
        "campaign_descriptions",
        None,
        "campaign_descriptions.*: rule non_empty",
        fmt="csv",
        text=csv_text(cd.iloc[:0]),
    )
    expect_error(tmp_path, "campaign_descriptions", None, "is empty, not even a header", fmt="csv", text="")
    expect_error(tmp_path, "campaign_descriptions", cd.iloc[:0], "campaign_descriptions.*: rule non_empty")


def test_a_truncated_or_empty_parquet_file_is_named_with_its_table_and_the_fix(tmp_path, small):
    whole = io.BytesIO()
    small["campaign_descriptions"].to_parquet(whole, index=False)
    for data in (whole.getvalue()[: len(whole.getvalue()) // 2], b""):
        err = expect_error(
            tmp_path, "campaign_descriptions", None, "campaign_descriptions.*: rule readable_parquet", text=data
        )
        assert "campaign_descriptions.parquet is not a readable parquet file" in str(err)
        assert "replace it with a complete copy" in str(err)


def test_a_csv_in_another_encoding_names_the_file_and_the_setting_that_reads_it(tmp_path, small):
    products = small["products"].assign(package_size=["5 \u00bd OZ", *small["products"].package_size[1:]])
    latin1 = csv_text(products).encode("latin-1")
    err = expect_error(tmp_path, "products", None, "products.*: rule csv_encoding", fmt="csv", text=latin1)
    assert "products.csv is not utf-8-sig text" in str(err) and "set data_acquisition.source.csv_encoding" in str(err)
    frame, _, _ = ingest_written(tmp_path, "products", None, "csv", text=latin1, csv_encoding="latin-1")
    assert frame.package_size.iloc[0] == "5 \u00bd OZ"


def test_a_table_missing_from_the_source_is_named(tmp_path, slice_dirs):
    with pytest.raises(ContractError, match="demographics.*: rule table_present"):
        ingest_table(sql_source(f"sqlite:///{tmp_path / 'empty.db'}"), "demographics", CONTRACTS)
    with pytest.raises(ContractError, match="transactions.*: rule table_present"):
        ingest_table(files_source("csv/demographics.csv", slice_dirs), "transactions", CONTRACTS)


def test_sql_queries_replace_whole_tables(slice_dirs):
    query = "SELECT household_id, campaign_id FROM campaigns WHERE campaign_id = 18"
    frame, _, _ = ingest_table(
        sql_source(f"sqlite:///{slice_dirs / 'slice.db'}", {"campaigns": query}), "campaigns", CONTRACTS
    )
    assert len(frame) and (frame.campaign_id == 18).all() and list(frame.columns) == ["campaign_id", "household_id"]


def test_the_source_fingerprint_changes_with_the_data_and_only_with_it(slice_dirs, tmp_path):
    db = tmp_path / "source.db"
    db.write_bytes((slice_dirs / "slice.db").read_bytes())
    source = sql_source(f"sqlite:///{db}")
    before = source_fingerprint(source)
    assert before == source_fingerprint(source)  # unchanged data, the same fingerprint
    assert before["tables"]["campaigns"]["rows"] > 0 and before["tables"]["transactions"]["latest"]
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM campaigns WHERE rowid = (SELECT MIN(rowid) FROM campaigns)")
    after = source_fingerprint(source)
    assert after["tables"]["campaigns"]["rows"] == before["tables"]["campaigns"]["rows"] - 1
    files = source_fingerprint(files_source("csv", slice_dirs))
    assert files["tables"]["coupons"]["file"] == "coupons.csv" and len(files["tables"]["coupons"]["sha256"]) == 64
    assert str(slice_dirs) not in json.dumps(files)  # the same files give the same fingerprint on any machine


def test_a_table_as_a_folder_of_parquet_parts_reads_as_the_same_table(slice_dirs, tmp_path):
    one_file = files_source("parquet", slice_dirs)
    whole = pd.read_parquet(one_file.files["transactions"])
    folder = tmp_path / "parts/transactions"
    folder.mkdir(parents=True)
    for i, rows in enumerate(np.array_split(np.arange(len(whole)), 3)):
        whole.iloc[rows].to_parquet(folder / f"part-{i:05d}.parquet", index=False)
    (folder / "_SUCCESS").touch()  # what Spark leaves beside its parts
    parts = files_source(tmp_path / "parts")
    expected, expected_card, expected_notes = ingest_table(one_file, "transactions", CONTRACTS, chunk_rows=5_000)
    frame, card, notes = ingest_table(parts, "transactions", CONTRACTS, chunk_rows=5_000)
    pd.testing.assert_frame_equal(frame, expected)
    pd.testing.assert_frame_equal(card, expected_card)
    assert notes == expected_notes and source_fingerprint(parts)["tables"]["transactions"]["parts"] == 3
    whole.head(5).drop(columns="week").to_parquet(folder / "part-00003.parquet", index=False)
    with pytest.raises(ContractError, match="same_columns_in_every_part.*part-00003.parquet and part-00000.parquet"):
        ingest_table(parts, "transactions", CONTRACTS)
    (folder / "part-00003.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ContractError, match="part-00003.parquet is not a readable parquet file"):
        ingest_table(parts, "transactions", CONTRACTS)


def test_acquisition_depends_on_a_fingerprint_of_the_source_taken_at_every_repro():
    stages = pipeline_stages(Path(__file__).parents[1])
    fingerprint = stages["data/dvc.yaml:source_fingerprint"]
    assert fingerprint["always_changed"] is True
    out = next(iter(fingerprint["outs"][0]))
    assert out in stages["data_acquisition"]["deps"]


FINGERPRINT_IMPORTS = """
import sys
from lib.core import project_root
from lib.sources import resolve_source, source_fingerprint, source_params

root = project_root()
assert source_fingerprint(resolve_source(source_params(root / "params.yaml"), root, {}))["tables"]
print(" ".join(sorted(m for m in ("numpy", "pandas", "pyarrow", "sqlalchemy") if m in sys.modules)))
"""


def test_the_fingerprint_taken_at_every_repro_loads_no_data_library():
    """A no-op `dvc repro` still runs `source-fingerprint`: reading the params and hashing the package's files must not
    import numpy, pandas, pyarrow or SQLAlchemy (each import is tens of milliseconds of every no-op repro)."""
    loaded = run([sys.executable, "-c", FINGERPRINT_IMPORTS], Path(__file__).parents[1]).stdout.split()
    assert loaded == [], f"the fingerprint of the package source imported {loaded}"


# ---------------------------------------------------------------- end to end through DVC


def use_source(project, tables, contacts=None, params_changes=None):
    """Put `tables` (and `contacts`) into the copy's `source/` folder and point the params at it."""
    folder = project / "source"
    folder.mkdir()
    for name, frame in tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    if contacts is not None:
        contacts.to_parquet(folder / "contacts.parquet", index=False)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data_acquisition"]["source"].update(kind="files", path="source")
    params["data_acquisition"].update(params_changes or {})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_outputs_text(project):
    """Every output of the stage except the raw snapshot: text files as text, parquet files as their string values."""
    for path in sorted(
        p for d in ("data", "reports", "metrics", "plots") for p in (project / d).rglob("*") if p.is_file()
    ):
        if "raw" in path.relative_to(project).parts:
            continue
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
            yield (
                path,
                " ".join(frame[c].astype(str).str.cat(sep=" ") for c in frame.columns if frame[c].dtype == object),
            )
        else:
            yield path, path.read_text(errors="replace")
    yield project / "dvc.lock", (project / "dvc.lock").read_text()


@pytest.mark.pipeline
def test_stage_delivers_and_no_contact_detail_leaves_raw(project_copy, slice_tables):
    contacts = generate_contacts(slice_tables["transactions"].household_id, SEED)
    contacts.loc[0, list(CANARY)] = list(CANARY.values())
    use_source(project_copy, slice_tables, contacts)
    run(["dvc", "repro", "data_acquisition"], project_copy, env={"CONTACT_PSEUDONYM_KEY": ""})
    raw = pd.read_parquet(project_copy / "data/raw/contacts.parquet")
    assert set(CANARY.values()) <= set(raw.iloc[0].astype(str))  # the canary went in
    checked = 0
    for path, text in stage_outputs_text(project_copy):
        for value in CANARY.values():
            assert value not in text, f"raw contact value found in {path.relative_to(project_copy)}"
            assert value.split()[-1].split("@")[0] not in text, (
                f"part of a raw contact value found in {path.relative_to(project_copy)}"
            )
        checked += 1
    assert checked > 20
    processed = load_processed(project_copy)
    assert set(processed) == set(PROCESSED_TABLES)
    for table, frame in processed.items():
        check_contract(table, frame, PROCESSED_CONTRACTS)
    catalog = json.loads((project_copy / "data/catalog.json").read_text())
    entry = catalog["tables"]["contacts"]
    assert {c["name"]: c["pii"] for c in entry["lineage"]["raw"][0]["schema"]}["email"] == "direct"
    assert entry["rows"] == len(processed["contacts"]) and entry["sha256"] == file_sha256(
        project_copy / "data/processed/contacts.parquet"
    )
    assert not catalog["contacts_generated"]
    quality = json.loads((project_copy / "metrics/data_quality.json").read_text())
    baseline = json.loads((project_copy / "metrics/baseline_kpis.json").read_text())
    assert quality["rules_failed"] == 0 and 0.9 < quality["quality_score"] <= 1
    assert {
        "store_visit_rate_14d",
        "store_visit_rate_14d_comparison",
        "visit_uplift_14d",
        "redemption_rate",
        "offer_precision",
    } <= set(baseline)
    assert all(isinstance(v, (int, float)) for v in {**quality, **baseline}.values())
    page = (project_copy / "reports/html/02_data_acquisition.html").read_text()
    for section in (
        "Data catalog",
        "Data quality scorecard",
        "Cleansing and standardization",
        "Baseline KPIs",
        "Development key in use",
    ):
        assert section in page
    assert "Traceback" not in page and "acquire(" not in page
    profiles = project_copy / "reports/profiles/data_acquisition"
    assert {p.stem for p in profiles.glob("*.html")} >= {
        "transactions",
        "demographics",
        "campaigns",
        "coupons",
        "coupon_redemptions",
        "contacts",
    }


@pytest.mark.pipeline
def test_bad_source_data_stops_the_stage_before_any_delivery(project_copy, slice_tables):
    bad = dict(slice_tables)
    bad["campaign_descriptions"] = bad["campaign_descriptions"].assign(
        end_date=lambda f: f.end_date.mask(f.index == 0, pd.Timestamp("2031-01-01"))
    )
    use_source(project_copy, bad)
    proc = run(["dvc", "repro", "data_acquisition"], project_copy, check=False)
    assert proc.returncode != 0
    assert "stage 'data_acquisition' failed" in proc.stderr
    assert "campaign_descriptions.end_date: rule range failed for 1 of 27" in proc.stderr
    assert not (project_copy / "data/processed").exists() and not (project_copy / "metrics/baseline_kpis.json").exists()
    lock = (
        yaml.safe_load((project_copy / "dvc.lock").read_text())
        if (project_copy / "dvc.lock").exists()
        else {"stages": {}}
    )
    assert "data_acquisition" not in lock["stages"]


@pytest.mark.pipeline
def test_a_changed_source_file_reruns_acquisition_and_an_unchanged_one_does_not(project_copy, slice_tables):
    use_source(project_copy, slice_tables)
    run(["dvc", "repro", "data_acquisition"], project_copy)
    again = run(["dvc", "repro", "data_acquisition"], project_copy)
    assert "Stage 'data_acquisition' didn't change, skipping" in again.stdout
    delivered = project_copy / "source/coupons.parquet"
    delivered.write_bytes(delivered.read_bytes()[:100])  # a new delivery, cut short
    proc = run(["dvc", "repro", "data_acquisition"], project_copy, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "coupons.parquet is not a readable parquet file" in proc.stderr


def _mixed_frame(seed, rows=400) -> pd.DataFrame:
    "Few distinct values per column (many ties and repeats), missing ones in every kind of column but the integers."
    rng = np.random.default_rng(seed)
    pick = lambda values: [values[i] for i in rng.integers(0, len(values), rows)]  # noqa: E731
    return pd.DataFrame(
        {
            "store": rng.integers(-3, 3, rows),
            "upc": rng.integers(0, 3, rows) * 2**40,  # ranges too wide to pack beside the others
            "band": pd.Categorical(pick(["b", "a", None]), categories=["b", "a"]),
            "price": pick([0.5, -1.25, np.nan]),
            "brand": pick(["Private", "National", None]),
            "day": pd.to_datetime(pick(["2024-01-02", "2023-12-31", None])),
        }
    )


@pytest.mark.parametrize("seed", range(5))
def test_row_codes_sort_and_deduplicate_exactly_as_pandas_does(seed):
    frame = _mixed_frame(seed)
    for key in (None, ["band", "price"], ["day", "upc", "brand"], ["store"]):
        columns = key or list(frame.columns)
        expected = frame.sort_values(columns, kind="stable", ignore_index=True)
        pd.testing.assert_frame_equal(da.sort_by_key(frame.copy(), {"key": key}), expected)
        assert da.duplicated_rows(frame, key).tolist() == frame.duplicated(key).tolist()
