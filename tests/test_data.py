"""Data: the generator, sources (file, folder, s3://), validation of every bad case, the split.

Validation runs on a real local Ray instance; each user error is one line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pandas as pd
import pytest

from churnlib.config import load_config
from churnlib.data.features import FeatureSpec
from churnlib.data.generation import COLUMNS, churn_logit, generate, iter_chunks
from churnlib.data.preparation import id_text, prepare, split_mask
from churnlib.data.sources import check_columns, resolve_source
from churnlib.data.validation import validate
from churnlib.errors import DataError
from tests.conftest import KAGGLE_TEST, REPO, TELCO, require_shared, run_cli

SPEC = FeatureSpec.from_config(load_config(env={}).features)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# The generator --------------------------------------------------------------


@pytest.mark.unit
def test_generator_is_deterministic(tmp_path):
    a = generate(1200, tmp_path / "a.csv", seed=5)
    b = generate(1200, tmp_path / "b.csv", seed=5)
    c = generate(1200, tmp_path / "c.csv", seed=6)
    assert sha(a) == sha(b) and sha(a) != sha(c)
    df = pd.read_csv(a)
    assert list(df.columns) == COLUMNS and len(df) == 1200
    assert df["CustomerID"].is_unique
    # Parquet holds the same table
    pq = pd.read_parquet(generate(1200, tmp_path / "a.parquet", seed=5))
    pd.testing.assert_frame_equal(pq, df, check_dtype=False)
    # several chunks: ids continue across chunk boundaries, chunk k has its own seed
    multi = pd.concat(list(iter_chunks(25, seed=5, chunk_rows=10)))
    assert multi["CustomerID"].tolist() == list(range(1, 26))
    again = pd.concat(list(iter_chunks(25, seed=5, chunk_rows=10)))
    pd.testing.assert_frame_equal(multi, again)


@pytest.mark.unit
def test_generated_ranges_and_learnable_signal():
    df = next(iter_chunks(50_000, seed=1, chunk_rows=50_000))
    assert df["Age"].between(18, 65).all() and df["Tenure"].between(1, 60).all()
    assert df["Support Calls"].between(0, 10).all() and df["Total Spend"].between(100, 1000).all()
    assert set(df["Contract Length"]) == {"Monthly", "Quarterly", "Annual"}
    assert 0.35 < df["Churn"].mean() < 0.55
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(df["Churn"], churn_logit(df)) > 0.93  # the documented rule explains churn


@pytest.mark.unit
def test_generate_refuses_bad_output_and_leaves_no_partial_file(tmp_path):
    with pytest.raises(DataError, match=".csv or .parquet"):
        generate(10, tmp_path / "out.txt")
    with pytest.raises(DataError, match="at least 1"):
        generate(0, tmp_path / "zero.csv")
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind


@pytest.mark.unit
def test_cli_generate(tmp_path):
    res = run_cli("data", "generate", "--rows", "500", "--out", str(tmp_path / "g.parquet"), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["rows"] == 500
    assert len(pd.read_parquet(tmp_path / "g.parquet")) == 500


# Sources --------------------------------------------------------------------------


@pytest.mark.unit
def test_resolve_file_folder_and_errors(tmp_path):
    generate(100, tmp_path / "one.csv")
    src = resolve_source(str(tmp_path / "one.csv"))
    assert src.format == "csv" and len(src.files) == 1 and len(src.digest) == 16
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    generate(50, folder / "a.parquet", seed=1)
    generate(50, folder / "sub" / "b.parquet", seed=2)
    (folder / "_SUCCESS").write_text("")
    src = resolve_source(str(folder))
    assert src.format == "parquet" and [os.path.basename(f) for f in src.files] == ["a.parquet", "b.parquet"]
    with pytest.raises(DataError, match="not found"):
        resolve_source(str(tmp_path / "missing.csv"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve_source(str(tmp_path / "notes.txt"))
    generate(10, folder / "c.csv")
    with pytest.raises(DataError, match="mixes CSV and Parquet"):
        resolve_source(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .csv or .parquet"):
        resolve_source(str(tmp_path / "empty"))


@pytest.mark.unit
def test_digest_follows_content(tmp_path):
    a = generate(100, tmp_path / "a.csv", seed=1)
    d1 = resolve_source(str(a)).digest
    generate(100, tmp_path / "a.csv", seed=2)
    assert resolve_source(str(a)).digest != d1


# Validation: each bad case -----------------------------------------------------


def _table(tmp_path, name="t.csv", rows=300, seed=4, edit=None):
    df = next(iter_chunks(rows, seed=seed, chunk_rows=rows)).astype(object)
    if edit:
        df = edit(df)
    path = tmp_path / name
    if name.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        # a column mixing numbers and text is a text column in Parquet
        for col in df.columns:
            kinds = {type(v) for v in df[col] if v is not None and v == v}
            if str in kinds and len(kinds) > 1:
                df[col] = df[col].map(lambda v: None if v is None or v != v else str(v))
            elif kinds and kinds <= {int, float, np.int64, np.float64}:
                df[col] = pd.to_numeric(df[col])
        df.to_parquet(path, index=False)
    return path


def _validate(path, spec=SPEC, local=False):
    src = resolve_source(str(path))
    cols = check_columns(src, spec)
    return validate(src, spec, cols, local=local)


def _prepare(path, spec=SPEC):
    src = resolve_source(str(path))
    cols = check_columns(src, spec)
    return prepare(src, spec, cols, 0.2, 42)


def _set(col, rows, value):
    def edit(df):
        df.loc[rows, col] = value
        return df

    return edit


BAD_CASES = [
    ("missing column", lambda df: df.drop(columns=["Tenure"]), r"missing column\(s\) 'Tenure'"),
    ("non-numeric", _set("Age", [5, 17, 250], "forty"), r"'Age': 3 row\(s\) with a non-numeric value \(first: 'forty'\)"),
    ("unknown category", _set("Contract Length", [9, 10], "Weekly"), r"'Contract Length': 2 row\(s\) with an unknown category \(first: 'Weekly'"),
    ("bad label", _set("Churn", [3], "maybe"), r"target 'Churn': 1 row\(s\) with a value that is neither 1 nor 0 \(first: 'maybe'\)"),
    ("empty label", _set("Churn", [3, 4], None), r"target 'Churn': 2 row\(s\) .* \(first: an empty cell\)$"),
    ("single class", _set("Churn", slice(None), 0), r"every row is negative \(300 rows\)"),
    ("header only", lambda df: df.head(0), r"the table has no rows"),
]


@pytest.mark.parametrize(("case", "edit", "pattern"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_each_bad_case_is_one_line(ray_session, tmp_path, case, edit, pattern, fmt):
    path = _table(tmp_path, f"t.{fmt}", edit=edit)
    with pytest.raises(DataError, match=pattern) as err:
        _validate(path)
    assert "\n" not in str(err.value)
    # in the command's own process (a small table evaluated there): the same line
    with pytest.raises(DataError) as here:
        _validate(path, local=True)
    assert str(here.value) == str(err.value)
    # training's one-pass path reports the same problem
    with pytest.raises(DataError, match=pattern):
        _prepare(path)


def test_empty_file(ray_session, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        _validate(path)


def test_blank_cells_are_missing_and_empty_rows_dropped(ray_session, tmp_path):
    def edit(df):
        df.loc[[1, 2, 3], "Total Spend"] = None
        df.loc[4, "Gender"] = None
        for i in (7, 8):  # every cell empty (the full public training file has one such row)
            df.loc[i, :] = None
        return df

    path = _table(tmp_path, edit=edit)
    report = _validate(path)
    assert report.rows == 300 and report.empty_rows == 2 and report.usable_rows == 298
    assert _validate(path, local=True).to_dict() == report.to_dict()
    assert report.missing["Total Spend"] == 3 and report.missing["Gender"] == 1 and report.missing["Age"] == 0
    prepared = _prepare(path)
    assert prepared.report.empty_rows == 2 and prepared.report.missing == report.missing
    assert prepared.train_rows + prepared.valid_rows == 298
    assert prepared.report.positives + prepared.report.negatives == 298


def test_split_is_deterministic_across_files_and_formats(ray_session, tmp_path):
    df = next(iter_chunks(3000, seed=9, chunk_rows=3000))
    df.to_csv(tmp_path / "all.csv", index=False)
    parts = tmp_path / "parts"
    parts.mkdir()
    for i, start in enumerate(range(0, 3000, 1000)):
        df.iloc[start : start + 1000].to_parquet(parts / f"p{i}.parquet", index=False)
    one, three = _prepare(tmp_path / "all.csv"), _prepare(parts)
    assert (one.train_rows, one.valid_rows) == (three.train_rows, three.valid_rows)
    assert abs(one.valid_rows / 3000 - 0.2) < 0.03
    src = resolve_source(str(tmp_path / "all.csv"))
    other_seed = prepare(src, SPEC, check_columns(src, SPEC), 0.2, 7)
    assert other_seed.valid_rows != one.valid_rows or other_seed.train_rows != one.train_rows


def _rows(prepared) -> dict[str, np.ndarray]:
    parts = list(prepared.dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in ("X", "y", "is_valid", "flags")}


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "folder"])
def test_a_small_table_prepared_in_the_driver_equals_the_ray_data_pass(ray_session, tmp_path, monkeypatch, name):
    """Small tables skip the Ray Data pass (read, encode and check in the driver, one block):
    the same rows in the same order, the same encoding, split, flags and report."""
    from churnlib.data import preparation

    def edit(df):
        df.loc[[1, 2, 3], "Total Spend"] = None
        df.loc[4, "Gender"] = None
        df.loc[[7, 8], :] = None  # empty rows: dropped, counted
        return df

    if name == "folder":
        (tmp_path / "folder").mkdir()
        for i in range(3):
            _table(tmp_path / "folder", f"p{i}.csv", rows=400, seed=20 + i, edit=edit)
        path = tmp_path / "folder"
    else:
        path = _table(tmp_path, name, rows=1500, edit=edit)
    local = _prepare(path)
    assert local.dataset.num_blocks() == 1  # no Ray Data pass: one block put from the driver
    monkeypatch.setattr(preparation, "LOCAL_PREPARE_MAX_BYTES", -1)
    passed = _prepare(path)
    assert passed.dataset.num_blocks() >= 1
    assert local.report.to_dict() == passed.report.to_dict()
    assert (local.train_rows, local.valid_rows) == (passed.train_rows, passed.valid_rows)
    a, b = _rows(local), _rows(passed)
    np.testing.assert_array_equal(a["X"], b["X"])  # NaN where missing, in both
    for key in ("y", "is_valid", "flags"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert a["X"].dtype == b["X"].dtype and a["flags"].dtype == b["flags"].dtype
    # the training profile (drift reference) of every usable row: the same from either copy
    assert local.profile(SPEC, 10**6) == passed.profile(SPEC, 10**6)
    sampled = local.profile(SPEC, 500, seed=3)
    assert sampled["rows_total"] == a["flags"].size and 300 < sampled["rows_sampled"] <= 500
    assert sampled == local.profile(SPEC, 500, seed=3)  # seeded


def test_cli_validate_exit_codes(ray_session, tmp_path):
    # a small table is counted in the command's process (Ray's auto-connect off: no Ray at all);
    # scoring.engine=ray_data sends it to Ray Data, with the same answer
    no_ray = {"RAY_ENABLE_AUTO_CONNECT": "0", "RAY_ADDRESS": ""}
    good = _table(tmp_path, "good.csv", edit=_set("Total Spend", [4, 5], None))
    res = run_cli("data", "validate", str(good), "--json", cwd=tmp_path, env=no_ray)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["valid"] and out["rows"] == 300 and out["missing"]["Total Spend"] == 2
    on_ray = run_cli("data", "validate", str(good), "--json", "--set", "scoring.engine=ray_data", cwd=tmp_path,
                     attach=True)
    assert on_ray.returncode == 0 and json.loads(on_ray.stdout) == out, on_ray.stderr
    bad = _table(tmp_path, "bad.csv", edit=_set("Gender", [2], "Other"))
    res = run_cli("data", "validate", str(bad), cwd=tmp_path, env=no_ray)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("error: ") and "'Gender'" in res.stderr and "'Other'" in res.stderr
    on_ray = run_cli("data", "validate", str(bad), "--set", "scoring.engine=ray_data", cwd=tmp_path, attach=True)
    assert on_ray.returncode == 2 and on_ray.stderr == res.stderr
    res = run_cli("data", "validate", str(tmp_path / "nope.csv"), cwd=tmp_path, attach=True)
    assert res.returncode == 2 and "not found" in res.stderr


# Real public tables -------------------------------------------------------------


def test_real_kaggle_test_file_passes(ray_session):
    path = require_shared(KAGGLE_TEST)
    report = _validate(path)
    assert report.rows == 64374 and report.empty_rows == 0
    assert (report.positives, report.negatives) == (30493, 33881)
    assert sum(report.missing.values()) == 0


def test_another_table_is_a_config_not_a_patch(ray_session):
    """The Telco table: other columns, a Yes/No target, blank TotalCharges cells."""
    path = require_shared(TELCO)
    spec = FeatureSpec.from_config(load_config([REPO / "configs" / "telco.yaml"], env={}).features)
    report = _validate(path, spec)
    assert report.rows == 7043 and (report.positives, report.negatives) == (1869, 5174)
    assert report.missing["TotalCharges"] == 11 and sum(report.missing.values()) == 11
    prepared = _prepare(path, spec)
    assert prepared.train_rows + prepared.valid_rows == 7043


# s3:// through a real S3 API (moto's standalone server) -----------------------------


def test_reads_csv_from_s3(ray_session, s3_endpoint, tmp_path, monkeypatch):
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="churn-data")
    for i, seed in enumerate((1, 2)):
        local = _table(tmp_path, f"part{i}.csv", rows=200, seed=seed)
        s3.upload_file(str(local), "churn-data", f"tables/part{i}.csv")
    src = resolve_source("s3://churn-data/tables/")
    assert src.format == "csv" and len(src.files) == 2
    report = validate(src, SPEC, check_columns(src, SPEC))
    assert report.rows == 400
    with pytest.raises(DataError, match="not found"):
        resolve_source("s3://churn-data/nothing-here.csv")


def test_cli_validate_scoring_input_without_target(ray_session, tmp_path):
    path = _table(tmp_path, "score.csv", edit=lambda df: df.drop(columns=["Churn"]))
    res = run_cli("data", "validate", str(path), cwd=tmp_path, attach=True)
    assert res.returncode == 2 and "missing column(s) 'Churn'" in res.stderr
    res = run_cli("data", "validate", str(path), "--no-target", "--json", cwd=tmp_path, attach=True)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rows"] == 300 and out["positives"] == 0 and out["negatives"] == 0


@pytest.mark.unit
def test_id_column_is_optional_but_read_only_when_every_file_has_it(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    _table(folder, "a.csv", rows=50, seed=1)
    _table(folder, "b.csv", rows=50, seed=2, edit=lambda df: df.drop(columns=["CustomerID"]))
    src = resolve_source(str(folder))
    assert "CustomerID" not in check_columns(src, SPEC)
    src_a = resolve_source(str(folder / "a.csv"))
    assert check_columns(src_a, SPEC)[0] == "CustomerID"


@pytest.mark.unit
def test_evaluate_and_validate_read_a_table_in_their_process_only_when_small_and_not_sent_to_ray_data(tmp_path, monkeypatch):
    from churnlib.data import preparation
    from churnlib.data.preparation import reads_locally

    src = resolve_source(str(_table(tmp_path, "small.csv", rows=200, seed=3)))
    assert reads_locally(src, "auto") and reads_locally(src, "task")
    assert not reads_locally(src, "ray_data")  # the user asked for Ray Data
    monkeypatch.setattr(preparation, "LOCAL_PREPARE_MAX_BYTES", src.size_bytes - 1)
    assert not reads_locally(src, "auto")  # one byte over: Ray Data's pass


# Edge cases of real tables (no Ray needed) ----------------------------------------------------------------


@pytest.mark.unit
def test_a_duplicated_header_column_is_refused(tmp_path):
    """Issue: the first copy was used silently."""
    df = next(iter_chunks(50, seed=1, chunk_rows=50))
    text = df.assign(Age2=df["Age"] + 1).to_csv(index=False).replace("Age2", "Age", 1)
    (tmp_path / "dup.csv").write_text(text)
    with pytest.raises(DataError, match=r"dup.csv: column\(s\) 'Age' appear more than once in the header"):
        check_columns(resolve_source(str(tmp_path / "dup.csv")), SPEC)
    res = run_cli("data", "validate", str(tmp_path / "dup.csv"), cwd=tmp_path)
    assert res.returncode == 2 and "appear more than once" in res.stderr


@pytest.mark.unit
@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_a_file_with_another_separator_says_so(tmp_path, sep, name):
    path = tmp_path / "other.csv"
    next(iter_chunks(50, seed=1, chunk_rows=50)).to_csv(path, index=False, sep=sep)
    with pytest.raises(DataError, match=f"the file looks {name}-separated, and churn reads comma-separated CSV"):
        check_columns(resolve_source(str(path)), SPEC)


@pytest.mark.unit
def test_an_empty_cell_in_the_id_column_moves_no_customer_across_the_split():
    """Issue: one all-empty row turned a block's integer ids into floats, and 32 % of the
    customers changed sides between training and validation."""
    df = next(iter_chunks(3000, seed=4, chunk_rows=3000))
    columns = ["CustomerID", *SPEC.feature_names, "Churn"]
    clean = split_mask(df, SPEC, columns, 0.2, 42)
    holed = pd.concat([df.astype(object), pd.DataFrame([{c: None for c in df.columns}])], ignore_index=True)
    holed["CustomerID"] = pd.to_numeric(holed["CustomerID"])  # float64 with a NaN, as a reader makes it
    assert holed["CustomerID"].dtype.kind == "f"
    assert (split_mask(holed, SPEC, columns, 0.2, 42)[:-1] == clean).all()
    # and the same id as text, or as another integer type, lands on the same side
    as_text = df.assign(CustomerID=df["CustomerID"].astype(str))
    assert (split_mask(df.assign(CustomerID=df["CustomerID"].astype("uint32")), SPEC, columns, 0.2, 42)
            == clean).all()
    assert id_text(holed["CustomerID"])[0] == str(df["CustomerID"].iloc[0])
    assert id_text(holed["CustomerID"])[-1] == ""
    assert 0.15 < split_mask(as_text, SPEC, columns, 0.2, 42).mean() < 0.25
