"""A GridConfig from the few settings a test varies (the run template's fields by name)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from heads.training.grid import GridConfig
from heads.training.joint import TrainConfig

RUN_FIELDS = {f.name for f in fields(TrainConfig)}


def grid_config(cache: Any, **settings: Any) -> GridConfig:
    """GridConfig(cache=cache, ...) where TrainConfig fields (epochs, head, batch_size, lr, ...) go to `run`."""
    run = {k: settings.pop(k) for k in list(settings) if k in RUN_FIELDS}
    return GridConfig(cache=str(cache), run=TrainConfig(**run), **settings)
