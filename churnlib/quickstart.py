"""``churn quickstart``: the whole lifecycle on the embedded default, one line per step.

generate data -> train (one Ray task for the small default table) -> evaluate (gates, SHAP) ->
register (alias staging) -> promote to champion -> start Serve -> a few requests ->
score a batch -> where to look -> stop Serve.

Every step calls the library, as the commands do; a failure is one line naming
the step, with the exit code of the error (3 for a gate that refuses the model).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from churnlib.batch.predict import predict
from churnlib.console import say as default_say
from churnlib.data.generation import generate
from churnlib.errors import ChurnError, GateFailedError, first_line
from churnlib.evaluate.command import evaluate
from churnlib.registry.registry import STAGING, Registry
from churnlib.runtime import free_port, quiet_logs
from churnlib.serving import runner as serving
from churnlib.train.command import default_data_path, train
from churnlib.train.task import threads

if TYPE_CHECKING:
    from churnlib.config import Config

STEPS = ("data", "train", "evaluate", "register", "promote", "serve", "requests", "batch", "stop")


def quickstart(cfg: Config, rows: int | None = None, port: int | None = None, verbose: bool = False,
               config_path: str | None = None, sets: list[str] | None = None,
               say: Callable[[str], None] = default_say) -> dict[str, Any]:
    """Run every step; -> what they made (paths, results, the Serve URL). ``config_path``
    and ``sets`` are the command's, handed to the Serve application as `churn serve` does."""
    import requests

    if rows:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"generate_rows": rows})})

    quiet_logs(verbose)
    quiet = (lambda m: None) if not verbose else say
    t_all = time.perf_counter()
    out: dict[str, Any] = {}
    step_no = 0

    def step(name: str, fn: Callable[[], str]) -> None:
        nonlocal step_no
        step_no += 1
        t0 = time.perf_counter()
        try:
            line = fn()
        except ChurnError as exc:
            error = type(exc)(f"quickstart step {step_no}/{len(STEPS)} ({name}): {exc}")
            raise error from exc
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - still one line, naming the step
            raise ChurnError(f"quickstart step {step_no}/{len(STEPS)} ({name}): {type(exc).__name__}: "
                             f"{first_line(exc) if str(exc) else ''}") from exc
        say(f"[{step_no}/{len(STEPS)}] {name}: {line} ({time.perf_counter() - t0:.1f} s)")

    data_dir = cfg.workspace_path / "data"
    test_rows = max(2000, min(20000, cfg.data.generate_rows // 5))
    # scored with three reasons each: SHAP costs about a millisecond a row on one core
    score_rows = min(5000, test_rows)

    def data_step() -> str:
        out["train_path"] = default_data_path(cfg)
        out["test_path"] = data_dir / f"churn_test_{test_rows}_s{cfg.data.generate_seed + 1}.parquet"
        if not out["test_path"].exists():
            generate(test_rows, out["test_path"], seed=cfg.data.generate_seed + 1)
        out["score_path"] = data_dir / f"churn_to_score_{score_rows}_s{cfg.data.generate_seed + 2}.csv"
        if not out["score_path"].exists():
            import pandas as pd

            tmp = generate(score_rows, data_dir / f".score_{score_rows}.parquet", seed=cfg.data.generate_seed + 2)
            pd.read_parquet(tmp).drop(columns=[cfg.features.target.column]).to_csv(out["score_path"], index=False)
            tmp.unlink()
        return (f"{cfg.data.generate_rows:,} training rows, {test_rows:,} test rows, {score_rows:,} rows to score "
                f"in {data_dir}")

    def train_step() -> str:
        result = train(cfg, data_path=str(out["train_path"]), run_name="quickstart", verbose=verbose, say=quiet)
        out["train"] = result
        where = {"process": f"in this process ({threads(cfg)} threads)",
                 "task": f"one Ray task ({threads(cfg)} threads)"}.get(result.engine,
                                                                       f"{cfg.ray.num_workers} Ray Train workers")
        return (f"run {result.run_id[:12]}, {where}, validation AUC "
                f"{result.metrics['best_valid_auc']:.4f} at round {result.best_iteration + 1}")

    def evaluate_step() -> str:
        shap_cfg = cfg.evaluation.shap.model_copy(update={"max_samples": min(cfg.evaluation.shap.max_samples, 2000)})
        ecfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"shap": shap_cfg})})
        res = evaluate(ecfg, out["train"].model_uri, str(out["test_path"]), verbose=verbose, say=quiet)
        out["eval"] = res
        m = res.metrics
        line = (f"ROC AUC {m['roc_auc']:.4f}, accuracy {m['accuracy']:.4f}, log loss {m['log_loss']:.4f}; "
                f"SHAP top feature {max(res.shap['mean_abs'], key=res.shap['mean_abs'].get)}; gate {res.gate.status}")
        if not res.gate.passed:
            raise GateFailedError(f"{line}: {res.gate.summary()}")
        return line

    reg: dict[str, Any] = {}

    def register_step() -> str:
        reg["r"] = Registry(cfg, say=quiet)
        info, created = reg["r"].register(out["train"].run_id, alias=STAGING, description="churn quickstart")
        out["version"] = info.version
        return f"{cfg.model.registered_name} version {info.version} ({'new' if created else 'existing'}), alias {STAGING}"

    def promote_step() -> str:
        res = reg["r"].promote()
        prev = f", previous = version {res['previous']}" if res.get("previous") else ""
        return f"champion = version {res['version']}{prev}"

    def serve_step() -> str:
        chosen = free_port(port or cfg.serve.port)
        # half a CPU for the replica: on 2 cores the batch step scores beside it
        serve_sets = [*(sets or []), f"workspace={cfg.workspace_path}",
                      f"serve.cpus_per_replica={min(cfg.serve.cpus_per_replica, 0.5):g}"]
        out["serve"] = serving.start(cfg, {"config": config_path, "set": serve_sets}, chosen, verbose=verbose,
                                     announce=verbose)
        out["url"] = out["serve"].url
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = requests.get(f"{out['url']}/healthz", timeout=10)
            if health.status_code == 200:
                return f"{out['url']} answering with version {health.json()['model']['version']}"
            time.sleep(0.5)
        raise ChurnError(f"Serve at {out['url']} did not become ready: {health.json().get('reason')}")

    def requests_step() -> str:
        import pandas as pd

        records = pd.read_csv(out["score_path"], nrows=3).to_dict("records")
        lines = []
        for rec in records[:2]:
            a = requests.post(f"{out['url']}/predict", json=rec, timeout=30).json()
            lines.append(f"customer {a.get('customer_id')}: P(churn) {a['churn_probability']:.3f}, label {a['churn_label']}")
        e = requests.post(f"{out['url']}/explain", json=records[2], timeout=30).json()
        why = ", ".join(f"{r['feature']}={r['value']} ({r['contribution']:+.2f})" for r in e["top_reasons"])
        lines.append(f"customer {e.get('customer_id')}: P(churn) {e['churn_probability']:.3f} because {why}")
        for line in lines:
            say(f"      {line}")
        return f"{len(lines)} answers from version {e['model_version']}"

    def batch_step() -> str:
        target = cfg.workspace_path / "predictions" / f"scores-{time.strftime('%Y%m%d-%H%M%S')}.parquet"
        res = predict(cfg, str(out["score_path"]), str(target), explain=True, verbose=verbose, say=quiet)
        out["predictions"] = target
        shifted = [d for d in res.drift if d["verdict"] != "stable"]
        return (f"{res.counts['scored']:,} rows scored with reasons -> {target} ({res.rows_per_s:,.0f} rows/s); "
                f"drift: {len(shifted)} of {len(res.drift)} features shifted")

    def stop_step() -> str:
        # the runs table itself: MLflow 3's UI otherwise opens an experiment on its GenAI overview
        runs = f"http://127.0.0.1:5000/#/experiments/{out['train'].experiment_id}/runs"
        say(f"      MLflow UI:  mlflow ui --backend-store-uri {cfg.tracking_uri}   (then {runs})")
        say(f"      Serve docs: {out['url']}/docs   (run `churn serve` to keep it up)")
        serving.stop(out.pop("serve"), cfg.serve.shutdown_grace_s, quiet)
        return "Serve stopped"

    try:
        for name, fn in zip(STEPS, (data_step, train_step, evaluate_step, register_step, promote_step, serve_step,
                                    requests_step, batch_step, stop_step)):
            step(name, fn)
    finally:
        if "serve" in out:
            serving.stop(out.pop("serve"), cfg.serve.shutdown_grace_s, quiet)
    say(f"quickstart: done in {time.perf_counter() - t_all:.1f} s")
    return out
