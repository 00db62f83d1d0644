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
from typing import TYPE_CHECKING, Any, Callable, Iterator

from churnlib.batch.udf import PredictUDF, _Tally
from churnlib.data.sources import _csv_convert
from churnlib.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from churnlib.config import ScoringConfig
    from churnlib.data.features import FeatureSpec
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


# Reading -----------------------------------------------------------------------------------


def iter_frames(source: Source, spec: FeatureSpec, columns: list[str], batch_size: int) -> Iterator[pd.DataFrame]:
    """The table's rows as pandas frames of at most ``batch_size`` rows, file after file, as
    ``read_raw(typed=False)`` reads them (the same columns, types and nulls): Parquet by
    row-group batches, CSV by pyarrow's streaming reader (numeric cells as text: a
    non-numeric cell is one rejected row). A file that cannot be read is one ``DataError``
    naming it."""
    import pyarrow as pa

    convert = _csv_convert(spec, columns, typed=False) if source.format != "parquet" else None
    for path in source.files:
        try:
            pending: list[Any] = []
            rows = 0
            for batch in _file_batches(source, path, columns, batch_size, convert):
                pending.append(batch)
                rows += batch.num_rows
                while rows >= batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, batch_size).to_pandas()
                    rest = table.slice(batch_size)
                    pending, rows = rest.to_batches(), rest.num_rows
            if rows:
                yield pa.Table.from_batches(pending).to_pandas()
        except (pa.ArrowException, OSError) as exc:
            name = path.rsplit("/", 1)[-1]
            line = " ".join(str(exc).split())
            raise DataError(f"{source.uri}: cannot read the data: {name}: {line[:300]}") from None


def _file_batches(source: Source, path: str, columns: list[str], batch_size: int, convert: Any) -> Iterator[Any]:
    if convert is None:
        import pyarrow.parquet as pq

        with source.filesystem.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)
        return
    import pyarrow.csv as pacsv

    with source.filesystem.open_input_stream(path, compression="detect") as stream:
        reader = pacsv.open_csv(stream, convert_options=convert)
        for batch in reader:
            yield batch.select(columns)


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


def score_in_task(udf_kwargs: dict[str, Any], source: Source, batch_size: int, out: tuple[Any, str],
                  progress: Any = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The task's body: read -> ``PredictUDF`` -> Parquet parts in ``out`` = (filesystem,
    folder), the three stages overlapping. -> (counts, drift counts)."""
    fs, folder = out
    _empty_folder(fs, folder)
    _empty_folder(udf_kwargs["rejects_fs"], udf_kwargs["rejects_dir"])
    tally = _Tally()
    udf = PredictUDF(**{**udf_kwargs, "tally": _Forward(tally, progress)})
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
