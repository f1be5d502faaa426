"""What every pass of a backbone over a corpus's clips (`avb dump`, `avb finetune`) is configured with first.

Kept apart from `extract.clips` (which needs torch) so that the dump and fine-tuning command modules, and
their `--help`, load without torch.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("no", "fp16", "bf16")   # accelerate's mixed-precision modes for a pass over the clips


@dataclass
class ClipRunConfig:
    """The corpus (its root, and/or the `corpus.yaml` describing it), the backbone (a checkpoint name or folder)
    and where the pass's output goes."""

    corpus: str = ""
    model: str = "facebook/wav2vec2-base"
    out: str = ""
    spec: str = ""      # a corpus.yaml elsewhere than <corpus>/corpus.yaml
