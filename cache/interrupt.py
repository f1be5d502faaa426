"""SIGINT and SIGTERM as an exception that unwinds the command, so every `finally` and `with` block runs.

A long command stopped by Ctrl-C or by a scheduler's SIGTERM must leave what a kill -9 leaves at worst (the
last checkpoint, complete files, hidden temporaries) and better: temporaries removed, the output lock
released, and one line saying what to do. Python's default is a KeyboardInterrupt traceback for SIGINT and an
instant death without clean-up for SIGTERM. While `termination_raises()` is active both raise `Interrupted`,
a BaseException (so no `except Exception` swallows it) that the command layer turns into
`interrupted: rerun the same command to resume` and exit code 128 + signal (130 for SIGINT, 143 for SIGTERM).

Only the first signal raises; later ones (a second Ctrl-C, the launcher forwarding the same SIGTERM) are
ignored while the command unwinds, so the clean-up itself is not interrupted. `received()` tells whether a
signal came, so an error that a signal caused indirectly (a peer rank gone, a collective failing) is still
reported as the interruption it is.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
MESSAGE = "interrupted: rerun the same command to resume"
_state: dict[str, Any] = {"signum": None, "depth": 0}


class Interrupted(BaseException):
    """The command received SIGINT or SIGTERM."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def received() -> int | None:
    """The signal that interrupted the running command, if one did."""
    return _state["signum"]


def _handler(signum: int, frame: Any) -> None:
    if _state["signum"] is not None:
        return   # already unwinding
    _state["signum"] = signum
    raise Interrupted(signum)


@contextmanager
def termination_raises() -> Iterator[None]:
    """While active (in the main thread), SIGINT and SIGTERM raise Interrupted; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["depth"] == 0
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    if outermost:
        _state["signum"] = None
        for sig in SIGNALS:
            signal.signal(sig, _handler)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if outermost:
            for sig, old in previous.items():
                signal.signal(sig, old)
