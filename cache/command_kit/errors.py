"""The errors a user can cause, and where in a file they are.

Every error that bad input, a bad setting or a bad file can cause is an `AvbError` (each module's own
subclass: CorpusError, CacheError, FolderInUse, ...); `command_errors()` turns it into one line. Anything
else that escapes a command -- a numpy or torch ValueError, a KeyError, a TypeError -- is a bug, and is shown
with its traceback (see cache.command_kit.command).
"""
from __future__ import annotations

from typing import Any


class AvbError(Exception):
    """An error the user can fix (bad input, a bad setting, an unusable file); its message is the one line."""


def where(path: Any, row: int, clip_id: str, what: str | None = None) -> str:
    """`P, row n (File_ID [x])[, what]`: how every error about one clip says where it is -- the file, the row,
    the clip's id (what a user searches for) and the column or layer, in label CSVs, prediction CSVs and caches
    alike. CSV rows count the header as row 1; cache rows are 0-based dataset rows."""
    return f"{path}, row {row} (File_ID [{clip_id}])" + (f", {what}" if what else "")
