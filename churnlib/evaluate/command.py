"""``churn evaluate``: metrics, SHAP, comparison with a baseline and deployment gates.

1. Resolve the model URI (and the baseline's, if given: one that does not
   resolve is reported in one line and the model is judged as a first model).
2. Score the test table on Ray Data (``model.scoring.score_dataset``: an actor pool,
   both models on the same rows), keep the scores in the object store; a table of at
   most ``LOCAL_PREPARE_MAX_BYTES`` (as `churn train` reads it) in this process, without
   Ray (``score_local``: the same scorer, the same batches' columns).
3. Stream the narrow columns (flags, label, scores: 5 bytes a row, 4 more
   per baseline) to the driver, reducing each batch to sums (confusion
   matrix, losses, calibration bins) as it arrives and keeping only the
   scores, which the ranking metrics and the paired bootstrap need. The raw
   table and the feature matrix stay in the object store.
4. Explain a seeded sample (``evaluation.shap.max_samples`` rows) and the
   highest-risk customers; check the gates.
5. Only then start the MLflow evaluation run (linked to the model's training
   run) and log everything, so bad input never leaves a half-logged run.
   When the model is a registry version, the gate outcome is also tagged on
   that version.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from churnlib import tracking
from churnlib.console import say as default_say
from churnlib.data.preparation import reads_locally
from churnlib.data.sources import check_columns, resolve_source
from churnlib.data.validation import as_data_error, validate
from churnlib.decision.value import Decision, contact, decision_metrics, row_value
from churnlib.errors import DataError, ModelNotFoundError, NoSuchAliasError
from churnlib.evaluate.collect import collect, selected
from churnlib.evaluate.gates import evaluate_gates
from churnlib.evaluate.metrics import (
    paired_bootstrap,
    rank_metrics,
    threshold_metrics,
)
from churnlib.evaluate.record import log_evaluation
from churnlib.evaluate.result import EvaluationResult
from churnlib.model import loading
from churnlib.model.scoring import score_dataset, score_local
from churnlib.runtime import ensure_ray, quiet_logs

if TYPE_CHECKING:
    from churnlib.config import Config

def _load_baseline(uri: str | None, say: Callable[[str], None]):
    """-> (loaded baseline or None, note, first_model)."""
    if not uri:
        return None, None, False
    try:
        return loading.load(uri), None, False
    except NoSuchAliasError as exc:
        note = f"baseline: {exc}; evaluating as a first model"
        say(note)
        return None, note, True
    except ModelNotFoundError as exc:
        note = f"baseline: {exc}; no comparison"
        say(note)
        return None, note, False


def _decision_line(m: dict[str, float], d: Decision, n: int) -> str:
    """One line of what the decision is worth on this data: at the threshold in force, at the
    best cut, at 0.5, and the top-decile lift."""
    best = (f"best cut P >= {m['value_best_threshold']:.3f}: {m['value_best_total']:,.0f} "
            f"({int(m['value_best_contacts'])} contacts)" if "value_best_threshold" in m
            else "no cut pays: contact nobody")
    capacity = f", capacity {int(m['value_capacity'])}" if "value_capacity" in m else ""
    half = f"at 0.5: {m['value_at_half_total']:,.0f}; " if m.get("value_threshold") != 0.5 else ""
    at = f"P >= {m['value_threshold']:.4g}" if "value_threshold" in m else "no cut (none paid at training)"
    return (f"decision: contacting {int(m['value_contacts'])} of {n} at {at}{capacity} is worth "
            f"{m['expected_value_total']:,.0f} ({m['expected_value_per_customer']:,.2f} per customer); {best}; "
            f"{half}everyone: {m['value_everyone_total']:,.0f}; top-decile lift {m['top_decile_lift']:.2f} "
            f"(break-even P {d.break_even:.3f})")


def _explanation_rows(scored: Any, cfg: Config, y_total: int, scores: np.ndarray) -> dict[str, np.ndarray]:
    shap_cfg = cfg.evaluation.shap
    # Over-sample by 4 standard deviations, then keep the max_samples rows with
    # the lowest u: exactly max_samples rows (all, on a smaller table).
    want = shap_cfg.max_samples
    rate = min(1.0, (want + 4 * want**0.5 + 10) / max(y_total, 1))
    top = shap_cfg.top_customers
    min_score = float(np.partition(scores, -top)[-top]) if 0 < top <= len(scores) else np.inf
    rows = selected(scored, rate, min_score)
    if not rows:
        return {"X": np.empty((0, 0), np.float32)}
    X = rows["X"].astype(np.float32)
    score = rows["score"].astype(np.float32)
    u = rows["u"].astype(np.float32)
    row_id = rows["row_id"].astype(object)
    sample = np.flatnonzero(u < rate)
    # u is uniform: the lowest u values are a uniform sample of exactly max_samples rows
    sample = sample[np.argsort(u[sample], kind="stable")[: shap_cfg.max_samples]]
    top_idx = np.argsort(-score, kind="stable")[:top] if top else np.empty(0, dtype=np.int64)
    return {"X": X, "score": score, "row_id": row_id, "sample": sample, "top": top_idx}


def evaluate(
    cfg: Config,
    model_uri: str,
    data_path: str,
    baseline_uri: str | None = None,
    run_name: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = default_say,
) -> EvaluationResult:
    """`churn evaluate`: score ``data_path`` with ``model_uri`` (and a baseline), compute metrics, SHAP and gates, then log one evaluation run; a failed gate raises ``GateFailedError`` after logging."""
    quiet_logs(verbose)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    tracking.preflight(cfg)  # store, experiment and artifact store answer, before any slow work
    model = loading.load(model_uri)
    ref = model.ref
    say(f"model: {ref.describe()} (training run {ref.run_id})")
    baseline, baseline_note, first_model = _load_baseline(baseline_uri, say)
    if baseline is not None:
        say(f"baseline: {baseline.ref.describe()} (training run {baseline.ref.run_id})")
    spec = model.spec
    source = resolve_source(data_path)
    columns = check_columns(source, spec, need_target=True)
    if baseline is not None:
        check_columns(source, baseline.spec, need_target=False)
    timings["resolve_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    predictors = [model.predictor] + ([baseline.predictor] if baseline is not None else [])
    n_models = len(predictors)
    threshold = cfg.model.decision_threshold
    bins = cfg.evaluation.calibration_bins
    calibrated = model.predictor.calibrator is not None  # then also the scores before calibration
    scoring = {"with_target": True, "keep_features": cfg.evaluation.shap.enabled, "raw_score": calibrated}
    # a small table is scored here: starting Ray and an actor pool would cost more than the scoring
    local = reads_locally(source, cfg.scoring.engine)
    files = f"{len(source.files)} {source.format} file(s)"
    if local:
        say(f"data: scoring {source.uri} ({files}) in this process (a small table; scoring.engine: ray_data for "
            f"Ray Data)")
    else:
        ensure_ray(cfg.ray, verbose=verbose, workspace=cfg.workspace_path)
        say(f"data: scoring {source.uri} ({files}) on Ray Data, "
            f"{cfg.scoring.actors} actor(s) x {cfg.scoring.cpus_per_actor:g} CPU")
    try:
        if local:
            scored: Any = score_local(source, spec, columns, predictors, cfg.scoring, **scoring)
        else:
            scored = score_dataset(source, spec, columns, predictors, cfg.scoring, **scoring).materialize()
        counts, sums, y, scores = collect(scored, threshold, bins, n_models, raw=calibrated)
    except Exception as exc:  # noqa: BLE001 - a read error, one line
        if source.format == "csv":
            # the typed read fails on a non-numeric cell: name the column, count and value as
            # `churn train` does (a text read that counts; raises when it finds the problem)
            validate(source, spec, columns, local=local)
        raise as_data_error(exc, source) from None
    timings["score_s"] = time.perf_counter() - t0
    if counts["problems"]:
        validate(source, spec, columns, local=local)  # names the column, the count and the first value
        raise DataError(f"{source.uri}: {counts['problems']} row(s) with bad values")
    raw_sums = sums.pop() if calibrated else None
    if calibrated:
        scores.pop()
    usable = counts["rows"] - counts["empty"]
    if usable == 0:
        raise DataError(f"{source.uri}: no rows to evaluate" + (f" ({counts['empty']} empty)" if counts["empty"] else ""))
    main = sums[0]
    positives = main["tp"] + main["fn"]
    if positives in (0, usable):
        only = "churn" if positives else "no churn"
        raise DataError(
            f"{source.uri}: every one of the {usable} rows is {only!r}: ROC AUC and PR AUC are undefined with one "
            f"class; evaluate on a test set with both classes"
        )

    t0 = time.perf_counter()
    decision = Decision.from_config(cfg.decision)
    # whom each model contacts: decision.threshold when set, else the cut it was trained with
    cut = model.predictor.contact_threshold(cfg.decision.fixed_threshold, decision)
    metrics = {**threshold_metrics(main), **rank_metrics(scores[0], y),
               **decision_metrics(scores[0], y, cut, decision)}
    confusion = {k: int(main[k]) for k in ("tp", "fp", "tn", "fn")}
    rows = {"total": counts["rows"], "dropped_empty": counts["empty"], "evaluated": usable,
            "positives": int(positives), "negatives": int(usable - positives)}
    say(
        f"metrics: ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}, log loss {metrics['log_loss']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f} at P >= {threshold:g} ({usable} rows)"
    )
    if raw_sums is not None:
        before = threshold_metrics(raw_sums)
        metrics.update({"calibration_brier_before": before["brier_score"], "calibration_ece_before": before["ece"],
                        "calibration_log_loss_before": before["log_loss"]})
        say(f"calibration: {model.predictor.calibrator.method}; on this data Brier {before['brier_score']:.4f} -> "
            f"{metrics['brier_score']:.4f}, ECE {before['ece']:.4f} -> {metrics['ece']:.4f}, log loss "
            f"{before['log_loss']:.4f} -> {metrics['log_loss']:.4f} (before -> after)")
    say(_decision_line(metrics, decision, usable))
    baseline_metrics = comparison = None
    if baseline is not None:
        base_cut = baseline.predictor.contact_threshold(cfg.decision.fixed_threshold, decision)
        baseline_metrics = {**threshold_metrics(sums[1]), **rank_metrics(scores[1], y),
                            **decision_metrics(scores[1], y, base_cut, decision)}
        b = cfg.evaluation.bootstrap
        worth = row_value(y, decision)
        value_rows = (worth * contact(scores[0], cut, decision), worth * contact(scores[1], base_cut, decision))
        comparison = paired_bootstrap(scores[0], scores[1], y, b.resamples, b.confidence, b.seed, b.max_rows,
                                      value_rows=value_rows)
        lo, hi = comparison.auc_ci
        vlo, vhi = comparison.value_ci
        say(
            f"comparison: AUC {metrics['roc_auc']:.4f} vs {baseline_metrics['roc_auc']:.4f} "
            f"({comparison.auc_diff:+.4f}, {b.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]), "
            f"log loss {comparison.log_loss_diff:+.4f}: {comparison.verdict}; "
            f"expected value per customer {comparison.value_diff:+.2f} (CI [{vlo:+.2f}, {vhi:+.2f}]): "
            f"{comparison.value_verdict}"
        )
    timings["metrics_s"] = time.perf_counter() - t0

    explanation = picked = None
    shap_summary: dict[str, Any] = {}
    if cfg.evaluation.shap.enabled:
        t0 = time.perf_counter()
        picked = _explanation_rows(scored, cfg, usable, scores[0])
        kind = cfg.evaluation.shap.explainer_type
        rows_idx = np.concatenate([picked["sample"], picked["top"]])
        background = None
        if kind == "exact":
            background = picked["X"][picked["sample"][: cfg.evaluation.shap.background_samples]]
        explanation = model.predictor.explain(picked["X"][rows_idx], kind, background)
        timings["shap_s"] = time.perf_counter() - t0
        n_sample = len(picked["sample"])
        mean_abs = {k: float(np.abs(explanation.values[:n_sample, j]).mean()) if n_sample else 0.0
                    for j, k in enumerate(spec.feature_names)}
        shap_summary = {"explainer": kind, "rows": n_sample, "top_customers": len(picked["top"]),
                        "mean_abs": mean_abs, "seconds": timings["shap_s"]}
        ranked = sorted(mean_abs, key=mean_abs.get, reverse=True)
        say(f"shap: {kind}, {n_sample} rows in {timings['shap_s']:.1f} s; top features: "
            + ", ".join(f"{f} {mean_abs[f]:.3f}" for f in ranked[:3]))

    gate = evaluate_gates(
        metrics,
        cfg.evaluation.thresholds,
        cfg.evaluation.require_improvement,
        comparison,
        baseline.ref.describe() if baseline is not None else baseline_uri,
        first_model=first_model,
    )

    result = EvaluationResult(
        run_id="",
        experiment_id="",
        model_uri=model_uri,
        model_version=ref.version,
        training_run_id=ref.run_id,
        metrics=metrics,
        confusion=confusion,
        rows=rows,
        gate=gate,
        baseline_uri=baseline_uri,
        baseline_version=baseline.ref.version if baseline is not None else None,
        baseline_note=baseline_note,
        baseline_metrics=baseline_metrics,
        comparison=comparison,
        shap=shap_summary,
        timings=timings,
    )
    t0 = time.perf_counter()
    log_evaluation(cfg, result, run_name, ref, baseline, source, spec, sums, y, scores, explanation, picked,
                   raw_sums)
    timings["log_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    say(f"gate: {gate.status}" + (f" ({gate.summary()})" if gate.checks else ""))
    return result
