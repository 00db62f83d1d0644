"""`churn quickstart` (the README's first command) and the notebook, run for real."""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import _LEAKY_ENV, free_port, make_config, run_cli

REPO = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^\[(\d)/9\] (\w+): (.*) \(\d+\.\d s\)$")


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (as servers bind: a connection HAProxy
    closed is left in TIME_WAIT on the port for a minute, and owns nothing)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_quickstart_runs_every_step_and_stops_serve(tmp_path):
    port = free_port()
    res = run_cli("quickstart", "--rows", "10000", "--port", str(port), cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [m.groups() for m in map(STEP.match, res.stderr.splitlines()) if m]
    assert [(n, name) for n, name, _ in steps] == [
        (str(k), name) for k, name in enumerate(
            ("data", "train", "evaluate", "register", "promote", "serve", "requests", "batch", "stop"), start=1)
    ]
    lines = dict((name, line) for _, name, line in steps)
    assert "10,000 training rows" in lines["data"]
    assert re.search(r"in this process \(2 threads\), validation AUC 0\.9\d+", lines["train"])  # no Ray up: none started for it
    assert "gate passed" in lines["evaluate"] and "SHAP top feature" in lines["evaluate"]
    assert lines["register"].startswith("xgboost_churn_model version 1 (new), alias staging")
    assert lines["promote"] == "champion = version 1"
    assert lines["serve"] == f"http://127.0.0.1:{port} answering with version 1"
    assert len(re.findall(r"customer \d+: P\(churn\) 0\.\d{3}", res.stderr)) == 3
    assert re.search(r"because \w[\w ]*=", res.stderr)  # the explained answer gives reasons
    assert re.search(r"2,000 rows scored with reasons -> .*scores-\d{8}-\d{6}\.parquet", lines["batch"])
    assert "mlflow ui --backend-store-uri sqlite:///" in res.stderr and f"127.0.0.1:{port}/docs" in res.stderr
    assert re.search(r"then http://127\.0\.0\.1:5000/#/experiments/\d+/runs\)", res.stderr)  # the runs table
    assert re.search(r"quickstart: done in \d+\.\d s", res.stderr)
    assert "ray: started" not in res.stderr  # the step lines only (the serve step starts Ray now)
    # no Ray Data actor pool on the default's small tables: Ray's E line about an actor's
    # constructor arguments in the object store (issue 14) is not printed
    assert "core_worker.cc" not in res.stderr, res.stderr[-3000:]
    assert _port_is_free(port)  # Serve is stopped
    scores = list((tmp_path / ".churn" / "predictions").glob("scores-*.parquet"))
    assert len(scores) == 1 and any(scores[0].glob("*.parquet"))


def test_quickstart_failure_names_the_step_and_moves_no_alias(ray_session, tmp_path):
    """A gate the model cannot clear stops the run at step 3: nothing registered, exit 3.
    (On the session's Ray instance, as after `churn up`: the first test runs it cold.)"""
    res = run_cli("quickstart", "--rows", "5000", "--port", str(free_port()),
                  "--set", "evaluation.thresholds.roc_auc=0.9999", cwd=tmp_path, timeout=900, attach=True)
    assert res.returncode == 3, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: quickstart step 3/9 (evaluate): ") and "roc_auc: failed" in last, last
    assert "[3/9]" not in res.stderr and "[2/9] train:" in res.stderr
    cfg = make_config(tmp_path)
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.registry_uri)
    assert client.search_registered_models() == []


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # the kernel inherits this process's environment: earlier tests' MLflow URIs must not steer it
    for var in _LEAKY_ENV:
        monkeypatch.delenv(var, raising=False)
    import nbformat
    from nbclient import NotebookClient

    path = tmp_path / "end_to_end.ipynb"
    shutil.copy(REPO / "notebooks" / "end_to_end.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell) -> str:
        parts = []
        for out in cell.outputs:
            assert out.output_type != "error", out
            parts.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
        return "\n".join(parts)

    everything = "\n".join(text(c) for c in nb.cells if c.cell_type == "code")
    assert "gate: passed" in everything
    assert "xgboost_churn_model: version 1 is champion" in everything
    assert "'top_reasons'" in everything
    assert "predict: 2000 rows, 2000 scored, 0 rejected" in everything
    assert "drift: all 10 features stable" in everything
