"""What every `avb` command does with a failure: one line, the right exit code, no traceback.

    with command_errors():
        run_the_command(...)

- a ValueError (every module's own error class: CorpusError, CacheError, FolderInUse, ...) -> `Error: <its
  message>`, exit 1;
- an OSError -> `Error: <path>: <reason>`, exit 1; a failed write says why in words the user can act on
  (`no space left on device (needs about N MiB more)`, `read-only file system`, ...; see cache.write_errors);
- SIGINT / SIGTERM -> `interrupted: rerun the same command to resume` on stderr, exit 130 / 143 (see
  cache.interrupt); any error raised while unwinding from a signal counts as the interruption.

Under `accelerate launch` every rank runs the command; the interruption line is printed by rank 0 only.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from cache.interrupt import MESSAGE, Interrupted, received, termination_raises
from cache.write_errors import describe


def _exit_interrupted(signum: int) -> None:
    if os.environ.get("RANK", "0") in ("", "0"):
        click.echo(MESSAGE, err=True)
    sys.exit(128 + signum)


@contextmanager
def command_errors() -> Iterator[None]:
    """Run a command's body with termination signals raising, and its failures reported in one line."""
    with termination_raises():
        try:
            yield
        except Interrupted as err:
            _exit_interrupted(err.signum)
        except BaseException as err:
            if received() is not None:
                _exit_interrupted(received())
            if isinstance(err, OSError):
                raise click.ClickException(describe(err)) from None
            if isinstance(err, ValueError):
                raise click.ClickException(str(err)) from None
            raise
