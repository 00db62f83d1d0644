"""One pass over a table that counts every problem per column (``churn data validate``).

Empty cells are missing values, rows with every configured cell empty are dropped and
counted, non-numeric values, unknown levels and bad labels are counted with the first
bad value, so the one-line error names the column, the count and the value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from churnlib.data.features import (
    FeatureSpec,
    _blank_mask,
    encode_categorical,
    encode_target,
    parse_numeric,
)
from churnlib.data.sources import Source, iter_frames, read_raw
from churnlib.errors import DataError, strip_ansi


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
                f"{spec.positive!r} nor {spec.negative!r} (first: {'an empty cell' if first is None else repr(first)})"
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


def empty_rows(df: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
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
    if value is None or (not isinstance(value, str) and bool(pd.isna(value))):
        return None  # an empty cell, however the reader holds it (None, NaN, pd.NA)
    return value.item() if hasattr(value, "item") else value


def batch_stats(df: pd.DataFrame, spec: FeatureSpec, columns: list[str], with_target: bool = True) -> dict[str, Any]:
    """Counts of every problem in one batch of raw records."""
    empty = empty_rows(df, spec)
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


LOCAL_BATCH_ROWS = 65_536


def _collect_local(source: Source, spec: FeatureSpec, columns: list[str], with_target: bool) -> DataReport:
    """The same counts, in this process: the table as ``read_raw(typed=False)`` reads it (numeric
    cells as text, so that every non-numeric cell is counted), batch after batch."""
    report = DataReport()
    for df in iter_frames(source, spec, columns, LOCAL_BATCH_ROWS):
        report.merge(batch_stats(df, spec, columns, with_target))
    return report


def validate(source: Source, spec: FeatureSpec, columns: list[str], with_target: bool = True,
             local: bool = False) -> DataReport:
    """One pass over the data; a DataError (one line) for the first fatal problem.

    ``local``: in this process, without Ray (a small table the caller read here, on a path that
    started no Ray instance: Ray Data would otherwise start one by itself with a plain
    ``ray.init()``, which attaches to whatever cluster this machine has on record, even a dead one)."""
    if local:
        report = _collect_local(source, spec, columns, with_target)
        return _raise_problems(source, spec, report, with_target)
    try:
        report = _collect_stats(read_raw(source, spec, columns), spec, columns, with_target)
    except Exception as exc:  # noqa: BLE001
        if source.format != "csv":
            raise as_data_error(exc, source) from None
        # A typed CSV read fails on the first non-numeric cell; read every
        # column as text to count such cells exactly (or fail for the real reason).
        try:
            report = _collect_stats(read_raw(source, spec, columns, typed=False), spec, columns, with_target)
        except Exception as exc2:  # noqa: BLE001
            raise as_data_error(exc2, source) from None
    return _raise_problems(source, spec, report, with_target)


def _raise_problems(source: Source, spec: FeatureSpec, report: DataReport, with_target: bool) -> DataReport:
    problems = report.problems(spec, with_target)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DataError(f"{source.uri}: {problems[0]}{more}")
    return report


def as_data_error(exc: BaseException, source: Source) -> DataError:
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
        for line in strip_ansi(str(e)).splitlines()
        if line.strip() and not line.startswith((" ", "Traceback", "File ", "To change retry", "Failed to "))
    ]
    specific = next((line for line in lines if "CSV" in line or "Parquet" in line or "rror" in line), None)
    text = specific or (lines[0] if lines else type(exc).__name__)
    return DataError(f"{source.uri}: cannot read the data: {text[:300]}")
