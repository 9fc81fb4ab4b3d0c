"""Tracking calls that survive a tracking-server outage: transient-error retries and a trial's outbox.

A trial must neither fail nor lose a metric because the MLflow server is down for a while (a restart,
a network blip), and its training must not stall on every metric row meanwhile. Two pieces do that:
`call_with_retry` retries a tracking call while its error is transient (connection refused or reset,
timeouts, HTTP 5xx, SQLite "database is locked") with capped exponential backoff, for up to
`outage_budget_s()` seconds (env S4MC_TRACKING_OUTAGE_S, default 900 s: longer than a server restart or
a node reboot; docs/sweeps.md, "Tracking outages"), then raises; any other error raises at once.
`Outbox` is one background thread per trial that runs queued calls (each retrying itself through
`call_with_retry`) in order: the trainer's per-step metric rows go there and the training thread goes on.
`drain` waits until everything queued was sent; the tracker drains before it logs artifacts and
closes the run, so the trial waits for the server at its end instead of failing, and nothing is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_OUTAGE_S = 900.0
BACKOFF_START_S, BACKOFF_MAX_S = 0.1, 10.0  # a locked SQLite commit clears in ms; a server restart in s
# What an unreachable or restarting server looks like through MLflow's REST client (requests / urllib3
# messages wrapped in MlflowException) and through SQLAlchemy on a busy SQLite file.
TRANSIENT_MARKERS = (
    "database is locked", "Max retries exceeded", "Connection refused", "Connection aborted",
    "Connection reset", "RemoteDisconnected", "Read timed out", "timed out", "Failed to establish",
    "Temporary failure", "Service Unavailable", "Bad Gateway", "Gateway Timeout",
    "error code 500", "error code 502", "error code 503", "error code 504", "too many 5",
)
_STOP = object()


def outage_budget_s() -> float:
    try:
        return float(os.environ.get("S4MC_TRACKING_OUTAGE_S", DEFAULT_OUTAGE_S))
    except ValueError:
        return DEFAULT_OUTAGE_S


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in TRANSIENT_MARKERS)


def call_with_retry(fn: Callable[..., Any], *args: Any, budget_s: float | None = None, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), retried while it fails transiently and the outage budget lasts."""
    deadline = time.monotonic() + (outage_budget_s() if budget_s is None else budget_s)
    delay, warned = BACKOFF_START_S, False
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            if not warned and "database is locked" not in str(exc):
                log.warning("tracking store unavailable (%s); retrying for up to %.0f s",
                            str(exc).splitlines()[0][:200], deadline - time.monotonic())
                warned = True
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_MAX_S)


class Outbox:
    """Runs queued tracking calls on one background thread, in order; a call retries itself
    (`call_with_retry`), and one that still fails is recorded and does not stop the others."""

    def __init__(self, name: str = "tracking"):
        self._queue: queue.Queue = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"s4mc-outbox-{name}", daemon=True)
        self._thread.start()

    def put(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if not self._thread.is_alive():  # closed: run it here rather than drop it
            fn(*args, **kwargs)
            return
        self._queue.put((fn, args, kwargs))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                try:
                    fn(*args, **kwargs)
                except Exception as exc:  # past the outage budget, or a permanent error: keep the others
                    self._errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                    log.warning("tracking call dropped: %s", self._errors[-1])
            finally:
                self._queue.task_done()

    def drain(self) -> list[str]:
        """Waits until every queued call ran; returns (and forgets) the errors of calls that failed."""
        if self._thread.is_alive():
            self._queue.join()
        errors, self._errors = self._errors, []
        return errors

    def close(self) -> list[str]:
        errors = self.drain()
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        return errors
