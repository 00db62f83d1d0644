"""The one-task engine: a table small enough for one process, boosted in one Ray task.

Ray Train's worker group is what a table too large for one process needs: a
controller, N worker processes in XGBoost's collective, a shard each. For a
table the driver has already read and encoded (``data.preparation``: up to
64 MB on disk) the group costs more than the boosting: on a 2-core laptop
11-14 s of new processes (controller, workers, placement-group cleaner,
synchronisation actor, dataset manager) before the first round, for a
200,000-row table whose 100 rounds take 3 s. This engine runs the same boosting
(``loop.boost``: the same callback, early stopping, metric history, progress and
checkpoint files) in one Ray task that holds every CPU the config asks for
(``ray.num_workers x ray.cpus_per_worker``, all of them XGBoost threads), on the
driver's encoded arrays handed over through the object store: one process to
start instead of six, one matrix build instead of a shard split per worker.

Faults are handled as Ray Train handles them. The task checkpoints every
``training.checkpoint_every`` rounds to ``<storage_path>/<run>/checkpoint_*``, the
same layout and files as Ray Train's (so ``churn train --resume-from`` takes a
checkpoint of either engine), each written whole before it gets its name. A task
whose process dies (killed, out of memory, its node lost) is run again by Ray, up
to ``training.max_failures`` times, and carries on from the newest complete
checkpoint, counting the restart, exactly like a Ray Train worker group restored
after a failure. Inside a Tune trial the trial's own process boosts (no task at
all) and reports to Tune what Ray Train's ``TuneReportCallback`` would.

``training.engine`` chooses: ``auto``, ``process``, ``task`` or ``ray_train``. ``process``
boosts in the command's own process (``TaskRun(here=True)``): the same ``boost_here``,
checkpoints and early stopping, with no Ray at all, so no instance to start (seconds on a
laptop, more than the boosting of a 200,000-row table); a process that dies is not run again
(``churn train --resume-from`` its newest checkpoint). ``auto``: ``process`` for a table read
into the driver, no GPU and no Ray instance to join (``runtime.ray_to_join``: none recorded by
``churn up``, no ``ray.address``, no RAY_ADDRESS; a command that would start a private instance
for one task); this engine (``task``) for such a table on an instance that is there (its CPUs
are counted beside the instance's other work, a Serve replica); Ray Train otherwise.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from churnlib import interrupts
from churnlib.data.preparation import LOCAL_PREPARE_MAX_BYTES
from churnlib.errors import ResourceError, TrainingError, root_cause
from churnlib.train.checkpoints import latest_in, read_checkpoint, write_checkpoint
from churnlib.train.loop import boost, build_matrices, new_state, report_metrics
from churnlib.train.trainer import FitOutput, trim_to_best

if TYPE_CHECKING:
    from churnlib.config import Config
    from churnlib.data.preparation import Prepared

# what the task needs of the driver's encoded table
TABLE_KEYS = ("X", "y", "flags", "is_valid")

# The matrices of the last table boosted in this process, by table and by what shapes them.
# Tune runs trial after trial in one process (``reuse_actors``) on the same table; each built
# its own, a few passes over the table per trial. Only the last is kept.
_MATRICES: dict[tuple, tuple[Any, Any]] = {}


def uses_task(cfg: Config, prepared: Prepared, node_cpus: float | None = None) -> bool:
    """Whether ``training.engine`` runs this table in one task (a Tune trial: in the trial's
    own process; ``process`` is taken as ``task`` there, a sweep runs on Ray). ``auto``: a
    table read into the driver, no GPUs (several workers' worth only Ray Train's group can
    use), and one node of the cluster (``node_cpus``: its largest, when known) holding every
    CPU asked for (a cluster of small nodes spreads Ray Train's workers instead)."""
    engine = cfg.training.engine
    if engine == "auto":
        return (prepared.local is not None and not cfg.ray.use_gpu
                and (node_cpus is None or node_cpus >= cfg.ray.num_workers * cfg.ray.cpus_per_worker))
    return engine in ("task", "process")


def boosts_here(cfg: Config, size_bytes: int, ray_up: bool) -> bool:
    """Whether `churn train` boosts in its own process, decided before Ray is started: ``process``,
    or ``auto`` for a table small enough to be read in the driver (``size_bytes`` on disk), no
    GPU, and no Ray instance to join (``ray_up``: ``runtime.ray_to_join``). A ResourceError (one
    line) for ``process`` with a table too large for this process."""
    small = cfg.training.materialize and size_bytes <= LOCAL_PREPARE_MAX_BYTES
    if cfg.training.engine == "process":
        if not small:
            raise ResourceError(
                f"training.engine=process boosts in this process and takes a table of at most "
                f"{LOCAL_PREPARE_MAX_BYTES // 2**20} MB on disk, read whole (training.materialize: true); "
                f"this one is {size_bytes / 2**20:.0f} MB: use training.engine=auto, task or ray_train")
        return True
    return cfg.training.engine == "auto" and small and not cfg.ray.use_gpu and not ray_up


def largest_node_cpus() -> float:
    """The CPUs of the cluster's largest live node (the one task runs on one node)."""
    import ray

    return max((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def check_fits(cfg: Config, node_cpus: float) -> None:
    """One line (ResourceError) when ``training.engine=task`` asks for more CPUs than any node has."""
    need = cfg.ray.num_workers * cfg.ray.cpus_per_worker
    if node_cpus < need:
        raise ResourceError(f"training.engine=task runs on one node and asks for {need:g} CPUs "
                            f"(ray.num_workers x ray.cpus_per_worker), but the largest node has {node_cpus:g}; "
                            f"use training.engine=ray_train (or auto) to spread workers over nodes")


def threads(cfg: Config) -> int:
    """XGBoost threads of the one task: every CPU the config asks for (workers x CPUs each)."""
    return max(1, int(round(cfg.ray.num_workers * cfg.ray.cpus_per_worker)))


def engine_line(cfg: Config, here: bool = False, in_trainer: bool = False) -> str:
    """How a person is told where the boosting runs (``here``: in this process; ``in_trainer``: this
    process is the workspace trainer, ``churnlib.train.warm``)."""
    gpu = " + 1 GPU" if cfg.ray.use_gpu else ""
    if here and in_trainer:
        return (f"train: in the workspace trainer (churn up's warm process), {threads(cfg)} XGBoost thread(s){gpu}, "
                f"its CPUs reserved on the instance (training.engine=task or ray_train for Ray's), device "
                f"{cfg.xgb_device}, up to {cfg.xgboost.num_boost_round} rounds")
    if here:
        return (f"train: in this process, {threads(cfg)} XGBoost thread(s){gpu} (a small table and no Ray instance "
                f"up: none to start; training.engine=task or ray_train for Ray), device {cfg.xgb_device}, "
                f"up to {cfg.xgboost.num_boost_round} rounds")
    return (f"train: one Ray task, {threads(cfg)} XGBoost thread(s){gpu} (a small table: no worker group to start; "
            f"training.engine=ray_train for Ray Train's), device {cfg.xgb_device}, up to {cfg.xgboost.num_boost_round} rounds")


def task_table(prepared: Prepared) -> Any:
    """What the task reads: the driver's encoded arrays, or the (materialized) dataset."""
    if prepared.local is not None:
        return {k: prepared.local[k] for k in TABLE_KEYS}
    return prepared.dataset


class _Arrays:
    """The driver's encoded arrays with the ``iter_batches`` of a Ray Data shard (``build_matrices``)."""

    def __init__(self, arrays: dict[str, Any]):
        self.arrays = arrays

    def iter_batches(self, batch_size: int, **_: Any):
        n = len(self.arrays["y"])
        for start in range(0, n, batch_size):
            yield {k: v[start:start + batch_size] for k, v in self.arrays.items()}


def output_of(uri: str, t_fit: float | None = None) -> FitOutput:
    """A run's final checkpoint -> the best-iteration booster and the state (as ``trainer.fit_output``)."""
    booster, state = read_checkpoint(uri)
    return trim_to_best(booster, state, uri, t_fit)


# The boosting, in the task's process (or a Tune trial's) ----------------------------------------


def matrices_of(table: Any, config: dict[str, Any], table_key: str | None = None,
                timeline: dict[str, float] | None = None) -> tuple[Any, Any]:
    """The training and validation matrices of ``table``. With a
    ``table_key`` (the same table for every call that gives it: a sweep's), the last matrices
    this process built for that key and the same binning are reused (XGBoost reads a matrix,
    never changes it; each booster keeps its own prediction cache)."""
    timeline = {} if timeline is None else timeline
    key = None
    if table_key is not None:
        key = (table_key, config["params"].get("max_bin"), tuple(config["feature_names"]),
               tuple(config["feature_types"]), config["batch_size"])
        if key in _MATRICES:
            timeline["shard_ready"] = time.time()
            return _MATRICES[key]
    local = _Arrays(table) if isinstance(table, dict) else table.materialize()
    timeline["shard_ready"] = time.time()
    dtrain, dvalid = build_matrices(local, config)
    if key is not None:
        _MATRICES.clear()
        _MATRICES[key] = (dtrain, dvalid)
    return dtrain, dvalid


def boost_here(config: dict[str, Any], table: Any, run_dir: str, keep: int | None,
               report: Callable[[dict[str, Any], str | None], None] | None = None,
               table_key: str | None = None) -> str:
    """Build the matrices (or reuse this process's, ``matrices_of``), restore the newest
    checkpoint of ``run_dir`` (a restart: counted) or ``resume_from``, boost, write the final
    checkpoint -> its URI. ``report(metrics, checkpoint)``: intermediate results and
    checkpoints for Tune."""
    timeline = {"loop_start": time.time()}
    dtrain, dvalid = matrices_of(table, config, table_key, timeline)
    timeline["matrices_ready"] = time.time()

    start_model, state = None, new_state()
    last = latest_in(run_dir)
    if last is not None:  # this run's own: the task (or trial) was started again after a failure
        start_model, state = read_checkpoint(last)
        state["restarts"] += 1
        state["resumed_from"].append(start_model.num_boosted_rounds())
    elif config.get("resume_from"):  # an earlier run's checkpoint (training.resume_from)
        start_model, state = read_checkpoint(config["resume_from"])
        state["resumed_from"].append(start_model.num_boosted_rounds())
    state["timeline"] = timeline

    def save(model: Any, metrics: dict[str, Any]) -> None:
        uri = write_checkpoint(run_dir, model, state, keep)
        if report is not None:
            report(metrics, uri)

    booster = boost(config, dtrain, dvalid, start_model, state, 0, config.get("progress_sink"), save=save,
                    report=(lambda metrics: report(metrics, None)) if report is not None else (lambda metrics: None))
    timeline["boosted"] = time.time()
    final = write_checkpoint(run_dir, booster, state, keep)
    if report is not None:
        report(report_metrics(state, booster.num_boosted_rounds(), config["stopping_metric"], finished=True), final)
    return final


def _task_main(config: dict[str, Any], table: Any, run_dir: str, keep: int | None) -> str:
    return boost_here(config, table, run_dir, keep)


class TaskRun:
    """One training run on the one-task engine (``here``: in this process, ``training.engine:
    process``): ``fit()`` and, while or after it runs, ``latest_checkpoint()``."""

    def __init__(self, cfg: Config, prepared: Prepared, train_loop_config: dict[str, Any], name: str | None = None,
                 storage_path: str | None = None, here: bool = False):
        self.cfg = cfg
        self.here = here
        self.table = task_table(prepared)
        self.name = name or f"churn-train-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.run_dir = f"{(storage_path or cfg.storage_path).rstrip('/')}/{self.name}"
        self.config = {**train_loop_config,
                       "params": {**train_loop_config["params"], "nthread": threads(cfg)}}

    def _remote(self) -> Any:
        import ray

        r = self.cfg.ray
        return ray.remote(_task_main).options(
            num_cpus=r.num_workers * r.cpus_per_worker,
            num_gpus=1 if r.use_gpu else 0,
            # a process that dies is run again (from the newest checkpoint); an exception is final
            max_retries=self.cfg.training.max_failures,
            retry_exceptions=False,
            name=f"churn-train:{self.name}",
        )

    def fit(self) -> FitOutput:
        """Run the task to the end; the best-iteration booster and the state (see ``trainer.fit``)."""
        t_fit = time.time()
        if self.here:
            # the main thread boosts: a signal interrupts it between two rounds (KeyboardInterrupt,
            # interrupts.Interrupted), leaving the newest periodic checkpoint
            try:
                final = boost_here(self.config, self.table, self.run_dir, self.cfg.training.keep_checkpoints)
            except Exception as exc:  # noqa: BLE001 - one line for the user, cause chained
                raise TrainingError(f"training failed: {root_cause(exc)}") from exc
            return output_of(final, t_fit)
        import ray

        ref = self._remote().remote(self.config, ray.put(self.table) if isinstance(self.table, dict) else self.table,
                                    self.run_dir, self.cfg.training.keep_checkpoints)
        try:
            final = interrupts.run_in_thread(ray.get, ref, name="churn-train-fit")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one line for the user, cause chained
            raise TrainingError(f"training failed: {root_cause(exc)}") from exc
        return output_of(final, t_fit)

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint the run has written so far, if any."""
        return latest_in(self.run_dir)
