"""The paper's three multi-task heads (VANILLA, CHAIN, BRANCH), stacked over R independent runs.

A head holds the parameters of R runs of one architecture (every parameter has leading dim R), so the ablation
grid trains many (weighting, seed) runs with batched matmuls; inside a run the four tasks' networks are
stacked too (`copies=4` in heads/model/layers.py) wherever their shapes agree, so a step costs one matmul per layer
for all tasks of all runs. Run r is initialised only from `torch.Generator().manual_seed(seeds[r])` and its
dropout masks come from its own generator, so a run trained jointly equals the same run trained alone.

Each architecture is a class in `ARCHITECTURES`; `build_head` picks one by `HeadConfig.arch`.

Departures from the authors' code (all listed in the README under *How it is built*), on purpose:
* no BatchNorm anywhere (it sat before cross-entropy with batch 8); LayerNorm instead;
* the heads read masked-mean pooled features from the cache (pooling never averages padding) instead of
  attention pooling over unmasked, zero-padded frames;
* BRANCH uses residual + LayerNorm blocks (the MTAN-style variant), key padding masks, and a masked mean over
  valid frames instead of the last (often padded) frame;
* CHAIN normalises only the backbone features; the chained task values are appended unnormalised, so a
  one-hot / probability vector keeps its meaning.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache.command_kit.errors import AvbError
from heads.model.featurizer import Featurizer, FeaturizerError
from heads.model.layers import (
    StackedDropout,
    StackedLayerNorm,
    StackedLinear,
    StackedMultiheadAttention,
    make_generators,
    per_run,
)
from heads.names import ARCHS
from heads.tasks import Task, TaskSet

# Dropout streams are seeded apart from the init streams so masks are not correlated with initial weights.
DROPOUT_SEED_OFFSET = 0x5EED_D0
_HIDDEN = re.compile(r"hidden_(\d+)$")


class HeadConfigError(AvbError):
    """A head configuration, layer set or input that cannot work; the message names the offending value."""


@dataclass
class HeadConfig:
    """Head hyper-parameters; defaults are the paper's settings (256-d, dropout 0.3, 8 heads, chain order)."""

    arch: str = "vanilla"                 # "vanilla" | "chain" | "branch"
    hidden: int = 256                     # task-network hidden width / attention dim
    dropout: float = 0.3
    input_layer: str = "last"             # vanilla/chain: "last" (last hidden_*), "weighted" (learnable
                                          # softmax-weighted sum of all hidden_*), or any layer name
    chain_order: tuple[str, ...] = ()     # chain: a permutation of the corpus's tasks; empty = their order
    n_heads: int = 8                      # branch attention heads
    branch_blocks: int = 4                # attention blocks per task (branch)
    branch_use_frames: bool = False       # attend over frames (needs frame-level cache) instead of layer tokens

    def __post_init__(self) -> None:
        self.chain_order = tuple(self.chain_order)   # JSON gives a list

    def validate(self, tasks: TaskSet) -> None:
        """Raise HeadConfigError naming the first bad field."""
        if self.arch not in ARCHS:
            raise HeadConfigError(f"unknown head arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.hidden < 1:
            raise HeadConfigError(f"hidden must be >= 1, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise HeadConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.chain_order and sorted(self.chain_order) != sorted(tasks.names):
            raise HeadConfigError(f"chain_order {list(self.chain_order)} must name each of "
                                  f"{', '.join(tasks.names)} exactly once")
        if self.arch == "branch":
            if self.n_heads < 1 or self.hidden % self.n_heads:
                raise HeadConfigError(f"hidden {self.hidden} must be divisible by n_heads {self.n_heads}")
            if self.branch_blocks < 1:
                raise HeadConfigError(f"branch_blocks must be >= 1, got {self.branch_blocks}")


def with_chain_order(cfg: HeadConfig, tasks: TaskSet) -> HeadConfig:
    """`cfg` with an empty chain order filled in as the corpus's task order (what a run's config.json records)."""
    return cfg if cfg.chain_order else replace(cfg, chain_order=tasks.names)


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


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [..., T, D] over valid frames (mask [..., T], broadcastable); zeros for a clip with none."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1.0)


def task_values(task: Task, raw: Tensor) -> Tensor:
    """A task network's raw output as the values the chain feeds: class probabilities (softmax) or regression
    values in [0, 1] (sigmoid; the task's label range mapped to [0, 1])."""
    return torch.softmax(raw, dim=-1) if task.is_classification else torch.sigmoid(raw)


def in_label_range(task: Task, unit: Tensor) -> Tensor:
    """Regression values in [0, 1] -> the task's label range (the identity for A-VB's [0, 1] labels)."""
    return unit if task.unit_range else task.low + (task.high - task.low) * unit


def to_unit_range(task: Task, labels: Tensor) -> Tensor:
    """Inverse of in_label_range, for the ground truth a chain is fed while training."""
    return labels if task.unit_range else (labels - task.low) / (task.high - task.low)


class MultiTaskHead(nn.Module):
    """The part every architecture shares: config, runs, the inputs it reads, per-run state and generators.

    `forward(inputs, targets=None)` returns task -> [R, B, out_dim]: logits for a classification task, for a
    regression task sigmoid outputs mapped to its label range ([0, 1] for A-VB). Subclasses build their modules in `__init__` (drawing the
    initial values from `gens`, one generator per run, in a fixed order) and implement `_forward`.
    """

    eval_row_cost = 1   # activation memory of one evaluated row relative to VANILLA's; evaluation chunks shrink by it

    def __init__(self, cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int], tasks: TaskSet) -> None:
        super().__init__()
        cfg.validate(tasks)
        self.tasks = tasks
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise HeadConfigError("a head needs at least one run seed")
        self.cfg, self.layer_dims, self.seeds = cfg, dict(layer_dims), seeds
        self.n_runs = len(seeds)
        self.hidden_layers = hidden_layer_names(self.layer_dims)
        self.required_layers: list[str] = []
        self.required_frame_layers: list[str] = []

    # ------------------------------------------------------------------ per-run utilities
    def set_run_generators(self, gens: Sequence[torch.Generator], draw_ahead: bool = False) -> None:
        """Give run r's dropout masks to generator r (all dropout modules share the list); `draw_ahead` lets
        them draw several steps' masks per call (see StackedDropout)."""
        gens = list(gens)
        if len(gens) != self.n_runs:
            raise HeadConfigError(f"set_run_generators got {len(gens)} generators for {self.n_runs} runs")
        for m in self.modules():
            if isinstance(m, StackedDropout):
                m.set_generators(gens, draw_ahead)

    def set_run_dropout(self, ps: Sequence[float]) -> None:
        """Run r's dropout probability, in every dropout module (the runs of a joint group may differ in it)."""
        ps = [float(p) for p in ps]
        if len(ps) != self.n_runs:
            raise HeadConfigError(f"set_run_dropout got {len(ps)} probabilities for {self.n_runs} runs")
        for m in self.modules():
            if isinstance(m, StackedDropout):
                m.set_run_probabilities(ps)

    @contextlib.contextmanager
    def without_dropout(self) -> Iterator[None]:
        """The training forward (CHAIN's teacher forcing included) with no dropout mask drawn, so no run's
        dropout stream moves: how a weighting that measures each step's effect (FAMO) sees the batch again."""
        drops = [m for m in self.modules() if isinstance(m, StackedDropout)]
        modes = [m.training for m in drops]
        for m in drops:
            m.train(False)
        try:
            yield
        finally:
            for m, mode in zip(drops, modes):
                m.train(mode)

    def _keep_runs(self, rows: list[int]) -> None:   # heads.model.layers.keep_runs_
        self.seeds = [self.seeds[r] for r in rows]

    def use_grad_buffers(self, on: bool = True) -> None:
        """Let every stacked linear layer write its weight gradient in place (see heads/model/layers.py)."""
        for m in self.modules():
            if isinstance(m, StackedLinear):
                m.use_grad_buffer(on)

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

    # ------------------------------------------------------------------ inputs
    def _runs(self, x: Tensor, what: str) -> Tensor:
        """x itself when its leading dim is R or 1: inputs shared by all runs stay one copy until the first
        stacked layer expands them (evaluation feeds every run the same rows)."""
        if x.shape[0] in (self.n_runs, 1):
            return x
        raise HeadConfigError(f"{what} has {x.shape[0]} runs in its leading dim, head has {self.n_runs}")

    def _pooled(self, x: HeadInputs, name: str) -> Tensor:
        if name not in x.pooled:
            raise HeadConfigError(f"HeadInputs.pooled lacks layer {name!r} (has: {', '.join(x.pooled) or 'none'})")
        t = x.pooled[name]
        if t.dim() != 3 or t.shape[-1] != self.layer_dims[name]:
            raise HeadConfigError(f"pooled {name!r} must be [R, B, {self.layer_dims[name]}], got {tuple(t.shape)}")
        return self._runs(t, f"pooled {name!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: HeadInputs, targets: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """What the losses read: logits for classification tasks, values in the label range for regression."""
        raw = self._forward(x, targets)
        return {t.name: raw[t.name] if t.is_classification else in_label_range(t, torch.sigmoid(raw[t.name]))
                for t in self.tasks}

    def predict(self, x: HeadInputs) -> dict[str, Tensor]:
        """What a user reads: float32 class probabilities for classification tasks, values for regression tasks
        (call in eval mode; evaluation, ensembles and `avb predict` all take their outputs from here)."""
        raw = self._forward(x, None)
        return {t.name: task_values(t, raw[t.name].float()) if t.is_classification
                else in_label_range(t, torch.sigmoid(raw[t.name].float())) for t in self.tasks}

    def _forward(self, x: HeadInputs, targets: dict[str, Tensor] | None) -> dict[str, Tensor]:
        raise NotImplementedError


class TaskNetworks(nn.Module):
    """The paper's shallow task networks, one per task, stacked over runs and tasks:

        LN(x) [+ chained inputs] -> FC -> LN -> GELU -> Dropout -> FC

    The first FC of every task reads the same features, so the four are one [R, T, D, H] weight (one matmul);
    CHAIN adds each task's chained inputs through its own small FC (`chain_in`, no bias), which together with
    the first FC is exactly the paper's FC over [features, chained values]. Tasks are kept in `tasks` order.
    """

    def __init__(self, n_runs: int, tasks: Sequence[Task], in_dim: int, hidden: int, dropout: float,
                 gens: Sequence[torch.Generator], chained: bool = False) -> None:
        super().__init__()
        self.tasks = tuple(t.name for t in tasks)
        self.in_dim = in_dim     # a static width: the ONNX tracer needs layer_norm's shape as a constant
        n_tasks = len(self.tasks)
        self.fc1 = StackedLinear(n_runs, in_dim, hidden, gens, copies=n_tasks)
        extra = np.cumsum([0] + [t.out_dim for t in tasks[:-1]]) if chained else np.zeros(n_tasks, int)
        self.chain_in = nn.ModuleDict({
            task.upper(): StackedLinear(n_runs, int(e), hidden, gens, bias=False)
            for task, e in zip(self.tasks, extra) if e > 0
        })
        if chained:   # nn.Linear(in + e, hidden) draws uniform(+-1/sqrt(in + e)) over all its inputs
            with torch.no_grad():
                fan_in = torch.tensor([in_dim + int(e) for e in extra], dtype=torch.float32)
                scale = torch.sqrt(in_dim / fan_in).view(1, n_tasks, 1)
                self.fc1.weight.mul_(scale.unsqueeze(-1))
                self.fc1.bias.mul_(scale)
                for task, e in zip(self.tasks, extra):
                    if e > 0:
                        self.chain_in[task.upper()].weight.mul_(math.sqrt(e / (in_dim + e)))
        self.norm = StackedLayerNorm(n_runs, hidden, copies=n_tasks)
        self.drop = StackedDropout(dropout)
        self.fc2 = nn.ModuleDict({task.name.upper(): StackedLinear(n_runs, hidden, task.out_dim, gens)
                                  for task in tasks})

    def first_layer(self, features: Tensor) -> Tensor:
        """The features' part of every task's first FC: [R, B, D] -> [R, T, B, H]."""
        x = F.layer_norm(features, (self.in_dim,))
        return self.fc1(x.unsqueeze(1))

    def parallel(self, features: Tensor) -> dict[str, Tensor]:
        """All tasks at once (no chained inputs): task -> raw output [R, B, out]."""
        h = self.drop(F.gelu(self.norm(self.first_layer(features))))        # [R, T, B, H]
        return {task: self.fc2[task.upper()](h[:, i]) for i, task in enumerate(self.tasks)}

    def task_output(self, i: int, h1: Tensor, fed: list[Tensor], keep: Tensor | None) -> Tensor:
        """Task i of the chain: its first-FC features part h1 [R, B, H], the values fed so far, its dropout mask."""
        task = self.tasks[i].upper()
        if fed:
            h1 = h1 + self.chain_in[task](torch.cat(fed, dim=-1))
        h = F.gelu(self.norm.copy_forward(h1, i))
        if keep is not None:
            h = h * keep
        return self.fc2[task](h)


class VanillaHead(MultiTaskHead):
    """VANILLA: parallel shallow task networks on one (selected or mixed) backbone layer."""

    def __init__(self, cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int], tasks: TaskSet) -> None:
        super().__init__(cfg, layer_dims, seeds, tasks)
        gens = make_generators(self.seeds)
        try:
            self.featurizer = Featurizer(cfg.input_layer, self.layer_dims, self.hidden_layers, self.n_runs)
        except FeaturizerError as err:
            raise HeadConfigError(str(err)) from None
        self.required_layers = list(self.featurizer.required_layers)
        self.order = self._order()
        self.nets = TaskNetworks(self.n_runs, [tasks[t] for t in self.order], self.featurizer.dim, cfg.hidden,
                                 cfg.dropout, gens, chained=cfg.arch == "chain")

    def _order(self) -> tuple[str, ...]:
        return self.tasks.names

    def _features(self, x: HeadInputs) -> Tensor:
        return self.featurizer([self._pooled(x, n) for n in self.required_layers])

    def _forward(self, x: HeadInputs, targets: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return self.nets.parallel(self._features(x))


class ChainHead(VanillaHead):
    """CHAIN: the task networks in sequence (default: the corpus's task order, for A-VB TYPE -> TWO -> HIGH ->
    CULTURE), each fed the features plus the earlier tasks' values: ground truth while training (teacher
    forcing), its own predictions otherwise."""

    def _order(self) -> tuple[str, ...]:
        return tuple(self.cfg.chain_order) or self.tasks.names

    def _forward(self, x: HeadInputs, targets: dict[str, Tensor] | None) -> dict[str, Tensor]:
        nets = self.nets
        h1 = nets.first_layer(self._features(x))                          # [R, T, B, H]
        teacher = self.training and targets is not None
        keep = nets.drop.mask(h1.shape[1:], h1) if nets.drop.training and nets.drop.active else None
        out: dict[str, Tensor] = {}
        fed: list[Tensor] = []
        for i, task in enumerate(self.order):
            raw = nets.task_output(i, h1[:, i], fed, None if keep is None else keep[:, i])
            out[task] = raw
            if i + 1 < len(self.order):
                value = task_values(self.tasks[task], raw)
                if teacher and task in targets:
                    value = self._teacher_value(task, targets[task], value)
                fed.append(value)
        return out

    def _teacher_value(self, task: str, target: Tensor, predicted: Tensor) -> Tensor:
        """Ground truth in the shape the chain feeds; rows (or cells) with an unknown (NaN) label keep the
        prediction, so a partly labelled batch never injects NaN into later tasks."""
        spec = self.tasks[task]
        target = self._runs(target.to(predicted.device), f"targets[{task!r}]").expand(predicted.shape[0],
                                                                                        *target.shape[1:])
        if target.dim() == 2:
            target = target.unsqueeze(-1)
        if target.shape[:2] != predicted.shape[:2] or target.shape[-1] != spec.label_dim:
            raise HeadConfigError(f"targets[{task!r}] must be [R, B, {spec.label_dim}], got {tuple(target.shape)}")
        if spec.is_classification:
            idx = target[..., 0]
            known = ~torch.isnan(idx)
            onehot = F.one_hot(torch.where(known, idx, 0).long(), spec.out_dim).to(predicted.dtype)
            return torch.where(known.unsqueeze(-1), onehot, predicted)
        target = to_unit_range(spec, target.to(predicted.dtype))
        return torch.where(torch.isnan(target), predicted, target)


class AttentionBlock(nn.Module):
    """MTAN-style block for every task at once: out = LN(query + MHA(query, kv, kv)), [R, T, ...]."""

    def __init__(self, n_runs: int, n_tasks: int, dim: int, n_heads: int, dropout: float,
                 gens: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.attn = StackedMultiheadAttention(n_runs, dim, n_heads, dropout, gens, copies=n_tasks)
        self.norm = StackedLayerNorm(n_runs, dim, copies=n_tasks)

    def forward(self, query: Tensor, kv: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.norm(query + self.attn(query, kv, key_padding_mask))


class BranchHead(MultiTaskHead):
    """BRANCH: per task a stack of attention blocks whose queries are successive backbone layers and whose
    keys/values are the previous block's output (block 1: the CNN features and hidden_0); over per-layer
    pooled tokens, or over frames when the cache has them (`branch_use_frames`)."""

    eval_row_cost = 4   # every task attends over all layer tokens: [R, tasks, B, tokens, H] per block

    def __init__(self, cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int], tasks: TaskSet) -> None:
        super().__init__(cfg, layer_dims, seeds, tasks)
        gens, r, n_tasks = make_generators(self.seeds), self.n_runs, len(tasks)
        if "cnn" not in self.layer_dims:
            raise HeadConfigError(f"BRANCH needs the 'cnn' layer (has: {', '.join(self.layer_dims)})")
        self.groups = branch_groups(len(self.hidden_layers) - 1, cfg.branch_blocks,
                                    min_group=1 if cfg.branch_use_frames else 2)
        if cfg.branch_use_frames:
            # block i's queries: frames of the last layer of group i; block 1's keys/values: the cnn frames
            self.query_layers = [f"hidden_{g[-1]}" for g in self.groups]
            self.required_frame_layers = ["cnn", *self.query_layers]
        else:
            self.query_layers = list(self.hidden_layers)
            self.required_layers = ["cnn", *self.query_layers]
        widths = {self.layer_dims[n] for n in self.query_layers}
        if len(widths) != 1:
            raise HeadConfigError(f"BRANCH needs equal hidden_* widths, got {sorted(widths)}")
        self.map_cnn = StackedLinear(r, self.layer_dims["cnn"], cfg.hidden, gens)
        self.map_hidden = StackedLinear(r, widths.pop(), cfg.hidden, gens, copies=len(self.query_layers))
        if not cfg.branch_use_frames:
            # one learned embedding per layer token, so attention can tell the layers apart
            self.token_pos = nn.Parameter(per_run(gens, r, lambda g: torch.randn(
                len(self.required_layers), cfg.hidden, generator=g) * 0.02))
        self.blocks = nn.ModuleList(AttentionBlock(r, n_tasks, cfg.hidden, cfg.n_heads, cfg.dropout, gens)
                                    for _ in self.groups)
        self.outs = nn.ModuleDict({task.name.upper(): StackedLinear(r, cfg.hidden, task.out_dim, gens)
                                   for task in tasks})

    def _heads_out(self, summary: Tensor) -> dict[str, Tensor]:
        """summary [R, T, B, H] -> task -> raw output [R, B, out]."""
        return {task: self.outs[task.upper()](summary[:, i]) for i, task in enumerate(self.tasks.names)}

    def _forward(self, x: HeadInputs, targets: dict[str, Tensor] | None) -> dict[str, Tensor]:
        return self._forward_frames(x) if self.cfg.branch_use_frames else self._forward_tokens(x)

    def _forward_tokens(self, x: HeadInputs) -> dict[str, Tensor]:
        """Token mode: each pooled layer is one token (input map + learned layer embedding)."""
        cnn = self.map_cnn(self._pooled(x, "cnn"))                                      # [R, B, H]
        hidden = self.map_hidden(torch.stack([self._pooled(x, n) for n in self.query_layers], dim=1))
        tokens = F.gelu(torch.cat([cnn.unsqueeze(1), hidden], dim=1))                   # [R, L+2, B, H]
        tokens = (tokens + self.token_pos.unsqueeze(2)).transpose(1, 2)                # [R, B, L+2, H]
        kv = tokens[:, None, :, :2]                                   # cnn, hidden_0: [R, 1, B, 2, H]
        for block, g in zip(self.blocks, self.groups):                # hidden_i is token i+1
            kv = block(tokens[:, None, :, g[0] + 1:g[-1] + 2], kv)    # -> [R, T, B, len(g), H]
        return self._heads_out(kv.mean(dim=3))

    def _forward_frames(self, x: HeadInputs) -> dict[str, Tensor]:
        """Frame mode: queries are frames of successive layers; padding is masked as keys and in the mean."""
        if x.frames is None or x.frame_mask is None:
            raise HeadConfigError("BRANCH with branch_use_frames needs HeadInputs.frames and frame_mask")
        mask = self._runs(x.frame_mask, "frame_mask").bool()                           # [R or 1, B, T]
        frames = {}
        for n in self.required_frame_layers:
            if n not in x.frames:
                raise HeadConfigError(f"HeadInputs.frames lacks layer {n!r} (has: {', '.join(x.frames) or 'none'})")
            f = self._runs(x.frames[n], f"frames {n!r}")
            if f.dim() != 4 or f.shape[1:3] != mask.shape[1:] or f.shape[-1] != self.layer_dims[n]:
                raise HeadConfigError(f"frames {n!r} must be [R, B, T, {self.layer_dims[n]}] matching frame_mask "
                                      f"{tuple(mask.shape)}, got {tuple(f.shape)}")
            frames[n] = torch.where(mask.unsqueeze(-1), f, torch.zeros((), dtype=f.dtype, device=f.device))
        kv = F.gelu(self.map_cnn(frames["cnn"])).unsqueeze(1)                          # [R, 1, B, T, H]
        queries = F.gelu(self.map_hidden(torch.stack([frames[n] for n in self.query_layers], dim=1)))
        pad = ~mask.unsqueeze(1)                                                       # [R, 1, B, T]
        for i, block in enumerate(self.blocks):
            kv = block(queries[:, i:i + 1], kv, pad)                                   # [R, T, B, T, H]
        return self._heads_out(_masked_mean(kv, mask.unsqueeze(1)))


ARCHITECTURES: dict[str, type[MultiTaskHead]] = {"vanilla": VanillaHead, "chain": ChainHead, "branch": BranchHead}


def build_head(cfg: HeadConfig, layer_dims: dict[str, int], seeds: Sequence[int], tasks: TaskSet, *,
               device: torch.device | str = "cpu", dropout_generators: Sequence[torch.Generator] | None = None,
               draw_ahead: bool = False) -> MultiTaskHead:
    """The head of architecture `cfg.arch` for `len(seeds)` stacked runs predicting `tasks`, on `device`.

    Initial values are drawn on the CPU from each run's seed (the same head on every device); run r's dropout
    masks come from `dropout_generators[r]`, by default one generator per run seeded from its seed and made
    once, on `device` (a GPU's stream differs from the CPU's). `draw_ahead`: see StackedDropout.
    """
    cfg.validate(tasks)
    head = ARCHITECTURES[cfg.arch](cfg, layer_dims, seeds, tasks).to(device)
    if dropout_generators is None:
        dropout_generators = make_generators(head.seeds, DROPOUT_SEED_OFFSET, device)
    head.set_run_generators(dropout_generators, draw_ahead)
    return head
