"""A trial (the trainer of ``churn train`` inside Tune) and its MLflow record, written from the Tune driver.

One parent run for the sweep and one child run per trial (``mlflow.parentRunId``):
the trial's resolved config as params, its reported metrics while it runs, the full
per-iteration history and the summary metrics when it finishes, and its status.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from churnlib.config import Config
from churnlib.data.features import FeatureSpec
from churnlib.figures import log_figure, pyplot
from churnlib.tags import TAG_COMMAND, TAG_SWEEP, TAG_TRIAL, TAG_TRIAL_STATUS
from churnlib.tracking import grouped, history_key, log_params_flat
from churnlib.train.checkpoints import read_checkpoint_state
from churnlib.train.loop import score_key
from churnlib.errors import TrainingError, one_line
from churnlib.train.task import boost_here, output_of, threads
from churnlib.train.trainer import (
    build_trainer,
    fit,
    loop_config,
    outcome_metrics,
)
from churnlib.tune.space import with_params
from churnlib.tune.state import read_state, write_state

# Ray Train's TuneReportCallback reports a checkpoint under this key; so does a one-task trial
CHECKPOINT_PATH_KEY = "checkpoint_path"

# The trial: the training of `churn train`, inside Tune ----------------------------------------


def run_trial(params: dict[str, Any], *, base: dict[str, Any], spec: dict[str, Any], dataset: Any,
              train_storage: str, table: dict[str, Any] | None = None, table_key: str | None = None) -> None:
    """A Tune function trainable: the training of ``churn train`` with this trial's parameters.

    With ``table`` (the one-task engine, ``churnlib.train.task``: a small table's encoded
    arrays; ``table_key`` names it, so that the next trial in the same process reuses its
    matrices) the trial's own process boosts and reports to Tune; otherwise one Ray Train run,
    whose ``TuneReportCallback`` reports. Either way the trial's checkpoints are under
    ``<train_storage>/trial-<id>``, so a resumed sweep's trial continues from its last one."""
    from ray import tune

    cfg = with_params(Config.model_validate(base), params)
    config = loop_config(cfg, FeatureSpec.from_dict(spec))
    config["report_every"] = cfg.tune.report_every
    trial_id = tune.get_context().get_trial_id()
    name = f"trial-{trial_id}"
    if table is not None:
        config["params"] = {**config["params"], "nthread": threads(cfg)}

        def report(metrics: dict[str, Any], checkpoint: str | None) -> None:
            tune.report({**metrics, CHECKPOINT_PATH_KEY: checkpoint} if checkpoint else metrics)

        boost_here(config, table, f"{train_storage.rstrip('/')}/{name}", cfg.training.keep_checkpoints, report,
                   table_key=table_key)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(cfg, dataset, config, name=name, storage_path=train_storage,
                            callbacks=[TuneReportCallback()])
    fit(trainer)


def trial_resources(cfg: Config, one_task: bool) -> dict[str, float]:
    """What Tune reserves for a trial's own process: with the one-task engine, the CPUs (and
    GPU) it boosts with; with Ray Train none (its workers hold them) but a little memory,
    since Tune needs a non-empty request."""
    if not one_task:
        return {"CPU": 0, "memory": 256 * 1024**2}
    out = {"CPU": cfg.ray.num_workers * cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        out["GPU"] = 1
    return out


class ResourceWatch:
    """Tune callback: a sweep whose trials wait ``timeout_s`` with none running fails (one line)
    instead of waiting for ever. With Ray Train a trial's worker group times out by itself
    (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``); a trial that boosts in its own process waits
    in Tune's queue for its CPUs, which Tune would do for ever."""

    def __init__(self, timeout_s: float, what: str):
        self.timeout_s = timeout_s
        self.what = what
        self._since: float | None = None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        statuses = {getattr(t, "status", "") for t in trials}
        if "RUNNING" in statuses or "PENDING" not in statuses:
            self._since = None
            return
        now = time.monotonic()
        if self._since is None:
            self._since = now
        elif now - self._since > self.timeout_s:
            raise TrainingError(f"{self.what} did not get their resources within {self.timeout_s:g} s (other work "
                                f"holds them, or the cluster lacks them; ray.resources_timeout_s)")


# MLflow, from the Tune driver --------------------------------------------------------------------


class _Writer:
    """One thread that makes the sweep's MLflow writes, in the order they were asked for.

    Tune's controller calls the callbacks in its own loop, and a trial (which reports
    synchronously) waits for that loop: each write made there, a round trip to the store
    (~10 ms on SQLite per report, ~0.2 s at a trial's start and end), was time every trial
    spent waiting. The first failure is kept and raised at the next callback and at ``flush``,
    so a store that goes away still stops the sweep in one line."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="churn-tune-mlflow", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if self.error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - kept for the controller's thread
                self.error = exc
            finally:
                self._jobs.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self.check()
        self._jobs.put(job)

    def check(self) -> None:
        if self.error is not None:
            raise TrainingError(f"writing the trials' runs to MLflow failed: {one_line(self.error)}")

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for every write asked for so far (at most ``timeout_s``); raise the first failure.
        False when the writes did not end in time."""
        jobs = self._jobs
        with jobs.all_tasks_done:  # Queue.join(), with a timeout
            if not jobs.all_tasks_done.wait_for(lambda: not jobs.unfinished_tasks, timeout_s):
                return False
        self.check()
        return True


class MlflowTrials:
    """Tune callback: one MLflow child run per trial, nested under the sweep's parent run.

    Runs in this (the driver's) process; picklable, as Tune keeps it in the
    sweep's state for a resume. The callbacks print at once and hand their MLflow
    writes to one thread (``_Writer``); ``flush`` waits for them.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, base_params: dict[str, Any],
                 sweep: str, stopping_metric: str, state_path: str, trial_runs: dict[str, str],
                 rows: dict[str, float], say: Callable[[str], None] | None = None, progress_every_s: float = 5.0):
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
        # a progress line per running trial at most this often (a trial reports every tune.report_every rounds)
        self.progress_every_s = progress_every_s
        self._last_said: dict[str, float] = {}
        self._process_state()

    def _process_state(self) -> None:
        """What lives in this process only, never pickled: the lock over the writer's records and
        the trials asked of the writer (their runs maybe not made yet); the writer itself is made
        at the first write."""
        self._state_lock = threading.Lock()
        self._starting: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        with self._state_lock:
            state = {k: v for k, v in self.__dict__.items() if k not in ("_writer", "_state_lock", "_starting")}
            state["trial_runs"] = dict(self.trial_runs)
            state["logged_steps"] = {k: set(v) for k, v in self.logged_steps.items()}
        state["say"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._process_state()

    def _submit(self, job: Callable[[], None]) -> None:
        if "_writer" not in self.__dict__:
            self._writer = _Writer()
        self._writer.submit(job)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait for the MLflow writes asked for so far; raise the first that failed."""
        writer = self.__dict__.get("_writer")
        return True if writer is None else writer.flush(timeout_s)

    def _has_run(self, trial_id: str) -> bool:
        """The trial has its run, or the writer was asked to make it."""
        return trial_id in self.trial_runs or trial_id in self._starting

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _ended(self, trial_id: str) -> None:
        """The record of trials that reached an end (completed, stopped, failed), across sessions."""
        ended = set(read_state(self.state_path).get("ended_trials", []))
        write_state(self.state_path, {"ended_trials": sorted(ended | {trial_id})})

    def _persist(self) -> None:
        recorded = read_state(self.state_path).get("trial_runs", {})
        with self._state_lock:
            runs = dict(self.trial_runs)
        write_state(self.state_path, {"trial_runs": {**recorded, **runs}})

    # tune.Callback interface (duck-typed: ray.tune.Callback subclass made in callback())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not self._has_run(trial.trial_id):
            # the state file is the record across sessions (this object may be an older pickle)
            recorded = read_state(self.state_path).get("trial_runs", {})
            with self._state_lock:
                self.trial_runs.update(recorded)
        if self._has_run(trial.trial_id):
            return  # a resumed (or restarted) trial carries on in its run
        self._starting.add(trial.trial_id)
        trial_id, config = trial.trial_id, dict(trial.config)

        def create() -> None:
            client = self._client()
            parent = client.get_run(self.parent_run_id)
            tags = {**inherited_tags(parent.data.tags), "mlflow.parentRunId": self.parent_run_id,
                    TAG_SWEEP: self.sweep, TAG_TRIAL: trial_id, TAG_COMMAND: "tune-trial",
                    TAG_TRIAL_STATUS: "running"}
            run = client.create_run(self.experiment_id, run_name=trial_run_name(trial_id, config), tags=tags)
            if parent.inputs and parent.inputs.dataset_inputs:  # the sweep's table, on each trial too
                client.log_inputs(run.info.run_id, datasets=list(parent.inputs.dataset_inputs))
            params = dict(self.base_params)
            params.update({f"xgboost.{k}": v for k, v in config.items()})
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
            log_params_flat(params, run_id=run.info.run_id)
            with self._state_lock:
                self.trial_runs[trial_id] = run.info.run_id
            self._persist()

        self._submit(create)
        if self.say:
            self.say(f"  [{trial_label(trial_id)}] started: {_shown_config(config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        from mlflow.entities import Metric

        trial_id = trial.trial_id
        if "rounds" not in result or not self._has_run(trial_id):
            return
        step = int(result["rounds"]) - 1
        now = int(time.time() * 1000)
        metrics = [Metric(grouped(k), float(v), now, step) for k, v in result.items()
                   if k.startswith(("train_", "valid_", "best_")) and isinstance(v, (int, float)) and v == v]

        def log() -> None:
            run_id = self.trial_runs.get(trial_id)
            if run_id is None:
                return
            if metrics:
                self._client().log_batch(run_id, metrics=metrics, synchronous=True)
            with self._state_lock:
                self.logged_steps.setdefault(trial_id, set()).add(step)

        self._submit(log)
        last = getattr(self, "_last_said", None)
        if self.say and last is not None and time.monotonic() - last.get(trial_id, 0.0) >= getattr(
                self, "progress_every_s", 5.0):
            last[trial_id] = time.monotonic()
            score = result.get(_score(self.stopping_metric))
            shown = f", {_score(self.stopping_metric)} {score:.4f}" if isinstance(score, float) else ""
            self.say(f"  [{trial_label(trial_id)}] round {step + 1}{shown}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = trial.trial_id
        if not self._has_run(trial_id):
            return
        last = trial.last_result or {}
        rounds = int(last.get("rounds", 0))
        score = last.get(_score(self.stopping_metric))
        finished = None
        if last.get("finished") and last.get("checkpoint_path"):
            # the state alone: the booster (and XGBoost's import in this process, a second) is
            # for the best trial's model only
            state, full_rounds = trial_state(last["checkpoint_path"])
            _, summary = outcome_metrics(state, full_rounds)
            summary.update({f"{k}_rows": v for k, v in self.rows.items()})
            finished = (state["history"], list(summary.items()))
            score = summary.get(_score(self.stopping_metric), score)
            status = (f"completed: early-stopped by XGBoost at round {full_rounds}" if state["stopped_early"]
                      else f"completed: all {full_rounds} rounds")
        else:
            status = f"stopped early by ASHA at round {rounds}"

        def end() -> None:
            run_id = self.trial_runs.get(trial_id)
            if run_id is None:
                return
            client = self._client()
            if finished is not None:
                with self._state_lock:
                    done = set(self.logged_steps.get(trial_id, set()))
                _log_history_except(client, run_id, finished[0], done)
                _log_final(client, run_id, finished[1])
            client.set_tag(run_id, TAG_TRIAL_STATUS, status)
            client.set_terminated(run_id, "FINISHED")
            self._ended(trial_id)

        self._submit(end)
        if self.say:
            shown = f"{score:.4f}" if isinstance(score, float) else "-"
            self.say(f"  {trial_label(trial_id)}: {status}; {_score(self.stopping_metric)} {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id = trial.trial_id
        if not self._has_run(trial_id):
            return
        error = str(getattr(trial, "error_msg", "") or "trial failed")

        def end() -> None:
            run_id = self.trial_runs.get(trial_id)
            if run_id is None:
                return
            client = self._client()
            client.set_tag(run_id, TAG_TRIAL_STATUS, "failed")
            client.set_tag(run_id, "error", error[:5000])
            client.set_terminated(run_id, "FAILED")
            self._ended(trial_id)

        self._submit(end)
        if self.say:
            self.say(f"  {trial_label(trial_id)}: failed")


# A trial's run carries its sweep's lineage: where it was started from (source,
# user, git commit), the data, and the user's own tags (mlflow.tags).
_NOT_INHERITED = ("mlflow.runName", "mlflow.parentRunId", "mlflow.note.content", "error")


def inherited_tags(parent_tags: dict[str, str]) -> dict[str, str]:
    """The tags of the sweep's run that its trials' runs carry too (not the sweep's own churn.* ones)."""
    return {k: v for k, v in parent_tags.items() if k not in _NOT_INHERITED and not k.startswith("churn.")}


def trial_label(trial_id: str) -> str:
    """'trial 03' for Tune's trial id '<sweep>_00002' (its number in the sweep, from 1)."""
    number = trial_id.rsplit("_", 1)[-1]
    return f"trial {int(number) + 1:02d}" if number.isdigit() else f"trial {trial_id}"


def _shown_config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(config.items()))


def trial_run_name(trial_id: str, config: dict[str, Any]) -> str:
    """A name a person can read in the runs table: 'trial 03: eta 0.0312, max_depth 4, subsample 0.83'."""
    return f"{trial_label(trial_id)}: {_shown_config(config)}"[:250]


def _score(metric: str) -> str:
    return score_key(metric)


def trial_state(path: str) -> tuple[dict[str, Any], int]:
    """A trial's final checkpoint -> its training state and the rounds it boosted (one history
    entry per round; the booster is read only when the history is empty)."""
    state = read_checkpoint_state(path)
    rounds = max((len(values) for values in state.get("history", {}).values()), default=0)
    if rounds == 0:
        return state, load_trial_checkpoint(path).full_rounds
    return state, rounds


def load_trial_checkpoint(path: str):
    """The booster and state of a trial's checkpoint (either engine's: the same folder layout)."""
    return output_of(path)


def _log_history_except(client: Any, run_id: str, history: dict[str, list[float]], done: set[int]) -> None:
    """The per-iteration history, skipping the steps already logged live."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(history_key(name), float(v), now, step)
               for name, values in history.items() for step, v in enumerate(values) if step not in done]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], synchronous=True)


def _log_final(client: Any, run_id: str, items: list[tuple[str, float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(grouped(k), v, now, 0) for k, v in items], synchronous=True)


def tune_callback(trials: MlflowTrials):
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


def watch_callback(watch: ResourceWatch):
    """The resource watch as a real ``ray.tune.Callback``."""
    from ray.tune import Callback

    class _Watch(Callback):
        def __init__(self, inner: ResourceWatch):
            self.inner = inner

        def on_step_end(self, iteration, trials, **info):
            self.inner.on_step_end(iteration, trials, **info)

    return _Watch(watch)


def attach_logger(tuner: Any, logger: MlflowTrials) -> MlflowTrials:
    """A restored sweep keeps the callback pickled with it; give it this session's printer.
    Returns the logger Tune calls (the restored one; else ``logger``)."""
    internal = getattr(tuner, "_local_tuner", None)
    run_config = internal.get_run_config() if internal is not None else None
    for cb in getattr(run_config, "callbacks", None) or []:
        if isinstance(getattr(cb, "inner", None), MlflowTrials):
            cb.inner.say = logger.say
            return cb.inner
    return logger


def summarise(grid: Any, trial_runs: dict[str, str], metric: str) -> list[dict[str, Any]]:
    """Every trial of the sweep (this session's and, after a resume, earlier ones) from Tune's results."""
    trials = []
    for result in grid:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or trial_id_from_path(result.path)
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


def trial_id_from_path(path: str | None) -> str | None:
    """Tune names trial folders <trainable>_<trial_id>_<n>_<params>; trial ids are <experiment>_<5 digits>."""
    import re

    m = re.search(r"_([0-9a-f]{5}_\d{5})_", path or "")
    return m.group(1) if m else None


def log_plots(client: Any, run_id: str, grid: Any, trials: list[dict[str, Any]], cfg: Config, metric: str) -> None:
    """The sweep's plots on the parent run: metric against each parameter, and each trial's curve."""
    plt = pyplot()

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
    log_figure(fig, "tune/metric_vs_params.png", run_id, client)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in grid:
        df = result.metrics_dataframe
        if df is None or "rounds" not in df or metric not in df:
            continue
        ax.plot(df["rounds"], df[metric], marker=".", lw=1)
    ax.set(xlabel="boosting rounds", ylabel=metric, title="Trial progress (each line a trial; ASHA stops the weak)")
    fig.tight_layout()
    log_figure(fig, "tune/trial_progress.png", run_id, client)
