"""The workspace trainer: `churn train` on `churn up`'s instance, in a process that is already warm.

A command is a new Python process: before its first round it imports MLflow, XGBoost (and
scikit-learn through it), pandas and matplotlib, opens the MLflow store and, on a Ray
instance, starts a task's process that imports them all again. For the table a team
iterates on (200,000 rows: 100 rounds in ~3 s) that is most of the wall time, every time.

On the workspace instance (``churn up``) one detached actor, the trainer, keeps those
imports (and the MLflow store, XGBoost's thread pool) alive between commands. With
``training.engine: auto``, no GPU and a table small enough to be boosted in one process
(<= 64 MB on disk, read whole), `churn train` imports none of them: it attaches to the
instance and hands the trainer its resolved config, its working folder and the variables
that steer MLflow and S3 (``MLFLOW_*``, ``AWS_*``, ``CHURN_*``); the trainer runs the very
same ``churnlib.train.command.train`` (the in-process engine: checkpoints, early stopping,
calibration, the same MLflow run and model) and the command prints its lines as they come.

- CPUs: while it boosts, the trainer holds a placement group of the run's XGBoost threads
  (``ray.num_workers x ray.cpus_per_worker``), so Serve replicas and other commands are
  placed beside it as they would be beside a Ray task; when they hold the CPUs, it says so
  and waits.
- Ctrl-C / SIGTERM: the command asks the trainer to stop; the trainer stops between two
  rounds as the in-process engine does (run KILLED, the resume hint) and the command exits
  130 / 143. A command that dies (SIGKILL) is noticed between rounds the same way.
- One run at a time: a second `churn train` while the trainer is busy runs as a Ray task
  beside it (the engine `auto` picked before). A table over 64 MB is declined before any run
  is made and runs on the instance as before.
- Code: the trainer compares its churnlib files (names, sizes, times) with the command's; a
  trainer started before churnlib changed is replaced.
- A trainer that dies (killed, out of memory) fails its run (FAILED, one line); the next
  command starts a new one. `churn up` starts the trainer; `churn down` ends it with the
  instance.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import pickle
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from churnlib import interrupts
from churnlib.errors import ChurnError, ResourceError, TrainingError, one_line, root_cause
from churnlib.runtime import ensure_ray, on_workspace_instance, workspace_to_join
from churnlib.train.result import TrainResult

if TYPE_CHECKING:
    from churnlib.config import Config
    from churnlib.runtime import Instance

NAME, NAMESPACE = "churn-trainer", "churn"
# what steers MLflow, boto3 and churn in the command's shell: the trainer runs with the command's
ENV_PREFIXES = ("MLFLOW_", "AWS_", "CHURN_")
# how long an interrupted run may take to end KILLED in the trainer before the command gives up on it
STOP_GRACE_S = 60.0
POLL_S = 0.1


def code_fingerprint() -> str:
    """The churnlib files this process runs (relative names, sizes, modification times)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def eligible(cfg: Config) -> Instance | None:
    """The workspace instance when `churn train` goes to its trainer: ``training.engine: auto``,
    a table read whole (``training.materialize``), no GPU, no ``ray.address``/RAY_ADDRESS and
    no Ray connection in this process, and ``churn up``'s instance up. The table's size is the
    trainer's to judge (it declines a large one)."""
    if cfg.training.engine != "auto" or cfg.ray.use_gpu or not cfg.training.materialize:
        return None
    return workspace_to_join(cfg.ray, cfg.workspace_path)


# The trainer (a detached Ray actor on the workspace instance) -----------------------------------


class _Run:
    def __init__(self, cli_pid: int) -> None:
        self.messages: list[tuple[str, Any]] = []
        self.stop: int | None = None  # the signal the command received
        self.cli_pid = cli_pid
        self.run_id: str | None = None


def _warm_up() -> None:
    """Import what a run needs and run XGBoost once, so the first command finds them loaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - the importance figure
    import mlflow.pyfunc  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - the workspace's sqlite store
    import numpy as np
    import xgboost as xgb

    import churnlib.train.command  # noqa: F401 - and everything a run imports

    rng = np.random.default_rng(0)
    x = rng.random((256, 4), dtype=np.float32)
    xgb.train({"tree_method": "hist", "verbosity": 0}, xgb.QuantileDMatrix(x, label=x[:, 0] > 0.5),
              num_boost_round=2)


@contextlib.contextmanager
def _environment(env: dict[str, str], cwd: str) -> Iterator[None]:
    """The command's MLflow/S3/churn variables and working folder, for one run."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    here = os.getcwd()
    for key in saved:
        os.environ.pop(key, None)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(here)
        for key in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            os.environ.pop(key, None)
        os.environ.update(saved)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` as it can travel to the command: itself if it pickles, else a TrainingError line."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return TrainingError(f"training failed: {one_line(exc)}")


class WorkspaceTrainer:
    """The actor. ``claim`` a run, ``run`` it (one at a time), ``poll`` its lines, ``interrupt`` it."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.pid = os.getpid()
        self.runs_done = 0
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._busy: str | None = None
        # Every XGBoost call of this process comes from this one thread. OpenMP (libgomp) keeps a
        # pool of threads per thread that calls it: runs taken by the actor's other threads would
        # each add a pool, and once the process has more OpenMP threads than CPUs libgomp stops
        # spinning at its barriers and sleeps (a round took 33-35 ms here instead of the 28-29 ms
        # of the same boosting in a plain process beside the same instance).
        self._boosting = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="churn-boost")
        self._boosting.submit(_warm_up).result()

    def info(self) -> dict[str, Any]:
        return {"code": self.code, "pid": self.pid, "busy": self._busy is not None, "runs_done": self.runs_done}

    def claim(self, token: str, code: str, cli_pid: int) -> str:
        """``ok`` (the run is this token's), ``busy`` (another run is on) or ``stale`` (other code)."""
        with self._lock:
            if self._busy is not None:  # never replaced under another command's run
                return "busy"
            if code != self.code:
                return "stale"
            self._busy = token
            self._runs[token] = _Run(cli_pid)
            return "ok"

    def poll(self, token: str, since: int) -> list[tuple[str, Any]]:
        run = self._runs.get(token)
        return run.messages[since:] if run is not None else []

    def interrupt(self, token: str, signum: int) -> None:
        run = self._runs.get(token)
        if run is not None and run.stop is None:
            run.stop = signum

    def _check(self, run: _Run) -> None:
        """Between two rounds (and at every line): the command's signal, or the command gone."""
        import psutil

        if run.stop is None and not psutil.pid_exists(run.cli_pid):
            run.stop = signal.SIGTERM
        if run.stop is not None and run.stop > 0:
            signum, run.stop = run.stop, -run.stop  # raised once; the cleanup's own lines still pass
            raise interrupts.Interrupted(signum)

    @contextlib.contextmanager
    def _reserve(self, run: _Run, cfg: Config, say: Callable[[str], None]) -> Iterator[None]:
        """The run's CPUs on the instance, for as long as it boosts (a placement group)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        from churnlib.train.task import threads

        need = threads(cfg)
        total = ray.cluster_resources().get("CPU", 0.0)
        if total < need:
            raise ResourceError(f"the run asks for {need} CPUs (ray.num_workers x ray.cpus_per_worker) but the "
                                f"workspace instance has {total:g}; lower them or start it with churn up --num-cpus")
        pg = placement_group([{"CPU": need}], strategy="STRICT_PACK")
        try:
            waited, ready = False, pg.ready()
            while not ray.wait([ready], timeout=0.5)[0]:
                if not waited:
                    say(f"train: waiting for {need} CPU(s) on the workspace instance (Serve or another command "
                        f"holds them); Ctrl-C stops")
                    waited = True
                self._check(run)
            yield
        finally:
            with contextlib.suppress(Exception):
                remove_placement_group(pg)

    def run(self, token: str, cfg: Config, data_path: str | None, run_name: str | None, verbose: bool,
            env: dict[str, str], cwd: str) -> tuple[str, Any]:
        """One `churn train` -> (``ok``, TrainResult) | (``declined``, why) | (``interrupted``,
        signal) | (``error``, exception); in the boosting thread."""
        return self._boosting.submit(self._run, token, cfg, data_path, run_name, verbose, env, cwd).result()

    def _run(self, token: str, cfg: Config, data_path: str | None, run_name: str | None, verbose: bool,
             env: dict[str, str], cwd: str) -> tuple[str, Any]:
        from churnlib.train.command import NotInProcess
        from churnlib.train.command import train as train_command

        run = self._runs[token]
        warm = self.runs_done > 0

        def say(line: str) -> None:
            if run.run_id is None:
                import mlflow

                active = mlflow.active_run()
                if active is not None:
                    run.run_id = active.info.run_id
                    run.messages.append(("run", run.run_id))
            run.messages.append(("say", line))
            self._check(run)

        try:
            with _environment(env, cwd):
                result = train_command(cfg, data_path=data_path, run_name=run_name, verbose=verbose, say=say,
                                       on_progress=lambda msg: self._check(run), in_trainer=True,
                                       reserve=lambda: self._reserve(run, cfg, say))
            # the thread that boosts (OpenMP's one pool, see __init__): the same for every run
            result.trainer = {"pid": self.pid, "warm": warm, "thread": threading.get_native_id()}
            return "ok", result
        except NotInProcess as exc:
            return "declined", str(exc)
        except interrupts.Interrupted as exc:
            return "interrupted", exc.signum
        except KeyboardInterrupt:
            return "interrupted", int(signal.SIGINT)
        except ChurnError as exc:
            return "error", _portable(exc)
        except Exception as exc:  # noqa: BLE001 - one line for the user, as the CLI gives any error
            return "error", TrainingError(f"training failed: {root_cause(exc)}")
        finally:
            self.runs_done += 1
            with self._lock:
                self._busy = None
            # what the command has not read yet stays until it has (or the next run)
            for other in [t for t in self._runs if t != token]:
                self._runs.pop(other, None)


# The command's side ----------------------------------------------------------------------------


def _create(code: str) -> Any:
    import ray

    return ray.remote(WorkspaceTrainer).options(
        name=NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=8, max_restarts=0,
        get_if_exists=True,
        # Ray gives a process of 0 CPUs OMP_NUM_THREADS=1, and XGBoost keeps to it whatever its
        # nthread (a round took 46 ms instead of 26 on 2 cores): each run's own threads are
        # XGBoost's nthread, its CPUs the placement group's
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}},
    ).remote(code)


def _trainer(code: str) -> Any:
    import ray

    try:
        return ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return _create(code)


def start_trainer() -> None:
    """Start the workspace trainer on the instance this process is attached to (`churn up`), not
    waiting for its imports."""
    _trainer(code_fingerprint())


def _claim(trainer: Any, token: str, code: str, say: Callable[[str], None]) -> tuple[Any, str]:
    import ray

    answer = ray.get(trainer.claim.remote(token, code, os.getpid()), timeout=300)
    if answer == "stale":
        say("train: the workspace trainer runs older churnlib code; starting a new one")
        ray.kill(trainer)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its name is free once the old one is gone
            try:
                ray.get_actor(NAME, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
        trainer = _create(code)
        answer = ray.get(trainer.claim.remote(token, code, os.getpid()), timeout=300)
    return trainer, answer


def _end_run(cfg: Config, run_id: str | None, status: str, message: str) -> None:
    """A run the trainer could not end (it died): ended here, with the error as a tag."""
    if run_id is None:
        return
    import mlflow

    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient(cfg.tracking_uri)
        client.set_tag(run_id, "error", message[:5000])
        client.set_terminated(run_id, status=status)


def train(cfg: Config, data_path: str | None, run_name: str | None, verbose: bool,
          say: Callable[[str], None]) -> TrainResult | None:
    """`churn train` on the workspace trainer -> its result, or None when the command should train
    as before (the trainer is busy, or declined the table): this process is then attached to the
    instance. Raises the run's own error, or ``Interrupted`` after a signal (the run KILLED)."""
    import ray

    ensure_ray(cfg.ray, verbose=verbose, announce=True, workspace=cfg.workspace_path, data=False)
    if on_workspace_instance() is None:  # the instance went away meanwhile: a private one was started
        return None
    code = code_fingerprint()
    token = uuid.uuid4().hex
    try:
        trainer, answer = _claim(_trainer(code), token, code, say)
    except Exception as exc:  # noqa: BLE001 - the trainer is an optimisation: say why, train as before
        say(f"train: the workspace trainer did not answer ({root_cause(exc, 200)}); training as a Ray task")
        return None
    if answer == "busy":
        say("train: the workspace trainer is busy with another run; this one runs as a Ray task beside it")
        return None
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    ref = trainer.run.remote(token, cfg, data_path, run_name, verbose, env, os.getcwd())
    seen, run_id = 0, None
    stopped_at: float | None = None
    signum = 0

    def drain() -> None:
        nonlocal seen, run_id
        for kind, value in ray.get(trainer.poll.remote(token, seen), timeout=60):
            seen += 1
            if kind == "say":
                say(value)
            elif kind == "run":
                run_id = value

    try:
        while True:
            try:
                done = ray.wait([ref], timeout=POLL_S)[0]
                drain()
                if done:
                    break
                if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE_S:
                    ray.kill(trainer)  # it did not stop: it goes, its run is ended here
                    _end_run(cfg, run_id, "KILLED", "interrupted")
                    raise interrupts.Interrupted(signum)
            except KeyboardInterrupt as exc:
                # Ray re-raises a signal that arrives while it waits as a plain KeyboardInterrupt
                if stopped_at is not None:
                    raise
                signum = getattr(exc, "signum", None) or interrupts.received() or int(signal.SIGINT)
                stopped_at = time.monotonic()
                trainer.interrupt.remote(token, signum)
        status, value = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        message = f"training failed: the workspace trainer's process died during the run ({root_cause(exc, 200)})"
        _end_run(cfg, run_id, "FAILED", message)
        raise TrainingError(message) from None
    if status == "ok":
        return value
    if status == "declined":
        return None
    if status == "interrupted":
        raise interrupts.Interrupted(value)
    raise value
