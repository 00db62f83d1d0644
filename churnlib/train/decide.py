"""What the model carries beside its trees: its calibrator and its contact threshold.

Both are fitted on the validation rows (rows that did not grow the trees; early
stopping looked at them, nothing else):

1. the calibrator (``model.calibration``: platt, isotonic or none,
   ``churnlib.model.calibration``) on the booster's margins, with the Brier score
   and the expected calibration error (ECE) of those rows before and after;
2. with ``decision.threshold: auto``, the cut worth most on the calibrated
   probabilities (``churnlib.decision.value.best_cut``, no capacity: a capacity
   limits a run, not the model). A fixed ``decision.threshold`` is kept as given.

Both travel in the model's metadata, so the pyfunc, batch scoring and Serve
answer the same probability and contact the same customers.

Small tables were prepared in the driver and are scored here; a table in Ray's
object store is scored where it lies and only the margin and label columns come
back (12 bytes a validation row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from churnlib.decision.value import Decision, best_cut, value_at
from churnlib.model.calibration import fit, reliability, sigmoid

if TYPE_CHECKING:
    from churnlib.config import Config
    from churnlib.data.preparation import Prepared


def _margins(booster: Any, X: np.ndarray) -> np.ndarray:
    m = booster.inplace_predict(X, predict_type="margin") if len(X) else np.empty(0, dtype=np.float32)
    return np.asarray(m, dtype=np.float64)


def _valid_margins(batch: dict[str, np.ndarray], booster_raw: bytes) -> dict[str, np.ndarray]:
    import xgboost as xgb

    keep = (batch["flags"] == 0) & batch["is_valid"].astype(bool)
    booster = xgb.Booster(model_file=bytearray(booster_raw))
    booster.set_param({"nthread": 1})
    return {"m": _margins(booster, batch["X"][keep]), "y": batch["y"][keep].astype(np.int8)}


def validation_margins(prepared: Prepared, booster: Any) -> tuple[np.ndarray, np.ndarray]:
    """(the booster's margin, label) of every usable validation row."""
    if prepared.local is not None:
        local = prepared.local
        keep = (local["flags"] == 0) & local["is_valid"].astype(bool)
        return _margins(booster, local["X"][keep]), local["y"][keep].astype(np.int8)
    raw = bytes(booster.save_raw("ubj"))
    parts = prepared.dataset.map_batches(_valid_margins, batch_format="numpy", fn_kwargs={"booster_raw": raw})
    ms, ys = [], []
    for batch in parts.iter_batches(batch_size=None, batch_format="numpy"):
        ms.append(batch["m"])
        ys.append(batch["y"])
    if not ms:
        return np.empty(0), np.empty(0, dtype=np.int8)
    return np.concatenate(ms), np.concatenate(ys)


def validation_scores(prepared: Prepared, booster: Any, calibrator: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(churn), label) of every usable validation row; calibrated with ``calibrator`` when given."""
    m, y = validation_margins(prepared, booster)
    p = calibrator.apply(m) if calibrator is not None else sigmoid(m).astype(np.float32)
    return np.asarray(p, dtype=np.float64), y


def decide(cfg: Config, prepared: Prepared, booster: Any) -> dict[str, Any]:
    """The calibrator and the contact threshold the model will carry, and what they do on the validation rows.

    -> {"threshold": float | None (None: no cut pays, contact nobody), "source": "auto" | "fixed" |
    "break-even" (no validation rows), "valid_contacts", "valid_value_total", "valid_value_per_customer",
    "valid_rows", "calibration": the model's calibration metadata, "calibration_note": one line,
    "calibration_metrics": Brier score and ECE before and after (empty without validation rows)}."""
    d = cfg.decision
    decision = Decision(d.value_saved, d.contact_cost, d.save_rate)
    m, y = validation_margins(prepared, booster)
    calibrator, note = fit(cfg.model.calibration, m, y)
    raw = sigmoid(m)
    p = calibrator.apply(m).astype(np.float64) if calibrator is not None else raw
    bins = cfg.evaluation.calibration_bins
    calibration_metrics: dict[str, float] = {}
    if len(y):
        before, after = reliability(raw, y, bins), reliability(p, y, bins)
        calibration_metrics = {"calibration_valid_brier_before": before["brier"],
                               "calibration_valid_brier_after": after["brier"],
                               "calibration_valid_ece_before": before["ece"],
                               "calibration_valid_ece_after": after["ece"]}
    out = {"calibration": calibrator.to_dict() if calibrator is not None else {"method": "none", "note": note},
           "calibration_note": note, "calibration_metrics": calibration_metrics, "valid_rows": int(len(p))}
    fixed = d.fixed_threshold
    if fixed is None and len(p) == 0:  # nothing held out: contact where a contact pays, if P is right
        return {**out, "threshold": decision.break_even, "source": "break-even", "valid_contacts": 0,
                "valid_value_total": 0.0, "valid_value_per_customer": 0.0}
    if fixed is not None:
        cut = value_at(p, y, fixed, decision)
        threshold, source = fixed, "fixed"
    else:
        cut = best_cut(p, y, decision)
        threshold, source = (cut.threshold if cut.contacts else None), "auto"
    return {**out, "threshold": threshold, "source": source, "valid_contacts": cut.contacts,
            "valid_value_total": cut.total, "valid_value_per_customer": cut.per_customer}


def contact_metrics(contact: dict[str, Any]) -> dict[str, float]:
    """The run's metrics of the choice (the threshold is absent when nobody is contacted) and of
    the calibration (before and after, on the validation rows it was fitted on)."""
    out = {"decision_valid_contacts": float(contact["valid_contacts"]),
           "decision_valid_value_per_customer": float(contact["valid_value_per_customer"]),
           **{k: float(v) for k, v in contact.get("calibration_metrics", {}).items()}}
    if contact["threshold"] is not None:
        out["decision_contact_threshold"] = float(contact["threshold"])
    return out


def calibration_line(contact: dict[str, Any]) -> str:
    """What `churn train` says of the calibration, in one line."""
    m = contact.get("calibration_metrics") or {}
    line = f"calibration: {contact['calibration_note']}"
    if m and contact["calibration"].get("method") != "none":
        line += (f"; on the validation rows Brier {m['calibration_valid_brier_before']:.4f} -> "
                 f"{m['calibration_valid_brier_after']:.4f}, ECE {m['calibration_valid_ece_before']:.4f} -> "
                 f"{m['calibration_valid_ece_after']:.4f}")
    return line


def contact_line(contact: dict[str, Any]) -> str:
    """What `churn train` says of the choice, in one line."""
    rows = contact["valid_rows"]
    if contact["source"] == "break-even":
        return f"decision: no validation rows; the model contacts from the break-even P {contact['threshold']:.3f}"
    if contact["threshold"] is None:
        return (f"decision: no cut pays on the {rows} validation rows: the model contacts nobody "
                f"(check decision.value_saved, contact_cost, save_rate)")
    how = "the cut worth most" if contact["source"] == "auto" else "decision.threshold"
    return (f"decision: contact from P >= {contact['threshold']:.4f} ({how} on the {rows} validation rows: "
            f"{contact['valid_contacts']} contacts, {contact['valid_value_total']:,.0f} expected, "
            f"{contact['valid_value_per_customer']:,.2f} per customer)")
