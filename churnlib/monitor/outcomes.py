"""``churn outcomes load``: what became of the customers, into the prediction log.

A CSV or Parquet file with the customer id (``features.id_column``), the outcome
(``monitoring.outcome_column``, default the target's column, spelled as the
target: ``1``/``0``, ``Yes``/``No``, ...) and when it was observed
(``monitoring.observed_at_column``, ISO 8601; a time without a zone is UTC).

Every row is checked before anything is written: a missing id, an outcome that
is neither class, a time that does not parse are rejected with their reason and
counted; the good rows go in one transaction. Loading is idempotent: a
(customer, observed_at) already in the log is skipped, so loading a file twice
changes nothing. A missing file or column is one line, exit 2, nothing written.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from churnlib.console import say as default_say
from churnlib.data.features import FeatureSpec, encode_target
from churnlib.data.preparation import id_text
from churnlib.data.sources import require_columns, resolve_source
from churnlib.errors import DataError, LogStoreError
from churnlib.predlog.store import LogStore

if TYPE_CHECKING:
    from churnlib.config import Config

SHOWN_REJECTS = 1000  # rejects listed in the result (all are counted)


@dataclass
class OutcomesResult:
    """What `churn outcomes load` did."""
    source: str
    rows: int
    loaded: int
    already: int
    rejected: int
    rejects: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "loaded": self.loaded, "already_loaded": self.already,
                "rejected": self.rejected, "rejects": self.rejects, "log": self.log}


def _read(source: Any, columns: list[str]) -> pd.DataFrame:
    frames = []
    for path in source.files:
        if source.format == "parquet":
            with source.filesystem.open_input_file(path) as fh:
                frames.append(pd.read_parquet(fh, columns=columns))
        else:
            with source.filesystem.open_input_stream(path, compression="detect") as fh:
                frames.append(pd.read_csv(fh, usecols=columns, dtype=str, keep_default_na=False, na_values=[""]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _times(values: pd.Series) -> tuple[list[dt.datetime | None], list[bool]]:
    """ISO 8601 dates or times -> UTC datetimes (None and a flag where one does not parse)."""
    out: list[dt.datetime | None] = []
    bad: list[bool] = []
    for v in values.tolist():
        try:
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip()):
                raise ValueError
            t = pd.Timestamp(v)
            if t is pd.NaT:
                raise ValueError
            t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
            out.append(t.to_pydatetime())
            bad.append(False)
        except (ValueError, TypeError):
            out.append(None)
            bad.append(True)
    return out, bad


def load_outcomes(cfg: Config, data_path: str, say: Callable[[str], None] = default_say) -> OutcomesResult:
    """Check every row, then insert the good ones (skipping those already loaded)."""
    spec = FeatureSpec.from_config(cfg.features)
    if not spec.id_column:
        raise DataError("outcomes join predictions by customer id: set features.id_column")
    outcome_col = cfg.monitoring.outcome_column or spec.target
    time_col = cfg.monitoring.observed_at_column
    source = resolve_source(data_path)
    wanted = [spec.id_column, outcome_col, time_col]
    require_columns(source, wanted, "outcomes need the customer id, the outcome and when it was observed")
    df = _read(source, wanted)
    ids = id_text(df[spec.id_column])
    y, bad_outcome = encode_target(df[outcome_col], spec)
    times, bad_time = _times(df[time_col])
    now = dt.datetime.now(dt.timezone.utc)
    rows, rejects = [], []
    for i in range(len(df)):
        reason = None
        if not ids[i]:
            reason = f"no customer id ({spec.id_column!r} is empty)"
        elif bad_outcome[i]:
            reason = (f"{outcome_col!r}: {df[outcome_col].iloc[i]!r} is neither {spec.positive!r} nor "
                      f"{spec.negative!r}")
        elif bad_time[i]:
            reason = f"{time_col!r}: {df[time_col].iloc[i]!r} is not a date or time"
        if reason:
            rejects.append({"row": i + 1, "reason": reason})
            continue
        rows.append({"customer_id": ids[i], "outcome": int(y[i]), "observed_at": times[i], "loaded_at": now,
                     "source": source.uri})
    # the same (customer, observed_at) twice in one file: one row
    unique = list({(r["customer_id"], r["observed_at"]): r for r in rows}.values())
    store = LogStore(cfg.log_uri)
    try:
        store.migrate()
        try:
            loaded = store.insert_outcomes(unique)
        except Exception as exc:  # noqa: BLE001 - the database failed mid-way: one line, nothing committed
            raise LogStoreError(f"prediction log at {store.describe()}: the outcomes were not loaded: "
                                f"{str(exc).splitlines()[0][:300]}") from None
    finally:
        store.close()
    result = OutcomesResult(source.uri, len(df), loaded, len(unique) - loaded, len(rejects), rejects[:SHOWN_REJECTS],
                            store.describe())
    say(f"outcomes: {result.rows} rows in {source.uri}: {result.loaded} loaded, {result.already} already in the log, "
        f"{result.rejected} rejected" + (f" (first: row {rejects[0]['row']}: {rejects[0]['reason']})" if rejects else ""))
    return result
