"""Deterministic synthetic churn table in the Kaggle "Customer Churn Dataset" schema.

Ranges follow the public file (Age 18-65, Tenure 1-60, Usage Frequency 1-30,
Support Calls 0-10, Payment Delay 0-30, Total Spend 100-1000, Last Interaction
1-30, three subscription types, three contract lengths). Churn is drawn from
a logistic model whose log-odds are 3.5 times this score, with
s = Support Calls and d = Payment Delay:

    -0.4
    + 0.35 * max(s - 3, 0)                 more calls than usual, rising
    + 1.0  * [s >= 7]                       ... with a jump for very unhappy customers
    + 0.09 * max(d - 12, 0)                 late payers, past a grace period
    + 1.3  * [Monthly] - 0.7 * [Annual]     contract length
    - 0.045 * min(Tenure, 30)               loyalty saturates after 30 months
    + 0.9  * [Basic and Usage Frequency < 8]  low usage of a basic plan
    - 0.0012 * (Total Spend - 550)          big spenders stay
    + 0.0009 * (Age - 42) ** 2              the young and the old leave more
    + 0.5  * [Last Interaction > 20] * [s >= 4]  unresolved, then silence
    + 0.25 * [Female and Premium]           a small interaction

so a model must learn thresholds and interactions, not one linear score. The
churn rate is about 45%; the true log-odds rank customers with an AUC of about
0.96 and label them (at P = 0.5) with an accuracy of about 0.89, so a good
model clears the default gates (accuracy 0.85, ROC AUC 0.80) and a careless
one does not. Rows are generated in chunks of ``CHUNK`` rows, chunk
``k`` from seed (seed, k), so memory stays bounded and the same (rows, seed)
always gives the same table, whatever the output format.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from churnlib.errors import DataError

CHUNK = 250_000
COLUMNS = [
    "CustomerID",
    "Age",
    "Gender",
    "Tenure",
    "Usage Frequency",
    "Support Calls",
    "Payment Delay",
    "Subscription Type",
    "Contract Length",
    "Total Spend",
    "Last Interaction",
    "Churn",
]


def churn_logit(df: pd.DataFrame) -> np.ndarray:
    """The documented log-odds of churn for raw records (see module docstring)."""
    s = df["Support Calls"].to_numpy(dtype=float)
    d = df["Payment Delay"].to_numpy(dtype=float)
    contract = df["Contract Length"].to_numpy(dtype=object)
    sub = df["Subscription Type"].to_numpy(dtype=object)
    gender = df["Gender"].to_numpy(dtype=object)
    return 3.5 * (
        -0.4
        + 0.35 * np.maximum(s - 3, 0)
        + 1.0 * (s >= 7)
        + 0.09 * np.maximum(d - 12, 0)
        + 1.3 * (contract == "Monthly")
        - 0.7 * (contract == "Annual")
        - 0.045 * np.minimum(df["Tenure"].to_numpy(dtype=float), 30)
        + 0.9 * ((sub == "Basic") & (df["Usage Frequency"].to_numpy(dtype=float) < 8))
        - 0.0012 * (df["Total Spend"].to_numpy(dtype=float) - 550)
        + 0.0009 * (df["Age"].to_numpy(dtype=float) - 42) ** 2
        + 0.5 * ((df["Last Interaction"].to_numpy(dtype=float) > 20) & (s >= 4))
        + 0.25 * ((gender == "Female") & (sub == "Premium"))
    )


def _chunk(start: int, n: int, seed: int, index: int) -> pd.DataFrame:
    rng = np.random.default_rng([seed, index])
    df = pd.DataFrame(
        {
            "CustomerID": np.arange(start + 1, start + n + 1, dtype=np.int64),
            "Age": rng.integers(18, 66, n),
            "Gender": rng.choice(np.array(["Female", "Male"], dtype=object), n, p=[0.53, 0.47]),
            "Tenure": rng.integers(1, 61, n),
            "Usage Frequency": rng.integers(1, 31, n),
            "Support Calls": np.minimum(rng.poisson(3.2, n), 10),
            "Payment Delay": rng.integers(0, 31, n),
            "Subscription Type": rng.choice(np.array(["Basic", "Standard", "Premium"], dtype=object), n),
            "Contract Length": rng.choice(
                np.array(["Monthly", "Quarterly", "Annual"], dtype=object), n, p=[0.34, 0.33, 0.33]
            ),
            "Total Spend": rng.integers(100, 1001, n),
            "Last Interaction": rng.integers(1, 31, n),
        }
    )
    p = 1.0 / (1.0 + np.exp(-churn_logit(df)))
    df["Churn"] = (rng.random(n) < p).astype(np.int64)
    for col in ("Gender", "Subscription Type", "Contract Length"):
        df[col] = df[col].astype(str)
    return df[COLUMNS]


def iter_chunks(rows: int, seed: int = 7, chunk_rows: int = CHUNK) -> Iterator[pd.DataFrame]:
    """The synthetic table as DataFrames of at most ``chunk_rows`` rows."""
    if rows < 1:
        raise DataError(f"--rows must be at least 1 (got {rows})")
    done, index = 0, 0
    while done < rows:
        n = min(chunk_rows, rows - done)
        yield _chunk(done, n, seed, index)
        done += n
        index += 1


def generate(rows: int, out: str | os.PathLike, seed: int = 7) -> Path:
    """Write the table to ``out`` (.csv or .parquet), atomically.

    The file appears under its name only when complete: it is written to a
    temporary file in the same folder and renamed.
    """
    path = Path(out)
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(f"output must end in .csv or .parquet: {path}")
    if path.exists() and path.is_dir():
        raise DataError(f"output is a folder: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if suffix == ".csv":
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                for i, chunk in enumerate(iter_chunks(rows, seed)):
                    chunk.to_csv(fh, index=False, header=(i == 0))
        else:
            writer = None
            try:
                for chunk in iter_chunks(rows, seed):
                    table = pa.Table.from_pandas(chunk, preserve_index=False)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
