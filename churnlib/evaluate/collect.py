"""From the scored dataset to the driver: narrow columns streamed and reduced to sums batch by batch.

Only the flags, the label and the scores (5 bytes a row, 4 more per baseline) leave
the object store; the ranking metrics and the paired bootstrap keep the scores. The
scores are a Ray Dataset (``score_dataset``) or, for a small table scored in this
process, the list of its scored batches (``score_local``): both read the same way here.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from churnlib.data.preparation import ROW_EMPTY, ROW_PROBLEM
from churnlib.evaluate.metrics import (
    batch_sums,
    merge_sums,
)


def select_udf(batch: dict[str, np.ndarray], rate: float, min_score: float) -> dict[str, np.ndarray]:
    """Rows of the explanation sample (u < rate) and the highest-risk rows (score >= min_score)."""
    ok = batch["flags"] == 0
    keep = ok & ((batch["u"] < rate) | (batch["score"] >= min_score))
    out = {"X": batch["X"][keep], "score": batch["score"][keep], "u": batch["u"][keep]}
    out["row_id"] = batch["row_id"][keep] if "row_id" in batch else np.full(int(keep.sum()), "", dtype=object)
    return out


def batches(scored: Any, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The scored batches' ``columns``: from a Ray Dataset, or from a list of batches."""
    if isinstance(scored, list):
        return ({c: b[c] for c in columns} for b in scored)
    return scored.select_columns(columns).iter_batches(batch_size=None, batch_format="numpy")


def selected(scored: Any, rate: float, min_score: float) -> dict[str, np.ndarray]:
    """``select_udf``'s rows of every batch, as arrays (X: rows x features)."""
    if isinstance(scored, list):
        parts = [select_udf(b, rate, min_score) for b in scored]
        if not parts or not sum(len(p["score"]) for p in parts):
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    rows = scored.map_batches(
        select_udf, batch_format="numpy", batch_size=None, fn_kwargs={"rate": rate, "min_score": min_score}
    ).take_all()
    if not rows:
        return {}
    return {"X": np.stack([r["X"] for r in rows]), "score": np.array([r["score"] for r in rows]),
            "u": np.array([r["u"] for r in rows]), "row_id": np.array([r["row_id"] for r in rows], dtype=object)}


def collect(scored: Any, threshold: float, bins: int, n_models: int, raw: bool = False):
    """One pass over the narrow columns (flags, label, scores), batch by batch.

    Each batch is reduced to sums at once; only the scores and labels of good
    rows are kept, for the ranking metrics. -> (counts, sums per model, y, scores per model);
    with ``raw``, the first model's scores before calibration ("score_raw") come last in both lists.
    """
    keys = ["score" if k == 0 else f"score_{k}" for k in range(n_models)] + (["score_raw"] if raw else [])
    counts = {"rows": 0, "empty": 0, "problems": 0}
    parts: list[list[dict[str, Any]]] = [[] for _ in keys]
    ys: list[np.ndarray] = []
    kept: list[list[np.ndarray]] = [[] for _ in keys]
    for batch in batches(scored, ["flags", "y", *keys]):
        flags = batch["flags"]
        ok = flags == 0
        counts["rows"] += len(flags)
        counts["empty"] += int((flags == ROW_EMPTY).sum())
        counts["problems"] += int((flags == ROW_PROBLEM).sum())
        y = batch["y"][ok].astype(np.int8)
        ys.append(y)
        for k, key in enumerate(keys):
            p = batch[key][ok]
            parts[k].append(batch_sums(p, y, threshold, bins))
            kept[k].append(p)
    y_all = np.concatenate(ys) if ys else np.empty(0, dtype=np.int8)
    scores = [np.concatenate(s) if s else np.empty(0, dtype=np.float32) for s in kept]
    return counts, [merge_sums(p, bins) for p in parts], y_all, scores
