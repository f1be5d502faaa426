"""Tiny random wav2vec2-family backbones for tests: no download, a forward pass in milliseconds on one CPU core.

The CNN keeps wav2vec2-base's overall stride (320 samples = 20 ms per frame, so a 2.5 s clip still gives
124-125 frames and SpecAugment's 10-frame spans fit), but with three narrow layers instead of seven wide ones.
The same sizes build a wav2vec2, a HuBERT or a WavLM model (`family`), so every tested family runs the same
pipeline; WavLM's relative-position buckets are shrunk to fit the tiny model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

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
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model, {}),
    "hubert": (HubertConfig, HubertModel, {}),
    "wavlm": (WavLMConfig, WavLMModel, {"num_buckets": 16, "max_bucket_distance": 64}),
}


def tiny_config(family: str = "wav2vec2", **overrides):
    """The tiny config of `family`, with any field overridden (e.g. feat_extract_norm="layer")."""
    config_cls, _, extra = FAMILIES[family]
    return config_cls(**{**TINY_CONFIG, **extra, **overrides})


def make_tiny_backbone(directory: str | Path, *, seed: int = 0, family: str = "wav2vec2", **overrides) -> Path:
    """Save a randomly initialised tiny model of `family` with `save_pretrained` and return its directory."""
    directory = Path(directory)
    torch.manual_seed(seed)
    _, model_cls, _ = FAMILIES[family]
    model = model_cls(tiny_config(family, **overrides))
    model.save_pretrained(directory)
    return directory
