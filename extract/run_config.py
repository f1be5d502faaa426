"""What every pass of a backbone over a corpus's clips (`avb dump`, `avb finetune`) is configured with first.

Kept apart from `extract.clips` (which needs torch) so that the dump and fine-tuning command modules, and
their `--help`, load without torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import click

PRECISIONS = ("no", "fp16", "bf16")   # accelerate's mixed-precision modes for a pass over the clips
AUTO_WORKERS = -1                     # --num-workers: from the machine and the device (extract.clips)


@dataclass
class ClipRunConfig:
    """The corpus (its root, and/or the `corpus.yaml` describing it), the backbone (a checkpoint name or folder)
    and where the pass's output goes."""

    corpus: str = ""
    model: str = "facebook/wav2vec2-base"
    out: str = ""
    spec: str = ""      # a corpus.yaml elsewhere than <corpus>/corpus.yaml
    decoded_audio: str = "auto"   # extract.decoded_audio.open_store: "auto", "none" or a store's path
    num_workers: int = AUTO_WORKERS   # DataLoader workers per process (extract.clips.loader_options)


def clip_input_options(func: Callable) -> Callable:
    """--num-workers, --decoded-audio and --no-decoded-audio: how a pass reads its clips (dump and fine-tuning).
    The command gets `num_workers`, `decoded_audio` and `no_decoded_audio`; `decoded_audio_setting` joins the
    last two into ClipRunConfig.decoded_audio."""
    func = click.option("--no-decoded-audio", is_flag=True,
                        help="Decode the audio files even when a decoded-audio store (avb corpus decode) is there.")(func)
    func = click.option("--decoded-audio", default=None, type=click.Path(dir_okay=False),
                        help="The decoded-audio store to read clips from (default: CORPUS/audio-16k.h5 when "
                             "present).")(func)
    return click.option("--num-workers", default=AUTO_WORKERS, type=click.IntRange(min=AUTO_WORKERS),
                        show_default="-1: from the machine; on a GPU the process's cores less one, at most 8; "
                                     "0 on a CPU run",
                        help="DataLoader workers per process.")(func)


def decoded_audio_setting(path: str | None, off: bool) -> str:
    return "none" if off else (str(path) if path else "auto")
