"""Write failures (full disk, quota, I/O error, read-only file system, no permission) as one line naming the path.

A full disk surfaces in many shapes: `OSError(ENOSPC)` from Python, an h5py error carrying `errno = 28` in its
text, a `SafetensorError` ("os error 28"), a `RuntimeError` from torch.save with no errno at all ("unexpected
pos"; taken for a full disk when the file system is then nearly full). `writing(path,
size)` turns each of them, raised while writing `path`, into a `WriteError`: an OSError with the errno, the
path the user asked for (the final path, not the temporary beside it) and the bytes the write needs, so the
command can say `P: no space left on device (needs about N MiB more)` and the user knows what to free.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIB = 1 << 20
# The errnos a write can fail with that the user can fix, and how each is said.
REASONS: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error (the disk or network file system failed)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "file too large for this file system",
}
# How libraries that do not raise OSError spell the same errors.
_PHRASES: tuple[tuple[str, int], ...] = (
    ("no space left on device", errno.ENOSPC), ("storagefull", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT), ("quota exceeded", errno.EDQUOT),
    ("read-only file system", errno.EROFS), ("readonlyfilesystem", errno.EROFS),
    ("permission denied", errno.EACCES), ("input/output error", errno.EIO),
)
_NUMBERS = re.compile(r"(?:errno\s*=\s*|\[errno\s+|code:\s*|os error\s+)(\d+)", re.IGNORECASE)
# torch.save reports a short write without any errno ("unexpected pos 576 vs 534"); on a file system with less
# than this free, such a failure is taken for the full disk it almost surely is.
FULL_BELOW = 4 * MIB


class WriteError(OSError):
    """Writing `filename` failed with `errno`; `needed` is the size of the whole write in bytes, if known."""

    def __init__(self, code: int, path: str | os.PathLike, needed: int | None = None) -> None:
        super().__init__(code, REASONS.get(code, os.strerror(code)), str(path))
        self.needed = needed

    def __str__(self) -> str:
        return describe(self)


def write_errno(err: BaseException) -> int | None:
    """The errno of a failed write in any of its disguises, when it is one of REASONS; else None."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code in REASONS:
        return code
    text = str(err)
    for match in _NUMBERS.finditer(text):
        if int(match.group(1)) in REASONS:
            return int(match.group(1))
    squashed = text.lower().replace(" ", "")
    for phrase, number in _PHRASES:
        if phrase.replace(" ", "") in squashed:
            return number
    return None


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def _mib(n: float) -> str:
    value = n / MIB
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def describe(err: OSError) -> str:
    """`P: <reason>`, plus for a full disk how much more space the write needs (its size minus what is free)."""
    code = write_errno(err)
    path = getattr(err, "filename", None)
    reason = REASONS[code] if code is not None else err.strerror.lower() if err.strerror else str(err)
    if code != errno.ENOSPC:
        return f"{path}: {reason}" if path else reason
    needed = getattr(err, "needed", None)
    free = free_bytes(path) if needed and path else None
    extra = f" (needs about {_mib(max(needed - free, MIB // 10))} MiB more)" if free is not None and needed > free \
        else ""   # no estimate, or one that would fit: better no figure than a wrong one
    return f"{path}: {reason}{extra}" if path else f"{reason}{extra}"


@contextmanager
def writing(path: str | os.PathLike, size: int | None = None) -> Iterator[None]:
    """Re-raise a write failure inside the block as a WriteError naming `path`; other errors pass unchanged.

    `size`: the bytes the whole write needs (the file's size when complete), for the "needs about" estimate.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as err:  # noqa: BLE001 - filtered by write_errno; anything else is re-raised as it is
        code = write_errno(err)
        if code is None and _torch_short_write(err):
            free = free_bytes(path)
            code = errno.ENOSPC if free is not None and free < FULL_BELOW else None
        if code is None:
            raise
        raise WriteError(code, path, size) from err


def _torch_short_write(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)
