"""Raw tables -> validated Ray Datasets.

``resolve_source`` finds the files (CSV or Parquet; a file or a folder; local or
``s3://``) and their digest. ``read_raw`` reads them into a Ray Dataset of the
configured columns. ``validate`` makes one pass over it and counts every
problem per column; ``prepare`` turns it into the model matrix and splits it
into train and validation by a seeded hash of the id column, so the split does
not depend on block boundaries, file order or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from churnlib.errors import DataError
from churnlib.features import FeatureSpec, _blank_mask, encode_categorical, encode_target, parse_numeric

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
PARQUET_SUFFIXES = (".parquet", ".pq")
# Cells read as null in CSV files (pyarrow's defaults plus a lone space, which
# the public Telco file uses for "no value").
CSV_NULLS = ["", " ", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
             "1.#QNAN", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"]


@dataclass
class Source:
    """The files behind a data path."""

    uri: str
    format: str  # "csv" | "parquet"
    files: list[str]
    filesystem: Any = field(repr=False)
    size_bytes: int
    digest: str

    @property
    def name(self) -> str:
        return os.path.basename(self.uri.rstrip("/")) or self.uri


def _s3_endpoint() -> str | None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if uri.startswith("s3://"):
        endpoint = _s3_endpoint()
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host or endpoint, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        # Ray Data reads in other processes (other nodes, on a cluster) that may
        # not share this environment: credentials given here travel with the
        # filesystem object. Without them, each reader uses its own (an IAM role).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
            if os.environ.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        fs = pafs.S3FileSystem(**kwargs)
        return fs, uri[len("s3://") :]
    if "://" in uri and not uri.startswith("file://"):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(f"cannot read {uri}: {exc}") from None
    local = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


def _kind(path: str) -> str | None:
    low = path.lower()
    if low.endswith(CSV_SUFFIXES):
        return "csv"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def resolve_source(uri: str) -> Source:
    """Find the data files at ``uri`` and fingerprint them.

    A folder may hold CSV or Parquet files (searched recursively, hidden files
    and ``_SUCCESS``-style markers skipped) but not both.
    """
    fs, root = _filesystem(str(uri))
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise DataError(f"cannot reach {uri}: {str(exc).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data path not found: {uri}")
    if info.type == pafs.FileType.Directory:
        infos = [
            i
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
        ]
        kinds = {_kind(i.path) for i in infos} - {None}
        if not kinds:
            raise DataError(f"no .csv or .parquet files in {uri}")
        if len(kinds) > 1:
            raise DataError(f"{uri} mixes CSV and Parquet files; point at one kind")
        fmt = kinds.pop()
        infos = sorted((i for i in infos if _kind(i.path) == fmt), key=lambda i: i.path)
    else:
        fmt = _kind(info.path)
        if fmt is None:
            raise DataError(f"unsupported file type (want .csv or .parquet): {uri}")
        infos = [info]
    size = sum(i.size or 0 for i in infos)
    return Source(
        uri=str(uri),
        format=fmt,
        files=[i.path for i in infos],
        filesystem=fs,
        size_bytes=size,
        digest=_digest(fs, infos, root),
    )


def _digest(fs: pafs.FileSystem, infos: list[pafs.FileInfo], root: str) -> str:
    """sha256 of the files' content (local), or of their names, sizes and mtimes (remote)."""
    h = hashlib.sha256()
    local = isinstance(fs, pafs.LocalFileSystem)
    for info in infos:
        h.update(os.path.relpath(info.path, root).encode() if info.path != root else b"")
        if local:
            with open(info.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{info.size}:{info.mtime_ns}".encode())
    return h.hexdigest()[:16]


def _header(source: Source, path: str) -> list[str]:
    if source.format == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path, filesystem=source.filesystem).names)
    import pyarrow.csv as pacsv

    with source.filesystem.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(column_types={}))
        return list(reader.schema.names)


def _delimiter_hint(source: Source, header: list[str]) -> str:
    """When a CSV header came out as one column holding another separator: say so."""
    if source.format != "csv" or len(header) != 1:
        return ""
    for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
        if sep in header[0]:
            return (f"; the header is one column ({header[0][:60]!r}...): the file looks {name}-separated, and churn "
                    f"reads comma-separated CSV (save it with commas, or as Parquet)")
    return ""


def check_columns(source: Source, spec: FeatureSpec, need_target: bool = True) -> list[str]:
    """Raise a DataError naming the configured columns a file lacks; return the columns to read."""
    wanted = spec.feature_names + ([spec.target] if need_target else [])
    id_everywhere = bool(spec.id_column)
    for path in source.files:
        try:
            header = _header(source, path)
        except (pa.ArrowInvalid, OSError) as exc:
            if "Empty CSV file" in str(exc):
                raise DataError(f"{path}: the file is empty (no header, no rows)") from None
            raise DataError(f"{path}: cannot read it as {source.format}: {str(exc).splitlines()[0]}") from None
        have = set(header)
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise DataError(f"{path}: column(s) {', '.join(map(repr, twice))} appear more than once in the header; "
                            "which copy is meant is ambiguous")
        absent = [c for c in wanted if c not in have]
        if absent:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, absent))}{_delimiter_hint(source, header)}")
        id_everywhere = id_everywhere and spec.id_column in have
    # The id is optional: read it (for the split and for outputs) only when every file has it.
    return ([spec.id_column] if id_everywhere else []) + wanted


def read_raw(source: Source, spec: FeatureSpec, columns: list[str], typed: bool = True):
    """Read the configured columns into a Ray Dataset.

    CSV numeric columns are read as float64 (fast, and the same type in every
    block and file); ``typed=False`` reads them as text, which validation uses
    to count non-numeric cells exactly when the typed read fails.
    """
    import ray.data

    if source.format == "parquet":
        return ray.data.read_parquet(source.files, filesystem=source.filesystem).select_columns(columns)
    import pyarrow.csv as pacsv

    types = {c: pa.string() for c in columns}
    if typed:
        types.update({c: pa.float64() for c in spec.numeric})
        # the id keeps its inferred type, so a CSV and a Parquet copy of one
        # table split their rows the same way (integer ids hash as integers)
        types.pop(spec.id_column, None)
    convert = pacsv.ConvertOptions(
        column_types=types, include_columns=columns, null_values=CSV_NULLS, strings_can_be_null=True
    )
    return ray.data.read_csv(source.files, filesystem=source.filesystem, convert_options=convert)


# Validation --------------------------------------------------------------------


@dataclass
class DataReport:
    """What one validation pass found."""

    rows: int = 0
    empty_rows: int = 0
    positives: int = 0
    negatives: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    non_numeric: dict[str, list] = field(default_factory=dict)  # col -> [count, first value]
    unknown: dict[str, list] = field(default_factory=dict)  # col -> [count, first value]
    bad_labels: list = field(default_factory=lambda: [0, None])

    @property
    def usable_rows(self) -> int:
        return self.rows - self.empty_rows

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usable_rows"] = self.usable_rows
        return d

    def problems(self, spec: FeatureSpec, with_target: bool = True) -> list[str]:
        """Fatal problems, each one line naming the column and a row count."""
        out = []
        if self.usable_rows == 0:
            out.append("the table has no rows" if self.rows == 0 else f"all {self.rows} rows are empty")
            return out
        for col, (n, first) in self.non_numeric.items():
            if n:
                out.append(f"column {col!r}: {n} row(s) with a non-numeric value (first: {first!r})")
        for col, (n, first) in self.unknown.items():
            if n:
                levels = ", ".join(spec.levels(col))
                out.append(f"column {col!r}: {n} row(s) with an unknown category (first: {first!r}; allowed: {levels})")
        if not with_target:
            return out
        n, first = self.bad_labels
        if n:
            out.append(
                f"target {spec.target!r}: {n} row(s) with a value that is neither "
                f"{spec.positive!r} nor {spec.negative!r} (first: {first!r})"
            )
        if not out and (self.positives == 0 or self.negatives == 0):
            only = "positive" if self.positives else "negative"
            out.append(f"target {spec.target!r}: every row is {only} ({self.usable_rows} rows): one class cannot train a classifier")
        return out

    def merge(self, other: dict[str, Any]) -> None:
        self.rows += other["rows"]
        self.empty_rows += other["empty_rows"]
        self.positives += other["positives"]
        self.negatives += other["negatives"]
        for col, n in other["missing"].items():
            self.missing[col] = self.missing.get(col, 0) + n
        for attr in ("non_numeric", "unknown"):
            mine = getattr(self, attr)
            for col, (n, first) in other[attr].items():
                cur = mine.setdefault(col, [0, None])
                cur[0] += n
                if cur[1] is None:
                    cur[1] = first
        self.bad_labels[0] += other["bad_labels"][0]
        if self.bad_labels[1] is None:
            self.bad_labels[1] = other["bad_labels"][1]


def _empty_rows(df: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    """Rows whose features and target are all empty (an id alone does not make a row)."""
    mask = np.ones(len(df), dtype=bool)
    for col in spec.feature_names + ([spec.target] if spec.target in df.columns else []):
        mask &= _blank_mask(df[col])
        if not mask.any():
            break
    return mask


def _first(series: pd.Series, mask: np.ndarray) -> Any:
    idx = np.flatnonzero(mask)
    if not len(idx):
        return None
    value = series.iloc[idx[0]]
    return value.item() if hasattr(value, "item") else value


def batch_stats(df: pd.DataFrame, spec: FeatureSpec, columns: list[str], with_target: bool = True) -> dict[str, Any]:
    """Counts of every problem in one batch of raw records."""
    empty = _empty_rows(df, spec)
    keep = ~empty
    stats: dict[str, Any] = {
        "rows": int(len(df)),
        "empty_rows": int(empty.sum()),
        "missing": {},
        "non_numeric": {},
        "unknown": {},
        "positives": 0,
        "negatives": 0,
        "bad_labels": [0, None],
    }
    for col in spec.numeric:
        _, missing, bad = parse_numeric(df[col])
        stats["missing"][col] = int((missing & keep).sum())
        stats["non_numeric"][col] = [int((bad & keep).sum()), _first(df[col], bad & keep)]
    for col, levels in spec.categorical:
        _, missing, unknown = encode_categorical(df[col], levels)
        stats["missing"][col] = int((missing & keep).sum())
        stats["unknown"][col] = [int((unknown & keep).sum()), _first(df[col], unknown & keep)]
    if with_target:
        labels, invalid = encode_target(df[spec.target], spec)
        stats["positives"] = int(((labels == 1) & keep).sum())
        stats["negatives"] = int(((labels == 0) & keep).sum())
        stats["bad_labels"] = [int((invalid & keep).sum()), _first(df[spec.target], invalid & keep)]
    return stats


def _stats_udf(df: pd.DataFrame, spec: FeatureSpec, columns: list[str], with_target: bool) -> pd.DataFrame:
    return pd.DataFrame({"stats": [json.dumps(batch_stats(df, spec, columns, with_target), default=str)]})


def _collect_stats(ds, spec: FeatureSpec, columns: list[str], with_target: bool) -> DataReport:
    rows = ds.map_batches(
        _stats_udf,
        batch_format="pandas",
        batch_size=None,
        fn_kwargs={"spec": spec, "columns": columns, "with_target": with_target},
        zero_copy_batch=True,
    ).take_all()
    report = DataReport()
    for row in rows:
        report.merge(json.loads(row["stats"]))
    return report


def validate(source: Source, spec: FeatureSpec, columns: list[str], with_target: bool = True) -> DataReport:
    """One pass over the data; a DataError (one line) for the first fatal problem."""
    try:
        report = _collect_stats(read_raw(source, spec, columns), spec, columns, with_target)
    except Exception as exc:  # noqa: BLE001
        if source.format != "csv":
            raise _as_data_error(exc, source) from None
        # A typed CSV read fails on the first non-numeric cell; read every
        # column as text to count such cells exactly (or fail for the real reason).
        try:
            report = _collect_stats(read_raw(source, spec, columns, typed=False), spec, columns, with_target)
        except Exception as exc2:  # noqa: BLE001
            raise _as_data_error(exc2, source) from None
    problems = report.problems(spec, with_target)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(f"{source.uri}: {problems[0]}{more}")
    return report


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _as_data_error(exc: BaseException, source: Source) -> DataError:
    """The most specific line of a (possibly Ray-wrapped) read error."""
    chain, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    lines = [
        line.strip()
        for e in reversed(chain)
        for line in _ANSI.sub("", str(e)).splitlines()
        if line.strip() and not line.startswith((" ", "Traceback", "File ", "To change retry", "Failed to "))
    ]
    specific = next((line for line in lines if "CSV" in line or "Parquet" in line or "rror" in line), None)
    text = specific or (lines[0] if lines else type(exc).__name__)
    return DataError(f"{source.uri}: cannot read the data: {text[:300]}")


# Preparation ------------------------------------------------------------------

ROW_EMPTY = 1  # every configured cell empty: dropped, counted
ROW_PROBLEM = 2  # a non-numeric value, unknown level or bad label: fails validation


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
    from churnlib.features import encode_columns

    empty = _empty_rows(df, spec)
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


@dataclass
class Prepared:
    """The encoded table (``X``, ``y``, ``is_valid``, ``flags``) and what validation found."""

    dataset: Any  # ray.data.Dataset
    report: DataReport
    train_rows: int
    valid_rows: int


def prepare(
    source: Source,
    spec: FeatureSpec,
    columns: list[str],
    validation_split: float,
    random_state: int,
    materialize: bool = True,
) -> Prepared:
    """Read, encode and validate in one pass; a DataError for the first fatal problem.

    The encoded table is kept in Ray's object store by default, so training
    reads it from memory. When a row has a bad value, the raw data is read
    again (error path only) to name the column, the count and the first value.
    """
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
        raise _as_data_error(exc, source) from None
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
    return Prepared(dataset=encoded, report=report, train_rows=train_rows, valid_rows=valid_rows)
