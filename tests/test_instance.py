"""The workspace Ray instance: `churn up`, commands that attach to it, `churn down` that stops only it.

Real `ray start --head` processes, beside the suite's own Ray instance (which
must be untouched by all of it: the rule that nothing here may stop another
instance on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from churnlib.data.generation import iter_chunks
from churnlib.runtime import Instance, record_path, running
from tests.conftest import SMALL, alive, cli_env, free_port, run_cli, stop


@pytest.mark.unit
def test_a_stale_record_is_dropped_and_never_steers_a_command(tmp_path: Path):
    ws = tmp_path / ".churn"
    path = record_path(ws)
    path.parent.mkdir(parents=True)
    dead = psutil.Popen(["true"])
    dead.wait()
    stale = Instance(pid=dead.pid, create_time=time.time(), address="127.0.0.1:1", dashboard_url="http://127.0.0.1:2",
                     metrics_url="http://127.0.0.1:3/metrics", num_cpus=None, num_gpus=None, started_at=time.time(),
                     log=str(ws / "ray" / "instance.log"))
    path.write_text(json.dumps(stale.to_dict()))
    assert running(ws) is None and not path.exists()
    # a live PID that is not the recorded process (recycled): not ours either
    path.write_text(json.dumps({**stale.to_dict(), "pid": os.getpid(), "create_time": 1.0}))
    assert running(ws) is None and not path.exists()
    path.write_text("{half a record")
    assert running(ws) is None and not path.exists()


@pytest.mark.unit
def test_up_refuses_when_a_cluster_is_named(tmp_path: Path):
    res = run_cli("up", cwd=tmp_path, env={"RAY_ADDRESS": "10.0.0.9:6379"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_ADDRESS" in lines[0] and "10.0.0.9:6379" in lines[0], res.stderr
    assert not (tmp_path / ".churn" / "ray" / "instance.json").exists()


@pytest.mark.unit
def test_up_refuses_negative_resources(tmp_path: Path):
    res = run_cli("up", "--num-cpus", "-1", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr == "error: churn up --num-cpus -1: must be 0 or more\n"
    assert not (tmp_path / ".churn" / "ray").exists()


def test_an_instance_that_cannot_start_is_one_line_and_leaves_nothing(tmp_path: Path):
    """`ray start` itself fails (here: its temp folder cannot be made): one line naming the
    cause and the log, exit 1, no record, no process of it left."""
    (tmp_path / "not_a_folder").write_text("")
    before = {p.pid for p in psutil.process_iter()}
    res = run_cli("up", cwd=tmp_path, env={"RAY_TMPDIR": str(tmp_path / "not_a_folder")})
    assert res.returncode == 1, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("error: churn up: the Ray instance did not start (NotADirectoryError")
    assert line.endswith(f"its log: {tmp_path / '.churn' / 'ray' / 'instance.log'}")
    assert not record_path(tmp_path / ".churn").exists()
    # what that `ray start` left would carry its environment (other processes on the machine, such
    # as the tests of another pytest-xdist process, come and go meanwhile)
    marker = str(tmp_path / "not_a_folder")

    def ours(p) -> bool:
        try:
            return p.environ().get("RAY_TMPDIR") == marker
        except psutil.Error:
            return False

    new = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before and ours(p)]
    assert new == []


def _serve(model_uri: str, port: int, cwd: Path, env: dict) -> tuple[subprocess.Popen, list[str]]:
    """`churn serve` in a session of its own; returns once it says it serves (its stderr lines collected)."""
    proc = subprocess.Popen([sys.executable, "-m", "churnlib", "serve", "--model-uri", model_uri, "--port", str(port)],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("Ctrl-C stops" in line for line in lines):  # up, and past its start-up
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"churn serve did not come up: {''.join(lines)[-2000:]}")
        time.sleep(0.1)
    return proc, lines


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_up_commands_attach_down_stops_only_it(ray_session, tmp_path: Path):
    """`churn up`; `churn train` and `churn serve` run on it (a stopped server leaves it up);
    `churn down` under a running server: the server says so and exits 1, every process of
    the instance ends, the suite's own Ray instance never notices."""
    import ray
    import requests

    env = cli_env()
    env.pop("RAY_AUTH_MODE", None)  # as in a fresh terminal: the record says how to authenticate
    up = run_cli("up", "--num-cpus", "2", "--json", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    inst = json.loads(up.stdout)
    servers: list[subprocess.Popen] = []
    try:
        assert inst["started"] and inst["up"] and inst["num_cpus"] == 2
        again = run_cli("up", "--json", cwd=tmp_path, env=env)
        assert again.returncode == 0 and json.loads(again.stdout)["pid"] == inst["pid"]
        assert not json.loads(again.stdout)["started"]
        status = run_cli("status", "--json", cwd=tmp_path, env=env)
        assert json.loads(status.stdout)["address"] == inst["address"]

        # a command attaches instead of starting an instance of its own, and leaves it up
        sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
        res = run_cli("train", *sets, "--json", cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"ray: on the workspace instance (churn up): dashboard {inst['dashboard_url']}" in res.stderr
        assert "started a local instance" not in res.stderr
        trained = json.loads(res.stdout)
        assert trained["metrics"]["best_valid_auc"] > 0.8
        assert running(tmp_path / ".churn") is not None

        # churn serve on it: answers; a clean stop shuts Serve down (port freed) and leaves the instance up
        port = free_port()
        proc, lines = _serve(trained["model_uri"], port, tmp_path, env)
        servers.append(proc)
        record = next(iter_chunks(1, seed=5, chunk_rows=1)).drop(columns=["Churn", "CustomerID"]).iloc[0].to_dict()
        answer = requests.post(f"http://127.0.0.1:{port}/predict", json=record, timeout=30)
        assert answer.status_code == 200 and 0 <= answer.json()["churn_probability"] <= 1
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)[-2000:]
        assert any("on the workspace instance" in line for line in lines) and _port_free(port)
        assert running(tmp_path / ".churn") is not None

        # churn down under a running server: the server notices, says so in one line, exits 1
        supervisor = psutil.Process(inst["pid"])
        tree = [supervisor.pid] + [p.pid for p in supervisor.children(recursive=True)]
        assert len(tree) >= 3, tree  # ray start, GCS, raylet, dashboard, workers, ...
        port = free_port()
        proc, lines = _serve(trained["model_uri"], port, tmp_path, env)
        servers.append(proc)
        down = run_cli("down", "--json", cwd=tmp_path, env=env)
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["stopped"] and json.loads(down.stdout)["graceful"]
        assert proc.wait(timeout=60) == 1
        time.sleep(0.5)
        assert lines[-1].strip() == (f"error: serve: the Ray instance under the server stopped "
                                     f"(the workspace instance is gone); port {port} freed"), lines[-3:]
        assert _port_free(port)
        assert alive(tree) == []
        assert not record_path(tmp_path / ".churn").exists()
        none = run_cli("down", cwd=tmp_path, env=env)
        assert none.returncode == 0 and "no workspace instance" in none.stderr
    finally:
        for proc in servers:
            if proc.poll() is None:
                stop(proc)
        if psutil.pid_exists(inst["pid"]):
            run_cli("down", cwd=tmp_path, env=env)
    # the suite's own instance never noticed
    assert ray.is_initialized() and ray.cluster_resources().get("CPU", 0) >= 1
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42


_PRIVATE_INSTANCE = r'''
import json, sys, time
import ray
from churnlib import runtime
from churnlib.config import load_config

runtime.ensure_ray(load_config(env={}, overrides={"ray.address": "local"}).ray)
ray.get(ray.remote(lambda: 1).remote())
node = ray._private.worker._global_node
procs = {kind: [i.process for i in infos] for kind, infos in node.all_processes.items()}
pids = [p.pid for ps in procs.values() for p in ps]
kill_all = type(node).kill_all_processes

def seen(self, *args, **kwargs):  # what Ray's shutdown finds when it begins stopping processes
    print(json.dumps({"monitor_alive_at_ray_shutdown": procs["monitor"][0].poll() is None}), flush=True)
    return kill_all(self, *args, **kwargs)

type(node).kill_all_processes = seen
print(json.dumps({"pids": pids}), flush=True)
if sys.argv[1] == "release":
    runtime.release_ray()
    print(json.dumps({"codes": {kind: [p.returncode for p in ps] for kind, ps in procs.items()}}), flush=True)
# else: the end of the process does it (atexit), as at the end of a command
'''


@pytest.mark.parametrize("how", ["release", "exit"])
def test_a_private_instance_stops_whole_its_monitor_killed_first(ray_session, tmp_path: Path, how: str):
    """A command's own instance, beside the suite's: at its release (or at the process's exit)
    every process of it is gone, the suite's instance untouched. Its autoscaler monitor is
    killed before Ray's shutdown, not sent SIGTERM after the GCS (where it tried to report its
    own death to the stopped GCS and Ray waited a second for it before SIGKILL)."""
    import signal as _signal

    suite = ray_session._private.worker._global_node
    suite_pids = [i.process.pid for infos in suite.all_processes.values() for i in infos]
    res = subprocess.run([sys.executable, "-c", _PRIVATE_INSTANCE, how], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    out = {k: v for line in res.stdout.strip().splitlines() for k, v in json.loads(line).items()}
    assert set(out["pids"]).isdisjoint(suite_pids) and len(out["pids"]) >= 4
    assert alive(out["pids"]) == []
    assert all(psutil.pid_exists(pid) for pid in suite_pids)  # the suite's instance is untouched
    assert ray_session.get(ray_session.remote(lambda: 2).remote()) == 2
    assert out["monitor_alive_at_ray_shutdown"] is False
    if how == "release":
        codes = out["codes"]
        assert codes["monitor"] == [-_signal.SIGKILL]
        assert all(c is not None for kind, cs in codes.items() for c in cs)  # each one waited for
        # the others still end as Ray ends them: SIGTERM, in its order (the raylet first)
        assert codes["raylet"][0] in (0, -_signal.SIGTERM, 128 + _signal.SIGTERM)
    assert "Traceback" not in res.stderr


@pytest.mark.unit
def test_the_instances_ports_are_distinct_and_free():
    import socket

    from churnlib.runtime import free_ports

    for _ in range(50):  # one free_port after another gave the same port twice (CI: Ray refused to start)
        ports = free_ports(9)
        assert len(set(ports)) == 9
    for port in ports:  # none still held
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
