"""Progress lines from the training workers to the driver, without waiting on anything.

Workers push to a zero-CPU actor; the driver polls it. In Ray Train V2 each
``ray.train.report`` waits for the controller's poll, so reporting every round would
dominate the run time: reports go to checkpoints only, progress goes through here.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable


class _ProgressSink:
    """A zero-CPU actor holding progress messages until the driver drains them."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def push(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class ProgressRelay:
    """Driver side: starts the sink actor and a thread that hands messages to ``on_message``."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], interval_s: float = 0.5):
        import ray

        self.sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
        self._on_message = on_message
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="churn-progress", daemon=True)

    def __enter__(self) -> "ProgressRelay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread, hand over what is left, remove the actor (once; safe after ray.shutdown)."""
        import ray

        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if ray.is_initialized():
            self._flush()
            with contextlib.suppress(Exception):
                ray.kill(self.sink)

    def _flush(self) -> None:
        import ray

        try:
            items = ray.get(self.sink.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - progress is best effort
            return
        for item in items:
            try:
                self._on_message(item)
            except Exception:  # noqa: BLE001
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush()


class _Call:
    """``push.remote(item)`` of the sink actor, done at once in this process."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self._fn = fn

    def remote(self, item: dict[str, Any]) -> None:
        try:
            self._fn(item)
        except Exception:  # noqa: BLE001 - progress is best effort
            pass


class _LocalSink:
    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.push = _Call(fn)


class LocalRelay:
    """``ProgressRelay`` for boosting in this process (``training.engine: process``): the sink
    hands each message straight to ``on_message``, no actor, no thread."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None]):
        self.sink = _LocalSink(on_message)

    def __enter__(self) -> "LocalRelay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to stop (as ``ProgressRelay.close``)."""
