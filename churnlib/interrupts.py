"""SIGINT and SIGTERM: one way for every command to stop.

Ctrl-C (SIGINT) and SIGTERM (what systemd, Docker and Kubernetes send) both
raise ``Interrupted`` in the main thread, a ``KeyboardInterrupt``, so every
``finally`` and every ``except KeyboardInterrupt`` on the way up runs: MLflow
runs end KILLED (``tracking.tracked_run``), partial outputs are removed,
Serve drains. The CLI then prints ``error: interrupted`` and exits with
128 + the signal number: 130 for SIGINT, 143 for SIGTERM.

Libraries fight over these signals, so the handlers are installed again
after each of them: ``ray.init`` sets SIGTERM to ``sys.exit`` and its C++
core then to a handler that dumps a stack and aborts (exit 134), and Ray
Train's ``fit`` sets SIGINT to its own abort when called from the main thread
(``churnlib.train.trainer.fit`` runs it in a helper thread instead). While Ray Tune runs a
sweep, SIGINT belongs to Tune's graceful stop (it saves the sweep so that
``--resume`` works); SIGTERM is then handed to the same stop.

A second signal while the first one is being handled is ignored (cleanup is
under way); a third ends the process at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT or SIGTERM; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"received": None, "count": 0}


def _on_signal(signum: int, frame: Any) -> None:
    _state["count"] += 1
    if _state["count"] == 1:
        _state["received"] = signum
        raise Interrupted(signum)
    if _state["count"] >= 3:
        os._exit(128 + signum)
    print("stopping (a third signal exits at once)", file=sys.stderr, flush=True)


def _on_sigterm(signum: int, frame: Any) -> None:
    current = signal.getsignal(signal.SIGINT)
    library_stop = callable(current) and current not in (_on_signal, signal.default_int_handler)
    if library_stop and _state["count"] == 0:
        # A library's graceful stop owns SIGINT right now (Ray Tune): ask it the same.
        _state["count"] += 1
        _state["received"] = signum
        current(signal.SIGINT, frame)
        return
    _on_signal(signum, frame)


def install() -> None:
    """Our handlers for SIGINT and SIGTERM (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_sigterm)


def received() -> int | None:
    """The first signal received, if any."""
    return _state["received"]


def interrupted() -> Interrupted:
    """The error for the signal received (SIGINT when a library consumed it unseen)."""
    return Interrupted(_state["received"] or signal.SIGINT)


def reset() -> None:
    """Forget a handled signal (tests run several commands in one process)."""
    _state.update(received=None, count=0)


def run_in_thread(fn: Any, *args: Any, name: str = "churn-work", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a helper thread while the main thread stays free for signals.

    Returns its result or raises its error. A signal raises ``Interrupted``
    here, in the main thread; the helper thread is a daemon and is abandoned
    (its Ray work ends with this process's Ray connection).
    """
    return start_in_thread(fn, *args, name=name, **kwargs).result()


class Beside:
    """Work started on a daemon helper thread (``start_in_thread``) while the main thread does other work."""

    def __init__(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str):
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._target, args=(fn, args, kwargs), name=name, daemon=True)
        self._thread.start()

    def _target(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._box["error"] = exc

    def result(self) -> Any:
        """Wait for it (in short joins: a signal still raises ``Interrupted`` here) and return its
        result or raise its error."""
        while self._thread.is_alive():
            self._thread.join(0.2)
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("result")


def start_in_thread(fn: Any, *args: Any, name: str = "churn-work", **kwargs: Any) -> Beside:
    """``fn(*args, **kwargs)`` started now on a daemon helper thread; ``.result()`` waits for it."""
    return Beside(fn, args, kwargs, name)
