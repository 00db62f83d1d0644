"""``churn models decide``: a version's contact threshold re-derived for new costs, without retraining.

The retention team's numbers change (a dearer offer, a better save rate); the
model does not. This takes the config's ``decision`` (value saved, contact cost,
save rate, threshold) and derives the cut for the version:

- ``decision.threshold`` a number: that cut;
- ``--data`` a labelled table (recent outcomes, the test set): the version scores
  it on Ray Data and the cut worth most on it (every distinct score tried, as at
  training) is the threshold; a table where no cut pays gives "contact nobody";
- neither: the break-even probability contact_cost / (value_saved x save_rate),
  the right cut for probabilities that mean what they say (a calibrated model;
  an uncalibrated one is warned about).

The result is one JSON tag on the version (``churn.decision``): the values, the
threshold, where it came from, who set it and when. One tag is one write, so a
failure leaves the version's decision as it was. Every loader applies it over the
decision the model was trained with (``churnlib.model.loading``): ``churn
predict`` and Serve use it, and a replica following an alias picks it up as it
picks up a new version. ``churn models info`` shows it.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Callable

from churnlib.console import say as default_say
from churnlib.data.sources import check_columns, resolve_source
from churnlib.data.validation import as_data_error, validate
from churnlib.decision.value import Decision, best_cut, value_at
from churnlib.errors import DataError, RegistryError
from churnlib.evaluate.collect import collect
from churnlib.model import loading
from churnlib.model.scoring import score_dataset
from churnlib.registry.registry import CHAMPION, Registry, _now, _who, mlflow_errors
from churnlib.runtime import ensure_ray, quiet_logs
from churnlib.tags import TAG_DECISION

if TYPE_CHECKING:
    from churnlib.config import Config


def _labelled_scores(cfg: Config, model: Any, data_path: str, verbose: bool):
    """(P(churn), label) of every usable row of a labelled table, scored by the version on Ray Data."""
    spec = model.spec
    source = resolve_source(data_path)
    columns = check_columns(source, spec, need_target=True)
    ensure_ray(cfg.ray, verbose=verbose, workspace=cfg.workspace_path)
    scored = score_dataset(source, spec, columns, [model.predictor], cfg.scoring, with_target=True)
    try:
        counts, _, y, scores = collect(scored, cfg.model.decision_threshold, cfg.evaluation.calibration_bins, 1)
    except Exception as exc:  # noqa: BLE001 - a read error, one line
        if source.format == "csv":
            validate(source, spec, columns)
        raise as_data_error(exc, source) from None
    if counts["problems"]:
        validate(source, spec, columns)  # names the column, the count and the first value
        raise DataError(f"{source.uri}: {counts['problems']} row(s) with bad values")
    if len(y) == 0:
        raise DataError(f"{source.uri}: no rows to choose a threshold on")
    return source, scores[0].astype("float64"), y


def rederive(cfg: Config, version: str | None = None, data_path: str | None = None, verbose: bool = False,
             say: Callable[[str], None] = default_say) -> dict[str, Any]:
    """Derive the version's contact threshold for the config's decision and record it on the version.
    -> the recorded decision (with "version")."""
    quiet_logs(verbose)
    registry = Registry(cfg, say)
    if version is None:
        info = registry.alias(CHAMPION)
        if info is None:
            raise RegistryError(f"{registry.name} has no champion: name the version (churn models decide VERSION)")
    else:
        info = registry.version(version)
    model = loading.load(f"models:/{registry.name}/{info.version}")
    before = model.predictor.meta.get("decision") or {}
    d = cfg.decision
    decision = Decision(d.value_saved, d.contact_cost, d.save_rate)
    record: dict[str, Any] = {"value_saved": d.value_saved, "contact_cost": d.contact_cost, "save_rate": d.save_rate}
    if data_path is not None:
        source, p, y = _labelled_scores(cfg, model, data_path, verbose)
        cut = value_at(p, y, d.fixed_threshold, decision) if d.fixed_threshold is not None else best_cut(p, y, decision)
        threshold = (d.fixed_threshold if d.fixed_threshold is not None
                     else (cut.threshold if cut.contacts else None))
        record.update({"threshold": threshold,
                       "threshold_source": "fixed" if d.fixed_threshold is not None else "best cut on data",
                       "data": source.uri, "data_digest": source.digest, "rows": int(len(y)),
                       "contacts": int(cut.contacts), "value_total": float(cut.total),
                       "value_per_customer": float(cut.per_customer)})
    elif d.fixed_threshold is not None:
        record.update({"threshold": d.fixed_threshold, "threshold_source": "fixed"})
    else:
        record.update({"threshold": decision.break_even, "threshold_source": "break-even"})
        if model.predictor.calibrator is None:
            say(f"decision: version {info.version} is not calibrated: the break-even P assumes probabilities that "
                f"mean what they say; --data chooses the cut on labelled rows instead")
    record.update({"set_at": _now(), "set_by": _who()})
    with mlflow_errors(f"recording the decision on {registry.name} version {info.version}"):
        registry.client.set_model_version_tag(registry.name, info.version, TAG_DECISION, json.dumps(record))
    say(describe_change(info.version, before, record))
    return {"version": info.version, **record}


def _cut(threshold: Any) -> str:
    if threshold is None or (isinstance(threshold, float) and math.isinf(threshold)):
        return "nobody"
    return f"P >= {float(threshold):.4f}"


def describe_change(version: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line: what the version's decision was and what it is now."""
    was = (f"{_cut(before.get('threshold'))} for value {before['value_saved']:g}, cost {before['contact_cost']:g}, "
           f"save rate {before['save_rate']:g}" if before else "the break-even P of the config (a model from before "
           "the decision layer)")
    on = (f" ({after['contacts']} of {after['rows']} rows contacted there, {after['value_total']:,.0f} expected)"
          if "rows" in after else "")
    return (f"decision: version {version} now contacts from {_cut(after['threshold'])} ({after['threshold_source']}"
            f"{on}) for value {after['value_saved']:g}, cost {after['contact_cost']:g}, save rate "
            f"{after['save_rate']:g}; was {was}")
