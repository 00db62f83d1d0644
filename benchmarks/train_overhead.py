"""Benchmark: plain XGBoost in one process vs our Ray Train path, on the same data, in one run.

    python benchmarks/train_overhead.py [--rows 2000000] [--rounds 100] [--depth 6] [--commands]

Both train on the same generated Parquet table with the same train/validation
split (churnlib's hash split), hist, the same depth and rounds, evaluating
train and validation every round. Plain: ``xgboost.train`` with nthread = all
cores. Ours: ``churnlib.train.command.train`` with each engine in turn
(``training.engine=ray_train``: Ray Train, 2 workers x 1 thread; ``task``: one
Ray task with 2 threads; ``process``: the same boosting in this process, no Ray),
checkpoints on, early stopping armed but not triggered, full metric history,
MLflow logging, the Ray engines each starting their own local Ray instance as
``churn train`` does.

``--commands`` also times the real ``churn train --data ... --json`` as a user
runs it, in a fresh process each: cold (no Ray instance up: ``auto`` boosts in
the command's process), cold on the one task (``training.engine=task``: the
command starts its own local Ray instance, what ``auto`` did before) and, on the
workspace's instance (``churn up`` run before and not counted), the first and the
next command (``auto``: the workspace trainer, ``churnlib.train.warm``) and the one
task there (what ``auto`` ran before the trainer), against plain XGBoost in a fresh
process (imports included).

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
ENGINES = ("ray_train", "task", "process")


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


def ours(path: Path, rounds: int, depth: int, workspace: str, engine: str = "ray_train") -> dict:
    from churnlib.config import load_config
    from churnlib.train.command import train

    cfg = load_config(
        overrides={
            "workspace": workspace,
            "xgboost.num_boost_round": rounds,
            "xgboost.max_depth": depth,
            "xgboost.early_stopping_rounds": rounds,  # armed, never triggered: same rounds as plain
            "training.engine": engine,
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
        "engine": res.engine,
        "workers": cfg.ray.num_workers,
        "threads_per_worker": cfg.xgb_nthread,
    }


PLAIN_SCRIPT = """
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
from benchmarks.train_overhead import plain
from churnlib.config import load_config
from pathlib import Path
cfg = load_config(overrides={{"xgboost.max_depth": {depth}}})
r = plain(Path({path!r}), {rounds}, {depth}, cfg)
r["process_s"] = time.perf_counter() - t0
print(json.dumps(r))
"""


# cold: no Ray instance up (auto boosts in the command's process); cold_task: the command starts its
# own instance for one task; on `churn up`'s instance: warm_first (the first command the workspace
# trainer takes, just after `churn up`), warm (the next: what a team iterating sees) and warm_task
# (the one Ray task, what auto ran there before the trainer)
MODES = ("cold", "cold_task", "warm_first", "warm", "warm_task")


def commands(path: Path, rounds: int, depth: int, plain_round_ms: float) -> dict:
    """``churn train`` as a user runs it, cold and warm, each in a fresh process; plain likewise."""
    import subprocess

    repo = str(HERE.parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}

    def timed(cmd: list[str], cwd: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:4])} failed: {res.stderr.strip().splitlines()[-1:]}")
        return wall, json.loads(res.stdout.strip().splitlines()[-1])

    sets = ["--set", f"xgboost.num_boost_round={rounds}", "--set", f"xgboost.max_depth={depth}",
            "--set", f"xgboost.early_stopping_rounds={rounds}"]
    train = [sys.executable, "-m", "churnlib", "train", "--data", str(path), "--json", *sets]
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="churn-bench-") as ws:
        wall, r = timed([sys.executable, "-c", PLAIN_SCRIPT.format(repo=repo, path=str(path), rounds=rounds,
                                                                   depth=depth)], ws)
        out["plain_process"] = {"wall_s": wall, "boosting_s": r["boosting_s"], "per_round_ms": r["per_round_ms"],
                                "fixed_s": wall - r["boosting_s"]}
        started = False
        try:
            for mode in MODES:
                if mode == "warm_first":
                    t0 = time.perf_counter()
                    started = True
                    up = subprocess.run([sys.executable, "-m", "churnlib", "up"], cwd=ws, env=env,
                                        capture_output=True, text=True)
                    if up.returncode != 0:
                        raise SystemExit(f"churn up failed: {up.stderr.strip()}")
                    out["churn_up_s"] = time.perf_counter() - t0
                extra = ["--set", "training.engine=task"] if mode.endswith("_task") else []
                wall, r = timed(train + extra, ws)
                boost = r["timings"]["boosting_s"]
                out[mode] = {"wall_s": wall, "boosting_s": boost, "per_round_ms": 1000 * boost / r["num_boosted_rounds"],
                             "fixed_s": wall - boost, "stages_s": r["timings"], "engine": r["engine"],
                             "trainer": r.get("trainer")}
        finally:
            if started:
                subprocess.run([sys.executable, "-m", "churnlib", "down"], cwd=ws, env=env, capture_output=True)
    base = out["plain_process"]
    for mode in MODES:
        out[mode]["wall_ratio"] = out[mode]["wall_s"] / base["wall_s"]
        out[mode]["per_round_ratio"] = out[mode]["per_round_ms"] / base["per_round_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--out", default=str(HERE / "results" / "train_overhead.json"))
    ap.add_argument("--commands", action="store_true",
                    help="also time `churn train` cold and warm (`churn up`) against plain, each a fresh process")
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
    engines: dict = {}
    with tempfile.TemporaryDirectory(prefix="churn-bench-") as root:
        for engine in ENGINES:
            print(f"our path, training.engine={engine} ...", file=sys.stderr)
            engines[engine] = ours(path, args.rounds, args.depth, str(Path(root) / engine), engine)
            from churnlib.runtime import release_ray

            release_ray()  # each run starts (and stops) its own local instance, as `churn train` does
    o = engines["ray_train"]
    print(f"\n{'':24}{'plain':>12}" + "".join(f"{e:>12}{'ratio':>8}" for e in ENGINES))
    for key, label, fmt in (
        ("wall_s", "wall (s)", "{:12.2f}"),
        ("boosting_s", "boosting (s)", "{:12.2f}"),
        ("per_round_ms", "per round (ms)", "{:12.1f}"),
        ("fixed_s", "fixed cost (s)", "{:12.2f}"),
        ("valid_auc", "validation AUC", "{:12.4f}"),
    ):
        line = f"{label:24}" + fmt.format(p[key])
        for engine in ENGINES:
            r = engines[engine][key] / p[key] if p[key] else float("nan")
            line += fmt.format(engines[engine][key]) + f"{r:8.2f}"
        print(line)
    for engine in ENGINES:
        print(f"\n{engine} stages (s): {engines[engine]['stages_s']}")
    result = {
        "rows": args.rows,
        "rounds": args.rounds,
        "depth": args.depth,
        "cpus": os.cpu_count(),
        "plain": p,
        "ray_train": o,
        "task": engines["task"],
        "process": engines["process"],
        "per_round_ratio": o["per_round_ms"] / p["per_round_ms"],
        "per_round_ratio_task": engines["task"]["per_round_ms"] / p["per_round_ms"],
        "wall_ratio_ray_train": o["wall_s"] / p["wall_s"],
        "wall_ratio_task": engines["task"]["wall_s"] / p["wall_s"],
        "wall_ratio_process": engines["process"]["wall_s"] / p["wall_s"],
        "per_round_ratio_process": engines["process"]["per_round_ms"] / p["per_round_ms"],
        "fixed_cost_process_s": engines["process"]["fixed_s"],
        "fixed_cost_ray_s": o["fixed_s"],
        "fixed_cost_task_s": engines["task"]["fixed_s"],
        "auc_diff": o["valid_auc"] - p["valid_auc"],
    }
    if args.commands:
        print("\n`churn train` as a user runs it (fresh processes) ...", file=sys.stderr)
        c = commands(path, args.rounds, args.depth, p["per_round_ms"])
        result["commands"] = c
        print(f"\n{'fresh process':24}{'wall (s)':>12}{'fixed (s)':>12}{'per round':>12}{'wall ratio':>12}")
        for mode in ("plain_process", *MODES):
            m = c[mode]
            print(f"{mode:24}{m['wall_s']:12.2f}{m['fixed_s']:12.2f}{m['per_round_ms']:10.1f}ms"
                  f"{m.get('wall_ratio', 1.0):12.2f}")
        for mode in MODES:
            print(f"{mode} ({c[mode]['engine']}{', trainer' if c[mode].get('trainer') else ''}) stages (s): "
                  f"{c[mode]['stages_s']}")
        print(f"churn up: {c['churn_up_s']:.1f} s (not counted above)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
