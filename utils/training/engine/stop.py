"""Stopping at a step boundary: SIGTERM and a notebook interrupt (SIGINT) ask, the loop saves and returns."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequested:
    """SIGTERM / SIGINT handlers that ask the loop to stop at the next step boundary.
    A second SIGINT raises KeyboardInterrupt at once, for a loop that is stuck."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __enter__(self) -> StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
