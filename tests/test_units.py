"""Unit tests of the shared pieces: one-line errors, tag names, ports, signals, HAProxy's
private set-up, the sweep record, a version's evaluation tags, drift arithmetic, ids.

No Ray, no server, no database: the `unit` tier (`python -m pytest -m unit`).
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


# One-line errors ---------------------------------------------------------------------------------

def test_one_line_collapses_whitespace_and_strips_colour():
    from churnlib.errors import one_line

    assert one_line(ValueError("a\n  b\t\x1b[31mc\x1b[0m")) == "a b c"
    assert one_line(ValueError("")) == "ValueError"
    assert len(one_line(ValueError("x" * 2000))) == 500


def test_first_last_and_telling_lines():
    from churnlib.errors import first_line, last_line, telling_line

    exc = RuntimeError("\n  Traceback (most recent call last):\n  boom\nValueError: the real one\n")
    assert first_line(exc) == "ValueError: the real one"  # a traceback's first line says nothing
    assert first_line(RuntimeError("worker died\nTraceback (most recent call last):\nx")) == "worker died"
    assert last_line(exc) == "ValueError: the real one"
    wrapped = RuntimeError("API request failed\n(Background on this error at: x)\nConnection refused by 1.2.3.4")
    assert telling_line(wrapped) == "Connection refused by 1.2.3.4"
    assert telling_line(RuntimeError("first\nsecond")) == "first"
    assert first_line(KeyError()) == "KeyError"


def test_root_cause_follows_the_chain_to_the_innermost_error():
    from churnlib.errors import root_cause

    try:
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError as inner:
            raise RuntimeError("worker failed\nTraceback...\n") from inner
    except RuntimeError as outer:
        assert root_cause(outer) == "ZeroDivisionError: division by zero"

    class Wrapped(Exception):  # Ray's errors carry the worker's error as .cause
        cause = OSError("disk full")

    assert root_cause(Wrapped("ray says")) == "OSError: disk full"


def test_every_error_is_one_line_with_its_exit_code():
    from churnlib import errors

    codes = {"ConfigError": 2, "DataError": 2, "FeatureError": 2, "ModelNotFoundError": 2, "NoSuchAliasError": 2,
             "RegistryError": 2, "ResourceError": 1, "TrainingError": 1, "TrackingError": 1, "ServeError": 1,
             "GateFailedError": 3, "PromotionRefusedError": 3}
    for name, code in codes.items():
        err = getattr(errors, name)("line one\nline two")
        assert isinstance(err, errors.ChurnError) and err.exit_code == code, name
        assert str(err) == "line one line two"


# Tags ------------------------------------------------------------------------------------------

def test_tag_names_are_unique_and_defined_only_in_tags():
    from churnlib import tags

    names = {k: v for k, v in vars(tags).items() if k.startswith("TAG_")}
    assert len(names) >= 30
    assert len(set(names.values())) == len(names)
    assert all(v.startswith(("churn.", "train.")) for v in names.values())
    for path in (REPO / "churnlib").rglob("*.py"):
        if path.name == "tags.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.startswith("TAG_")
                                                    for t in node.targets):
                raise AssertionError(f"{path}:{node.lineno} defines a tag name outside churnlib/tags.py")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"churn\.[a-z_]+(\.[a-z_]+)*", node.value):
                raise AssertionError(f"{path}:{node.lineno} spells the tag {node.value!r}: use churnlib.tags")


# Ports -----------------------------------------------------------------------------------------

def test_free_port_prefers_the_asked_one_and_falls_back():
    from churnlib.runtime import check_port_free, free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        other = free_port(busy)
        assert other != busy and other > 0
        from churnlib.errors import ResourceError

        with pytest.raises(ResourceError, match=f"port {busy} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", busy)
    assert free_port(busy) == busy  # free again
    check_port_free("127.0.0.1", busy)
    assert free_port(host="0.0.0.0") > 0


# Signals ---------------------------------------------------------------------------------------

def test_interrupted_exit_codes():
    from churnlib.interrupts import Interrupted

    assert Interrupted(signal.SIGINT).exit_code == 130
    assert Interrupted(signal.SIGTERM).exit_code == 143
    assert isinstance(Interrupted(), KeyboardInterrupt)


def test_run_in_thread_returns_and_raises():
    from churnlib.interrupts import run_in_thread

    assert run_in_thread(lambda a, b=0: a + b, 2, b=3) == 5

    def bad():
        raise ValueError("from the helper thread")

    with pytest.raises(ValueError, match="helper thread"):
        run_in_thread(bad)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_interrupts_work_in_the_helper_thread(signum, code):
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        from churnlib import interrupts
        interrupts.install()
        threading.Timer(0.5, os.kill, (os.getpid(), {int(signum)})).start()
        try:
            interrupts.run_in_thread(time.sleep, 30)
        except interrupts.Interrupted as exc:
            print("interrupted", exc.signum, flush=True)
            sys.exit(exc.exit_code)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr
    assert res.stdout.split() == ["interrupted", str(int(signum))]


def test_sigterm_asks_a_librarys_own_sigint_handler_first():
    script = textwrap.dedent("""
        import os, signal, time
        from churnlib import interrupts
        interrupts.install()
        seen = []
        signal.signal(signal.SIGINT, lambda s, f: seen.append(int(s)))  # e.g. Ray Tune's graceful stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print(seen, interrupts.received())
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[2]", str(int(signal.SIGTERM))]


# HAProxy, private to one server -------------------------------------------------------------------

def test_the_quick_exit_still_does_what_an_ordinary_exit_does_for_the_outside(tmp_path):
    """`churn` ends without the interpreter's teardown, but what others see of an exit is there:
    a non-daemon thread finishes, a ThreadPoolExecutor's queued work runs (its exit hook ends
    the workers; a plain join of its threads would wait for ever), atexit handlers run, the
    buffered stdout and stderr arrive, and the exit code is the command's."""
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from churnlib.cli import exit_without_teardown
        out = Path({str(tmp_path)!r})
        threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
        pool = ThreadPoolExecutor(2)
        pool.submit(lambda: (time.sleep(0.3), (out / "pool").write_text("done")))
        atexit.register(lambda: (out / "atexit").write_text(str((out / "thread").exists())))
        sys.stdout.write("result on stdout, no newline, not flushed")
        sys.stderr.write("a line on stderr")
        exit_without_teardown(3)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stdout == "result on stdout, no newline, not flushed"
    assert res.stderr == "a line on stderr"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "pool").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "True"  # after the threads, as at an ordinary exit


def test_churn_exits_with_mains_code_for_usage_errors_and_help():
    for args, code in ((["--help"], 0), (["train", "--no-such-flag"], 2), (["models", "list", "--set", "x"], 2)):
        res = subprocess.run([sys.executable, "-m", "churnlib", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == code, (args, res.stderr)
        assert (res.stdout if code == 0 else res.stderr).strip(), args

def test_haproxy_state_is_private_and_its_listeners_on_loopback(tmp_path, monkeypatch):
    from churnlib.serving import haproxy

    for var in [*haproxy.HAPROXY_STATE_ENV, "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_SERVE_HAPROXY_RETRY_ON",
                "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                *haproxy.HIGH_THROUGHPUT_ENV]:
        monkeypatch.delenv(var, raising=False)
    fake = tmp_path / "fake-haproxy"
    fake.write_text("#!/bin/sh\necho ran \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setattr(haproxy, "haproxy_binary", lambda: str(fake))
    state = haproxy.prepare_haproxy("0.0.0.0")
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(state / "admin.sock")
        assert os.environ["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response junk-response"
        stats, metrics = os.environ["RAY_SERVE_HAPROXY_STATS_PORT"], os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"listen stats\n    bind *:{stats}\nfrontend prometheus\n    bind :{metrics}\n"
                       "frontend http\n    bind 0.0.0.0:8000\n    option splice-request\n"
                       "global\n    stats socket /x/admin.sock mode 666 level admin\n")
        res = subprocess.run([os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"], "-f", str(cfg)], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0 and res.stdout.strip() == f"ran -f {cfg}"
        text = cfg.read_text()
        assert f"bind 127.0.0.1:{stats}" in text and f"bind 127.0.0.1:{metrics}" in text
        assert "bind 0.0.0.0:8000" in text  # the service listener is left as configured
        assert "mode 600 level admin" in text and "splice" not in text
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


# The sweep record -------------------------------------------------------------------------------

def test_sweep_state_merges_updates_and_resumes_with_todays_mlflow(tmp_path):
    from churnlib.config import load_config
    from churnlib.tune.state import (
        STATE_SUFFIX,
        read_state,
        resume_command,
        resumed_config,
        write_state,
    )

    path = str(tmp_path / "sweeps" / f"s1{STATE_SUFFIX}")
    assert read_state(path) == {}
    started = load_config(env={}, overrides=["xgboost.max_depth=4", "tune.num_samples=3"])
    write_state(path, {"data": "a.csv", "config": started.model_dump(mode="json")})
    write_state(path, {"sweep_s": 12.5})
    state = read_state(path)
    assert state["data"] == "a.csv" and state["sweep_s"] == 12.5
    now = load_config(env={}, overrides=[f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", "xgboost.max_depth=9"])
    cfg = resumed_config(now, state)
    assert cfg.xgboost.max_depth == 4 and cfg.tune.num_samples == 3  # the sweep's own settings
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/m.db"  # where MLflow is today
    assert resumed_config(now, {}) is now
    other = load_config(env={}, overrides=[f"workspace={tmp_path}/ws"])
    assert resume_command(other, "my sweep") == f"churn tune --resume 'my sweep' --set workspace={tmp_path}/ws"




def test_sweep_state_is_never_read_half_written_nor_loses_a_threads_update(tmp_path):
    """The trials' MLflow writer thread records trial -> run while Tune's loop reads the record at
    the next trial's start (issue: the loop read an empty file, JSONDecodeError, the sweep failed)."""
    import threading

    from churnlib.tune.state import read_state, write_state

    path = str(tmp_path / "s.churn_sweep.json")
    write_state(path, {"config": {"k": "v" * 200_000}})  # big enough that a write takes a while
    stop, bad = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            try:
                read_state(path)
            except ValueError as exc:  # JSONDecodeError
                bad.append(exc)

    def writer(key: str) -> None:
        for i in range(40):
            write_state(path, {key: i})

    threads = [threading.Thread(target=reader), threading.Thread(target=writer, args=("a",)),
               threading.Thread(target=writer, args=("b",))]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert bad == []
    state = read_state(path)
    assert state["a"] == 39 and state["b"] == 39 and len(state["config"]["k"]) == 200_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.churn_sweep.json"]  # no staging file left
# A version's copy of its evaluation -----------------------------------------------------------------

def test_version_tags_carry_the_gate_its_source_and_the_headline_metrics():
    """A version keeps what a person reads in the versions table; each check's detail, the
    baseline and the verdict stay on the evaluation run (issue: ~28 tags per version)."""
    from churnlib.evaluate.record import version_tags
    from churnlib.tags import (
        TAG_BASELINE_VERSION,
        TAG_EVAL_RUN,
        TAG_GATE_SOURCE,
        TAG_GATE_STATUS,
        TAG_GATE_SUMMARY,
        TAG_VERDICT,
    )

    run_tags = {TAG_GATE_STATUS: "passed", TAG_GATE_SUMMARY: "roc_auc: passed (0.95 >= 0.7)",
                "churn.gate.roc_auc": "passed: 0.95 >= 0.7", "data.source": "t.csv",
                "data.digest": "abc", TAG_BASELINE_VERSION: "3", TAG_VERDICT: "better", "other": "x"}
    tags = version_tags(run_tags, {"roc_auc": 0.951234567, "log_loss": 0.2, "accuracy": 0.9, "brier": 0.1,
                                   "expected_value_per_customer": 12.3456789}, "r1")
    assert tags[TAG_GATE_STATUS] == "passed" and tags[TAG_GATE_SUMMARY].startswith("roc_auc: passed")
    assert tags[TAG_EVAL_RUN] == "r1"
    assert tags[TAG_GATE_SOURCE] == "evaluation run r1 on t.csv (digest abc)"
    assert tags["churn.eval.roc_auc"] == "0.951235" and tags["churn.eval.log_loss"] == "0.2"
    assert tags["churn.eval.expected_value_per_customer"] == "12.3457"
    assert set(tags) == {TAG_GATE_STATUS, TAG_GATE_SUMMARY, TAG_EVAL_RUN, TAG_GATE_SOURCE, "churn.eval.roc_auc",
                         "churn.eval.log_loss", "churn.eval.expected_value_per_customer"}


# Drift arithmetic --------------------------------------------------------------------------------

def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    from churnlib.data.profiles import psi, verdict

    e = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(e, e) == 0.0
    small, big = psi(e, [0.3, 0.2, 0.25, 0.25]), psi(e, [0.7, 0.1, 0.1, 0.1])
    assert 0 < small < 0.1 < 0.25 < big
    assert [verdict(v, 0.1, 0.25) for v in (0.05, 0.1, 0.2, 0.25, 3)] == ["stable", "moderate", "moderate", "major",
                                                                           "major"]
    assert np.isfinite(psi(e, [1.0, 0, 0, 0]))  # empty bins are floored, never infinite


def test_profile_counts_merge_and_compare():
    from churnlib.config import load_config
    from churnlib.data.features import FeatureSpec, to_matrix
    from churnlib.data.generation import iter_chunks
    from churnlib.data.profiles import (
        batch_counts,
        build_profile,
        compare,
        merge_counts,
    )

    spec = FeatureSpec.from_config(load_config(env={}).features)
    raw = next(iter_chunks(4000, seed=5, chunk_rows=4000))
    X = to_matrix(raw, spec)
    profile = build_profile(X, spec)
    same = compare(profile, merge_counts([batch_counts(X[:1500], profile, spec), batch_counts(X[1500:], profile, spec)]))
    assert {d.verdict for d in same} == {"stable"} and max(d.psi for d in same) < 1e-9
    shifted = raw.copy()
    shifted["Age"] = shifted["Age"] + 30
    drift = {d.feature: d for d in compare(profile, batch_counts(to_matrix(shifted, spec), profile, spec))}
    assert drift["Age"].verdict == "major" and drift["Age"].ks > 0.5
    assert drift["Tenure"].verdict == "stable"


# Ids: one customer, one hash, whatever the column's type ----------------------------------------------

@pytest.mark.parametrize("ids", [
    pd.Series([17, 18, None], dtype="Int64"),
    pd.Series([17, 18, None], dtype="int64[pyarrow]"),
    pd.Series([17.0, 18.0, np.nan]),
])
def test_integer_ids_hash_alike_in_every_dtype(ids):
    from churnlib.data.preparation import canonical_ids, id_text

    assert canonical_ids(ids).tolist() == [17, 18, 0]
    assert id_text(ids).tolist() == ["17", "18", ""]
    assert canonical_ids(pd.Series([17, 18, 5])).tolist() == [17, 18, 5]


def test_text_ids_stay_text():
    from churnlib.data.preparation import canonical_ids, id_text

    assert canonical_ids(pd.Series(["a-1", None])).tolist() == ["a-1", ""]
    assert id_text(pd.Series([1.5, np.nan])).tolist() == ["1.5", ""]


# Figures ---------------------------------------------------------------------------------------------

def test_figures_use_agg_whatever_the_callers_backend():
    script = ("import matplotlib; matplotlib.use('svg'); from churnlib.figures import pyplot; "
              "plt = pyplot(); print(plt.get_backend())")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip().lower() == "agg", res.stderr


def test_model_file_names_live_in_one_place():
    from churnlib.model import files

    assert files.BOOSTER_FILE == "booster.ubj" and files.SPEC_FILE == "feature_spec.json"
    assert files.PROFILE_FILE == "data_profile.json"
    for path in (REPO / "churnlib").rglob("*.py"):
        if path != REPO / "churnlib" / "model" / "files.py":
            assert not re.search(r'^\w+_FILE = "(booster\.ubj|feature_spec\.json|data_profile\.json)"',
                                 path.read_text(), re.M), path


def test_old_model_paths_still_find_the_wrapper():
    script = ("import churnlib.pyfunc as a, churnlib.model as b, churnlib.model.pyfunc as c; "
              "print(a.ChurnModel is b.ChurnModel is c.ChurnModel)")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr



# The model's signature ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_signature_types_numeric_inputs_as_the_training_table_had_them(tmp_path, fmt):
    """Integers with no hole: long; floats, or integers with a hole anywhere in the table (the
    validation report's count): double; categories: string (was `any` for every number)."""
    from churnlib.data.features import FeatureSpec
    from churnlib.data.sources import resolve_source
    from churnlib.model.packaging import input_example, numeric_types, signature_for

    spec = FeatureSpec(numeric=("age", "spend", "calls", "later"), categorical=(("plan", ("a", "b")),), target="y")
    df = pd.DataFrame({"age": [30, 41, 52], "spend": [1.5, 2.0, 3.25], "calls": [1, 2, 3], "later": [4, 5, 6],
                       "plan": ["a", "b", "a"], "y": [0, 1, 0]})
    if fmt == "csv":
        df = df.astype({"calls": object})
        df.loc[1, "calls"] = " "  # Telco's blank: a missing value
        df.to_csv(path := tmp_path / "t.csv", index=False)
    else:
        df.loc[1, "calls"] = None  # a nullable integer column in Parquet
        df.astype({"calls": "Int64"}).to_parquet(path := tmp_path / "t.parquet", index=False)
    source = resolve_source(str(path))
    # "later": integers in the first file, but the report counted holes further on
    types = numeric_types(source, spec, missing={"calls": 1, "later": 2})
    assert types == {"age": "long", "spend": "double", "calls": "double", "later": "double"}
    assert numeric_types(source, spec, missing={"calls": 1})["later"] == "long"
    sig = {c["name"]: c["type"] for c in signature_for(spec, types).inputs.to_dict()}
    assert sig == {"age": "long", "spend": "double", "calls": "double", "later": "double", "plan": "string"}
    example = input_example(pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path), spec, types)
    assert str(example["age"].dtype) == "int64" and str(example["spend"].dtype) == "float64"
    assert example["calls"].isna().sum() == 1 and example["plan"].dtype == object


def test_haproxys_ports_come_from_a_range_nobody_is_handed_by_the_kernel():
    """HAProxy's stats and metrics ports are chosen before the Ray instance starts and bound
    after: from 20000-32767 minus the kernel's ephemeral range (what a bind on port 0 gets, as
    Ray's processes do) and above Ray's worker ports, free when chosen."""
    import socket

    from churnlib.runtime import RESERVED_RANGE, _ephemeral_range, free_reserved_port

    low, high = _ephemeral_range()
    ports = {free_reserved_port() for _ in range(20)}
    for port in ports:
        assert RESERVED_RANGE[0] <= port <= RESERVED_RANGE[1] and not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert len(ports) > 1  # random, so two servers starting at once rarely pick the same
