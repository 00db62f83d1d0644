"""Benchmark: a 16-trial sweep with ASHA vs the same 16 trials run to the end, in one run.

    python benchmarks/tune_efficiency.py [--rows 500000] [--trials 16] [--rounds 200]
                                         [--out benchmarks/results/tune_efficiency.json]

Both sweeps run `churnlib.tune.command.tune` (every trial the training of
`churn train` on its engine: one process per trial for a small table, reused
from trial to trial) on the same generated Parquet table, with random
search and the same seed, so they try the SAME 16 configurations; one with
ASHA (`tune.scheduler=asha`), one without (`none`). XGBoost's own early
stopping stays on in both (it is part of the training, not of the sweep).
Prints and writes: wall time, best validation AUC, boosting rounds spent over
all trials, trials stopped by ASHA, and the ratios. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def sweep(workspace: Path, data: Path, scheduler: str, args: argparse.Namespace) -> dict:
    from churnlib.config import load_config
    from churnlib.tune.command import tune

    cfg = load_config(env={}, overrides={
        "workspace": str(workspace),
        "mlflow.experiment_name": f"tune-benchmark-{scheduler}",
        "tune.num_samples": args.trials,
        "tune.search": "random",
        "tune.seed": args.seed,
        "tune.scheduler": scheduler,
        "tune.grace_period": args.grace,
        "tune.reduction_factor": 3,
        "tune.report_every": 5,
        "tune.name": f"bench-{scheduler}",
        "xgboost.num_boost_round": args.rounds,
        "xgboost.early_stopping_rounds": 20,
        "training.checkpoint_every": 50,
        "training.progress_interval_s": 0,
    })
    t0 = time.perf_counter()
    result = tune(cfg, data_path=str(data), say=lambda m: print(f"  [{scheduler}] {m}", flush=True))
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "sweep_s": result.timings["sweep_s"],  # Tune's part: the trials, without the command's own start
        "best_auc": result.best["score"],
        "best_config": result.best["config"],
        "rounds_spent": sum(t["rounds"] for t in result.trials),
        "trials": len(result.trials),
        "stopped_by_asha": sum(t["status"] == "stopped" for t in result.trials),
        "configs": sorted(json.dumps(t["config"], sort_keys=True) for t in result.trials),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--grace", type=int, default=20)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=str(HERE / "results" / "tune_efficiency.json"))
    args = ap.parse_args()

    import ray

    from churnlib.data.generation import generate

    workspace = Path(tempfile.mkdtemp(prefix="churn-tune-bench-"))
    data = generate(args.rows, workspace / "train.parquet", seed=5)
    print(f"data: {args.rows} rows at {data}", flush=True)
    results = {}
    for scheduler in ("asha", "none"):
        results[scheduler] = sweep(workspace, data, scheduler, args)
        ray.shutdown()  # each sweep starts its own Ray instance, as `churn tune` does
    a, f = results["asha"], results["none"]
    same = a["configs"] == f["configs"]
    summary = {
        "time_ratio_asha_over_full": a["wall_s"] / f["wall_s"],
        "sweep_ratio_asha_over_full": a["sweep_s"] / f["sweep_s"],
        "rounds_ratio_asha_over_full": a["rounds_spent"] / f["rounds_spent"],
        "auc_gap_full_minus_asha": f["best_auc"] - a["best_auc"],
        "same_configurations": same,
    }
    print()
    print(f"{'':18s}{'ASHA':>12s}{'no early stop':>16s}")
    print(f"{'wall time (s)':18s}{a['wall_s']:12.1f}{f['wall_s']:16.1f}")
    print(f"{'of it, trials (s)':18s}{a['sweep_s']:12.1f}{f['sweep_s']:16.1f}")
    print(f"{'best valid AUC':18s}{a['best_auc']:12.4f}{f['best_auc']:16.4f}")
    print(f"{'rounds spent':18s}{a['rounds_spent']:12d}{f['rounds_spent']:16d}")
    print(f"{'stopped by ASHA':18s}{a['stopped_by_asha']:12d}{f['stopped_by_asha']:16d}")
    print(f"\nASHA: {summary['time_ratio_asha_over_full']:.2f}x the time ({summary['sweep_ratio_asha_over_full']:.2f}x "
          f"the trials' time), {summary['rounds_ratio_asha_over_full']:.2f}x the "
          f"rounds, AUC {summary['auc_gap_full_minus_asha']:+.4f} below the full sweep; same {args.trials} configurations: {same}")
    for r in results.values():
        r.pop("configs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "trials": args.trials, "rounds": args.rounds, "results": results,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
