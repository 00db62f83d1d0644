"""The Ray Train trainer, built in one place, and what a fit returns.

``build_trainer`` is the one place the Ray Train ``XGBoostTrainer`` is built;
``churn train`` uses it and the Tune sweep wraps the same call.

Each worker builds an ``xgboost.QuantileDMatrix`` from its dataset shard
through an iterator (bounded memory), trains with XGBoost's collective, and
reports to Ray Train only to checkpoint (every ``training.checkpoint_every``
rounds) and at the end: in Ray Train V2 each ``ray.train.report`` waits for the
controller's poll, so reporting every round would dominate the run time. The
full per-iteration metric history travels in the checkpoint instead; progress
lines reach the driver through a small actor, without waiting on anything.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from churnlib import interrupts
from churnlib.errors import TrainingError, root_cause
from churnlib.tracking import metric_key
from churnlib.train.checkpoints import latest_in
from churnlib.train.loop import DATA, load_checkpoint, train_loop_per_worker

if TYPE_CHECKING:
    from churnlib.config import Config


# Shortest wait for a worker group's resources (a trial starting while the last
# one's workers are still being torn down waits a few seconds).
START_TIMEOUT_FLOOR_S = 15.0


def loop_config(cfg: Config, spec: Any, progress_sink: Any = None) -> dict[str, Any]:
    """What every worker needs to know; Tune overrides ``params`` per trial."""
    x = cfg.xgboost
    return {
        "params": cfg.xgb_params(),
        "num_boost_round": x.num_boost_round,
        "early_stopping_rounds": x.early_stopping_rounds,
        "stopping_metric": x.early_stopping_metric,
        "checkpoint_every": cfg.training.checkpoint_every,
        "batch_size": cfg.training.batch_size,
        "progress_interval_s": cfg.training.progress_interval_s,
        "report_every": 0,  # Tune sets this: intermediate results for its scheduler
        "resume_from": cfg.training.resume_from,
        "feature_names": spec.feature_names,
        "feature_types": spec.feature_types,
        "progress_sink": progress_sink,
    }


def shard_datasets(dataset: Any, num_workers: int) -> tuple[dict[str, Any], Any]:
    """The encoded table for Ray Train -> (datasets, data config).

    A materialized table is cut into one fixed, contiguous shard per worker rank
    (``data_<rank>``), balanced to within a row, none dropped. Every (re)start of
    the worker group then trains on exactly the same rows in the same order, so
    a run restored after a worker failure builds the same quantile sketch and
    the same trees as a run resumed from the same checkpoint without one.
    (Ray Train's default ``streaming_split`` hands blocks to whichever worker
    asks first and may drop up to ``num_workers - 1`` rows to keep shards equal.)
    A streaming table (``training.materialize: false``) cannot be cut in
    advance and keeps Ray Train's split.
    """
    from ray.data.dataset import MaterializedDataset
    from ray.train import DataConfig

    if not isinstance(dataset, MaterializedDataset):
        return {DATA: dataset}, None
    n = dataset.count()
    # one worker: the whole table (Ray Data refuses an empty list of split points)
    parts = dataset.split_at_indices([n * i // num_workers for i in range(1, num_workers)]) if num_workers > 1 else [dataset]
    return {f"{DATA}_{i}": part for i, part in enumerate(parts)}, DataConfig(datasets_to_split=[])


def build_trainer(
    cfg: Config,
    dataset: Any,
    train_loop_config: dict[str, Any],
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list[Any] | None = None,
):
    """The Ray Train XGBoostTrainer for ``cfg`` over the encoded table ``dataset``:
    workers, GPUs, failures, checkpoints, fixed shards (``shard_datasets``).

    Used by ``churn train`` and, unchanged, by every trial of ``churn tune``
    (which adds Ray Tune's report callback and a per-trial name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.xgboost import XGBoostTrainer

    # The controller polls workers this often; a worker's report waits for it.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(cfg.ray.controller_poll_interval_s)
    # A worker group that cannot get its resources (CPUs held by other work, GPUs
    # the cluster never gets) fails after ray.resources_timeout_s (at least
    # START_TIMEOUT_FLOOR_S), once: Ray Train would retry it for ever.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(max(cfg.ray.resources_timeout_s, START_TIMEOUT_FLOOR_S))
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    datasets, data_config = shard_datasets(dataset, cfg.ray.num_workers)
    return XGBoostTrainer(
        train_loop_per_worker,
        train_loop_config={**train_loop_config, "fixed_shards": data_config is not None},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name or f"churn-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage_path or cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.training.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=data_config,
    )


@dataclass
class FitOutput:
    """What a fit left: the booster, the training state, the checkpoint path, restarts."""
    booster: Any  # trimmed to the best iteration
    full_rounds: int
    state: dict[str, Any]
    checkpoint_path: str


def fit(trainer: Any) -> FitOutput:
    """Run the trainer; return the best-iteration booster and the worker state.

    ``trainer.fit()`` runs in a helper thread: called from the main thread, Ray
    Train takes SIGINT for its own abort (which ends the run as a failure), and
    the main thread must stay free for SIGINT/SIGTERM (``churnlib.interrupts``).
    An interrupt leaves the run's checkpoints on storage for ``--resume-from``.
    """
    t_fit = time.time()
    try:
        result = interrupts.run_in_thread(trainer.fit, name="churn-train-fit")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user, cause chained
        raise TrainingError(f"training failed: {root_cause(exc)}") from exc
    if result.error is not None:
        raise TrainingError(f"training failed: {root_cause(result.error)}")
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint (no model was reported)")
    return fit_output(result.checkpoint, t_fit)


def latest_checkpoint(trainer: Any) -> str | None:
    """The newest complete checkpoint folder a trainer's run has written so far, if any."""
    run = trainer.run_config
    return latest_in(f"{run.storage_path.rstrip('/')}/{run.name}")


def fit_output(checkpoint: Any, t_fit: float | None = None) -> FitOutput:
    """The final checkpoint of a training run -> the best-iteration booster and the worker state."""
    booster, state = load_checkpoint(checkpoint)
    return trim_to_best(booster, state, checkpoint.path, t_fit)


def trim_to_best(booster: Any, state: dict[str, Any], path: str, t_fit: float | None = None) -> FitOutput:
    """A final checkpoint's booster and state -> the booster cut to its best iteration (the
    full one keeps the rounds early stopping waited through), the timeline made relative to
    ``t_fit`` (when fit() was called, for the last, successful worker group)."""
    if t_fit is not None:
        state["timeline"] = {k: v - t_fit for k, v in state.get("timeline", {}).items()}
    full = booster.num_boosted_rounds()
    best = state["best_iteration"]
    if best is not None and best + 1 < full:
        booster = booster[: best + 1]
    return FitOutput(booster=booster, full_rounds=full, state=state, checkpoint_path=path)


def outcome_metrics(state: dict[str, Any], full_rounds: int) -> tuple[int, dict[str, float]]:
    """-> (best iteration, the run's summary metrics: every metric at the best iteration,
    best_iteration, num_boosted_rounds, stopped_early, worker_restarts)."""
    best = state["best_iteration"] if state["best_iteration"] is not None else full_rounds - 1
    metrics = {
        f"best_{metric_key(name)}": float(values[best]) for name, values in state["history"].items() if best < len(values)
    }
    metrics.update({
        "best_iteration": float(best),
        "num_boosted_rounds": float(full_rounds),
        "stopped_early": float(bool(state["stopped_early"])),
        "worker_restarts": float(state["restarts"]),
    })
    return best, metrics


