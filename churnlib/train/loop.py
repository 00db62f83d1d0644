"""The per-worker training loop: a QuantileDMatrix from the worker's shard, XGBoost's collective, our early stopping.

Each worker builds an ``xgboost.QuantileDMatrix`` from its dataset shard through an
iterator (bounded memory). Early stopping is our own callback, counted in absolute
rounds, so it survives a restore from a checkpoint; checkpoints carry the model, the
full metric history and the early-stopping state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from churnlib.config import XGB_MAXIMIZE
from churnlib.data.sources import filesystem
from churnlib.errors import ChurnError, ConfigError, first_line
from churnlib.tracking import metric_key

STATE_FILE = "train_state.json"


MODEL_FILE = "model.ubj"


# The encoded table's name in Ray Train (``data_<rank>`` for fixed shards).
DATA = "data"


def xgb_log_name(metric: str) -> str:
    """The name XGBoost gives a metric in its eval log ('error@0.5' is logged as 'error')."""
    base, _, threshold = metric.partition("@")
    if base == "error" and threshold and float(threshold) == 0.5:
        return "error"
    return metric


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

    try:
        fs, root = filesystem(path)
        found = {name: fs.get_file_info(f"{root.rstrip('/')}/{name}").type for name in (MODEL_FILE, STATE_FILE)}
    except (OSError, ChurnError) as exc:
        raise ConfigError(f"training.resume_from {path}: {first_line(exc)}") from None
    if any(kind != pafs.FileType.File for kind in found.values()):
        raise ConfigError(f"training.resume_from {path}: not a training checkpoint (it needs {MODEL_FILE} and "
                          f"{STATE_FILE}; checkpoints are the checkpoint_* folders under training.storage_path)")


def load_checkpoint(checkpoint: Any) -> tuple[Any, dict[str, Any]]:
    """The booster and training state stored in a Ray Train checkpoint."""
    import xgboost as xgb

    with checkpoint.as_directory() as d:
        booster = xgb.Booster(model_file=os.path.join(d, MODEL_FILE))
        state = json.loads(Path(d, STATE_FILE).read_text())
    return booster, state


def score_key(stopping_metric: str) -> str:
    """The reported name of the best validation score so far ('auc' -> 'best_valid_auc')."""
    return f"best_{metric_key('valid-' + xgb_log_name(stopping_metric))}"


def report_metrics(state: dict[str, Any], rounds: int, stopping_metric: str, finished: bool = False) -> dict[str, Any]:
    """What every report to Ray Train carries (and, through Train, to Tune): the
    boosting rounds done, the latest value of each metric, the best score so
    far and its iteration, and whether training finished."""
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


def _train_report(metrics: dict[str, Any]) -> None:
    import ray.train

    ray.train.report(metrics)


def _make_callback(config: dict[str, Any], state: dict[str, Any], rank: int, sink: Any, offset: int = 0,
                   save: Callable[[Any, dict[str, Any]], None] | None = None,
                   report: Callable[[dict[str, Any]], None] | None = None):
    """The training callback. ``offset``: boosting rounds already in the model training
    continues from (a restored checkpoint). XGBoost numbers the epochs of a continued
    training from 0 again; every round here is absolute (``offset + epoch``), so the
    history, early stopping, checkpoints and progress carry on where the checkpoint left off.

    ``save(model, metrics)`` writes a checkpoint and ``report(metrics)`` sends an intermediate
    result (for Tune's scheduler); by default both go through Ray Train (``ray.train.report``),
    the one-task engine (``churnlib.train.task``) passes its own.
    """
    import xgboost as xgb

    save = save or (lambda model, metrics: _report_checkpoint(rank, model, state, metrics))
    report = report or _train_report

    metric = f"valid-{xgb_log_name(config['stopping_metric'])}"

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
                    report(report_metrics(state, epoch + 1, config["stopping_metric"]))
            return stop

        def _checkpoint(self, model: Any, epoch: int) -> None:
            state["boosting_seconds"] += time.perf_counter() - self.t0
            self.t0 = time.perf_counter()
            save(model, report_metrics(state, epoch + 1, config["stopping_metric"]))
            if rank == 0 and sink is not None:
                sink.push.remote({"kind": "checkpoint", "iteration": epoch, "pid": os.getpid()})

    return Loop()


def new_state() -> dict[str, Any]:
    """The training state a fresh run starts from (it travels in every checkpoint)."""
    return {
        "history": {},
        "best_iteration": None,
        "best_score": None,
        "stopped_early": False,
        "boosting_seconds": 0.0,
        "restarts": 0,
        "resumed_from": [],
    }


def build_matrices(local: Any, config: dict[str, Any]) -> tuple[Any, Any]:
    """The training and validation ``QuantileDMatrix`` of a table that has ``iter_batches``
    (a worker's shard, or the one-task engine's table), fed batch by batch."""
    import xgboost as xgb

    names, types, batch = config["feature_names"], config["feature_types"], config["batch_size"]
    max_bin = config["params"]["max_bin"]
    dtrain = xgb.QuantileDMatrix(_split_iter(local, False, batch, names, types), max_bin=max_bin,
                                 enable_categorical=True)
    # the same max_bin again: XGBoost checks it against the reference's (a default 256 fails any other)
    dvalid = xgb.QuantileDMatrix(_split_iter(local, True, batch, names, types), ref=dtrain, max_bin=max_bin,
                                 enable_categorical=True)
    return dtrain, dvalid


def boost(config: dict[str, Any], dtrain: Any, dvalid: Any, start_model: Any, state: dict[str, Any], rank: int,
          sink: Any, save: Callable[[Any, dict[str, Any]], None] | None = None,
          report: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """The rounds still to do, from ``start_model`` (a checkpoint's, or None) -> the booster."""
    import xgboost as xgb

    state["worker_rows"] = {"train": dtrain.num_row(), "valid": dvalid.num_row()}
    done = start_model.num_boosted_rounds() if start_model is not None else 0
    remaining = config["num_boost_round"] - done
    if remaining <= 0 or state["stopped_early"]:
        return start_model
    return xgb.train(
        config["params"],
        dtrain,
        num_boost_round=remaining,
        evals=[(dtrain, "train"), (dvalid, "valid")],
        xgb_model=start_model,
        verbose_eval=False,
        callbacks=[_make_callback(config, state, rank, sink, offset=done, save=save, report=report)],
    )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    sink = config.get("progress_sink")

    # Wall-clock marks (comparable across processes), for the driver's timings.
    timeline = {"loop_start": time.time()}
    # Pulled through Ray Data once; kept in the object store for XGBoost's passes.
    # A fixed shard per rank (see shard_datasets) when the table is materialized.
    shard_name = f"{DATA}_{rank}" if config.get("fixed_shards") else DATA
    local = ray.train.get_dataset_shard(shard_name).materialize()
    timeline["shard_ready"] = time.time()
    dtrain, dvalid = build_matrices(local, config)
    timeline["matrices_ready"] = time.time()

    state = new_state()
    start_model = None
    checkpoint = ray.train.get_checkpoint()  # this run's own, after a worker failure
    if checkpoint is not None:
        start_model, state = load_checkpoint(checkpoint)
        state["restarts"] += 1
        state["resumed_from"].append(start_model.num_boosted_rounds())
    elif config.get("resume_from"):  # an earlier run's checkpoint (training.resume_from)
        from ray.train import Checkpoint

        start_model, state = load_checkpoint(Checkpoint(config["resume_from"]))
        state["resumed_from"].append(start_model.num_boosted_rounds())
    state["timeline"] = timeline
    booster = boost(config, dtrain, dvalid, start_model, state, rank, sink)
    timeline["boosted"] = time.time()
    final = report_metrics(state, booster.num_boosted_rounds(), config["stopping_metric"], finished=True)
    _report_checkpoint(rank, booster, state, final)
