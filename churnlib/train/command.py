"""``churn train``: read and prepare the data, fit on Ray Train, log everything to MLflow from the driver.

The tracking server is checked before Ray starts; the run ends FAILED with the error
as a tag when anything fails, KILLED on an interrupt (with the command that resumes
from the latest complete checkpoint).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from churnlib import tracking
from churnlib.config import config_to_yaml
from churnlib.console import say
from churnlib.data.features import FeatureSpec
from churnlib.data.generation import generate
from churnlib.data.preparation import prepare
from churnlib.data.sources import check_columns, resolve_source
from churnlib.model.packaging import log_model, package_version
from churnlib.runtime import (
    check_resources,
    ensure_ray,
    fixed_resources,
    quiet_logs,
    ray_to_join,
    release_ray,
)
from churnlib.tags import TAG_COMMAND, TAG_ENGINE, TAG_RESUMED_FROM
from churnlib.train.decide import (
    calibration_line,
    contact_line,
    contact_metrics,
    decide,
)
from churnlib.train.loop import check_checkpoint, xgb_log_name
from churnlib.train.progress import LocalRelay, ProgressRelay
from churnlib.train.result import TrainResult
from churnlib.train.task import TaskRun, boosts_here, check_fits, engine_line, largest_node_cpus, uses_task
from churnlib.train.trainer import (
    build_trainer,
    fit,
    latest_checkpoint,
    loop_config,
    outcome_metrics,
)

if TYPE_CHECKING:
    from churnlib.config import Config

class NotInProcess(Exception):
    """The workspace trainer declines a table it should not boost in process (``train(in_trainer=True)``):
    the command runs it on the instance as any other command would."""


def default_data_path(cfg: Config) -> Path:
    """The generated table for the embedded default (made once per rows/seed)."""
    path = cfg.workspace_path / "data" / f"churn_generated_{cfg.data.generate_rows}_s{cfg.data.generate_seed}.parquet"
    if not path.exists():
        generate(cfg.data.generate_rows, path, seed=cfg.data.generate_seed)
    return path


def progress_printer(say: Callable[[str], None], stopping_metric: str) -> Callable[[dict[str, Any]], None]:
    """A callback that prints a progress line from a worker's progress report."""
    key = f"valid-{xgb_log_name(stopping_metric)}"

    def show(msg: dict[str, Any]) -> None:
        if msg.get("kind") == "round":
            m = msg["metrics"]
            others = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("valid-") and k != key)
            best = msg["best_score"]
            say(
                f"  round {msg['iteration'] + 1:>4}/{msg['rounds']}  {key} {m.get(key, float('nan')):.4f}  {others}"
                f"  (best {best:.4f} at {msg['best_iteration'] + 1})"
            )
        elif msg.get("kind") == "checkpoint":
            say(f"  checkpoint at round {msg['iteration'] + 1}")

    return show


def train(
    cfg: Config,
    data_path: str | None = None,
    run_name: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = say,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    in_trainer: bool = False,
    reserve: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> TrainResult:
    """Data -> validation -> boosting on Ray (Ray Train, or one task for a small table:
    ``churnlib.train.task``) -> MLflow run with the model. The `churn train` command.

    ``in_trainer``: called by the workspace trainer (``churnlib.train.warm``), a process that
    is part of a Ray instance and boosts a small table itself (``engine: auto``, as with no Ray
    up); a table it should not boost in process raises ``NotInProcess`` before any run is made.
    ``reserve``: entered around the boosting in process (the trainer holds the CPUs there)."""
    import mlflow

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    quiet_logs(verbose)
    spec = FeatureSpec.from_config(cfg.features)
    data_uri = data_path or cfg.data.path
    if data_uri is not None:
        source = resolve_source(data_uri)  # a missing path: one line, before any network
    if cfg.training.resume_from:
        check_checkpoint(cfg.training.resume_from)
    # A tracking store or artifact store that is down fails here, in seconds, before
    # anything slow (generating data, starting Ray).
    tracking.preflight(cfg)
    if data_uri is None:
        say(f"data: generating {cfg.data.generate_rows} synthetic rows (seed {cfg.data.generate_seed})")
        data_uri = str(default_data_path(cfg))
        timings["generate_s"] = time.perf_counter() - t_start
        source = resolve_source(data_uri)
    columns = check_columns(source, spec)

    # a small table with no Ray instance to join boosts in this process: no instance to start
    here = boosts_here(cfg, source.size_bytes, False if in_trainer else ray_to_join(cfg.ray, cfg.workspace_path))
    if in_trainer and not here:
        raise NotInProcess(f"{source.uri}: {source.size_bytes / 2**20:.0f} MB on disk, over what is boosted in process")

    def start_ray() -> None:
        t0 = time.perf_counter()
        local = ensure_ray(cfg.ray, verbose=verbose, announce=True, workspace=cfg.workspace_path)
        check_resources(cfg.ray, fixed_resources(local), streaming=not cfg.training.materialize)
        timings["ray_start_s"] = time.perf_counter() - t0

    if not here:
        start_ray()

    tags = {TAG_COMMAND: "train", "ray_version": package_version("ray"), "xgboost_version": package_version("xgboost")}
    if cfg.training.resume_from:
        tags[TAG_RESUMED_FROM] = cfg.training.resume_from
    with tracking.tracked_run(cfg, run_name, tags) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        say(f"mlflow: run {run_id} in experiment {cfg.mlflow.experiment_name!r} at {cfg.tracking_uri}")
        tracking.log_params_flat(cfg.flat())
        mlflow.log_text(config_to_yaml(cfg), "config/resolved_config.yaml")

        t0 = time.perf_counter()
        say(f"data: reading and validating {source.uri} ({len(source.files)} {source.format} file(s), {source.size_bytes / 1e6:.1f} MB)")
        prepared = prepare(
            source, spec, columns, cfg.model.validation_split, cfg.model.random_state, cfg.training.materialize,
            # Ray only if the table cannot be read here after all (its problem is named on Ray Data);
            # a Ray Dataset only for Ray Train (below): the one task takes the driver's arrays
            ray_dataset=False, before_ray=start_ray if here else None,
        )
        if here and prepared.local is None:
            here = False
        report = prepared.report
        missing = {c: n for c, n in report.missing.items() if n}
        timings["prepare_s"] = time.perf_counter() - t0
        say(
            f"data: {report.rows} rows, {report.empty_rows} empty row(s) dropped, "
            f"{sum(missing.values())} missing value(s){' in ' + ', '.join(missing) if missing else ''}, "
            f"churn rate {report.positives / max(report.usable_rows, 1):.3f}"
        )
        dataset = tracking.log_dataset(source, spec, context="training")
        mlflow.log_dict(report.to_dict(), "data/validation_report.json")
        t0 = time.perf_counter()
        profile = prepared.profile(spec, cfg.drift.profile_rows, seed=cfg.model.random_state)
        timings["profile_s"] = time.perf_counter() - t0

        if here:
            one_task = True
        else:
            node_cpus = largest_node_cpus()
            one_task = uses_task(cfg, prepared, node_cpus)
            if one_task:
                check_fits(cfg, node_cpus)
        engine = "process" if here else "task" if one_task else "ray_train"
        mlflow.set_tag(TAG_ENGINE, engine)
        say(engine_line(cfg, here, in_trainer) if one_task else (
            f"train: Ray Train, {cfg.ray.num_workers} worker(s) x {cfg.ray.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.ray.use_gpu else ''}, device {cfg.xgb_device}, up to {cfg.xgboost.num_boost_round} rounds"
        ))
        printer = progress_printer(say, cfg.xgboost.early_stopping_metric)

        def handle(msg: dict[str, Any]) -> None:
            printer(msg)
            if on_progress is not None:
                on_progress(msg)

        t0 = time.perf_counter()
        with (LocalRelay(handle) if here else ProgressRelay(handle)) as relay:
            if one_task:
                task = TaskRun(cfg, prepared, loop_config(cfg, spec, relay.sink), here=here)
                run_fit, newest = task.fit, task.latest_checkpoint
            else:
                trainer = build_trainer(cfg, prepared.ray_dataset(), loop_config(cfg, spec, relay.sink))
                run_fit, newest = (lambda: fit(trainer)), (lambda: latest_checkpoint(trainer))
            try:
                with (reserve() if here and reserve is not None else contextlib.nullcontext()):
                    out = run_fit()
            except KeyboardInterrupt:
                relay.close()
                release_ray()  # the workers stop now, before a newer checkpoint replaces this one
                last = newest()
                if last:
                    say(f"train: interrupted; to continue from its last checkpoint: churn train --resume-from {last}")
                raise
        timings["fit_s"] = time.perf_counter() - t0
        state = out.state
        timings["boosting_s"] = state["boosting_seconds"]
        tl = state["timeline"]
        if {"loop_start", "shard_ready", "matrices_ready"} <= set(tl):
            timings["workers_up_s"] = tl["loop_start"]  # controller + worker group + collective
            timings["worker_shard_s"] = tl["shard_ready"] - tl["loop_start"]
            timings["worker_matrices_s"] = tl["matrices_ready"] - tl["shard_ready"]

        best, metrics = outcome_metrics(state, out.full_rounds)
        rows = {
            "total": report.rows,
            "dropped_empty": report.empty_rows,
            "train": prepared.train_rows,
            "valid": prepared.valid_rows,
        }
        metrics.update(
            {
                "train_rows": rows["train"],
                "valid_rows": rows["valid"],
                "dropped_empty_rows": rows["dropped_empty"],
                "total_rows": rows["total"],
                "missing_values": float(sum(missing.values())),
            }
        )
        for col, n in missing.items():
            metrics[f"missing_{col.replace(' ', '_')}"] = n
        tracking.log_history(run_id, state["history"])
        # best/* go to the run and to the logged model at once, below
        mlflow.log_metrics({tracking.grouped(k): float(v) for k, v in metrics.items() if not k.startswith("best_")})
        mlflow.set_tags({"data.digest": source.digest, "data.source": source.uri})

        t0 = time.perf_counter()
        contact = decide(cfg, prepared, out.booster)
        timings["decide_s"] = time.perf_counter() - t0
        say(calibration_line(contact))
        say(contact_line(contact))
        metrics.update(contact_metrics(contact))
        mlflow.log_metrics({tracking.grouped(k): float(v) for k, v in contact_metrics(contact).items()})
        t0 = time.perf_counter()
        logged_uri = log_model(cfg, spec, source, columns, out.booster, best, run_id, profile, contact, report.missing)
        # the model's own metrics are the best iteration's (the booster keeps every round; scoring
        # stops at the best one), measured on the validation split of this dataset
        tracking.log_model_metrics({tracking.grouped(k): v for k, v in metrics.items() if k.startswith("best_")},
                                   logged_uri, dataset)
        timings["log_model_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        mlflow.log_metrics({tracking.grouped(f"time_{k}"): v for k, v in timings.items()})

        result = TrainResult(
            run_id=run_id,
            experiment_id=experiment_id,
            model_uri=f"runs:/{run_id}/model",
            booster_uri=f"runs:/{run_id}/booster/booster.ubj",
            metrics={k: float(v) for k, v in metrics.items()},
            best_iteration=best,
            num_boosted_rounds=out.full_rounds,
            rows=rows,
            timings=timings,
            data_digest=source.digest,
            restarts=state["restarts"],
            engine=engine,
            extra={"logged_model_uri": logged_uri, "checkpoint_path": out.checkpoint_path},
        )
    return result
