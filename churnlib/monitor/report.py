"""``churn monitor``: per model version and window, what was predicted, how good it was, how good it likely is.

From the prediction log (``churnlib.predlog``), between ``--since`` and ``--until``:

- Serve's answers (with their raw records) and the scores of every full
  ``churn predict`` run (read from its Parquet output; a call list alone is
  not a sample of the base and is left out), each at its time;
- the outcomes: a prediction's is the customer's first outcome observed within
  ``monitoring.horizon_days`` after it (pending until then).

Per (model version, window of ``--window``):

- volume, the score's distribution (mean, quartiles, a 10-bin histogram), the
  share contacted;
- live drift of Serve's records against the version's training profile: PSI
  and KS per feature, by the same code as ``churn drift`` (``churnlib.data.profiles``);
- realized metrics on the rows whose outcome is in (ROC AUC, log loss,
  accuracy, top-decile lift, the value the contacts realized), estimated ones
  on every row from the calibrated probabilities (``churnlib.monitor.estimate``);
- alerts from ``monitoring.alerts``.

``monitor`` computes; ``record`` writes the MLflow monitoring run (each metric
per version with the window as step, the report as JSON); the CLI prints and
exits 4 when an alert fired.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churnlib import tracking
from churnlib.console import say as default_say
from churnlib.data.profiles import batch_counts, compare
from churnlib.data.sources import filesystem
from churnlib.decision.value import Decision
from churnlib.errors import ChurnError, DataError
from churnlib.figures import log_figure, pyplot
from churnlib.model import loading
from churnlib.monitor.estimate import estimated, realized
from churnlib.predlog.schema import (
    decode_features,
    outcomes,
    prediction_runs,
    predictions,
)
from churnlib.predlog.store import LogStore
from churnlib.predlog.writer import replay_orphans
from churnlib.tags import (
    TAG_COMMAND,
    TAG_MONITOR_ALERTS,
    TAG_MONITOR_SINCE,
    TAG_MONITOR_UNTIL,
)

if TYPE_CHECKING:
    from churnlib.config import Config

BATCH_COLUMNS = ["customer_id", "churn_probability", "churn_label", "contact", "expected_value"]


@dataclass
class WindowReport:
    """One model version in one window."""
    model_name: str
    model_version: str
    start: dt.datetime
    end: dt.datetime
    metrics: dict[str, float]
    histogram: list[int]
    drift: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_version": self.model_version, "start": self.start.isoformat(),
                "end": self.end.isoformat(), "metrics": self.metrics, "histogram": self.histogram,
                "drift": self.drift, "alerts": self.alerts, "notes": self.notes}


@dataclass
class MonitorResult:
    since: dt.datetime
    until: dt.datetime
    window: str
    log: str
    windows: list[WindowReport]

    @property
    def alerts(self) -> list[str]:
        return [f"{w.model_name} v{w.model_version} {w.start:%Y-%m-%d %H:%M}: {a}" for w in self.windows for a in w.alerts]

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat(), "until": self.until.isoformat(), "window": self.window,
                "log": self.log, "windows": [w.to_dict() for w in self.windows], "alerts": self.alerts}


def parse_time(value: str | None, default: dt.datetime) -> dt.datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a span back from now ("7d", "12h")."""
    if value is None:
        return default
    try:
        return dt.datetime.now(dt.timezone.utc) - pd.Timedelta(value).to_pytimedelta()
    except ValueError:
        pass
    try:
        t = pd.Timestamp(value)
    except ValueError:
        raise DataError(f"not a date, time or span: {value!r} (2026-11-01, 2026-11-01T12:00, 7d, 12h)") from None
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return t.to_pydatetime()


def _utc(values: pd.Series) -> pd.Series:
    """Timestamps as UTC (SQLite hands back naive UTC times)."""
    s = pd.to_datetime(values)
    return s.dt.tz_localize("UTC") if s.dt.tz is None else s.dt.tz_convert("UTC")


def _served(store: LogStore, since: dt.datetime, until: dt.datetime) -> pd.DataFrame:
    t = predictions
    stmt = sa.select(t.c.ts, t.c.customer_id, t.c.model_name, t.c.model_version, t.c.probability, t.c.label,
                     t.c.contact, t.c.expected_value, t.c.features).where(
        t.c.ts >= since, t.c.ts < until, t.c.route != "shadow")  # a shadow's scores were never answered
    with store.engine.connect() as conn:
        df = pd.DataFrame(conn.execute(stmt).mappings().all(), columns=[c.name for c in stmt.selected_columns])
    df["source"] = "serve"
    return df


def _batched(store: LogStore, since: dt.datetime, until: dt.datetime) -> tuple[pd.DataFrame, list[str]]:
    """The scores of the full `churn predict` runs that finished in the range (from their Parquet)."""
    import pyarrow.parquet as pq

    t = prediction_runs
    stmt = sa.select(t).where(t.c.finished >= since, t.c.finished < until, t.c.contacts_only.is_(False))
    with store.engine.connect() as conn:
        runs = conn.execute(stmt).mappings().all()
    frames, notes = [], []
    for run in runs:
        try:
            fs, path = filesystem(run["output_uri"])
            table = pq.read_table(path, filesystem=fs, columns=BATCH_COLUMNS)
        except (OSError, ValueError) as exc:
            notes.append(f"batch run {run['run_id']}: its output {run['output_uri']} cannot be read "
                         f"({str(exc).splitlines()[0][:120]}); left out")
            continue
        df = table.to_pandas().rename(columns={"churn_probability": "probability", "churn_label": "label"})
        df["customer_id"] = df["customer_id"].astype(str)
        df["ts"] = run["finished"]
        df["model_name"], df["model_version"], df["features"], df["source"] = (
            run["model_name"], run["model_version"], None, "batch")
        frames.append(df)
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def _outcomes(store: LogStore, since: dt.datetime, until: dt.datetime) -> pd.DataFrame:
    t = outcomes
    stmt = sa.select(t.c.customer_id, t.c.outcome, t.c.observed_at).where(t.c.observed_at > since,
                                                                            t.c.observed_at <= until)
    with store.engine.connect() as conn:
        return pd.DataFrame(conn.execute(stmt).mappings().all(), columns=["customer_id", "outcome", "observed_at"])


def join_outcomes(preds: pd.DataFrame, outs: pd.DataFrame, horizon: pd.Timedelta) -> pd.Series:
    """Each prediction's outcome: the customer's first one observed after it, within the horizon
    (NaN: none yet). Rows without a customer id have none."""
    result = pd.Series(np.nan, index=preds.index)
    if preds.empty or outs.empty:
        return result
    left = preds[["customer_id", "ts"]].dropna(subset=["customer_id"]).reset_index()
    left = left.sort_values("ts", kind="stable")
    right = outs.dropna().sort_values("observed_at", kind="stable")
    joined = pd.merge_asof(left, right, left_on="ts", right_on="observed_at", by="customer_id",
                           direction="forward", tolerance=horizon, allow_exact_matches=False)
    result.loc[joined["index"].to_numpy()] = joined["outcome"].to_numpy(dtype=np.float64)
    return result


class _Models:
    """Each version's feature spec, training profile and decision, loaded once (None: cannot be loaded)."""

    def __init__(self, cfg: Config):
        self._cache: dict[tuple[str, str], Any] = {}
        try:
            tracking.connect(cfg)
            self.reachable = True
        except ChurnError:  # the registry is down: the log's own metrics still come
            self.reachable = False

    def get(self, name: str, version: str):
        key = (name, version)
        if key not in self._cache:
            self._cache[key] = None
            if self.reachable and version.isdigit():
                try:
                    self._cache[key] = loading.load(f"models:/{name}/{version}").predictor
                except Exception:  # noqa: BLE001 - a note in the report, not a failure
                    pass
        return self._cache[key]


def _drift(rows: pd.DataFrame, predictor: Any, cfg: Config) -> list[dict[str, Any]]:
    blobs = rows["features"].dropna().tolist()
    if not blobs or predictor is None or predictor.profile is None:
        return []
    X = decode_features(blobs, len(predictor.spec.feature_names))
    drifts = compare(predictor.profile, batch_counts(X, predictor.profile, predictor.spec), cfg.drift.psi_moderate,
                     cfg.drift.psi_major)
    return [d.to_dict() for d in drifts]


def _alerts(metrics: dict[str, float], drift: list[dict[str, Any]], cfg: Config) -> list[str]:
    a = cfg.monitoring.alerts
    out = []
    if a.min_volume is not None and metrics["volume"] < a.min_volume:
        out.append(f"volume {int(metrics['volume'])} < {a.min_volume}")
    if a.drift_psi is not None:
        for d in drift:
            if d["psi"] > a.drift_psi:
                out.append(f"drift: {d['feature']} PSI {d['psi']:.3f} > {a.drift_psi:g}")
    for key, limit in (("realized_roc_auc", a.realized_roc_auc), ("estimated_roc_auc", a.estimated_roc_auc)):
        value = metrics.get(key)
        if limit is not None and value is not None and not math.isnan(value) and value < limit:
            out.append(f"{key} {value:.4f} < {limit:g}")
    return out


def monitor(cfg: Config, since: str | None = None, until: str | None = None, window: str | None = None,
            say: Callable[[str], None] = default_say) -> MonitorResult:
    """The report between ``since`` and ``until`` (default: the last 7 days), per version and window."""
    window = window or cfg.monitoring.window
    try:
        width = pd.Timedelta(window)
    except ValueError:
        raise DataError(f"--window: not a span: {window!r} (1d, 12h, 7d)") from None
    if width <= pd.Timedelta(0):
        raise DataError(f"--window: must be positive, got {window!r}")
    now = dt.datetime.now(dt.timezone.utc)
    end = parse_time(until, now)
    start = parse_time(since, end - dt.timedelta(days=7))
    if start >= end:
        raise DataError(f"--since ({start:%Y-%m-%d %H:%M}) is not before --until ({end:%Y-%m-%d %H:%M})")
    # what stopped replicas on this machine left in the spool (the database down, or their grace
    # time up) is part of the log: loaded first, in order, once
    replayed = replay_orphans(cfg.log_uri, cfg.spool_path)
    if replayed:
        say(f"loaded {replayed} records a stopped writer left in {cfg.spool_path}")
    store = LogStore(cfg.log_uri)
    try:
        store.migrate()
        served = _served(store, start, end)
        batched, notes = _batched(store, start, end)
        horizon = pd.Timedelta(days=cfg.monitoring.horizon_days)
        outs = _outcomes(store, start, end + horizon.to_pytimedelta())
    finally:
        store.close()
    preds = pd.concat([d for d in (served, batched) if not d.empty], ignore_index=True) if not (
        served.empty and batched.empty) else pd.DataFrame()
    result = MonitorResult(start, end, window, store.describe(), [])
    for note in notes:
        say(f"monitor: {note}")
    if preds.empty:
        say(f"monitor: no predictions between {start:%Y-%m-%d %H:%M} and {end:%Y-%m-%d %H:%M} in {store.describe()}")
        return result
    preds["ts"] = _utc(preds["ts"])
    if not outs.empty:
        outs["observed_at"] = _utc(outs["observed_at"])
        outs["customer_id"] = outs["customer_id"].astype(str)
    preds["customer_id"] = preds["customer_id"].where(preds["customer_id"].notna(), None)
    preds["outcome"] = join_outcomes(preds, outs, horizon)
    epoch = pd.Timestamp(start)
    preds["window"] = ((preds["ts"] - epoch) // width).astype(np.int64)
    models = _Models(cfg)
    threshold = cfg.model.decision_threshold
    for (name, version, k), rows in preds.groupby(["model_name", "model_version", "window"], sort=True):
        p = rows["probability"].to_numpy(dtype=np.float64)
        contact = rows["contact"].to_numpy(dtype=object)
        has_contact = not pd.isna(contact).any()
        metrics: dict[str, float] = {
            "volume": float(len(rows)), "served": float((rows["source"] == "serve").sum()),
            "batch": float((rows["source"] == "batch").sum()), "mean_probability": float(p.mean()),
            "p25_probability": float(np.quantile(p, 0.25)), "median_probability": float(np.median(p)),
            "p75_probability": float(np.quantile(p, 0.75)),
        }
        if has_contact:
            metrics["share_contacted"] = float(contact.astype(bool).mean())
        metrics.update(estimated(p, threshold))
        predictor = models.get(str(name), str(version))
        decision = predictor.decision if predictor is not None else None
        decision = decision or Decision.from_config(cfg.decision)
        known = rows["outcome"].notna().to_numpy()
        metrics["pending"] = float((~known).sum())
        metrics.update(realized(p[known], rows["outcome"].to_numpy()[known], threshold,
                                contact[known].astype(bool) if has_contact else None, decision))
        w = WindowReport(str(name), str(version), (epoch + k * width).to_pydatetime(),
                         (epoch + (k + 1) * width).to_pydatetime(), metrics,
                         np.histogram(p, bins=10, range=(0.0, 1.0))[0].tolist())
        if predictor is None:
            w.notes.append(f"version {version} could not be loaded: no drift against its profile")
        w.drift = _drift(rows[rows["source"] == "serve"], predictor, cfg)
        w.alerts = _alerts(metrics, w.drift, cfg)
        result.windows.append(w)
    return result


def lines(result: MonitorResult) -> list[str]:
    """The report as text, a block per version and window."""
    out = [f"monitor: {result.since:%Y-%m-%d %H:%M} .. {result.until:%Y-%m-%d %H:%M} UTC, windows of {result.window}, "
           f"log {result.log}"]
    for w in result.windows:
        m = w.metrics
        out.append(f"{w.model_name} v{w.model_version}  {w.start:%Y-%m-%d %H:%M} .. {w.end:%Y-%m-%d %H:%M}")
        contacted = f", {m['share_contacted']:.1%} contacted" if "share_contacted" in m else ""
        out.append(f"  volume {int(m['volume'])} ({int(m['served'])} served, {int(m['batch'])} batch); P(churn) "
                   f"mean {m['mean_probability']:.3f}, quartiles {m['p25_probability']:.3f} / "
                   f"{m['median_probability']:.3f} / {m['p75_probability']:.3f}{contacted}")
        out.append(f"  estimated: ROC AUC {m['estimated_roc_auc']:.4f}, accuracy {m['estimated_accuracy']:.4f}, "
                   f"top-decile lift {m['estimated_top_decile_lift']:.2f}")
        if "realized_roc_auc" in m:
            value = f", value realized {m['realized_value_total']:,.0f}" if "realized_value_total" in m else ""
            out.append(f"  realized on {int(m['realized_rows'])} outcomes ({int(m['pending'])} pending): ROC AUC "
                       f"{m['realized_roc_auc']:.4f}, log loss {m['realized_log_loss']:.4f}, top-decile lift "
                       f"{m['realized_top_decile_lift']:.2f}{value}")
        else:
            out.append(f"  realized: {int(m.get('realized_rows', 0))} outcomes in ({int(m['pending'])} pending)")
        if w.drift:
            worst = sorted(w.drift, key=lambda d: -d["psi"])[:3]
            out.append("  drift (PSI): " + ", ".join(f"{d['feature']} {d['psi']:.3f} {d['verdict']}" for d in worst))
        for note in w.notes:
            out.append(f"  note: {note}")
        for alert in w.alerts:
            out.append(f"  ALERT: {alert}")
    return out


def over_time_figure(windows: list[WindowReport]):
    """One version's windows: ROC AUC realized and estimated, the volume, the largest PSI."""
    plt = pyplot()
    starts = [w.start for w in windows]
    fig, (auc, vol, psi) = plt.subplots(3, 1, figsize=(7.5, 8), sharex=True)
    for key, label, style in (("realized_roc_auc", "realized (outcomes in)", "o-"),
                              ("estimated_roc_auc", "estimated (calibrated P)", "s--")):
        auc.plot(starts, [w.metrics.get(key, float("nan")) for w in windows], style, label=label)
    auc.set(ylabel="ROC AUC", title=f"{windows[0].model_name} v{windows[0].model_version} over time")
    auc.legend(loc="best")
    vol.bar(starts, [w.metrics["volume"] for w in windows], width=0.8 * (windows[0].end - windows[0].start),
            align="edge", color="#4477aa")
    vol.set(ylabel="predictions")
    psi.plot(starts, [max((d["psi"] for d in w.drift), default=float("nan")) for w in windows], "o-", color="#aa3377")
    psi.axhline(0.25, ls="--", color="grey", lw=1, label="major drift (0.25)")
    psi.set(ylabel="largest feature PSI", xlabel="window start (UTC)")
    psi.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def record(cfg: Config, result: MonitorResult, run_name: str | None = None) -> str:
    """The MLflow monitoring run: per version, each metric with the window as step; the report JSON."""
    import mlflow

    tags = {TAG_COMMAND: "monitor", TAG_MONITOR_SINCE: result.since.isoformat(),
            TAG_MONITOR_UNTIL: result.until.isoformat(), TAG_MONITOR_ALERTS: str(len(result.alerts))}
    name = run_name or f"monitor-{result.since:%Y%m%d}-{result.until:%Y%m%d}"
    with tracking.tracked_run(cfg, name, tags) as run:
        steps: dict[tuple[str, str], int] = {}
        for w in result.windows:
            key = (w.model_name, w.model_version)
            step = steps.get(key, 0)
            steps[key] = step + 1
            stamp = int(w.start.timestamp() * 1000)
            values = {f"v{w.model_version}/{k}": float(v) for k, v in w.metrics.items()
                      if v is not None and not math.isnan(float(v))}
            values[f"v{w.model_version}/alerts"] = float(len(w.alerts))
            values.update({f"v{w.model_version}/psi_{d['feature']}".replace(" ", "_"): float(d["psi"]) for d in w.drift})
            mlflow.log_metrics(values, step=step, timestamp=stamp)
        mlflow.log_dict(result.to_dict(), "monitor/report.json")
        by_version: dict[tuple[str, str], list[WindowReport]] = {}
        for w in result.windows:
            by_version.setdefault((w.model_name, w.model_version), []).append(w)
        for (name, version), windows in by_version.items():
            log_figure(over_time_figure(windows), f"monitor/{name}_v{version}.png")
        return run.info.run_id
