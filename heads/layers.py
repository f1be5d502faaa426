"""Building blocks whose parameters are stacked over R independent runs.

Every parameter has a leading run dimension R and every activation has leading dims [R, B, ...], so R runs of
one architecture (different seeds / loss weightings) train together with batched matmuls instead of one after
another. Two properties make a run trained jointly identical to the same run trained alone:

* initialisation: run r's slice is drawn from run r's own `torch.Generator` (seeded with run r's seed), in the
  same order whatever R is;
* dropout: run r's mask is drawn from run r's own generator.

The only Python loops over runs are those RNG draws (a generator cannot be vectorised); all arithmetic is
batched over R.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RunShapeError(ValueError):
    """An input's leading run dimension or feature width does not match the stacked module."""


def make_generators(seeds: Sequence[int], offset: int = 0) -> list[torch.Generator]:
    """One CPU generator per run, seeded with `seed + offset` (offset separates init and dropout streams)."""
    return [torch.Generator().manual_seed(int(s) + offset) for s in seeds]


def per_run(generators: Sequence[torch.Generator] | None, n_runs: int,
            draw: Callable[[torch.Generator | None], Tensor]) -> Tensor:
    """Stack `draw(generator_r)` over runs: run r's values depend only on run r's generator."""
    if generators is None:
        return torch.stack([draw(None) for _ in range(n_runs)])
    if len(generators) != n_runs:
        raise RunShapeError(f"got {len(generators)} generators for {n_runs} runs")
    return torch.stack([draw(g) for g in generators])


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound


def _check_runs(x: Tensor, n_runs: int, what: str) -> None:
    if x.dim() < 2 or x.shape[0] != n_runs:
        raise RunShapeError(f"{what}: expected leading run dim {n_runs}, got shape {tuple(x.shape)}")


def _per_run_view(p: Tensor, x: Tensor) -> Tensor:
    """View a [R, F] parameter so it broadcasts against x of shape [R, ..., F]."""
    return p.view(p.shape[0], *([1] * (x.dim() - 2)), p.shape[-1])


class StackedLinear(nn.Module):
    """R independent `nn.Linear(in_features, out_features)` layers applied with one batched matmul.

    weight is stored [R, in, out] (so `baddbmm` needs no transpose); initialised like `nn.Linear`
    (uniform(+-1/sqrt(in)) for weight and bias), run r from generator r.
    """

    def __init__(self, n_runs: int, in_features: int, out_features: int,
                 generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__()
        self.n_runs, self.in_features, self.out_features = n_runs, in_features, out_features
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = nn.Parameter(
            per_run(generators, n_runs, lambda g: _uniform((in_features, out_features), bound, g)))
        self.bias = nn.Parameter(per_run(generators, n_runs, lambda g: _uniform((out_features,), bound, g)))

    def forward(self, x: Tensor) -> Tensor:
        """x [R, ..., in] -> [R, ..., out]."""
        _check_runs(x, self.n_runs, "StackedLinear input")
        if x.shape[-1] != self.in_features:
            raise RunShapeError(f"StackedLinear expects {self.in_features} input features, got {x.shape[-1]}")
        flat = x.reshape(self.n_runs, -1, self.in_features)
        out = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward_concat(self, x: Tensor, extra: Tensor) -> Tensor:
        """forward(cat([x, extra], -1)), computing an input gradient only for the parts that need one.

        CHAIN feeds each task network the backbone features plus the earlier tasks' outputs. Through a plain
        `cat`, autograd computes the gradient of the whole concatenated input, [R, B, in] @ W^T, a second read
        of the largest weight of the network per step, only to throw the feature part away (the features
        are data). Same forward, same weight and bias gradients.
        """
        _check_runs(x, self.n_runs, "StackedLinear input")
        _check_runs(extra, self.n_runs, "StackedLinear chained input")
        if x.shape[-1] + extra.shape[-1] != self.in_features:
            raise RunShapeError(f"StackedLinear expects {self.in_features} input features, got "
                                f"{x.shape[-1]} + {extra.shape[-1]}")
        lead = x.shape[:-1]
        flat_x = x.reshape(self.n_runs, -1, x.shape[-1])
        flat_e = extra.reshape(self.n_runs, -1, extra.shape[-1])
        out = _ConcatLinear.apply(flat_x, flat_e, self.weight, self.bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"runs={self.n_runs}, in={self.in_features}, out={self.out_features}"


class _ConcatLinear(torch.autograd.Function):
    """baddbmm(bias, cat([x, extra], -1), weight) with per-part input gradients (see forward_concat)."""

    @staticmethod
    def forward(ctx, x: Tensor, extra: Tensor, weight: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        inputs = torch.cat([x, extra.to(x.dtype)], dim=-1)
        ctx.save_for_backward(inputs, weight)
        ctx.split = x.shape[-1]
        ctx.extra_dtype = extra.dtype
        return torch.baddbmm(bias.unsqueeze(1), inputs, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs, weight = ctx.saved_tensors
        split = ctx.split
        need_x, need_extra, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight[:, :split].transpose(1, 2)) if need_x else None
        grad_extra = torch.bmm(grad, weight[:, split:].transpose(1, 2)).to(ctx.extra_dtype) if need_extra else None
        grad_w = torch.bmm(inputs.transpose(1, 2), grad) if need_w else None
        grad_b = grad.sum(1) if need_b else None
        return grad_x, grad_extra, grad_w, grad_b


class StackedLayerNorm(nn.Module):
    """LayerNorm over the last (feature) dim with a per-run affine transform (or none, `affine=False`).

    Used instead of BatchNorm: the reference's BatchNorm before cross-entropy with batch 8 is a known defect,
    and LayerNorm does not couple the samples of a batch (nor, here, the runs).
    """

    def __init__(self, n_runs: int, dim: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.n_runs, self.dim, self.affine, self.eps = n_runs, dim, affine, eps
        if affine:
            self.weight = nn.Parameter(torch.ones(n_runs, dim))
            self.bias = nn.Parameter(torch.zeros(n_runs, dim))

    def forward(self, x: Tensor) -> Tensor:
        _check_runs(x, self.n_runs, "StackedLayerNorm input")
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        if self.affine:
            y = y * _per_run_view(self.weight, y) + _per_run_view(self.bias, y)
        return y

    def extra_repr(self) -> str:
        return f"runs={self.n_runs}, dim={self.dim}, affine={self.affine}"


class StackedDropout(nn.Module):
    """Dropout whose mask for run r comes from run r's generator, so joint training equals solo training.

    Identity in eval mode. Without generators (`generators=None`) it falls back to the global RNG, which is
    still correct dropout but no longer run-independent. Masks are drawn on the generator's device and moved.
    """

    def __init__(self, p: float, generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generators: list[torch.Generator] | None = list(generators) if generators is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.generators is None:
            keep = torch.rand(x.shape, device=x.device) >= self.p
        else:
            _check_runs(x, len(self.generators), "StackedDropout input")
            gens = self.generators
            # one buffer filled run by run (the same draws as torch.rand per run), then one comparison
            draws = torch.empty((len(gens), *x.shape[1:]), device=gens[0].device)
            for r, g in enumerate(gens):
                torch.rand(x.shape[1:], generator=g, device=g.device, out=draws[r])
            keep = (draws >= self.p).to(x.device)
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class StackedMultiheadAttention(nn.Module):
    """R independent multi-head attention layers (q/k/v/out projections stacked per run).

    The runs are folded into the batch dim after the per-run projections, and attention itself is
    `F.scaled_dot_product_attention`. `key_padding_mask` follows PyTorch's convention: True = padding, ignored.
    A query whose keys are all padding gets a zero context (its output is the out-projection bias) instead of
    NaN. Dropout is applied to the attention output, not to the attention weights, because SDPA's internal
    dropout uses the global RNG and would break the per-run independence.
    """

    def __init__(self, n_runs: int, dim: int, n_heads: int, dropout: float = 0.0,
                 generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__()
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"attention dim {dim} is not divisible by n_heads {n_heads}")
        self.n_runs, self.dim, self.n_heads = n_runs, dim, n_heads
        self.q_proj = StackedLinear(n_runs, dim, dim, generators)
        self.k_proj = StackedLinear(n_runs, dim, dim, generators)
        self.v_proj = StackedLinear(n_runs, dim, dim, generators)
        self.out_proj = StackedLinear(n_runs, dim, dim, generators)
        self.dropout = StackedDropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        """[R, B, T, D] -> [R*B, H, T, D/H]."""
        r, b, t, _ = x.shape
        return x.reshape(r * b, t, self.n_heads, self.dim // self.n_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None) -> Tensor:
        """query [R, B, Tq, D], key/value [R, B, Tk, D], key_padding_mask [R, B, Tk] bool -> [R, B, Tq, D]."""
        r, b, tq, _ = query.shape
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        attn_mask = has_key = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != key.shape[:3]:
                raise RunShapeError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} does not match "
                                    f"keys {tuple(key.shape[:3])}")
            valid = ~key_padding_mask.bool()
            has_key = valid.any(-1)                                   # [R, B]
            allowed = valid | ~has_key.unsqueeze(-1)                  # all-padding rows: allow all, zeroed below
            attn_mask = allowed.reshape(r * b, 1, 1, -1)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)   # [R*B, H, Tq, dh]
        ctx = ctx.transpose(1, 2).reshape(r, b, tq, self.dim)
        if has_key is not None:
            ctx = ctx * has_key.to(ctx.dtype).view(r, b, 1, 1)
        return self.dropout(self.out_proj(ctx))

    def extra_repr(self) -> str:
        return f"runs={self.n_runs}, dim={self.dim}, heads={self.n_heads}"
