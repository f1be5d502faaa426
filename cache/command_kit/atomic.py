"""Atomic file writes: write under a temporary name in the same folder, then rename over the final path.

A crash or `kill -9` therefore never leaves a half-written file at a final path; at worst a hidden
`.<name>.tmp-*` file is left beside it. No reader looks at those names, a rerun writes a fresh one, and a
stale one can be deleted at any time. A write that fails (full disk, read-only file system, ...) deletes its
temporary and raises `cache.command_kit.write_errors.WriteError` naming the final path.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cache.command_kit.interrupt import deferred
from cache.command_kit.write_errors import writing

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on clean exit it is fsynced and renamed to `path`.

    A write failure inside the block (or in the fsync and rename) becomes a WriteError naming `path`, with
    `size` (the bytes the file needs, when the caller knows them) for the "needs about N MiB more" hint.
    """
    final = Path(path)
    with writing(final, size):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp: Path | None = None
        try:
            with deferred():   # a signal between mkstemp and here would leave a temporary nobody removes
                fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=suffix, dir=final.parent)
                os.close(fd)
                tmp = Path(tmp_name)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; final files get the usual permissions
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        finally:
            if tmp is not None:
                with deferred():
                    tmp.unlink(missing_ok=True)


@contextmanager
def written_via(tmp: Path, final: Path, size: int | None = None, remove: bool = True) -> Iterator[None]:
    """A folder written under the temporary name `tmp` (renamed by the caller): a failed write names `final`
    (with the bytes it needs) and the half-written `tmp` is removed (`remove`), so it holds no space the user
    is then asked to free."""
    try:
        with writing(final, size):
            yield
    except BaseException:
        if remove:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, suffix: str = "") -> None:
    with atomic_path(path, suffix=suffix, size=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")
