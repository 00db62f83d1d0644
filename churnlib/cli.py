"""The ``churn`` command: thin shells over the library.

Human output goes to stderr; ``--json`` prints one JSON object on stdout.
Errors a user can cause end in ``error: <one line>`` and the error's exit code
(2 for usage, config and input errors; 1 for runtime failures).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn, Sequence

from churnlib import interrupts

# The commands' modules are imported when their command runs, not here: they pull in
# pandas, numpy and pyarrow (0.6 s), and `churn --help` or a bad flag should answer at once.
# This is the one place project modules are imported inside functions (tests/test_layout.py).
from churnlib.config import config_to_yaml, load_config
from churnlib.console import say
from churnlib.errors import (
    ChurnError,
    ConfigError,
    GateFailedError,
    MonitorAlert,
    RegistryError,
    last_line,
    one_line,
    telling_line,
)
from churnlib.runtime import auth_token_hint, ensure_ray, quiet_logs, release_ray


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}\n")


# An example for every command: shown under its --help.
EXAMPLES = {
    "": "examples:\n  churn quickstart                      # the whole lifecycle on generated data\n"
        "  churn train --data customers.csv && churn models list\n  churn <command> --help                # each command, with examples",
    "data generate": "churn data generate --rows 100000 --out customers.parquet --seed 7",
    "data validate": "churn data validate customers.csv\nchurn data validate to_score.csv --no-target --json",
    "train": "churn train --data customers.csv --run-name first\nchurn train --set ray.num_workers=4 --set ray.use_gpu=true\n"
             "churn train --resume-from <the checkpoint folder an interrupted run printed>",
    "tune": "churn tune --data customers.csv --num-samples 16 --register-best\nchurn tune --resume churn-tune-20261201-101500",
    "evaluate": "churn evaluate --model-uri models:/xgboost_churn_model@staging --data test.csv \\\n"
                "    --compare-baseline models:/xgboost_churn_model@champion --gate",
    "models register": "churn models register --run-id <run id> --alias staging",
    "models set-alias": "churn models set-alias --version 3 --alias challenger",
    "models delete-alias": "churn models delete-alias --alias challenger",
    "models promote": "churn models promote                 # staging -> champion, if its evaluation allows it\n"
                      "churn models promote --version 4 --force",
    "models rollback": "churn models rollback                # champion -> the version it replaced",
    "models list": "churn models list\nchurn models list --json",
    "models info": "churn models info --alias staging",
    "models decide": "churn models decide --set decision.contact_cost=100     # the champion, break-even P\n"
                     "churn models decide --version 3 --data outcomes.csv --config telco.yaml",
    "outcomes load": "churn outcomes load --data outcomes_2026-11.csv   # CustomerID, Churn, observed_at",
    "monitor": "churn monitor --since 2026-11-01 --window 1d\nchurn monitor --since 24h --window 1h --json",
    "rollout start": "churn rollout start --mode shadow --version 4      # scores beside the champion, answers nothing\n"
                     "churn rollout start --mode canary --share 0.1     # answers 10 % of the customers",
    "rollout status": "churn rollout status\nchurn rollout status --json",
    "rollout promote": "churn rollout promote           # champion -> the challenger, if the live criteria hold",
    "rollout abort": "churn rollout abort",
    "predict": "churn predict --input s3://bucket/customers/ --output s3://bucket/scores/2026-12-01/ --explain\n"
               "churn predict --input customers.csv --output calls/ --contacts-only --explain --set decision.capacity=500",
    "drift": "churn drift --reference models:/xgboost_churn_model@champion --data this_month.csv",
    "quickstart": "churn quickstart --rows 50000 --port 8001",
    "serve": "churn serve --port 8000 --replicas 2\nCHURN_API_KEY=... churn serve --alias challenger --port 8001",
    "config": "churn config --set xgboost.max_depth=8\nchurn config --config configs/telco.yaml",
    "up": "churn up && churn train && churn tune    # one Ray instance for both, started once\nchurn up --num-cpus 4",
    "down": "churn down",
    "status": "churn status --json",
}


def _describe(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every subcommand a description (its help line) and its examples (under --help)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                key = f"{path} {name}".strip()
                sub.description = sub.description or (helps.get(name) or "").capitalize() or None
                if key in EXAMPLES:
                    sub.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[key].splitlines())
                    sub.formatter_class = argparse.RawDescriptionHelpFormatter
                _describe(sub, key)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("churn-prediction")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML merged over the default (repeatable)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override one key, e.g. xgboost.max_depth=8")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--verbose", action="store_true", help="show Ray's logs and full tracebacks")


def build_parser() -> argparse.ArgumentParser:
    """The `churn` argument parser: every subcommand with its help and examples."""
    parser = _Parser(prog="churn", description="Churn prediction on Ray and MLflow: from a customer table to a served, "
                     "monitored model.", epilog=EXAMPLES[""], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"churn {_version()}",
                        help="print the version of churn and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p_data = sub.add_parser("data", help="generate or validate a churn table")
    data_sub = p_data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    p_gen = data_sub.add_parser("generate", help="write a deterministic synthetic churn table")
    p_gen.add_argument("--rows", type=int, required=True, help="how many customers (rows) to write")
    p_gen.add_argument("--out", required=True, help="output .csv or .parquet")
    p_gen.add_argument("--seed", type=int, default=7, help="random seed: the same seed writes the same table (default: 7)")
    _common(p_gen, config=False)
    p_gen.set_defaults(func=cmd_data_generate)

    p_val = data_sub.add_parser("validate", help="check a table against the configured schema")
    p_val.add_argument("path", help="CSV or Parquet file or folder, local or s3://")
    p_val.add_argument("--no-target", action="store_true", help="the table has no target column (scoring input)")
    _common(p_val)
    p_val.set_defaults(func=cmd_data_validate)

    p_train = sub.add_parser("train", help="train XGBoost on Ray Train and log it to MLflow")
    p_train.add_argument("--data", help="CSV or Parquet file or folder, local or s3:// (default: generated)")
    p_train.add_argument("--run-name", help="MLflow run name (default: one MLflow makes up)")
    p_train.add_argument("--resume-from", metavar="CHECKPOINT",
                         help="continue the training of an earlier run from its checkpoint folder (training.resume_from)")
    _common(p_train)
    p_train.set_defaults(func=cmd_train)

    p_tune = sub.add_parser("tune", help="a Ray Tune sweep over the trainer, every trial in MLflow")
    add_tune_arguments(p_tune)
    p_tune.set_defaults(func=cmd_tune)

    p_eval = sub.add_parser("evaluate", help="metrics, SHAP, baseline comparison and deployment gates for a model")
    add_evaluate_arguments(p_eval)
    p_eval.set_defaults(func=cmd_evaluate)

    p_models = sub.add_parser("models", help="the model registry: register, aliases, promote, rollback, list, info, "
                                             "decide")
    m_sub = p_models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    p_reg = m_sub.add_parser("register", help="a registry version from a training run's model (idempotent)")
    p_reg.add_argument("--run-id", required=True, help="the MLflow run of `churn train` (or of a tune trial) whose model to register")
    p_reg.add_argument("--alias", help="also point this alias at the version, e.g. staging")
    p_reg.add_argument("--description", help="free text stored on the version")
    _common(p_reg)
    p_reg.set_defaults(func=cmd_models_register)
    p_set = m_sub.add_parser("set-alias", help="point an alias at a version")
    p_set.add_argument("--version", required=True, help="the registry version number")
    p_set.add_argument("--alias", required=True, help="e.g. staging, challenger (champion and previous move with promote and rollback)")
    _common(p_set)
    p_set.set_defaults(func=cmd_models_set_alias)
    p_del = m_sub.add_parser("delete-alias", help="remove an alias")
    p_del.add_argument("--alias", required=True, help="the alias to remove")
    _common(p_del)
    p_del.set_defaults(func=cmd_models_delete_alias)
    p_pro = m_sub.add_parser("promote", help="champion -> this version (default: staging) if its latest evaluation passed")
    p_pro.add_argument("--version", help="the version to promote (default: the one at staging)")
    p_pro.add_argument("--force", action="store_true",
                       help="promote despite a refusal (no evaluation, a failed gate, no comparison with the champion, "
                            "worse than it); the reasons are recorded on the version")
    _common(p_pro)
    p_pro.set_defaults(func=cmd_models_promote)
    p_rb = m_sub.add_parser("rollback", help="champion -> previous")
    p_rb.add_argument("--force", action="store_true", help="roll back even to a version whose latest evaluation failed")
    _common(p_rb)
    p_rb.set_defaults(func=cmd_models_rollback)
    p_list = m_sub.add_parser("list", help="versions with aliases, source run, AUC and gate status")
    _common(p_list)
    p_list.set_defaults(func=cmd_models_list)
    p_info = m_sub.add_parser("info", help="one version in full (default: champion)")
    which = p_info.add_mutually_exclusive_group()
    which.add_argument("--version", help="a version number")
    which.add_argument("--alias", help="an alias, e.g. staging")
    _common(p_info)
    p_info.set_defaults(func=cmd_models_info)
    p_dec = m_sub.add_parser("decide", help="re-derive a version's contact threshold for the config's decision costs "
                                            "and record it on the version (no retraining; Serve picks it up)")
    p_dec.add_argument("--version", help="the version (default: the champion)")
    p_dec.add_argument("--data", help="a labelled table: the cut worth most on it (default: the break-even P of the "
                                      "costs, right for a calibrated model)")
    _common(p_dec)
    p_dec.set_defaults(func=cmd_models_decide)

    p_out = sub.add_parser("outcomes", help="what became of the customers: load outcomes into the prediction log")
    o_sub = p_out.add_subparsers(dest="outcomes_command", required=True, parser_class=_Parser)
    p_oload = o_sub.add_parser("load", help="load a file of customer id, outcome and observed_at (idempotent; bad "
                                            "rows rejected with reasons)")
    p_oload.add_argument("--data", required=True, help="CSV or Parquet file or folder (local or s3://)")
    _common(p_oload)
    p_oload.set_defaults(func=cmd_outcomes_load)

    p_mon = sub.add_parser("monitor", help="per version and window: volume, scores, live drift, realized and estimated "
                                           "performance, alerts (exit 4)")
    p_mon.add_argument("--since", help="from (ISO date or time, UTC; or a span back from now: 7d, 12h); default 7d "
                                       "before --until")
    p_mon.add_argument("--until", help="to (ISO date or time, UTC; or a span back from now); default now")
    p_mon.add_argument("--window", help="window length (1d, 12h, 7d); default monitoring.window")
    p_mon.add_argument("--no-record", action="store_true", help="print the report only (no MLflow monitoring run)")
    _common(p_mon)
    p_mon.set_defaults(func=cmd_monitor)

    p_roll = sub.add_parser("rollout", help="champion and challenger on live traffic: shadow, canary, a promotion "
                                            "decided by live evidence")
    r_sub = p_roll.add_subparsers(dest="rollout_command", required=True, parser_class=_Parser)
    p_rstart = r_sub.add_parser("start", help="a challenger beside the champion in Serve (or change the running "
                                              "rollout's mode or share)")
    p_rstart.add_argument("--mode", choices=["shadow", "canary"], help="default: rollout.mode")
    p_rstart.add_argument("--share", type=float, help="canary: the share of customers it answers (default: "
                                                      "rollout.share)")
    p_rstart.add_argument("--version", help="the challenger (default: the running rollout's, else staging)")
    p_rstart.add_argument("--force", action="store_true", help="a canary of a version whose evaluation failed its gates")
    _common(p_rstart)
    p_rstart.set_defaults(func=cmd_rollout_start)
    p_rstat = r_sub.add_parser("status", help="the two compared from the prediction log, and the criteria's verdict")
    p_rstat.add_argument("--no-record", action="store_true", help="print only (no metrics in the rollout's MLflow run)")
    _common(p_rstat)
    p_rstat.set_defaults(func=cmd_rollout_status)
    p_rpro = r_sub.add_parser("promote", help="champion -> the challenger when the live criteria hold (else exit 3)")
    p_rpro.add_argument("--force", action="store_true", help="promote although the criteria do not hold (recorded)")
    _common(p_rpro)
    p_rpro.set_defaults(func=cmd_rollout_promote)
    p_rab = r_sub.add_parser("abort", help="end the rollout: Serve drops the challenger within one poll")
    _common(p_rab)
    p_rab.set_defaults(func=cmd_rollout_abort)

    p_pred = sub.add_parser("predict", help="score a table with the champion (Ray Data), with rejects and a drift report")
    add_predict_arguments(p_pred)
    p_pred.set_defaults(func=cmd_predict)

    p_drift = sub.add_parser("drift", help="compare a table with a model's training profile (or another table)")
    p_drift.add_argument("--reference", required=True, help="a model URI (its training profile) or a CSV/Parquet table")
    p_drift.add_argument("--data", required=True, help="the table to compare: CSV or Parquet, local or s3://")
    _common(p_drift)
    p_drift.set_defaults(func=cmd_drift)

    p_quick = sub.add_parser("quickstart", help="the whole lifecycle on the embedded default, step by step")
    p_quick.add_argument("--rows", type=int, help="training rows to generate (default: data.generate_rows)")
    p_quick.add_argument("--port", type=int, help="Serve port (default: serve.port, or a free one)")
    _common(p_quick)
    p_quick.set_defaults(func=cmd_quickstart)

    p_serve = sub.add_parser("serve", help="serve the champion over HTTP with Ray Serve (blocks until Ctrl-C)")
    p_serve.add_argument("--port", type=int, help="HTTP port (default: serve.port, 8000)")
    p_serve.add_argument("--alias", help="alias to serve and follow (default: serve.alias, champion)")
    p_serve.add_argument("--replicas", type=int, help="replicas (default: serve.replicas)")
    p_serve.add_argument("--model-uri", help="serve this one model instead of following an alias")
    _common(p_serve)
    p_serve.set_defaults(func=cmd_serve)

    p_up = sub.add_parser("up", help="start the workspace's Ray instance: later commands attach to it (no start-up each)")
    p_up.add_argument("--num-cpus", type=float, help="CPUs the instance offers (default: what Ray detects)")
    p_up.add_argument("--num-gpus", type=float, help="GPUs the instance offers (default: what Ray detects)")
    _common(p_up)
    p_up.set_defaults(func=cmd_up)
    p_down = sub.add_parser("down", help="stop the workspace's Ray instance (only that one)")
    _common(p_down)
    p_down.set_defaults(func=cmd_down)
    p_status = sub.add_parser("status", help="whether the workspace's Ray instance is up, and where")
    _common(p_status)
    p_status.set_defaults(func=cmd_status)

    p_cfg = sub.add_parser("config", help="print the resolved configuration")
    _common(p_cfg)
    p_cfg.set_defaults(func=cmd_config)
    _describe(parser)
    return parser


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `churn predict` (shared with `python -m ray_jobs.batch_predict`)."""
    p.add_argument("--input", required=True, help="CSV or Parquet file or folder, local or s3://")
    p.add_argument("--output", required=True, help="Parquet folder to create (local or s3://); must not exist")
    p.add_argument("--model-uri", help="default: models:/<model.registered_name>@<serve.alias> (the champion)")
    p.add_argument("--rejects", help="folder for rows that cannot be scored (default: <output>_rejects)")
    p.add_argument("--explain", action="store_true", help="add the top reasons per customer (SHAP)")
    p.add_argument("--contacts-only", action="store_true",
                   help="write the call list alone: the customers to contact (decision), ranked by expected value")
    _common(p)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `churn tune` (shared with `python -m ray_jobs.tune`)."""
    p.add_argument("--data", help="CSV or Parquet file or folder, local or s3:// (default: generated)")
    p.add_argument("--num-samples", type=int, help="trials (default: tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--register-best", action="store_true", help="log the best trial's model and register it at staging")
    p.add_argument("--resume", metavar="NAME", help="resume the interrupted sweep NAME (its folder under training.storage_path) "
                   "with the data, configuration and flags it started with")
    p.add_argument("--force", action="store_true", help="with --resume: carry on even if the data changed")
    _common(p)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `churn evaluate` (shared with `python -m ray_jobs.evaluate`)."""
    p.add_argument("--model-uri", required=True, help="runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    p.add_argument("--data", required=True, help="test table with the target column: CSV or Parquet, local or s3://")
    p.add_argument("--compare-baseline", metavar="URI", help="score this model on the same rows too, e.g. models:/xgboost_churn_model@champion")
    p.add_argument("--gate", action="store_true", help="exit 3 when a gate fails (after logging everything)")
    p.add_argument("--run-name", help="MLflow run name (default: evaluate-<first 8 characters of the training run>)")
    _common(p)


def _load(args: argparse.Namespace):
    return load_config(args.config, args.sets)


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(payload, default=str), flush=True)
    else:
        human()


def cmd_data_generate(args: argparse.Namespace) -> int:
    """`churn data generate`: write a deterministic synthetic table."""
    from churnlib.data.generation import generate

    path = generate(args.rows, args.out, seed=args.seed)
    _emit(args, {"path": str(path), "rows": args.rows, "seed": args.seed}, lambda: say(f"wrote {args.rows} rows to {path}"))
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    """`churn data validate`: count every problem per column; exit 2 when the table cannot be used."""
    from churnlib.data.features import FeatureSpec
    from churnlib.data.preparation import reads_locally
    from churnlib.data.sources import check_columns, resolve_source
    from churnlib.data.validation import validate

    cfg = _load(args)
    spec = FeatureSpec.from_config(cfg.features)
    source = resolve_source(args.path)
    columns = check_columns(source, spec, need_target=not args.no_target)
    # a small table (what `churn train` and `churn evaluate` read in their own process) is counted
    # here: starting Ray and a Ray Data pass cost more than the counting; scoring.engine: ray_data
    # sends it to Ray Data as it sends evaluate's scoring
    local = reads_locally(source, cfg.scoring.engine)
    if not local:
        ensure_ray(cfg.ray, verbose=args.verbose, workspace=cfg.workspace_path)
    report = validate(source, spec, columns, with_target=not args.no_target, local=local)
    payload = {"path": source.uri, "format": source.format, "files": len(source.files), "digest": source.digest, "valid": True, **report.to_dict()}

    def human() -> None:
        missing = {c: n for c, n in report.missing.items() if n}
        say(f"{source.uri}: valid ({source.format}, {len(source.files)} file(s), digest {source.digest})")
        say(f"  rows {report.rows}, empty rows (dropped at training) {report.empty_rows}, usable {report.usable_rows}")
        if not args.no_target:
            say(f"  churn {report.positives}, no churn {report.negatives} (rate {report.positives / max(report.usable_rows, 1):.3f})")
        say("  missing values: " + (", ".join(f"{c} {n}" for c, n in missing.items()) if missing else "none"))

    _emit(args, payload, human)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`churn train`: train on Ray Train and log the run and the model to MLflow."""
    from churnlib.train import warm

    sets = args.sets + ([f"training.resume_from={args.resume_from}"] if args.resume_from else [])
    cfg = load_config(args.config, sets)
    result = None
    if warm.eligible(cfg) is not None:  # `churn up`'s instance: its warm trainer boosts a small table
        result = warm.train(cfg, data_path=args.data, run_name=args.run_name, verbose=args.verbose, say=say)
    if result is None:
        from churnlib.train.command import train

        result = train(cfg, data_path=args.data, run_name=args.run_name, verbose=args.verbose, say=say)

    def human() -> None:
        m = result.metrics
        say(
            f"done: best iteration {result.best_iteration + 1} of {result.num_boosted_rounds}, "
            f"{result.rows['train']} train / {result.rows['valid']} validation rows, {result.timings['total_s']:.1f} s"
        )
        say(f"  model: {result.model_uri}")
        # The two lines a user (or a script) looks for, on stdout.
        print(f"run_id: {result.run_id}")
        print(f"validation_auc: {m.get('best_valid_auc', float('nan')):.4f}")

    _emit(args, result.to_dict(), human)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """`churn tune`: a Ray Tune sweep, every trial an MLflow child run."""
    from churnlib.tune.command import tune

    cfg = _load(args)
    for flag in ("num_samples", "max_concurrent"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    result = tune(cfg, data_path=args.data, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                  register_best=args.register_best, resume=args.resume, force=args.force, verbose=args.verbose,
                  say=say)

    def human() -> None:
        print(f"sweep: {result.sweep}")
        print(f"parent_run_id: {result.parent_run_id}")
        print(f"best_trial_run_id: {result.best['run_id']}")
        print(f"{result.metric}: {result.best['score']:.4f}")
        if result.registered_version:
            print(f"registered_version: {result.registered_version}")

    _emit(args, result.to_dict(), human)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`churn predict`: score a table with a model (the champion by default), with rejects and drift."""
    from churnlib.batch.predict import predict

    cfg = _load(args)
    result = predict(cfg, args.input, args.output, model_uri=args.model_uri, explain=args.explain,
                     rejects_path=args.rejects, verbose=args.verbose, say=say, contacts_only=args.contacts_only)

    def human() -> None:
        print(f"output: {result.output}" + (" (the call list)" if args.contacts_only else ""))
        print(f"scored: {result.counts['scored']}")
        print(f"rejected: {result.counts['rejected']}")
        if result.decision is not None:
            print(f"contacts: {result.decision['contacts']}")
        if result.rejects:
            print(f"rejects: {result.rejects}")

    _emit(args, result.to_dict(), human)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    """`churn drift`: how far a table has moved from a model's (or another table's) profile."""
    from churnlib.batch.drift import drift_report

    cfg = _load(args)
    drifts = drift_report(cfg, args.reference, args.data, verbose=args.verbose, say=say)

    def human() -> None:
        print(f"{'feature':20s} {'PSI':>7s} {'KS':>7s}  verdict")
        for d in sorted(drifts, key=lambda d: -d.psi):
            print(f"{d.feature:20s} {d.psi:7.3f} {d.ks:7.3f}  {d.verdict}")

    _emit(args, {"features": [d.to_dict() for d in drifts]}, human)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """`churn quickstart`: the whole lifecycle on generated data, one line per step."""
    from churnlib.quickstart import quickstart

    cfg = _load(args)
    quickstart(cfg, rows=args.rows, port=args.port, verbose=args.verbose, config_path=args.config, sets=args.sets)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`churn evaluate`: metrics, SHAP, comparison and gates; exit 3 when a gate fails."""
    from churnlib.evaluate.command import evaluate

    cfg = _load(args)
    result = evaluate(
        cfg, args.model_uri, args.data, baseline_uri=args.compare_baseline, run_name=args.run_name,
        verbose=args.verbose, say=say,
    )

    def human() -> None:
        m = result.metrics
        print(f"eval_run_id: {result.run_id}")
        for key in ("roc_auc", "pr_auc", "log_loss", "brier_score", "accuracy", "precision", "recall", "f1"):
            print(f"{key}: {m[key]:.4f}")
        if result.comparison is not None:
            print(f"comparison: {result.comparison.verdict}")
        print(f"gate: {result.gate.status}")

    _emit(args, result.to_dict(), human)
    if args.gate and not result.gate.passed:
        failed = "; ".join(c.line() for c in result.gate.failures)
        raise GateFailedError(f"gate failed: {failed} (evaluation run {result.run_id})")
    return 0


def _registry(args: argparse.Namespace):
    from churnlib.registry.registry import Registry

    quiet_logs(args.verbose)
    return Registry(_load(args), say=say)


def cmd_models_register(args: argparse.Namespace) -> int:
    """`churn models register`: a run's model as a new registry version (alias staging)."""
    reg = _registry(args)
    info, created = reg.register(args.run_id, alias=args.alias, description=args.description)

    def human() -> None:
        what = "registered" if created else "already registered as"
        say(f"{what} {reg.name} version {info.version} from run {args.run_id}"
            + (f", alias {args.alias}" if args.alias else ""))
        print(f"version: {info.version}")

    _emit(args, {**info.to_dict(), "created": created}, human)
    return 0


def cmd_models_set_alias(args: argparse.Namespace) -> int:
    """`churn models set-alias`: point an alias at a version."""
    reg = _registry(args)
    info = reg.set_alias(args.version, args.alias)
    _emit(args, info.to_dict(), lambda: say(f"{reg.name}@{args.alias} -> version {info.version}"))
    return 0


def cmd_models_delete_alias(args: argparse.Namespace) -> int:
    """`churn models delete-alias`: remove an alias."""
    reg = _registry(args)
    version = reg.delete_alias(args.alias)
    _emit(args, {"alias": args.alias, "was": version},
          lambda: say(f"deleted {reg.name}@{args.alias} (was version {version})"))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    """`churn models promote`: staging (or a version) to champion when its evaluation allows it."""
    reg = _registry(args)
    result = reg.promote(args.version, force=args.force)

    def human() -> None:
        if result["changed"]:
            prev = f"; previous -> version {result['previous']}" if result["previous"] else ""
            say(f"promoted {reg.name} version {result['version']} to champion{prev}")
        print(f"champion: {result['version']}")

    _emit(args, result, human)
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    """`churn models rollback`: champion back to the version it replaced."""
    reg = _registry(args)
    result = reg.rollback(force=args.force)

    def human() -> None:
        say(f"rolled back {reg.name}: champion -> version {result['champion']} (version {result['demoted']} demoted)")
        print(f"champion: {result['champion']}")

    _emit(args, result, human)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """`churn models list`: every version with its aliases, gate status and headline metrics."""
    reg = _registry(args)
    versions = reg.versions()

    def human() -> None:
        if not versions:
            say(f"{reg.name}: no versions registered")
            return
        rows = [("version", "aliases", "created (UTC)", "source run", "AUC", "gate")]
        for v in versions:
            auc, kind = v.auc
            rows.append((v.version, ",".join(v.aliases) or "-", v.created, (v.run_id or "-")[:12],
                         f"{auc:.4f} ({kind})" if auc is not None else "-", v.gate))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"{reg.name}")
        for r in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())

    _emit(args, {"name": reg.name, "versions": [v.to_dict() for v in versions]}, human)
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    """`churn models info`: one version (or alias) in full."""
    reg = _registry(args)
    if args.version:
        info = reg.version(args.version)
    else:
        alias = args.alias or "champion"
        info = reg.alias(alias)
        if info is None:
            raise RegistryError(f"{reg.name} has no alias {alias!r}")

    def human() -> None:
        d = info.to_dict()
        print(f"{info.name} version {info.version}")
        for key in ("aliases", "created", "run_id", "source", "description", "auc", "gate"):
            value = ", ".join(d[key]) if isinstance(d[key], list) else d[key]
            print(f"  {key}: {value if value not in (None, '') else '-'}")
        for key, value in sorted(info.tags.items()):
            print(f"  tag {key}: {value}")

    _emit(args, info.to_dict(), human)
    return 0


def cmd_models_decide(args: argparse.Namespace) -> int:
    """`churn models decide`: the version's contact threshold for the config's decision, on the version."""
    from churnlib.registry.decide import rederive

    result = rederive(_load(args), args.version, args.data, verbose=args.verbose, say=say)
    _emit(args, result, lambda: print(f"threshold: {result['threshold'] if result['threshold'] is not None else 'none'}"))
    return 0


def cmd_outcomes_load(args: argparse.Namespace) -> int:
    """`churn outcomes load`: outcomes into the prediction log, skipping those already there."""
    from churnlib.monitor.outcomes import load_outcomes

    result = load_outcomes(_load(args), args.data, say=say)
    _emit(args, result.to_dict(), lambda: print(f"loaded: {result.loaded}\nrejected: {result.rejected}"))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """`churn monitor`: the report; exit 4 when an alert fired (after printing and recording it)."""
    from churnlib.monitor.report import lines, monitor, record

    quiet_logs(args.verbose)
    cfg = _load(args)
    result = monitor(cfg, args.since, args.until, args.window, say=say)
    payload = result.to_dict()
    if not args.no_record and result.windows:
        payload["run_id"] = record(cfg, result)

    def human() -> None:
        for line in lines(result):
            print(line)
        if payload.get("run_id"):
            print(f"run_id: {payload['run_id']}")

    _emit(args, payload, human)
    if result.alerts:
        raise MonitorAlert(f"{len(result.alerts)} alert(s); first: {result.alerts[0]}")
    return 0


def cmd_rollout_start(args: argparse.Namespace) -> int:
    """`churn rollout start`: the challenger alias and the rollout tag; Serve follows."""
    from churnlib.rollout.commands import start

    if args.share is not None and not 0.0 < args.share < 1.0:
        raise ConfigError(f"--share must be between 0 and 1 (exclusive), got {args.share:g}")
    rollout = start(_load(args), args.mode, args.share, args.version, force=args.force, say=say)
    _emit(args, dict(rollout.__dict__), lambda: print(f"challenger: {rollout.version} ({rollout.mode})"))
    return 0


def cmd_rollout_status(args: argparse.Namespace) -> int:
    """`churn rollout status`: the comparison from the log (recorded in the rollout's run)."""
    from churnlib.rollout.commands import status
    from churnlib.rollout.status import lines

    quiet_logs(args.verbose)
    found = status(_load(args), record=not args.no_record, say=say)
    _emit(args, found, lambda: print("\n".join(lines(found))))
    return 0


def cmd_rollout_promote(args: argparse.Namespace) -> int:
    """`churn rollout promote`: champion -> challenger when the live criteria hold; else exit 3."""
    from churnlib.rollout.commands import promote

    quiet_logs(args.verbose)
    result = promote(_load(args), force=args.force, say=say)
    _emit(args, result, lambda: print(f"champion: {result['version']}"))
    return 0


def cmd_rollout_abort(args: argparse.Namespace) -> int:
    """`churn rollout abort`: the rollout ends; Serve drops the challenger."""
    from churnlib.rollout.commands import abort

    rollout = abort(_load(args), say=say)
    _emit(args, {"aborted": rollout.version, "mode": rollout.mode}, lambda: None)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`churn serve`: the Serve application on this machine until Ctrl-C."""
    from churnlib.serving.runner import run_until_interrupted

    cfg = _load(args)
    builder_args = {"config": args.config, "set": args.sets, "alias": args.alias, "replicas": args.replicas,
                    "model_uri": args.model_uri}
    run_until_interrupted(cfg, builder_args, port=args.port or cfg.serve.port, verbose=args.verbose, say=say)
    return 0


def _instance_payload(inst: Any) -> dict[str, Any]:
    return {"up": inst is not None, **(inst.to_dict() if inst is not None else {})}


def cmd_up(args: argparse.Namespace) -> int:
    """`churn up`: start the workspace's Ray instance (or say where the running one is)."""
    from churnlib.runtime import up

    cfg = _load(args)
    named = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if named:
        raise ConfigError(f"ray.address (or RAY_ADDRESS) is set to {named!r}: commands use that cluster; "
                          "unset it to start the workspace's own instance")
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
        if value is not None and value < 0:
            raise ConfigError(f"churn up {flag} {value:g}: must be 0 or more")
    inst, started = up(cfg.workspace_path, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    trainer = _start_trainer(cfg)

    def human() -> None:
        what = "started" if started else "already up:"
        say(f"ray: {what} the workspace instance at {inst.address} (dashboard {inst.dashboard_url}, "
            f"metrics {inst.metrics_url}){auth_token_hint()}")
        say(f"ray: commands in this workspace ({cfg.workspace_path}) now run on it; `churn down` stops it")
        if trainer is None:
            say("ray: the workspace trainer is starting: `churn train` on a small table boosts there, warm")
        else:
            say(f"ray: the workspace trainer (churn train, warm) did not start: {trainer}")

    _emit(args, {**_instance_payload(inst), "started": started, "trainer": trainer or "started"}, human)
    return 0


def _start_trainer(cfg: Any) -> str | None:
    """Start the warm trainer on the workspace instance (``churnlib.train.warm``), not waiting for
    its imports -> None, or why it could not (the instance stays up; `churn train` retries)."""
    from churnlib.train import warm

    try:
        ensure_ray(cfg.ray, workspace=cfg.workspace_path, data=False)
        warm.start_trainer()
    except Exception as exc:  # noqa: BLE001 - an optimisation: said, not fatal
        return one_line(exc, 200)
    finally:
        release_ray()
    return None


def cmd_down(args: argparse.Namespace) -> int:
    """`churn down`: stop the workspace's Ray instance, and only it."""
    from churnlib.runtime import down

    cfg = _load(args)
    inst, graceful = down(cfg.workspace_path)

    def human() -> None:
        if inst is None:
            say(f"ray: no workspace instance is up in {cfg.workspace_path}")
        else:
            say(f"ray: stopped the workspace instance at {inst.address}"
                + ("" if graceful else " (some of its processes had to be killed)"))

    _emit(args, {"stopped": inst is not None, "graceful": graceful, **(inst.to_dict() if inst else {})}, human)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`churn status`: the workspace's Ray instance, if up."""
    from churnlib.runtime import running

    cfg = _load(args)
    inst = running(cfg.workspace_path)

    def human() -> None:
        if inst is None:
            say(f"ray: no workspace instance is up in {cfg.workspace_path}; commands start their own "
                "(`churn up` keeps one up)")
        else:
            cpus = "all CPUs" if inst.num_cpus is None else f"{inst.num_cpus:g} CPUs"
            say(f"ray: workspace instance up at {inst.address} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(inst.started_at))} ({cpus}); "
                f"dashboard {inst.dashboard_url}, metrics {inst.metrics_url}, log {inst.log}")

    _emit(args, _instance_payload(inst), human)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`churn config`: the resolved configuration, or the default file."""
    cfg = _load(args)
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json")))
    else:
        sys.stdout.write(config_to_yaml(cfg))
    return 0


def load_dotenv_file() -> None:
    """Secrets and URIs from an ignored ./.env (variables already set win)."""
    from pathlib import Path

    if Path(".env").is_file():
        from dotenv import load_dotenv

        load_dotenv(".env", override=False)


def _service_error(exc: BaseException) -> str | None:
    """A failure of MLflow or of the S3 artifact store mid-command, as one line (else None)."""
    for e in (exc, exc.__cause__, exc.__context__):
        if e is None:
            continue
        module = type(e).__module__
        if module.startswith("mlflow"):
            return f"MLflow: {telling_line(e)}"
        if module.startswith(("botocore", "boto3", "s3transfer")):
            return f"S3 artifact store: {telling_line(e)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The `churn` entry point: the exit code of the command (errors as one line on stderr)."""
    # A Ray call after the command let go of Ray (an interrupt) must not start a new instance.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

    parser = build_parser()
    args = parser.parse_args(argv)
    load_dotenv_file()
    interrupts.install()
    try:
        return int(args.func(args) or 0)
    except ChurnError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("error: interrupted", file=sys.stderr, flush=True)
        return exc.exit_code if isinstance(exc, interrupts.Interrupted) else interrupts.interrupted().exit_code
    except Exception as exc:  # noqa: BLE001 - last resort: still one line unless --verbose
        if getattr(args, "verbose", False):
            traceback.print_exc()
        service = _service_error(exc)
        if service:
            print(f"error: {service}", file=sys.stderr, flush=True)
            return 1
        print(f"error: unexpected {type(exc).__name__}: {last_line(exc)} (run with --verbose for details)",
              file=sys.stderr, flush=True)
        return 1


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The `churn` executable (and ``python -m churnlib``, the ``ray_jobs`` entrypoints):
    ``main``, then the end of the process without the interpreter's teardown.

    What an ordinary exit does for the outside world still happens, in its order: the other
    threads that are not daemons are waited for, the ``atexit`` handlers run (Ray's shutdown
    of a private instance and of its processes, logging's flush, MLflow's), stdout and stderr
    are flushed. What is skipped is freeing every object and module one by one: nothing reads
    it, and after a sweep it took about a second of a command's wall time."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        if exc.code is not None and not isinstance(exc.code, int):
            raise
        code = exc.code or 0
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """``sys.exit(code)`` as the interpreter's own exit does it, minus the teardown (see ``run``)."""
    # The interpreter's own exit calls exactly these two: threading's (its exit hooks, such as
    # the one that ends ThreadPoolExecutor workers, then a join of every non-daemon thread),
    # then the atexit handlers.
    threading._shutdown()  # noqa: SLF001
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: as at an ordinary exit
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
