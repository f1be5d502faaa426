"""An advisory lock on an output folder (or file), so two avb commands never write the same outputs at once.

Two `avb heads ablate --out runs/grid` started side by side would both train every run and race on the same
files; two dumps into one cache would overwrite each other's shards. So every command that writes a run, grid,
dump or fine-tuning output takes its lock first, and a second one stops at once with
`<folder> is in use by another avb process (pid N)`. Commands that only read (score, report, cache info,
ensemble of finished runs) never look at locks, so they are never blocked.

The lock is `<folder>/.avb-lock` (for a file output, `.<name>.avb-lock` beside it) holding the holder's pid,
host and command line, and an exclusive `flock` on it is what excludes: the kernel drops it when the holder
exits in any way, `kill -9` included, so a lock file left by a dead process is simply taken over. The file is
removed on release. On a file system without `flock` the pid is checked instead (same host: alive or not;
another host: taken as alive).

Use::

    with hold_output(out_dir):                              # one process
        ...
    with hold_output(out_file, is_file=True, ranks=accelerator):   # every rank of `accelerate launch`
        ...

    @holds_output("out_dir")                                # decorator: lock the folder named by an argument
    def run_grid(cache_path, out_dir, ...): ...

Multi-process runs (`accelerate launch --num_processes N`) share one lock: every rank calls `hold_output` with
its `Accelerator` or accelerate `PartialState` (anything with `num_processes` and `is_main_process`, or `world`
and `is_main`, once accelerate's process group exists) as `ranks`; rank 0 takes the lock, the outcome is broadcast,
and either every rank goes on (rank 0 holding the lock for all of them, released when rank 0 leaves the
block) or every rank stops with rank 0's message (FolderInUse on rank 0, OutputUnavailable on the others).
Rank 0 must therefore be the last rank to write (the dump's rank 0 merges after the others are done;
fine-tuning's ranks end together): end the block with a barrier if another rank may still be writing --
hold_output adds none of its own, since `Accelerator.end_training()` inside the block may already have
destroyed the process group. With `ranks=None` an initialised multi-process accelerate state is found by
itself, so a decorated function called after the Accelerator exists (e.g. `run_grid` under
`accelerate launch -m heads.ablate`) needs nothing more; calling it before a multi-process state exists is an
error, since each rank would otherwise find the others holding the lock. A process that already holds a lock
may take it again (nested calls count), e.g. a command that wraps a locked function.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cache.command_kit.errors import AvbError
from cache.command_kit.write_errors import writing

LOCK_NAME = ".avb-lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
F = TypeVar("F", bound=Callable[..., Any])


class FolderInUse(AvbError):
    """Another avb process holds the lock of an output folder; one line for the user."""

    def __init__(self, target: str | os.PathLike, pid: Any, host: str | None = None) -> None:
        where = "" if host in (None, socket.gethostname()) else f" on {host}"
        super().__init__(f"{target} is in use by another avb process (pid {pid}{where})")
        self.pid, self.host = pid, host


class OutputUnavailable(AvbError):
    """What rank 0 of a multi-process run failed with when it tried to take the lock, relayed to the others."""


def lock_path(target: str | os.PathLike, *, is_file: bool = False) -> Path:
    """Where the lock of an output folder (or, with `is_file`, of an output file) lives."""
    target = Path(target)
    return target.with_name(f".{target.name}{LOCK_NAME}") if is_file else target / LOCK_NAME


class OutputLock:
    """The lock of one output; `acquire` raises FolderInUse when a live process of another command holds it."""

    _held: dict[str, list] = {}   # lock path -> [count, fd, made the folder] for the locks this process holds

    def __init__(self, target: str | os.PathLike, *, is_file: bool = False) -> None:
        self.target = Path(target)
        self.path = lock_path(self.target, is_file=is_file)
        self._key = str(self.path.absolute())

    def acquire(self) -> None:
        held = self._held.get(self._key)
        if held is not None:
            held[0] += 1
            return
        with writing(self.target):   # a read-only or full file system is named by the output it locks
            while True:   # again when the holder released (and removed) the file we opened meanwhile
                self._made = not self.path.parent.exists()
                self.path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except FileNotFoundError:   # its holder removed the folder between our mkdir and open
                    continue
                try:
                    if not self._exclusive(fd):
                        holder = _read_holder(self.path)
                        raise FolderInUse(self.target, holder.get("pid", "unknown"), holder.get("host"))
                    if _same_file(fd, self.path):   # not a file its holder unlinked while we opened it
                        break
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)
            stamp = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "command": " ".join(sys.argv)[:500], "since": time.time()})
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (stamp + "\n").encode("utf-8"), 0)
            except BaseException:
                os.close(fd)
                raise
        self._held[self._key] = [1, fd, self._made]

    def release(self) -> None:
        held = self._held.get(self._key)
        if held is None:
            return
        held[0] -= 1
        if held[0] > 0:
            return
        del self._held[self._key]
        try:
            self.path.unlink(missing_ok=True)   # while still locked: nobody can have taken it meanwhile
            if held[2]:
                self.path.parent.rmdir()        # a folder made only for the lock: a refused run leaves nothing
        except OSError:                         # (not empty: the command wrote its outputs there)
            pass
        os.close(held[1])

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _exclusive(self, fd: int) -> bool:
        """Try the flock; where the file system has none, judge the recorded holder by its pid."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
        holder = _read_holder(self.path)
        return not _alive(holder)


def _read_holder(path: Path) -> dict[str, Any]:
    """The holder's stamp; a holder that has just taken the lock may not have written it yet."""
    for _ in range(20):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


def _alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True   # cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _accelerate_ranks() -> Any:
    """The initialised multi-process accelerate state of this process, if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    try:
        from accelerate import PartialState  # noqa: PLC0415
    except ImportError:
        return None
    if not PartialState._shared_state:   # noqa: SLF001 - the only way to ask without initialising it
        raise RuntimeError("hold_output: WORLD_SIZE > 1 but no accelerate state exists yet; create the "
                           "Accelerator first or pass ranks=")
    return PartialState()


@contextmanager
def hold_output(target: str | os.PathLike, *, is_file: bool = False, ranks: Any = None) -> Iterator[None]:
    """Hold the lock of `target` for the block (see the module docstring for `ranks`)."""
    ranks = ranks if ranks is not None else _accelerate_ranks()
    lock = OutputLock(target, is_file=is_file)
    world = getattr(ranks, "num_processes", getattr(ranks, "world", 1))
    if ranks is None or world <= 1:
        with lock:
            yield
        return
    main = getattr(ranks, "is_main_process", getattr(ranks, "is_main", False))
    from accelerate.utils import broadcast_object_list  # noqa: PLC0415

    failure: BaseException | None = None
    if main:
        try:
            lock.acquire()
        except (OSError, AvbError) as err:   # busy, or the lock file cannot be written
            failure = err
    outcome = [None if failure is None else str(failure)]
    broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise OutputUnavailable(outcome[0])
    try:
        yield
    finally:
        if main:
            lock.release()


def holds_output(param: str, *, is_file: bool = False) -> Callable[[F], F]:
    """Decorator: hold the lock of the output named by argument `param` while the function runs."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = signature.bind(*args, **kwargs).arguments[param]
            with hold_output(target, is_file=is_file):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
