"""The paper's three multi-task heads (VANILLA, CHAIN, BRANCH), stacked over R independent runs.

One `MultiTaskHead` holds the parameters of R runs of one architecture (every parameter has leading dim R),
so the ablation grid trains many (weighting, seed) runs with batched matmuls. Run r is initialised only from
`torch.Generator().manual_seed(seeds[r])` and its dropout masks come from its own generator, so a run trained
jointly equals the same run trained alone (see heads/layers.py).

Departures from the authors' code (docs/reference-notes.md), on purpose:
* no BatchNorm anywhere (it sat before cross-entropy with batch 8); LayerNorm instead;
* the heads read masked-mean pooled features from the cache (pooling never averages padding) instead of
  attention pooling over unmasked, zero-padded frames;
* BRANCH uses residual + LayerNorm blocks (the MTAN-style variant), key padding masks, and a masked mean over
  valid frames instead of the last (often padded) frame;
* CHAIN normalises only the backbone features; the chained task values are appended unnormalised, so a
  one-hot / probability vector keeps its meaning.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from heads.layers import (
    StackedDropout, StackedLayerNorm, StackedLinear, StackedMultiheadAttention, make_generators, per_run,
)
from heads.tasks import TASK_NAMES, TASKS

ARCHS: tuple[str, ...] = ("vanilla", "chain", "branch")

# Dropout streams are seeded apart from the init streams so masks are not correlated with initial weights.
DROPOUT_SEED_OFFSET = 0x5EED_D0
_HIDDEN = re.compile(r"hidden_(\d+)$")


class HeadConfigError(ValueError):
    """A head configuration, layer set or input that cannot work; the message names the offending value."""


@dataclass
class HeadConfig:
    """Head hyper-parameters; defaults are the paper's settings (256-d, dropout 0.3, 8 heads, chain order)."""

    arch: str = "vanilla"                 # "vanilla" | "chain" | "branch"
    hidden: int = 256                     # task-network hidden width / attention dim
    dropout: float = 0.3
    input_layer: str = "last"             # vanilla/chain: "last" (last hidden_*), "weighted" (learnable
                                          # softmax-weighted sum of all hidden_*), or any layer name
    chain_order: tuple[str, ...] = ("type", "two", "high", "culture")
    n_heads: int = 8                      # branch attention heads
    branch_blocks: int = 4                # attention blocks per task (branch)
    branch_use_frames: bool = False       # attend over frames (needs frame-level cache) instead of layer tokens

    def __post_init__(self) -> None:
        self.chain_order = tuple(self.chain_order)   # JSON gives a list

    def validate(self) -> None:
        """Raise HeadConfigError naming the first bad field."""
        if self.arch not in ARCHS:
            raise HeadConfigError(f"unknown head arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.hidden < 1:
            raise HeadConfigError(f"hidden must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise HeadConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if sorted(self.chain_order) != sorted(TASK_NAMES):
            raise HeadConfigError(f"chain_order {list(self.chain_order)} must name each of "
                                  f"{', '.join(TASK_NAMES)} exactly once")
        if self.arch == "branch":
            if self.n_heads < 1 or self.hidden % self.n_heads:
                raise HeadConfigError(f"hidden {self.hidden} must be divisible by n_heads {self.n_heads}")
            if self.branch_blocks < 1:
                raise HeadConfigError(f"branch_blocks must be >= 1, got {self.branch_blocks}")


@dataclass
class HeadInputs:
    """What a head reads for one batch. A leading run dim of 1 is broadcast to all R runs."""

    pooled: dict[str, Tensor] = field(default_factory=dict)   # layer -> [R, B, D_layer] masked-mean pooled
    frames: dict[str, Tensor] | None = None                   # layer -> [R, B, T, D_layer] (branch frames)
    frame_mask: Tensor | None = None                          # [R, B, T] bool, True = valid frame


def hidden_layer_names(layer_dims: dict[str, int]) -> list[str]:
    """hidden_0 .. hidden_L in order; they must be contiguous (hidden_states of one backbone)."""
    idx = sorted(int(m.group(1)) for name in layer_dims if (m := _HIDDEN.match(name)))
    if not idx:
        raise HeadConfigError(f"layer_dims has no hidden_* layers (has: {', '.join(layer_dims) or 'none'})")
    if idx != list(range(len(idx))):
        raise HeadConfigError(f"hidden layers must be hidden_0..hidden_{len(idx) - 1} without gaps, "
                              f"got indices {idx}")
    return [f"hidden_{i}" for i in idx]


def branch_groups(n_transformer_layers: int, branch_blocks: int, min_group: int = 1) -> list[list[int]]:
    """Split transformer layers 1..L into consecutive groups, one per attention block.

    Uses min(branch_blocks, L // min_group) blocks (at least one), so every group has >= min_group layers
    where L allows; layers are split as evenly as possible with earlier groups taking the remainder
    (12 layers / 4 blocks -> 1-3, 4-6, 7-9, 10-12; 5 layers / 2 blocks -> [1, 2, 3], [4, 5]).
    Token mode asks for min_group=2: a block whose keys are a single token (the previous block's output
    for a one-layer group) has softmax weight 1 whatever q and k are, so its q/k projections would never
    learn. Frame mode attends over frames and takes min_group=1 (2 layers / 4 blocks -> [1], [2]).
    """
    if n_transformer_layers < 1:
        raise HeadConfigError("BRANCH needs at least one transformer layer (hidden_1)")
    n = max(1, min(branch_blocks, n_transformer_layers // max(1, min_group)))
    return [[int(i) for i in g] for g in np.array_split(np.arange(1, n_transformer_layers + 1), n)]


class TaskNetwork(nn.Module):
    """The paper's shallow task network: LN(x) [+ chained inputs] -> FC -> LN -> GELU -> Dropout -> FC."""

    def __init__(self, n_runs: int, in_dim: int, extra_dim: int, hidden: int, out_dim: int, dropout: float,
                 gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.in_norm = StackedLayerNorm(n_runs, in_dim, affine=False)
        self.fc1 = StackedLinear(n_runs, in_dim + extra_dim, hidden, gens)
        self.norm = StackedLayerNorm(n_runs, hidden)
        self.drop = StackedDropout(dropout)
        self.fc2 = StackedLinear(n_runs, hidden, out_dim, gens)

    def forward(self, features: Tensor, extra: Tensor | None = None) -> Tensor:
        x = self.in_norm(features)
        h = self.fc1(x) if extra is None else self.fc1.forward_concat(x, extra)
        return self.fc2(self.drop(F.gelu(self.norm(h))))


class AttentionBlock(nn.Module):
    """MTAN-style block: out = LN(query + MHA(query, kv, kv))."""

    def __init__(self, n_runs: int, dim: int, n_heads: int, dropout: float,
                 gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.attn = StackedMultiheadAttention(n_runs, dim, n_heads, dropout, gens)
        self.norm = StackedLayerNorm(n_runs, dim)

    def forward(self, query: Tensor, kv: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.norm(query + self.attn(query, kv, kv, key_padding_mask))


class BranchNetwork(nn.Module):
    """One task's stack of attention blocks followed by the output layer."""

    def __init__(self, n_runs: int, n_blocks: int, dim: int, n_heads: int, dropout: float, out_dim: int,
                 gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(AttentionBlock(n_runs, dim, n_heads, dropout, gens) for _ in range(n_blocks))
        self.out = StackedLinear(n_runs, dim, out_dim, gens)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [R, B, T, D] over valid frames (mask [R, B, T]); zeros for a clip with no valid frame."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(2) / w.sum(2).clamp_min(1.0)


class MultiTaskHead(nn.Module):
    """VANILLA / CHAIN / BRANCH over R stacked runs; `forward` returns task -> [R, B, out_dim].

    TYPE gives logits (8 classes); TWO, HIGH and CULTURE give sigmoid outputs in [0, 1].
    """

    def __init__(self, cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int]) -> None:
        super().__init__()
        cfg.validate()
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise HeadConfigError("a head needs at least one run seed")
        self.cfg, self.layer_dims, self.seeds = cfg, dict(layer_dims), seeds
        self.n_runs = len(seeds)
        self.hidden_layers = hidden_layer_names(self.layer_dims)
        gens = make_generators(seeds)
        self.required_layers: list[str] = []
        self.required_frame_layers: list[str] = []
        if cfg.arch in ("vanilla", "chain"):
            self._build_task_networks(gens)
        else:
            self._build_branch(gens)
        self.set_run_generators(make_generators(seeds, DROPOUT_SEED_OFFSET))

    # ------------------------------------------------------------------ construction
    def _build_task_networks(self, gens: list[torch.Generator]) -> None:
        cfg, r = self.cfg, self.n_runs
        if cfg.input_layer == "weighted":
            dims = {self.layer_dims[n] for n in self.hidden_layers}
            if len(dims) != 1:
                raise HeadConfigError(f"input_layer 'weighted' needs equal hidden_* widths, got {sorted(dims)}")
            self.required_layers = list(self.hidden_layers)
            # zeros -> uniform softmax at start: every layer starts with equal say
            self.layer_logits = nn.Parameter(torch.zeros(r, len(self.hidden_layers)))
            in_dim = dims.pop()
        else:
            name = self.hidden_layers[-1] if cfg.input_layer == "last" else cfg.input_layer
            if name not in self.layer_dims:
                raise HeadConfigError(f"input_layer {cfg.input_layer!r} is not a cached layer "
                                      f"(has: {', '.join(self.layer_dims)})")
            self.required_layers = [name]
            in_dim = self.layer_dims[name]
        order = cfg.chain_order if cfg.arch == "chain" else TASK_NAMES
        self.order = tuple(order)
        nets: dict[str, TaskNetwork] = {}   # keyed TYPE, TWO, ... ('type' is an nn.Module method name)
        extra = 0
        for task in self.order:     # construction order = init order (same whatever R is)
            out_dim = TASKS[task].out_dim
            nets[task.upper()] = TaskNetwork(r, in_dim, extra, cfg.hidden, out_dim, cfg.dropout, gens)
            if cfg.arch == "chain":
                extra += out_dim
        self.nets = nn.ModuleDict(nets)

    def _build_branch(self, gens: list[torch.Generator]) -> None:
        cfg, r = self.cfg, self.n_runs
        if "cnn" not in self.layer_dims:
            raise HeadConfigError(f"BRANCH needs the 'cnn' layer (has: {', '.join(self.layer_dims)})")
        self.groups = branch_groups(len(self.hidden_layers) - 1, cfg.branch_blocks,
                                    min_group=1 if cfg.branch_use_frames else 2)
        if cfg.branch_use_frames:
            # block i's queries: frames of the last layer of group i; block 1's keys/values: the cnn frames
            used = ["cnn"] + [f"hidden_{g[-1]}" for g in self.groups]
            self.required_frame_layers = used
        else:
            used = ["cnn"] + list(self.hidden_layers)
            self.required_layers = used
        self.input_maps = nn.ModuleDict({n: StackedLinear(r, self.layer_dims[n], cfg.hidden, gens) for n in used})
        if not cfg.branch_use_frames:
            # one learned embedding per layer token, so attention can tell the layers apart
            self.token_pos = nn.Parameter(per_run(gens, r, lambda g: torch.randn(len(used), cfg.hidden,
                                                                                 generator=g) * 0.02))
        self.branches = nn.ModuleDict({
            task.upper(): BranchNetwork(r, len(self.groups), cfg.hidden, cfg.n_heads, cfg.dropout,
                                        TASKS[task].out_dim, gens)
            for task in TASK_NAMES
        })

    # ------------------------------------------------------------------ per-run utilities
    def set_run_generators(self, gens: Sequence[torch.Generator]) -> None:
        """Give run r's dropout masks to generator r (all dropout modules share the list)."""
        gens = list(gens)
        if len(gens) != self.n_runs:
            raise HeadConfigError(f"set_run_generators got {len(gens)} generators for {self.n_runs} runs")
        for m in self.modules():
            if isinstance(m, StackedDropout):
                m.generators = gens

    def run_state_dict(self, r: int) -> dict[str, Tensor]:
        """Run r's slice ([1, ...]) of every parameter and buffer, as independent copies."""
        self._check_run(r)
        return {k: v[r:r + 1].detach().clone() for k, v in self.state_dict().items()}

    def load_run_state_dict(self, r: int, state: dict[str, Tensor]) -> None:
        """Copy a `run_state_dict` into run r's slice; keys and shapes must match exactly."""
        self._check_run(r)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise HeadConfigError(f"run state mismatch: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            for k, dst in own.items():
                src = state[k]
                if tuple(src.shape) != (1, *dst.shape[1:]):
                    raise HeadConfigError(f"run state {k!r} has shape {tuple(src.shape)}, "
                                          f"expected {(1, *dst.shape[1:])}")
                dst[r:r + 1].copy_(src)

    def _check_run(self, r: int) -> None:
        if not 0 <= r < self.n_runs:
            raise HeadConfigError(f"run index {r} out of range for {self.n_runs} runs")

    # ------------------------------------------------------------------ forward
    def _runs(self, x: Tensor, what: str) -> Tensor:
        if x.shape[0] == self.n_runs:
            return x
        if x.shape[0] == 1:
            return x.expand(self.n_runs, *x.shape[1:])
        raise HeadConfigError(f"{what} has {x.shape[0]} runs in its leading dim, head has {self.n_runs}")

    def _pooled(self, x: HeadInputs, name: str) -> Tensor:
        if name not in x.pooled:
            raise HeadConfigError(f"HeadInputs.pooled lacks layer {name!r} (has: {', '.join(x.pooled) or 'none'})")
        t = x.pooled[name]
        if t.dim() != 3 or t.shape[-1] != self.layer_dims[name]:
            raise HeadConfigError(f"pooled {name!r} must be [R, B, {self.layer_dims[name]}], got {tuple(t.shape)}")
        return self._runs(t, f"pooled {name!r}")

    def forward(self, x: HeadInputs, targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if self.cfg.arch == "branch":
            raw = self._forward_branch_frames(x) if self.cfg.branch_use_frames else self._forward_branch_tokens(x)
            return {t: raw[t] if TASKS[t].is_classification else torch.sigmoid(raw[t]) for t in TASK_NAMES}
        return self._forward_task_networks(x, targets)

    def _features(self, x: HeadInputs) -> Tensor:
        if self.cfg.input_layer != "weighted":
            return self._pooled(x, self.required_layers[0])
        stacked = torch.stack([self._pooled(x, n) for n in self.hidden_layers], dim=1)   # [R, L+1, B, D]
        return torch.einsum("rl,rlbd->rbd", torch.softmax(self.layer_logits, dim=-1), stacked)

    def _forward_task_networks(self, x: HeadInputs, targets: dict[str, Tensor] | None) -> dict[str, Tensor]:
        feats = self._features(x)
        chain = self.cfg.arch == "chain"
        teacher = chain and self.training and targets is not None
        out: dict[str, Tensor] = {}
        fed: list[Tensor] = []
        for task in self.order:
            raw = self.nets[task.upper()](feats, torch.cat(fed, dim=-1) if fed else None)
            spec = TASKS[task]
            pred = raw if spec.is_classification else torch.sigmoid(raw)
            out[task] = pred
            if chain:
                value = torch.softmax(raw, dim=-1) if spec.is_classification else pred
                if teacher and task in targets:
                    value = self._teacher_value(task, targets[task], value)
                fed.append(value)
        return {t: out[t] for t in TASK_NAMES}

    def _teacher_value(self, task: str, target: Tensor, predicted: Tensor) -> Tensor:
        """Ground truth in the shape the chain feeds; rows (or cells) with an unknown (NaN) label keep the
        prediction, so a partly labelled batch never injects NaN into later tasks."""
        spec = TASKS[task]
        target = self._runs(target.to(predicted.device), f"targets[{task!r}]")
        if target.dim() == 2:
            target = target.unsqueeze(-1)
        if target.shape[:2] != predicted.shape[:2] or target.shape[-1] != spec.label_dim:
            raise HeadConfigError(f"targets[{task!r}] must be [R, B, {spec.label_dim}], got {tuple(target.shape)}")
        if spec.is_classification:
            idx = target[..., 0]
            known = ~torch.isnan(idx)
            onehot = F.one_hot(torch.where(known, idx, 0).long(), spec.out_dim).to(predicted.dtype)
            return torch.where(known.unsqueeze(-1), onehot, predicted)
        target = target.to(predicted.dtype)
        return torch.where(torch.isnan(target), predicted, target)

    def _forward_branch_tokens(self, x: HeadInputs) -> dict[str, Tensor]:
        """Token mode: each pooled layer is one token (input map + learned layer embedding)."""
        names = self.required_layers                      # cnn, hidden_0, ..., hidden_L
        tokens = torch.stack([F.gelu(self.input_maps[n](self._pooled(x, n))) for n in names], dim=2)
        tokens = tokens + self.token_pos.unsqueeze(1)     # [R, B, L+2, H]
        kv0 = tokens[:, :, :2]                            # cnn, hidden_0
        queries = [tokens[:, :, g[0] + 1:g[-1] + 2] for g in self.groups]   # hidden_i is token i+1
        out: dict[str, Tensor] = {}
        for task in TASK_NAMES:
            branch, kv = self.branches[task.upper()], kv0
            for block, q in zip(branch.blocks, queries):
                kv = block(q, kv)
            out[task] = branch.out(kv.mean(dim=2))
        return out

    def _forward_branch_frames(self, x: HeadInputs) -> dict[str, Tensor]:
        """Frame mode: queries are frames of successive layers; padding is masked as keys and in the mean."""
        if x.frames is None or x.frame_mask is None:
            raise HeadConfigError("BRANCH with branch_use_frames needs HeadInputs.frames and frame_mask")
        mask = self._runs(x.frame_mask, "frame_mask").bool()
        maps: dict[str, Tensor] = {}
        for n in self.required_frame_layers:
            if n not in x.frames:
                raise HeadConfigError(f"HeadInputs.frames lacks layer {n!r} (has: {', '.join(x.frames) or 'none'})")
            f = self._runs(x.frames[n], f"frames {n!r}")
            if f.dim() != 4 or f.shape[:3] != mask.shape or f.shape[-1] != self.layer_dims[n]:
                raise HeadConfigError(f"frames {n!r} must be [R, B, T, {self.layer_dims[n]}] matching frame_mask "
                                      f"{tuple(mask.shape)}, got {tuple(f.shape)}")
            f = torch.where(mask.unsqueeze(-1), f, torch.zeros((), dtype=f.dtype, device=f.device))
            maps[n] = F.gelu(self.input_maps[n](f))
        pad = ~mask
        queries = [maps[n] for n in self.required_frame_layers[1:]]
        out: dict[str, Tensor] = {}
        for task in TASK_NAMES:
            branch, kv = self.branches[task.upper()], maps["cnn"]
            for block, q in zip(branch.blocks, queries):
                kv = block(q, kv, pad)
            out[task] = branch.out(_masked_mean(kv, mask))
        return out


def build_head(cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int]) -> MultiTaskHead:
    """Build a head for `len(seeds)` stacked runs."""
    return MultiTaskHead(cfg, layer_dims, seeds)
