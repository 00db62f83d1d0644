"""Rollouts without Serve: the routing hash, the rollout's state, and the live comparison from a real
prediction log (SQLite) against scikit-learn on the same joined rows. The serving side (shadow,
canary, promote, abort on a real Serve app) is in test_serve.py."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid

import numpy as np
import pytest

from churnlib.errors import ConfigError
from churnlib.rollout.state import Rollout, bucket
from tests.conftest import REPO, make_config


@pytest.mark.unit
def test_canary_share_is_within_3_points_over_5000_customers_and_sticky_everywhere():
    rollout = Rollout(mode="canary", version="2", share=0.1, started_at="2026-12-01T00:00:00+00:00")
    ids = [f"C{i:06d}" for i in range(5000)]
    chosen = [rollout.challenger_answers(c) for c in ids]
    assert abs(sum(chosen) / len(ids) - 0.1) <= 0.03
    assert chosen == [rollout.challenger_answers(c) for c in ids]  # the same customer, the same version
    # and in another process (a replica elsewhere): not Python's per-process salted hash
    code = ("import sys; from churnlib.rollout.state import bucket; "
            "print(','.join(repr(bucket(f'C{i:06d}')) for i in range(200)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert out == ",".join(repr(bucket(c)) for c in ids[:200])
    for share in (0.05, 0.3, 0.5):
        got = np.mean([bucket(c) < share for c in ids])
        assert abs(got - share) <= 0.03, share


@pytest.mark.unit
def test_rollout_state_round_trips_and_refuses_bad_values():
    r = Rollout(mode="canary", version="7", share=0.25, started_at="2026-12-01T10:00:00+00:00", run_id="abc")
    assert Rollout.from_tag(r.to_tag()) == r
    assert Rollout.from_tag(None) is None
    with pytest.raises(ConfigError, match="rollout mode must be one of shadow, canary"):
        Rollout(mode="blue-green", version="7")
    with pytest.raises(ConfigError, match="--share must be between 0 and 1"):
        Rollout(mode="canary", version="7", share=1.5)
    assert Rollout(mode="shadow", version="7").challenger_answers("anyone") is False


def _log(cfg, rows: list[dict], outcomes: list[dict]) -> None:
    from churnlib.predlog.store import LogStore

    store = LogStore(cfg.log_uri)
    store.migrate()
    store.insert_predictions(rows)
    store.insert_outcomes(outcomes)
    store.close()


def _row(ts, request_id, cid, version, route, p, contact=None) -> dict:
    return {"prediction_id": uuid.uuid4().hex, "ts": ts, "request_id": request_id, "customer_id": cid,
            "model_name": "m", "model_version": version, "route": route, "endpoint": "predict",
            "probability": float(p), "label": int(p >= 0.5), "contact": contact, "expected_value": None,
            "features": b"", "latency_ms": 1.0}


def test_shadow_status_pairs_each_request_and_matches_sklearn(tmp_path):
    """A shadow rollout's log: champion and shadow rows under one request id; outcomes for most
    customers. The realized AUCs are sklearn's on the same joined rows, the pairs agree as counted
    by hand, the paired interval holds the difference, and the verdict follows the criteria."""
    from sklearn.metrics import roc_auc_score

    from churnlib.rollout.status import status

    cfg = make_config(tmp_path, **{"model.registered_name": "m", "rollout.criteria.min_volume": 500,
                                   "rollout.criteria.min_outcomes": 300, "rollout.criteria.bootstrap": 200})
    rng = np.random.default_rng(3)
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    n = 800
    y = rng.integers(0, 2, n)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.01, 0.99)  # the challenger: better
    poor = np.clip(0.5 + (y - 0.5) * 0.2 + rng.normal(0, 0.3, n), 0.01, 0.99)
    rows, outs = [], []
    for i in range(n):
        ts = start + dt.timedelta(minutes=i)
        rows.append(_row(ts, f"r{i}", f"c{i}", "1", "champion", poor[i], bool(poor[i] > 0.3)))
        rows.append(_row(ts, f"r{i}", f"c{i}", "2", "shadow", good[i], bool(good[i] > 0.3)))
        if i % 10:  # 90 % of the outcomes are in
            outs.append({"customer_id": f"c{i}", "outcome": int(y[i]), "observed_at": ts + dt.timedelta(days=20),
                         "loaded_at": ts, "source": "t"})
    rows.append(_row(start, "other", "x", "9", "champion", 0.5))  # another version: not part of it
    _log(cfg, rows, outs)
    rollout = Rollout(mode="shadow", version="2", started_at=start.isoformat())
    s = status(cfg, rollout, "1", until=start + dt.timedelta(days=2))
    known = np.array([i % 10 != 0 for i in range(n)])
    assert s["champion"]["records"] == s["challenger"]["records"] == s["pairs"] == n
    assert s["champion"]["outcomes"] == s["challenger"]["outcomes"] == known.sum()
    assert s["champion"]["roc_auc"] == pytest.approx(roc_auc_score(y[known], poor[known]), abs=1e-12)
    assert s["challenger"]["roc_auc"] == pytest.approx(roc_auc_score(y[known], good[known]), abs=1e-12)
    assert s["agreement"]["label"] == pytest.approx(np.mean((poor >= 0.5) == (good >= 0.5)))
    assert s["agreement"]["mean_abs_probability_difference"] == pytest.approx(np.mean(np.abs(poor - good)))
    lo, hi = s["evidence"]["interval"]
    assert s["evidence"]["paired"] and lo < s["evidence"]["difference"] < hi and lo > 0
    assert s["verdict"] == {"promote": True, "reasons": []}
    kept, cost = cfg.decision.save_rate * cfg.decision.value_saved, cfg.decision.contact_cost
    c = good[known] > 0.3
    assert s["challenger"]["value_per_customer"] == pytest.approx((y[known][c] * kept - cost).sum() / known.sum())
    # the other way round (the weaker one challenging) is refused, with the numbers
    worse = status(cfg, Rollout(mode="shadow", version="1", started_at=start.isoformat()), "2",
                   until=start + dt.timedelta(days=2))
    assert worse["challenger"]["records"] == 0  # version 1 never ran as a shadow
    assert not worse["verdict"]["promote"] and "min_volume is 500" in worse["verdict"]["reasons"][0]


def test_canary_status_compares_two_groups_and_wants_outcomes(tmp_path):
    from churnlib.rollout.status import lines, status

    cfg = make_config(tmp_path, **{"model.registered_name": "m", "rollout.criteria.min_volume": 100,
                                   "rollout.criteria.min_outcomes": 50, "rollout.criteria.bootstrap": 200})
    start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(600):
        route, version = ("challenger", "2") if bucket(f"c{i}") < 0.3 else ("champion", "1")
        rows.append(_row(start + dt.timedelta(seconds=i), f"r{i}", f"c{i}", version, route, rng.random()))
    _log(cfg, rows, [])
    s = status(cfg, Rollout(mode="canary", version="2", share=0.3, started_at=start.isoformat()), "1",
               until=start + dt.timedelta(days=1))
    assert s["champion"]["records"] + s["challenger"]["records"] == 600
    assert s["challenger"]["share_answered"] == pytest.approx(s["challenger"]["records"] / 600)
    assert "pairs" not in s and s["score_psi"] is not None and s["score_psi"] < 0.1  # the same scores
    assert not s["verdict"]["promote"]
    assert "outcomes joined: champion 0, challenger 0; rollout.criteria.min_outcomes is 50" in s["verdict"]["reasons"][0]
    text = "\n".join(lines(s))
    assert "rollout of m: canary 30%" in text and "verdict: not yet" in text


def test_bad_rollout_commands_are_one_line_and_change_nothing(tmp_path):
    """No champion, the champion as its own challenger, no staging, a bad share, no rollout to
    promote or abort: one line each, exit 2, and neither the aliases nor the rollout tag move."""
    from churnlib.data.generation import generate
    from churnlib.errors import RegistryError
    from churnlib.registry.registry import Registry
    from churnlib.rollout import commands
    from tests.conftest import log_local_model, run_cli

    cfg = make_config(tmp_path)
    data = generate(1500, tmp_path / "t.parquet", seed=3)
    reg = Registry(cfg, say=lambda m: None)
    v1, _ = reg.register(log_local_model(cfg, data, rounds=5, run_name="one"))
    v2, _ = reg.register(log_local_model(cfg, data, rounds=6, run_name="two"))
    quiet = {"say": lambda m: None}
    with pytest.raises(RegistryError, match="has no 'champion' to challenge"):
        commands.start(cfg, "shadow", version=v2.version, **quiet)
    reg.promote(v1.version, force=True)
    with pytest.raises(RegistryError, match=f"version {v1.version} is the champion"):
        commands.start(cfg, "shadow", version=v1.version, **quiet)
    with pytest.raises(RegistryError, match="has no 'staging' version: give --version N"):
        commands.start(cfg, "canary", **quiet)
    with pytest.raises(RegistryError, match="has no rollout"):
        commands.promote(cfg, **quiet)
    with pytest.raises(RegistryError, match="has no rollout"):
        commands.abort(cfg, **quiet)
    assert reg.aliases() == {"champion": v1.version}
    assert commands.current(reg) is None
    ws = ["--set", f"workspace={tmp_path / '.churn'}"]
    bad = run_cli("rollout", "start", "--mode", "canary", "--share", "1.5", "--version", v2.version, *ws)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --share must be between 0 and 1 (exclusive), got 1.5"
    none = run_cli("rollout", "status", *ws)
    assert none.returncode == 2 and none.stderr.strip().splitlines()[-1].startswith("error: xgboost_churn_model has no rollout")
    assert reg.aliases() == {"champion": v1.version} and commands.current(reg) is None
