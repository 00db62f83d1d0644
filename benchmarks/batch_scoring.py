"""Benchmark: `churn predict` against one plain process, on the same Parquet table, in one run.

    python benchmarks/batch_scoring.py [--rows 2000000] [--repeats 2] [--rounds 100]
                                       [--memory-rows 10000000] [--set scoring.batch_size=... ...]
                                       [--out benchmarks/results/batch_scoring.json]

Both read a Parquet file of ``--rows`` generated customers and write a Parquet
file of customer id, P(churn), label, model name and version:

- plain: ``pd.read_parquet`` -> ``churnlib.features.encode_columns`` ->
  ``Booster.inplace_predict`` (every core) -> ``DataFrame.to_parquet``, one
  process, the whole table in memory; its stages are timed one by one;
- ours, on each engine (``scoring.engine``): ``churnlib.batch.predict`` (what
  `churn predict` runs), streaming, with rejects, the decision and drift counts,
  then its MLflow run and its row in the prediction log. ``task``: one Ray task
  reading, scoring and writing in three threads (``auto`` on one node); ``ray_data``:
  Ray Data read -> class-UDF actor pool -> Parquet write. Ray is started before the
  clock starts (it runs already on a cluster; the start is reported on its own line).

Memory: the peak resident memory the run adds (this process and every Ray process
it started, sampled every 50 ms, minus what they held before), printed for
``--rows`` and for a ``--memory-rows`` table (0: skip): a streaming engine's peak
stays flat as the table grows; the plain process holds the whole table.

The model is a real registered champion (``--rounds`` trees of depth 6 on
100,000 generated rows). Prints rows/s for each, the ratio ours/plain (goal:
0.7 or more on 2 cores) and writes JSON. A benchmark, not a test: numbers
depend on the machine and its load; the best of ``--repeats`` runs counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _champion(cfg, rounds: int, ws: Path) -> tuple[str, str]:
    """Train, log (as `churn train` logs) and register a model; alias champion. -> (name, version)."""
    import pandas as pd
    import xgboost as xgb

    from churnlib import tracking
    from churnlib.data.features import FeatureSpec
    from churnlib.data.generation import generate
    from churnlib.data.preparation import encode_batch
    from churnlib.data.profiles import build_profile
    from churnlib.data.sources import check_columns, resolve_source
    from churnlib.model.packaging import log_model
    from churnlib.registry.registry import Registry

    spec = FeatureSpec.from_config(cfg.features)
    path = generate(100_000, ws / "train.parquet", seed=3)
    source = resolve_source(str(path))
    columns = check_columns(source, spec)
    enc = encode_batch(pd.read_parquet(path), spec, columns, 0.0, 1)
    dtrain = xgb.DMatrix(enc["X"], label=enc["y"], feature_names=spec.feature_names,
                         feature_types=spec.feature_types, enable_categorical=True)
    booster = xgb.train({**cfg.xgb_params(), "max_depth": 6, "nthread": os.cpu_count()}, dtrain, rounds)
    tracking.connect(cfg)
    with tracking.tracked_run(cfg, "benchmark-model", {"churn.command": "train"}) as run:
        log_model(cfg, spec, source, columns, booster, rounds - 1, run.info.run_id, build_profile(enc["X"], spec))
    reg = Registry(cfg, say=lambda m: None)
    info, _ = reg.register(run.info.run_id)
    reg.set_alias(info.version, "champion")
    return cfg.model.registered_name, str(info.version)


def plain(table: Path, out: Path, predictor, name: str, version: str) -> dict[str, float]:
    import numpy as np
    import pandas as pd

    from churnlib.data.features import encode_columns

    spec = predictor.spec
    predictor.booster.set_param({"nthread": os.cpu_count() or 1})
    t = {}
    t0 = time.perf_counter()
    df = pd.read_parquet(table, columns=[spec.id_column, *spec.feature_names])
    t["read_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    X, bad, _ = encode_columns(df, spec)
    t["features_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    p = predictor.booster.inplace_predict(X)
    t["predict_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    pd.DataFrame({
        "customer_id": df[spec.id_column].astype("string"),
        "churn_probability": p.astype(np.float64),
        "churn_label": (p >= predictor.threshold).astype(np.int8),
        "model_name": name,
        "model_version": version,
    }).to_parquet(out, index=False)
    t["write_s"] = time.perf_counter() - t3
    t["total_s"] = time.perf_counter() - t0
    return t


class PeakMemory:
    """The peak resident memory this process and its descendants (the Ray instance it
    started) add while it runs, sampled every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.base = self._now()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _now(self) -> int:
        import psutil

        total = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._now())

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--memory-rows", type=int, default=10_000_000,
                    help="a table this large scored once per engine to show the peak memory (0: skip)")
    ap.add_argument("--engines", default="task,ray_data", help="scoring.engine values to compare")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for our job")
    ap.add_argument("--out", default=str(HERE / "results" / "batch_scoring.json"))
    args = ap.parse_args()

    from churnlib import tracking
    from churnlib.batch.predict import predict
    from churnlib.config import load_config
    from churnlib.data.generation import generate
    from churnlib.model import loading
    from churnlib.runtime import ensure_ray, quiet_logs

    quiet_logs(False)
    engines = args.engines.split(",")
    ws = Path(tempfile.mkdtemp(prefix="churn-bench-batch-"))
    try:
        cfg = load_config(overrides=[f"workspace={ws / '.churn'}", *args.sets], env={})
        configs = {e: cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"engine": e})})
                   for e in engines}
        name, version = _champion(cfg, args.rounds, ws)
        t0 = time.perf_counter()
        table = generate(args.rows, ws / "customers.parquet", seed=11)
        print(f"table: {args.rows:,} rows, {table.stat().st_size / 1e6:.1f} MB Parquet "
              f"(generated in {time.perf_counter() - t0:.1f} s); model {name} v{version}, {args.rounds} trees depth 6")
        tracking.configure(cfg)
        predictor = loading.load(f"models:/{name}@champion").predictor
        t0 = time.perf_counter()
        ensure_ray(cfg.ray)
        ray_start = time.perf_counter() - t0
        print(f"ray: local instance started in {ray_start:.1f} s (not counted below); "
              f"ray_data: {cfg.scoring.actors} actor(s) x {cfg.scoring.cpus_per_actor:g} CPU; "
              f"batch {cfg.scoring.batch_size:,} rows")

        def ours(engine: str, path: Path, out: Path) -> dict[str, float]:
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                res = predict(configs[engine], str(path), str(out), say=lambda m: None)
                total = time.perf_counter() - t0
            rows = res.counts["rows"]
            assert res.counts["scored"] == rows, res.counts
            shutil.rmtree(out, ignore_errors=True)
            return {"total_s": total, "rows": rows, "peak_added_mb": mem.added_mb}

        plain_runs: list[dict[str, float]] = []
        ours_runs: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
        for k in range(args.repeats):
            out = ws / f"plain-{k}.parquet"
            with PeakMemory() as mem:
                plain_runs.append(plain(table, out, predictor, name, version))
            p = plain_runs[-1]
            p["peak_added_mb"] = mem.added_mb
            out.unlink()
            print(f"  plain #{k + 1}: {p['total_s']:.2f} s = read {p['read_s']:.2f} + features {p['features_s']:.2f} "
                  f"+ predict {p['predict_s']:.2f} + write {p['write_s']:.2f}  ({args.rows / p['total_s']:,.0f} rows/s, "
                  f"+{p['peak_added_mb']:,.0f} MB)")
            for engine in engines:
                r = ours(engine, table, ws / f"ours-{engine}-{k}")
                ours_runs[engine].append(r)
                print(f"  {engine:<8} #{k + 1}: {r['total_s']:.2f} s ({args.rows / r['total_s']:,.0f} rows/s, "
                      f"+{r['peak_added_mb']:,.0f} MB), with its MLflow run, decision and drift counts")
        best_plain = min(r["total_s"] for r in plain_runs)
        stage = min(plain_runs, key=lambda r: r["total_s"])
        result: dict = {
            "rows": args.rows,
            "cpus": os.cpu_count(),
            "trees": args.rounds,
            "scoring": cfg.scoring.model_dump(),
            "ray_start_s": ray_start,
            "plain_runs": plain_runs,
            "ours_runs": ours_runs,
            "plain_rows_per_s": args.rows / best_plain,
            "inplace_predict_rows_per_s": args.rows / stage["predict_s"],
            "engines": {},
        }
        print(f"plain: {result['plain_rows_per_s']:,.0f} rows/s (inplace_predict alone "
              f"{result['inplace_predict_rows_per_s']:,.0f} rows/s)")
        for engine in engines:
            best = min(r["total_s"] for r in ours_runs[engine])
            result["engines"][engine] = {"rows_per_s": args.rows / best, "ratio_to_plain": best_plain / best}
            print(f"{engine:<8}: {args.rows / best:,.0f} rows/s, ratio ours/plain {best_plain / best:.2f}x "
                  f"(goal >= 0.7x)")
        first = engines[0]
        result["ours_rows_per_s"] = result["engines"][first]["rows_per_s"]
        result["ratio_ours_to_plain"] = result["engines"][first]["ratio_to_plain"]
        if args.memory_rows:
            t0 = time.perf_counter()
            big = generate(args.memory_rows, ws / "big.parquet", seed=12)
            print(f"memory: {args.memory_rows:,} rows, {big.stat().st_size / 1e6:.1f} MB Parquet "
                  f"(generated in {time.perf_counter() - t0:.1f} s)")
            result["memory"] = {"rows": args.memory_rows, "engines": {}}
            for engine in engines:
                r = ours(engine, big, ws / f"big-{engine}")
                small = max(x["peak_added_mb"] for x in ours_runs[engine])
                result["memory"]["engines"][engine] = {"peak_added_mb": r["peak_added_mb"], "total_s": r["total_s"],
                                                       f"peak_added_mb_at_{args.rows}": small}
                print(f"  {engine:<8}: peak +{r['peak_added_mb']:,.0f} MB at {args.memory_rows:,} rows "
                      f"(+{small:,.0f} MB at {args.rows:,}); {r['total_s']:.1f} s, "
                      f"{args.memory_rows / r['total_s']:,.0f} rows/s")
            big.unlink()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
