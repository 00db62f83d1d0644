"""The live evidence of a rollout, from the prediction log: the challenger against the champion.

Rows since the rollout started, of the registered model, answered by
``/predict`` (``/explain`` answers are not routed): route ``champion`` and
``challenger`` (canary: each answered its own customers) or ``shadow`` (the
challenger scored the champion's records off the response path, under the
same request id).

- volume of each; latency of each (the model time the replica measured);
- shadow: the pairs (a request's champion and shadow rows, in order): label and
  contact agreement, mean absolute difference of the probabilities;
- the PSI between the two score distributions (tenths of P);
- where outcomes are in (joined by customer within ``monitoring.horizon_days``):
  realized ROC AUC, top-decile lift and value per customer of each, and the
  difference challenger - champion with a bootstrap interval: paired in shadow
  mode (the same customers resampled for both), independent in canary mode
  (two groups of different customers);
- the verdict of the configured criteria (``rollout.criteria``): enough volume,
  enough outcomes, and the challenger no worse than the champion beyond the
  margin on the chosen metric (the interval's lower end above ``-margin``).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from churnlib.config import Config
from churnlib.data.profiles import psi
from churnlib.decision.value import gains_and_lift
from churnlib.monitor.report import _outcomes, _utc, join_outcomes
from churnlib.predlog.schema import predictions
from churnlib.predlog.store import LogStore
from churnlib.rollout.state import Rollout

METRICS = ("roc_auc", "top_decile_lift", "value_per_customer")


def _rows(store: LogStore, name: str, since: dt.datetime, until: dt.datetime) -> pd.DataFrame:
    t = predictions
    stmt = (sa.select(t.c.id, t.c.ts, t.c.request_id, t.c.customer_id, t.c.model_version, t.c.route,
                      t.c.probability, t.c.label, t.c.contact, t.c.latency_ms)
            .where(t.c.model_name == name, t.c.ts >= since, t.c.ts < until, t.c.endpoint == "predict",
                   t.c.route.in_(("champion", "challenger", "shadow")))
            .order_by(t.c.id))
    with store.engine.connect() as conn:
        df = pd.DataFrame(conn.execute(stmt).mappings().all(), columns=[c.name for c in stmt.selected_columns])
    df["ts"] = _utc(df["ts"]) if len(df) else pd.Series(dtype="datetime64[ns, UTC]")
    return df


def _metric(name: str, p: np.ndarray, y: np.ndarray, c: np.ndarray | None, worth: tuple[float, float]) -> float:
    """One metric of a side; value per customer: what the contacts that version decided realized
    (a churner kept is worth save_rate x value_saved, a contact costs contact_cost), over all
    its customers with an outcome."""
    from sklearn.metrics import roc_auc_score

    if len(y) == 0:
        return float("nan")
    if name == "roc_auc":
        return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    if name == "top_decile_lift":
        return gains_and_lift(p, y, (0.1,))[0.1][1] if y.sum() > 0 else float("nan")
    if c is None:
        return float("nan")
    kept, cost = worth
    return float((y[c] * kept - cost).sum() / len(y))


def _pick(c: np.ndarray | None, i: np.ndarray) -> np.ndarray | None:
    return None if c is None else c[i]


def _interval(rng: np.random.Generator, n_boot: int, metric: str, champion: tuple, challenger: tuple,
              paired: bool, worth: tuple[float, float]) -> tuple[float, float]:
    """95 % bootstrap interval of metric(challenger) - metric(champion). Sides are (p, y, contact);
    paired: the same rows (customers) on both sides, resampled together."""
    diffs = []
    (p1, y1, c1), (p2, y2, c2) = champion, challenger
    for _ in range(n_boot):
        i = rng.integers(0, len(y1), len(y1))
        j = i if paired else rng.integers(0, len(y2), len(y2))
        diffs.append(_metric(metric, p2[j], y2[j], _pick(c2, j), worth)
                     - _metric(metric, p1[i], y1[i], _pick(c1, i), worth))
    d = np.array([x for x in diffs if not math.isnan(x)])
    if len(d) < n_boot // 2:
        return float("nan"), float("nan")
    return float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))


def _latency(df: pd.DataFrame) -> dict[str, float | None]:
    lat = df["latency_ms"].dropna().to_numpy(dtype=np.float64)
    if not len(lat):
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": float(np.quantile(lat, 0.5)), "p99_ms": float(np.quantile(lat, 0.99))}


def _contacts(frame: pd.DataFrame) -> np.ndarray | None:
    """The contact decisions as logged (None when a row has none: a model without a decision)."""
    if not len(frame) or frame["contact"].isna().any():
        return None if len(frame) else np.zeros(0, dtype=bool)
    return frame["contact"].to_numpy(dtype=bool)


def _shares(p: np.ndarray) -> np.ndarray:
    counts = np.histogram(np.clip(p, 0, 1), bins=np.linspace(0, 1, 11))[0].astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def status(cfg: Config, rollout: Rollout, champion_version: str | None,
           until: dt.datetime | None = None) -> dict[str, Any]:
    """The comparison and the criteria's verdict (a dict, as ``churn rollout status --json`` prints)."""
    until = until or dt.datetime.now(dt.timezone.utc)
    since = rollout.started
    name = cfg.model.registered_name
    store = LogStore(cfg.log_uri)
    try:
        store.migrate()
        rows = _rows(store, name, since, until)
        horizon = pd.Timedelta(days=cfg.monitoring.horizon_days)
        outs = _outcomes(store, since, until + horizon.to_pytimedelta())
    finally:
        store.close()
    challenger_route = "shadow" if rollout.mode == "shadow" else "challenger"
    champ = rows[(rows["route"] == "champion") & (rows["model_version"] == str(champion_version))]
    chal = rows[(rows["route"] == challenger_route) & (rows["model_version"] == rollout.version)]
    if len(outs):
        outs = outs.assign(observed_at=_utc(outs["observed_at"]))
    crit = cfg.rollout.criteria
    worth = (cfg.decision.save_rate * cfg.decision.value_saved, cfg.decision.contact_cost)
    out: dict[str, Any] = {
        "model": name, "mode": rollout.mode, "share": rollout.share, "started_at": rollout.started_at,
        "until": until.isoformat(), "run_id": rollout.run_id,
        "champion": {"version": champion_version, "records": int(len(champ)), **_latency(champ)},
        "challenger": {"version": rollout.version, "route": challenger_route, "records": int(len(chal)),
                       **_latency(chal)},
        "criteria": {"metric": crit.metric, "margin": crit.margin, "min_volume": crit.min_volume,
                     "min_outcomes": crit.min_outcomes},
    }
    if rollout.mode == "canary":
        total = len(champ) + len(chal)
        out["challenger"]["share_answered"] = len(chal) / total if total else None
    out["score_psi"] = (psi(_shares(champ["probability"].to_numpy()), _shares(chal["probability"].to_numpy()))
                        if len(champ) and len(chal) else None)
    rng = np.random.default_rng(cfg.rollout.seed)
    paired = None
    if rollout.mode == "shadow" and len(champ) and len(chal):
        left = champ.assign(k=champ.groupby("request_id").cumcount())
        right = chal.assign(k=chal.groupby("request_id").cumcount())
        paired = left.merge(right, on=["request_id", "k"], suffixes=("", "_chal"))
        paired = paired[paired["customer_id"].fillna("") == paired["customer_id_chal"].fillna("")]
        out["pairs"] = int(len(paired))
        if len(paired):
            out["agreement"] = {
                "label": float((paired["label"] == paired["label_chal"]).mean()),
                "contact": (float((paired["contact"] == paired["contact_chal"]).mean())
                            if paired["contact"].notna().all() and paired["contact_chal"].notna().all() else None),
                "mean_abs_probability_difference": float(
                    (paired["probability"] - paired["probability_chal"]).abs().mean()),
            }
    # outcomes
    sides = {}
    for key, frame in (("champion", champ), ("challenger", chal)):
        y = join_outcomes(frame, outs, horizon) if len(frame) else pd.Series(dtype=np.float64)
        known = frame[y.notna()] if len(frame) else frame
        yk = y[y.notna()].to_numpy(dtype=np.int64)
        pk = known["probability"].to_numpy(dtype=np.float64) if len(known) else np.array([])
        ck = _contacts(known)
        sides[key] = (pk, yk, ck)
        out[key]["outcomes"] = int(len(yk))
        for m in METRICS:
            out[key][m] = _metric(m, pk, yk, ck, worth)
    metric = crit.metric
    diff = out["challenger"][metric] - out["champion"][metric]
    evidence: dict[str, Any] = {"difference": None if math.isnan(diff) else diff, "interval": None,
                                "paired": rollout.mode == "shadow"}
    enough_outcomes = min(out["champion"]["outcomes"], out["challenger"]["outcomes"]) >= crit.min_outcomes
    if enough_outcomes:
        if rollout.mode == "shadow" and paired is not None and len(paired):
            y = join_outcomes(paired, outs, horizon)
            keep = y.notna().to_numpy()
            yk = y.to_numpy()[keep].astype(np.int64)
            both = paired[keep]
            a = (both["probability"].to_numpy(dtype=np.float64), yk, _contacts(both))
            b = (both["probability_chal"].to_numpy(dtype=np.float64), yk,
                 _contacts(pd.DataFrame({"contact": both["contact_chal"].to_numpy()})))
            point = _metric(metric, b[0], yk, b[2], worth) - _metric(metric, a[0], yk, a[2], worth)
            evidence["difference"] = None if math.isnan(point) else point
            lo, hi = _interval(rng, crit.bootstrap, metric, a, b, True, worth)
        else:
            lo, hi = _interval(rng, crit.bootstrap, metric, sides["champion"], sides["challenger"], False, worth)
        evidence["interval"] = None if math.isnan(lo) else [lo, hi]
    out["evidence"] = evidence
    # the verdict
    reasons = []
    volume = out["challenger"]["records"]
    if volume < crit.min_volume:
        reasons.append(f"the challenger has {volume} live records; rollout.criteria.min_volume is {crit.min_volume}")
    if not enough_outcomes:
        if crit.require_outcomes:
            reasons.append(f"outcomes joined: champion {out['champion']['outcomes']}, challenger "
                           f"{out['challenger']['outcomes']}; rollout.criteria.min_outcomes is {crit.min_outcomes}")
    elif evidence["interval"] is None:
        reasons.append(f"{metric}: no interval (one class only among the outcomes)")
    elif evidence["interval"][0] < -crit.margin:
        lo, hi = evidence["interval"]
        reasons.append(f"{metric}: challenger - champion = {evidence['difference']:+.4f}, 95 % interval "
                       f"[{lo:+.4f}, {hi:+.4f}] reaches below -{crit.margin:g} (rollout.criteria.margin)")
    out["verdict"] = {"promote": not reasons, "reasons": reasons}
    return _clean(out)


def _clean(value: Any) -> Any:
    """NaN -> None, numpy scalars -> Python: JSON as people and tools read it."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def lines(s: dict[str, Any]) -> list[str]:
    """The status as people read it."""
    def num(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    c, h = s["champion"], s["challenger"]
    out = [f"rollout of {s['model']}: {s['mode']}" + (f" {s['share']:.0%}" if s["mode"] == "canary" else "")
           + f", since {s['started_at']}",
           f"{'':22s}{'champion':>12s}{'challenger':>12s}",
           f"{'version':22s}{c['version'] or '-':>12s}{h['version']:>12s}",
           f"{'records':22s}{c['records']:>12d}{h['records']:>12d}",
           f"{'latency p50 / p99 ms':22s}{num(c['p50_ms'], '.2f') + '/' + num(c['p99_ms'], '.1f'):>12s}"
           f"{num(h['p50_ms'], '.2f') + '/' + num(h['p99_ms'], '.1f'):>12s}",
           f"{'outcomes joined':22s}{c['outcomes']:>12d}{h['outcomes']:>12d}"]
    for m in METRICS:
        out.append(f"{m:22s}{num(c[m]):>12s}{num(h[m]):>12s}")
    if "agreement" in s:
        a = s["agreement"]
        out.append(f"pairs {s['pairs']}: label agreement {a['label']:.3f}, contact agreement "
                   f"{num(a['contact'], '.3f')}, mean |dP| {a['mean_abs_probability_difference']:.4f}")
    if s["score_psi"] is not None:
        out.append(f"score distribution PSI (challenger vs champion): {s['score_psi']:.4f}")
    e = s["evidence"]
    if e["interval"] is not None:
        out.append(f"{s['criteria']['metric']} challenger - champion: {e['difference']:+.4f}, 95 % interval "
                   f"[{e['interval'][0]:+.4f}, {e['interval'][1]:+.4f}] ({'paired' if e['paired'] else 'independent'}"
                   " bootstrap)")
    v = s["verdict"]
    out.append("verdict: promote" if v["promote"] else f"verdict: not yet ({'; '.join(v['reasons'])})")
    return out
