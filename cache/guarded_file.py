"""The file object HDF5 writes a cache through: it never lets a failed write reach the HDF5 library.

HDF5 does not recover from a write that fails (a full disk): the data it could not write stays dirty in its
caches, closing the file fails again, and at interpreter exit the library's own clean-up dereferences the
broken file and the process dies with a segmentation fault (exit 139) -- what `avb dump` onto a nearly full
file system did. So h5py writes through this object (its `fileobj` driver) instead of the file itself: the
first failure is kept in `error` and every later write is accepted and dropped, HDF5 sees success and closes
cleanly, and the cache writer raises the kept error and deletes the (useless) temporary file.
`high` is the size HDF5 wanted the file to have, for the "needs about N MiB more" hint. For the same reason a
termination signal that arrives while HDF5 calls in here is held (cache.command_kit.interrupt.HELD_MODULES)
and raised by the cache writer once HDF5 has returned.
"""
from __future__ import annotations

import io
import os


class GuardedFile(io.RawIOBase):
    """A binary file opened for writing whose write failures are recorded instead of raised."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        # Unbuffered, like HDF5's own driver: what HDF5 wrote is in the file, not in a Python buffer.
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.error: OSError | None = None
        self.high = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:  # type: ignore[override]
        return self._f.readinto(buffer)

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        n = view.nbytes
        start = self._f.tell()
        self.high = max(self.high, start + n)
        done = 0
        while self.error is None and done < n:
            try:
                done += self._f.write(view[done:]) or 0
            except OSError as err:
                self.error = err
        self._f.seek(start + n)
        return n

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as err:
                self.error = err
        return self._f.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None and not self._f.closed:
            try:
                self._f.flush()
            except OSError as err:
                self.error = err

    def close(self) -> None:
        if self._f.closed:
            return
        self.flush()
        try:
            self._f.close()
        except OSError as err:
            self.error = self.error or err
        super().close()
