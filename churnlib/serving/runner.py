"""`churn serve`: run the Serve application on this machine until Ctrl-C.

The application itself lives in ``serve/`` (the app layer); the library only
names its builder by import path (``serve.import_path``, default
``serve.app:build_app``), exactly as ``serve deploy`` does with
``serve/config.yaml``, so ``churnlib`` never imports ``serve``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from churnlib import tracking
from churnlib.errors import ConfigError, LogStoreError, ServeError, first_line
from churnlib.predlog.store import safe_uri
from churnlib.predlog.writer import replay_orphans, spooled_rows
from churnlib.runtime import check_port_free, ensure_ray, on_workspace_instance, ray_to_join, running
from churnlib.serving.haproxy import (
    haproxy_processes,
    prepare_haproxy,
    use_high_throughput,
)

if TYPE_CHECKING:
    from churnlib.config import Config


APP_NAME = "churn"


def load_builder(import_path: str) -> Callable[[dict[str, Any]], Any]:
    """The application builder named by ``serve.import_path`` (``module:function``)."""
    module, _, attr = import_path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"serve.import_path {import_path!r}: {exc}") from None


@dataclass
class Started:
    """What `churn serve` (or the quickstart) started, so that it can stop all of it."""

    url: str
    port: int
    local: bool  # this process started the Ray instance (and so stops it)
    high_throughput: bool
    state_dir: Path | None = None  # HAProxy's private state folder
    owns_serve: bool = False  # the workspace instance: Serve (controller, proxies) stops with this server
    log: tuple[str, str] | None = None  # the prediction log's (URI, spool folder) when answers are recorded


def start(cfg: Config, builder_args: dict[str, Any], port: int, verbose: bool = False,
          announce: bool = True) -> Started:
    """Deploy the application on the local (or configured) Ray instance (``announce``: say which,
    with its dashboard; the quickstart keeps to its step lines).

    Only a hash of ``CHURN_API_KEY`` reaches the application: the key is
    hashed here and removed from this process's environment before Ray
    starts, so raylet, replicas and HAProxy never hold it in plain text.
    """
    tracking.configure(cfg)
    check_port_free(cfg.serve.host, port)
    high_throughput = use_high_throughput(cfg)
    will_start = not ray_to_join(cfg.ray, cfg.workspace_path)
    key = os.environ.pop("CHURN_API_KEY", None)
    if key:
        builder_args = {**builder_args, "api_key_sha256": hashlib.sha256(key.encode()).hexdigest()}
    app = load_builder(cfg.serve.import_path)(builder_args)
    # Read when Ray Serve is first imported, here and in the processes of the
    # Ray instance started below: so before anything imports ray.serve.
    state = prepare_haproxy(cfg.serve.host) if high_throughput else None
    try:
        from ray import serve

        local = ensure_ray(cfg.ray, verbose=verbose, announce=announce, workspace=cfg.workspace_path) and will_start
        serve.start(http_options={"host": cfg.serve.host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        raise
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return Started(f"http://{host}:{port}", port, local, high_throughput, state,
                   owns_serve=on_workspace_instance() is not None,
                   log=(cfg.log_uri, str(cfg.spool_path)) if cfg.monitoring.log_serving else None)


def ray_failure() -> str | None:
    """For a Ray instance this process started: which of its processes died, if any."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    dead = node.dead_processes()
    if not dead:
        return None
    kind, proc = dead[0]
    return f"{kind} exited with {proc.returncode}"


def stop(started: Started, grace_s: float, say: Callable[[str], None]) -> dict[str, Any]:
    """Stop taking new connections, let requests in flight finish (at most ``grace_s``), stop everything.

    HAProxy ingress: a soft stop (SIGUSR1) closes HAProxy's listeners at once
    (new connections are refused) and lets every connection finish its request;
    once HAProxy is gone, or after ``grace_s``, the Ray instance this process
    started is shut down, any HAProxy still running is killed and its state
    folder removed. Serve's own graceful shutdown is not used there: in direct
    ingress mode it holds each replica open for 30 s for external load balancers.
    Python proxy: Serve's graceful shutdown (replicas finish their requests).
    On the workspace instance (``churn up``) Serve is shut down (its proxy frees the
    port) and the instance stays up. On a Ray cluster this process did not start,
    only the application is deleted.
    """
    import psutil
    from ray import serve

    t0 = time.monotonic()
    unfinished = 0
    procs = haproxy_processes(started.state_dir)
    if started.high_throughput and procs:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGUSR1)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        unfinished = len(alive)
        if alive:
            say(f"serve: connections still open after {grace_s:g} s (serve.shutdown_grace_s); closing them")
        if started.local:
            end_replicas(grace_s)
    elif started.local or started.owns_serve:
        with contextlib.suppress(Exception):
            serve.shutdown()
    else:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
    cleanup(started)
    if started.local and started.log is not None:
        load_what_is_left(*started.log, until=time.monotonic() + max(2.0, grace_s), say=say)
    return {"seconds": time.monotonic() - t0, "unfinished": unfinished}


def load_what_is_left(uri: str, spool_dir: str, until: float, say: Callable[[str], None]) -> int:
    """After the replicas of this process's own instance are gone: load into the prediction log
    what their loaders had not loaded yet (Ray kills a worker's children as it exits; a loader
    started again at the writer's close can run out of time on a loaded machine), within
    ``until``. What is left then (time up, the database down) stays in the spool for the next
    writer or `churn monitor`, and is said. -> rows loaded here."""
    done, why = 0, ""
    try:
        done = replay_orphans(uri, spool_dir, until=until)
    except LogStoreError as exc:
        why = f" ({exc})"
    except Exception as exc:  # noqa: BLE001 - the database unreachable: the rows wait on disk, the stop goes on
        why = f" (prediction log at {safe_uri(uri)}: {first_line(exc)})"
    if done:
        say(f"serve: the prediction log took the last {done} records its loaders had left in the spool")
    left = spooled_rows(spool_dir)
    if left:
        say(f"serve: {left} answered records wait in the spool {spool_dir}{why}; the next `churn serve` "
            "or `churn monitor` loads them")
    return done


def end_replicas(timeout_s: float) -> int:
    """End this app's replicas as Ray actors end gracefully (their process exits, running its exit
    hooks: the prediction log's writer writes what it still holds, and its loader process loads it)
    before the Ray instance goes; wait for those processes (within ``timeout_s``).
    In high-throughput mode Serve's own graceful stop would hold each replica 30 s for external
    load balancers; the connections are already drained here. -> how many replicas were asked."""
    import psutil
    import ray

    deadline = time.monotonic() + max(1.0, timeout_s)
    # the replicas' processes (this instance is this process's own): the actor is reported dead
    # as its exit begins, while its exit hooks (the log writer's) still run; wait for the process
    replicas = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if f"ServeReplica:{APP_NAME}:" in " ".join(proc.cmdline()):
                replicas.append(proc)
                replicas.extend(proc.children(recursive=True))  # their prediction log loaders
    refs = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") == "serve" and actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#"):
            with contextlib.suppress(Exception):
                refs.append(ray.get_actor(actor["name"], namespace="serve").__ray_terminate__.remote())
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=max(0.1, deadline - time.monotonic()))
    psutil.wait_procs(replicas, timeout=max(0.1, deadline - time.monotonic()))
    return len(refs)


def cleanup(started: Started) -> None:
    """Shut down the Ray instance this process started and reap what is left of it (processes
    whose parent died first); kill this server's HAProxy; remove its state folder."""
    import psutil
    import ray

    if started.local:
        mine = psutil.Process().children(recursive=True)
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        for proc in mine:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=3)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    leftover = haproxy_processes(started.state_dir)
    for proc in leftover:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(leftover, timeout=5)  # gone, so their listening port is free when this returns
    if started.state_dir is not None:
        shutil.rmtree(started.state_dir, ignore_errors=True)


def run_until_interrupted(cfg: Config, builder_args: dict[str, Any], port: int, verbose: bool = False,
                          say: Callable[[str], None] = print) -> None:
    """`churn serve`: start, say where, then serve until SIGINT or SIGTERM (a clean stop: returns)
    or until the Ray instance under it dies (a ServeError, exit 1, port freed)."""
    import requests

    started = start(cfg, builder_args, port, verbose)
    url = started.url
    try:
        mode = "HAProxy ingress, high-throughput mode" if started.high_throughput else "Python proxy"
        try:
            health = requests.get(f"{url}/healthz", timeout=10).json()
        except (requests.RequestException, ValueError):
            health = {"status": "unknown"}
        what = health.get("model") or {}
        if health.get("ready"):
            say(f"serve: {what.get('name')} version {what.get('version')} at {url} (docs: {url}/docs; {mode}); "
                "Ctrl-C stops")
        else:
            say(f"serve: up at {url}, not ready yet: {health.get('reason')}; it picks the model up when there is one")
        if cfg.monitoring.log_serving:
            say(f"serve: every answer is recorded in the prediction log at {safe_uri(cfg.log_uri)} (spooled to "
                f"{cfg.spool_path} while it is down)")
        while True:
            time.sleep(0.5)
            failure = ray_failure() if started.local else None
            if started.owns_serve and running(cfg.workspace_path) is None:
                failure = "the workspace instance is gone"
            if failure:
                raise ServeError(f"serve: the Ray instance under the server stopped ({failure}); "
                                 f"port {started.port} freed")
    except KeyboardInterrupt:
        grace = cfg.serve.shutdown_grace_s
        say(f"serve: stopping: no new connections, finishing requests in flight (at most {grace:g} s)")
        done = stop(started, grace, say)
        say(f"serve: stopped in {done['seconds']:.1f} s")
    except BaseException:
        cleanup(started)
        raise
