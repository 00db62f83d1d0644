"""Ray start-up, quiet by default; the workspace instance (`churn up`); resource checks that fail fast.

Nothing here runs at import time: callers ask for Ray when they need it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from churnlib import console, interrupts
from churnlib.errors import ResourceError, strip_ansi

if TYPE_CHECKING:
    from churnlib.config import RayConfig

_STARTED_HERE = False
_CONNECTED_HERE = False
_WORKSPACE_INSTANCE: Instance | None = None  # the `churn up` instance this process attached to


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


def ensure_ray(ray_cfg: RayConfig, verbose: bool = False, announce: bool = False,
               workspace: Path | None = None, data: bool = True) -> bool:
    """Connect to ``ray.address`` (or RAY_ADDRESS), else to the workspace's instance
    (``churn up``) when it is up, else start a private local instance.

    ``ray.address: local`` always starts a private instance. ``announce``: say
    (stderr) which instance the command runs on: where a new private instance's
    dashboard, metrics and ``ray status`` are, and where the auth token is, or
    that the workspace instance is used. The long-running commands (train,
    tune, serve) announce; short ones (validate, evaluate, predict, drift) keep
    their output to their result or their one line. ``data``: Ray Data's
    settings too (quiet progress; its import costs half a second a process that
    runs no Ray Data need not pay). Returns True when this process started a
    local instance (it stops with this process).
    """
    global _STARTED_HERE, _CONNECTED_HERE, _WORKSPACE_INSTANCE
    import ray

    quiet_logs(verbose)
    if ray.is_initialized():
        if data and _CONNECTED_HERE:  # attached earlier without Ray Data's settings
            _quiet_data(verbose)
        return _STARTED_HERE
    _CONNECTED_HERE = True
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "log_to_driver": verbose,
        "configure_logging": True,
    }
    inst = running(workspace) if workspace is not None and address is None else None
    if address and address != "local":
        ray.init(address=address, **kwargs)
        _STARTED_HERE = False
    elif inst is not None:
        # as a private instance would: one footer actor, and this instance's own State API
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(LOCAL_FOOTER_ACTORS))
        os.environ["RAY_API_SERVER_ADDRESS"] = inst.dashboard_url
        _use_auth_mode(inst.auth_mode)
        ray.init(address=inst.address, **kwargs)
        _STARTED_HERE = False
        _WORKSPACE_INSTANCE = inst
        if announce:
            console.say(f"ray: on the workspace instance (churn up): dashboard {inst.dashboard_url}, "
                        f"`ray status --address {inst.address}`")
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
        # before Ray's own shutdown at exit (atexit runs the last registered first)
        atexit.register(end_monitor)
        if announce:
            node = ray._private.worker.global_worker.node
            console.say(f"ray: started a local instance for this command: dashboard http://127.0.0.1:{dashboard_port}, "
                        f"metrics http://127.0.0.1:{node.metrics_export_port}/metrics, "
                        f"`ray status --address {node.address}`{auth_token_hint()}"
                        + ("; `churn up` keeps one up for every command" if workspace is not None else ""))
    # ray.init took SIGTERM (sys.exit, then a C++ handler that aborts): ours again.
    interrupts.install()
    if data:  # not for a process that runs no Ray Data (the workspace trainer's command side)
        _quiet_data(verbose)
    return _STARTED_HERE


def _quiet_data(verbose: bool) -> None:
    """Ray Data's progress bars and execution notices only when verbose."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    quiet_logs(verbose)  # ray.data configures its loggers on import


def _use_auth_mode(mode: str) -> None:
    """Send the workspace instance's token (or not), as its own processes do.

    ``ray.init`` enables token authentication by itself only for a new local
    instance or one it finds without an address; for an explicit address it
    follows ``RAY_AUTH_MODE``, read into Ray's cached config at import, so the
    variable is set and the cache refreshed (what Ray does for a new instance).
    A mode the user set wins."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = mode
    from ray._raylet import Config

    Config.initialize("")


def fixed_resources(started_here: bool) -> bool:
    """Whether the instance this process uses cannot grow (a private one, or the workspace's):
    a resource shortfall is then an error at once rather than a wait for an autoscaler."""
    return started_here or _WORKSPACE_INSTANCE is not None


def ray_to_join(ray_cfg: RayConfig, workspace: Path | None = None) -> bool:
    """Whether ``ensure_ray`` would run on an instance that is already there: this process's own
    connection (a notebook's ``ray.init``), ``ray.address`` / RAY_ADDRESS (a cluster, a ``ray
    job submit`` job), or the workspace's instance (``churn up``). False: it would start a
    private one (``ray.address: local`` always does). Ray is not imported for the answer."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        return address != "local"
    return workspace_to_join(ray_cfg, workspace) is not None


def workspace_to_join(ray_cfg: RayConfig, workspace: Path | None = None) -> Instance | None:
    """The workspace's instance (``churn up``) when it is the one ``ensure_ray`` would join: it is
    up, no ``ray.address``/RAY_ADDRESS names another, and this process has no Ray connection of
    its own. Ray is not imported for the answer."""
    ray = sys.modules.get("ray")
    if workspace is None or (ray is not None and ray.is_initialized()):
        return None
    if ray_cfg.address or os.environ.get("RAY_ADDRESS"):
        return None
    return running(workspace)


def on_workspace_instance() -> Instance | None:
    """The workspace instance (``churn up``) this process attached to, if any."""
    return _WORKSPACE_INSTANCE


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
    global _STARTED_HERE, _CONNECTED_HERE, _WORKSPACE_INSTANCE
    import ray

    if _CONNECTED_HERE and ray.is_initialized():
        end_monitor()  # a no-op unless this process started the instance
        ray.shutdown()
    if _STARTED_HERE or _WORKSPACE_INSTANCE is not None:
        # the address of that dashboard must not steer anything started later
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    _STARTED_HERE = _CONNECTED_HERE = False
    _WORKSPACE_INSTANCE = None


def end_monitor() -> None:
    """Kill the autoscaler monitor of the local instance this process started, before Ray's
    shutdown stops it.

    Ray's shutdown stops an instance's processes one after another, the monitor after the GCS:
    sent SIGTERM, the monitor first reports its own death to that GCS, which is gone, and Ray
    gives it a second before SIGKILL (1.0 s of a 1.4 s shutdown here, at the end of every command
    that started an instance). An instance that ends with this process has nothing to autoscale
    and nobody to tell: its monitor is killed at once. Anything unexpected (no instance, a Ray
    without these internals) leaves Ray's own shutdown to do it."""
    with contextlib.suppress(Exception):
        import ray
        from ray._private import ray_constants

        node = getattr(ray._private.worker, "_global_node", None) if _STARTED_HERE else None
        if node is None or not node.is_head():
            return
        for info in node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            if info.process.poll() is None:
                info.process.kill()
                info.process.wait(timeout=2)


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


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports on ``host``: each socket is held until all are chosen (one
    ``free_port`` after another can be given the same port twice, and Ray refuses an instance
    whose components share one: seen, object manager and agent both on the same port)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket())
            s.bind((_bindable(host), 0))
            ports.append(s.getsockname()[1])
    return ports


# Ray's worker ports (min/max_worker_port) end at 19999; the kernel hands out ports from its
# ephemeral range (32768-60999 by default) to every bind on port 0, which Ray's processes do.
RESERVED_RANGE = (20000, 32767)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_reserved_port(host: str = "127.0.0.1") -> int:
    """A free port that no process gets by asking for any port: for a listener whose port is
    chosen now and bound later, by a process started after a Ray instance (HAProxy's stats
    and metrics). A port from ``free_port`` can be taken in between by one of the instance's
    own processes binding port 0 (seen: HAProxy "cannot bind socket" when Serve started Ray)."""
    import random
    import socket

    low, high = RESERVED_RANGE
    eph_low, eph_high = _ephemeral_range()
    candidates = [p for p in range(low, high + 1) if not eph_low <= p <= eph_high]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind((_bindable(host), port))
                return port
            except OSError:
                continue
    return free_port(host=host)


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


# --- the workspace instance (`churn up` / `churn down`) -------------------------------
# The workspace Ray instance: ``churn up`` starts one, later commands attach to it, ``churn down`` stops it.
#
# Every ``churn`` command that needs Ray starts a private local instance when no
# cluster is named (5-10 s on a laptop, plus fresh worker processes), and two
# commands in two terminals run two instances side by side. ``churn up`` starts
# one instance for the workspace, the way ``ray start --head`` does on a
# cluster's head node; ``churn train``, ``tune``, ``evaluate``, ``predict``,
# ``drift``, ``data validate`` and ``serve`` then attach to it (``ray.address``
# unset, no ``RAY_ADDRESS``), and fall back to a private instance when none is up.
# ``ray.address: local`` always starts a private one.
#
# The instance is ``ray start --head --block`` in a session of its own: that
# process supervises the instance's processes and, on SIGTERM, stops all of
# them. ``churn down`` sends SIGTERM to that one process (recorded with its
# start time, so a recycled PID is never signalled) and waits until it and every
# process it started have ended; nothing else on the machine is touched (never
# ``ray stop``, which stops every instance on the machine). Every port is chosen free, so the
# instance runs beside any other Ray instance. Its record,
# ``<workspace>/ray/instance.json``, is written only once the instance is up.

RECORD = Path("ray") / "instance.json"
LOG = Path("ray") / "instance.log"
READY_LINE = "Ray runtime started"


@dataclass
class Instance:
    """A workspace instance: its supervisor process, addresses and resources."""

    pid: int
    create_time: float  # of the supervisor process, against PID reuse
    address: str  # the GCS, host:port: what ray.init(address=...) takes
    dashboard_url: str
    metrics_url: str
    num_cpus: float | None  # None: what Ray detects on this machine
    num_gpus: float | None
    started_at: float
    log: str
    auth_mode: str = "token"  # RAY_AUTH_MODE of the instance; commands attaching use the same

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def record_path(workspace: Path) -> Path:
    """Where a workspace records its instance."""
    return workspace / RECORD


def _supervisor_alive(pid: int, create_time: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running(workspace: Path) -> Instance | None:
    """The workspace's instance when it is up (its supervisor alive, its GCS port open), else None.

    A record whose instance is gone (the machine restarted, the process was
    killed) is removed here, so it never steers a command to a dead address."""
    import socket

    path = record_path(workspace)
    try:
        inst = Instance(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    if _supervisor_alive(inst.pid, inst.create_time):
        host, _, port = inst.address.rpartition(":")
        with socket.socket() as s:
            s.settimeout(2.0)
            if s.connect_ex((host, int(port))) == 0:
                return inst
    with contextlib.suppress(OSError):
        path.unlink()
    return None


def up(workspace: Path, num_cpus: float | None = None, num_gpus: float | None = None,
       timeout_s: float = 90.0) -> tuple[Instance, bool]:
    """Start the workspace instance, or return the one already up -> (instance, started now)."""
    import psutil

    current = running(workspace)
    if current is not None:
        return current, False
    folder = workspace / "ray"
    folder.mkdir(parents=True, exist_ok=True)
    names = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    gcs, dashboard, metrics, *rest = free_ports(3 + len(names))
    ports = dict(zip(names, rest))
    ray_cli = Path(sys.executable).with_name("ray")  # the ray of this environment, not another on PATH
    cmd = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--metrics-export-port={metrics}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus:g}")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Ray Train's placement-group cleaner finds its cluster through the State API: with
    # several instances on the machine it must be told which dashboard is its own
    # (see runtime.ensure_ray); every process of this instance inherits it.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    # Token authentication (Ray 2.60's default for a local instance), said explicitly: a
    # command attaching to the instance must know to send the token (~/.ray/auth_token)
    env["RAY_AUTH_MODE"] = auth_mode = os.environ.get("RAY_AUTH_MODE", "token")
    # On SIGTERM `ray start` first "drains" the node for up to 30 s (for Kubernetes pods
    # behind a load balancer); a workspace instance stops at once, as a private one does
    # when its command ends (`churn serve` on it shuts Serve down itself).
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    log_path = workspace / LOG
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            text = log_path.read_text(errors="replace")
            if READY_LINE in text:
                break
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                lines = [line for line in strip_ansi(text).splitlines() if line.strip()]
                detail = lines[-1][:300] if lines else f"exit code {code}"
                raise ResourceError(f"churn up: the Ray instance did not start ({detail}); its log: {log_path}")
            time.sleep(0.2)
    except BaseException:
        # failed, timed out or interrupted: nothing half started stays behind, no record
        _stop_group(proc.pid, timeout_s=10.0)
        raise
    inst = Instance(
        pid=proc.pid,
        create_time=psutil.Process(proc.pid).create_time(),
        address=f"127.0.0.1:{gcs}",
        dashboard_url=f"http://127.0.0.1:{dashboard}",
        metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        started_at=time.time(),
        log=str(log_path),
        auth_mode=auth_mode,
    )
    # written whole, then renamed: a reader never sees half a record
    tmp = record_path(workspace).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(inst.to_dict(), indent=1))
    tmp.replace(record_path(workspace))
    return inst, True


def _stop_group(pid: int, timeout_s: float) -> bool:
    """SIGTERM the supervisor ``pid`` (it stops the instance's processes) and wait until it and
    every process it had started are gone; SIGKILL what is left after ``timeout_s``.
    True when all ended in time."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return True
    with contextlib.suppress(psutil.Error):
        root.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return not alive


def down(workspace: Path, timeout_s: float = 30.0) -> tuple[Instance | None, bool]:
    """Stop the workspace instance -> (the instance that was up, or None; whether it ended gracefully)."""
    inst = running(workspace)
    if inst is None:
        return None, True
    graceful = _stop_group(inst.pid, timeout_s)
    with contextlib.suppress(OSError):
        record_path(workspace).unlink()
    return inst, graceful
