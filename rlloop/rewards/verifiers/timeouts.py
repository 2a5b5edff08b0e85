"""A per-sample time limit for code running on a process's main thread (where Ray actors run).

It uses ITIMER_REAL/SIGALRM, the same timer math-verify's own timeouts use, so verifiers running under
it must turn math-verify's timeouts off (`parsing_timeout=None`, `timeout_seconds=None`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class SampleTimeout(BaseException):
    """Raised inside a verifier when its sample ran past the per-sample time limit.

    A BaseException so that libraries which swallow `Exception` (math-verify does) cannot hide it.
    """


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise SampleTimeout in the body after `seconds` of wall time; a no-op off the main thread."""
    if not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _on_alarm(signum, frame):
        raise SampleTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
