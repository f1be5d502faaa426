"""Shared test setup.

Helpers used by more than one test module live in plain modules beside the tests, never in a test module:
helpers.py (synthetic caches, `accelerate launch` commands, tiny-model inputs, CSV readers), tiny_model.py
(tiny random backbones) and plain_cache.py (a cache written with bare h5py). This folder is put on sys.path
here, so `from helpers import ...` works under any --import-mode, from the repo root or with one test file.

Markers (setup.cfg): `slow` marks the multi-process `accelerate launch` runs and the end-to-end pipelines;
`pytest -m "not slow"` is the quick loop. `benchmark` runs only when asked (`-m benchmark`).
"""
import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
