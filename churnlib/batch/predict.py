"""``churn predict``: score a table of any size with the champion, in one streaming pass.

read (CSV/Parquet, local or s3://) -> ``PredictUDF`` (``batch.udf``) -> write Parquet,
on one of two engines (``scoring.engine``): one Ray task streaming the table through
three threads (``batch.task``; ``auto`` on one node), or Ray Data's actor pool (the
model held once per actor; ``auto`` on several nodes). Each output row: the customer
id, P(churn), the label, the expected net value of contacting the customer and whether
to contact them (``churnlib.decision``, with the config's ``decision``), the model name
and version, and with ``--explain`` the top reasons.

The retention decision: ``contact`` is P >= the model's contact threshold (chosen at
training, ``decision.threshold: auto``) or the configured one. When a capacity
(``decision.capacity`` / ``capacity_share`` of the scored customers) is smaller than
the number of such customers, a second pass over the written output keeps only the
highest risks (ties at the cut: the first in the output's file and row order), so
exactly ``capacity`` customers are marked. ``--contacts-only`` writes the call list
instead: the customers to contact, ranked by expected value, in one file.

Rows that cannot be scored (an unknown category, a non-numeric value, every
cell empty) are not dropped silently: the UDF writes them, with the reason
and the raw record, to the rejects folder. Counts and the drift counts travel
to the driver (through a zero-CPU tally actor from the pool, as the one task's
result), so the one pass also feeds the drift report and the progress line;
nothing but counts reaches the driver.

The output is written to a temporary folder next to the target and renamed
into place when complete (a local path), or marked complete with a
``_SUCCESS`` object (s3://); a failure removes the partial output, so no
partial file is ever left looking complete.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from churnlib import interrupts, tracking
from churnlib.batch.drift import log_drift
from churnlib.batch.task import MAX_RETRIES, alive_nodes, score_in_task, task_cpus, task_threads, uses_task
from churnlib.batch.udf import PredictUDF, _Tally
from churnlib.console import say as default_say
from churnlib.data.preparation import id_arrow_type
from churnlib.data.profiles import compare, merge_counts, summary_line
from churnlib.data.sources import check_columns, filesystem, read_raw, resolve_source
from churnlib.data.validation import as_data_error
from churnlib.decision.value import Decision
from churnlib.errors import DataError, LogStoreError, ResourceError
from churnlib.model import loading
from churnlib.model.scoring import actor_pool, put_payloads
from churnlib.predlog.store import LogStore
from churnlib.runtime import ensure_ray, quiet_logs
from churnlib.tags import TAG_COMMAND, TAG_MODEL_URI, TAG_MODEL_VERSION

if TYPE_CHECKING:
    from churnlib.config import Config

SUCCESS_MARKER = "_SUCCESS"


EXPLAIN_BATCH_ROWS = 4096


BLOCK_BYTES = 16 * 2**20


@dataclass
class PredictResult:
    """What `churn predict` did: counts (scored, rejected, empty), output paths, the model, drift, speed."""
    output: str
    rejects: str | None
    model_uri: str
    model_version: str | None
    counts: dict[str, int]
    seconds: float
    run_id: str | None = None
    drift: list[dict[str, Any]] = field(default_factory=list)
    # the retention decision: threshold, capacity, contacts (and how many more were above the
    # threshold), their expected value, and whether the output is the call list alone
    decision: dict[str, Any] | None = None

    @property
    def rows_per_s(self) -> float:
        return self.counts.get("rows", 0) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "rejects": self.rejects, "model_uri": self.model_uri,
                "model_version": self.model_version, "counts": self.counts, "seconds": round(self.seconds, 3),
                "rows_per_s": round(self.rows_per_s, 1), "run_id": self.run_id, "drift": self.drift,
                "decision": self.decision}


def _staging(output: str):
    """-> (filesystem, final path, staging path, local?) for an output folder."""
    import pyarrow.fs as pafs

    fs, final = filesystem(output.rstrip("/"))
    local = isinstance(fs, pafs.LocalFileSystem)
    if fs.get_file_info(final).type != pafs.FileType.NotFound:
        raise DataError(f"output {output} already exists; choose a new path (nothing is overwritten)")
    parent, _, name = final.rpartition("/")
    staging = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if local else final
    return fs, final, staging, local


def predict(
    cfg: Config,
    input_path: str,
    output_path: str,
    model_uri: str | None = None,
    explain: bool = False,
    rejects_path: str | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = default_say,
    contacts_only: bool = False,
) -> PredictResult:
    """Score ``input_path`` into the Parquet folder ``output_path`` (see the module doc); with
    ``contacts_only``, write the call list: the customers to contact, ranked by expected value."""
    import mlflow

    quiet_logs(verbose)
    t_start = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc)
    source = resolve_source(input_path)
    rejects_path = rejects_path or f"{output_path.rstrip('/')}_rejects"
    fs, final, staging, local = _staging(output_path)
    rfs, rfinal, rstaging, rlocal = _staging(rejects_path)
    tracking.preflight(cfg)
    uri = model_uri or f"models:/{cfg.model.registered_name}@{cfg.serve.alias}"
    model = loading.load(uri)
    predictor = model.predictor
    predictor.meta = {**predictor.meta, "registered_name": model.ref.name or predictor.meta.get("model_name"),
                      "version": model.ref.version or (model.ref.run_id or "")[:12]}
    say(f"model: {model.ref.describe()} (training run {model.ref.run_id})")
    spec = predictor.spec
    columns = check_columns(source, spec, need_target=False)
    ensure_ray(cfg.ray, verbose=verbose, workspace=cfg.workspace_path)
    scoring, cpus = _plan(cfg.scoring, say)
    explain_top = cfg.scoring.explain_top if explain else 0
    tags = {TAG_COMMAND: "predict", TAG_MODEL_URI: uri, "data.source": source.uri, "data.digest": source.digest}
    if model.ref.version:
        tags[TAG_MODEL_VERSION] = str(model.ref.version)
    # The run covers the scoring: an interrupt or a failure ends it KILLED or FAILED.
    with tracking.tracked_run(cfg, f"predict-{model.ref.name or 'model'}-v{model.ref.version or '?'}", tags) as run:
        decision, note = predictor.run_decision(Decision.from_config(cfg.decision))
        if note:
            say(note)
        contact_threshold = predictor.contact_threshold(cfg.decision.fixed_threshold, decision)
        tracking.log_params_flat({"input": source.uri, "output": output_path, "model_uri": uri,
                                  "explain_top": explain_top, "contacts_only": contacts_only,
                                  **{f"decision.{k}": v for k, v in cfg.decision.model_dump().items()}})
        counts, drift_parts, chosen = _score_to(
            source, spec, columns, predictor, scoring, explain_top, cfg.scoring.drift, (fs, final, staging, local),
            (rfs, rfinal, rstaging, rlocal), t_start, output_path, say, decision, contacts_only, contact_threshold,
            cpus)
        seconds = time.perf_counter() - t_start
        rejected = counts.get("rejected", 0)
        result = PredictResult(output_path, rejects_path if rejected else None, uri, model.ref.version, counts,
                               seconds, run_id=run.info.run_id, decision=chosen)
        say(f"predict: {counts['rows']} rows, {counts['scored']} scored, {rejected} rejected"
            + (f" ({counts.get('empty', 0)} empty)" if counts.get("empty") else "")
            + (f" -> {rejects_path}" if rejected else "") + f"; {seconds:.1f} s ({result.rows_per_s:,.0f} rows/s)")
        cut = f"P >= {chosen['threshold']:.4g}" if chosen["threshold"] is not None else "no cut paid at training"
        say(f"decision: {chosen['contacts']} of {counts['scored']} customers to contact ({cut}"
            + (f", capacity {chosen['capacity']}: {chosen['above_threshold'] - chosen['contacts']} more above it"
               if chosen["capacity"] is not None and chosen["above_threshold"] > chosen["contacts"] else "")
            + f"), expected value {chosen['expected_value']:,.0f}"
            + (f"; the call list -> {output_path}" if contacts_only else ""))
        mlflow.log_param("rejects", result.rejects or "")
        mlflow.log_metrics({**{f"rows/{'total' if k == 'rows' else k}": float(v) for k, v in counts.items()},
                            "time/total_s": seconds, "speed/rows_per_s": result.rows_per_s,
                            "decision/contacts": float(chosen["contacts"]),
                            "decision/above_threshold": float(chosen["above_threshold"]),
                            "decision/expected_value": float(chosen["expected_value"])})
        if drift_parts and predictor.profile is not None:
            drifts = compare(predictor.profile, merge_counts(drift_parts), cfg.drift.psi_moderate,
                                       cfg.drift.psi_major)
            say(summary_line(drifts))
            result.drift = [d.to_dict() for d in drifts]
            log_drift(drifts, cfg.drift.psi_moderate, cfg.drift.psi_major)
        elif cfg.scoring.drift and predictor.profile is None:
            say("drift: the model carries no training profile (trained before profiles were stored); no drift report")
        _record_run(cfg, result, run.info.run_id, started_at, source.uri, model, contacts_only, say)
    return result


def _record_run(cfg: Config, result: PredictResult, run_id: str, started_at: dt.datetime, input_uri: str,
                model: Any, contacts_only: bool, say: Callable[[str], None]) -> None:
    """The run in the prediction log: one row pointing at its Parquet output (``churn monitor``
    reads the scores there; millions of rows are not copied through SQL). A log that cannot be
    reached costs a line, not the scores."""
    store = LogStore(cfg.log_uri)
    try:
        store.migrate()
        store.record_run({
            "run_id": run_id, "started": started_at, "finished": dt.datetime.now(dt.timezone.utc),
            "model_name": model.ref.name or model.predictor.meta.get("model_name") or "model",
            "model_version": str(model.ref.version or (model.ref.run_id or "")[:12]),
            "input_uri": input_uri, "output_uri": result.output, "rows_scored": int(result.counts.get("scored", 0)),
            "contacts": None if result.decision is None else int(result.decision["contacts"]),
            "contacts_only": contacts_only,
        })
    except LogStoreError as exc:
        say(f"prediction log: this run is not recorded ({exc}); its scores are in {result.output}")
    finally:
        store.close()


def _score_to(source: Any, spec: Any, columns: list[str], predictor: Any, scoring: Any, explain_top: int,
              drift: bool, out: tuple, rejects: tuple, t_start: float, output_path: str,
              say: Callable[[str], None], decision: Decision, contacts_only: bool,
              contact_threshold: float, cpus: float) -> tuple[dict[str, int], list[dict[str, Any]], dict[str, Any]]:
    """One streaming pass: read -> PredictUDF (one task, or an actor pool) -> Parquet; the capacity and the call list
    applied to the written output; the output moved into place when complete, removed (with the
    rejects) on any failure or interrupt. -> (counts, drift counts, the decision taken)."""
    import ray
    import ray.data

    id_type = (str(id_arrow_type(source, spec.id_column)) if spec.id_column in columns else "string")
    fs, final, staging, local = out
    rfs, rfinal, rstaging, rlocal = rejects
    one_task = scoring.engine == "task"
    # the one-task engine's progress comes from the task, to this actor (a terminal's line only)
    tally = ray.remote(num_cpus=0)(_Tally).remote() if not one_task or sys.stderr.isatty() else None
    where = (f"one Ray task, {task_threads(cpus)} thread(s) (one node: no actor pool to start; "
             f"scoring.engine=ray_data for Ray Data's)" if one_task
             else f"{scoring.actors} actor(s) x {scoring.cpus_per_actor:g} CPU")
    say(f"predict: {source.uri} ({len(source.files)} {source.format} file(s), {source.size_bytes / 1e6:.1f} MB) -> "
        f"{output_path}, {where}" + (f", top {explain_top} reasons" if explain_top else ""))
    context = ray.data.DataContext.get_current()
    block_bytes = context.target_max_block_size
    stop = threading.Event()
    printer = threading.Thread(target=_progress, args=(tally, stop, t_start), daemon=True)
    udf_kwargs = {
        "payloads": put_payloads([predictor]), "columns": columns, "tally": tally, "rejects_fs": rfs,
        "rejects_dir": rstaging, "explain_top": explain_top, "drift": drift,
        "nthread": task_threads(cpus) if one_task else max(1, int(scoring.cpus_per_actor)),
        "id_type": id_type, "decision": decision, "contact_threshold": contact_threshold,
    }
    # explaining costs ~1 ms a row: smaller batches spread it over the actors
    batch_size = min(scoring.batch_size, EXPLAIN_BATCH_ROWS) if explain_top else scoring.batch_size
    ref = None
    try:
        rfs.create_dir(rstaging, recursive=True)
        if tally is not None:
            printer.start()
        if one_task:
            # a process that dies is run again (on an emptied staging folder); an exception is final
            task = ray.remote(score_in_task).options(
                num_cpus=cpus, max_retries=MAX_RETRIES, retry_exceptions=False,
                name=f"churn-predict:{final.rstrip('/').rsplit('/', 1)[-1]}")
            ref = task.remote(udf_kwargs, source, batch_size, (fs, staging))
            counts, drift_parts = interrupts.run_in_thread(ray.get, ref, name="churn-predict")
        else:
            # blocks of ~16 MB (~150,000 rows) rather than Ray Data's 128 MB: every actor
            # gets work, and writing overlaps scoring instead of waiting for the last block
            context.target_max_block_size = min(block_bytes or BLOCK_BYTES, BLOCK_BYTES)
            # CSV cells are read as text: a non-numeric cell is one rejected row, not a failed read
            # (the dataset keeps the context it is built with)
            scored = read_raw(source, spec, columns, typed=False).map_batches(
                PredictUDF, fn_constructor_kwargs=udf_kwargs, compute=actor_pool(scoring),
                num_cpus=scoring.cpus_per_actor, batch_size=batch_size, batch_format="pandas")
            scored.write_parquet(staging, filesystem=fs)
            counts, drift_parts = ray.get(tally.result.remote())
        if counts.get("rows", 0) == 0:
            raise DataError(f"{source.uri}: the table has no rows (a header only?): nothing to score")
        above = int(counts.pop("contacts", 0))
        chosen = {"threshold": contact_threshold if math.isfinite(contact_threshold) else None,
                  "capacity": decision.limit(counts["scored"]),
                  "above_threshold": above, "contacts": above,
                  "expected_value": float(counts.pop("contact_value", 0.0)), "contacts_only": contacts_only}
        if chosen["capacity"] is not None and above > chosen["capacity"]:
            chosen["contacts"], chosen["expected_value"] = limit_contacts(fs, staging, chosen["capacity"])
        if contacts_only:
            call_list(fs, staging)
        # complete: into place, atomically where the filesystem allows it
        if local:
            fs.move(staging, final)
        else:
            _touch(fs, f"{final}/{SUCCESS_MARKER}")
        if counts.get("rejected", 0):
            if rlocal:
                rfs.move(rstaging, rfinal)
            else:
                _touch(rfs, f"{rfinal}/{SUCCESS_MARKER}")
        else:
            _remove(rfs, rstaging)
    except BaseException as exc:
        stop.set()
        if ref is not None:  # the task stops writing before its output is removed
            _cancel(ref)
        _remove(fs, staging)
        _remove(rfs, rstaging)
        if isinstance(exc, (KeyboardInterrupt, DataError)):
            raise
        raise as_data_error(exc, source) from None
    finally:
        context.target_max_block_size = block_bytes
        stop.set()
        if printer.is_alive():
            printer.join(timeout=2)
        if tally is not None:
            ray.kill(tally)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
    return counts, drift_parts, chosen


def _cancel(ref: Any) -> None:
    """Stop the scoring task (its process killed) and wait until it has ended.

    Only a task still running: a force-cancel of one that had ended (a header-only table is
    refused after its task returned) could crash the command's Ray core worker at its exit
    (a C++ check in ``TaskManager::CompletePendingTask``, exit 1 with a stack dump instead of
    the one-line error; seen twice in CI)."""
    import ray

    try:
        ready, _ = ray.wait([ref], timeout=0)
        if ready:  # ended, with its result or its error
            return
        ray.cancel(ref, force=True)
        ray.wait([ref], timeout=30)
    except Exception:  # noqa: BLE001 - already ended, or Ray is going away with it
        pass


def _parquet_files(fs: Any, folder: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def limit_contacts(fs: Any, folder: str, capacity: int) -> tuple[int, float]:
    """Keep ``contact`` only for the ``capacity`` highest P(churn) among the rows that have it, in
    the Parquet files of ``folder`` (rewritten in place): ties at the cut go to the first rows
    in file-name and row order. Two passes in the driver over two narrow columns, then one
    file at a time. -> (contacts, their expected value)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(fs, folder)
    eligible, values = [], []
    for path in files:
        t = pq.read_table(path, columns=["churn_probability", "expected_value", "contact"], filesystem=fs)
        was = t.column("contact").to_numpy(zero_copy_only=False)
        eligible.append(t.column("churn_probability").to_numpy()[was])
        values.append(t.column("expected_value").to_numpy()[was])
    scores = np.concatenate(eligible) if eligible else np.empty(0)
    if len(scores) <= capacity:  # nothing to take away
        return len(scores), float(np.concatenate(values).sum()) if values else 0.0
    cut = float(np.partition(scores, len(scores) - capacity)[len(scores) - capacity])  # the capacity-th highest
    ties_kept = capacity - int((scores > cut).sum())
    kept = 0
    value = 0.0
    for path in files:
        t = pq.read_table(path, filesystem=fs)
        p = t.column("churn_probability").to_numpy()
        was = t.column("contact").to_numpy(zero_copy_only=False)
        now = was & (p > cut)
        ties = np.flatnonzero(was & (p == cut))
        take = ties[: max(0, ties_kept - kept)]
        now[take] = True
        kept += len(take)
        value += float(t.column("expected_value").to_numpy()[now].sum())
        t = t.set_column(t.schema.get_field_index("contact"), "contact", pa.array(now))
        pq.write_table(t, path, filesystem=fs)
    return capacity, value


def call_list(fs: Any, folder: str) -> int:
    """Replace the Parquet files of ``folder`` with the call list: the rows to contact, highest
    expected value first (ties in file and row order), ranked from 1, in one file. -> its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _parquet_files(fs, folder)
    parts = []
    schema = None
    for path in files:
        t = pq.read_table(path, filesystem=fs)
        schema = t.schema
        parts.append(t.filter(t.column("contact")))
    if schema is None:
        return 0
    table = pa.concat_tables(parts)
    order = np.argsort(-table.column("expected_value").to_numpy(), kind="stable")
    table = table.take(pa.array(order)).drop_columns(["churn_label", "contact"])
    table = table.add_column(1, "rank", pa.array(np.arange(1, len(order) + 1, dtype=np.int64)))
    pq.write_table(table, f"{folder}/call_list.parquet", filesystem=fs)
    for path in files:
        fs.delete_file(path)
    return table.num_rows


def _plan(scoring: Any, say: Callable[[str], None]) -> tuple[Any, float]:
    """-> (``scoring`` with its engine chosen and as many actors as the free CPUs hold next to
    one read/write task, the CPUs of the one task).

    Ray Data sizes its budget from the cluster's total resources: if other work
    (a Serve replica, another job) holds CPUs, actors that take the rest leave
    the read tasks waiting forever. Fewer actors (or a task of fewer CPUs), said on
    one line, or a clear error when not even one CPU is free.
    """
    import ray

    engine = "task" if uses_task(scoring, alive_nodes()) else "ray_data"
    scoring = scoring.model_copy(update={"engine": engine})
    free = float(ray.available_resources().get("CPU", 0.0))
    cpus = task_cpus(scoring, free)
    read_cpus = 1.0  # Ray Data's read and write tasks
    fits = int((free - read_cpus) // scoring.cpus_per_actor + 1e-9)
    if (cpus if engine == "task" else fits) < 1:
        total = float(ray.cluster_resources().get("CPU", 0.0))
        need = ("1 for the scoring task" if engine == "task"
                else f"{scoring.cpus_per_actor:g} per actor + {read_cpus:g} for reading")
        raise ResourceError(
            f"not enough free CPUs to score: {free:g} of {total:g} free, {need} needed "
            f"(other work holds the rest; lower scoring.cpus_per_actor or free CPUs)")
    if engine == "task":
        if cpus < task_cpus(scoring, float("inf")):
            say(f"predict: {free:g} CPU(s) free, so the scoring task takes {cpus:g}")
        return scoring, cpus
    if fits >= scoring.actors:
        return scoring, cpus
    say(f"predict: {free:g} CPU(s) free, so {fits} scoring actor(s) instead of {scoring.actors}")
    return scoring.model_copy(update={"actors": fits}), cpus


def _progress(tally: Any, stop: threading.Event, t0: float) -> None:
    """A progress line on a terminal (counts from the tally actor, once a second)."""
    import ray

    if not sys.stderr.isatty():
        return
    while not stop.wait(1.0):
        try:
            p = ray.get(tally.progress.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort
            continue
        if not p["rows"]:
            continue  # actors still starting: no "0 rows read" line, the first count comes with rows
        elapsed = time.perf_counter() - t0
        sys.stderr.write(f"\r  {p['rows']:,} rows read, {p['scored']:,} scored, {p['rejected']:,} rejected "
                         f"({p['rows'] / max(elapsed, 1e-9):,.0f} rows/s)   ")
        sys.stderr.flush()


def _remove(fs: Any, path: str) -> None:
    import pyarrow.fs as pafs

    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError:
        pass


def _touch(fs: Any, path: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(b"")
