"""``churn tune``: a Ray Tune sweep over the distributed trainer, every trial in MLflow.

Each trial is a Tune function trainable that builds THE trainer of ``churn
train`` (``train.trainer.build_trainer``: the same Ray Train XGBoostTrainer, its
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
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from churnlib import interrupts, tracking
from churnlib.config import config_to_yaml
from churnlib.console import say as default_say
from churnlib.data.features import FeatureSpec
from churnlib.data.preparation import prepare
from churnlib.data.sources import check_columns, resolve_source
from churnlib.errors import ConfigError, TrainingError, first_line, root_cause
from churnlib.model.packaging import log_model
from churnlib.registry.registry import STAGING, Registry
from churnlib.runtime import check_resources, ensure_ray, fixed_resources, quiet_logs, release_ray
from churnlib.tags import (
    TAG_BEST_TRIAL,
    TAG_BEST_TRIAL_RUN,
    TAG_COMMAND,
    TAG_REGISTERED_VERSION,
    TAG_SWEEP,
)
from churnlib.train.command import default_data_path
from churnlib.train.decide import (
    calibration_line,
    contact_line,
    contact_metrics,
    decide,
)
from churnlib.train.task import check_fits, largest_node_cpus, task_table, threads, uses_task
from churnlib.train.trainer import START_TIMEOUT_FLOOR_S
from churnlib.tune.space import (
    concurrency,
    objective,
    scheduler,
    search_space,
    searcher,
    with_params,
)
from churnlib.tune.state import (
    STATE_SUFFIX,
    read_state,
    resume_command,
    resumed_config,
    write_state,
)
from churnlib.tune.trials import (
    MlflowTrials,
    ResourceWatch,
    attach_logger,
    load_trial_checkpoint,
    log_plots,
    run_trial,
    summarise,
    trial_id_from_path,
    trial_resources,
    tune_callback,
    watch_callback,
)

if TYPE_CHECKING:
    from churnlib.config import Config

# A trial ASHA stops is still inside trainer.fit(): Tune's graceful stop cannot
# reach it, and its Ray Train run (and the CPUs it holds) would linger until
# Tune force-kills the trial actor (600 s by default). Killing the actor also
# ends its Train controller and workers, which it owns.
TRIAL_STOP_GRACE_S = 5
# Shortest wait for a trial's CPUs in Tune's queue (a trial ASHA stopped frees them within
# TRIAL_STOP_GRACE_S).
TRIAL_QUEUE_FLOOR_S = 10
# How long a stopped or failed sweep waits for its trials' MLflow writes before ending its run
FLUSH_ON_STOP_S = 30


@dataclass
class TuneResult:
    """A sweep: parent run, trials (runs, params, metrics, status), the best one, the registered version."""
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
    cfg: Config,
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
    t_start = time.perf_counter()
    quiet_logs(verbose)
    timings: dict[str, float] = {}
    previous: dict[str, Any] = {}
    if resume:
        if num_samples or max_concurrent:
            raise ConfigError(f"--resume {resume}: a resumed sweep keeps its own trial count and concurrency")
        previous = read_state(f"{cfg.storage_path.rstrip('/')}/{resume}{STATE_SUFFIX}")
        if not previous:
            raise ConfigError(f"--resume {resume}: no sweep to resume at {cfg.storage_path.rstrip('/')}/{resume}")
        cfg = resumed_config(cfg, previous)
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
    # A given table is checked first (a missing path, its columns, a resumed sweep's digest):
    # one line, before any network.
    source = columns = None
    if data_uri is not None:
        source, columns = _checked_table(data_uri, spec, resume, previous, data_path, force, say)
    # A store that does not answer at all: one line, before Ray starts.
    tracking.probe(cfg)
    import ray

    connected_before = ray.is_initialized()  # a caller's instance (an earlier command, a notebook) is theirs
    # The rest of the store's check runs while Ray starts: its imports and its own start
    # (MLflow, its SQL store, Ray Tune: ~2-3 s cold) overlap Ray's (~5 s, spent mostly waiting
    # on its processes), so a cold sweep starts that much sooner. What it finds (a server whose
    # API fails, an artifact store that takes no writes) still stops the sweep in one line
    # before any table is generated or read and any run made, once Ray is up.
    checked = interrupts.start_in_thread(_preflight, cfg, name="churn-preflight")
    local = ensure_ray(cfg.ray, verbose=verbose, announce=True, workspace=cfg.workspace_path)
    checked.result()
    check_resources(cfg.ray, fixed_resources(local))
    if data_uri is None:
        say(f"data: generating {cfg.data.generate_rows} synthetic rows (seed {cfg.data.generate_seed})")
        source, columns = _checked_table(str(default_data_path(cfg)), spec, resume, previous, data_path, force, say)
    metric, mode = objective(cfg)

    t0 = time.perf_counter()
    say(f"data: reading and validating {source.uri}")
    # a Ray Dataset only for Ray Train trials (below): one-task trials take the driver's arrays
    prepared = prepare(source, spec, columns, cfg.model.validation_split, cfg.model.random_state, True,
                       ray_dataset=False)
    timings["prepare_s"] = time.perf_counter() - t0
    rows = {"train": float(prepared.train_rows), "valid": float(prepared.valid_rows)}
    # A small table: every trial boosts in its own process (the one-task engine, no Ray Train
    # worker group to start per trial); else each trial is a Ray Train run.
    node_cpus = largest_node_cpus()
    one_task = uses_task(cfg, prepared, node_cpus)
    if one_task:
        check_fits(cfg, node_cpus)

    profile = prepared.profile(spec, cfg.drift.profile_rows, seed=cfg.model.random_state)

    import mlflow
    from ray import tune as ray_tune

    experiment_id = tracking.ensure_experiment(cfg)
    client = mlflow.MlflowClient()
    k = concurrency(cfg, cfg.tune.max_concurrent)
    if previous.get("parent_run_id"):
        parent_id = previous["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        say(f"tune: resuming sweep {name} (parent run {parent_id})")
    else:
        tags = {**tracking.lineage_tags(), **cfg.mlflow.tags, TAG_COMMAND: "tune", TAG_SWEEP: name,
                "data.digest": source.digest, "data.source": source.uri}
        parent = client.create_run(experiment_id, run_name=name, tags=tags)
        parent_id = parent.info.run_id
        tracking.log_dataset(source, spec, context="training", run_id=parent_id)
        # Everything a resume needs, so that `--resume NAME` alone carries on the same sweep.
        write_state(state_path, {"parent_run_id": parent_id, "experiment_id": experiment_id,
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
    say(f"tune: sweep {name}: {cfg.tune.num_samples} trial(s), {cfg.tune.search} search, scheduler "
        f"{cfg.tune.scheduler}, {k} at a time ({_per_trial(cfg, one_task)} each), metric {metric} ({mode})")

    flat = {key: value for key, value in cfg.flat().items() if not key.startswith("tune.")}
    logger = MlflowTrials(cfg.tracking_uri, experiment_id, parent_id, flat, name, cfg.xgboost.early_stopping_metric,
                          state_path, previous.get("trial_runs", {}), rows, say,
                          progress_every_s=max(cfg.training.progress_interval_s, 1.0))
    # read by Tune's controller when the Tuner starts, in this process
    os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(TRIAL_STOP_GRACE_S))
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, base=cfg.model_dump(mode="json"), spec=spec.to_dict(),
                                 dataset=None if one_task else prepared.ray_dataset(),
                                 train_storage=f"{sweep_path}/train",
                                 table=task_table(prepared) if one_task else None,
                                 # this session's table: a trial process reuses its matrices
                                 table_key=uuid.uuid4().hex if one_task else None),
        resources=trial_resources(cfg, one_task),
    )
    # A trial waiting for its CPUs: Ray Train's worker group times out by itself (at least
    # START_TIMEOUT_FLOOR_S); a trial boosting in its own process waits in Tune's queue, watched.
    watch = ResourceWatch(max(cfg.ray.resources_timeout_s, TRIAL_QUEUE_FLOOR_S),
                          f"trials of {cfg.ray.num_workers * cfg.ray.cpus_per_worker:g} CPU(s) each")
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
                    search_alg=searcher(cfg, k), scheduler=scheduler(cfg),
                    # one-task trials: the next trial runs in the process of the last one (xgboost
                    # imported, no process to start); a Ray Train trial owns its controller, so its
                    # process ends with it
                    reuse_actors=one_task,
                ),
                # A failed trial is infrastructure (resources, a crash past training.max_failures):
                # the search space was checked against XGBoost's limits up front. Stop the sweep.
                # A trial boosting in its own process is started again by Tune from its newest
                # checkpoint, up to training.max_failures times, as Ray Train restarts its workers
                # (Tune's fail_fast would stop the sweep at the first crash, recoverable or not).
                run_config=ray_tune.RunConfig(
                    name=name, storage_path=storage, callbacks=[tune_callback(logger), watch_callback(watch)],
                    failure_config=(ray_tune.FailureConfig(max_failures=cfg.training.max_failures) if one_task
                                    else ray_tune.FailureConfig(fail_fast=True)),
                    verbose=1 if verbose else 0),
            )
        if resume:
            logger = attach_logger(tuner, logger)
        # Tune prints its own tables, config box and TensorBoard hint even at verbose=0: with
        # --verbose they go to stderr with the rest of the human output (stdout stays for
        # --json); without, nowhere (the trial lines above say what a person needs).
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stderr if verbose else devnull):
            grid = tuner.fit()
        logger.flush()  # every trial's run written and ended before the sweep's is
    except KeyboardInterrupt:
        # what the trials' runs were given so far lands (their writes are quick), then the sweep ends
        with contextlib.suppress(Exception):
            logger.flush(timeout_s=FLUSH_ON_STOP_S)
        write_state(state_path, {"sweep_s": float(read_state(state_path).get("sweep_s", 0.0))
                                  + time.perf_counter() - t0})
        client.set_terminated(parent_id, "KILLED")
        say(f"tune: interrupted; resume with: {resume_command(cfg, name)}")
        raise
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            logger.flush(timeout_s=FLUSH_ON_STOP_S)
        client.set_tag(parent_id, "error", str(exc)[:5000])
        client.set_terminated(parent_id, "FAILED")
        ours = _ours(exc)  # the resource watch's own line, through Tune's wrapping
        if ours is not None:
            raise TrainingError(f"tune: {ours}; resume with: {resume_command(cfg, name)}") from exc
        raise TrainingError(f"tune: the sweep failed: {first_line(exc)}") from exc
    # the parent's sweep time covers every session of the sweep, not only this one
    timings["sweep_s"] = float(read_state(state_path).get("sweep_s", 0.0)) + time.perf_counter() - t0
    write_state(state_path, {"sweep_s": timings["sweep_s"]})
    failed = [r for r in grid if r.error is not None]
    if failed:  # fail_fast: the first failed trial stopped the sweep

        trial = (failed[0].metrics or {}).get("trial_id") or trial_id_from_path(failed[0].path) or "?"
        cause = root_cause(failed[0].error)
        if "startup timed out" in cause or "StartupTimeout" in cause:
            waited = max(cfg.ray.resources_timeout_s, START_TIMEOUT_FLOOR_S)
            cause = (f"its {cfg.ray.num_workers} workers did not get their resources within {waited:g} s "
                     f"(other work holds them, or the cluster lacks them; ray.resources_timeout_s)")
        client.set_tag(parent_id, "error", cause[:5000])
        client.set_terminated(parent_id, "FAILED")
        raise TrainingError(f"tune: trial {trial} failed, so the sweep stopped: {cause}; "
                            f"resume with: {resume_command(cfg, name)}")
    ended = read_state(state_path).get("ended_trials", [])
    if len(ended) < cfg.tune.num_samples:
        # Tune stops gracefully on Ctrl-C and returns what it has: not a finished sweep.
        client.set_terminated(parent_id, "KILLED")
        say(f"tune: interrupted after {len(ended)} of {cfg.tune.num_samples} trial(s); "
            f"resume with: {resume_command(cfg, name)}")

        raise interrupts.interrupted()

    trials = summarise(grid, {**read_state(state_path).get("trial_runs", {}), **logger.trial_runs}, metric)
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
    client.log_batch(parent_id, metrics=[Metric(tracking.grouped(k2), v, now, 0) for k2, v in summary.items()],
                     synchronous=True)
    tracking.log_params_flat({f"best.{k2}": v for k2, v in best["config"].items()}, run_id=parent_id)
    client.set_tag(parent_id, TAG_BEST_TRIAL_RUN, best["run_id"] or "")
    client.set_tag(parent_id, TAG_BEST_TRIAL, best["trial_id"] or "")
    client.log_dict(parent_id, {"metric": metric, "mode": mode, "best": best, "trials": trials}, "tune/trials.json")
    plots = interrupts.start_in_thread(log_plots, client, parent_id, grid, trials, cfg, metric, name="churn-plots")
    if local and not connected_before and prepared.local is not None:
        # Nothing past the sweep needs the private instance this command started (--register-best
        # scores the validation rows held here): it stops now, waiting for its processes to exit
        # (about 1.5 s) while the plots are drawn, instead of after everything at the exit.
        release_ray()
    plots.result()  # before --register-best's own figures: pyplot is not for two threads at once
    if register_best:
        registered = _register_best(cfg, best, spec, source, columns, profile, say, prepared)
        client.set_tag(parent_id, TAG_REGISTERED_VERSION, registered)
    client.set_terminated(parent_id, "FINISHED")
    timings["total_s"] = time.perf_counter() - t_start
    counts = {status: sum(t["status"] == status for t in trials) for status in ("completed", "stopped", "failed")}
    rounds = [int(t.get("rounds") or 0) for t in trials]
    say(f"tune: {len(trials)} trial(s) in {timings['sweep_s']:.1f} s: {counts['completed']} completed, "
        f"{counts['stopped']} stopped early by {cfg.tune.scheduler.upper()}, {counts['failed']} failed; "
        f"{sum(rounds):,} boosting rounds of {len(trials) * cfg.xgboost.num_boost_round:,} possible")
    say(f"tune: best trial {best['trial_id']} ({metric} {best['score']:.4f}): "
        + ", ".join(f"{k2}={_fmt(v)}" for k2, v in best["config"].items()))
    return TuneResult(name, sweep_path, parent_id, experiment_id, metric, mode, best, trials, registered, timings)


def _checked_table(data_uri: str, spec: FeatureSpec, resume: str | None, previous: dict[str, Any],
                   data_path: str | None, force: bool, say: Callable[[str], None]) -> tuple[Any, list[str]]:
    """The sweep's table resolved, its columns checked, and (resuming) its digest against the sweep's."""
    source = resolve_source(data_uri)
    if resume and previous.get("data_digest") not in (None, source.digest):
        what = "--data is not the table" if data_path else "the table changed since"
        if not force:
            raise ConfigError(f"--resume {resume}: {what} the sweep started on ({previous.get('data', '?')}, digest "
                              f"{previous['data_digest']}; now {source.digest}); give --force to resume on it anyway")
        say(f"tune: warning: resuming on other data than the sweep started with (--force): digest "
            f"{previous['data_digest']} -> {source.digest}")
    return source, check_columns(source, spec)


def _preflight(cfg: Config) -> None:
    """``tracking.preflight`` and the import of Ray Tune, on a helper thread while Ray starts."""
    try:
        tracking.preflight(cfg)
        import ray.tune  # noqa: F401 - imported here, beside Ray's start, rather than after it
    except RuntimeError as exc:
        # CPython 3.11 refuses an import that two threads' module locks would deadlock on
        # (importlib's _DeadlockError): Ray's start imported a module this thread was waiting
        # for. Rare; done again, it finds the module complete.
        if type(exc).__name__ != "_DeadlockError":
            raise
        tracking.preflight(cfg)


def _per_trial(cfg: Config, one_task: bool) -> str:
    if one_task:
        return f"in its own process, {threads(cfg)} XGBoost thread(s)"
    return f"Ray Train, {cfg.ray.num_workers} worker(s)"


def _ours(exc: BaseException) -> str | None:
    """The first line of a TrainingError of ours in an exception's chain (Tune wraps what its callbacks raise)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TrainingError):
            return first_line(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _register_best(cfg: Config, best: dict[str, Any], spec: Any, source: Any, columns: list[str],
                   profile: dict[str, Any], say: Callable[[str], None], prepared: Any) -> str:
    """The best trial's model, logged into its run as `churn train` logs it, registered at `staging`."""
    import mlflow

    if best["status"] != "completed" or not best.get("checkpoint_path"):
        raise TrainingError(f"tune: the best trial {best['trial_id']} has no final checkpoint to register")
    out = load_trial_checkpoint(best["checkpoint_path"])
    trial_cfg = with_params(cfg, best["config"])
    run_id = best["run_id"]
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"data.digest": source.digest, "data.source": source.uri})
        contact = decide(trial_cfg, prepared, out.booster)  # on the sweep's validation rows
        say(calibration_line(contact))
        say(contact_line(contact))
        mlflow.log_metrics({tracking.grouped(k): v for k, v in contact_metrics(contact).items()})
        log_model(trial_cfg, spec, source, columns, out.booster, int(out.state["best_iteration"] or 0), run_id, profile,
                  contact, prepared.report.missing)
    mlflow.MlflowClient().set_terminated(run_id, "FINISHED")
    info, _ = Registry(cfg, say=say).register(run_id, alias=STAGING,
                                              description=f"best trial of sweep {best.get('trial_id')}")
    say(f"tune: registered the best trial as {cfg.model.registered_name} version {info.version} (alias {STAGING})")
    return info.version
