"""The full stack, for real where it can run here: a real MLflow server on PostgreSQL with an S3
artifact store (moto), train -> evaluate -> register -> promote -> load @champion against it,
artifacts found as S3 objects and runs as PostgreSQL rows; the failure of each part as one line.
docker-compose.yaml and cluster.yaml are checked offline (no Docker engine, no cloud here).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from churnlib.data.generation import generate
from churnlib.errors import TrackingError
from tests.conftest import (
    REPO,
    S3_KEYS,
    Forwarder,
    free_port,
    make_config,
    require_service,
    run_cli,
    start_mlflow_server,
    start_moto,
    stop,
)

COMPOSE = REPO / "docker-compose.yaml"
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY", "API_KEY")


# docker-compose.yaml ------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.unit
def test_compose_config_parses_offline_with_an_env_file(tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        require_service("docker-compose (Debian's package)", "not on PATH")
    env = tmp_path / ".env"
    env.write_text("POSTGRES_USER=u\nPOSTGRES_PASSWORD=p1\nMINIO_ROOT_USER=m\nMINIO_ROOT_PASSWORD=p2\nRAY_AUTH_TOKEN=t\n"
                   "GRAFANA_ADMIN_PASSWORD=g\n")
    res = subprocess.run([binary, "--env-file", str(env), "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load(res.stdout)
    assert resolved["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == "postgresql://u:p1@postgres:5432/mlflow"
    # a missing secret stops compose with a message naming it
    env.write_text("POSTGRES_USER=u\nPOSTGRES_PASSWORD=p1\nMINIO_ROOT_USER=m\nMINIO_ROOT_PASSWORD=p2\n"
                   "GRAFANA_ADMIN_PASSWORD=g\n")
    res = subprocess.run([binary, "--env-file", str(env), "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode != 0 and "set RAY_AUTH_TOKEN in .env" in res.stderr


@pytest.mark.unit
def test_compose_services_healthchecks_volumes_and_dependencies():
    doc = _compose()
    services = doc["services"]
    assert set(services) == {"postgres", "minio", "minio-init", "log-db-init", "mlflow", "ray-head", "ray-worker",
                             "prometheus", "grafana"}
    for name in ("postgres", "minio", "mlflow", "ray-head", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
    assert set(doc["volumes"]) == {"postgres-data", "minio-data", "prometheus-data", "grafana-data"}
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "minio-data:/data" in services["minio"]["volumes"]
    assert "mb --ignore-existing" in " ".join(services["minio-init"]["command"])  # idempotent bucket
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "minio-init": {"condition": "service_completed_successfully"}}
    assert services["ray-head"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # the prediction log: its own database, made idempotently before the Ray nodes start, named to them
    assert services["ray-head"]["depends_on"]["log-db-init"]["condition"] == "service_completed_successfully"
    assert "CREATE DATABASE" in " ".join(services["log-db-init"]["command"]) and "grep -q 1 ||" in " ".join(
        services["log-db-init"]["command"])
    for node in ("ray-head", "ray-worker"):
        assert services[node]["environment"]["CHURN_LOG_URI"].endswith("@postgres:5432/${CHURN_LOG_DB:-churn_log}")
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    command = " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in command and "--artifacts-destination" in command
    assert services["ray-head"]["build"]["dockerfile"] == "docker/ray.Dockerfile"
    assert services["ray-worker"]["image"] == services["ray-head"]["image"]
    assert "ports" not in services["postgres"] and "ports" not in services["ray-worker"]
    # nothing listens publicly: every published port is bound to loopback
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    published = {p.split(":")[1] for s in services.values() for p in s.get("ports", [])}
    assert published == {"5000", "8265", "8000", "9001", "9090", "3000"}


def _metrics_port(service: dict) -> str:
    return next(a.split("=", 1)[1].split()[0] for a in service["command"] if a.startswith("--metrics-export-port="))


@pytest.mark.unit
def test_prometheus_scrapes_every_ray_node_and_grafana_shows_the_service():
    """Prometheus's targets are the compose services' metrics ports (issue: no monitoring in the
    stack); Grafana's provisioned data source is that Prometheus and its dashboard charts requests,
    latency percentiles, predictions by version and errors, from metric names the code emits."""
    import json

    services = _compose()["services"]
    prom = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    ray_job = jobs["ray"]
    targets = [t for sc in ray_job["static_configs"] for t in sc["targets"]]
    assert targets == [f"ray-head:{_metrics_port(services['ray-head'])}"]
    (workers,) = ray_job["dns_sd_configs"]
    assert workers["names"] == ["ray-worker"] and str(workers["port"]) == _metrics_port(services["ray-worker"])
    for host in [t.split(":")[0] for t in targets] + workers["names"]:
        assert host in services, host
    # the files the containers mount are these
    mounts = {v.split(":")[1]: v.split(":")[0] for name in ("prometheus", "grafana") for v in services[name]["volumes"]
              if v.startswith("./")}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./docker/prometheus/prometheus.yml"
    for inside, local in mounts.items():
        assert (REPO / local).exists(), local
    assert services["ray-head"]["environment"]["RAY_PROMETHEUS_HOST"] == "http://prometheus:9090"
    # Grafana: its data source is the stack's Prometheus; the dashboard is provisioned from the mounted folder
    grafana = REPO / "docker" / "grafana"
    (source,) = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((grafana / "provisioning" / "dashboards" / "churn.yaml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == "./docker/grafana/dashboards"
    board = json.loads((grafana / "dashboards" / "churn-serving.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in board["panels"]}
    assert all(t["datasource"]["uid"] == source["uid"] for p in board["panels"] for t in p["targets"])
    wanted = {"Requests": "ray_serve_num_http_requests_total", "Latency": "ray_serve_http_request_latency_ms_bucket",
              "Predictions": "ray_churn_predictions_total", "Errors": "ray_serve_num_http_error_requests_total"}
    for start, metric in wanted.items():
        title = next(t for t in exprs if t.startswith(start))
        assert metric in exprs[title], title
    assert "model_version" in exprs[next(t for t in exprs if t.startswith("Predictions"))]
    assert {"0.5", "0.95", "0.99"} <= set(re.findall(r"histogram_quantile\(([\d.]+)", exprs[next(
        t for t in exprs if t.startswith("Latency"))]))
    # the service's own metric names are the ones the dashboard reads (ray_ + name + _total/_bucket)
    app = (REPO / "serve" / "app.py").read_text()
    assert '"churn_predictions"' in app and '"churn_model_latency_ms"' in app


@pytest.mark.unit
def test_compose_holds_no_secret_literal():
    doc = _compose()
    seen = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str) and any(word in path.upper() for word in SECRET_WORDS):
            seen.append(path)
            assert node.startswith("${") or node.startswith("postgresql://"), f"{path} = {node!r}"

    walk(doc, "")
    assert len(seen) >= 6  # the passwords, keys and the Ray token were all checked
    uri = doc["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(r"postgresql://\$\{POSTGRES_USER:\?\}:\$\{POSTGRES_PASSWORD:\?\}@postgres:5432/\$\{POSTGRES_DB:-mlflow\}", uri)
    example = (REPO / ".env.example").read_text()
    assert re.search(r"^RAY_AUTH_TOKEN=\S", example, re.M) is None  # no value committed
    assert ".env" in (REPO / ".gitignore").read_text().split()


def _requirement(name: str):
    """The project's own requirement on `name`, from pyproject.toml."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(r for r in map(Requirement, deps) if r.name == name)


def _minor(version: str) -> tuple[int, int]:
    from packaging.version import Version

    return Version(version).release[:2]


@pytest.mark.unit
def test_images_match_the_pinned_versions():
    """The images ship what pyproject.toml allows and the suite runs: the same minor version as
    the installed Ray and MLflow (a patch release upstream changes neither side's minor)."""
    import ray

    ray_df = (REPO / "docker" / "ray.Dockerfile").read_text()
    ray_image = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py311-cpu$", ray_df, re.M)
    assert ray_image and "pip install --no-cache-dir -e ." in ray_df
    assert f"rayproject/ray:{ray_image[1]}-py311-gpu" in ray_df  # the GPU build is the same version
    mlflow_df = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    mlflow_image = re.search(r"^ARG MLFLOW_VERSION=(\d+\.\d+\.\d+)$", mlflow_df, re.M)
    assert mlflow_image and '"mlflow==${MLFLOW_VERSION}"' in mlflow_df
    assert "psycopg[binary]" in mlflow_df and "boto3" in mlflow_df
    for name, image_version, installed in (("ray", ray_image[1], ray.__version__), ("mlflow", mlflow_image[1], mlflow.__version__)):
        assert _requirement(name).specifier.contains(image_version), f"{name} {image_version} of the image is outside pyproject.toml"
        assert _minor(image_version) == _minor(installed), f"{name}: image {image_version}, installed {installed}"


@pytest.mark.unit
def test_the_image_check_catches_a_version_pyproject_does_not_allow():
    assert _requirement("mlflow").specifier.contains(mlflow.__version__)
    assert not _requirement("mlflow").specifier.contains("3.5.0")  # the range is one minor, not all of 3.x
    assert not _requirement("ray").specifier.contains("2.61.0")
    assert _minor("3.18.1") == _minor("3.18.0") != _minor("3.19.0")


# cluster.yaml ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = (REPO / "cluster.yaml").read_text()
    config = yaml.safe_load(raw)
    validate_config(prepare_config(config))  # Ray's own schema (ray-schema.json) and checks
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    gpu = config["available_node_types"]["gpu_worker"]
    assert head["node_config"]["InstanceType"].startswith("m5")  # CPU head
    assert gpu["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4"))
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert config["file_mounts"] == {"~/churn.env": ".env"}  # values come from the local, ignored .env
    for start in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert ". ~/churn.env" in start and "RAY_AUTH_MODE=token" in start
    assert not re.search(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|aws_access_key_id", raw, re.I)
    # the schema does catch a broken file
    broken = dict(config, setup_commands=[{"not": "a string"}])
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


# A real tracking server: PostgreSQL + S3 --------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(mlflow_server, ray_session, tmp_path_factory):
    ws = tmp_path_factory.mktemp("remote")
    cfg = make_config(ws, **{"mlflow.tracking_uri": mlflow_server["uri"], "mlflow.experiment_name": "remote-e2e",
                             "evaluation.thresholds": {"roc_auc": 0.8}, "evaluation.shap.max_samples": 300})
    return {"cfg": cfg, "ws": ws, **mlflow_server}


def test_train_evaluate_register_promote_load_against_the_server(remote):
    from churnlib.evaluate.command import evaluate
    from churnlib.registry.registry import Registry
    from churnlib.train.command import train

    cfg = remote["cfg"]
    quiet = {"say": lambda m: None}
    trained = train(cfg, run_name="remote-train", **quiet)
    test = generate(1500, remote["ws"] / "test.parquet", seed=12)
    evaluated = evaluate(cfg, trained.model_uri, str(test), **quiet)
    assert evaluated.gate.passed
    reg = Registry(cfg, **quiet)
    version, _ = reg.register(trained.run_id, alias="staging")
    reg.promote()
    mlflow.set_tracking_uri(remote["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{cfg.model.registered_name}@champion")
    out = model.predict(__import__("pandas").read_parquet(test).head(10))
    assert out["churn_probability"].between(0, 1).all()

    # What a person sees: the MLflow UI's page of the logged model (headless Chromium) lists the
    # registered version (issue: "Not registered") and the best round's and the evaluation's metrics
    from tests.conftest import chromium_dom

    client = MlflowClient(remote["uri"])
    model_id = client.get_run(trained.run_id).outputs.model_outputs[0].model_id
    page = f"{remote['uri']}/#/experiments/{trained.experiment_id}/models/{model_id}"
    dom = chromium_dom(page, remote["ws"], screenshot=remote["ws"] / "model_page.png")
    assert "Model versions" in dom and f"{cfg.model.registered_name}/versions/{version.version}" in dom, page
    assert "best/valid_auc" in dom and "roc_auc" in dom
    best = next(m for m in client.get_logged_model(model_id).metrics if m.key == "best/valid_auc")
    assert best.value == pytest.approx(trained.metrics["best_valid_auc"])

    # the artifacts are objects in the S3 bucket (proxied by the server)
    import boto3

    s3 = boto3.client("s3", endpoint_url=remote["s3"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=remote["bucket"])
            for o in page.get("Contents", [])]
    assert any(k.endswith("booster/booster.ubj") and trained.run_id in k for k in keys)
    assert any(k.endswith("feature_importance.png") and trained.run_id in k for k in keys)
    assert any(k.endswith("plots/roc_curve.png") and evaluated.run_id in k for k in keys)
    assert any(k.endswith("artifacts/model_dir/booster.ubj") for k in keys)  # the logged model itself

    # the runs, the registered model and its aliases are rows in PostgreSQL
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=remote["db"]["name"]) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid, status FROM runs WHERE run_uuid IN (%s, %s)", (trained.run_id, evaluated.run_id))
            assert dict(cur.fetchall()) == {trained.run_id: "FINISHED", evaluated.run_id: "FINISHED"}
            cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (cfg.model.registered_name,))
            # promotion moved the version from staging to champion (staging is cleared)
            assert dict(cur.fetchall()) == {"champion": int(version.version)}


# Failures: one line, exit 1, no RUNNING run where the server is reachable ---------------------------------


def _no_running(uri: str) -> bool:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return not client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")


@pytest.mark.unit
@pytest.mark.unit
@pytest.mark.parametrize("command", [["train"], ["evaluate", "--model-uri", "models:/m/1", "--data", "x.csv"],
                                     ["tune"], ["models", "list"]])
def test_unreachable_tracking_server_is_one_line(tmp_path, command):
    uri = f"http://127.0.0.1:{free_port()}"
    res = run_cli(*command, "--set", f"mlflow.tracking_uri={uri}", "--set", "data.generate_rows=200", cwd=tmp_path,
                  timeout=120)
    assert res.returncode == 1 and res.stderr.strip() == f"error: MLflow tracking server unreachable at {uri}"
    assert not (tmp_path / ".churn" / "data").exists()  # it failed before generating anything


def test_wrong_s3_credentials_direct_artifact_access(remote, tmp_path):
    """Direct S3 access with keys the S3 endpoint refuses: one line before anything starts."""
    proc, strict = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # moto checks credentials
    try:
        env = {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}
        res = run_cli("train", "--set", f"mlflow.tracking_uri={remote['uri']}", "--set", "mlflow.experiment_name=direct-s3",
                      "--set", "mlflow.artifact_location=s3://churn-artifacts/direct", "--set",
                      f"mlflow.s3_endpoint_url={strict}", "--set", "data.generate_rows=300", cwd=tmp_path, env=env,
                      timeout=300)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.strip() == (
        "error: artifact store s3://churn-artifacts/direct: access denied (check the credentials) "
        "(S3 403 on bucket 'churn-artifacts')"
    )
    assert _no_running(remote["uri"])


def test_missing_bucket_behind_the_server(postgres_db, s3_endpoint, tmp_path):
    """The compose stack with its bucket never created: the server's artifact store fails, in one line."""
    import psycopg

    name = postgres_db["name"] + "_nobucket"
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    proc, uri = start_mlflow_server(f"postgresql://postgres@127.0.0.1:5432/{name}", "s3://no-such-bucket/mlflow",
                                    {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}, tmp_path / "server.log")
    try:
        res = run_cli("train", "--set", f"mlflow.tracking_uri={uri}", "--set", "data.generate_rows=300", cwd=tmp_path,
                      timeout=300)
        assert res.returncode == 1, res.stderr[-2000:]
        line = res.stderr.strip()
        assert line.startswith(f"error: artifact store behind the MLflow server at {uri} (mlflow-artifacts:")
        assert line.endswith("failed: Failed to list artifacts in s3://no-such-bucket/mlflow: The specified bucket does not exist")
        assert "\n" not in line and _no_running(uri)
    finally:
        stop(proc)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_postgresql_down(postgres_db, s3_endpoint, tmp_path):
    """PostgreSQL gone under a running server, and a database store that is down: one line each."""
    import psycopg

    # A database tracking store that does not answer (nothing listens on the port).
    dead = f"postgresql://postgres:sekret@127.0.0.1:{free_port()}/mlflow"
    res = run_cli("models", "list", "--set", f"mlflow.tracking_uri={dead}", cwd=tmp_path, timeout=120)
    assert res.returncode == 1
    line = res.stderr.strip()
    assert line.startswith("error: MLflow backend store unreachable at postgresql://postgres:***@127.0.0.1:")
    assert "sekret" not in line and "\n" not in line

    name = postgres_db["name"] + "_cut"
    admin = psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True)
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    forwarder = Forwarder(("127.0.0.1", 5432))
    proc, uri = start_mlflow_server(f"postgresql://postgres@127.0.0.1:{forwarder.port}/{name}", "s3://churn-artifacts/cut",
                                    {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}, tmp_path / "server.log")
    try:
        assert run_cli("models", "list", "--set", f"mlflow.tracking_uri={uri}", cwd=tmp_path).returncode == 0
        forwarder.cut()
        for command in (["models", "list"], ["train", "--set", "data.generate_rows=300"]):
            res = run_cli(*command, "--set", f"mlflow.tracking_uri={uri}", cwd=tmp_path, timeout=300)
            assert res.returncode == 1, (command, res.stderr[-2000:])
            line = res.stderr.strip()
            assert line.startswith(f"error: MLflow tracking server at {uri} is up but its API fails ("), line
            assert line.endswith("its backend store (database) is likely down or unreachable; see the server's log")
    finally:
        stop(proc)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_tracking_errors_are_trackingerrors(monkeypatch, tmp_path):
    """In-process, the same checks raise TrackingError (exit 1), never a raw driver error."""
    from churnlib import tracking

    cfg = make_config(tmp_path, **{"mlflow.tracking_uri": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    with pytest.raises(TrackingError, match="MLflow backend store unreachable"):
        tracking.preflight(cfg)
