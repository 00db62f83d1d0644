"""`churn predict` and `churn drift`: scored Parquet that matches the model, rejects with
reasons, the MLflow record, no partial output on failure, s3:// in and out, and drift
verdicts on the real Kaggle files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from churnlib.batch.predict import predict
from churnlib.data.features import FeatureSpec
from churnlib.data.generation import generate
from churnlib.data.profiles import batch_counts, build_profile, compare, merge_counts
from churnlib.errors import ChurnError, DataError
from churnlib.registry.registry import Registry
from tests.conftest import (
    KAGGLE_TEST,
    KAGGLE_TRAIN_PARTIAL,
    S3_KEYS,
    cli_env,
    log_local_model,
    make_config,
    no_running_runs,
    require_shared,
    run_cli,
    session_ray_env,
)

QUIET = {"say": lambda m: None}
OUTPUT_COLUMNS = ["customer_id", "churn_probability", "churn_label", "expected_value", "contact", "model_name",
                  "model_version"]
# three rows no model can score, each for its own reason
BAD_ROWS = {
    10: ("Age", "forty", "column 'Age': non-numeric value 'forty'"),
    20: ("Contract Length", "Weekly", "column 'Contract Length': unknown category 'Weekly'"),
}


@pytest.fixture(scope="module")
def store(ray_session, tmp_path_factory):
    """A workspace whose registry has a champion (a real logged model with a training profile)."""
    ws = tmp_path_factory.mktemp("batch")
    cfg = make_config(ws)
    train = generate(5000, ws / "train.parquet", seed=5)
    run_id = log_local_model(cfg, train, rounds=30, run_name="champion", max_depth=4)
    reg = Registry(cfg, **QUIET)
    info, _ = reg.register(run_id)
    reg.set_alias(info.version, "champion")
    table = pd.read_parquet(generate(3000, ws / "score.parquet", seed=21)).drop(columns=["Churn"])
    table = table.astype({"Age": object, "Contract Length": object})
    for row, (col, value, _) in BAD_ROWS.items():
        table.loc[row, col] = value
    table.loc[30, [c for c in table.columns if c != "CustomerID"]] = None  # every feature empty
    table.to_csv(ws / "score.csv", index=False)
    return {"ws": ws, "cfg": cfg, "run_id": run_id, "version": info.version, "csv": ws / "score.csv",
            "table": table}


def _read(folder: Path) -> pd.DataFrame:
    files = sorted(Path(folder).glob("*.parquet"))
    assert files, f"no parquet files in {folder}"
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def scored(store):
    out = store["ws"] / "scores"
    result = predict(store["cfg"], str(store["csv"]), str(out), explain=True, **QUIET)
    return result, _read(out)


def test_scores_match_the_registered_model_row_for_row(store, scored):
    result, df = scored
    assert list(df.columns[:7]) == OUTPUT_COLUMNS
    assert result.counts == {"rows": 3000, "scored": 2997, "rejected": 3, "empty": 1}
    assert len(df) == 2997 and df["customer_id"].is_unique
    mlflow.set_tracking_uri(store["cfg"].tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{store['cfg'].model.registered_name}/{store['version']}")
    good = store["table"].drop(index=[10, 20, 30])
    # the signature types the table's integer columns `long`; the empty row made them float in
    # pandas, and MLflow refuses a float for a long (its hint): cast back, as a user does
    longs = [c["name"] for c in pyfunc.metadata.get_input_schema().to_dict() if c["type"] == "long"]
    assert longs, "the training table had integer columns"
    good = good.astype({c: "int64" for c in longs})
    expected = pyfunc.predict(good)["churn_probability"].to_numpy()
    got = df.set_index("customer_id").loc[good["CustomerID"], "churn_probability"].to_numpy()  # integer ids join
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    labels = df["churn_label"].to_numpy()
    assert set(np.unique(labels)) == {0, 1}
    assert (labels == (df["churn_probability"].to_numpy() >= 0.5)).all()
    assert set(df["model_name"]) == {store["cfg"].model.registered_name}
    assert set(df["model_version"]) == {str(store["version"])}
    # the decision: the same expected value and contact as the pyfunc for the same record
    theirs = pyfunc.predict(good).set_index(good["CustomerID"].to_numpy())
    ours = df.set_index("customer_id").loc[good["CustomerID"]]
    np.testing.assert_allclose(ours["expected_value"].to_numpy(), theirs["expected_value"].to_numpy(), rtol=1e-6, atol=1e-9)
    assert (ours["contact"].to_numpy() == theirs["contact"].to_numpy()).all() and ours["contact"].any()
    d = result.decision
    assert d["contacts"] == d["above_threshold"] == int(df["contact"].sum()) and d["capacity"] is None
    assert d["expected_value"] == pytest.approx(df.loc[df["contact"], "expected_value"].sum())


def test_the_run_is_recorded_in_the_prediction_log_pointing_at_its_output(store, scored):
    """One row per run (the scores stay in Parquet): which version, what it read, where it wrote."""
    import sqlalchemy as sa

    from churnlib.predlog.schema import prediction_runs
    from churnlib.predlog.store import LogStore

    result, df = scored
    store_ = LogStore(store["cfg"].log_uri)
    with store_.engine.connect() as conn:
        row = conn.execute(sa.select(prediction_runs).where(prediction_runs.c.run_id == result.run_id)).mappings().one()
    store_.close()
    assert row["model_name"] == store["cfg"].model.registered_name and row["model_version"] == str(store["version"])
    assert row["output_uri"] == str(store["ws"] / "scores") and row["input_uri"] == str(store["csv"])
    assert row["rows_scored"] == len(df) == 2997 and row["contacts"] == int(df["contact"].sum())
    assert row["contacts_only"] is False and row["finished"] >= row["started"]


def test_a_capacity_keeps_exactly_that_many_of_the_highest_risks(store, scored):
    """decision.capacity below the customers above the threshold: exactly that many contacts,
    the highest P(churn); everything else in the output as without a capacity."""
    _, full = scored
    above = int(full["contact"].sum())
    capacity = above // 3
    cfg = make_config(store["ws"], **{"decision.capacity": capacity})
    out = store["ws"] / "scores_capacity"
    result = predict(cfg, str(store["csv"]), str(out), **QUIET)
    df = _read(out)
    assert int(df["contact"].sum()) == capacity == result.decision["contacts"]
    assert result.decision["above_threshold"] == above and result.decision["capacity"] == capacity
    p = df["churn_probability"]
    assert p[df["contact"]].min() >= p[~df["contact"]].max()
    assert result.decision["expected_value"] == pytest.approx(df.loc[df["contact"], "expected_value"].sum())
    same = full.set_index("customer_id").loc[df["customer_id"]]
    np.testing.assert_allclose(same["churn_probability"].to_numpy(), p.to_numpy())
    assert (df["churn_label"].to_numpy() == same["churn_label"].to_numpy()).all()


def test_contacts_only_writes_the_ranked_call_list(store, scored):
    """--contacts-only with a capacity of 5 % of the scored customers and --explain: one file,
    the customers to contact ranked by expected value, with their reasons."""
    _, full = scored
    cfg = make_config(store["ws"], **{"decision.capacity_share": 0.05})
    out = store["ws"] / "calls"
    result = predict(cfg, str(store["csv"]), str(out), explain=True, contacts_only=True, **QUIET)
    assert [f.name for f in out.iterdir()] == ["call_list.parquet"]
    calls = pd.read_parquet(out / "call_list.parquet")
    k = int(0.05 * 2997)
    assert len(calls) == k == result.decision["contacts"]
    assert list(calls.columns[:4]) == ["customer_id", "rank", "churn_probability", "expected_value"]
    assert "contact" not in calls.columns and "churn_label" not in calls.columns
    assert calls["rank"].tolist() == list(range(1, k + 1))
    assert calls["expected_value"].is_monotonic_decreasing and (calls["expected_value"] > -25).all()
    top = full.sort_values("churn_probability", ascending=False, kind="stable").head(k)
    assert calls["churn_probability"].min() >= top["churn_probability"].min()
    assert set(calls["customer_id"]) <= set(full.loc[full["contact"], "customer_id"])
    assert calls["reason_1"].str.len().gt(0).all()


def test_rejects_hold_each_bad_row_with_its_reason(store, scored):
    result, _ = scored
    assert result.rejects == f"{store['ws'] / 'scores'}_rejects"
    rejects = _read(Path(result.rejects)).set_index("customer_id")
    ids = store["table"]["CustomerID"].astype(str)
    assert sorted(rejects.index) == sorted(ids.iloc[[10, 20, 30]])
    for row, (col, value, reason) in BAD_ROWS.items():
        assert rejects.loc[ids.iloc[row], "reason"].startswith(reason)
        assert json.loads(rejects.loc[ids.iloc[row], "record"])[col] == value
    assert rejects.loc[ids.iloc[30], "reason"] == "every cell is empty"


def test_explain_gives_the_three_largest_contributions(store, scored):
    from churnlib.data.features import encode_columns
    from churnlib.model import loading
    from churnlib.model.explain import explain

    _, df = scored
    assert [c for c in df.columns if c.startswith("reason_")] == ["reason_1", "reason_2", "reason_3"]
    predictor = loading.load(f"models:/{store['cfg'].model.registered_name}@champion").predictor
    row = store["table"].iloc[[0]]
    X, _, _ = encode_columns(row, predictor.spec)
    values = explain(predictor.booster, X, predictor.spec, "tree", nthread=1).values[0]
    top = [predictor.spec.feature_names[j] for j in np.argsort(-np.abs(values))[:3]]
    got = df.set_index("customer_id").loc[row["CustomerID"].iloc[0]]
    assert [got[f"reason_{k}"].split("=")[0] for k in (1, 2, 3)] == top
    contributions = [float(got[f"reason_{k}"].rsplit("(", 1)[1].rstrip(")")) for k in (1, 2, 3)]
    assert abs(contributions[0]) >= abs(contributions[1]) >= abs(contributions[2])
    assert contributions[0] == pytest.approx(values[np.argsort(-np.abs(values))[0]], abs=1e-3)


def test_the_job_is_recorded_in_mlflow(store, scored):
    result, _ = scored
    run = MlflowClient(store["cfg"].tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["churn.command"] == "predict"
    assert run.data.tags["churn.model_version"] == str(store["version"])
    assert run.data.params["input"] == str(store["csv"])
    assert run.data.params["output"] == str(store["ws"] / "scores")
    assert run.data.metrics["rows/scored"] == 2997 and run.data.metrics["rows/rejected"] == 3
    assert run.data.metrics["rows/total"] == 3000 and "rows/rows" not in run.data.metrics  # issue: "rows_rows"
    assert run.data.metrics["time/total_s"] > 0
    # the table comes from the training distribution: no feature drifted
    assert run.data.metrics["drift/features_shifted"] == 0
    artifacts = {a.path for a in MlflowClient(store["cfg"].tracking_uri).list_artifacts(result.run_id, "drift")}
    assert {"drift/report.json", "drift/psi.png"} <= artifacts
    assert no_running_runs(store["cfg"])


def test_existing_output_is_refused_and_untouched(store, scored):
    out = store["ws"] / "scores"
    before = sorted(p.name for p in out.iterdir())
    res = run_cli("predict", "--input", str(store["csv"]), "--output", str(out), "--set",
                  f"workspace={store['cfg'].workspace}", cwd=store["ws"], attach=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: output {out} already exists; choose a new path (nothing is overwritten)"
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("engine", ["task", "ray_data"])
def test_a_failure_mid_job_leaves_no_output_and_no_open_run(store, engine):
    """The second file of the input breaks while the first is being scored and written."""
    folder = store["ws"] / f"broken_input_{engine}"
    folder.mkdir()
    store["table"].iloc[:1500].drop(index=[10, 20, 30]).to_csv(folder / "part-0.csv", index=False)
    text = store["table"].iloc[1500:].to_csv(index=False).splitlines()
    text[200] += ",1,2,3"  # a line with more fields than the header
    (folder / "part-1.csv").write_text("\n".join(text) + "\n")
    out = store["ws"] / f"broken_scores_{engine}"
    res = run_cli("predict", "--input", str(folder), "--output", str(out), "--set",
                  f"workspace={store['cfg'].workspace}", "--set", f"scoring.engine={engine}", cwd=store["ws"],
                  attach=True)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "part-1.csv" in last and "Expected" in last, last
    leftovers = [p.name for p in store["ws"].iterdir() if f"broken_scores_{engine}" in p.name]
    assert leftovers == []  # neither the output, nor its rejects, nor a staging folder
    assert no_running_runs(store["cfg"])


def test_ray_data_pool_writes_what_the_one_task_writes(store, scored):
    """The two engines on the same table: the same rows, scores, decisions, rejects and drift
    counts (the pool spreads blocks over actors; the one task streams them through one process)."""
    result, df = scored
    out = store["ws"] / "pool_scores"
    cfg = store["cfg"].model_copy(update={"scoring": store["cfg"].scoring.model_copy(update={"engine": "ray_data"})})
    lines: list[str] = []
    pool = predict(cfg, str(store["csv"]), str(out), explain=True, say=lines.append)
    assert any("2 actor(s) x 0.5 CPU" in line for line in lines), lines
    assert pool.counts == result.counts and pool.decision == pytest.approx(result.decision)
    theirs = _read(out).set_index("customer_id").sort_index()
    ours = df.set_index("customer_id").sort_index()
    assert list(theirs.columns) == list(ours.columns) and theirs.index.equals(ours.index)
    pd.testing.assert_frame_equal(theirs, ours, check_exact=False, rtol=1e-6)
    rejects = [pd.read_parquet(f) for f in sorted(Path(pool.rejects).glob("*.parquet"))]
    assert sorted(pd.concat(rejects)["reason"]) == sorted(pd.read_parquet(result.rejects)["reason"])
    assert pool.drift == result.drift


def test_a_killed_scoring_task_is_run_again_and_writes_every_row_once(store, tmp_path):
    """SIGKILL the one task's process once it has written part of the output: Ray runs it again,
    on an emptied staging folder, and the output holds every row once, scored as the model scores."""
    import os
    import signal
    import threading
    import time

    rows = 300_000
    table = generate(rows, tmp_path / "big.parquet", seed=8)
    out = tmp_path / "killed_scores"
    cfg = store["cfg"].model_copy(update={"scoring": store["cfg"].scoring.model_copy(
        update={"engine": "task", "batch_size": 4000})})
    killed: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            parts = list(tmp_path.glob(".killed_scores.tmp-*/part-*.parquet"))
            for proc in Path("/proc").iterdir():
                if parts and proc.name.isdigit():
                    try:
                        title = (proc / "cmdline").read_bytes().split(b"\0")[0]
                    except OSError:
                        continue
                    if title.startswith(b"ray::churn-predict:killed_scores"):
                        os.kill(int(proc.name), signal.SIGKILL)
                        killed.update(pid=int(proc.name), parts=len(parts))
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = predict(cfg, str(table), str(out), **QUIET)
    thread.join(5)
    assert killed, "the test never saw the scoring task writing"
    assert not Path(f"/proc/{killed['pid']}").exists()
    assert result.counts == {"rows": rows, "scored": rows, "rejected": 0, "empty": 0}
    got = _read(out)
    assert len(got) == rows and got["customer_id"].is_unique
    raw = pd.read_parquet(table)
    mlflow.set_tracking_uri(store["cfg"].tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{store['cfg'].model.registered_name}/{store['version']}")
    sample = raw.sample(2000, random_state=1)
    expected = model.predict(sample.drop(columns=["Churn"]))["churn_probability"].to_numpy()
    np.testing.assert_allclose(got.set_index("customer_id").loc[sample["CustomerID"], "churn_probability"], expected,
                               rtol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".killed_scores")] == []


def test_busy_cpus_shrink_the_scoring_task_or_refuse_in_one_line(store, tmp_path):
    """Other work holding CPUs (a Serve replica, another job): the task takes the free ones and
    says so; with less than one free, one line and nothing written, instead of waiting forever."""
    import ray

    @ray.remote(num_cpus=0)
    class Hold:
        def ping(self) -> bool:
            return True

    total = ray.cluster_resources()["CPU"]
    hold = Hold.options(num_cpus=total - 1).remote()
    try:
        ray.get(hold.ping.remote())
        lines: list[str] = []
        result = predict(store["cfg"], str(store["csv"]), str(tmp_path / "one_cpu"), say=lines.append)
        assert "predict: 1 CPU(s) free, so the scoring task takes 1" in lines and result.counts["scored"] == 2997
        assert any("one Ray task, 1 thread(s)" in line for line in lines), lines
        ray.kill(hold)
        hold = Hold.options(num_cpus=total - 0.5).remote()
        ray.get(hold.ping.remote())
        with pytest.raises(ChurnError, match=r"not enough free CPUs to score: 0.5 of .* free, 1 for the scoring task"):
            predict(store["cfg"], str(store["csv"]), str(tmp_path / "no_cpu"), **QUIET)
        assert not (tmp_path / "no_cpu").exists() and not (tmp_path / "no_cpu_rejects").exists()
    finally:
        ray.kill(hold)


@pytest.mark.unit
def test_the_reader_streams_batches_of_the_asked_size_across_files_and_names_a_bad_file(tmp_path):
    """``iter_frames``: batches of batch_size rows whatever the row groups and CSV blocks, the
    rows in file order, numeric CSV cells as text, a broken file named in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from churnlib.config import load_config
    from churnlib.data.sources import check_columns, iter_frames, resolve_source

    spec = FeatureSpec.from_config(load_config(overrides=[f"workspace={tmp_path}"], env={}).features)
    raw = pd.read_parquet(generate(2500, tmp_path / "g.parquet", seed=2)).drop(columns=["Churn"])
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.Table.from_pandas(raw.iloc[:1000], preserve_index=False), folder / "a.parquet", row_group_size=300)
    pq.write_table(pa.Table.from_pandas(raw.iloc[1000:], preserve_index=False), folder / "b.parquet", row_group_size=700)
    source = resolve_source(str(folder))
    frames = list(iter_frames(source, spec, check_columns(source, spec, need_target=False), 400))
    assert [len(f) for f in frames] == [400, 400, 200, 400, 400, 400, 300]  # a batch never spans two files
    assert pd.concat(frames)["CustomerID"].tolist() == raw["CustomerID"].tolist()
    raw.to_csv(tmp_path / "t.csv", index=False)
    csv = resolve_source(str(tmp_path / "t.csv"))
    columns = check_columns(csv, spec, need_target=False)
    frames = list(iter_frames(csv, spec, columns, 1000))
    assert [len(f) for f in frames] == [1000, 1000, 500]
    assert not pd.api.types.is_numeric_dtype(frames[0]["Age"])  # text: "forty" is one reject, not a failed read
    text = (tmp_path / "t.csv").read_text().splitlines()
    text[1700] += ",1,2"
    (tmp_path / "t.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"cannot read the data: t\.csv: CSV parse error: Expected 11 columns, got 13"):
        list(iter_frames(csv, spec, columns, 1000))


@pytest.mark.unit
def test_drift_counts_by_value_equal_the_counts_row_by_row(tmp_path, monkeypatch):
    """Integer columns over a short span are counted by value (one bincount); the counts are
    exactly those of looking every row up, for integers, fractions, NaN and a wide span."""
    from churnlib.config import load_config
    from churnlib.data import profiles
    from churnlib.data.preparation import encode_batch
    from churnlib.data.sources import check_columns, resolve_source

    spec = FeatureSpec.from_config(load_config(overrides=[f"workspace={tmp_path}"], env={}).features)
    path = generate(20_000, tmp_path / "t.parquet", seed=3)
    X = encode_batch(pd.read_parquet(path), spec, check_columns(resolve_source(str(path)), spec), 0.0, 1)["X"]
    profile = build_profile(X[:5000], spec)
    rng = np.random.default_rng(1)
    odd = X.copy()
    odd[rng.random(len(odd)) < 0.1, 0] = np.nan
    odd[:, 1] += 0.5  # fractions
    odd[:100, 2] = 1e9  # a span too wide to count by value
    batches = [X, X[:0], X[:1], odd]
    fast = [batch_counts(b, profile, spec) for b in batches]
    assert profiles._histogram(X[:, 0].astype(np.float64))[0] is not None  # the fast path is taken
    monkeypatch.setattr(profiles, "_histogram", lambda values: (None, None))
    assert fast == [batch_counts(b, profile, spec) for b in batches]


@pytest.mark.unit
def test_the_engine_rule_and_the_task_s_cpus():
    from churnlib.batch.task import task_cpus, task_threads, uses_task
    from churnlib.config import ScoringConfig

    scoring = ScoringConfig(batch_size=1000, actors=2, cpus_per_actor=0.5, explain_top=3, drift=True)
    assert uses_task(scoring, 1) and not uses_task(scoring, 3)
    assert uses_task(scoring.model_copy(update={"engine": "task"}), 3)
    assert not uses_task(scoring.model_copy(update={"engine": "ray_data"}), 1)
    assert task_cpus(scoring, 2.0) == 2.0 and task_cpus(scoring, 1.5) == 1.5 and task_cpus(scoring, 16.0) == 2.0
    assert [task_threads(c) for c in (0.5, 1.0, 1.5, 2.0, 7.0)] == [1, 1, 2, 2, 7]


def test_sigterm_mid_job_is_143_with_nothing_left_and_the_run_killed(store):
    """SIGTERM while scoring (issue: it aborted with 134 and blamed the input file): one line,
    exit 143, no output, no rejects, no staging folder, the predict run KILLED."""
    import signal

    from tests.conftest import alive, signal_cli

    import pandas as pd

    # a table long enough that the job is still scoring when the signal lands (the store's 3,000
    # rows were all scored before it once, on a slow run: exit 0)
    big = store["ws"] / "sigterm_input.csv"
    small = pd.read_csv(store["csv"])
    pd.concat([small] * 100, ignore_index=True).assign(**{store["cfg"].features.id_column: lambda d: [f"c{i}" for i in range(len(d))]}).to_csv(big, index=False)
    out = store["ws"] / "sigterm_scores"
    args = ["predict", "--input", big, "--output", out, "--set", f"workspace={store['cfg'].workspace}"]
    rc, err, took, tree = signal_cli(args, "predict: ", signal.SIGTERM, False, store["ws"])
    assert rc == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted" and "cannot read" not in err
    assert [p.name for p in store["ws"].iterdir() if "sigterm_scores" in p.name] == []
    assert alive(tree) == []
    client = MlflowClient(store["cfg"].tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(store["cfg"].mlflow.experiment_name).experiment_id],
                              filter_string="params.output = '" + str(out) + "'")
    assert [r.info.status for r in runs] == ["KILLED"]


def test_integer_ids_stay_integers_and_a_header_only_table_is_one_line(store, scored, tmp_path):
    """Issue: customer_id came out as text (joins back to integer ids failed); a header-only CSV
    exited 1 with "unexpected FileNotFoundError" and left a hidden staging folder."""
    import pyarrow.parquet as pq

    assert str(pq.read_schema(sorted((store["ws"] / "scores").glob("*.parquet"))[0]).field("customer_id").type) == "int64"
    _, out = scored
    assert out["customer_id"].dtype.kind == "i"
    # the first file makes the id an integer column; a non-integer id in a later file is a reject
    # with its reason, not a switch to text
    (tmp_path / "mixed").mkdir()
    store["table"].iloc[:25].to_csv(tmp_path / "mixed" / "part-0.csv", index=False)
    later = store["table"].iloc[25:50].astype({"CustomerID": object})
    later.loc[later.index[3], "CustomerID"] = "A-17"
    later.to_csv(tmp_path / "mixed" / "part-1.csv", index=False)
    result = predict(store["cfg"], str(tmp_path / "mixed"), str(tmp_path / "mixed_out"), **QUIET)
    assert _read(tmp_path / "mixed_out")["customer_id"].dtype.kind == "i"
    rejects = _read(tmp_path / "mixed_out_rejects")
    assert "customer id 'A-17' is not an integer" in " ".join(rejects["reason"])
    assert result.counts["rejected"] == 1 + len([r for r in (*BAD_ROWS, 30) if r < 50])  # + the empty row 30
    # a header and no rows
    store["table"].head(0).to_csv(tmp_path / "header.csv", index=False)
    res = run_cli("predict", "--input", str(tmp_path / "header.csv"), "--output", str(tmp_path / "h_out"),
                  "--set", f"workspace={store['cfg'].workspace}", cwd=tmp_path, attach=True)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].endswith("header.csv: the table has no rows (a header only?): nothing to score")
    assert [p.name for p in tmp_path.iterdir() if "h_out" in p.name] == []


def test_no_champion_is_one_line_and_writes_nothing(store, tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(ChurnError, match="champion"):
        predict(cfg, str(store["csv"]), str(tmp_path / "out"), **QUIET)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_rejects").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_missing_column_is_refused_before_scoring(store, tmp_path):
    path = tmp_path / "no_age.csv"
    store["table"].drop(columns=["Age"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="missing column.*'Age'"):
        predict(store["cfg"], str(path), str(tmp_path / "out"), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_age.csv"]


def test_ray_job_entrypoint_scores_parquet(store):
    """`python -m ray_jobs.batch_predict`, what `ray job submit` runs, with --json for machines."""
    import subprocess
    import sys

    source = store["ws"] / "clean.parquet"
    store["table"].drop(index=[10, 20, 30]).astype({"Age": float}).to_parquet(source, index=False)
    out = store["ws"] / "job_scores"
    res = subprocess.run(
        [sys.executable, "-m", "ray_jobs.batch_predict", "--input", str(source), "--output", str(out), "--json",
         "--set", f"workspace={store['cfg'].workspace}"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
        env=cli_env(**session_ray_env()),
    )
    assert res.returncode == 0, res.stderr
    payload = json.loads(res.stdout.strip().splitlines()[-1])
    assert payload["counts"]["scored"] == 2997 and payload["rejects"] is None
    assert payload["model_version"] == str(store["version"])
    assert len(_read(out)) == 2997 and not Path(f"{out}_rejects").exists()


def test_predict_reads_and_writes_s3(store, s3_endpoint, monkeypatch):
    import boto3

    for key, value in {**S3_KEYS, "AWS_ENDPOINT_URL_S3": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="churn-batch")
    s3.upload_file(str(store["csv"]), "churn-batch", "in/score.csv")
    result = predict(store["cfg"], "s3://churn-batch/in/score.csv", "s3://churn-batch/out/scores", **QUIET)
    assert result.counts["scored"] == 2997 and result.counts["rejected"] == 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="churn-batch", Prefix="out/")["Contents"]}
    assert "out/scores/_SUCCESS" in keys and "out/scores_rejects/_SUCCESS" in keys
    assert any(k.startswith("out/scores/") and k.endswith(".parquet") for k in keys)
    with pytest.raises(DataError, match="already exists"):
        predict(store["cfg"], "s3://churn-batch/in/score.csv", "s3://churn-batch/out/scores", **QUIET)
    # the call list with a capacity, rewritten in place on S3 before it is marked complete
    calls = predict(make_config(store["ws"], **{"decision.capacity": 40}), "s3://churn-batch/in/score.csv",
                    "s3://churn-batch/out/calls", contacts_only=True, **QUIET)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="churn-batch", Prefix="out/calls/")["Contents"]
            if not o["Key"].endswith("/")}  # the folder's own marker
    assert keys == {"out/calls/call_list.parquet", "out/calls/_SUCCESS"} and calls.decision["contacts"] == 40
    body = s3.get_object(Bucket="churn-batch", Key="out/calls/call_list.parquet")["Body"].read()
    assert pd.read_parquet(io.BytesIO(body))["rank"].tolist() == list(range(1, 41))


# Drift ------------------------------------------------------------------------------------------


def test_profile_compared_with_its_own_data_is_stable_and_a_shift_is_not(store):
    spec = FeatureSpec.from_config(store["cfg"].features)
    from churnlib.data.features import encode_columns

    table = pd.read_parquet(store["ws"] / "score.parquet")
    X, _, _ = encode_columns(table, spec)
    profile = build_profile(X, spec)
    halves = [batch_counts(X[:1000], profile, spec), batch_counts(X[1000:], profile, spec)]
    same = compare(profile, merge_counts(halves))
    assert {d.verdict for d in same} == {"stable"}
    assert max(d.psi for d in same) < 1e-9 and max(d.ks for d in same) < 1e-9
    shifted = X.copy()
    age = spec.feature_names.index("Age")
    shifted[:, age] += 15  # everyone fifteen years older
    # 3% lose their tenure: PSI of the missing bin alone 0.03 * ln(0.03 / 1e-4) = 0.17
    shifted[: len(X) * 3 // 100, spec.feature_names.index("Tenure")] = np.nan
    by_name = {d.feature: d for d in compare(profile, batch_counts(shifted, profile, spec))}
    assert by_name["Age"].verdict == "major" and by_name["Age"].ks > 0.3
    assert by_name["Tenure"].verdict == "moderate" and by_name["Tenure"].missing_current == pytest.approx(0.03)
    assert by_name["Support Calls"].verdict == "stable"


@pytest.mark.unit
def test_drift_thresholds_must_be_ordered(tmp_path):
    from churnlib.errors import ConfigError

    with pytest.raises(ConfigError, match="psi_major .* must be above psi_moderate"):
        make_config(tmp_path, **{"drift.psi_moderate": 0.3, "drift.psi_major": 0.2})


def test_real_kaggle_training_and_test_files_are_reported_shifted(store):
    """SOURCE.md: the training slice has narrower ranges and no Monthly contracts."""
    from churnlib.batch.drift import drift_report

    train = require_shared(KAGGLE_TRAIN_PARTIAL)
    test = require_shared(KAGGLE_TEST)
    drifts = {d.feature: d for d in drift_report(store["cfg"], str(train), str(test), **QUIET)}
    for feature in ("Age", "Support Calls", "Payment Delay", "Total Spend", "Contract Length"):
        assert drifts[feature].verdict == "major", (feature, drifts[feature])
    for feature in ("Tenure", "Usage Frequency", "Subscription Type"):
        assert drifts[feature].verdict == "stable", (feature, drifts[feature])
    monthly = drifts["Contract Length"].detail
    assert monthly["reference_shares"][monthly["levels"].index("Monthly")] == 0.0
    assert monthly["current_shares"][monthly["levels"].index("Monthly")] > 0.15


def test_cli_drift_of_a_table_with_itself_is_stable(store):
    test = require_shared(KAGGLE_TEST)
    res = run_cli("drift", "--reference", str(test), "--data", str(test), "--json", "--set",
                  f"workspace={store['cfg'].workspace}", cwd=store["ws"], attach=True)
    assert res.returncode == 0, res.stderr
    features = json.loads(res.stdout.strip().splitlines()[-1])["features"]
    assert len(features) == 10 and {f["verdict"] for f in features} == {"stable"}
    assert "drift: all 10 features stable" in res.stderr


def test_cli_drift_against_the_champion_profile(store):
    res = run_cli("drift", "--reference", f"models:/{store['cfg'].model.registered_name}@champion",
                  "--data", str(store["csv"]), "--set", f"workspace={store['cfg'].workspace}", cwd=store["ws"], attach=True)
    assert res.returncode == 0, res.stderr
    assert "feature" in res.stdout and "verdict" in res.stdout
    assert "drift: all 10 features stable" in res.stderr


def test_only_a_scoring_task_still_running_is_cancelled(ray_session, monkeypatch):
    """A force-cancel of a task that had ended crashed the command's Ray core worker at exit now
    and then (CI, twice: "Check failed: ... Tried to complete task that was not pending", exit 1
    with a stack dump instead of the header-only table's one line; reproduced 1 in 12 by a
    driver that force-cancels a returned task). The refusal after the task returned cancels
    nothing; a task still running is stopped, and waited for."""
    import ray

    from churnlib.batch import predict as batch_predict

    cancelled = []
    real_cancel = ray.cancel
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: (cancelled.append(ref), real_cancel(ref, **kw))[1])

    ended = ray.remote(num_cpus=0)(lambda: {"rows": 0}).remote()
    assert ray.get(ended) == {"rows": 0}
    batch_predict._cancel(ended)
    assert cancelled == []

    running = ray.remote(num_cpus=0)(lambda: __import__("time").sleep(120)).remote()
    ray.wait([running], timeout=1)
    batch_predict._cancel(running)
    assert cancelled == [running]
    assert ray.wait([running], timeout=0)[0] == [running]  # it has ended
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(running)
