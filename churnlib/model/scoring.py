"""Scoring raw tables on Ray Data: the model in a class-based UDF, one actor pool.

``score_dataset`` reads a table (CSV or Parquet, local or ``s3://``) and maps
its batches through ``BatchScorer`` actors, each holding the model(s) once;
``score_local`` runs the same ``BatchScorer`` in this process, for a table
small enough that starting Ray and a pool costs more than scoring it.
The driver ships each model as a small payload (booster bytes + feature spec),
so actors on other nodes never talk to MLflow.

Every output row carries ``flags`` (0 ok, ``ROW_EMPTY``, ``ROW_PROBLEM``) and,
for flagged rows, a one-line ``reason``; scores are NaN there. Evaluation
refuses a table with problem rows; batch scoring writes them to a rejects file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from churnlib.data.features import FeatureSpec, encode_columns, encode_target
from churnlib.data.preparation import ROW_EMPTY, ROW_PROBLEM, id_text, row_uniform
from churnlib.data.sources import read_local, read_raw
from churnlib.data.validation import empty_rows
from churnlib.model.predictor import ChurnPredictor

if TYPE_CHECKING:
    from churnlib.config import ScoringConfig

# Seed of the per-row uniform used to sample rows (explanations); fixed so a
# rerun on the same table explains the same customers.
SAMPLE_SEED = 20240917


def _row_reasons(df: pd.DataFrame, spec: FeatureSpec, bad: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
    """One line per row saying what is wrong with it ('' for good rows)."""
    reasons = np.full(len(df), "", dtype=object)
    rows_bad = bad.any(axis=1)
    names = spec.feature_names
    for i in np.flatnonzero(rows_bad):
        j = int(np.argmax(bad[i]))
        col = names[j]
        value = df[col].iloc[i]
        if j < len(spec.numeric):
            reasons[i] = f"column {col!r}: non-numeric value {value!r}"
        else:
            reasons[i] = f"column {col!r}: unknown category {value!r} (allowed: {', '.join(spec.levels(col))})"
    if invalid is not None:
        for i in np.flatnonzero(invalid & ~rows_bad):
            reasons[i] = (
                f"target {spec.target!r}: {df[spec.target].iloc[i]!r} is neither {spec.positive!r} nor {spec.negative!r}"
            )
    return reasons


class BatchScorer:
    """Ray Data class-based UDF: a batch of raw records -> scores (and what else is asked).

    ``payloads``: one or more models (``ChurnPredictor.to_payload``, or an
    object ref to one, see ``put_payloads``); the first
    one's feature spec decides which rows are valid; output ``score`` is the
    first model's P(churn), ``score_1``, ``score_2``, ... the others', each
    model encoding the rows with its own spec.
    """

    def __init__(
        self,
        payloads: list[dict[str, Any]],
        columns: list[str],
        with_target: bool = False,
        keep_features: bool = False,
        nthread: int = 1,
        raw_score: bool = False,
        text_ids: bool = True,
    ):
        import ray

        self.models = [
            ChurnPredictor.from_payload(ray.get(p) if isinstance(p, ray.ObjectRef) else p, nthread=nthread)
            for p in payloads
        ]
        self.spec = self.models[0].spec
        self.columns = columns
        self.with_target = with_target
        self.keep_features = keep_features
        self.text_ids = text_ids  # "row_id": the ids as text (not needed by who keeps integer ids)
        # the first model's P before calibration too, as "score_raw" (evaluation's "before")
        self.raw_score = raw_score and self.models[0].calibrator is not None

    def __call__(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        spec = self.spec
        X, bad, _ = encode_columns(df, spec)
        empty = empty_rows(df, spec)
        out: dict[str, np.ndarray] = {}
        invalid = None
        if self.with_target:
            y, invalid = encode_target(df[spec.target], spec)
            out["y"] = y
        problem = bad.any(axis=1) | (invalid if invalid is not None else False)
        flags = np.where(empty, ROW_EMPTY, np.where(problem, ROW_PROBLEM, 0)).astype(np.uint8)
        ok = flags == 0
        out["flags"] = flags
        for k, model in enumerate(self.models):
            Xk = X if model.spec == spec else encode_columns(df, model.spec)[0]
            score = np.full(len(df), np.nan, dtype=np.float32)
            if ok.any():
                score[ok] = model.score(Xk[ok])
            out["score" if k == 0 else f"score_{k}"] = score
            if k == 0 and self.raw_score:
                before = np.full(len(df), np.nan, dtype=np.float32)
                if ok.any():
                    before[ok] = model.score_uncalibrated(Xk[ok])
                out["score_raw"] = before
        out["u"] = row_uniform(df, spec, self.columns, SAMPLE_SEED).astype(np.float32)
        if self.text_ids and spec.id_column and spec.id_column in df.columns:
            out["row_id"] = id_text(df[spec.id_column])
        if self.keep_features:
            out["X"] = X
        reasons = np.full(len(df), "", dtype=object)
        if not ok.all():
            reasons = _row_reasons(df, spec, bad, invalid)
            reasons[empty] = "every cell is empty"
        out["reason"] = reasons
        return out


def put_payloads(predictors: list[ChurnPredictor]) -> list[Any]:
    """The models' payloads in the object store, as refs for a UDF's constructor.

    A payload is a few hundred KB to a few MB; passed by value it would be
    pickled into the UDF that Ray Data serializes for every operator (and
    warns about when large). As refs the UDF stays small, each node fetches a
    model once, and this driver owns (and so keeps) the objects for the run.
    """
    import ray

    return [ray.put(p.to_payload()) for p in predictors]


def actor_pool(scoring_cfg: ScoringConfig):
    """The actor pool strategy for scoring, sized by ``scoring.actors``."""
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=scoring_cfg.actors)


def score_dataset(
    source: Any,
    read_spec: FeatureSpec,
    columns: list[str],
    predictors: list[ChurnPredictor],
    scoring_cfg: ScoringConfig,
    with_target: bool,
    keep_features: bool = False,
    raw_score: bool = False,
):
    """A lazy Ray Dataset of scores over the raw table (see ``BatchScorer``)."""
    return read_raw(source, read_spec, columns).map_batches(
        BatchScorer,
        fn_constructor_kwargs={
            "payloads": put_payloads(predictors),
            "columns": columns,
            "with_target": with_target,
            "keep_features": keep_features,
            "raw_score": raw_score,
            "nthread": max(1, int(scoring_cfg.cpus_per_actor)),
        },
        compute=actor_pool(scoring_cfg),
        num_cpus=scoring_cfg.cpus_per_actor,
        batch_size=scoring_cfg.batch_size,
        batch_format="pandas",
        zero_copy_batch=True,
    )


def score_local(
    source: Any,
    read_spec: FeatureSpec,
    columns: list[str],
    predictors: list[ChurnPredictor],
    scoring_cfg: ScoringConfig,
    with_target: bool,
    keep_features: bool = False,
    raw_score: bool = False,
) -> list[dict[str, np.ndarray]]:
    """``score_dataset``'s output, computed in this process: the table read as ``read_raw``
    reads it (``read_local``), cut into ``scoring.batch_size`` rows, each batch through the
    same ``BatchScorer`` (XGBoost on every CPU this process may use) -> the scored batches."""
    import os

    table = read_local(source, read_spec, columns)
    scorer = BatchScorer([p.to_payload() for p in predictors], columns, with_target=with_target,
                         keep_features=keep_features, nthread=len(os.sched_getaffinity(0)), raw_score=raw_score)
    n = max(1, int(scoring_cfg.batch_size))
    return [scorer(table.slice(i, n).to_pandas()) for i in range(0, table.num_rows, n)]
