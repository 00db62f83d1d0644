"""Ray start-up, quiet by default, and resource checks that fail fast.

Nothing here runs at import time: callers ask for Ray when they need it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from churnlib import console, interrupts
from churnlib.errors import ResourceError

if TYPE_CHECKING:
    from churnlib.config import RayConfig

_STARTED_HERE = False
_CONNECTED_HERE = False


def quiet_logs(verbose: bool) -> None:
    """Ray's and MLflow's chatter at warning level (or not at all) unless verbose."""
    level = logging.INFO if verbose else logging.WARNING
    # optuna: "A new study created in memory with name: ..." at the start of every sweep
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "optuna"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # Said once per local start; the token stays on (see README).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # Ray Data's "progress bars disabled" notice, and MLflow's advice on
        # pickled python models (ours is a class in an installed package).
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # A failed read is reported as one line by the caller; Ray Data would
        # also log each failed task's traceback.
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import warnings

        warnings.filterwarnings("ignore", module="mlflow")
        # "the operator only received 1 input(s)": a one-file table is one
        # block, scored by one actor; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*won't fully utilize the available concurrency.*")


LOCAL_FOOTER_ACTORS = 1


def ensure_ray(ray_cfg: RayConfig, verbose: bool = False, announce: bool = False) -> bool:
    """Connect to ``ray.address`` (or RAY_ADDRESS), or start a local instance.

    ``announce``: when this starts a local instance, say (stderr) where its
    dashboard, metrics and ``ray status`` are and where the auth token is. The
    long-running commands (train, tune, serve) announce; short ones (validate,
    evaluate, predict, drift) keep their output to their result or their one line.
    Returns True when this process started a local instance (whose resources
    cannot grow, so a shortfall is an error at once rather than a wait).
    """
    global _STARTED_HERE, _CONNECTED_HERE
    import ray

    quiet_logs(verbose)
    if ray.is_initialized():
        return _STARTED_HERE
    _CONNECTED_HERE = True
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "log_to_driver": verbose,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
        _STARTED_HERE = False
    else:
        # "local" always starts a new instance; plain ray.init() would attach
        # to any cluster `ray start` left recorded on this machine (even a dead one).
        # The dashboard stays on, on loopback: Ray's State API lives there, and
        # Ray Train's placement-group cleaner needs it to free the CPUs of a run
        # whose controller was killed (a trial that ASHA stopped).
        # Ray Data's Parquet reader starts 32 actors to read file footers on
        # every read, each needing a CPU to be placed: on a laptop that costs
        # seconds per read (4 s with 2 actors on 2 CPUs, 2 s with one). One
        # actor with its 128 I/O threads suffices here; set the variable to override.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(LOCAL_FOOTER_ACTORS))
        # Beside another Ray instance on this machine, Ray's helpers that look the
        # cluster up by themselves (Ray Train's placement-group cleaner, through the
        # State API) find several and fail ("Found multiple active Ray instances"):
        # a trial that ASHA stopped then keeps its CPUs and the sweep waits for ever.
        # Every process of this instance inherits the address of its own dashboard.
        dashboard_port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=dashboard_port, **kwargs)
        _STARTED_HERE = True
        if announce:
            node = ray._private.worker.global_worker.node
            console.say(f"ray: started a local instance for this command: dashboard http://127.0.0.1:{dashboard_port}, "
                        f"metrics http://127.0.0.1:{node.metrics_export_port}/metrics, "
                        f"`ray status --address {node.address}`{auth_token_hint()}")
    # ray.init took SIGTERM (sys.exit, then a C++ handler that aborts): ours again.
    interrupts.install()
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    quiet_logs(verbose)  # ray.data configures its loggers on import
    return _STARTED_HERE


def auth_token_hint() -> str:
    """Where Ray's auth token is, for the dashboard and ``ray status`` (token auth is on by
    default in Ray 2.60: the token is in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``); empty when authentication is off."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() in ("disabled", "off", "none"):
        return ""
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "$RAY_AUTH_TOKEN"
    else:
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    return f" (token: {where}; the dashboard asks for it, `ray status` reads it)"


def release_ray() -> None:
    """Disconnect from Ray if this process connected (``ensure_ray``), at once.

    What an interrupt does before anything else: the work this driver owns
    (a Ray Train controller and its workers, Ray Data executors) ends with its
    connection, and a local instance it started stops. A Ray connection made
    by the caller (a notebook's own ``ray.init``) is left alone.
    """
    global _STARTED_HERE, _CONNECTED_HERE
    import ray

    if _CONNECTED_HERE and ray.is_initialized():
        ray.shutdown()
    if _STARTED_HERE:
        # the address of the dashboard that just stopped must not steer anything started later
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    _STARTED_HERE = _CONNECTED_HERE = False


def _bindable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` when it is free on ``host``, else any free port (the one free-port helper)."""
    import socket

    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind((_bindable(host), port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise ResourceError(f"no free port on {host}")


def check_port_free(host: str, port: int) -> None:
    """A one-line ResourceError when a server could not listen on ``host:port``."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ResourceError(f"port {port} on {host} is in use; choose another with --port") from None


def check_resources(ray_cfg: RayConfig, local: bool, streaming: bool = False) -> None:
    """Fail with one line when the cluster cannot place the training workers.

    A local instance cannot grow, so a shortfall fails at once. On an existing
    cluster an autoscaler may add nodes, so wait up to
    ``ray.resources_timeout_s`` for them, then fail (never hang).
    """
    import ray

    need_cpu = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    # Streaming (training.materialize=false) reads while training: Ray Data's
    # tasks need a CPU the workers do not hold, or both wait for ever.
    data_cpu = 1.0 if streaming else 0.0
    need_gpu = ray_cfg.num_workers if ray_cfg.use_gpu else 0
    deadline = time.monotonic() + (0 if local else ray_cfg.resources_timeout_s)
    while True:
        total = ray.cluster_resources()
        have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
        if have_cpu >= need_cpu + data_cpu and have_gpu >= need_gpu:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    if have_gpu < need_gpu:
        where = "this local Ray instance" if local else f"the cluster (waited {ray_cfg.resources_timeout_s:.0f} s)"
        raise ResourceError(
            f"ray.use_gpu asks for {need_gpu} GPU(s) ({ray_cfg.num_workers} workers x 1) but {where} has "
            f"{have_gpu:g}; set ray.use_gpu=false or use a cluster with GPU workers"
        )
    if have_cpu >= need_cpu:
        raise ResourceError(
            f"training.materialize=false streams the data while {ray_cfg.num_workers} workers x "
            f"{ray_cfg.cpus_per_worker:g} CPU hold all {have_cpu:g} CPUs: Ray Data would get none and training "
            f"would hang; set training.materialize=true or leave a CPU free (lower ray.cpus_per_worker)"
        )
    raise ResourceError(
        f"{ray_cfg.num_workers} workers x {ray_cfg.cpus_per_worker:g} CPU need {need_cpu:g} CPUs but the "
        f"cluster has {have_cpu:g}; lower ray.num_workers or ray.cpus_per_worker"
    )
