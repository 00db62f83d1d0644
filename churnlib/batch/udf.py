"""The scoring UDF of `churn predict`, the same on both engines (``scoring.engine``): a batch of
raw records -> the output rows (typed Arrow), the rejected rows written with their reasons,
the counts and drift counts sent to a tally (an actor's, or the one task's own)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import pandas as pd

from churnlib.data.preparation import ROW_EMPTY, ROW_PROBLEM, id_text
from churnlib.data.profiles import batch_counts, merge_counts
from churnlib.decision.value import Decision, expected_value
from churnlib.model.explain import top_reasons
from churnlib.model.scoring import BatchScorer


class _Tally:
    """A zero-CPU actor summing what the scoring actors report: counts and drift counts."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {"rows": 0, "scored": 0, "rejected": 0, "empty": 0}
        self.drift: list[dict[str, Any]] = []

    def add(self, counts: dict[str, int], drift: dict[str, Any] | None) -> None:
        for key, value in counts.items():
            self.totals[key] = self.totals.get(key, 0) + value
        if drift is not None:
            self.drift.append(drift)
            if len(self.drift) > 64:  # keep the list short: merge as we go

                self.drift = [merge_counts(self.drift)]

    def progress(self) -> dict[str, int]:
        return dict(self.totals)

    def result(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        return dict(self.totals), self.drift


class PredictUDF(BatchScorer):
    """Scores a batch; returns the scored rows, writes the rejected ones, reports counts."""

    def __init__(self, payloads: list[dict[str, Any]], columns: list[str], tally: Any, rejects_fs: Any,
                 rejects_dir: str, explain_top: int = 0, drift: bool = True, nthread: int = 1,
                 id_type: str = "string", decision: Decision | None = None, contact_threshold: float = math.inf):
        # integer ids go to the output as integers: their text only for the rejects (see _text)
        super().__init__(payloads, columns, with_target=False, keep_features=True, nthread=nthread,
                         text_ids=id_type != "int64")
        self.decision = decision
        self.contact_threshold = contact_threshold
        self.id_type = id_type  # the input's: "int64" or "string" (the output keeps it)
        self.nthread = nthread
        self.tally = tally
        self.rejects_fs, self.rejects_dir = rejects_fs, rejects_dir
        self.explain_top = explain_top
        self.drift = drift and self.models[0].profile is not None
        model = self.models[0]
        self.model_name = str(model.meta.get("registered_name") or model.meta.get("model_name") or "churn")
        self.model_version = str(model.meta.get("version") or model.meta.get("run_id", "")[:12])

    def __call__(self, df: pd.DataFrame) -> Any:  # a pyarrow.Table
        import pyarrow as pa

        out = super().__call__(df)
        ok = out["flags"] == 0
        ids_out = self._ids(df, out, ok)
        ok = out["flags"] == 0
        n_ok = int(ok.sum())
        if not ok.all():
            self._write_rejects(df, out, ~ok)
        model = self.models[0]
        proba = out["score"][ok].astype(np.float64)
        label = proba >= model.threshold
        contact = proba >= self.contact_threshold
        # An Arrow table, typed here: Ray Data would otherwise infer the type of
        # every Python string in object columns, which costs as much as scoring.
        columns: dict[str, pa.Array] = {
            "customer_id": ids_out.filter(pa.array(ok)),
            "churn_probability": pa.array(proba),
            "churn_label": pa.array(label.astype(np.int8)),
        }
        value = None
        if self.decision is not None:
            value = expected_value(proba, self.decision)
            columns["expected_value"] = pa.array(value)
            columns["contact"] = pa.array(contact)
        columns["model_name"] = pa.repeat(pa.scalar(self.model_name, pa.string()), n_ok)
        columns["model_version"] = pa.repeat(pa.scalar(self.model_version, pa.string()), n_ok)
        if self.explain_top:
            reasons: list[list[dict[str, Any]]] = []
            if n_ok:
                expl = model.explain(out["X"][ok], "tree", nthread=self.nthread)
                reasons = top_reasons(expl, model.spec, k=self.explain_top)
            for k in range(self.explain_top):
                columns[f"reason_{k + 1}"] = pa.array(
                    [f"{r[k]['feature']}={_shown(r[k]['value'])} ({r[k]['contribution']:+.3f})" if k < len(r) else ""
                     for r in reasons], type=pa.string())
        counts = {"rows": int(len(df)), "scored": n_ok, "rejected": int((~ok).sum()),
                  "empty": int((out["flags"] == ROW_EMPTY).sum())}
        if value is not None:
            counts["contacts"] = int(contact.sum())
            counts["contact_value"] = float(value[contact].sum())
        drift = batch_counts(out["X"][ok], model.profile, model.spec) if self.drift and n_ok else None
        add = self.tally.add  # an actor's method (Ray Data's pool), or a plain one (the one-task engine)
        (add.remote if hasattr(add, "remote") else add)(counts, drift)
        return pa.table(columns)

    def _ids(self, df: pd.DataFrame, out: dict[str, np.ndarray], ok: np.ndarray) -> Any:
        """The customer ids as the input typed them (integers stay integers, for joins); a
        non-integer id in an integer column makes its row a reject."""
        import pyarrow as pa

        column = df[self.spec.id_column] if self.spec.id_column in df.columns else None
        if self.id_type == "int64" and column is not None and pd.api.types.is_integer_dtype(column.dtype):
            missing = column.isna().to_numpy()  # integers already: no text
            values = column.to_numpy(dtype=np.int64, na_value=0)
            return pa.array(values, type=pa.int64(), mask=missing if missing.any() else None)
        text = self._text(df, out)
        if self.id_type != "int64":
            return pa.array(text, type=pa.string())
        given = text != ""
        numbers = pd.to_numeric(pd.Series(text, dtype=object).where(given), errors="coerce").to_numpy(dtype=np.float64)
        bad = ok & given & (np.isnan(numbers) | (numbers != np.round(numbers)))
        for i in np.flatnonzero(bad):
            out["reason"][i] = f"customer id {text[i]!r} is not an integer, as the rest of the column is"
        out["flags"][bad] = ROW_PROBLEM
        usable = given & ~bad
        return pa.array(np.where(usable, numbers, 0).astype(np.int64), type=pa.int64(), mask=~usable)

    def _text(self, df: pd.DataFrame, out: dict[str, np.ndarray]) -> np.ndarray:
        """The ids as text ('' where there is none), made once per batch."""
        if "row_id" not in out:
            out["row_id"] = (id_text(df[self.spec.id_column]) if self.spec.id_column in df.columns
                             else np.full(len(df), "", dtype=object))
        return out["row_id"]

    def _write_rejects(self, df: pd.DataFrame, out: dict[str, np.ndarray], bad: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = df[bad]
        records = [json.dumps({k: (None if pd.isna(v) else v) for k, v in r.items()}, default=str)
                   for r in rows.to_dict("records")]
        table = pa.table({
            "customer_id": [str(v) for v in self._text(df, out)[bad]],
            "reason": [str(v) for v in out["reason"][bad]],
            "record": records,
        })
        # named by content: a retried batch rewrites the same file instead of adding a copy
        digest = hashlib.sha256("\n".join(records).encode()).hexdigest()[:20]
        with self.rejects_fs.open_output_stream(f"{self.rejects_dir}/part-{digest}.parquet") as f:
            pq.write_table(table, f)


def _shown(value: Any) -> str:
    """A reason's raw value as a person reads it: 101.45, not float32's 101.44999694824219."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
