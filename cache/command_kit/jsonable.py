"""The one conversion of Python, numpy and dataclass values into plain JSON values.

Everything the tools write as JSON (configs, metrics, cache attributes, stamps) and every comparison of a
stored JSON value with a fresh one goes through `jsonable`, so a tuple and a list, or a numpy float and a
Python float, never differ after a round trip.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


def jsonable(value: Any, *, nonfinite_to_none: bool = True) -> Any:
    """`value` as dicts (string keys), lists, str, int, float, bool and None.

    numpy arrays and scalars become lists and Python scalars, tuples become lists, bytes are decoded,
    dataclasses become dicts. Non-finite floats become None (a diverged loss must not break a metrics file)
    unless `nonfinite_to_none` is False, where they are kept for the caller's `allow_nan=False` to refuse.
    Anything else raises TypeError naming its type.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if nonfinite_to_none and not math.isfinite(value) else value
    if isinstance(value, dict):
        return {str(k): jsonable(v, nonfinite_to_none=nonfinite_to_none) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite_to_none=nonfinite_to_none) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist(), nonfinite_to_none=nonfinite_to_none)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), nonfinite_to_none=nonfinite_to_none)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
