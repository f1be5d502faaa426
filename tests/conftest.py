"""Shared test setup.

Helpers used by more than one test module live in plain modules beside the tests, never in a test module:
helpers.py (synthetic caches, `accelerate launch` commands, tiny-model inputs, CSV readers), tiny_model.py
(tiny random backbones) and plain_cache.py (a cache written with bare h5py). This folder is put on sys.path
here, so `from helpers import ...` works under any --import-mode, from the repo root or with one test file.

Markers (setup.cfg): `slow` marks the multi-process `accelerate launch` runs and the end-to-end pipelines;
`pytest -m "not slow"` is the quick loop. `benchmark` and `repeat` run only when asked (`-m benchmark`,
`-m repeat`).

The experiment trackers (W&B, MLflow) are the real packages: their settings and caches go to a temporary folder
removed at the end, W&B stays offline and quiet, and no tracking server or mode from the user's environment
leaks into a test (the variables are set here, so the tests' subprocesses inherit them).
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_TRACKER_HOME = tempfile.mkdtemp(prefix="avb-tests-trackers-")
for _var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    os.environ[_var] = _TRACKER_HOME
for _var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
    os.environ.pop(_var, None)
os.environ["WANDB_SILENT"] = "true"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TRACKER_HOME, ignore_errors=True)


TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


@pytest.fixture(scope="session")
def predict_world(tmp_path_factory):
    """A corpus, a tiny backbone, its dump and three trained runs, shared by test_predict and test_export."""
    from predict_world import make_world  # noqa: PLC0415

    return make_world(tmp_path_factory.mktemp("predict"))
