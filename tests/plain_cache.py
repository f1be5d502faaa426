"""A feature cache written with nothing but h5py, following cache/FORMAT.md rather than the project's writer,
so tests show that a cache anyone can make by hand works (pooled layers only, float16), of A-VB or of any
described task list."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from heads.tasks import AVB, TaskSet


def write_plain_h5(path: str | Path, ids: Sequence[str], splits: Sequence[str], labels: Mapping[str, np.ndarray],
                   pooled: Mapping[str, np.ndarray], model_type: str = "none", tasks: TaskSet | None = None) -> Path:
    """A cache per cache/FORMAT.md with nothing but h5py (pooled layers only, float16): ids/splits [N]; labels:
    task -> [N, label_dim] (NaN unknown); pooled: layer -> [N, D]. With `tasks`, the root attribute `tasks`
    describes them (the labels follow their columns and classes); without, the cache predates task descriptions
    and is read as A-VB."""
    described = tasks is not None
    tasks = tasks or AVB
    dims = {layer: int(x.shape[1]) for layer, x in pooled.items()}
    n = len(ids)
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update({
            "format": "avb-feature-cache", "format_version": 1,
            "backbone": json.dumps({"name_or_path": "plain-h5py", "model_type": model_type, "config": {}}),
            "layers": json.dumps(list(dims)), "layer_dims": json.dumps(dims), "pooling": "masked_mean",
            "dtype": "float16", "sample_rate": 16000, "clip_seconds": 2.5, "frame_layers": "[]", "frame_stride": 1,
        })
        if described:
            f.attrs["tasks"] = json.dumps(tasks.to_json())
        f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=text)
        f.create_dataset("splits", data=np.array(list(splits), dtype=object), dtype=text)
        f.create_dataset("n_frames", data=np.full(n, 124, dtype=np.int32))
        group = f.create_group("labels")
        for task in tasks:
            ds = group.create_dataset(task.name, data=np.asarray(labels[task.name], dtype=np.float32))
            ds.attrs["columns"] = json.dumps(list(task.columns))
            if task.is_classification:
                ds.attrs["classes"] = json.dumps(list(task.classes))
        for layer, x in pooled.items():
            f.create_dataset(f"pooled/{layer}", data=np.asarray(x).astype(np.float16))
        f.attrs["n_clips"] = n                                   # last: marks the file complete
    return Path(path)
