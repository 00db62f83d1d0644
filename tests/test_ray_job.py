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


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    bindir = Path(sys.executable).parent
    tmp = tmp_path_factory.mktemp("ray_head")
    # Token authentication stays on: the cluster and its clients share a token
    # made for this test (never the user's ~/.ray/auth_token).
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    # Its own temp dir (short: Ray's socket paths have a length limit), so the
    # head records itself there and not in /tmp/ray for every later ray.init().
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    low = free_port()
    workers = range(low, low + 201)

    def port_outside_workers() -> int:
        while (port := free_port()) in workers:
            pass
        return port

    ports: dict[str, int] = {}
    for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port",
        "runtime-env-agent-port",
    ):
        while (port := port_outside_workers()) in ports.values():
            pass
        ports[name] = port
    args = [str(bindir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
            "--object-store-memory", str(400 * 1024 * 1024), "--temp-dir", temp_dir,
            "--min-worker-port", str(workers.start), "--max-worker-port", str(workers.stop - 1)]
    for name, port in ports.items():
        args += [f"--{name}", str(port)]
    log = open(tmp / "ray_start.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited with {proc.returncode}; see {log.name}")
        try:
            if requests.get(f"{dashboard}/api/version", timeout=2).status_code in (200, 401):
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the Ray head's dashboard did not come up")
    yield {"dashboard": dashboard, "env": env, "bindir": bindir}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_logs_to_mlflow(ray_head, tmp_path):
    store = tmp_path / "mlflow.db"
    runtime_env = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
            "CHURN_WORKSPACE": str(tmp_path / "ws"),
        }
    }
    cmd = [
        str(ray_head["bindir"] / "ray"), "job", "submit",
        "--address", ray_head["dashboard"],
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env),
        "--", "python", "-m", "ray_jobs.train", "--json", "--run-name", "from-ray-job",
        "--set", "data.generate_rows=3000", "--set", "xgboost.num_boost_round=15",
    ]
    res = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=600)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    line = next(line for line in output.splitlines() if line.startswith("{") and '"run_id"' in line)
    run_id = json.loads(line)["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "from-ray-job"
    assert run.data.params["ray.num_workers"] == "2"
    assert run.data.metrics["best_valid_auc"] > 0.5
