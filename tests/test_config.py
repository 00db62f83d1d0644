"""Config: merging default <- file <- environment <- --set, and one-line errors naming the key."""

from __future__ import annotations

import textwrap

import pytest

from churnlib.config import load_config
from churnlib.errors import ConfigError
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.unit  # no Ray, no server, no database


def write(tmp_path, text: str):
    p = tmp_path / "user.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_default_loads_with_documented_values():
    cfg = load_config(env={})
    assert cfg.model.registered_name == "xgboost_churn_model"
    assert cfg.xgboost.eval_metric == ["auc", "logloss", "error@0.5"]
    assert cfg.evaluation.thresholds == {"accuracy": 0.85, "roc_auc": 0.80}
    assert cfg.features.numeric[0] == "Age"
    assert list(cfg.features.categorical) == ["Gender", "Subscription Type", "Contract Length"]
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith(".churn/mlflow.db")


def test_user_file_merges_over_default(tmp_path):
    f = write(
        tmp_path,
        """
        xgboost:
          max_depth: 3
        mlflow:
          tags: {team: retention}
        """,
    )
    cfg = load_config([f], env={})
    assert cfg.xgboost.max_depth == 3
    assert cfg.xgboost.eta == 0.1  # untouched keys keep the default
    assert cfg.mlflow.tags == {"project": "churn-prediction", "team": "retention"}


def test_user_categorical_and_thresholds_replace_not_merge(tmp_path):
    f = write(
        tmp_path,
        """
        features:
          numeric: [tenure]
          categorical: {Contract: [Month-to-month, One year, Two year]}
        evaluation:
          thresholds: {roc_auc: 0.7}
        """,
    )
    cfg = load_config([f], env={})
    assert list(cfg.features.categorical) == ["Contract"]
    assert cfg.evaluation.thresholds == {"roc_auc": 0.7}


def test_precedence_default_file_env_set(tmp_path):
    f = write(tmp_path, "mlflow:\n  tracking_uri: http://from-file:5000\n  experiment_name: from-file\n")
    env = {"MLFLOW_TRACKING_URI": "http://from-env:5000"}
    cfg = load_config([f], ["mlflow.tracking_uri=http://from-set:5000"], env=env)
    assert cfg.tracking_uri == "http://from-set:5000"
    cfg = load_config([f], env=env)
    assert cfg.tracking_uri == "http://from-env:5000"
    assert cfg.mlflow.experiment_name == "from-file"
    assert cfg.registry_uri == "http://from-env:5000"  # follows tracking unless set
    assert cfg.artifact_location is None  # a server decides where artifacts go


def test_a_database_tracking_uri_keeps_artifacts_in_the_workspace(tmp_path):
    """MLFLOW_TRACKING_URI=sqlite:///... or postgresql://... (no server): artifacts go to the
    workspace's artifact store, not MLflow's default ./mlruns of the folder the command ran in."""
    for uri in (f"sqlite:///{tmp_path}/other.db", "postgresql://u@db:5432/mlflow"):
        cfg = load_config(overrides={"workspace": str(tmp_path / "ws")}, env={"MLFLOW_TRACKING_URI": uri})
        assert cfg.tracking_uri == uri
        assert cfg.artifact_location == (tmp_path / "ws" / "artifacts").as_uri()
    assert load_config(env={"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}).artifact_location is None
    given = load_config(overrides=["mlflow.artifact_location=s3://b/p"], env={"MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert given.artifact_location == "s3://b/p"


def test_set_parses_yaml_scalars_and_lists():
    cfg = load_config(
        overrides=["xgboost.max_depth=8", "xgboost.eval_metric=[auc, logloss]", "ray.use_gpu=true", "xgboost.device=cuda"],
        env={},
    )
    assert cfg.xgboost.max_depth == 8
    assert cfg.xgboost.eval_metric == ["auc", "logloss"]
    assert cfg.ray.use_gpu is True


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["xgboost.max_dept=8"], "unknown key xgboost.max_dept"),
        (["nosuch.key=1"], "unknown key nosuch"),
        (["xgboost.max_depth=deep"], "xgboost.max_depth"),
        (["xgboost.eta=0"], "xgboost.eta"),
        (["model.validation_split=1.5"], "model.validation_split"),
        (["ray.num_workers=0"], "ray.num_workers"),
        (["xgboost.eval_metric=[auc, rmse]"], "unknown metric 'rmse'"),
        (["xgboost.early_stopping_metric=aucpr"], "early_stopping_metric"),
        (["evaluation.thresholds={roc_auc: 0.8, acuracy: 0.9}"], "no metric named 'acuracy'"),
        (["xgboost.device=cuda"], "ray.use_gpu is false"),
        (["features.numeric=[Age, Age]"], "listed twice"),
        (["features.numeric=[Churn]"], "both a feature and the target"),
        (["features.categorical={Gender: []}"], "has no levels"),
        (["xgboost.objective=reg:squarederror"], "xgboost.objective"),
        (["xgboost.max_depth"], "expected section.key=value"),
        (["features.descriptions={Agee: years}"], "descriptions: no column named 'Agee'"),
        (["features.example.Gender=Robot"], "example: 'Gender' is 'Robot', not one of its levels"),
        (["features.example.Age=old"], "example: 'Age' must be a number"),
        (["features.example={Age: 41}"], "example: feature 'Tenure' is missing"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides, env={})
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_another_tables_columns_start_without_the_default_docs(tmp_path):
    """A file for another table (its own columns) does not inherit the default table's column
    descriptions and example record; the shipped configs carry their own real customer."""
    other = write(tmp_path, "features:\n  id_column: id\n  target: {column: y, positive: 1, negative: 0}\n"
                            "  numeric: [a]\n  categorical: {}\n")
    cfg = load_config([other], env={})
    assert cfg.features.example is None and cfg.features.descriptions == {}
    for name in ("telco", "bank"):
        shipped = load_config([REPO / "configs" / f"{name}.yaml"], env={})
        assert shipped.features.example and shipped.features.id_column in shipped.features.example
    assert load_config(env={}).features.example["CustomerID"] == 2
    # the same for --set: other columns drop the default table's docs, unless given too
    narrowed = load_config(overrides=["features.numeric=[Age, Tenure]"], env={})
    assert narrowed.features.example is None and narrowed.features.descriptions == {}
    kept = load_config(overrides=["features.numeric=[Age]", "features.example={Age: 3, Gender: Male, "
                                  "Subscription Type: Basic, Contract Length: Annual}"], env={})
    assert kept.features.example["Age"] == 3


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"], env={})
    bad = write(tmp_path, "xgboost: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad], env={})
    scalar = write(tmp_path, "just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config([scalar], env={})


def test_device_auto_follows_gpu_workers():
    """GPU path (no GPU here): the mapping from config to XGBoost's device."""
    cpu = load_config(env={})
    assert cpu.xgb_device == "cpu" and cpu.xgb_params()["device"] == "cpu"
    gpu = load_config(overrides=["ray.use_gpu=true"], env={})
    assert gpu.xgb_device == "cuda" and gpu.xgb_params()["device"] == "cuda"
    forced_cpu = load_config(overrides=["ray.use_gpu=true", "xgboost.device=cpu"], env={})
    assert forced_cpu.xgb_device == "cpu"
    assert cpu.xgb_params()["nthread"] == 1  # matches ray.cpus_per_worker


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    res = run_cli("train", "--set", "xgboost.max_depth=deep", cwd=tmp_path)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: config: xgboost.max_depth")
    assert "Traceback" not in res.stderr


def test_cli_prints_resolved_config(tmp_path):
    res = run_cli("config", "--set", "xgboost.max_depth=9", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    import json

    assert json.loads(res.stdout)["xgboost"]["max_depth"] == 9


def test_cli_reads_an_ignored_dotenv_but_the_environment_wins(tmp_path):
    import json

    (tmp_path / ".env").write_text("MLFLOW_EXPERIMENT_NAME=from-dotenv\nMLFLOW_TRACKING_URI=http://dotenv:5000\n")
    res = run_cli("config", "--json", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "http://env:5000"})
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    assert cfg["mlflow"]["experiment_name"] == "from-dotenv"
    assert cfg["mlflow"]["tracking_uri"] == "http://env:5000"


def test_every_command_has_a_description_an_example_and_help_for_every_flag():
    import argparse

    from churnlib.cli import EXAMPLES, build_parser

    seen = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    key = f"{path} {name}".strip()
                    walk(sub, key)
            elif action.option_strings and action.dest != "help":
                assert action.help, f"churn {path} {action.option_strings[0]} has no help text"
        if path and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            seen.append(path)
            assert parser.description, f"churn {path} has no description"
            assert parser.epilog and parser.epilog.startswith("examples:\n  churn "), f"churn {path} has no example"

    walk(build_parser(), "")
    assert sorted(seen) == sorted(k for k in EXAMPLES if k)
    assert len(seen) == 27  # up, down and status included; models decide, outcomes load, monitor, rollout *


def test_version_flag(tmp_path):
    from importlib.metadata import version

    res = run_cli("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"churn {version('churn-prediction')}"
