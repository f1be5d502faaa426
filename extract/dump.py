"""Dump every clip's per-layer backbone states to one HDF5 feature cache, sharded over processes.

    accelerate launch -m extract.dump --corpus ROOT --model DIR_OR_NAME --out FILE.h5 \
        [--frame-layers hidden_3,hidden_6 --frame-stride 4 --batch-size 16 --clip-seconds 2.5 --dtype float16]
    avb dump ...   (the same, in one process)

Every process takes the deterministic shard `rows[rank::world]` of the corpus (all splits, corpus order), runs
the backbone in eval mode without gradients on fixed-length clips (first `clip_seconds`, zero-padded, so a
clip's features do not depend on its batch or its shard), and writes `FILE.h5.shard-<rank>-of-<world>` with
the atomic CacheWriter. After a barrier, rank 0 merges the shards in corpus order into FILE.h5 (again written
under a temporary name and renamed) and deletes them. A rerun after a crash reuses every shard file that is
complete and was written with the same settings and ids, and redoes the rest; a partial file never sits at
FILE.h5. A complete FILE.h5 with the same settings is left alone (`--overwrite` recomputes it).

Storage: pooled states of all layers are ~ (512 + 13 x 768) x 2 bytes = 21 KB per clip in float16 (~1.2 GB
for HUME-VB's 59k clips); frame-level states add ~ n_frames / stride x 768 x 2 bytes per layer and clip
(124 frames: 190 KB per layer at stride 1, so all 13 layers of HUME-VB would take ~150 GB -- hence opt-in).
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
import numpy as np

from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.lock import hold_output
from cache.command_kit.options import progress_option
from cache.format import CacheError
from cache.reader import check_compatible, load_cache, read_attrs
from cache.writer import CacheWriter, merge_shards
from extract.audio import SAMPLE_RATE
from extract.run_config import (
    PRECISIONS,
    ClipRunConfig,
    clip_input_options,
    decoded_audio_setting,
)
from heads.names import CLIP_SECONDS
from heads.runs import TRAINED_ON_FILE
from heads.tasks import TaskSet

SHARD_PATTERN = re.compile(r"\.shard-(\d+)-of-(\d+)$")
DTYPES = ("float16", "float32")


class DumpError(AvbError):
    """Bad dump settings or an output that cannot be (re)used; one line for the user."""


@dataclass
class DumpConfig(ClipRunConfig):
    """Settings of one dump; defaults are the paper's (2.5 s clips) and the cache's (float16, pooled only)."""

    frame_layers: tuple[str, ...] = ()
    frame_stride: int = 1
    batch_size: int = 16
    clip_seconds: float = CLIP_SECONDS
    dtype: str = "float16"
    mixed_precision: str = "no"   # autocast for the forward pass; features are stored as `dtype` either way
    overwrite: bool = False

    def validate(self) -> None:
        if not (self.corpus or self.spec) or not self.out:
            raise DumpError("a corpus (--corpus or --spec) and an output file are required")
        if self.frame_stride < 1:
            raise DumpError(f"--frame-stride must be >= 1, got {self.frame_stride}")
        if self.batch_size < 1:
            raise DumpError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.clip_seconds > 0:
            raise DumpError(f"--clip-seconds must be > 0, got {self.clip_seconds}")
        if self.dtype not in DTYPES:
            raise DumpError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mixed_precision not in PRECISIONS:
            raise DumpError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        if len(set(self.frame_layers)) != len(self.frame_layers):
            raise DumpError(f"--frame-layers lists a layer twice: {','.join(self.frame_layers)}")


@dataclass
class DumpResult:
    path: Path
    n_clips: int
    reused_shards: list[int] = field(default_factory=list)   # ranks whose shard file was reused
    skipped: bool = False                                     # FILE.h5 was already complete


def shard_path(out: str | Path, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.shard-{rank}-of-{world}")


def backbone_attrs(name_or_path: str, model: Any) -> dict[str, Any]:
    """The cache's `backbone` attribute: what was loaded and its full (JSON) config."""
    return {
        "name_or_path": str(name_or_path),
        "model_type": str(model.config.model_type),
        "config": json.loads(model.config.to_json_string(use_diff=False)),
    }


def expected_attrs(cfg: DumpConfig, model: Any, tasks: TaskSet) -> dict[str, Any]:
    """Every root attribute a cache of this dump must carry (used to write shards and to validate old ones);
    `tasks` is the corpus's description, which every later stage reads from the cache."""
    from extract.backbone import layer_dims, uses_attention_mask

    return {
        "backbone": backbone_attrs(cfg.model, model),
        "sample_rate": SAMPLE_RATE,
        "clip_seconds": float(cfg.clip_seconds),
        "crop": "first",
        "attention_mask": uses_attention_mask(model),
        "layers": list(layer_dims(model)),
        "layer_dims": layer_dims(model),
        "dtype": cfg.dtype,
        "frame_layers": list(cfg.frame_layers),
        "frame_stride": int(cfg.frame_stride),
        "tasks": tasks.to_json(),
    }


def cache_matches(path: Path, attrs: dict[str, Any], ids: Sequence[str]) -> bool:
    """Whether `path` is a complete cache with exactly these attributes and ids (in this order)."""
    try:
        check_compatible(read_attrs(path), attrs, source=path)
        stored = load_cache(path, layers=[]).ids
    except CacheError:
        return False
    return stored.tolist() == list(ids)


def clip_info(corpus: Any, model_dir: str) -> dict[str, list[Any]]:
    """The cache's optional per-clip facts (cache.format.CLIP_INFO_KINDS): each clip's group when the corpus
    has a group column, and whether the backbone was fine-tuned on it when the backbone folder says what it
    was trained on (an `avb finetune` export of this corpus)."""
    info: dict[str, list[Any]] = {}
    if corpus.groups:
        info["group"] = list(corpus.groups)
    record = Path(model_dir) / TRAINED_ON_FILE
    if record.is_file():
        try:
            trained = json.loads(record.read_text(encoding="utf-8"))
            seen = set(trained["ids"]) if trained.get("corpus") == corpus.name else set()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DumpError(f"{record}: not a training record (expected {{\"corpus\", \"ids\"}})") from None
        info["backbone_trained"] = [clip in seen for clip in corpus.ids]
    return info


def _writer_args(attrs: dict[str, Any]) -> dict[str, Any]:
    derived = ("layers", "layer_dims", "dtype", "frame_layers", "frame_stride")
    columns, classes = TaskSet.from_json(attrs["tasks"]).label_meta()
    return {
        "layer_dims": attrs["layer_dims"],
        "label_columns": columns,
        "label_classes": classes,
        "attrs": {k: v for k, v in attrs.items() if k not in derived},
        "frame_layers": attrs["frame_layers"],
        "frame_stride": attrs["frame_stride"],
        "dtype": attrs["dtype"],
    }


def dump_shard(
    model: Any,
    corpus: Any,
    rows: np.ndarray,
    path: Path,
    cfg: DumpConfig,
    attrs: dict[str, Any],
    *,
    device: Any = "cpu",
    autocast: Any = None,
    progress: bool = True,
) -> Path:
    """Run `model` (eval, no grad) over corpus rows `rows` and write them to the cache `path` atomically."""
    import contextlib

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from extract.backbone import forward_layers
    from extract.clips import ClipDataset, collate_clips, loader_options
    from extract.decoded_audio import open_store

    store = open_store(corpus, cfg.decoded_audio, say=_log if progress else None)
    loader = DataLoader(
        ClipDataset(corpus, rows, clip_seconds=cfg.clip_seconds, train=False, store=store),
        batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_clips,
        **loader_options(cfg.num_workers, torch.device(device)),
    )
    model.eval()
    info = clip_info(corpus, cfg.model)
    with (CacheWriter(path, expected_clips=len(rows), clip_info=list(info), **_writer_args(attrs)) as writer,
          torch.inference_mode()):
        for batch in tqdm(loader, desc=f"dump {path.name}", unit="batch", disable=not progress):
            waves, mask = batch["waves"].to(device), batch["mask"].to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                pooled, n_frames, frames = forward_layers(
                    model, waves, mask, frame_layers=cfg.frame_layers, frame_stride=cfg.frame_stride
                )
            batch_rows = batch["rows"].numpy()
            writer.append(
                ids=[corpus.ids[r] for r in batch_rows],
                splits=[str(corpus.splits[r]) for r in batch_rows],
                labels={name: corpus.labels[name][batch_rows] for name in corpus.tasks.names},
                n_frames=n_frames.cpu().numpy().astype(np.int32),
                pooled={layer: t.float().cpu().numpy() for layer, t in pooled.items()},
                frames={layer: [t.cpu().numpy() for t in clips] for layer, clips in frames.items()} or None,
                clip_info={name: [values[r] for r in batch_rows] for name, values in info.items()},
            )
    return path


def run_dump(cfg: DumpConfig, *, progress: bool = True) -> DumpResult:
    """The whole dump in this process's role: its shard, the barrier, and (rank 0) the merge."""
    cfg.validate()
    from accelerate.utils import InitProcessGroupKwargs

    from extract.backbone import make_accelerator

    out = Path(cfg.out)
    if out.is_dir():
        raise DumpError(f"--out {out} is a directory; give the path of the .h5 file to write")
    # Ranks wait for each other once, for the slowest shard; after a crash one rank may reuse its shard while
    # another recomputes its own for hours, so the barrier must not time out after the default 30 minutes.
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision,
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=48))])
    # One lock for all ranks (rank 0 holds it): a second dump into the same file stops before it loads anything.
    with hold_output(out, is_file=True, ranks=accelerator):
        return _dump_in_role(cfg, accelerator, progress)


def _dump_in_role(cfg: DumpConfig, accelerator: Any, progress: bool) -> DumpResult:
    """This rank's shard, the barrier and (rank 0) the merge; `run_dump` holds the output's lock meanwhile."""
    from extract.backbone import layer_names, load_backbone
    from extract.description import open_corpus

    out = Path(cfg.out)
    corpus = open_corpus(cfg.corpus or None, cfg.spec or None)
    if len(corpus) == 0:
        raise DumpError(f"corpus {corpus.root} has no clips")
    model = load_backbone(cfg.model)
    unknown = [layer for layer in cfg.frame_layers if layer not in layer_names(model)]
    if unknown:
        raise DumpError(f"unknown frame layer(s) {', '.join(unknown)}; this backbone has "
                        f"{', '.join(layer_names(model))}")
    attrs = expected_attrs(cfg, model, corpus.tasks)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    show = progress and accelerator.is_local_main_process

    if out.exists() and not cfg.overwrite:
        if cache_matches(out, attrs, corpus.ids):
            if main:
                _remove_shards(out)
                _log(f"{out} is already complete ({len(corpus)} clips, same settings); nothing to do "
                     "(--overwrite recomputes it)")
            accelerator.end_training()
            return DumpResult(out, len(corpus), skipped=True)
        raise DumpError(f"{out} exists and was not made by this dump (other settings, clips or an incomplete file); "
                        "pass --overwrite to replace it")

    all_rows = np.arange(len(corpus))
    shards = {r: all_rows[r::world] for r in range(world) if len(all_rows[r::world])}
    reused: list[int] = []
    if rank in shards:
        path = shard_path(out, rank, world)
        ids = [corpus.ids[i] for i in shards[rank]]
        if not cfg.overwrite and path.exists() and cache_matches(path, attrs, ids):
            reused.append(rank)
            _log(f"rank {rank}: reusing complete shard {path}")
        else:
            model.to(accelerator.device)
            dump_shard(model, corpus, shards[rank], path, cfg, attrs, device=accelerator.device,
                       autocast=accelerator.autocast if cfg.mixed_precision != "no" else None, progress=show)
    accelerator.wait_for_everyone()
    if main:  # the other ranks are done; they need not wait for the merge
        paths = [shard_path(out, r, world) for r in sorted(shards)]
        merge_shards(paths, out, order=corpus.ids)
        _remove_shards(out)
        _log(f"wrote {out} ({len(corpus)} clips, {world} process{'es' if world > 1 else ''})")
    accelerator.end_training()
    return DumpResult(out, len(corpus), reused_shards=reused)


def _remove_shards(out: Path) -> None:
    """Delete every shard of `out`, whatever world size wrote it (a rerun may use another one)."""
    for path in out.parent.glob(f"{out.name}.shard-*-of-*"):
        if SHARD_PATTERN.search(path.name):
            path.unlink(missing_ok=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_layers(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command("dump")
@click.option("--corpus", "corpus", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Corpus root: with a corpus.yaml, or in the official A-VB layout.")
@click.option("--spec", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The corpus.yaml describing the corpus, when it is not <corpus>/corpus.yaml.")
@click.option("--model", "model", default=DumpConfig.model, show_default=True,
              help="Fine-tuned backbone directory (avb finetune's OUT/backbone) or a pretrained checkpoint name.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HDF5 cache file to write.")
@click.option("--frame-layers", default="", help="Comma-separated layers to also store frame by frame, "
              "e.g. hidden_3,hidden_6 (opt-in: ~190 KB per layer and 2.5 s clip at stride 1 in float16).")
@click.option("--frame-stride", default=DumpConfig.frame_stride, show_default=True, type=int, help="Keep every n-th valid frame.")
@click.option("--batch-size", default=DumpConfig.batch_size, show_default=True, type=int,
              help="Clips per batch and process.")
@click.option("--clip-seconds", default=DumpConfig.clip_seconds, show_default=True, type=float,
              help="Clips are cut (first window) or zero-padded to this length.")
@click.option("--dtype", default=DumpConfig.dtype, show_default=True, type=click.Choice(DTYPES), help="Stored feature dtype.")
@click.option("--mixed-precision", default=DumpConfig.mixed_precision, show_default=True, type=click.Choice(PRECISIONS),
              help="Autocast for the backbone pass.")
@clip_input_options
@click.option("--overwrite", is_flag=True, help="Recompute FILE.h5 and its shards even if they are complete.")
@progress_option()
def dump_command(corpus: Path | None, spec: Path | None, model: str, out: Path, frame_layers: str, frame_stride: int,
                 batch_size: int,
                 clip_seconds: float, dtype: str, mixed_precision: str, num_workers: int, decoded_audio: str | None,
                 no_decoded_audio: bool, overwrite: bool,
                 progress: bool) -> None:
    """Dump per-layer hidden states (masked mean, optional frames) of a backbone to an HDF5 cache.

    Run under `accelerate launch -m extract.dump ...` to shard the clips over processes/GPUs.
    """
    cfg = DumpConfig(corpus=str(corpus or ""), spec=str(spec or ""), model=str(model), out=str(out),
                     frame_layers=parse_layers(frame_layers),
                     frame_stride=frame_stride, batch_size=batch_size, clip_seconds=clip_seconds, dtype=dtype,
                     mixed_precision=mixed_precision, num_workers=num_workers,
                     decoded_audio=decoded_audio_setting(decoded_audio, no_decoded_audio), overwrite=overwrite)
    with command_errors():  # DumpError, CorpusError, CacheError, AudioError, write errors, SIGINT/SIGTERM
        run_dump(cfg, progress=progress)


def main() -> None:
    dump_command(prog_name="python -m extract.dump")


if __name__ == "__main__":
    main()

