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

Python runs a signal handler between any two bytecodes, so three places need care:
- a few steps must not be cut in two (a temporary file created but not yet in the hands of the code that
  removes it): inside `deferred()` a signal is held and raised when the section ends;
- code that C calls back (HDF5 writing through cache.guarded_file) must return normally, or the library is
  left broken: a signal landing in a module of HELD_MODULES is kept until the caller asks with
  `raise_pending()`;
- an exception raised inside a `__del__` or another finaliser is swallowed by Python ("Exception ignored
  in ..."): a signal landing in a `__del__` is not raised there but delivered again a moment later, and the
  unraisable-exception hook does the same for any other finaliser that swallowed it.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
MESSAGE = "interrupted: rerun the same command to resume"
_state: dict[str, Any] = {"signum": None, "depth": 0, "defer": 0, "pending": None}
HELD_MODULES = frozenset({"cache.guarded_file"})


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
    if _in_finaliser(frame):
        _deliver_again(signum)
        return
    _state["signum"] = signum
    if _state["defer"] or _in_held_module(frame):
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def _in_finaliser(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _deliver_again(signum: int) -> None:
    """Send the signal once more in a moment (from a helper thread), when the finaliser is done."""
    threading.Timer(0.01, signal.raise_signal, args=(signum,)).start()


def _in_held_module(frame: Any) -> bool:
    while frame is not None:
        if frame.f_globals.get("__name__") in HELD_MODULES:
            return True
        frame = frame.f_back
    return False


def raise_pending() -> None:
    """Raise the signal that was held in a module of HELD_MODULES, if one was."""
    signum, _state["pending"] = _state["pending"], None
    if signum is not None:
        raise Interrupted(signum)


@contextmanager
def deferred() -> Iterator[None]:
    """A section no signal may cut in two: one that arrives inside is raised when the section ends."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
    if _state["defer"] == 0:
        raise_pending()


def _unraisable(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Interrupted):   # swallowed by a finaliser: deliver it again
            _state["signum"] = None
            _deliver_again(unraisable.exc_value.signum)
            return
        previous(unraisable)

    return hook


@contextmanager
def termination_raises() -> Iterator[None]:
    """While active (in the main thread), SIGINT and SIGTERM raise Interrupted; the old handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outermost = _state["depth"] == 0
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    hook = sys.unraisablehook
    if outermost:
        _state["signum"], _state["pending"] = None, None
        sys.unraisablehook = _unraisable(hook)
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
            sys.unraisablehook = hook
