"""Where a table is and how it is read: CSV or Parquet, a file or a folder, local or ``s3://``.

``resolve_source`` finds the files and their digest (the same table gives the same
digest wherever it lives); ``check_columns`` names a missing or duplicated column, or
a file separated by something else than commas, in one line; ``read_raw`` reads the
configured columns into a Ray Dataset, ``read_local`` the same columns, types and
nulls into one Arrow table in this process (small tables).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from churnlib.data.features import FeatureSpec
from churnlib.errors import DataError, first_line

if TYPE_CHECKING:
    import pandas as pd

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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a local path or an ``s3://`` URI (``AWS_ENDPOINT_URL`` honoured)."""
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
    fs, root = filesystem(str(uri))
    try:
        info = fs.get_file_info(root)
    except OSError as exc:
        raise DataError(f"cannot reach {uri}: {first_line(exc)}") from None
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


def require_columns(source: Source, wanted: list[str], what: str) -> None:
    """Raise a DataError naming the first file that lacks one of ``wanted`` (``what`` says what for)."""
    for path in source.files:
        try:
            header = _header(source, path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: cannot read it as {source.format}: {first_line(exc)}") from None
        absent = [c for c in wanted if c not in header]
        if absent:
            raise DataError(f"{path}: missing column(s) {', '.join(map(repr, absent))} ({what})"
                            f"{_delimiter_hint(source, header)}")


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
            raise DataError(f"{path}: cannot read it as {source.format}: {first_line(exc)}") from None
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


def _csv_convert(spec: FeatureSpec, columns: list[str], typed: bool):
    import pyarrow.csv as pacsv

    types = {c: pa.string() for c in columns}
    if typed:
        types.update({c: pa.float64() for c in spec.numeric})
        # the id keeps its inferred type, so a CSV and a Parquet copy of one
        # table split their rows the same way (integer ids hash as integers)
        types.pop(spec.id_column, None)
    return pacsv.ConvertOptions(
        column_types=types, include_columns=columns, null_values=CSV_NULLS, strings_can_be_null=True
    )


def read_local(source: Source, spec: FeatureSpec, columns: list[str]) -> pa.Table:
    """Read the configured columns in this process, as ``read_raw`` reads them (the same
    types, nulls and column order), file after file: for tables small enough that a Ray Data
    pass (an executor, read tasks in new worker processes) costs more than the read."""
    if source.format == "parquet":
        import pyarrow.parquet as pq

        tables = [pq.read_table(path, columns=columns, filesystem=source.filesystem) for path in source.files]
    else:
        import pyarrow.csv as pacsv

        convert = _csv_convert(spec, columns, typed=True)
        tables = []
        for path in source.files:
            with source.filesystem.open_input_stream(path, compression="detect") as stream:
                tables.append(pacsv.read_csv(stream, convert_options=convert))
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def iter_frames(source: Source, spec: FeatureSpec, columns: list[str], batch_size: int) -> Iterator[pd.DataFrame]:
    """The table's rows as pandas frames of at most ``batch_size`` rows, file after file, as
    ``read_raw(typed=False)`` reads them (the same columns, types and nulls): Parquet by
    row-group batches, CSV by pyarrow's streaming reader (numeric cells as text: a
    non-numeric cell is one rejected row). A file that cannot be read is one ``DataError``
    naming it."""
    import pyarrow as pa

    convert = _csv_convert(spec, columns, typed=False) if source.format != "parquet" else None
    for path in source.files:
        try:
            pending: list[Any] = []
            rows = 0
            for batch in _file_batches(source, path, columns, batch_size, convert):
                pending.append(batch)
                rows += batch.num_rows
                while rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, batch_size).to_pandas()
                    rest = table.slice(batch_size)
                    pending, rows = rest.to_batches(), rest.num_rows
            if rows:
                yield pa.Table.from_batches(pending).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            name = path.rsplit("/", 1)[-1]
            line = " ".join(str(exc).split())
            raise DataError(f"{source.uri}: cannot read the data: {name}: {line[:300]}") from None


def _file_batches(source: Source, path: str, columns: list[str], batch_size: int, convert: Any) -> Iterator[Any]:
    if convert is None:
        import pyarrow.parquet as pq

        with source.filesystem.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)
        return
    import pyarrow.csv as pacsv

    with source.filesystem.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream, convert_options=convert)
        for batch in reader:
            yield batch.select(columns)


def read_raw(source: Source, spec: FeatureSpec, columns: list[str], typed: bool = True):
    """Read the configured columns into a Ray Dataset.

    CSV numeric columns are read as float64 (fast, and the same type in every
    block and file); ``typed=False`` reads them as text, which validation uses
    to count non-numeric cells exactly when the typed read fails.
    """
    import ray.data

    if source.format == "parquet":
        return ray.data.read_parquet(source.files, filesystem=source.filesystem).select_columns(columns)
    return ray.data.read_csv(source.files, filesystem=source.filesystem,
                             convert_options=_csv_convert(spec, columns, typed))
