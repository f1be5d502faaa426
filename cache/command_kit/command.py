"""What every `avb` command does with a failure: one line for the user's errors, a traceback for a bug.

    with command_errors():
        run_the_command(...)

- an `AvbError` (every module's own error class: CorpusError, CacheError, FolderInUse, ...) -> `Error: <its
  message>`, exit 1;
- an OSError -> `Error: <path>: <reason>`, exit 1; a failed write says why in words the user can act on
  (`no space left on device (needs about N MiB more)`, `read-only file system`, ...; see write_errors);
- SIGINT / SIGTERM -> `interrupted: rerun the same command to resume` on stderr, exit 130 / 143 (see
  interrupt); any error raised while unwinding from a signal counts as the interruption;
- anything else is a bug in this code, not the user's: its traceback, then one line saying so and where to
  report it, exit 1. A ValueError from numpy or torch is such a bug too: it is never dressed as input error.

`AVB_DEBUG=1` in the environment prints the traceback of every error, the user's included. Under
`accelerate launch` every rank runs the command; the interruption line is printed by rank 0 only.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import click

from cache.command_kit.errors import AvbError
from cache.command_kit.interrupt import (
    MESSAGE,
    Interrupted,
    received,
    termination_raises,
)
from cache.command_kit.write_errors import describe

DEBUG_ENV = "AVB_DEBUG"
REPORT_BUG = ("this is a bug in avb-heads, not a problem with your input: please report it with the traceback "
              "above (README, 'Reporting a bug'); AVB_DEBUG=1 shows the traceback of every error")


def debugging() -> bool:
    """Whether AVB_DEBUG asks for the traceback of every error."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _exit_interrupted(signum: int) -> None:
    if os.environ.get("RANK", "0") in ("", "0"):
        click.echo(MESSAGE, err=True)
    sys.exit(128 + signum)


def _one_line(message: str) -> click.ClickException:
    if debugging():
        traceback.print_exc()
    return click.ClickException(message)


@contextmanager
def command_errors() -> Iterator[None]:
    """Run a command's body with termination signals raising, and its failures reported as above."""
    with termination_raises():
        try:
            yield
        except Interrupted as err:
            _exit_interrupted(err.signum)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise   # click's own usage errors and exits
        except BaseException as err:
            if received() is not None:
                _exit_interrupted(received())
            if isinstance(err, AvbError):
                raise _one_line(str(err)) from None
            if isinstance(err, OSError):
                raise _one_line(describe(err)) from None
            if not isinstance(err, Exception):   # SystemExit, KeyboardInterrupt outside a command's signals
                raise
            traceback.print_exc()
            raise click.ClickException(f"{type(err).__name__}: {err} -- {REPORT_BUG}") from None
