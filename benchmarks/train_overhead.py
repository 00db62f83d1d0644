"""Benchmark: plain XGBoost in one process vs our Ray Train path, on the same data, in one run.

    python benchmarks/train_overhead.py [--rows 2000000] [--rounds 100] [--depth 6]

Both train on the same generated Parquet table with the same train/validation
split (churnlib's hash split), hist, the same depth and rounds, evaluating
train and validation every round. Plain: ``xgboost.train`` with nthread = all
cores. Ours: ``churnlib.training.train`` (Ray Train, 2 workers x 1 thread,
checkpoints on, early stopping armed but not triggered, full metric history,
MLflow logging), starting its own local Ray instance as ``churn train`` does.

Prints a table and writes JSON (default benchmarks/results/train_overhead.json):
wall time, boosting time per round, fixed cost (wall minus boosting), AUC.
A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plain(path: Path, rounds: int, depth: int, cfg) -> dict:
    import pandas as pd
    import xgboost as xgb

    from churnlib.data.features import FeatureSpec
    from churnlib.data.preparation import encode_batch

    spec = FeatureSpec.from_config(cfg.features)
    t0 = time.perf_counter()
    df = pd.read_parquet(path)
    columns = spec.feature_names + [spec.target]
    enc = encode_batch(df, spec, columns, cfg.model.validation_split, cfg.model.random_state)
    ok = enc["flags"] == 0
    tr, va = ok & ~enc["is_valid"], ok & enc["is_valid"]
    kw = dict(feature_names=spec.feature_names, feature_types=spec.feature_types, enable_categorical=True)
    dtrain = xgb.QuantileDMatrix(enc["X"][tr], label=enc["y"][tr], max_bin=cfg.xgboost.max_bin, **kw)
    dvalid = xgb.QuantileDMatrix(enc["X"][va], label=enc["y"][va], ref=dtrain, **kw)
    load_s = time.perf_counter() - t0
    params = cfg.xgb_params()
    params["nthread"] = os.cpu_count()
    evals: dict = {}
    tb = time.perf_counter()
    bst = xgb.train(params, dtrain, rounds, evals=[(dtrain, "train"), (dvalid, "valid")], evals_result=evals, verbose_eval=False)
    boost_s = time.perf_counter() - tb
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "load_s": load_s,
        "boosting_s": boost_s,
        "per_round_ms": 1000 * boost_s / bst.num_boosted_rounds(),
        "fixed_s": wall - boost_s,
        "rounds": bst.num_boosted_rounds(),
        "valid_auc": evals["valid"]["auc"][-1],
        "threads": params["nthread"],
    }


def ours(path: Path, rounds: int, depth: int, workspace: str) -> dict:
    from churnlib.config import load_config
    from churnlib.train.command import train

    cfg = load_config(
        overrides={
            "workspace": workspace,
            "xgboost.num_boost_round": rounds,
            "xgboost.max_depth": depth,
            "xgboost.early_stopping_rounds": rounds,  # armed, never triggered: same rounds as plain
        }
    )
    t0 = time.perf_counter()
    res = train(cfg, data_path=str(path), say=lambda m: None)
    wall = time.perf_counter() - t0
    t = res.timings
    boost = t["boosting_s"]
    return {
        "wall_s": wall,
        "boosting_s": boost,
        "per_round_ms": 1000 * boost / res.num_boosted_rounds,
        "fixed_s": wall - boost,
        "rounds": res.num_boosted_rounds,
        "valid_auc": res.metrics["best_valid_auc"],
        "stages_s": {k: round(v, 2) for k, v in t.items()},
        "workers": cfg.ray.num_workers,
        "threads_per_worker": cfg.xgb_nthread,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--out", default=str(HERE / "results" / "train_overhead.json"))
    args = ap.parse_args()

    from churnlib.config import load_config
    from churnlib.data.generation import generate

    data_dir = HERE / "results" / "data"
    path = data_dir / f"churn_{args.rows}.parquet"
    if not path.exists():
        print(f"generating {args.rows} rows -> {path}", file=sys.stderr)
        generate(args.rows, path)
    cfg = load_config(overrides={"xgboost.max_depth": args.depth})

    print(f"plain xgboost.train ({args.rows} rows, {args.rounds} rounds, depth {args.depth}) ...", file=sys.stderr)
    p = plain(path, args.rounds, args.depth, cfg)
    print("Ray Train path ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="churn-bench-") as ws:
        o = ours(path, args.rounds, args.depth, ws)

    ratio_round = o["per_round_ms"] / p["per_round_ms"]
    print(f"\n{'':24}{'plain':>12}{'ray train':>12}{'ratio':>8}")
    for key, label, fmt in (
        ("wall_s", "wall (s)", "{:12.2f}"),
        ("boosting_s", "boosting (s)", "{:12.2f}"),
        ("per_round_ms", "per round (ms)", "{:12.1f}"),
        ("fixed_s", "fixed cost (s)", "{:12.2f}"),
        ("valid_auc", "validation AUC", "{:12.4f}"),
    ):
        r = o[key] / p[key] if p[key] else float("nan")
        print(f"{label:24}" + fmt.format(p[key]) + fmt.format(o[key]) + f"{r:8.2f}")
    print(f"\nray train stages (s): {o['stages_s']}")
    result = {
        "rows": args.rows,
        "rounds": args.rounds,
        "depth": args.depth,
        "cpus": os.cpu_count(),
        "plain": p,
        "ray_train": o,
        "per_round_ratio": ratio_round,
        "fixed_cost_ray_s": o["fixed_s"],
        "auc_diff": o["valid_auc"] - p["valid_auc"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
