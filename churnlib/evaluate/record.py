"""The evaluation's MLflow record: metrics, plots, SHAP, the comparison, the gates, and the version's gate tags.

When the model is a registry version, the gate outcome is also tagged on that version
(``version_tags``): this module is the one writer of a version's gate tags.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from churnlib import tracking
from churnlib.decision.value import Decision
from churnlib.evaluate import plots
from churnlib.evaluate.metrics import (
    calibration_table,
)
from churnlib.evaluate.result import EvaluationResult
from churnlib.figures import log_figure
from churnlib.model.explain import (
    Explanation,
    bar_figure,
    beeswarm_figure,
    top_reasons,
    waterfall_figure,
)
from churnlib.model.loading import logged_model_uri
from churnlib.tags import (
    TAG_BASELINE_NAME,
    TAG_BASELINE_URI,
    TAG_BASELINE_VERSION,
    TAG_COMMAND,
    TAG_EVAL_PREFIX,
    TAG_EVAL_RUN,
    TAG_GATE_SOURCE,
    TAG_GATE_STATUS,
    TAG_GATE_SUMMARY,
    TAG_MODEL_NAME,
    TAG_MODEL_URI,
    TAG_MODEL_VERSION,
    TAG_TRAINING_RUN,
    TAG_VERDICT,
)
from churnlib.tracking import metric_name

if TYPE_CHECKING:
    from churnlib.config import Config


def log_evaluation(
    cfg: Config,
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
    raw_sums: dict[str, Any] | None = None,
) -> None:
    """The evaluation run: metrics, plots, SHAP artifacts, gate tags; sets ``result.run_id``.
    ``raw_sums``: the model's sums before calibration (a calibrated model), for the reliability diagram."""
    import mlflow
    from mlflow import MlflowClient

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
            **{f"decision.{k}": v for k, v in cfg.decision.model_dump().items()},
        })
        dataset = tracking.log_dataset(source, spec, context="evaluation")
        logged = dict(metrics)
        logged.update({f"confusion_{k}": float(v) for k, v in confusion.items()})
        logged.update({f"rows_{k}": float(v) for k, v in rows.items()})
        if baseline_metrics is not None:
            logged.update({f"baseline_{k}": v for k, v in baseline_metrics.items()})
            logged.update({f"diff_{k}": metrics[k] - v for k, v in baseline_metrics.items() if k in metrics})
        if comparison is not None:
            logged.update({
                "auc_diff_ci_low": comparison.auc_ci[0], "auc_diff_ci_high": comparison.auc_ci[1],
                "log_loss_diff": comparison.log_loss_diff,
                "log_loss_diff_ci_low": comparison.log_loss_ci[0], "log_loss_diff_ci_high": comparison.log_loss_ci[1],
            })
            if comparison.value_ci is not None:
                logged.update({"value_diff_per_customer": comparison.value_diff,
                               "value_diff_ci_low": comparison.value_ci[0],
                               "value_diff_ci_high": comparison.value_ci[1]})
        if shap_summary:
            logged.update({metric_name(f"shap_mean_abs_{k}"): v for k, v in shap_summary["mean_abs"].items()})
        logged["gate_passed"] = float(gate.passed)
        # the headline metrics keep their names (the gates' names); the rest get MLflow sections
        mlflow.log_metrics({tracking.grouped(k): float(v) for k, v in logged.items() if v == v})
        # ... and the evaluated model shows them, measured on this dataset, in the models table
        model_uri = _logged_model_uri(ref)
        if model_uri:
            tracking.log_model_metrics(metrics, model_uri, dataset)

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
                | ({"model before calibration": calibration_table(raw_sums)} if raw_sums is not None else {})
            ),
            "plots/confusion_matrix.png": plots.confusion_figure(confusion, threshold),
            "plots/cumulative_gains.png": plots.gains_figure(labels),
            "plots/lift_curve.png": plots.lift_figure(labels),
            "plots/profit_curve.png": plots.profit_figure(
                labels, Decision.from_config(cfg.decision),
                {n: m.get("value_threshold", math.inf) for n, m in zip(names, all_metrics)}),
        }
        for path, fig in figures.items():
            log_figure(fig, path)
        mlflow.log_dict({"rows": calibration_table(sums[0]),
                         **({"before_calibration": calibration_table(raw_sums)} if raw_sums is not None else {})},
                        "calibration.json")

        if explanation is not None:
            n_sample = len(picked["sample"])
            sample_expl = _slice(explanation, slice(0, n_sample))
            mlflow.log_dict(shap_summary["mean_abs"], "shap/mean_abs_shap.json")
            if n_sample:
                fig = beeswarm_figure(sample_expl, spec)
                log_figure(fig, "shap/summary_beeswarm.png")
            fig = bar_figure(shap_summary["mean_abs"])
            log_figure(fig, "shap/mean_abs_shap_bar.png")
            top_expl = _slice(explanation, slice(n_sample, None))
            reasons = top_reasons(top_expl, spec, k=len(spec.feature_names))
            local = []
            for i, idx in enumerate(picked["top"]):
                customer = str(picked["row_id"][idx]) or f"row {i}"
                p = float(picked["score"][idx])
                fig = waterfall_figure(top_expl, spec, i, f"customer {customer}: P(churn) = {p:.3f}")
                log_figure(fig, f"shap/waterfall_{i + 1}_{metric_name(customer)}.png")
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
    return Explanation(expl.values[idx], expl.base_values[idx], expl.X[idx], expl.feature_names, expl.kind)


# What a registry version shows of its latest evaluation: what a person reads in the
# versions table (the gate's status and one-line summary, where it comes from, three
# headline metrics: ranking, probabilities, money). Each check's detail, the baseline and the comparison stay on the
# evaluation run (``churn.eval.run_id`` links to it).
VERSION_EVAL_METRICS = ("roc_auc", "log_loss", "expected_value_per_customer")


def version_tags(run_tags: dict[str, str], metrics: dict[str, float], run_id: str) -> dict[str, str]:
    """What a registry version carries of its latest evaluation: gate status and summary, its
    source, the headline metrics (the rest is on the evaluation run)."""
    tags = {k: run_tags[k] for k in (TAG_GATE_STATUS, TAG_GATE_SUMMARY) if k in run_tags}
    tags[TAG_EVAL_RUN] = run_id
    # which evaluation, on which data, the gate status comes from
    tags[TAG_GATE_SOURCE] = (f"evaluation run {run_id} on {run_tags.get('data.source', '?')} "
                             f"(digest {run_tags.get('data.digest', '?')})")
    for key in VERSION_EVAL_METRICS:
        if key in metrics:
            tags[f"{TAG_EVAL_PREFIX}{key}"] = f"{metrics[key]:.6g}"
    return tags


def _tag_versions(client: Any, cfg: Config, ref: Any, run_tags: dict[str, str], metrics: dict[str, float], run_id: str) -> None:
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


def _logged_model_uri(ref: Any) -> str | None:
    """The ``models:/m-...`` logged model behind an evaluated reference (a registry version, a
    run's model, or the logged model itself), or None when there is none to attach metrics to."""
    from mlflow import MlflowClient

    try:
        if ref.uri.startswith("models:/m-"):
            return ref.uri
        if ref.name and ref.version:
            source = MlflowClient().get_model_version(ref.name, str(ref.version)).source or ""
            if source.startswith("models:/m-"):
                return source
        if ref.run_id:
            return logged_model_uri(ref.run_id)
    except Exception:  # noqa: BLE001 - a model without a logged model (older runs): the run holds the metrics
        return None
    return None
