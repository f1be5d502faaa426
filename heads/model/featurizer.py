"""Which backbone layer a VANILLA or CHAIN head reads: the last, a named one, or a learned mix of all.

s3prl calls this piece the Featurizer: the boundary between the upstream model's hidden states and the
downstream head. Here it works on the cache's masked-mean pooled layers, stacked over R runs; the learned mix
(`"weighted"`) has one softmax over the hidden layers per run, starting uniform (every layer has an equal say).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cache.command_kit.errors import AvbError

LAST = "last"
WEIGHTED = "weighted"


class FeaturizerError(AvbError):
    """A layer choice that the cache cannot serve."""


class Featurizer(nn.Module):
    """Pooled layers -> the features a head reads, [R, B, D].

    `mode` is "last" (the last `hidden_*` layer), "weighted" (softmax-weighted sum of every `hidden_*` layer,
    which must then share one width) or a layer name. `required_layers` are the pooled layers it reads.
    """

    def __init__(self, mode: str, layer_dims: dict[str, int], hidden_layers: list[str], n_runs: int) -> None:
        super().__init__()
        self.mode = mode
        if mode == WEIGHTED:
            dims = {layer_dims[n] for n in hidden_layers}
            if len(dims) != 1:
                raise FeaturizerError(f"input_layer 'weighted' needs equal hidden_* widths, got {sorted(dims)}")
            self.required_layers = list(hidden_layers)
            self.layer_logits = nn.Parameter(torch.zeros(n_runs, len(hidden_layers)))
            self.dim = dims.pop()
        else:
            name = hidden_layers[-1] if mode == LAST else mode
            if name not in layer_dims:
                raise FeaturizerError(f"input_layer {mode!r} is not a cached layer (has: {', '.join(layer_dims)})")
            self.required_layers = [name]
            self.dim = layer_dims[name]

    def forward(self, pooled: list[Tensor]) -> Tensor:
        """pooled: the `required_layers` in order, each [R, B, D] (or [1, B, D], shared) -> [R or 1, B, D]."""
        if self.mode != WEIGHTED:
            return pooled[0]
        n_runs = self.layer_logits.shape[0]
        stacked = torch.stack([x.expand(n_runs, *x.shape[1:]) for x in pooled], dim=1)   # [R, L+1, B, D]
        return torch.einsum("rl,rlbd->rbd", torch.softmax(self.layer_logits, dim=-1).to(stacked.dtype), stacked)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, layers={len(self.required_layers)}"
