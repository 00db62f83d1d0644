"""The one-task engine of `churn predict`: a table scored in one Ray task, streaming.

Ray Data's actor pool is what a cluster of many nodes needs: read tasks and
scoring actors spread over every node. On one node (a laptop, a single VM) the
same pool costs new processes (the executor's read and write tasks, each
actor, the tally actor) and a copy of every block through the object store,
for nothing one process cannot do: on this 2-core machine a 2M-row table took
2.3x the time of a plain script. This engine runs the same ``PredictUDF`` (the
same encoding, rejects, decision, drift counts and output columns) in one Ray
task that holds the CPUs the pool and its read task would have held, as a
pipeline of three threads joined by short queues:

    read (Parquet row groups / CSV blocks, ``batch_size`` rows)
      -> score (XGBoost, every thread of the task)
      -> write (Parquet parts of ``PART_ROWS`` rows into the staging folder)

Reading and writing (pyarrow) and predicting (XGBoost) release the GIL, so
they overlap; at most ``QUEUE_BATCHES`` batches wait between two stages, so
memory stays flat whatever the table's size. A task whose process dies is run
again by Ray (``MAX_RETRIES``) and starts over on an emptied staging folder:
the output is never a mix of two attempts.

``scoring.engine`` chooses: ``auto`` (this engine on a one-node cluster, Ray
Data's pool on more), ``task`` or ``ray_data``.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

from churnlib.batch.udf import PredictUDF, _Tally
from churnlib.data.sources import iter_frames

if TYPE_CHECKING:
    from churnlib.config import ScoringConfig
    from churnlib.data.sources import Source

# rows per output file: small enough that the capacity pass rewrites one file at a time in
# little memory, large enough that a 10M-row table is ten files, not hundreds
PART_ROWS = 1_048_576
# batches waiting between two stages of the pipeline (memory: a few batches, at any size)
QUEUE_BATCHES = 2
# a task whose process dies is started again this many times (Ray's default for tasks)
MAX_RETRIES = 3
# Ray Data's read and write tasks hold a CPU beside the actor pool; this task holds it too
READ_TASK_CPUS = 1.0


def alive_nodes() -> int:
    """How many live nodes with CPUs the cluster has."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def uses_task(scoring: ScoringConfig, nodes: int) -> bool:
    """Whether ``scoring.engine`` scores in one task: ``auto`` on a one-node cluster."""
    if scoring.engine == "auto":
        return nodes <= 1
    return scoring.engine == "task"


def task_cpus(scoring: ScoringConfig, free: float) -> float:
    """The CPUs the task holds: what the actor pool and its read task would (``actors x
    cpus_per_actor + 1``), or the free ones when fewer are free (at least one)."""
    return min(scoring.actors * scoring.cpus_per_actor + READ_TASK_CPUS, free)


def task_threads(cpus: float) -> int:
    """XGBoost threads for a task holding ``cpus`` CPUs."""
    return max(1, int(cpus + 0.5))


# The pipeline ------------------------------------------------------------------------------

_END = object()


class _Stage(threading.Thread):
    """A pipeline thread: an error is kept for the main thread, which re-raises it."""

    def __init__(self, name: str, work: Callable[[], None]):
        super().__init__(name=name, daemon=True)
        self.work, self.error = work, None

    def run(self) -> None:
        try:
            self.work()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping (-> False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stage: _Stage) -> Any:
    """The next item; the end if the stage feeding the queue died."""
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            if not stage.is_alive():
                try:
                    return q.get_nowait()
                except queue.Empty:
                    return _END


class PartWriter:
    """Parquet parts ``part-00000.parquet``, ... of ``PART_ROWS`` rows each, in ``folder``."""

    def __init__(self, fs: Any, folder: str):
        self.fs, self.folder = fs, folder
        self.part, self.rows, self.writer, self.stream = 0, 0, None, None

    def write(self, table: Any) -> None:
        import pyarrow.parquet as pq

        if self.writer is not None and self.rows >= PART_ROWS:
            self.close()
            self.part += 1
        if self.writer is None:
            self.stream = self.fs.open_output_stream(f"{self.folder}/part-{self.part:05d}.parquet")
            self.writer = pq.ParquetWriter(self.stream, table.schema)
            self.rows = 0
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            self.writer = self.stream = None


def _empty_folder(fs: Any, folder: str) -> None:
    """The folder, emptied (a retried task starts over) or made."""
    import pyarrow.fs as pafs

    if fs.get_file_info(folder).type == pafs.FileType.NotFound:
        fs.create_dir(folder, recursive=True)
    else:
        fs.delete_dir_contents(folder, missing_dir_ok=True)


def score_in_task(udf_kwargs: dict[str, Any], source: Source, batch_size: int,
                  out: tuple[Any, str]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The task's body: read -> ``PredictUDF`` -> Parquet parts in ``out`` = (filesystem,
    folder), the three stages overlapping. ``udf_kwargs["tally"]``: the progress actor of a
    terminal's line, or None; the counts are this task's own. -> (counts, drift counts)."""
    fs, folder = out
    _empty_folder(fs, folder)
    _empty_folder(udf_kwargs["rejects_fs"], udf_kwargs["rejects_dir"])
    tally = _Tally()
    udf = PredictUDF(**{**udf_kwargs, "tally": _Forward(tally, udf_kwargs["tally"])})
    spec, columns = udf.spec, udf_kwargs["columns"]
    stop = threading.Event()
    frames: queue.Queue = queue.Queue(QUEUE_BATCHES)
    tables: queue.Queue = queue.Queue(QUEUE_BATCHES)

    def read() -> None:
        for frame in iter_frames(source, spec, columns, batch_size):
            if not _put(frames, frame, stop):
                return
        _put(frames, _END, stop)

    def score() -> None:
        while (frame := _get(frames, reader)) is not _END:
            if not _put(tables, udf(frame), stop):
                return
        _put(tables, _END, stop)

    writer = PartWriter(fs, folder)
    reader, scorer = _Stage("churn-read", read), _Stage("churn-score", score)
    reader.start()
    scorer.start()
    try:
        while (table := _get(tables, scorer)) is not _END:
            writer.write(table)
    finally:
        stop.set()
        reader.join()
        scorer.join()
        writer.close()
    for stage in (reader, scorer):
        if stage.error is not None:
            raise stage.error
    return tally.result()


class _Forward:
    """The UDF's tally inside the task: counted here, and sent on to the progress actor (a
    terminal's progress line) when there is one."""

    def __init__(self, tally: Any, progress: Any):
        self.tally, self.progress = tally, progress

    def add(self, counts: dict[str, int], drift: dict[str, Any] | None) -> None:
        self.tally.add(counts, drift)
        if self.progress is not None:
            self.progress.add.remote(counts, None)
