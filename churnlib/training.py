"""Distributed XGBoost on Ray Train, tracked in MLflow by the driver.

``build_trainer`` is the one place the Ray Train ``XGBoostTrainer`` is built;
``churn train`` uses it here and the Tune sweep wraps the same call.

Each worker builds an ``xgboost.QuantileDMatrix`` from its dataset shard
through an iterator (bounded memory), trains with XGBoost's collective, and
reports to Ray Train only to checkpoint (every ``training.checkpoint_every``
rounds) and at the end: in Ray Train V2 each ``ray.train.report`` waits for the
controller's poll, so reporting every round would dominate the run time. The
full per-iteration metric history travels in the checkpoint instead; progress
lines reach the driver through a small actor, without waiting on anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from churnlib.console import say
from churnlib.errors import ChurnError, TrainingError

if TYPE_CHECKING:
    from churnlib.config import Config

STATE_FILE = "train_state.json"
MODEL_FILE = "model.ubj"
# The encoded table's name in Ray Train (``data_<rank>`` for fixed shards).
DATA = "data"
# Shortest wait for a worker group's resources (a trial starting while the last
# one's workers are still being torn down waits a few seconds).
START_TIMEOUT_FLOOR_S = 30.0


def xgb_log_name(metric: str) -> str:
    """The name XGBoost gives a metric in its eval log ('error@0.5' is logged as 'error')."""
    base, _, threshold = metric.partition("@")
    if base == "error" and threshold and float(threshold) == 0.5:
        return "error"
    return metric


# Progress: workers -> driver -------------------------------------------------


class _ProgressSink:
    """A zero-CPU actor holding progress messages until the driver drains them."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def push(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class ProgressRelay:
    """Driver side: starts the sink actor and a thread that hands messages to ``on_message``."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], interval_s: float = 0.5):
        import ray

        self.sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
        self._on_message = on_message
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="churn-progress", daemon=True)

    def __enter__(self) -> "ProgressRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread, hand over what is left, remove the actor (once; safe after ray.shutdown)."""
        import ray

        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if ray.is_initialized():
            self._flush()
            with contextlib.suppress(Exception):
                ray.kill(self.sink)

    def _flush(self) -> None:
        import ray

        try:
            items = ray.get(self.sink.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        for item in items:
            try:
                self._on_message(item)
            except Exception:  # noqa: BLE001
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush()


# The per-worker training loop --------------------------------------------------


def _split_iter(local: Any, valid: bool, batch_size: int, names: list[str], types: list[str]):
    """An ``xgboost.DataIter`` over one side (train or validation) of a worker's shard.

    XGBoost's QuantileDMatrix passes over the data several times; each pass
    reads the shard batch by batch from the object store, so the worker's
    heap never holds the whole shard.
    """
    import numpy as np
    import xgboost as xgb

    class SplitIter(xgb.DataIter):
        def __init__(self) -> None:
            self._it = None
            self._fed = False
            super().__init__(cache_prefix=None)

        def next(self, input_data: Callable) -> bool:
            if self._it is None:
                self._it = iter(local.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1))
                self._fed = False
            for batch in self._it:
                keep = (batch["flags"] == 0) & (batch["is_valid"] == valid)
                if keep.any():
                    self._fed = True
                    input_data(data=batch["X"][keep], label=batch["y"][keep], feature_names=names, feature_types=types)
                    return True
            if not self._fed:
                # A worker may hold no rows of one side (tiny tables); it still
                # takes part in the collective with an empty matrix.
                self._fed = True
                empty = np.empty((0, len(names)), dtype=np.float32)
                input_data(data=empty, label=np.empty(0, dtype=np.float32), feature_names=names, feature_types=types)
                return True
            return False

        def reset(self) -> None:
            self._it = None

    return SplitIter()


def check_checkpoint(path: str) -> None:
    """One line (ConfigError) when ``path`` is not a training checkpoint folder."""
    import pyarrow.fs as pafs

    from churnlib.data import _filesystem
    from churnlib.errors import ConfigError

    try:
        fs, root = _filesystem(path)
        found = {name: fs.get_file_info(f"{root.rstrip('/')}/{name}").type for name in (MODEL_FILE, STATE_FILE)}
    except (OSError, ChurnError) as exc:
        raise ConfigError(f"training.resume_from {path}: {str(exc).splitlines()[0]}") from None
    if any(kind != pafs.FileType.File for kind in found.values()):
        raise ConfigError(f"training.resume_from {path}: not a training checkpoint (it needs {MODEL_FILE} and "
                          f"{STATE_FILE}; checkpoints are the checkpoint_* folders under training.storage_path)")


def _load_checkpoint(checkpoint: Any) -> tuple[Any, dict[str, Any]]:
    import xgboost as xgb

    with checkpoint.as_directory() as d:
        booster = xgb.Booster(model_file=os.path.join(d, MODEL_FILE))
        state = json.loads(Path(d, STATE_FILE).read_text())
    return booster, state


def score_key(stopping_metric: str) -> str:
    """The reported name of the best validation score so far ('auc' -> 'best_valid_auc')."""
    from churnlib.tracking import metric_key

    return f"best_{metric_key('valid-' + xgb_log_name(stopping_metric))}"


def report_metrics(state: dict[str, Any], rounds: int, stopping_metric: str, finished: bool = False) -> dict[str, Any]:
    """What every report to Ray Train carries (and, through Train, to Tune): the
    boosting rounds done, the latest value of each metric, the best score so
    far and its iteration, and whether training finished."""
    from churnlib.tracking import metric_key

    metrics: dict[str, Any] = {"rounds": rounds}
    metrics.update({metric_key(k): v[-1] for k, v in state["history"].items() if v})
    metrics[score_key(stopping_metric)] = state["best_score"]
    metrics["best_iteration"] = state["best_iteration"]
    metrics["finished"] = finished
    return metrics


def _report_checkpoint(rank: int, booster: Any, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every worker reports (Ray Train needs all ranks); rank 0 attaches model + state."""
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        booster.save_model(os.path.join(d, MODEL_FILE))
        Path(d, STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _make_callback(config: dict[str, Any], state: dict[str, Any], rank: int, sink: Any, offset: int = 0):
    """The training callback. ``offset``: boosting rounds already in the model training
    continues from (a restored checkpoint). XGBoost numbers the epochs of a continued
    training from 0 again; every round here is absolute (``offset + epoch``), so the
    history, early stopping, checkpoints and progress carry on where the checkpoint left off.
    """
    import xgboost as xgb

    metric = f"valid-{xgb_log_name(config['stopping_metric'])}"
    from churnlib.config import XGB_MAXIMIZE

    maximize = config["stopping_metric"].split("@")[0] in XGB_MAXIMIZE
    patience = config["early_stopping_rounds"]
    every = config["checkpoint_every"]
    report_every = config.get("report_every", 0)
    interval = config["progress_interval_s"]

    class Loop(xgb.callback.TrainingCallback):
        """Metric history, early stopping, checkpoints and progress, restartable from a checkpoint."""

        def __init__(self) -> None:
            self.last_progress = 0.0
            self.t0 = 0.0

        def before_training(self, model: Any) -> Any:
            self.t0 = time.perf_counter()
            return model

        def after_training(self, model: Any) -> Any:
            state["boosting_seconds"] += time.perf_counter() - self.t0
            return model

        def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
            epoch += offset  # absolute round (see above)
            history = state["history"]
            for data, metrics in evals_log.items():
                for name, values in metrics.items():
                    history.setdefault(f"{data}-{name}", []).append(float(values[-1]))
            score = history[metric][-1]
            best = state["best_score"]
            if best is None or (score > best if maximize else score < best):
                state["best_score"], state["best_iteration"] = score, epoch
            stop = bool(patience) and epoch - state["best_iteration"] >= patience
            state["stopped_early"] = stop
            now = time.perf_counter()
            last = stop or epoch + 1 >= config["num_boost_round"]
            if rank == 0 and sink is not None and (last or now - self.last_progress >= interval):
                self.last_progress = now
                sink.push.remote(
                    {
                        "kind": "round",
                        "iteration": epoch,
                        "rounds": config["num_boost_round"],
                        "metrics": {k: v[-1] for k, v in history.items()},
                        "best_iteration": state["best_iteration"],
                        "best_score": state["best_score"],
                        "pid": os.getpid(),
                        "restarts": state["restarts"],
                    }
                )
            if not stop and epoch + 1 < config["num_boost_round"]:
                if every and (epoch + 1) % every == 0:
                    self._checkpoint(model, epoch)
                elif report_every and (epoch + 1) % report_every == 0:
                    # for a Tune scheduler (ASHA): intermediate results, no checkpoint;
                    # every worker reports, as Ray Train requires
                    import ray.train

                    ray.train.report(report_metrics(state, epoch + 1, config["stopping_metric"]))
            return stop

        def _checkpoint(self, model: Any, epoch: int) -> None:
            state["boosting_seconds"] += time.perf_counter() - self.t0
            self.t0 = time.perf_counter()
            _report_checkpoint(rank, model, state, report_metrics(state, epoch + 1, config["stopping_metric"]))
            if rank == 0 and sink is not None:
                sink.push.remote({"kind": "checkpoint", "iteration": epoch, "pid": os.getpid()})

    return Loop()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import xgboost as xgb

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    sink = config.get("progress_sink")
    names, types = config["feature_names"], config["feature_types"]

    # Wall-clock marks (comparable across processes), for the driver's timings.
    timeline = {"loop_start": time.time()}
    # Pulled through Ray Data once; kept in the object store for XGBoost's passes.
    # A fixed shard per rank (see shard_datasets) when the table is materialized.
    shard_name = f"{DATA}_{rank}" if config.get("fixed_shards") else DATA
    local = ray.train.get_dataset_shard(shard_name).materialize()
    timeline["shard_ready"] = time.time()
    batch = config["batch_size"]
    dtrain = xgb.QuantileDMatrix(
        _split_iter(local, False, batch, names, types), max_bin=config["params"]["max_bin"], enable_categorical=True
    )
    dvalid = xgb.QuantileDMatrix(_split_iter(local, True, batch, names, types), ref=dtrain, enable_categorical=True)
    timeline["matrices_ready"] = time.time()

    state: dict[str, Any] = {
        "history": {},
        "best_iteration": None,
        "best_score": None,
        "stopped_early": False,
        "boosting_seconds": 0.0,
        "restarts": 0,
        "resumed_from": [],
    }
    start_model = None
    checkpoint = ray.train.get_checkpoint()  # this run's own, after a worker failure
    if checkpoint is not None:
        start_model, state = _load_checkpoint(checkpoint)
        state["restarts"] += 1
        state["resumed_from"].append(start_model.num_boosted_rounds())
    elif config.get("resume_from"):  # an earlier run's checkpoint (training.resume_from)
        from ray.train import Checkpoint

        start_model, state = _load_checkpoint(Checkpoint(config["resume_from"]))
        state["resumed_from"].append(start_model.num_boosted_rounds())
    state["timeline"] = timeline
    state["worker_rows"] = {"train": dtrain.num_row(), "valid": dvalid.num_row()}

    done = start_model.num_boosted_rounds() if start_model is not None else 0
    remaining = config["num_boost_round"] - done
    booster = start_model
    if remaining > 0 and not state["stopped_early"]:
        booster = xgb.train(
            config["params"],
            dtrain,
            num_boost_round=remaining,
            evals=[(dtrain, "train"), (dvalid, "valid")],
            xgb_model=start_model,
            verbose_eval=False,
            callbacks=[_make_callback(config, state, rank, sink, offset=done)],
        )
    timeline["boosted"] = time.time()
    final = report_metrics(state, booster.num_boosted_rounds(), config["stopping_metric"], finished=True)
    _report_checkpoint(rank, booster, state, final)


# The trainer, built in one place -----------------------------------------------


def loop_config(cfg: Any, spec: Any, progress_sink: Any = None) -> dict[str, Any]:
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
    parts = dataset.split_at_indices([n * i // num_workers for i in range(1, num_workers)])
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
    from churnlib import interrupts

    t_fit = time.time()
    try:
        result = interrupts.run_in_thread(trainer.fit, name="churn-train-fit")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user, cause chained
        raise TrainingError(f"training failed: {_root_cause(exc)}") from exc
    if result.error is not None:
        raise TrainingError(f"training failed: {_root_cause(result.error)}")
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint (no model was reported)")
    return fit_output(result.checkpoint, t_fit)


def latest_checkpoint(trainer: Any) -> str | None:
    """The newest complete checkpoint folder a trainer's run has written so far, if any."""
    import pyarrow.fs as pafs

    from churnlib.data import _filesystem

    run = trainer.run_config
    try:
        fs, root = _filesystem(f"{run.storage_path.rstrip('/')}/{run.name}")
        found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    except (OSError, ChurnError):
        return None
    # checkpoint_<timestamp>: names sort in time order; the newest may be half written
    for path in sorted(found, reverse=True):
        uri = path if isinstance(fs, pafs.LocalFileSystem) else f"{run.storage_path.split('://')[0]}://{path}"
        try:
            check_checkpoint(uri)
        except ChurnError:
            continue
        return uri
    return None


def fit_output(checkpoint: Any, t_fit: float | None = None) -> FitOutput:
    """The final checkpoint of a training run -> the best-iteration booster and the worker state."""
    booster, state = _load_checkpoint(checkpoint)
    # seconds since fit() was called, for the last (successful) worker group
    if t_fit is not None:
        state["timeline"] = {k: v - t_fit for k, v in state.get("timeline", {}).items()}
    full = booster.num_boosted_rounds()
    best = state["best_iteration"]
    if best is not None and best + 1 < full:
        booster = booster[: best + 1]
    return FitOutput(booster=booster, full_rounds=full, state=state, checkpoint_path=checkpoint.path)


def outcome_metrics(state: dict[str, Any], full_rounds: int) -> tuple[int, dict[str, float]]:
    """-> (best iteration, the run's summary metrics: every metric at the best iteration,
    best_iteration, num_boosted_rounds, stopped_early, worker_restarts)."""
    from churnlib.tracking import metric_key

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


def _root_cause(exc: BaseException) -> str:
    seen = set()
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(exc))
        exc = nxt
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


# The whole `churn train` -------------------------------------------------------


@dataclass
class TrainResult:
    run_id: str
    experiment_id: str
    model_uri: str
    booster_uri: str
    metrics: dict[str, float]
    best_iteration: int
    num_boosted_rounds: int
    rows: dict[str, int]
    timings: dict[str, float]
    data_digest: str
    restarts: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "model_uri": self.model_uri,
            "booster_uri": self.booster_uri,
            "metrics": self.metrics,
            "best_iteration": self.best_iteration,
            "num_boosted_rounds": self.num_boosted_rounds,
            "rows": self.rows,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "data_digest": self.data_digest,
            "restarts": self.restarts,
        }


def default_data_path(cfg: Any) -> Path:
    """The generated table for the embedded default (made once per rows/seed)."""
    from churnlib.generate import generate

    path = cfg.workspace_path / "data" / f"churn_generated_{cfg.data.generate_rows}_s{cfg.data.generate_seed}.parquet"
    if not path.exists():
        generate(cfg.data.generate_rows, path, seed=cfg.data.generate_seed)
    return path


def _progress_printer(say: Callable[[str], None], stopping_metric: str) -> Callable[[dict[str, Any]], None]:
    key = f"valid-{xgb_log_name(stopping_metric)}"

    def show(msg: dict[str, Any]) -> None:
        if msg.get("kind") == "round":
            m = msg["metrics"]
            others = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("valid-") and k != key)
            best = msg["best_score"]
            say(
                f"  round {msg['iteration'] + 1:>4}/{msg['rounds']}  {key} {m.get(key, float('nan')):.4f}  {others}"
                f"  (best {best:.4f} at {msg['best_iteration'] + 1})"
            )
        elif msg.get("kind") == "checkpoint":
            say(f"  checkpoint at round {msg['iteration'] + 1}")

    return show


def train(
    cfg: Any,
    data_path: str | None = None,
    run_name: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = say,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Data -> validation -> Ray Train -> MLflow run with the model. The `churn train` command."""
    import mlflow

    from churnlib import data as data_mod
    from churnlib import tracking
    from churnlib.config import config_to_yaml
    from churnlib.drift import profile_from_dataset
    from churnlib.features import FeatureSpec
    from churnlib.runtime import check_resources, ensure_ray, quiet_logs, release_ray

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    quiet_logs(verbose)
    spec = FeatureSpec.from_config(cfg.features)
    data_uri = data_path or cfg.data.path
    if data_uri is not None:
        source = data_mod.resolve_source(data_uri)  # a missing path: one line, before any network
    if cfg.training.resume_from:
        check_checkpoint(cfg.training.resume_from)
    # A tracking store or artifact store that is down fails here, in seconds, before
    # anything slow (generating data, starting Ray).
    tracking.preflight(cfg)
    if data_uri is None:
        say(f"data: generating {cfg.data.generate_rows} synthetic rows (seed {cfg.data.generate_seed})")
        data_uri = str(default_data_path(cfg))
        timings["generate_s"] = time.perf_counter() - t_start
        source = data_mod.resolve_source(data_uri)
    columns = data_mod.check_columns(source, spec)

    t0 = time.perf_counter()
    local = ensure_ray(cfg.ray, verbose=verbose)
    check_resources(cfg.ray, local, streaming=not cfg.training.materialize)
    timings["ray_start_s"] = time.perf_counter() - t0

    tags = {"churn.command": "train", "ray_version": _version("ray"), "xgboost_version": _version("xgboost")}
    if cfg.training.resume_from:
        tags["churn.resumed_from"] = cfg.training.resume_from
    with tracking.tracked_run(cfg, run_name, tags) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        say(f"mlflow: run {run_id} in experiment {cfg.mlflow.experiment_name!r} at {cfg.tracking_uri}")
        tracking.log_params_flat(cfg.flat())
        mlflow.log_text(config_to_yaml(cfg), "config/resolved_config.yaml")

        t0 = time.perf_counter()
        say(f"data: reading and validating {source.uri} ({len(source.files)} {source.format} file(s), {source.size_bytes / 1e6:.1f} MB)")
        prepared = data_mod.prepare(
            source, spec, columns, cfg.model.validation_split, cfg.model.random_state, cfg.training.materialize
        )
        report = prepared.report
        missing = {c: n for c, n in report.missing.items() if n}
        timings["prepare_s"] = time.perf_counter() - t0
        say(
            f"data: {report.rows} rows, {report.empty_rows} empty row(s) dropped, "
            f"{sum(missing.values())} missing value(s){' in ' + ', '.join(missing) if missing else ''}, "
            f"churn rate {report.positives / max(report.usable_rows, 1):.3f}"
        )
        tracking.log_dataset(source, spec, context="training")
        mlflow.log_dict(report.to_dict(), "data/validation_report.json")
        t0 = time.perf_counter()
        profile = profile_from_dataset(prepared.dataset, spec, cfg.drift.profile_rows, seed=cfg.model.random_state)
        timings["profile_s"] = time.perf_counter() - t0

        say(
            f"train: Ray Train, {cfg.ray.num_workers} worker(s) x {cfg.ray.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.ray.use_gpu else ''}, device {cfg.xgb_device}, up to {cfg.xgboost.num_boost_round} rounds"
        )
        printer = _progress_printer(say, cfg.xgboost.early_stopping_metric)

        def handle(msg: dict[str, Any]) -> None:
            printer(msg)
            if on_progress is not None:
                on_progress(msg)

        t0 = time.perf_counter()
        with ProgressRelay(handle) as relay:
            trainer = build_trainer(cfg, prepared.dataset, loop_config(cfg, spec, relay.sink))
            try:
                out = fit(trainer)
            except KeyboardInterrupt:
                relay.close()
                release_ray()  # the workers stop now, before a newer checkpoint replaces this one
                last = latest_checkpoint(trainer)
                if last:
                    say(f"train: interrupted; to continue from its last checkpoint: churn train --resume-from {last}")
                raise
        timings["fit_s"] = time.perf_counter() - t0
        state = out.state
        timings["boosting_s"] = state["boosting_seconds"]
        tl = state["timeline"]
        if {"loop_start", "shard_ready", "matrices_ready"} <= set(tl):
            timings["workers_up_s"] = tl["loop_start"]  # controller + worker group + collective
            timings["worker_shard_s"] = tl["shard_ready"] - tl["loop_start"]
            timings["worker_matrices_s"] = tl["matrices_ready"] - tl["shard_ready"]

        best, metrics = outcome_metrics(state, out.full_rounds)
        rows = {
            "total": report.rows,
            "dropped_empty": report.empty_rows,
            "train": prepared.train_rows,
            "valid": prepared.valid_rows,
        }
        metrics.update(
            {
                "train_rows": rows["train"],
                "valid_rows": rows["valid"],
                "dropped_empty_rows": rows["dropped_empty"],
                "total_rows": rows["total"],
                "missing_values": float(sum(missing.values())),
            }
        )
        for col, n in missing.items():
            metrics[f"missing_{col.replace(' ', '_')}"] = n
        tracking.log_history(run_id, state["history"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.set_tags({"data.digest": source.digest, "data.source": source.uri})

        t0 = time.perf_counter()
        logged_uri = _log_model(cfg, spec, source, columns, out.booster, best, run_id, profile)
        timings["log_model_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        mlflow.log_metrics({f"time_{k}": v for k, v in timings.items()})

        result = TrainResult(
            run_id=run_id,
            experiment_id=experiment_id,
            model_uri=f"runs:/{run_id}/model",
            booster_uri=f"runs:/{run_id}/booster/booster.ubj",
            metrics={k: float(v) for k, v in metrics.items()},
            best_iteration=best,
            num_boosted_rounds=out.full_rounds,
            rows=rows,
            timings=timings,
            data_digest=source.digest,
            restarts=state["restarts"],
            extra={"logged_model_uri": logged_uri, "checkpoint_path": out.checkpoint_path},
        )
    return result


def _log_model(cfg: Any, spec: Any, source: Any, columns: list[str], booster: Any, best: int, run_id: str,
               profile: dict[str, Any] | None = None) -> str:
    """Feature importance (JSON + PNG), the booster and the raw-records pyfunc model, into the active run."""
    import mlflow

    from churnlib import tracking
    from churnlib.model import input_example, save_model_dir, signature_for
    from churnlib.pyfunc import ChurnModel

    tracking.log_importance(booster, spec.feature_names)
    with tempfile.TemporaryDirectory(prefix="churn-") as tmp:
        tmpdir = Path(tmp)
        meta = {
            "decision_threshold": cfg.model.decision_threshold,
            "model_name": cfg.model.name,
            "best_iteration": best,
            "feature_names": spec.feature_names,
            "run_id": run_id,
            "data_digest": source.digest,
        }
        model_dir = save_model_dir(tmpdir / "model_dir", booster, spec, meta, profile)
        if profile is not None:
            mlflow.log_dict(profile, "data/profile.json")
        mlflow.log_artifact(str(model_dir / "booster.ubj"), artifact_path="booster")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ChurnModel(),
            artifacts={"model_dir": str(model_dir)},
            signature=signature_for(spec),
            input_example=input_example(_sample_rows(source, columns), spec),
            pip_requirements=_requirements(),
            metadata={"churn_feature_spec": spec.to_dict(), "decision_threshold": cfg.model.decision_threshold},
        )
    return info.model_uri


def _sample_rows(source: Any, columns: list[str], n: int = 5):
    """A few raw rows for the model's input example, read straight from the first file."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = source.files[0]
    if source.format == "parquet":
        pf = pq.ParquetFile(source.filesystem.open_input_file(path))
        return next(pf.iter_batches(batch_size=n, columns=columns)).to_pandas()
    with source.filesystem.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(include_columns=columns))
        return reader.read_next_batch().to_pandas().head(n)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _requirements() -> list[str]:
    return [
        f"{pkg}=={_version(pkg)}"
        for pkg in ("mlflow", "xgboost", "pandas", "numpy", "pyarrow", "pyyaml", "pydantic")
        if _version(pkg) != "unknown"
    ]
