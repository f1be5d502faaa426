"""The error of serving a trained model (predict, export, the Python API)."""
from __future__ import annotations

from cache.command_kit.errors import AvbError


class PredictError(AvbError):
    """Inputs `avb predict` / `avb export` / `Predictor` cannot use; one line naming the file, run or value at
    fault."""
