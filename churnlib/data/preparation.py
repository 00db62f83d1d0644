"""A validated table -> the encoded model matrix, split into train and validation, in one pass.

One Ray Data pass, or, for a small table (``LOCAL_PREPARE_MAX_BYTES``), the same
steps in the driver, handed to Ray as one block: the same rows, encoding and split.

``prepare`` reads (``data.sources``), encodes (``data.features``) and checks every
row in one pass; when a row has a problem, ``data.validation`` reads the raw data
again (error path only) to name the column, the count and the first bad value.
The train/validation split is a seeded hash of the id column (``row_uniform``), so
it does not depend on block boundaries, file order or the number of workers; ids
hash by their value whatever their type in a block (``canonical_ids``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from churnlib.data.features import FeatureSpec, encode_columns, encode_target
from churnlib.data.profiles import build_profile, profile_from_dataset
from churnlib.data.sources import CSV_NULLS, Source, read_local, read_raw
from churnlib.data.validation import DataReport, as_data_error, empty_rows, validate
from churnlib.errors import DataError

ROW_EMPTY = 1  # every configured cell empty: dropped, counted


ROW_PROBLEM = 2  # a non-numeric value, unknown level or bad label: fails validation


# Tables up to this size (on disk) are read, encoded and checked in the driver and handed to
# Ray as one materialized block: a Ray Data pass costs an executor and read tasks in new
# worker processes (seconds on a laptop), more than reading a few megabytes. Bigger tables,
# and streaming (training.materialize: false), take the Ray Data pass.
LOCAL_PREPARE_MAX_BYTES = 64 * 1024 * 1024


def reads_locally(source: Source, scoring_engine: str) -> bool:
    """Whether `churn evaluate` and `churn data validate` read ``source`` in their own process:
    a small table (as `churn train` reads it) unless ``scoring.engine`` asks for Ray Data. Starting
    Ray and a Ray Data pass cost more than reading a few megabytes."""
    return scoring_engine != "ray_data" and source.size_bytes <= LOCAL_PREPARE_MAX_BYTES


def canonical_ids(ids: pd.Series) -> pd.Series:
    """Ids as the split hashes them: integers as int64, whatever the column's dtype in this
    block (an empty cell turns a block's integer ids into floats: 17.0 is still 17), anything
    else by its text. So one customer hashes the same in every block, file and format."""
    values = ids
    if pd.api.types.is_bool_dtype(values.dtype):
        return values.astype("string").fillna("")
    if pd.api.types.is_integer_dtype(values.dtype):
        # numpy, nullable (Int64) and Arrow-backed integers alike; a missing id hashes as 0
        return pd.Series(values.to_numpy(dtype=np.int64, na_value=0), index=ids.index)
    if pd.api.types.is_float_dtype(values.dtype):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
        known = ~np.isnan(arr)
        if np.array_equal(arr[known], np.round(arr[known])) and (np.abs(arr[known]) < 2**63).all():
            return pd.Series(np.where(known, arr, 0).astype(np.int64), index=ids.index)
    return values.astype("string").fillna("")


def id_text(ids: pd.Series) -> np.ndarray:
    """Ids as text for outputs and messages ('' for a missing one); 17.0 in a float block is '17'."""
    missing = ids.isna().to_numpy()
    text = canonical_ids(ids).astype("string").fillna("").to_numpy(dtype=object)
    text[missing] = ""
    return text


def id_arrow_type(source: Source, column: str) -> pa.DataType:
    """The type a table's id column has (int64 for any integer type, else string), from the first
    file: Parquet's schema, or what pyarrow infers from the first block of a CSV file."""
    path = source.files[0]
    if source.format == "parquet":
        import pyarrow.parquet as pq

        kind = pq.read_schema(path, filesystem=source.filesystem).field(column).type
    else:
        import pyarrow.csv as pacsv

        with source.filesystem.open_input_stream(path, compression="detect") as stream:
            reader = pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(
                include_columns=[column], null_values=CSV_NULLS, strings_can_be_null=True))
            kind = reader.schema.field(column).type
    return pa.int64() if pa.types.is_integer(kind) else pa.string()


def row_uniform(df: pd.DataFrame, spec: FeatureSpec, columns: list[str], seed: int) -> np.ndarray:
    """A seeded pseudo-uniform number in [0, 1) per row, from the id (or the whole row).

    The same row gets the same number in any block, file order or worker
    count: the train/validation split and evaluation's explanation sample
    are thresholds on it.
    """
    if spec.id_column and spec.id_column in df.columns:
        key = canonical_ids(df[spec.id_column])
    else:
        key = df[columns]
    h = pd.util.hash_pandas_object(key, index=False).to_numpy()
    # pandas seeds only its string hashing; mix the seed in for every key type
    mixed = pd.util.hash_array(np.array([seed], dtype=np.uint64))[0]
    h = pd.util.hash_array(h ^ mixed)
    return (h % np.uint64(1_000_000)).astype(np.float64) / 1_000_000


def split_mask(df: pd.DataFrame, spec: FeatureSpec, columns: list[str], validation_split: float, random_state: int) -> np.ndarray:
    """True for validation rows: a seeded hash of the id (or of the whole row), so
    the split depends on neither block boundaries, file order nor worker count."""
    return row_uniform(df, spec, columns, random_state) < validation_split


def encode_batch(
    df: pd.DataFrame, spec: FeatureSpec, columns: list[str], validation_split: float, random_state: int
) -> dict[str, np.ndarray]:
    """Raw batch -> {"X", "y", "is_valid", "flags"}; never raises on bad values.

    ``flags`` marks empty rows (ROW_EMPTY) and rows with a bad value or label
    (ROW_PROBLEM), so one pass both encodes and validates; training uses only
    rows whose flags are 0.
    """
    empty = empty_rows(df, spec)
    X, bad, _ = encode_columns(df, spec)
    y, invalid = encode_target(df[spec.target], spec)
    flags = np.where(empty, ROW_EMPTY, np.where(bad.any(axis=1) | invalid, ROW_PROBLEM, 0)).astype(np.uint8)
    is_valid = split_mask(df, spec, columns, validation_split, random_state)
    return {"X": X, "y": y, "is_valid": is_valid, "flags": flags}


def _summary_udf(batch: dict[str, np.ndarray], n_features: int) -> pd.DataFrame:
    flags, y, X, valid = batch["flags"], batch["y"], batch["X"], batch["is_valid"]
    ok = flags == 0
    missing = np.isnan(X[ok]).sum(axis=0) if len(X) else np.zeros(n_features, dtype=np.int64)
    out = {
        "rows": len(flags),
        "empty": int((flags == ROW_EMPTY).sum()),
        "problems": int((flags == ROW_PROBLEM).sum()),
        "positives": int((ok & (y == 1)).sum()),
        "negatives": int((ok & (y == 0)).sum()),
        "train": int((ok & ~valid).sum()),
        "valid": int((ok & valid).sum()),
        "missing": [int(v) for v in missing],
    }
    return pd.DataFrame({"summary": [json.dumps(out)]})


def _to_dataset(batch: dict[str, np.ndarray]) -> Any:
    """Encoded arrays as a materialized Ray Dataset (one block in Ray's object store)."""
    import ray.data
    from ray.data.block import BlockAccessor

    return ray.data.from_arrow(BlockAccessor.batch_to_block(batch))


@dataclass
class Prepared:
    """The encoded table (``X``, ``y``, ``is_valid``, ``flags``) and what validation found."""

    dataset: Any  # ray.data.Dataset; None for a table kept in this process (prepare(ray_dataset=False))
    report: DataReport
    train_rows: int
    valid_rows: int
    local: dict[str, np.ndarray] | None = None  # the encoded table, when prepared in the driver

    def ray_dataset(self) -> Any:
        """The encoded table as a Ray Dataset (Ray Train's workers read their shards from it):
        made from the driver's copy on first use when it was prepared without one (one block in
        Ray's object store; 0.9 s for 100,000 rows that only Ray Train needs)."""
        if self.dataset is None and self.local is not None:
            self.dataset = _to_dataset(self.local)
        return self.dataset

    def profile(self, spec: FeatureSpec, max_rows: int, seed: int = 0) -> dict[str, Any]:
        """The training profile (the drift reference) of a seeded sample of the usable rows: from
        the driver's copy when the table was prepared here, else from the dataset."""
        if self.local is None:
            return profile_from_dataset(self.dataset, spec, max_rows, seed=seed)
        X, flags = self.local["X"], self.local["flags"]
        total = len(flags)
        if total > max_rows:
            keep = np.random.default_rng(seed).random(total) < max_rows / total
            X, flags = X[keep], flags[keep]
        return build_profile(X[flags == 0][:max_rows], spec, rows_total=total)


def prepare(
    source: Source,
    spec: FeatureSpec,
    columns: list[str],
    validation_split: float,
    random_state: int,
    materialize: bool = True,
    ray_dataset: bool = True,
    before_ray: Callable[[], Any] | None = None,
) -> Prepared:
    """Read, encode and validate in one pass; a DataError for the first fatal problem.

    The encoded table is kept in Ray's object store by default, so training
    reads it from memory. When a row has a bad value, the raw data is read
    again (error path only) to name the column, the count and the first value.

    ``ray_dataset=False``: a small table read here stays in this process (``Prepared.dataset``
    None, for boosting in this process); ``before_ray`` is called before the first use of Ray
    (a table too large, or one that does not read cleanly here: the Ray Data pass names its
    problem), to connect to or start Ray only then.
    """
    if materialize and source.size_bytes <= LOCAL_PREPARE_MAX_BYTES:
        local = _prepare_local(source, spec, columns, validation_split, random_state, ray_dataset)
        if local is not None:
            encoded, rows, batch = local
            return _checked(source, spec, columns, encoded, rows, batch, before_ray)
    if before_ray is not None:
        before_ray()
    encoded = read_raw(source, spec, columns).map_batches(
        encode_batch,
        batch_format="pandas",
        batch_size=None,
        fn_kwargs={
            "spec": spec,
            "columns": columns,
            "validation_split": validation_split,
            "random_state": random_state,
        },
    )
    try:
        if materialize:
            encoded = encoded.materialize()
        rows = encoded.map_batches(
            _summary_udf, batch_format="numpy", batch_size=None, fn_kwargs={"n_features": len(spec.feature_names)}
        ).take_all()
    except Exception as exc:  # noqa: BLE001
        if source.format == "csv":
            validate(source, spec, columns)  # counts non-numeric cells (text read) and raises
        raise as_data_error(exc, source) from None
    return _checked(source, spec, columns, encoded, rows)


def _prepare_local(source: Source, spec: FeatureSpec, columns: list[str], validation_split: float,
                   random_state: int, ray_dataset: bool = True,
                   ) -> tuple[Any, list[dict[str, Any]], dict[str, np.ndarray]] | None:
    """A small table: read, encode and summarise in this process, then (``ray_dataset``) one
    materialized dataset (one block in Ray's object store) -> (dataset or None, summary rows,
    the encoded arrays); None when the table does not read cleanly here, so that the Ray Data
    pass reads it again and reports the problem as it always does."""
    try:
        df = read_local(source, spec, columns).to_pandas()
        batch = encode_batch(df, spec, columns, validation_split, random_state)
    except Exception:  # noqa: BLE001 - any problem: the usual path finds it and names it
        return None
    rows = _summary_udf(batch, len(spec.feature_names)).to_dict("records")
    if not ray_dataset:
        return None, rows, batch
    return _to_dataset(batch), rows, batch


def _checked(source: Source, spec: FeatureSpec, columns: list[str], encoded: Any,
             rows: list[dict[str, Any]], local: dict[str, np.ndarray] | None = None,
             before_ray: Callable[[], Any] | None = None) -> Prepared:
    """The per-block summaries -> the report; a DataError for the first fatal problem (named by
    ``validate``'s Ray Data pass: ``before_ray`` first)."""
    report = DataReport()
    problems = train_rows = valid_rows = 0
    missing = np.zeros(len(spec.feature_names), dtype=np.int64)
    for row in rows:
        part = json.loads(row["summary"])
        report.rows += part["rows"]
        report.empty_rows += part["empty"]
        report.positives += part["positives"]
        report.negatives += part["negatives"]
        problems += part["problems"]
        train_rows += part["train"]
        valid_rows += part["valid"]
        missing += np.asarray(part["missing"], dtype=np.int64)
    report.missing = {c: int(n) for c, n in zip(spec.feature_names, missing)}
    if problems:
        if before_ray is not None:
            before_ray()
        validate(source, spec, columns)  # names the column, count and first value, and raises
        raise DataError(f"{source.uri}: {problems} row(s) with bad values")
    found = report.problems(spec)
    if found:
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise DataError(f"{source.uri}: {found[0]}{more}")
    if train_rows == 0 or valid_rows == 0:
        raise DataError(
            f"{source.uri}: {report.usable_rows} usable row(s) leave {train_rows} for training and "
            f"{valid_rows} for validation; use more data or change model.validation_split"
        )
    return Prepared(dataset=encoded, report=report, train_rows=train_rows, valid_rows=valid_rows, local=local)
