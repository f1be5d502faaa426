"""`avb export`: a run, an ensemble or a fine-tuning output, with its backbone, as one self-contained folder.

    avb export --heads RUN|ENSEMBLE|FINETUNE_OUTPUT [--model BACKBONE] --out DIR

The folder (`extract.serve.exported` lists its files) holds one ONNX graph from waveform to per-task outputs,
traced from the module `avb predict` runs (`ServedModel`), so the ensemble's members and weights are inside
it. Before anything is written the graph is run by onnxruntime and compared with PyTorch on the same batches
at two lengths (generated audio, or `--check-audio` files): a difference above 1e-4 fails the export with
that figure, and the figure is stored in config.json. The folder is built under a temporary name and renamed
into place, so a failed or killed export leaves no half-written DIR.

The exporter is torch.onnx's TorchScript tracer (`dynamo=False`): on this code it exports in under a second
where the torch.export-based exporter takes 10 s, and it needs `onnx` only, not `onnxscript`. Every operation
of `ServedModel.forward` is a tensor operation, which is what a trace needs to keep batch and length dynamic;
the parity check at two lengths is what shows it did.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.options import progress_option
from extract.audio import SAMPLE_RATE
from extract.serve.exported import (
    CARD_FILE,
    EXPORT_FORMAT,
    EXPORT_KIND,
    HEADS_FILE,
    ONNX_FILE,
)
from heads.runs import BACKBONE_DIR, CONFIG_FILE, ENSEMBLE, FINETUNE, RUN, output_kind

TOLERANCE = 1e-4          # largest |ONNX - PyTorch| accepted on any output
DEFAULT_OPSET = 17


class ExportError(AvbError):
    """An export that cannot be made or did not reproduce PyTorch; one line."""


@dataclass
class ExportConfig:
    heads: str
    out: str
    model: str | None = None
    opset: int = DEFAULT_OPSET
    check_audio: tuple[str, ...] = ()
    license: str = "other"
    overwrite: bool = False
    progress: bool = True


@dataclass
class ExportResult:
    out: Path
    max_abs_diff: float
    shapes: list[list[int]]
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- parity

def generated_batches(clip_seconds: float, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two batches at two lengths (a full clip and 60 % of one), with a padded row in each: voiced bursts
    (a gliding fundamental with harmonics under an envelope) and noise, so the backbone sees varied input."""
    rng = np.random.default_rng(seed)
    n = int(round(clip_seconds * SAMPLE_RATE))
    batches = []
    for length, rows in ((n, 3), (max(1, int(0.6 * n)), 2)):
        t = np.arange(length) / SAMPLE_RATE
        waves = np.zeros((rows, length), np.float32)
        mask = np.ones((rows, length), np.int64)
        for r in range(rows):
            f0 = rng.uniform(120, 400) * (1 + 0.3 * t / max(t[-1], 1e-9))
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            voiced = sum(np.sin(h * phase) / h for h in range(1, 6)) * np.sin(np.pi * t / max(t[-1], 1e-9))
            waves[r] = (0.3 * voiced + 0.02 * rng.standard_normal(length)).astype(np.float32)
        cut = length // 2                                  # the last row is a short clip, zero-padded
        waves[-1, cut:], mask[-1, cut:] = 0.0, 0
        batches.append((waves, mask))
    return batches


def audio_batches(paths: list[Path], clip_seconds: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real files as `avb predict` reads them (first clip_seconds, padded), at the clip length and at 60 % of it."""
    from extract.audio import crop_or_pad, load_audio  # noqa: PLC0415

    waves = [load_audio(path) for path in paths[:8]]
    batches = []
    for seconds in (clip_seconds, 0.6 * clip_seconds):
        n = int(round(seconds * SAMPLE_RATE))
        pairs = [crop_or_pad(wave, n) for wave in waves]
        batches.append((np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.int64)))
    return batches


def parity(onnx_path: Path, served: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Largest |onnxruntime - PyTorch| over every output of every batch."""
    import onnxruntime  # noqa: PLC0415
    import torch  # noqa: PLC0415

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for waves, mask in batches:
        got = session.run(None, {"waveform": waves, "attention_mask": mask})
        with torch.no_grad():
            want = served(torch.from_numpy(waves), torch.from_numpy(mask))
        for a, b in zip(got, want):
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.double().numpy()))))
    return worst


# ---------------------------------------------------------------------------------------------- export

def _need_export_packages() -> None:
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"avb export needs {' and '.join(missing)}: pip install 'avb-heads[export]'")


def export_model(cfg: ExportConfig) -> ExportResult:
    """Load, trace, check and write; see the module docstring."""
    _need_export_packages()
    import torch  # noqa: PLC0415

    from extract.backbone import hf_progress_bars  # noqa: PLC0415
    from extract.serve.loading import load_backbone_for, load_heads  # noqa: PLC0415
    from extract.serve.model import INPUT_NAMES, ServedModel  # noqa: PLC0415
    from extract.serve.model_card import model_card  # noqa: PLC0415
    from extract.serve.predictor import find_audio  # noqa: PLC0415

    out = Path(cfg.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not cfg.overwrite:
        raise ExportError(f"--out {out} already exists; give a new folder or --overwrite")
    heads = load_heads(cfg.heads)
    kind = output_kind(cfg.heads)
    with hf_progress_bars(cfg.progress):
        backbone, model_name = load_backbone_for(heads, cfg.model)
    served = ServedModel(backbone, heads).eval()
    batches = (audio_batches(find_audio(cfg.check_audio), heads.clip_seconds) if cfg.check_audio
               else generated_batches(heads.clip_seconds))

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from cache.command_kit.atomic import (  # noqa: PLC0415
        write_json_atomic,
        write_text_atomic,
        written_via,
    )

    with written_via(tmp, out):
        tmp.mkdir(parents=True)
        onnx_path = tmp / ONNX_FILE
        dynamic = {"batch", "samples"}
        axes = {name: {0: "batch", 1: "samples"} for name in INPUT_NAMES}
        axes.update({name: {0: "batch"} for name in served.output_names})
        example = tuple(torch.from_numpy(a) for a in batches[0])
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")    # the tracer's notes on shape checks read as Python values
            torch.onnx.export(served, example, str(onnx_path), input_names=list(INPUT_NAMES),
                              output_names=served.output_names, dynamic_axes=axes, opset_version=int(cfg.opset),
                              dynamo=False)
        diff = parity(onnx_path, served, batches)
        shapes = [list(b[0].shape) for b in batches]
        if not diff <= TOLERANCE:
            raise ExportError(f"the ONNX graph's outputs differ from PyTorch's by up to {diff:.3g} (more than "
                              f"{TOLERANCE:g}) on batches {shapes}; nothing was written to {out}")
        backbone.save_pretrained(tmp / BACKBONE_DIR)
        _save_heads(tmp / HEADS_FILE, heads)
        config = export_config(heads, kind, cfg, model_name, diff, shapes, dynamic)
        write_json_atomic(tmp / CONFIG_FILE, config)
        write_text_atomic(tmp / CARD_FILE, model_card(config, heads, kind, cfg.license))
        _move_into_place(tmp, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return ExportResult(out, diff, shapes, files)


def _save_heads(path: Path, heads: Any) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    state = {f"run{i}.{key}": value.contiguous() for i, run in enumerate(heads.runs)
             for key, value in run.head.run_state_dict(0).items()}
    save_file(state, str(path))


def _move_into_place(tmp: Path, out: Path) -> None:
    """tmp becomes out; an existing out (--overwrite, or an empty folder) is removed only once tmp is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {}
    for name in ("avb-heads", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def export_config(heads: Any, kind: str | None, cfg: ExportConfig, model_name: str, diff: float,
                  shapes: list[list[int]], dynamic: set[str]) -> dict[str, Any]:
    """config.json of an exported folder (`extract.serve.exported`)."""
    tasks = heads.tasks
    columns = {t.name: [f"p_{c}" for c in t.classes] if t.is_classification else list(t.columns) for t in tasks}
    first = heads.runs[0]
    return {
        "kind": EXPORT_KIND,
        "export_format": EXPORT_FORMAT,
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": heads.clip_seconds,
        "tasks": tasks.to_json(),
        "inputs": {"waveform": ["batch", "samples", "float32"], "attention_mask": ["batch", "samples", "int64"]},
        "outputs": list(tasks.names),
        "columns": columns,
        "source": {
            "kind": {RUN: "run", ENSEMBLE: "ensemble", FINETUNE: "finetune"}.get(kind or "", "run"),
            "path": str(Path(cfg.heads).resolve()),
            "runs": [str(run.path.resolve()) for run in heads.runs],
            "members": {name: [[i, w] for i, w in chosen] for name, chosen in heads.members.items()},
        },
        "backbone": {"given": model_name, "dir": BACKBONE_DIR},
        "cache": {"path": first.config.get("cache") if kind != FINETUNE else None,
                  "attrs": json.loads(json.dumps(first.cache_attrs, default=str))},
        "parity": {"max_abs_diff": diff, "tolerance": TOLERANCE, "batches": shapes,
                   "inputs": list(cfg.check_audio) or "generated", "dynamic_axes": sorted(dynamic)},
        "opset": int(cfg.opset),
        "versions": _versions(),
    }


@click.command("export")
@click.option("--heads", "heads_dir", required=True, type=click.Path(path_type=Path),
              help="A run dir, an ensemble dir (avb ensemble) or a fine-tuning output (avb finetune's OUT).")
@click.option("--model", default=None,
              help="The backbone the heads' cache was dumped from; optional for a fine-tuning output (its own).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The folder to write (model.onnx, config.json, backbone/, heads.safetensors, README.md).")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=int, help="ONNX opset version.")
@click.option("--check-audio", multiple=True, type=click.Path(path_type=Path),
              help="Audio files or folders (up to 8 files) for the ONNX-vs-PyTorch check; default: generated "
                   "audio. Repeatable.")
@click.option("--license", "license_", default="other", show_default=True,
              help="The license field of the model card (a Hugging Face license id, e.g. cc-by-4.0).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (once the new one is complete).")
@progress_option()
def export_command(heads_dir: Path, model: str | None, out: Path, opset: int, check_audio: tuple[Path, ...],
                   license_: str, overwrite: bool, progress: bool) -> None:
    """Export a run, an ensemble or a fine-tuning output with its backbone as ONNX + a Hub-ready folder."""
    with command_errors():
        result = export_model(ExportConfig(str(heads_dir), str(out), model, opset, tuple(map(str, check_audio)),
                                           license_, overwrite, progress))
    click.echo(f"wrote {result.out} ({', '.join(result.files[:6])}{', ...' if len(result.files) > 6 else ''})")
    click.echo(f"ONNX vs PyTorch: largest difference {result.max_abs_diff:.2g} on batches {result.shapes} "
               f"(limit {TOLERANCE:g})")
