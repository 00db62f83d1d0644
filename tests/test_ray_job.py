"""`ray job submit` of ray_jobs.train to a real `ray start --head` cluster on loopback.

The cluster gets its own free ports (Redis holds 6379 on these machines) and is
stopped by ending its `ray start --block` process, never with `ray stop`, which
would also stop the test session's own Ray instance.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import requests

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


def _ports(names: list[str], avoid: range) -> dict[str, int]:
    ports: dict[str, int] = {}
    for name in names:
        while (port := free_port()) in avoid or port in ports.values():
            pass
        ports[name] = port
    return ports


def _start(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End one node's process group (its raylet, GCS, dashboard, workers): a disposable test
    cluster, so after a short grace it is killed rather than waited for (Ray's graceful node
    shutdown took 35 s here)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A two-node Ray cluster on loopback: `ray start --head` plus a second `ray start --address` node."""
    bindir = Path(sys.executable).parent
    tmp = tmp_path_factory.mktemp("ray_cluster")
    # Token authentication stays on: the cluster and its clients share a token
    # made for this test (never the user's ~/.ray/auth_token).
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Nothing of the session's own Ray instance: its dashboard address (which `churn`
    # exports to the processes of an instance it starts) would send this cluster's
    # Ray Train helpers to the wrong dashboard, with the wrong token.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    # Its own temp dir (short: Ray's socket paths have a length limit), so the
    # head records itself there and not in /tmp/ray for every later ray.init().
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    low = free_port()
    head_workers, node_workers = range(low, low + 100), range(low + 100, low + 200)
    reserved = range(low, low + 200)
    node_port_names = ["node-manager-port", "object-manager-port", "metrics-export-port",
                       "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    head_ports = _ports(["port", "dashboard-port", "ray-client-server-port", *node_port_names], reserved)
    common = ["--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(300 * 1024 * 1024)]
    head_args = [str(bindir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
                 "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, *common,
                 "--min-worker-port", str(head_workers.start), "--max-worker-port", str(head_workers.stop - 1)]
    for name, port in head_ports.items():
        head_args += [f"--{name}", str(port)]
    head = _start(head_args, env, tmp / "head.log")
    dashboard = f"http://127.0.0.1:{head_ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}; see {tmp / 'head.log'}")
        try:
            if requests.get(f"{dashboard}/api/version", timeout=2).status_code in (200, 401):
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        _stop(head)
        pytest.fail("the Ray head's dashboard did not come up")

    node_ports = _ports(node_port_names, reserved)
    # A temp dir of its own, as on a second machine: nodes that share one also share the
    # runtime-env cache, and one node's clean-up would delete the other's job working dir.
    node_temp_dir = tempfile.mkdtemp(prefix="rayn", dir="/tmp")
    node_args = [str(bindir / "ray"), "start", "--address", f"127.0.0.1:{head_ports['port']}", "--block",
                 "--num-cpus", "1", "--temp-dir", node_temp_dir, *common,
                 "--min-worker-port", str(node_workers.start), "--max-worker-port", str(node_workers.stop - 1)]
    for name, port in node_ports.items():
        node_args += [f"--{name}", str(port)]
    node = _start(node_args, env, tmp / "node.log")
    # both nodes registered: 3 CPUs in the cluster
    probe = [sys.executable, "-c", "import ray; ray.init(address='auto', logging_level='ERROR'); "
             "print(int(ray.cluster_resources().get('CPU', 0)), len([n for n in ray.nodes() if n['Alive']]))"]
    probe_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{head_ports['port']}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if node.poll() is not None:
            pytest.fail(f"ray start --address exited with {node.returncode}; see {tmp / 'node.log'}")
        out = subprocess.run(probe, env=probe_env, capture_output=True, text=True, timeout=60).stdout.split()
        if out == ["3", "2"]:
            break
        time.sleep(2)
    else:
        pytest.fail(f"the second node did not join the cluster (last probe: {out})")
    yield {"dashboard": dashboard, "env": env, "bindir": bindir, "gcs": f"127.0.0.1:{head_ports['port']}"}
    _stop(node)
    _stop(head)
    shutil.rmtree(temp_dir, ignore_errors=True)
    shutil.rmtree(node_temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_logs_to_the_mlflow_server(ray_cluster, mlflow_server, tmp_path):
    """`ray job submit --working-dir .` of ray_jobs.train on a two-node cluster; the run lands in the
    real MLflow server (PostgreSQL + S3) named by the job's runtime env."""
    runtime_env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": mlflow_server["uri"],
            "MLFLOW_EXPERIMENT_NAME": "from-ray-job",
            "CHURN_WORKSPACE": str(tmp_path / "ws"),
        }
    }
    cmd = [
        str(ray_cluster["bindir"] / "ray"), "job", "submit",
        "--address", ray_cluster["dashboard"],
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "ray_jobs.train", "--json", "--run-name", "from-ray-job",
        "--set", "data.generate_rows=3000", "--set", "xgboost.num_boost_round=15",
        "--set", "ray.num_workers=3",  # one more worker than the head has CPUs: the second node trains too
    ]
    res = subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=600)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    line = next(line for line in output.splitlines() if line.startswith("{") and '"run_id"' in line)
    run_id = json.loads(line)["run_id"]
    client = mlflow.MlflowClient(mlflow_server["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "from-ray-job"
    assert client.get_experiment(run.info.experiment_id).name == "from-ray-job"
    assert run.data.params["ray.num_workers"] == "3"
    # no node holds all 3 CPUs, so even this small table trains on Ray Train's workers, spread out
    assert run.data.tags["churn.train_engine"] == "ray_train"
    assert run.data.metrics["best/valid_auc"] > 0.5
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied to the S3 bucket
