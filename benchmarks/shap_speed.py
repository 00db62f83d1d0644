"""Benchmark: SHAP explanations per explainer type, rows per second, in one run.

    python benchmarks/shap_speed.py [--rows 100 1000 10000] [--train-rows 100000] [--rounds 100]
                                    [--exact-max-rows N] [--out benchmarks/results/shap_speed.json]

Trains one depth-6 XGBoost model on a generated table (the default schema),
then explains the same rows with:

- ``pred_contribs``: XGBoost's own TreeSHAP called directly (DMatrix + predict),
  the reference: the limit for exact TreeSHAP on a CPU;
- ``tree``: our default (``churnlib.explain.explain(kind="tree")``);
- ``tree_explainer``: shap's TreeExplainer;
- ``exact``: shap's Exact explainer over a 100-row background (the original
  project's choice).

All use every core. Prints a table of rows/s and the ratio of ``tree`` to
``pred_contribs`` (goal: within 1.1x), checks ``tree`` and ``tree_explainer``
give the same values as ``pred_contribs`` bit for bit, and writes JSON. The
Exact explainer runs about 15 rows/s here: ``--exact-max-rows`` skips the sizes
above it (reported as skipped), so a quick run need not wait 11 minutes.
A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--train-rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--background", type=int, default=100)
    ap.add_argument("--exact-max-rows", type=int, default=10_000)
    ap.add_argument("--out", default=str(HERE / "results" / "shap_speed.json"))
    args = ap.parse_args()

    import numpy as np
    import xgboost as xgb

    from churnlib.config import load_config
    from churnlib.data.features import FeatureSpec
    from churnlib.data.generation import iter_chunks
    from churnlib.data.preparation import encode_batch
    from churnlib.model.explain import explain

    threads = os.cpu_count() or 1
    cfg = load_config(env={})
    spec = FeatureSpec.from_config(cfg.features)
    raw = next(iter_chunks(args.train_rows + max(args.rows), seed=5, chunk_rows=args.train_rows + max(args.rows)))
    enc = encode_batch(raw, spec, spec.feature_names + [spec.target], 0.0, 1)
    X, y = enc["X"], enc["y"]
    Xtrain, Xexplain = X[: args.train_rows], X[args.train_rows :]
    kw = dict(feature_names=spec.feature_names, feature_types=spec.feature_types, enable_categorical=True)
    print(f"training: {args.train_rows} rows, depth 6, {args.rounds} rounds, {threads} threads", flush=True)
    booster = xgb.train(
        {"max_depth": 6, "eta": 0.1, "objective": "binary:logistic", "nthread": threads, "tree_method": "hist"},
        xgb.DMatrix(Xtrain, label=y[: args.train_rows], **kw),
        args.rounds,
    )
    background = Xtrain[: args.background]

    def pred_contribs(rows: np.ndarray) -> np.ndarray:
        return booster.predict(xgb.DMatrix(rows, nthread=threads, **kw), pred_contribs=True)[:, :-1]

    methods = {
        "pred_contribs": pred_contribs,
        "tree": lambda rows: explain(booster, rows, spec, "tree", nthread=threads).values,
        "tree_explainer": lambda rows: explain(booster, rows, spec, "tree_explainer", nthread=threads).values,
        "exact": lambda rows: explain(booster, rows, spec, "exact", background=background, nthread=threads).values,
    }
    results: dict[str, dict[str, dict]] = {m: {} for m in methods}
    identical: dict[str, bool] = {}
    for n in args.rows:
        rows = Xexplain[:n]
        reference = None
        for name, fn in methods.items():
            if name == "exact" and n > args.exact_max_rows:
                results[name][str(n)] = {"skipped": True}
                continue
            fn(rows[: min(n, 10)])  # warm up (imports, first call)
            t0 = time.perf_counter()
            values = fn(rows)
            secs = time.perf_counter() - t0
            results[name][str(n)] = {"seconds": secs, "rows_per_s": n / secs}
            if name == "pred_contribs":
                reference = values
            elif name in ("tree", "tree_explainer"):
                identical[f"{name}@{n}"] = bool(np.array_equal(np.asarray(values, dtype=np.float32), reference))
            print(f"  {name:15s} {n:>6} rows  {secs:8.3f} s  {n / secs:10.1f} rows/s", flush=True)

    print()
    header = f"{'explainer':15s}" + "".join(f"{n:>14}" for n in args.rows)
    print(header + "   (rows/s)")
    for name in methods:
        cells = []
        for n in args.rows:
            r = results[name][str(n)]
            cells.append(f"{'skipped':>14}" if r.get("skipped") else f"{r['rows_per_s']:14.1f}")
        print(f"{name:15s}" + "".join(cells))
    ratios = {
        str(n): results["pred_contribs"][str(n)]["rows_per_s"] / results["tree"][str(n)]["rows_per_s"]
        for n in args.rows
    }
    exact_vs = {
        str(n): results["tree"][str(n)]["rows_per_s"] / results["exact"][str(n)]["rows_per_s"]
        for n in args.rows
        if not results["exact"][str(n)].get("skipped")
    }
    print("\ntime ratio tree / pred_contribs: " + ", ".join(f"{n} rows {r:.3f}x" for n, r in ratios.items()))
    print("speed-up of tree over exact: " + ", ".join(f"{n} rows {r:.0f}x" for n, r in exact_vs.items()))
    print("same values as pred_contribs: " + ", ".join(f"{k} {v}" for k, v in identical.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "threads": threads, "train_rows": args.train_rows, "rounds": args.rounds, "depth": 6,
        "background": args.background, "results": results, "tree_time_ratio_vs_pred_contribs": ratios,
        "tree_speedup_vs_exact": exact_vs, "identical_to_pred_contribs": identical,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
