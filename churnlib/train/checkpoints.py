"""Checkpoint folders of a training run, in Ray Train's layout, for both engines.

Ray Train writes ``<storage_path>/<run>/checkpoint_<timestamp>/`` holding the
booster (``model.ubj``) and the training state (``train_state.json``); the
one-task engine (``churnlib.train.task``) writes the same folders itself, so
``--resume-from``, the interrupt's hint and a restart after a failure find a
checkpoint the same way whichever engine wrote it. Local or ``s3://``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from churnlib.data.sources import filesystem
from churnlib.errors import ChurnError
from churnlib.train.loop import MODEL_FILE, STATE_FILE, check_checkpoint

CHECKPOINT_PREFIX = "checkpoint_"


def _is_local(fs: Any) -> bool:
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def checkpoints_in(run_dir: str) -> list[str]:
    """The checkpoint folders under a run's folder, oldest first (``checkpoint_<timestamp>`` names sort in time)."""
    import pyarrow.fs as pafs

    try:
        fs, root = filesystem(run_dir)
        found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                 if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]
    except (OSError, ChurnError):
        return []
    scheme = "" if _is_local(fs) else run_dir.split("://")[0] + "://"
    return [f"{scheme}{p}" for p in sorted(found)]


def latest_in(run_dir: str) -> str | None:
    """The newest complete checkpoint under a run's folder (the newest may be half written), if any."""
    for uri in reversed(checkpoints_in(run_dir)):
        try:
            check_checkpoint(uri)
        except ChurnError:
            continue
        return uri
    return None


def write_checkpoint(run_dir: str, booster: Any, state: dict[str, Any], keep: int | None) -> str:
    """A checkpoint folder under ``run_dir``, complete before it can be found; the oldest beyond
    ``keep`` removed -> its URI. Locally it is written under a hidden name and renamed; on object
    storage the state file goes last (a checkpoint is complete when both files are there)."""
    name = f"{CHECKPOINT_PREFIX}{datetime.now().strftime('%Y-%m-%d_%H-%M-%S.%f')}"
    fs, root = filesystem(run_dir)
    with tempfile.TemporaryDirectory() as d:
        booster.save_model(os.path.join(d, MODEL_FILE))
        Path(d, STATE_FILE).write_text(json.dumps(state))
        if _is_local(fs):
            os.makedirs(root, exist_ok=True)
            hidden = os.path.join(root, f".writing-{name}")
            shutil.copytree(d, hidden)
            os.replace(hidden, os.path.join(root, name))
            uri = os.path.join(root, name)
        else:
            dest = f"{root.rstrip('/')}/{name}"
            fs.create_dir(dest)
            for file in (MODEL_FILE, STATE_FILE):
                with open(os.path.join(d, file), "rb") as src, fs.open_output_stream(f"{dest}/{file}") as out:
                    out.write(src.read())
            uri = f"{run_dir.split('://')[0]}://{dest}"
    if keep:
        for old in checkpoints_in(run_dir)[:-keep]:
            with contextlib.suppress(OSError, ChurnError):
                ofs, opath = filesystem(old)
                ofs.delete_dir(opath)
    return uri


def read_checkpoint_state(uri: str) -> dict[str, Any]:
    """The training state of a checkpoint folder alone (no booster: no XGBoost to import)."""
    fs, root = filesystem(uri)
    with fs.open_input_stream(f"{root.rstrip('/')}/{STATE_FILE}") as f:
        return json.loads(f.read())


def read_checkpoint(uri: str) -> tuple[Any, dict[str, Any]]:
    """The booster and training state of a checkpoint folder (either engine's), without Ray Train."""
    import xgboost as xgb

    fs, root = filesystem(uri)
    with fs.open_input_stream(f"{root.rstrip('/')}/{MODEL_FILE}") as f:
        raw = f.read()
    with fs.open_input_stream(f"{root.rstrip('/')}/{STATE_FILE}") as f:
        state = json.loads(f.read())
    booster = xgb.Booster()
    booster.load_model(bytearray(raw))
    return booster, state


