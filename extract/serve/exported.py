"""The folder `avb export` writes, and its reader. Torch-free: `avb predict --model-dir` reads it without torch.

    DIR/model.onnx          inputs  waveform [batch, samples] float32 (16 kHz mono, zero-padded)
                                    attention_mask [batch, samples] int64 (1 = real sample)
                            outputs one per task, named after it: [batch, classes] probabilities, or
                                    [batch, columns] values in the task's label range
    DIR/config.json         kind "avb-export", export_format, sample_rate, clip_seconds, tasks, inputs,
                            outputs, columns, source (kind, path, runs, members and weights), cache (what the
                            heads were trained on), parity (ONNX vs PyTorch at export), versions
    DIR/backbone/           the backbone (save_pretrained; transformers' AutoModel.from_pretrained loads it)
    DIR/heads.safetensors   every member run's head weights, keys "run<i>.<parameter>" (i: source.runs order)
    DIR/README.md           the model card (Hugging Face Hub format), with a numpy + onnxruntime example

The mask input is there for every backbone: pooling averages the frames computed from real samples only, so
the graph needs it even for group-norm backbones that do not take an attention mask themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.serve.errors import PredictError
from heads.runs import CONFIG_FILE, RunDirError, read_json_object
from heads.tasks import TaskSet, tasks_of

EXPORT_KIND = "avb-export"
EXPORT_FORMAT = 1          # bump when the folder's files change meaning; readers refuse newer values
ONNX_FILE = "model.onnx"
HEADS_FILE = "heads.safetensors"
CARD_FILE = "README.md"


@dataclass
class ExportedFolder:
    path: Path
    config: dict[str, Any]
    tasks: TaskSet

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def clip_seconds(self) -> float:
        return float(self.config["clip_seconds"])


def is_export_dir(path: str | os.PathLike) -> bool:
    """A folder whose config.json carries the export marker (a damaged or foreign config.json is not one)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return read_json_object(config).get("kind") == EXPORT_KIND
    except RunDirError:
        return False


def read_export(path: str | os.PathLike) -> ExportedFolder:
    """An exported folder, refused in one line when it is from a newer format or lacks its graph."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    try:
        config = read_json_object(config_path)
    except RunDirError as err:
        raise PredictError(str(err)) from None
    if config.get("kind") != EXPORT_KIND:
        raise PredictError(f"{config_path}: not an exported model (avb export writes \"kind\": \"{EXPORT_KIND}\")")
    found = config.get("export_format")
    if not isinstance(found, int) or found > EXPORT_FORMAT:
        raise PredictError(f"{config_path}: export_format {found!r} is newer than this avb-heads reads "
                           f"({EXPORT_FORMAT}); upgrade avb-heads to run it")
    if not (path / ONNX_FILE).is_file():
        raise PredictError(f"{path}: no {ONNX_FILE} (an incomplete export?)")
    try:
        tasks = tasks_of(config, str(config_path))
        float(config["clip_seconds"])
    except (KeyError, TypeError, ValueError) as err:
        raise PredictError(f"{config_path}: unreadable field ({err})") from None
    return ExportedFolder(path, config, tasks)
