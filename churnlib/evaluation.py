"""``churn evaluate``: metrics, SHAP, comparison with a baseline and deployment gates.

1. Resolve the model URI (and the baseline's, if given: one that does not
   resolve is reported in one line and the model is judged as a first model).
2. Score the test table on Ray Data (``scoring.score_dataset``: an actor pool,
   both models on the same rows), keep the scores in the object store.
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

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from churnlib.console import say as default_say
from churnlib.data import ROW_EMPTY, ROW_PROBLEM
from churnlib.errors import DataError, ModelNotFoundError, NoSuchAliasError
from churnlib.metrics import (
    Comparison,
    batch_sums,
    calibration_table,
    merge_sums,
    paired_bootstrap,
    rank_metrics,
    threshold_metrics,
)

# Tags that tie an evaluation run to what it evaluated (the registry reads them).
TAG_COMMAND = "churn.command"
TAG_TRAINING_RUN = "churn.training_run_id"
TAG_MODEL_URI = "churn.model_uri"
TAG_MODEL_NAME = "churn.model_name"
TAG_MODEL_VERSION = "churn.model_version"
TAG_BASELINE_URI = "churn.baseline_uri"
TAG_BASELINE_VERSION = "churn.baseline_version"
TAG_BASELINE_NAME = "churn.baseline_name"
TAG_VERDICT = "churn.comparison.verdict"
TAG_EVAL_RUN = "churn.eval.run_id"
TAG_GATE_SOURCE = "churn.gate.source"


def metric_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.\-/]", "_", text)


@dataclass
class EvaluationResult:
    run_id: str
    experiment_id: str
    model_uri: str
    model_version: str | None
    training_run_id: str | None
    metrics: dict[str, float]
    confusion: dict[str, int]
    rows: dict[str, int]
    gate: Any  # GateResult
    baseline_uri: str | None = None
    baseline_version: str | None = None
    baseline_note: str | None = None
    baseline_metrics: dict[str, float] | None = None
    comparison: Comparison | None = None
    shap: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "model_version": self.model_version,
            "training_run_id": self.training_run_id,
            "metrics": self.metrics,
            "confusion_matrix": self.confusion,
            "rows": self.rows,
            "gate": self.gate.to_dict(),
            "baseline": None
            if self.baseline_uri is None
            else {
                "uri": self.baseline_uri,
                "version": self.baseline_version,
                "note": self.baseline_note,
                "metrics": self.baseline_metrics,
                "comparison": self.comparison.to_dict() if self.comparison else None,
            },
            "shap": self.shap,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


# From the scored dataset to the driver ------------------------------------------------


def _select_udf(batch: dict[str, np.ndarray], rate: float, min_score: float) -> dict[str, np.ndarray]:
    """Rows of the explanation sample (u < rate) and the highest-risk rows (score >= min_score)."""
    ok = batch["flags"] == 0
    keep = ok & ((batch["u"] < rate) | (batch["score"] >= min_score))
    out = {"X": batch["X"][keep], "score": batch["score"][keep], "u": batch["u"][keep]}
    out["row_id"] = batch["row_id"][keep] if "row_id" in batch else np.full(int(keep.sum()), "", dtype=object)
    return out


def _collect(scored: Any, threshold: float, bins: int, n_models: int):
    """One pass over the narrow columns (flags, label, scores), batch by batch.

    Each batch is reduced to sums at once; only the scores and labels of good
    rows are kept, for the ranking metrics. -> (counts, sums per model, y, scores per model).
    """
    keys = ["score" if k == 0 else f"score_{k}" for k in range(n_models)]
    counts = {"rows": 0, "empty": 0, "problems": 0}
    parts: list[list[dict[str, Any]]] = [[] for _ in keys]
    ys: list[np.ndarray] = []
    kept: list[list[np.ndarray]] = [[] for _ in keys]
    for batch in scored.select_columns(["flags", "y", *keys]).iter_batches(batch_size=None, batch_format="numpy"):
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


# The command ---------------------------------------------------------------------------


def _load_baseline(uri: str | None, say: Callable[[str], None]):
    """-> (loaded baseline or None, note, first_model)."""
    from churnlib import loading

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


def _explanation_rows(scored: Any, cfg: Any, y_total: int, scores: np.ndarray) -> dict[str, np.ndarray]:
    shap_cfg = cfg.evaluation.shap
    # Over-sample by 4 standard deviations, then keep the max_samples rows with
    # the lowest u: exactly max_samples rows (all, on a smaller table).
    want = shap_cfg.max_samples
    rate = min(1.0, (want + 4 * want**0.5 + 10) / max(y_total, 1))
    top = shap_cfg.top_customers
    min_score = float(np.partition(scores, -top)[-top]) if 0 < top <= len(scores) else np.inf
    batches = scored.map_batches(
        _select_udf, batch_format="numpy", batch_size=None, fn_kwargs={"rate": rate, "min_score": min_score}
    ).take_all()
    if not batches:
        return {"X": np.empty((0, 0), np.float32)}
    X = np.stack([r["X"] for r in batches]).astype(np.float32)
    score = np.array([r["score"] for r in batches], dtype=np.float32)
    u = np.array([r["u"] for r in batches], dtype=np.float32)
    row_id = np.array([r["row_id"] for r in batches], dtype=object)
    sample = np.flatnonzero(u < rate)
    # u is uniform: the lowest u values are a uniform sample of exactly max_samples rows
    sample = sample[np.argsort(u[sample], kind="stable")[: shap_cfg.max_samples]]
    top_idx = np.argsort(-score, kind="stable")[:top] if top else np.empty(0, dtype=np.int64)
    return {"X": X, "score": score, "row_id": row_id, "sample": sample, "top": top_idx}


def evaluate(
    cfg: Any,
    model_uri: str,
    data_path: str,
    baseline_uri: str | None = None,
    run_name: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = default_say,
) -> EvaluationResult:
    from churnlib import data as data_mod
    from churnlib import loading, tracking
    from churnlib.explain import explain
    from churnlib.gates import evaluate_gates
    from churnlib.runtime import ensure_ray, quiet_logs
    from churnlib.scoring import score_dataset

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
    source = data_mod.resolve_source(data_path)
    columns = data_mod.check_columns(source, spec, need_target=True)
    if baseline is not None:
        data_mod.check_columns(source, baseline.spec, need_target=False)
    timings["resolve_s"] = time.perf_counter() - t_start

    t0 = time.perf_counter()
    ensure_ray(cfg.ray, verbose=verbose)
    predictors = [model.predictor] + ([baseline.predictor] if baseline is not None else [])
    n_models = len(predictors)
    threshold = cfg.model.decision_threshold
    bins = cfg.evaluation.calibration_bins
    say(f"data: scoring {source.uri} ({len(source.files)} {source.format} file(s)) on Ray Data, "
        f"{cfg.scoring.actors} actor(s) x {cfg.scoring.cpus_per_actor:g} CPU")
    scored = score_dataset(
        source, spec, columns, predictors, cfg.scoring, with_target=True, keep_features=cfg.evaluation.shap.enabled
    )
    try:
        scored = scored.materialize()
        counts, sums, y, scores = _collect(scored, threshold, bins, n_models)
    except Exception as exc:  # noqa: BLE001 - a read error, one line
        if source.format == "csv":
            # the typed read fails on a non-numeric cell: name the column, count and value as
            # `churn train` does (a text read that counts; raises when it finds the problem)
            data_mod.validate(source, spec, columns)
        raise data_mod._as_data_error(exc, source) from None
    timings["score_s"] = time.perf_counter() - t0
    if counts["problems"]:
        data_mod.validate(source, spec, columns)  # names the column, the count and the first value
        raise DataError(f"{source.uri}: {counts['problems']} row(s) with bad values")
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
    metrics = {**threshold_metrics(main), **rank_metrics(scores[0], y)}
    confusion = {k: int(main[k]) for k in ("tp", "fp", "tn", "fn")}
    rows = {"total": counts["rows"], "dropped_empty": counts["empty"], "evaluated": usable,
            "positives": int(positives), "negatives": int(usable - positives)}
    say(
        f"metrics: ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}, log loss {metrics['log_loss']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f} at P >= {threshold:g} ({usable} rows)"
    )
    baseline_metrics = comparison = None
    if baseline is not None:
        baseline_metrics = {**threshold_metrics(sums[1]), **rank_metrics(scores[1], y)}
        b = cfg.evaluation.bootstrap
        comparison = paired_bootstrap(scores[0], scores[1], y, b.resamples, b.confidence, b.seed, b.max_rows)
        lo, hi = comparison.auc_ci
        say(
            f"comparison: AUC {metrics['roc_auc']:.4f} vs {baseline_metrics['roc_auc']:.4f} "
            f"({comparison.auc_diff:+.4f}, {b.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]), "
            f"log loss {comparison.log_loss_diff:+.4f}: {comparison.verdict}"
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
        explanation = explain(model.predictor.booster, picked["X"][rows_idx], spec, kind, background)
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
    _log_evaluation(cfg, result, run_name, ref, baseline, source, spec, sums, y, scores, explanation, picked)
    timings["log_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    say(f"gate: {gate.status}" + (f" ({gate.summary()})" if gate.checks else ""))
    return result


def _log_evaluation(
    cfg: Any,
    result: EvaluationResult,
    run_name: str | None,
    ref: Any,
    baseline: Any,
    source: Any,
    spec: Any,
    sums: list[dict[str, Any]],
    y: np.ndarray,
    scores: list[np.ndarray],
    explanation: Any,
    picked: dict[str, np.ndarray] | None,
) -> None:
    """The evaluation run: metrics, plots, SHAP artifacts, gate tags; sets ``result.run_id``."""
    import matplotlib.pyplot as plt
    import mlflow
    from mlflow import MlflowClient

    from churnlib import plots, tracking
    from churnlib.explain import bar_figure, beeswarm_figure, top_reasons, waterfall_figure

    metrics, baseline_metrics, comparison = result.metrics, result.baseline_metrics, result.comparison
    confusion, rows, gate, shap_summary = result.confusion, result.rows, result.gate, result.shap
    baseline_uri = result.baseline_uri
    client = MlflowClient()
    experiment_id = tracking.ensure_experiment(cfg)
    tags = {
        TAG_COMMAND: "evaluate",
        TAG_MODEL_URI: ref.uri,
        "data.digest": source.digest,
        "data.source": source.uri,
        **gate.tags(),
    }
    if ref.run_id:
        tags[TAG_TRAINING_RUN] = ref.run_id
        try:
            if client.get_run(ref.run_id).info.experiment_id == experiment_id:
                tags["mlflow.parentRunId"] = ref.run_id  # nested under the training run
        except Exception:  # noqa: BLE001 - a deleted training run: keep the id tag only
            pass
    if ref.name:
        tags[TAG_MODEL_NAME] = ref.name
        tags[TAG_MODEL_VERSION] = str(ref.version)
    if baseline_uri:
        tags[TAG_BASELINE_URI] = baseline_uri
        tags[TAG_BASELINE_VERSION] = str(baseline.ref.version) if baseline is not None and baseline.ref.version else "none"
        if baseline is not None and baseline.ref.name:
            tags[TAG_BASELINE_NAME] = baseline.ref.name
    if comparison is not None:
        tags[TAG_VERDICT] = comparison.verdict
    name = run_name or f"evaluate-{ref.name + '-v' + str(ref.version) if ref.name else (ref.run_id or 'model')[:8]}"
    with tracking.tracked_run(cfg, name, tags) as run:
        run_id = result.run_id = run.info.run_id
        result.experiment_id = experiment_id
        mlflow.log_params({
            "model_uri": ref.uri,
            "data": source.uri,
            "decision_threshold": cfg.model.decision_threshold,
            "baseline_uri": baseline_uri or "",
            "shap.explainer_type": cfg.evaluation.shap.explainer_type if cfg.evaluation.shap.enabled else "off",
            "thresholds": json.dumps(cfg.evaluation.thresholds),
            "require_improvement": cfg.evaluation.require_improvement,
        })
        tracking.log_dataset(source, spec, context="evaluation")
        logged = dict(metrics)
        logged.update({f"confusion_{k}": float(v) for k, v in confusion.items()})
        logged.update({f"rows_{k}": float(v) for k, v in rows.items()})
        if baseline_metrics is not None:
            logged.update({f"baseline_{k}": v for k, v in baseline_metrics.items()})
            logged.update({f"diff_{k}": metrics[k] - v for k, v in baseline_metrics.items()})
        if comparison is not None:
            logged.update({
                "auc_diff_ci_low": comparison.auc_ci[0], "auc_diff_ci_high": comparison.auc_ci[1],
                "log_loss_diff": comparison.log_loss_diff,
                "log_loss_diff_ci_low": comparison.log_loss_ci[0], "log_loss_diff_ci_high": comparison.log_loss_ci[1],
            })
        if shap_summary:
            logged.update({metric_name(f"shap_mean_abs_{k}"): v for k, v in shap_summary["mean_abs"].items()})
        logged["gate_passed"] = float(gate.passed)
        mlflow.log_metrics({k: float(v) for k, v in logged.items() if v == v})

        threshold = cfg.model.decision_threshold
        labels = {"model": (y, scores[0])}
        if baseline is not None:
            labels[f"baseline v{baseline.ref.version}" if baseline.ref.version else "baseline"] = (y, scores[1])
        names = list(labels)
        all_metrics = [metrics] + ([baseline_metrics] if baseline_metrics is not None else [])
        figures = {
            "plots/roc_curve.png": plots.roc_figure({n: (*labels[n], m["roc_auc"]) for n, m in zip(names, all_metrics)}),
            "plots/pr_curve.png": plots.pr_figure({n: (*labels[n], m["pr_auc"]) for n, m in zip(names, all_metrics)}),
            "plots/calibration_curve.png": plots.calibration_figure(
                {n: calibration_table(s) for n, s in zip(names, sums)}
            ),
            "plots/confusion_matrix.png": plots.confusion_figure(confusion, threshold),
        }
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
            plt.close(fig)
        mlflow.log_dict({"rows": calibration_table(sums[0])}, "calibration.json")

        if explanation is not None:
            n_sample = len(picked["sample"])
            sample_expl = _slice(explanation, slice(0, n_sample))
            mlflow.log_dict(shap_summary["mean_abs"], "shap/mean_abs_shap.json")
            if n_sample:
                fig = beeswarm_figure(sample_expl, spec)
                mlflow.log_figure(fig, "shap/summary_beeswarm.png")
                plt.close(fig)
            fig = bar_figure(shap_summary["mean_abs"])
            mlflow.log_figure(fig, "shap/mean_abs_shap_bar.png")
            plt.close(fig)
            top_expl = _slice(explanation, slice(n_sample, None))
            reasons = top_reasons(top_expl, spec, k=len(spec.feature_names))
            local = []
            for i, idx in enumerate(picked["top"]):
                customer = str(picked["row_id"][idx]) or f"row {i}"
                p = float(picked["score"][idx])
                fig = waterfall_figure(top_expl, spec, i, f"customer {customer}: P(churn) = {p:.3f}")
                mlflow.log_figure(fig, f"shap/waterfall_{i + 1}_{metric_name(customer)}.png")
                plt.close(fig)
                local.append({"customer": customer, "probability": p, "base_value": float(top_expl.base_values[i]),
                              "contributions": reasons[i]})
            mlflow.log_dict({"explainer": explanation.kind, "customers": local}, "shap/top_customers.json")

        mlflow.log_dict(
            {
                "model_uri": ref.uri, "model_version": ref.version, "training_run_id": ref.run_id,
                "metrics": metrics, "confusion_matrix": confusion, "rows": rows, "gate": gate.to_dict(),
                "baseline": {"uri": baseline_uri, "metrics": baseline_metrics,
                             "comparison": comparison.to_dict() if comparison else None} if baseline_uri else None,
                "shap": shap_summary,
            },
            "evaluation.json",
        )
        _tag_versions(client, cfg, ref, tags, metrics, run_id)


def _slice(expl, idx):
    from churnlib.explain import Explanation

    return Explanation(expl.values[idx], expl.base_values[idx], expl.X[idx], expl.feature_names, expl.kind)


def version_tags(run_tags: dict[str, str], metrics: dict[str, float], run_id: str) -> dict[str, str]:
    """What a registry version carries of its latest evaluation: gate outcome, headline metrics, baseline."""
    tags = {k: v for k, v in run_tags.items() if k.startswith("churn.gate.")}
    tags[TAG_EVAL_RUN] = run_id
    # which evaluation, on which data, the gate status comes from
    tags[TAG_GATE_SOURCE] = (f"evaluation run {run_id} on {run_tags.get('data.source', '?')} "
                             f"(digest {run_tags.get('data.digest', '?')})")
    for key in ("roc_auc", "accuracy", "log_loss"):
        if key in metrics:
            tags[f"churn.eval.{key}"] = f"{metrics[key]:.6g}"
    for key in (TAG_BASELINE_URI, TAG_BASELINE_VERSION, TAG_VERDICT):
        if key in run_tags:
            tags[key] = run_tags[key]
    return tags


def _tag_versions(client: Any, cfg: Any, ref: Any, run_tags: dict[str, str], metrics: dict[str, float], run_id: str) -> None:
    """The outcome on the registry version evaluated, so `churn models` shows it.

    A ``runs:/`` URI names no version; the versions registered from that run
    (under ``model.registered_name``) are the same model and get the tags too.
    """
    tags = version_tags(run_tags, metrics, run_id)
    if ref.name and ref.version:
        targets = [(ref.name, ref.version)]
    elif ref.run_id:
        try:
            found = client.search_model_versions(f"name = '{cfg.model.registered_name}' and run_id = '{ref.run_id}'")
        except Exception:  # noqa: BLE001 - no registered model yet
            found = []
        targets = [(mv.name, mv.version) for mv in found]
    else:
        targets = []
    for name, version in targets:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
