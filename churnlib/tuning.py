"""``churn tune``: a Ray Tune sweep over the distributed trainer, every trial in MLflow.

Each trial is a Tune function trainable that builds THE trainer of ``churn
train`` (``training.build_trainer``: the same Ray Train XGBoostTrainer, its
workers, checkpoints and early stopping) with the trial's XGBoost parameters,
plus Ray Tune's report callback, and calls ``fit()``: Ray 2.5x's recommended
way (a Train trainer handed straight to Tune is deprecated). Workers report
the validation metric every ``tune.report_every`` rounds, so ASHA can stop
weak trials early.

The data is read, validated and encoded once, kept in Ray's object store, and
shared by every trial. The Tune driver (each trial's function) holds 0 CPUs;
trials run as many at once as the cluster fits (``ray.num_workers`` x
``ray.cpus_per_worker`` each) unless ``tune.max_concurrent`` says fewer.

MLflow, from the driver only (a Tune callback in this process): one parent run
for the sweep (search space, algorithm, scheduler, the best trial, plots) and
one child run per trial (``mlflow.parentRunId``), with the trial's resolved
config as params, its reported metrics while it runs, the full per-iteration
history and the ``churn train`` summary metrics when it finishes, and its
status (completed, or stopped early by ASHA). ``--register-best`` logs the
best trial's model into its run exactly as ``churn train`` does and registers
it with the alias ``staging``.

An interrupted sweep resumes with ``--resume NAME`` (``Tuner.restore``):
finished trials are kept, unfinished ones continue from their last Ray Train
checkpoint, the same parent run and trial runs carry on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from churnlib.console import say as default_say
from churnlib.errors import ConfigError, TrainingError

# The sweep's own record (parent run, trial -> run, ended trials), kept NEXT TO
# Tune's experiment folder, not in it: Tune syncs that folder from its staging
# copy, which would put back an old version of a file kept there.
STATE_SUFFIX = ".churn_sweep.json"
# A trial ASHA stops is still inside trainer.fit(): Tune's graceful stop cannot
# reach it, and its Ray Train run (and the CPUs it holds) would linger until
# Tune force-kills the trial actor (600 s by default). Killing the actor also
# ends its Train controller and workers, which it owns.
TRIAL_STOP_GRACE_S = 5
TAG_SWEEP = "churn.sweep"
TAG_TRIAL = "churn.trial_id"
TAG_STATUS = "churn.trial.status"


# The search space -------------------------------------------------------------------


def search_space(tune_cfg: Any) -> dict[str, Any]:
    """``tune.search_space`` -> Ray Tune distributions, keyed by XGBoost parameter."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, d in tune_cfg.search_space.items():
        if d.distribution == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.distribution == "loguniform":
            space[key] = tune.loguniform(d.low, d.high)
        elif d.distribution == "randint":
            space[key] = tune.randint(int(d.low), int(d.high) + 1)  # Tune's upper bound is exclusive
        else:
            space[key] = tune.choice(list(d.values))
    return space


def with_params(cfg: Any, params: dict[str, Any]) -> Any:
    """The config with a trial's XGBoost parameters (validated like any config)."""
    from churnlib.config import Config

    data = cfg.model_dump()
    data["xgboost"] = {**data["xgboost"], **{k: v for k, v in params.items() if k in data["xgboost"]}}
    return Config.model_validate(data)


def _objective(cfg: Any) -> tuple[str, str]:
    from churnlib.config import XGB_MAXIMIZE
    from churnlib.training import score_key

    stopping = cfg.xgboost.early_stopping_metric
    return score_key(stopping), "max" if stopping.split("@")[0] in XGB_MAXIMIZE else "min"


def concurrency(cfg: Any, requested: int | None) -> int:
    """Trials at once: what the cluster fits (workers x CPUs, GPUs), or fewer if asked."""
    import ray

    total = ray.cluster_resources()
    per_trial_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = int(total.get("CPU", 0) // per_trial_cpu) if per_trial_cpu else 1
    if cfg.ray.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // cfg.ray.num_workers))
    fits = max(1, fits)
    return min(fits, requested) if requested else fits


# The trial: the training of `churn train`, inside Tune ----------------------------------------


def run_trial(params: dict[str, Any], *, base: dict[str, Any], spec: dict[str, Any], dataset: Any,
              train_storage: str) -> None:
    """A Tune function trainable: one Ray Train run with this trial's parameters."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from churnlib.config import Config
    from churnlib.features import FeatureSpec
    from churnlib.training import build_trainer, fit, loop_config

    cfg = with_params(Config.model_validate(base), params)
    config = loop_config(cfg, FeatureSpec.from_dict(spec))
    config["report_every"] = cfg.tune.report_every
    trial_id = tune.get_context().get_trial_id()
    # A stable name per trial: a resumed sweep's trial continues from its last Train checkpoint.
    trainer = build_trainer(cfg, dataset, config, name=f"trial-{trial_id}", storage_path=train_storage,
                            callbacks=[TuneReportCallback()])
    fit(trainer)


# MLflow, from the Tune driver --------------------------------------------------------------------


class MlflowTrials:
    """Tune callback: one MLflow child run per trial, nested under the sweep's parent run.

    Runs in this (the driver's) process; picklable, as Tune keeps it in the
    sweep's state for a resume.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_params: dict[str, Any],
                 sweep: str, stopping_metric: str, state_path: str, trial_runs: dict[str, str],
                 rows: dict[str, float], say: Callable[[str], None] | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.base_params = base_params
        self.sweep = sweep
        self.stopping_metric = stopping_metric
        self.state_path = state_path
        self.trial_runs = dict(trial_runs)
        self.rows = rows
        self.say = say
        self.logged_steps: dict[str, set[int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["say"] = None
        return state

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _ended(self, trial_id: str) -> None:
        """The record of trials that reached an end (completed, stopped, failed), across sessions."""
        ended = set(_read_state(self.state_path).get("ended_trials", []))
        _write_state(self.state_path, {"ended_trials": sorted(ended | {trial_id})})

    def _persist(self) -> None:
        recorded = _read_state(self.state_path).get("trial_runs", {})
        _write_state(self.state_path, {"trial_runs": {**recorded, **self.trial_runs}})

    # tune.Callback interface (duck-typed: ray.tune.Callback subclass made in callback())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id not in self.trial_runs:
            # the state file is the record across sessions (this object may be an older pickle)
            self.trial_runs.update(_read_state(self.state_path).get("trial_runs", {}))
        if trial.trial_id in self.trial_runs:
            return  # a resumed trial carries on in its run
        client = self._client()
        tags = {"mlflow.parentRunId": self.parent_run_id, TAG_SWEEP: self.sweep, TAG_TRIAL: trial.trial_id,
                "churn.command": "tune-trial", TAG_STATUS: "running"}
        run = client.create_run(self.experiment_id, run_name=f"{self.sweep}-{trial.trial_id}", tags=tags)
        params = dict(self.base_params)
        params.update({f"xgboost.{k}": v for k, v in trial.config.items()})
        import mlflow

        from churnlib.tracking import log_params_flat

        mlflow.set_tracking_uri(self.tracking_uri)
        log_params_flat(params, run_id=run.info.run_id)
        self.trial_runs[trial.trial_id] = run.info.run_id
        self._persist()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        from mlflow.entities import Metric

        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is None or "rounds" not in result:
            return
        step = int(result["rounds"]) - 1
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k.startswith(("train_", "valid_", "best_")) and isinstance(v, (int, float)) and v == v]
        if metrics:
            self._client().log_batch(run_id, metrics=metrics, synchronous=True)
        self.logged_steps.setdefault(trial.trial_id, set()).add(step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from churnlib.training import outcome_metrics

        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is None:
            return
        client = self._client()
        last = trial.last_result or {}
        rounds = int(last.get("rounds", 0))
        score = last.get(_score(self.stopping_metric))
        if last.get("finished") and last.get("checkpoint_path"):
            out = _load_trial_checkpoint(last["checkpoint_path"])
            _, summary = outcome_metrics(out.state, out.full_rounds)
            _log_history_except(client, run_id, out.state["history"], self.logged_steps.get(trial.trial_id, set()))
            summary.update({f"{k}_rows": v for k, v in self.rows.items()})
            _log_final(client, run_id, list(summary.items()))
            score = summary.get(_score(self.stopping_metric), score)
            status = (f"completed: early-stopped by XGBoost at round {out.full_rounds}" if out.state["stopped_early"]
                      else f"completed: all {out.full_rounds} rounds")
        else:
            status = f"stopped early by ASHA at round {rounds}"
        client.set_tag(run_id, TAG_STATUS, status)
        client.set_terminated(run_id, "FINISHED")
        self._ended(trial.trial_id)
        if self.say:
            shown = f"{score:.4f}" if isinstance(score, float) else "-"
            self.say(f"  trial {trial.trial_id}: {status}; {_score(self.stopping_metric)} {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is None:
            return
        client = self._client()
        error = str(getattr(trial, "error_msg", "") or "trial failed")
        client.set_tag(run_id, TAG_STATUS, "failed")
        client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, "FAILED")
        self._ended(trial.trial_id)
        if self.say:
            self.say(f"  trial {trial.trial_id}: failed")


def _score(metric: str) -> str:
    from churnlib.training import score_key

    return score_key(metric)


def _load_trial_checkpoint(path: str):
    from ray.train import Checkpoint

    from churnlib.training import fit_output

    return fit_output(Checkpoint(path))


def _log_history_except(client: Any, run_id: str, history: dict[str, list[float]], done: set[int]) -> None:
    """The per-iteration history, skipping the steps already logged live."""
    from mlflow.entities import Metric

    from churnlib.tracking import metric_key

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(name), float(v), now, step)
               for name, values in history.items() for step, v in enumerate(values) if step not in done]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def _log_final(client: Any, run_id: str, items: list[tuple[str, float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in items], synchronous=True)


def _tune_callback(trials: MlflowTrials):
    """The MLflow logger as a real ``ray.tune.Callback``."""
    from ray.tune import Callback

    class _Callback(Callback):
        def __init__(self, inner: MlflowTrials):
            self.inner = inner

        def on_trial_start(self, iteration, trials, trial, **info):
            self.inner.on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.inner.on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.inner.on_trial_complete(iteration, trials, trial, **info)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.inner.on_trial_error(iteration, trials, trial, **info)

    return _Callback(trials)


# Sweep state (for a resume) ---------------------------------------------------------------------


def _fs(path: str):
    from churnlib.data import _filesystem

    return _filesystem(path)


def _read_state(path: str) -> dict[str, Any]:
    import pyarrow.fs as pafs

    fs, p = _fs(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return {}
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def _write_state(path: str, update: dict[str, Any]) -> None:
    state = {**_read_state(path), **update}
    fs, p = _fs(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(state, indent=2).encode())


# The command ----------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    sweep: str
    path: str
    parent_run_id: str
    experiment_id: str
    metric: str
    mode: str
    best: dict[str, Any]
    trials: list[dict[str, Any]]
    registered_version: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep, "path": self.path, "parent_run_id": self.parent_run_id,
            "experiment_id": self.experiment_id, "metric": self.metric, "mode": self.mode, "best": self.best,
            "trials": self.trials, "registered_version": self.registered_version,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def tune(
    cfg: Any,
    data_path: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    register_best: bool = False,
    resume: str | None = None,
    force: bool = False,
    verbose: bool = False,
    say: Callable[[str], None] = default_say,
) -> TuneResult:
    """A sweep (see the module doc). ``resume``: continue the sweep of that name with
    everything it recorded when it started (its data, configuration, trial count and
    ``register_best``); ``data_path`` then must be the same table (same digest) unless
    ``force``."""
    import mlflow
    from ray import tune as ray_tune

    from churnlib import data as data_mod
    from churnlib import tracking
    from churnlib.config import config_to_yaml
    from churnlib.features import FeatureSpec
    from churnlib.runtime import check_resources, ensure_ray, quiet_logs
    from churnlib.training import default_data_path

    t_start = time.perf_counter()
    quiet_logs(verbose)
    timings: dict[str, float] = {}
    previous: dict[str, Any] = {}
    if resume:
        if num_samples or max_concurrent:
            raise ConfigError(f"--resume {resume}: a resumed sweep keeps its own trial count and concurrency")
        previous = _read_state(f"{cfg.storage_path.rstrip('/')}/{resume}{STATE_SUFFIX}")
        if not previous:
            raise ConfigError(f"--resume {resume}: no sweep to resume at {cfg.storage_path.rstrip('/')}/{resume}")
        cfg = _resumed_config(cfg, previous)
        register_best = register_best or bool(previous.get("register_best"))
    else:
        updates: dict[str, Any] = {}
        if num_samples:
            updates["num_samples"] = num_samples
        if max_concurrent:
            updates["max_concurrent"] = max_concurrent
        if updates:
            cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update=updates)})
    spec = FeatureSpec.from_config(cfg.features)
    storage = cfg.storage_path
    name = resume or cfg.tune.name or f"churn-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_path = f"{storage.rstrip('/')}/{name}"
    state_path = f"{sweep_path}{STATE_SUFFIX}"

    data_uri = data_path or previous.get("data") or cfg.data.path
    if data_uri is not None:
        data_mod.resolve_source(data_uri)  # a missing path: one line, before any network
    tracking.preflight(cfg)
    if data_uri is None:
        say(f"data: generating {cfg.data.generate_rows} synthetic rows (seed {cfg.data.generate_seed})")
        data_uri = str(default_data_path(cfg))
    source = data_mod.resolve_source(data_uri)
    if resume and previous.get("data_digest") not in (None, source.digest):
        what = "--data is not the table" if data_path else "the table changed since"
        if not force:
            raise ConfigError(f"--resume {resume}: {what} the sweep started on ({previous.get('data', '?')}, digest "
                              f"{previous['data_digest']}; now {source.digest}); give --force to resume on it anyway")
        say(f"tune: warning: resuming on other data than the sweep started with (--force): digest "
            f"{previous['data_digest']} -> {source.digest}")
    columns = data_mod.check_columns(source, spec)
    local = ensure_ray(cfg.ray, verbose=verbose)
    check_resources(cfg.ray, local)
    metric, mode = _objective(cfg)

    t0 = time.perf_counter()
    say(f"data: reading and validating {source.uri}")
    prepared = data_mod.prepare(source, spec, columns, cfg.model.validation_split, cfg.model.random_state, True)
    timings["prepare_s"] = time.perf_counter() - t0
    rows = {"train": float(prepared.train_rows), "valid": float(prepared.valid_rows)}
    from churnlib.drift import profile_from_dataset

    profile = profile_from_dataset(prepared.dataset, spec, cfg.drift.profile_rows, seed=cfg.model.random_state)

    experiment_id = tracking.ensure_experiment(cfg)
    client = mlflow.MlflowClient()
    k = concurrency(cfg, cfg.tune.max_concurrent)
    if previous.get("parent_run_id"):
        parent_id = previous["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        say(f"tune: resuming sweep {name} (parent run {parent_id})")
    else:
        tags = {**cfg.mlflow.tags, "churn.command": "tune", TAG_SWEEP: name}
        parent = client.create_run(experiment_id, run_name=name, tags=tags)
        parent_id = parent.info.run_id
        # Everything a resume needs, so that `--resume NAME` alone carries on the same sweep.
        _write_state(state_path, {"parent_run_id": parent_id, "experiment_id": experiment_id,
                                  "data": source.uri, "data_digest": source.digest,
                                  "config": cfg.model_dump(mode="json"), "register_best": register_best,
                                  "sweep_s": 0.0, "trial_runs": {}})
        # The parent run stays RUNNING for the whole sweep: written through the client, never
        # made the active run (leaving an active-run context would end it).
        tracking.log_params_flat({
            "tune.search_space": {k2: v.model_dump(exclude_none=True) for k2, v in cfg.tune.search_space.items()},
            "tune.search": cfg.tune.search, "tune.scheduler": cfg.tune.scheduler,
            "tune.num_samples": cfg.tune.num_samples, "tune.max_concurrent": k,
            "tune.grace_period": cfg.tune.grace_period, "tune.reduction_factor": cfg.tune.reduction_factor,
            "tune.report_every": cfg.tune.report_every, "tune.metric": metric, "tune.mode": mode,
            "data": source.uri, "xgboost.num_boost_round": cfg.xgboost.num_boost_round,
            "ray.num_workers": cfg.ray.num_workers,
        }, run_id=parent_id)
        client.log_text(parent_id, config_to_yaml(cfg), "config/resolved_config.yaml")
        client.set_tag(parent_id, "data.digest", source.digest)
        client.set_tag(parent_id, "data.source", source.uri)
    say(f"tune: sweep {name}: {cfg.tune.num_samples} trial(s), {cfg.tune.search} search, scheduler "
        f"{cfg.tune.scheduler}, {k} at a time ({cfg.ray.num_workers} worker(s) each), metric {metric} ({mode})")

    flat = {key: value for key, value in cfg.flat().items() if not key.startswith("tune.")}
    logger = MlflowTrials(cfg.tracking_uri, experiment_id, parent_id, flat, name, cfg.xgboost.early_stopping_metric,
                          state_path, previous.get("trial_runs", {}), rows, say)
    # read by Tune's controller when the Tuner starts, in this process
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(TRIAL_STOP_GRACE_S))
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), spec=spec.to_dict(),
                                 dataset=prepared.dataset, train_storage=f"{sweep_path}/train"),
        # No CPU for the trial's driver (the CPUs go to its training workers), but Tune
        # needs a non-empty request: a little memory, which the driver does use.
        resources={"CPU": 0, "memory": 256 * 1024**2},
    )
    t0 = time.perf_counter()
    try:
        if resume:
            tuner = ray_tune.Tuner.restore(sweep_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = ray_tune.Tuner(
                trainable,
                param_space=search_space(cfg.tune),
                tune_config=ray_tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=cfg.tune.num_samples,
                    search_alg=_searcher(cfg, k), scheduler=_scheduler(cfg),
                ),
                # A failed trial is infrastructure (resources, a crash past training.max_failures):
                # the search space was checked against XGBoost's limits up front. Stop the sweep.
                run_config=ray_tune.RunConfig(name=name, storage_path=storage, callbacks=[_tune_callback(logger)],
                                              failure_config=ray_tune.FailureConfig(fail_fast=True),
                                              verbose=1 if verbose else 0),
            )
        if resume:
            _attach_logger(tuner, logger)
        # Tune's own tables go to stderr with the rest of the human output: stdout stays for --json.
        with contextlib.redirect_stdout(sys.stderr):
            grid = tuner.fit()
    except KeyboardInterrupt:
        _write_state(state_path, {"sweep_s": float(_read_state(state_path).get("sweep_s", 0.0))
                                  + time.perf_counter() - t0})
        client.set_terminated(parent_id, "KILLED")
        say(f"tune: interrupted; resume with: {_resume_command(cfg, name)}")
        raise
    except Exception as exc:  # noqa: BLE001
        client.set_tag(parent_id, "error", str(exc)[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise TrainingError(f"tune: the sweep failed: {str(exc).splitlines()[0][:300]}") from exc
    # the parent's sweep time covers every session of the sweep, not only this one
    timings["sweep_s"] = float(_read_state(state_path).get("sweep_s", 0.0)) + time.perf_counter() - t0
    _write_state(state_path, {"sweep_s": timings["sweep_s"]})
    failed = [r for r in grid if r.error is not None]
    if failed:  # fail_fast: the first failed trial stopped the sweep
        from churnlib.training import _root_cause

        trial = (failed[0].metrics or {}).get("trial_id") or _trial_id_from_path(failed[0].path) or "?"
        cause = _root_cause(failed[0].error)
        if "startup timed out" in cause or "StartupTimeout" in cause:
            from churnlib.training import START_TIMEOUT_FLOOR_S

            waited = max(cfg.ray.resources_timeout_s, START_TIMEOUT_FLOOR_S)
            cause = (f"its {cfg.ray.num_workers} workers did not get their resources within {waited:g} s "
                     f"(other work holds them, or the cluster lacks them; ray.resources_timeout_s)")
        client.set_tag(parent_id, "error", cause[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise TrainingError(f"tune: trial {trial} failed, so the sweep stopped: {cause}; "
                            f"resume with: {_resume_command(cfg, name)}")
    ended = _read_state(state_path).get("ended_trials", [])
    if len(ended) < cfg.tune.num_samples:
        # Tune stops gracefully on Ctrl-C and returns what it has: not a finished sweep.
        client.set_terminated(parent_id, "KILLED")
        say(f"tune: interrupted after {len(ended)} of {cfg.tune.num_samples} trial(s); "
            f"resume with: {_resume_command(cfg, name)}")
        from churnlib import interrupts

        raise interrupts.interrupted()

    trials = _summarise(grid, {**_read_state(state_path).get("trial_runs", {}), **logger.trial_runs}, metric)
    finished = [t for t in trials if t.get("score") is not None]
    if not finished:
        client.set_terminated(parent_id, "FAILED")
        raise TrainingError(f"tune: no trial of sweep {name} produced a score (see the trial runs)")
    best = (max if mode == "max" else min)(finished, key=lambda t: t["score"])
    registered = None
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    summary = {metric: float(best["score"]), "trials": float(len(trials)),
               "trials_stopped_early": float(sum(t["status"] == "stopped" for t in trials)),
               "trials_failed": float(sum(t["status"] == "failed" for t in trials)), "sweep_s": timings["sweep_s"]}
    client.log_batch(parent_id, metrics=[Metric(k2, v, now, 0) for k2, v in summary.items()], synchronous=True)
    tracking.log_params_flat({f"best.{k2}": v for k2, v in best["config"].items()}, run_id=parent_id)
    client.set_tag(parent_id, "churn.best_trial_run_id", best["run_id"] or "")
    client.set_tag(parent_id, "churn.best_trial_id", best["trial_id"] or "")
    client.log_dict(parent_id, {"metric": metric, "mode": mode, "best": best, "trials": trials}, "tune/trials.json")
    _log_plots(client, parent_id, grid, trials, cfg, metric)
    if register_best:
        registered = _register_best(cfg, best, spec, source, columns, profile, say)
        client.set_tag(parent_id, "churn.registered_version", registered)
    client.set_terminated(parent_id, "FINISHED")
    timings["total_s"] = time.perf_counter() - t_start
    say(f"tune: best trial {best['trial_id']} ({metric} {best['score']:.4f}): "
        + ", ".join(f"{k2}={_fmt(v)}" for k2, v in best["config"].items()))
    return TuneResult(name, sweep_path, parent_id, experiment_id, metric, mode, best, trials, registered, timings)


def _resumed_config(current: Any, previous: dict[str, Any]) -> Any:
    """The configuration a sweep started with; where MLflow is and how to reach Ray come from now."""
    from churnlib.config import Config

    stored = previous.get("config")
    if not stored:  # a sweep recorded before configurations were stored
        return current
    stored = {**stored, "mlflow": current.mlflow.model_dump(mode="json"),
              "ray": {**stored["ray"], "address": current.ray.address}}
    return Config.model_validate(stored)


def _resume_command(cfg: Any, name: str) -> str:
    """The command that resumes a sweep: its name, and where to find it if not in the default place."""
    from churnlib.config import load_config

    default = load_config(env={})
    parts = ["churn tune --resume", shlex.quote(name)]
    if cfg.training.storage_path:
        parts.append("--set " + shlex.quote(f"training.storage_path={cfg.training.storage_path}"))
    elif cfg.workspace_path != default.workspace_path:
        parts.append("--set " + shlex.quote(f"workspace={cfg.workspace_path}"))
    return " ".join(parts)


def _attach_logger(tuner: Any, logger: MlflowTrials) -> None:
    """A restored sweep keeps the callback pickled with it; give it this session's printer."""
    internal = getattr(tuner, "_local_tuner", None)
    run_config = internal.get_run_config() if internal is not None else None
    for cb in getattr(run_config, "callbacks", None) or []:
        if isinstance(getattr(cb, "inner", None), MlflowTrials):
            cb.inner.say = logger.say
            return


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _searcher(cfg: Any, max_concurrent: int):
    """The search algorithm, limited to ``max_concurrent`` trials at once.

    (Tune's ``max_concurrent_trials`` is silently ignored for a
    BasicVariantGenerator passed in, so the limit is set here, on both.)"""
    if cfg.tune.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=max_concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=max_concurrent)


def _scheduler(cfg: Any):
    if cfg.tune.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="rounds", max_t=cfg.xgboost.num_boost_round, grace_period=cfg.tune.grace_period,
                         reduction_factor=cfg.tune.reduction_factor)


def _summarise(grid: Any, trial_runs: dict[str, str], metric: str) -> list[dict[str, Any]]:
    """Every trial of the sweep (this session's and, after a resume, earlier ones) from Tune's results."""
    trials = []
    for result in grid:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or _trial_id_from_path(result.path)
        status = "failed" if result.error else "completed" if last.get("finished") else "stopped"
        score = last.get(metric)
        trials.append({
            "trial_id": trial_id,
            "run_id": trial_runs.get(trial_id),
            "config": dict(result.config or {}),
            "status": status,
            "rounds": int(last.get("rounds", 0)),
            "score": float(score) if isinstance(score, (int, float)) and status != "failed" else None,
            "checkpoint_path": last.get("checkpoint_path") if status == "completed" else None,
        })
    return trials


def _trial_id_from_path(path: str | None) -> str | None:
    """Tune names trial folders <trainable>_<trial_id>_<n>_<params>; trial ids are <experiment>_<5 digits>."""
    import re

    m = re.search(r"_([0-9a-f]{5}_\d{5})_", path or "")
    return m.group(1) if m else None


def _log_plots(client: Any, run_id: str, grid: Any, trials: list[dict[str, Any]], cfg: Any, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cfg.tune.search_space)
    cols = min(3, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.6 * rows_n), squeeze=False)
    colours = {"completed": "#228833", "stopped": "#ee6677", "failed": "#bbbbbb"}
    for ax, key in zip(axes.flat, keys):
        for status, colour in colours.items():
            pts = [(t["config"].get(key), t["score"]) for t in trials if t["status"] == status and t["score"] is not None]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colour, label=status, s=28)
        if cfg.tune.search_space[key].distribution == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{metric} of each trial against each tuned parameter")
    fig.tight_layout()
    client.log_figure(run_id, fig, "tune/metric_vs_params.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "rounds" not in df or metric not in df:
            continue
        ax.plot(df["rounds"], df[metric], marker=".", lw=1)
    ax.set(xlabel="boosting rounds", ylabel=metric, title="Trial progress (each line a trial; ASHA stops the weak)")
    fig.tight_layout()
    client.log_figure(run_id, fig, "tune/trial_progress.png")
    plt.close(fig)


def _register_best(cfg: Any, best: dict[str, Any], spec: Any, source: Any, columns: list[str],
                   profile: dict[str, Any], say: Callable[[str], None]) -> str:
    """The best trial's model, logged into its run as `churn train` logs it, registered at `staging`."""
    import mlflow

    from churnlib.registry import STAGING, Registry
    from churnlib.training import _log_model

    if best["status"] != "completed" or not best.get("checkpoint_path"):
        raise TrainingError(f"tune: the best trial {best['trial_id']} has no final checkpoint to register")
    out = _load_trial_checkpoint(best["checkpoint_path"])
    trial_cfg = with_params(cfg, best["config"])
    run_id = best["run_id"]
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"data.digest": source.digest, "data.source": source.uri})
        _log_model(trial_cfg, spec, source, columns, out.booster, int(out.state["best_iteration"] or 0), run_id, profile)
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    info, _ = Registry(cfg, say=say).register(run_id, alias=STAGING,
                                              description=f"best trial of sweep {best.get('trial_id')}")
    say(f"tune: registered the best trial as {cfg.model.registered_name} version {info.version} (alias {STAGING})")
    return info.version
