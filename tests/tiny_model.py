"""A tiny random wav2vec2 backbone for tests: no download, a forward pass in milliseconds on one CPU core.

The CNN keeps wav2vec2-base's overall stride (320 samples = 20 ms per frame, so a 2.5 s clip still gives
124-125 frames and SpecAugment's 10-frame spans fit), but with three narrow layers instead of seven wide ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

TINY_CONFIG: dict = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_kernel=(10, 8, 4),
    conv_stride=(5, 8, 8),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=4,
    vocab_size=8,
    layerdrop=0.0,
)


def tiny_config(**overrides) -> Wav2Vec2Config:
    """The tiny config, with any field overridden (e.g. feat_extract_norm="layer")."""
    return Wav2Vec2Config(**{**TINY_CONFIG, **overrides})


def make_tiny_backbone(directory: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised tiny Wav2Vec2Model with `save_pretrained` and return its directory."""
    directory = Path(directory)
    torch.manual_seed(seed)
    model = Wav2Vec2Model(tiny_config(**overrides))
    model.save_pretrained(directory)
    return directory
