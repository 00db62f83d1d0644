"""What a sweep records beside Tune's experiment folder so that ``--resume NAME`` alone continues it.

The data, its digest, the full config, ``--register-best`` and the time spent so
far; a resume on other data is refused unless ``--force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import threading
from typing import Any

from churnlib.config import Config, load_config
from churnlib.data.sources import filesystem

# The sweep's own record (parent run, trial -> run, ended trials), kept NEXT TO
# Tune's experiment folder, not in it: Tune syncs that folder from its staging
# copy, which would put back an old version of a file kept there.
STATE_SUFFIX = ".churn_sweep.json"

# write_state reads, merges and writes; the Tune loop and the trials' MLflow writer thread both do
_WRITING = threading.Lock()


def state_filesystem(path: str):
    """The filesystem and path of a sweep record (local or ``s3://``)."""
    return filesystem(path)


def read_state(path: str) -> dict[str, Any]:
    """The sweep record at ``path`` ({} when there is none)."""
    import pyarrow.fs as pafs

    fs, p = state_filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return {}
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def write_state(path: str, update: dict[str, Any]) -> None:
    """Merge ``update`` into the sweep record at ``path``.

    A reader (another thread, or a resume) sees the old record or the new one, never a file
    cut short: a local record is written beside and renamed over; an object store makes the
    object whole when the upload ends."""
    import pyarrow.fs as pafs

    with _WRITING:
        state = {**read_state(path), **update}
        fs, p = state_filesystem(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        data = json.dumps(state, indent=2).encode()
        if not isinstance(fs, pafs.LocalFileSystem):
            with fs.open_output_stream(p) as f:
                f.write(data)
            return
        staging = f"{p}.{os.getpid()}.tmp"
        try:
            with fs.open_output_stream(staging) as f:
                f.write(data)
            fs.move(staging, p)
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_file(staging)
            raise


def resumed_config(current: Config, previous: dict[str, Any]) -> Any:
    """The configuration a sweep started with; where MLflow is and how to reach Ray come from now."""
    stored = previous.get("config")
    if not stored:  # a sweep recorded before configurations were stored
        return current
    stored = {**stored, "mlflow": current.mlflow.model_dump(mode="json"),
              "ray": {**stored["ray"], "address": current.ray.address}}
    return Config.model_validate(stored)


def resume_command(cfg: Config, name: str) -> str:
    """The command that resumes a sweep: its name, and where to find it if not in the default place."""
    default = load_config(env={})
    parts = ["churn tune --resume", shlex.quote(name)]
    if cfg.training.storage_path:
        parts.append("--set " + shlex.quote(f"training.storage_path={cfg.training.storage_path}"))
    elif cfg.workspace_path != default.workspace_path:
        parts.append("--set " + shlex.quote(f"workspace={cfg.workspace_path}"))
    return " ".join(parts)
