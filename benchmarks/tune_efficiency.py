"""Benchmark: a 16-trial sweep with ASHA vs the same 16 trials run to the end, in one run.

    python benchmarks/tune_efficiency.py [--rows 100000] [--trials 16] [--rounds 200]
                                         [--out benchmarks/results/tune_efficiency.json]

Each sweep is the real `churn tune --data ... --json`, a fresh process as a user runs it (every
trial the training of `churn train` on its engine: one process per trial for a small table,
reused from trial to trial), on the same generated Parquet table, with random search and the
same seed, so both try the SAME 16 configurations; one with ASHA (`tune.scheduler=asha`), one
without (`none`). XGBoost's own early stopping stays on in both (it is part of the training,
not of the sweep). Twice: cold (each command starts its own Ray instance) and on `churn up`'s
instance (started before, not counted). The workspace's MLflow store is made before either
sweep, and an untimed 2-trial sweep runs first, so neither pays for creating it nor for the
machine's first run. Prints and writes: wall time, the trials' part of it
(`sweep_s`), best validation AUC, boosting rounds spent over all trials, trials stopped by
ASHA, and the ratios. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "CHURN_WORKSPACE")}


def _churn(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "churnlib", *args], cwd=workspace, env=ENV, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"churn {args[0]} failed: {res.stderr.strip().splitlines()[-1:]}")
    return res


def sweep(workspace: Path, data: Path, scheduler: str, setting: str, args: argparse.Namespace) -> dict:
    sets = {
        "mlflow.experiment_name": f"tune-benchmark-{scheduler}",
        "tune.num_samples": args.trials,
        "tune.search": "random",
        "tune.seed": args.seed,
        "tune.scheduler": scheduler,
        "tune.grace_period": args.grace,
        "tune.reduction_factor": 3,
        "tune.report_every": 5,
        "tune.name": f"bench-{setting}-{scheduler}",
        "xgboost.num_boost_round": args.rounds,
        "xgboost.early_stopping_rounds": 20,
        "training.checkpoint_every": 50,
        "training.progress_interval_s": 0,
    }
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    t0 = time.perf_counter()
    res = _churn(workspace, "tune", "--data", str(data), "--json", *flags)
    wall = time.perf_counter() - t0
    result = json.loads(res.stdout)
    return {
        "wall_s": wall,
        "sweep_s": result["timings"]["sweep_s"],  # Tune's part: the trials, without the command's own start
        "best_auc": result["best"]["score"],
        "best_config": result["best"]["config"],
        "rounds_spent": sum(int(t["rounds"] or 0) for t in result["trials"]),
        "trials": len(result["trials"]),
        "stopped_by_asha": sum(t["status"] == "stopped" for t in result["trials"]),
        "configs": sorted(json.dumps(t["config"], sort_keys=True) for t in result["trials"]),
    }


def summarize(a: dict, f: dict) -> dict:
    return {
        "time_ratio_asha_over_full": a["wall_s"] / f["wall_s"],
        "sweep_ratio_asha_over_full": a["sweep_s"] / f["sweep_s"],
        "rounds_ratio_asha_over_full": a["rounds_spent"] / f["rounds_spent"],
        "auc_gap_full_minus_asha": f["best_auc"] - a["best_auc"],
        "same_configurations": a["configs"] == f["configs"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--grace", type=int, default=20)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=str(HERE / "results" / "tune_efficiency.json"))
    args = ap.parse_args()

    from churnlib import tracking
    from churnlib.config import load_config
    from churnlib.data.generation import generate

    workspace = Path(tempfile.mkdtemp(prefix="churn-tune-bench-"))
    data = generate(args.rows, workspace / "train.parquet", seed=5)
    print(f"data: {args.rows} rows at {data}", flush=True)
    for scheduler in ("asha", "none"):  # the store and both experiments, made before either sweep
        tracking.preflight(load_config(env={}, overrides={"workspace": str(workspace / ".churn"),
                                                          "mlflow.experiment_name": f"tune-benchmark-{scheduler}"}))
    # An untimed 2-trial sweep first: the machine's first-run costs (files not yet in the page
    # cache, Ray's first start after an idle spell) would otherwise land on whichever column runs
    # first, always ASHA's (0.8-2.2 s more of its command's own start and end than the other's).
    print("warm-up: an untimed 2-trial sweep ...", flush=True)
    _churn(workspace, "tune", "--data", str(data), "--json", "--set", "tune.num_samples=2", "--set",
           "xgboost.num_boost_round=10", "--set", "tune.name=bench-warm-up", "--set",
           "mlflow.experiment_name=tune-benchmark-warm-up")
    results: dict = {}
    summary: dict = {}
    for setting in ("cold", "warm"):
        if setting == "warm":
            _churn(workspace, "up")
        try:
            results[setting] = {}
            for scheduler in ("asha", "none"):
                print(f"{setting}: churn tune, scheduler {scheduler} ...", flush=True)
                results[setting][scheduler] = sweep(workspace, data, scheduler, setting, args)
        finally:
            if setting == "warm":
                _churn(workspace, "down")
        a, f = results[setting]["asha"], results[setting]["none"]
        summary[setting] = summarize(a, f)
        print()
        print(f"{setting + ' (' + ('own Ray instance' if setting == 'cold' else 'churn up') + ')':24s}"
              f"{'ASHA':>12s}{'no early stop':>16s}{'ratio':>8s}")
        print(f"{'wall time (s)':24s}{a['wall_s']:12.1f}{f['wall_s']:16.1f}{a['wall_s'] / f['wall_s']:8.2f}")
        print(f"{'of it, trials (s)':24s}{a['sweep_s']:12.1f}{f['sweep_s']:16.1f}{a['sweep_s'] / f['sweep_s']:8.2f}")
        print(f"{'best valid AUC':24s}{a['best_auc']:12.4f}{f['best_auc']:16.4f}")
        print(f"{'rounds spent':24s}{a['rounds_spent']:12d}{f['rounds_spent']:16d}"
              f"{a['rounds_spent'] / f['rounds_spent']:8.2f}")
        print(f"{'stopped by ASHA':24s}{a['stopped_by_asha']:12d}{f['stopped_by_asha']:16d}")
        print(f"same {args.trials} configurations: {summary[setting]['same_configurations']}\n", flush=True)
    for per in results.values():
        for r in per.values():
            r.pop("configs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "trials": args.trials, "rounds": args.rounds, "results": results,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
