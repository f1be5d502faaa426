"""Backbone + heads + ensemble weights as one module: waveform in, per-task outputs out.

`avb predict` runs this module and `avb export` traces it to ONNX, so the deployed graph is the code that was
tested, not a second implementation. Everything in `forward` is a tensor operation (`layer_states`, masked
pooling, strided frames with their mask), which is what lets the tracer keep the batch and length dynamic.

Frame-mode BRANCH reads the frames 0, s, 2s, ... of each clip. The dump stores them ragged and training pads
them with zeros to the longest clip (`pad_frames`); here they are the strided states of the whole padded batch
with a mask. The head zeroes masked frames, masks them as keys and leaves them out of its mean, so the two
layouts give the same outputs (tested against the dumped features).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from extract.backbone import layer_states, pool_states, valid_frames
from extract.serve.loading import HeadSet
from heads.model.architectures import HeadInputs

INPUT_NAMES = ("waveform", "attention_mask")


class ServedModel(nn.Module):
    """forward(waveform [B, S] float32, attention_mask [B, S] int64) -> one [B, out_dim] float32 per task in
    `tasks` order: class probabilities for a classification task, values in the label range for regression.

    Per task the output is the weighted sum of the member runs' outputs (`HeadSet.members`, weights summing
    to 1), as `avb ensemble` blended them; a single run is a one-member ensemble."""

    def __init__(self, backbone: nn.Module, heads: HeadSet) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(run.head for run in heads.runs)
        self.tasks = heads.tasks
        self.members = heads.members
        self.layers = heads.layers
        self.frame_layers = heads.frame_layers
        self.frame_stride = heads.frame_stride if self.frame_layers else 1
        self.run_layers = [(run.layers, run.frame_layers) for run in heads.runs]

    @property
    def output_names(self) -> list[str]:
        return list(self.tasks.names)

    def forward(self, waveform: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        states, n_frames = layer_states(self.backbone, waveform, attention_mask)
        pooled = pool_states({name: states[name] for name in self.layers}, n_frames) if self.layers else {}
        frames, frame_mask = {}, None
        if self.frame_layers:
            frames = {name: states[name][:, ::self.frame_stride].float() for name in self.frame_layers}
            frame_mask = valid_frames(n_frames, states["hidden_0"].shape[1], self.frame_stride)
        per_run = []
        for head, (layers, run_frames) in zip(self.heads, self.run_layers):
            inputs = HeadInputs(pooled={k: pooled[k][None] for k in layers},
                                frames={k: frames[k][None] for k in run_frames} if run_frames else None,
                                frame_mask=frame_mask[None] if run_frames else None)
            per_run.append(head.predict(inputs))                      # task -> [1, B, out_dim]
        return tuple(sum(weight * per_run[i][name][0] for i, weight in self.members[name])
                     for name in self.tasks.names)

    @torch.no_grad()
    def outputs(self, waveform: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """forward as task -> [B, out_dim]."""
        return dict(zip(self.tasks.names, self(waveform, attention_mask)))
