"""The model's contact threshold, chosen at training on the validation rows.

With ``decision.threshold: auto`` the trained booster scores the validation rows
(rows that did not grow the trees; early stopping looked at them, nothing else),
and the cut worth most on them (``churnlib.decision.value.best_cut``, no capacity:
a capacity limits a run, not the model) becomes the model's contact threshold.
A fixed ``decision.threshold`` is kept as given. Either way it travels in the
model's metadata, so the pyfunc, batch scoring and Serve contact the same customers.

Small tables were prepared in the driver and are scored here; a table in Ray's
object store is scored where it lies and only the score and label columns come
back (12 bytes a validation row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from churnlib.decision.value import Decision, best_cut, value_at

if TYPE_CHECKING:
    from churnlib.config import Config
    from churnlib.data.preparation import Prepared


def _score_valid(batch: dict[str, np.ndarray], booster_raw: bytes) -> dict[str, np.ndarray]:
    import xgboost as xgb

    keep = (batch["flags"] == 0) & batch["is_valid"].astype(bool)
    booster = xgb.Booster(model_file=bytearray(booster_raw))
    booster.set_param({"nthread": 1})
    X = batch["X"][keep]
    p = booster.inplace_predict(X) if len(X) else np.empty(0, dtype=np.float32)
    return {"p": np.asarray(p, dtype=np.float64), "y": batch["y"][keep].astype(np.int8)}


def validation_scores(prepared: Prepared, booster: Any) -> tuple[np.ndarray, np.ndarray]:
    """(P(churn), label) of every usable validation row."""
    if prepared.local is not None:
        local = prepared.local
        keep = (local["flags"] == 0) & local["is_valid"].astype(bool)
        X = local["X"][keep]
        p = booster.inplace_predict(X) if len(X) else np.empty(0, dtype=np.float32)
        return np.asarray(p, dtype=np.float64), local["y"][keep].astype(np.int8)
    raw = bytes(booster.save_raw("ubj"))
    parts = prepared.dataset.map_batches(_score_valid, batch_format="numpy", fn_kwargs={"booster_raw": raw})
    ps, ys = [], []
    for batch in parts.iter_batches(batch_size=None, batch_format="numpy"):
        ps.append(batch["p"])
        ys.append(batch["y"])
    if not ps:
        return np.empty(0), np.empty(0, dtype=np.int8)
    return np.concatenate(ps), np.concatenate(ys)


def choose_threshold(cfg: Config, prepared: Prepared, booster: Any) -> dict[str, Any]:
    """The contact threshold the model will carry, and what it is worth on the validation rows.

    -> {"threshold": float | None (None: no cut pays, contact nobody), "source": "auto" | "fixed" |
    "break-even" (no validation rows),
    "valid_contacts", "valid_value_total", "valid_value_per_customer", "valid_rows"}."""
    d = cfg.decision
    decision = Decision(d.value_saved, d.contact_cost, d.save_rate)
    p, y = validation_scores(prepared, booster)
    fixed = d.fixed_threshold
    if fixed is None and len(p) == 0:  # nothing held out: contact where a contact pays, if P is right
        return {"threshold": decision.break_even, "source": "break-even", "valid_contacts": 0,
                "valid_value_total": 0.0, "valid_value_per_customer": 0.0, "valid_rows": 0}
    if fixed is not None:
        cut = value_at(p, y, fixed, decision)
        threshold, source = fixed, "fixed"
    else:
        cut = best_cut(p, y, decision)
        threshold, source = (cut.threshold if cut.contacts else None), "auto"
    return {"threshold": threshold, "source": source, "valid_contacts": cut.contacts,
            "valid_value_total": cut.total, "valid_value_per_customer": cut.per_customer, "valid_rows": int(len(p))}


def contact_metrics(contact: dict[str, Any]) -> dict[str, float]:
    """The run's metrics of the choice (the threshold is absent when nobody is contacted)."""
    out = {"decision_valid_contacts": float(contact["valid_contacts"]),
           "decision_valid_value_per_customer": float(contact["valid_value_per_customer"])}
    if contact["threshold"] is not None:
        out["decision_contact_threshold"] = float(contact["threshold"])
    return out


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
