"""The logged model: an MLflow pyfunc that takes RAW customer records.

``predict(df)`` on a DataFrame with the original column names and category
strings returns a DataFrame (same index) with

- ``churn_probability``: P(churn = 1), float, calibrated when the model carries a
  calibrator (``churnlib.model.calibration``)
- ``churn_label``: 1 when the probability is at or above the model's decision
  threshold, else 0
- ``expected_value``: the expected net value of contacting the customer
  (``churnlib.decision``, with the value, cost and save rate the model was
  trained with) and ``contact``: whether to (P >= the contact threshold chosen
  at training, ``churnlib.train.decide``), for models that carry their decision

The booster (only the trees up to the best iteration), the feature spec and
the threshold are stored in the model's ``model_dir`` artifact, so the booster
also loads on its own: ``xgboost.Booster(model_file=<model_dir>/booster.ubj)``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from churnlib.data.features import FeatureSpec, to_matrix
from churnlib.decision.value import Decision, expected_value
from churnlib.model.calibration import Calibrator, calibrate_explanation, scores
from churnlib.model.explain import explain
from churnlib.model.files import (
    BOOSTER_FILE,
    DECISION_COLUMNS,
    META_FILE,
    OUTPUT_COLUMNS,
    PROFILE_FILE,
    SPEC_FILE,
)


def save_model_dir(
    path: str | os.PathLike, booster: Any, spec: FeatureSpec, meta: dict[str, Any], profile: dict[str, Any] | None = None
) -> Path:
    """Write booster, feature spec, metadata (threshold, ...) and the training data's
    profile (for drift reports, see ``churnlib.data.profiles``) into ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    booster.save_model(str(out / BOOSTER_FILE))
    (out / SPEC_FILE).write_text(spec.to_json(), encoding="utf-8")
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    if profile is not None:
        (out / PROFILE_FILE).write_text(json.dumps(profile), encoding="utf-8")
    return out


class ChurnPredictor:
    """Booster + feature spec + threshold; scores raw records. Used by the pyfunc and by serving."""

    def __init__(self, booster: Any, spec: FeatureSpec, threshold: float, meta: dict[str, Any] | None = None,
                 profile: dict[str, Any] | None = None):
        self.booster = booster
        self.spec = spec
        self.threshold = float(threshold)
        self.meta = meta or {}
        self.profile = profile  # the training data's profile, when the model carries one
        self.calibrator = Calibrator.from_dict(self.meta.get("calibration"))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ChurnPredictor":
        import xgboost as xgb

        d = Path(path)
        booster = xgb.Booster(model_file=str(d / BOOSTER_FILE))
        # Scoring runs in the caller's process; one thread per call keeps
        # several concurrent callers (actors, replicas) from oversubscribing.
        booster.set_param({"nthread": int(os.environ.get("CHURN_PREDICT_NTHREAD", "1"))})

        spec = FeatureSpec.from_json((d / SPEC_FILE).read_text(encoding="utf-8"))
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        profile_path = d / PROFILE_FILE
        profile = json.loads(profile_path.read_text(encoding="utf-8")) if profile_path.is_file() else None
        return cls(booster, spec, meta["decision_threshold"], meta, profile)

    def to_payload(self) -> dict[str, Any]:
        """Everything needed to rebuild this predictor in another process (a few MB at most).

        Scoring actors get the model this way from the driver, so workers never
        need MLflow credentials or a connection to the tracking server.
        """
        return {"booster": bytes(self.booster.save_raw("ubj")), "spec": self.spec.to_dict(), "meta": self.meta,
                "threshold": self.threshold, "profile": self.profile}

    @classmethod
    def from_payload(cls, payload: dict[str, Any], nthread: int = 1) -> "ChurnPredictor":
        import xgboost as xgb

        booster = xgb.Booster(model_file=bytearray(payload["booster"]))
        booster.set_param({"nthread": nthread})
        return cls(booster, FeatureSpec.from_dict(payload["spec"]), payload["threshold"], payload["meta"],
                   payload.get("profile"))

    def score(self, X: np.ndarray) -> np.ndarray:
        """P(churn) of each row of a model matrix (``to_matrix``), calibrated when the model is:
        every caller (pyfunc, batch, evaluation, Serve) scores through here."""
        return scores(self.booster, X, self.calibrator)

    def score_uncalibrated(self, X: np.ndarray) -> np.ndarray:
        """The booster's own P(churn), before calibration (evaluation's "before")."""
        return scores(self.booster, X, None)

    def explain(self, X: np.ndarray, kind: str = "tree", background: np.ndarray | None = None,
                nthread: int | None = None):
        """SHAP values of rows of the model matrix, in the log-odds of the probability answered
        (Platt-calibrated: rescaled, still additive; see ``churnlib.model.calibration``)."""
        return calibrate_explanation(explain(self.booster, X, self.spec, kind, background, nthread), self.calibrator)

    def predict_proba(self, records: Any) -> np.ndarray:
        return self.score(to_matrix(records, self.spec))

    @property
    def decision(self) -> Decision | None:
        """What a contact is worth, as the model was trained with it (None: an older model)."""
        d = self.meta.get("decision")
        return Decision(d["value_saved"], d["contact_cost"], d["save_rate"]) if d else None

    def run_decision(self, configured: Decision) -> tuple[Decision, str | None]:
        """The decision a scoring run applies: the model's value, cost and save rate (its contact
        threshold was chosen for them, at training or by `churn models decide`) with the run's
        capacity; the configured one for a model that carries none. -> (decision, a note when the
        configured values differ from the model's, else None)."""
        carried = self.decision
        if carried is None:
            return configured, None
        decision = replace(configured, value_saved=carried.value_saved, contact_cost=carried.contact_cost,
                           save_rate=carried.save_rate)
        if decision == configured:
            return decision, None
        return decision, (f"decision: the model's contact threshold was chosen for value {carried.value_saved:g}, "
                          f"cost {carried.contact_cost:g}, save rate {carried.save_rate:g}; the config says "
                          f"{configured.value_saved:g}, {configured.contact_cost:g}, {configured.save_rate:g}: "
                          f"the model's apply (churn models decide re-derives the threshold for the config's)")

    def contact_threshold(self, fixed: float | None = None, fallback: Decision | None = None) -> float:
        """The P(churn) from which to contact: ``fixed`` when given (``decision.threshold`` set to a
        number); else the cut chosen when the model was trained (inf: no cut paid, contact
        nobody); else (a model trained before) the break-even probability of its decision, or of
        ``fallback``'s; inf when there is neither."""
        if fixed is not None:
            return float(fixed)
        d = self.meta.get("decision") or {}
        if "threshold" in d:
            return math.inf if d["threshold"] is None else float(d["threshold"])
        decision = self.decision or fallback
        return decision.break_even if decision is not None else math.inf

    def predict(self, records: Any) -> pd.DataFrame:
        """P(churn) and the label at the threshold; with the model's decision, also the expected
        value of contacting each customer and whether to (P >= the model's contact threshold: a
        capacity limits a run, ``churn predict``, not one call)."""
        proba = self.predict_proba(records)
        index = records.index if isinstance(records, pd.DataFrame) else None
        probability, label = OUTPUT_COLUMNS
        out = {probability: proba.astype(np.float64), label: (proba >= self.threshold).astype(np.int64)}
        decision = self.decision
        if decision is not None:
            value, contact = DECISION_COLUMNS
            out[value] = expected_value(proba, decision)
            out[contact] = proba >= self.contact_threshold()
        return pd.DataFrame(out, index=index)
