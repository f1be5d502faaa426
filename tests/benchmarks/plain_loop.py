"""The yardstick: what a researcher would write instead of `avb heads ablate` -- each run one after another.

    python -m tests.benchmarks.plain_loop --cache F.h5 --arch vanilla --epochs 5 --out DIR [--device cpu]

Plain PyTorch: per (weighting, seed) run a fresh model of the paper's head sizes built from `nn.Linear`,
`nn.LayerNorm` and `nn.MultiheadAttention`, `torch.optim.AdamW`, `clip_grad_norm_`, `ReduceLROnPlateau` halving
on the Val mean, batch 8 sliced from tensors held in memory, a Val pass every epoch, a deep copy of the best
epoch's state, and the best epoch's Val and Test predictions saved. The losses and loss weightings are the
project's own (`heads.model.losses`, `heads.model.weighting`, used for one run), so both sides do the same
arithmetic and only the way the runs are organised differs. Prints the wall time of the whole process as its last line.
"""
from __future__ import annotations

import argparse
import copy
import os
import time

T0 = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cache.reader import load_cache  # noqa: E402
from heads.metrics import score_all  # noqa: E402
from heads.model.losses import task_losses  # noqa: E402
from heads.model.weighting import build_weighting  # noqa: E402
from heads.names import PAPER_WEIGHTINGS  # noqa: E402
from heads.tasks import AVB  # noqa: E402


class TaskNet(nn.Module):
    def __init__(self, d_in: int, out: int, hidden: int = 256, dropout: float = 0.3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in, elementwise_affine=False), nn.Linear(d_in, hidden),
                                 nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Vanilla(nn.Module):
    def __init__(self, dims: dict[str, int], layer: str, hidden: int, heads: int) -> None:
        super().__init__()
        self.layer = layer
        self.nets = nn.ModuleDict({t.upper(): TaskNet(dims[layer], AVB[t].out_dim, hidden) for t in AVB.names})

    def forward(self, pooled: dict[str, torch.Tensor], targets: dict | None = None) -> dict[str, torch.Tensor]:
        return {t.lower(): net(pooled[self.layer]) for t, net in self.nets.items()}


class Chain(nn.Module):
    def __init__(self, dims: dict[str, int], layer: str, hidden: int, heads: int) -> None:
        super().__init__()
        self.layer, widths, extra = layer, {}, 0
        for t in AVB.names:
            widths[t] = extra
            extra += AVB[t].out_dim
        self.norm = nn.LayerNorm(dims[layer], elementwise_affine=False)
        self.nets = nn.ModuleDict({t.upper(): nn.Sequential(nn.Linear(dims[layer] + widths[t], hidden), nn.LayerNorm(hidden),
                                                    nn.GELU(), nn.Dropout(0.3), nn.Linear(hidden, AVB[t].out_dim))
                                   for t in AVB.names})

    def forward(self, pooled: dict[str, torch.Tensor], targets: dict | None = None) -> dict[str, torch.Tensor]:
        x, fed, out = self.norm(pooled[self.layer]), [], {}
        for t in AVB.names:
            raw = self.nets[t.upper()](torch.cat([x, *fed], -1))
            out[t] = raw
            if self.training and targets is not None:   # teacher forcing
                value = (F.one_hot(targets[t][:, 0].long(), 8).float() if t == "type" else targets[t])
            else:
                value = torch.softmax(raw, -1) if t == "type" else torch.sigmoid(raw)
            fed.append(value)
        return out


class Block(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8, dropout: float = 0.3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return self.norm(q + self.drop(self.attn(q, kv, kv, need_weights=False)[0]))


class Branch(nn.Module):
    def __init__(self, dims: dict[str, int], layer: str, hidden: int, heads: int) -> None:
        super().__init__()
        names = sorted((n for n in dims if n.startswith("hidden_")), key=lambda n: int(n.split("_")[1]))
        self.layers = ["cnn", *names]
        self.maps = nn.ModuleDict({n: nn.Linear(dims[n], hidden) for n in self.layers})
        self.pos = nn.Parameter(torch.randn(len(self.layers), hidden) * 0.02)
        n = len(names) - 1
        self.groups = [list(g) for g in np.array_split(np.arange(1, n + 1), min(4, n // 2))]
        self.blocks = nn.ModuleDict({t.upper(): nn.ModuleList(Block(hidden, heads) for _ in self.groups)
                                     for t in AVB.names})
        self.outs = nn.ModuleDict({t.upper(): nn.Linear(hidden, AVB[t].out_dim) for t in AVB.names})

    def forward(self, pooled: dict[str, torch.Tensor], targets: dict | None = None) -> dict[str, torch.Tensor]:
        tokens = torch.stack([F.gelu(self.maps[n](pooled[n])) for n in self.layers], 1) + self.pos
        out = {}
        for t in AVB.names:
            kv = tokens[:, :2]
            for block, g in zip(self.blocks[t.upper()], self.groups):
                kv = block(tokens[:, g[0] + 1:g[-1] + 2], kv)
            out[t] = self.outs[t.upper()](kv.mean(1))
        return out


ARCHS = {"vanilla": Vanilla, "chain": Chain, "branch": Branch}


def heads_out(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: v if AVB[t].is_classification else torch.sigmoid(v) for t, v in raw.items()}


def train_one(args: argparse.Namespace, cache, pooled, labels, weighting: str, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    layer = sorted((n for n in cache.layer_dims if n.startswith("hidden_")), key=lambda n: int(n.split("_")[1]))[-1]
    model = ARCHS[args.arch](dict(cache.layer_dims), layer, args.hidden, args.n_heads).to(args.device)
    weights = build_weighting(weighting, n_runs=1, n_tasks=4).to(args.device)
    opt = torch.optim.AdamW([{"params": model.parameters()},
                             {"params": list(weights.parameters()), "weight_decay": 0.0}], lr=1e-3,
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=5)
    train, val, test = (torch.as_tensor(cache.indices(s), device=args.device) for s in ("Train", "Val", "Test"))
    val_labels = {t: np.asarray(cache.labels[t], np.float64)[cache.indices("Val")] for t in AVB.names}
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -np.inf, None
    for _ in range(args.epochs):
        model.train()
        perm = train[torch.randperm(len(train), generator=gen).to(args.device)]
        epoch_losses, steps = 0.0, 0
        for i in range(0, len(perm) - 1, args.batch_size):
            rows = perm[i:i + args.batch_size]
            if len(rows) < 2:
                continue
            tg = {t: labels[t][rows] for t in AVB.names}
            out = heads_out(model({n: v[rows] for n, v in pooled.items()}, tg))
            losses = task_losses(AVB, {t: v[None] for t, v in out.items()}, {t: v[None] for t, v in tg.items()})
            loss = weights(losses).sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            epoch_losses, steps = epoch_losses + losses.detach(), steps + 1
        weights.end_epoch(epoch_losses / steps)
        preds = predict(model, pooled, val)
        score = score_all(AVB, val_labels, preds)["mean"]
        sched.step(score)
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    for split, rows in (("val", val), ("test", test)):
        for t, v in predict(model, pooled, rows).items():
            np.savetxt(f"{args.out}/{args.arch}-{weighting}-s{seed}-{split}-{t}.csv", v, fmt="%.6f", delimiter=",")
    return {"mean": best}


@torch.no_grad()
def predict(model: nn.Module, pooled: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, np.ndarray]:
    model.eval()
    parts = {t: [] for t in AVB.names}
    for i in range(0, len(rows), 1024):
        out = heads_out(model({n: v[rows[i:i + 1024]] for n, v in pooled.items()}))
        for t, v in out.items():
            parts[t].append((torch.softmax(v, -1) if t == "type" else v).float().cpu())
    return {t: torch.cat(p).numpy() for t, p in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--arch", choices=list(ARCHS), default="vanilla")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cache = load_cache(args.cache)
    pooled = {n: torch.from_numpy(np.asarray(v, np.float32)).to(args.device) for n, v in cache.pooled.items()}
    labels = {t: torch.from_numpy(np.asarray(v, np.float32)).to(args.device) for t, v in cache.labels.items()}
    for weighting in PAPER_WEIGHTINGS:
        for seed in (int(s) for s in args.seeds.split(",")):
            train_one(args, cache, pooled, labels, weighting, seed)
    print(f"plain loop: {args.arch}, {len(PAPER_WEIGHTINGS) * len(args.seeds.split(','))} runs one after another, "
          f"{args.epochs} epochs: {time.perf_counter() - T0:.2f} s")


if __name__ == "__main__":
    main()
