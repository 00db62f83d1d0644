"""`churn rollout start | status | promote | abort`: the registry writes, the MLflow run, the checks.

- ``start --mode shadow|canary [--share S] [--version N]``: the challenger is
  ``--version``, else the version behind ``staging``; it must not be the
  champion, and a canary (customers see its answers) needs its offline gates
  passed, or ``--force``. Writes the ``challenger`` alias and the rollout tag
  (a running rollout changes mode or share in place: same run, same start);
  starts the rollout's MLflow run.
- ``status``: ``churnlib.rollout.status`` on the log; each call logs the
  comparison to the rollout's run (step = minutes since the start), so the
  run shows the status over time.
- ``promote [--force]``: the live criteria hold (else ``PromotionRefusedError``,
  exit 3, no alias moves), then ``champion`` moves as ``churn models promote``
  moves it (the old champion becomes ``previous``), the live evidence recorded
  on the version; the rollout ends.
- ``abort``: the rollout ends; replicas drop the challenger within one poll.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Callable

from churnlib import tracking
from churnlib.config import Config
from churnlib.console import say as default_say
from churnlib.errors import PromotionRefusedError, RegistryError
from churnlib.registry.registry import CHAMPION, STAGING, Registry, _who, mlflow_errors
from churnlib.rollout import state
from churnlib.rollout.state import CHALLENGER, Rollout
from churnlib.rollout.status import status as compare
from churnlib.tags import (
    TAG_COMMAND,
    TAG_ROLLOUT,
    TAG_ROLLOUT_CHALLENGER,
    TAG_ROLLOUT_CHAMPION,
    TAG_ROLLOUT_MODE,
    TAG_ROLLOUT_OUTCOME,
)


def current(reg: Registry) -> Rollout | None:
    with mlflow_errors(f"reading {reg.name}"):
        try:
            return state.read(reg.client, reg.name)
        except (ValueError, TypeError) as exc:
            raise RegistryError(f"{reg.name}: the {TAG_ROLLOUT} tag cannot be read ({exc}); "
                                f"`churn rollout abort` removes it") from None


def _require(reg: Registry) -> Rollout:
    found = current(reg)
    if found is None:
        raise RegistryError(f"{reg.name} has no rollout: `churn rollout start --mode shadow` begins one")
    return found


def start(cfg: Config, mode: str | None = None, share: float | None = None, version: str | None = None,
          force: bool = False, say: Callable[[str], None] = default_say) -> Rollout:
    reg = Registry(cfg, say=say)
    mode = mode or cfg.rollout.mode
    share = cfg.rollout.share if share is None else share
    running = current(reg)
    if version is None:
        if running is not None:
            target = reg.version(running.version)
        else:
            staged = reg.alias(STAGING)
            if staged is None:
                raise RegistryError(f"{reg.name} has no {STAGING!r} version: give --version N")
            target = staged
    else:
        target = reg.version(version)
    champion = reg.alias(CHAMPION)
    if champion is None:
        raise RegistryError(f"{reg.name} has no {CHAMPION!r} to challenge: `churn models promote` one first")
    if champion.version == target.version:
        raise RegistryError(f"version {target.version} is the champion: a challenger must be another version")
    if mode == "canary" and target.gate == "failed" and not force:
        raise PromotionRefusedError(f"refused: version {target.version}'s latest evaluation failed its gates; "
                                    f"a canary shows its answers to customers (--force to start anyway)")
    same = running is not None and running.version == target.version
    rollout = Rollout(mode=mode, version=target.version, share=share if mode == "canary" else 0.0,
                      started_at=running.started_at if same else dt.datetime.now(dt.timezone.utc).isoformat(),
                      started_by=running.started_by if same else _who(),
                      run_id=running.run_id if same else None)
    if not same:
        if running is not None:
            _end_run(cfg, running, f"replaced by version {target.version}")
        rollout = Rollout(**{**rollout.__dict__, "run_id": _start_run(cfg, rollout, champion.version)})
    with mlflow_errors(f"starting the rollout of {reg.name} version {target.version}"):
        reg.client.set_registered_model_alias(reg.name, CHALLENGER, target.version)
        reg.client.set_registered_model_tag(reg.name, TAG_ROLLOUT, rollout.to_tag())
    if rollout.run_id:
        _client(cfg).set_tag(rollout.run_id, TAG_ROLLOUT_MODE, f"{mode} {share:g}" if mode == "canary" else mode)
    what = f"canary, {share:.0%} of customers" if mode == "canary" else "shadow"
    verb = "now" if same else "started"
    say(f"rollout {verb}: version {target.version} challenges champion {champion.version} ({what}); replicas "
        f"follow within serve.poll_interval_s ({cfg.serve.poll_interval_s:g} s)")
    return rollout


def _evidence(reg: Registry, cfg: Config, record: bool) -> tuple[Rollout, dict[str, Any]]:
    """The running rollout and its comparison from the log (logged to its run when ``record``)."""
    rollout = _require(reg)
    champion = reg.alias(CHAMPION)
    found = compare(cfg, rollout, champion.version if champion else None)
    if record and rollout.run_id:
        _log_status(cfg, rollout, found)
    return rollout, found


def status(cfg: Config, record: bool = True, say: Callable[[str], None] = default_say) -> dict[str, Any]:
    return _evidence(Registry(cfg, say=say), cfg, record)[1]


def promote(cfg: Config, force: bool = False, say: Callable[[str], None] = default_say) -> dict[str, Any]:
    reg = Registry(cfg, say=say)
    rollout, found = _evidence(reg, cfg, record=True)
    reasons = found["verdict"]["reasons"]
    if reasons and not force:
        raise PromotionRefusedError(f"refused: {reasons[0]}")
    if reasons:
        say(f"rollout promote: promoting anyway (--force): {'; '.join(reasons)}")
    summary = {k: found[k] for k in ("mode", "started_at", "until", "evidence", "verdict")}
    summary["records"] = {"champion": found["champion"]["records"], "challenger": found["challenger"]["records"]}
    done = reg.promote(rollout.version, force=True, live=json.dumps(summary)[:5000], forced=reasons)
    _finish(reg, cfg, rollout, f"promoted (champion {done['previous']} -> {rollout.version})"
            + (" by --force" if reasons else ""))
    say(f"rollout promote: version {rollout.version} is {CHAMPION} (previous: {done['previous']})")
    return {**done, "status": found}


def abort(cfg: Config, say: Callable[[str], None] = default_say) -> Rollout:
    reg = Registry(cfg, say=say)
    rollout = _require(reg)
    _finish(reg, cfg, rollout, "aborted")
    say(f"rollout aborted: version {rollout.version} no longer challenges; replicas drop it within "
        f"serve.poll_interval_s ({cfg.serve.poll_interval_s:g} s)")
    return rollout


# The registry and the run ------------------------------------------------------------------

def _finish(reg: Registry, cfg: Config, rollout: Rollout, outcome: str) -> None:
    """The tag first (replicas stop routing to the challenger), then the alias, then the run."""
    with mlflow_errors(f"ending the rollout of {reg.name}"):
        reg.client.delete_registered_model_tag(reg.name, TAG_ROLLOUT)
        aliases = reg.aliases()
        if aliases.get(CHALLENGER) == rollout.version:
            reg.client.delete_registered_model_alias(reg.name, CHALLENGER)
    _end_run(cfg, rollout, outcome)


def _client(cfg: Config) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)


def _start_run(cfg: Config, rollout: Rollout, champion: str) -> str:
    client = _client(cfg)
    run = client.create_run(tracking.ensure_experiment(cfg), run_name=f"rollout-v{rollout.version}",
                            tags={**cfg.mlflow.tags, TAG_COMMAND: "rollout", TAG_ROLLOUT_CHALLENGER: rollout.version,
                                  TAG_ROLLOUT_CHAMPION: champion})
    client.log_param(run.info.run_id, "model", cfg.model.registered_name)
    client.set_terminated(run.info.run_id, "FINISHED")  # a record to log into, not a process
    return run.info.run_id


def _end_run(cfg: Config, rollout: Rollout, outcome: str) -> None:
    if rollout.run_id:
        _client(cfg).set_tag(rollout.run_id, TAG_ROLLOUT_OUTCOME, outcome)


def _log_status(cfg: Config, rollout: Rollout, found: dict[str, Any]) -> None:
    """The comparison as metrics of the rollout's run, step = minutes since the start."""
    from mlflow.entities import Metric

    now = time.time()
    step = int((now - rollout.started.timestamp()) // 60)
    values: dict[str, float] = {}
    for side in ("champion", "challenger"):
        for key, value in found[side].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "version":
                values[f"{side}/{key}"] = float(value)
    for key, value in (found.get("agreement") or {}).items():
        if value is not None:
            values[f"agreement/{key}"] = float(value)
    if found.get("score_psi") is not None:
        values["score_psi"] = float(found["score_psi"])
    evidence = found["evidence"]
    if evidence["difference"] is not None:
        values["difference"] = float(evidence["difference"])
    if evidence["interval"] is not None:
        values["difference_low"], values["difference_high"] = map(float, evidence["interval"])
    values["promotable"] = float(found["verdict"]["promote"])
    stamp = int(now * 1000)
    _client(cfg).log_batch(rollout.run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
