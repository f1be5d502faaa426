"""Building blocks whose parameters are stacked over R independent runs (and, inside a run, over copies).

Every parameter has a leading run dimension R and every activation has leading dims [R, ...], so R runs of
one architecture (different seeds / loss weightings) train together with batched matmuls instead of one after
another. A layer may also hold C independent copies per run (`copies=C`: one per task, or one per backbone
layer); their weights are [R, C, in, out] and one `bmm` over the R*C matrices applies them all, so the four
task networks of a head cost one call, not four. Two properties make a run trained jointly identical to the
same run trained alone:

* initialisation: run r's slice is drawn from run r's own `torch.Generator` (seeded with run r's seed), in the
  same order whatever R is;
* dropout: run r's mask is drawn from run r's own generator.

The only Python loops over runs are those RNG draws (a generator cannot be vectorised); all arithmetic is
batched over R.

Why the weight gradients are written in place (`_StackedMatmul`): at the paper's sizes a joint group's
largest weights are tens of MB (12 VANILLA runs: 38 MB for the four first layers; 12 BRANCH runs: 330 MB).
autograd allocates a fresh gradient for them on every step, which the C allocator serves with new pages
(page faults cost more than the matmul that fills them: 14 ms against 1.8 ms for 38 MB, measured). The
gradient goes instead into a buffer kept by the layer across steps. The per-run squared norm of such a
gradient, needed for per-run clipping, is computed from two small Gram matrices instead of another pass over
the gradient: ||X^T G||_F^2 = sum((X X^T) * (G G^T)), X and G having only B rows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RunShapeError(ValueError):
    """An input's leading run dimension or feature width does not match the stacked module."""


def make_generators(seeds: Sequence[int], offset: int = 0, device: str | torch.device = "cpu"
                    ) -> list[torch.Generator]:
    """One generator per run, seeded with `seed + offset` (offset separates init and dropout streams)."""
    return [torch.Generator(device=device).manual_seed(int(s) + offset) for s in seeds]


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


def keep_runs_(module: nn.Module, rows: Sequence[int]) -> None:
    """Keep only the runs `rows` (indices into the leading run dim, in order) of a stacked module, in place.

    Every parameter and buffer below `module` is cut to those rows, every `n_runs` follows, and a module with
    per-run state off the state dict (generators, masks drawn ahead) cuts it in its `_keep_runs(rows)`. A kept
    run's slices are unchanged, so it goes on exactly as it would have, and the stack costs what the kept runs
    do (a pruned search trial leaves its group). Parameters stay the same objects, their data replaced, so an
    optimiser's state keyed by them still finds them (the optimiser cuts its own state: StackedAdamW.keep_runs).
    """
    rows = [int(r) for r in rows]
    n_runs = getattr(module, "n_runs", None)
    if not rows or n_runs is None or sorted(set(rows)) != rows or rows[-1] >= n_runs:
        raise RunShapeError(f"cannot keep runs {rows} of a stack of {n_runs}")
    index = torch.as_tensor(rows, dtype=torch.long)
    for m in module.modules():
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t.dim() == 0 or t.shape[0] != n_runs:
                raise RunShapeError(f"{type(m).__name__}.{name} of shape {tuple(t.shape)} has no run dim {n_runs}")
            t.data = t.data.index_select(0, index.to(t.device))
            t.grad = None
        if hasattr(m, "n_runs"):
            m.n_runs = len(rows)
        hook = getattr(m, "_keep_runs", None)
        if hook is not None:
            hook(rows)


# ------------------------------------------------------------------------------------ gradient buffers

# Below this many weights per matrix, reading the gradient back for its norm costs less than the two Gram matmuls.
GRAM_NORM_MIN_SIZE = 1 << 14


def grad_sq_norms(p: Tensor, n_rows: int) -> Tensor:
    """Squared L2 norm of `p.grad` per row of its leading dim, [n_rows], in the gradient's dtype.

    Uses the norm a `StackedLinear` recorded while it wrote this very gradient (checked by the tensor's
    version counter, so any later in-place change falls back to reading the gradient)."""
    grad = p.grad
    recorded = getattr(p, "_stacked_sq_norm", None)
    if recorded is not None and recorded[0] is grad and recorded[1] == grad._version:
        return recorded[2]
    return torch.linalg.vector_norm(grad.reshape(n_rows, -1), 2, dim=1).square()


class _StackedMatmul(torch.autograd.Function):
    """y = x @ w (+ b) for S stacked matrices; the weight gradient goes into the layer's own buffer.

    x [S, N, in], w [S, in, out] (a view of the parameter), b [S, out] or None. The weight gets no gradient
    through autograd (None is returned for it); `layer._add_weight_grad` writes it into `weight.grad`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: StackedLinear) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(bias.unsqueeze(1), x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight.to(grad.dtype).transpose(1, 2)).to(x.dtype) if need_x else None
        if need_w:
            ctx.layer._add_weight_grad(x, grad)
        grad_b = grad.sum(1) if ctx.has_bias and need_b else None
        return grad_x, None, grad_b, None


class StackedLinear(nn.Module):
    """R independent `nn.Linear(in_features, out_features)` layers (C copies each) applied with one `bmm`.

    weight is stored [R, in, out] (or [R, C, in, out] with `copies=C`, so `bmm` needs no transpose) and
    initialised like `nn.Linear` (uniform(+-1/sqrt(in)) for weight and bias), run r from generator r.
    Input [R, ..., in] (or [R, C, ..., in]; a C dim of 1 is shared by all copies, and so is an R dim of 1)
    -> [R, (C,) ..., out].
    """

    def __init__(self, n_runs: int, in_features: int, out_features: int,
                 generators: Sequence[torch.Generator] | None = None, *, copies: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.n_runs, self.in_features, self.out_features, self.copies = n_runs, in_features, out_features, copies
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        lead = () if copies is None else (copies,)
        self.weight = nn.Parameter(
            per_run(generators, n_runs, lambda g: _uniform((*lead, in_features, out_features), bound, g)))
        self.bias = (nn.Parameter(per_run(generators, n_runs, lambda g: _uniform((*lead, out_features), bound, g)))
                     if bias else None)
        self.grad_buffer = False          # see `use_grad_buffer`
        self._grad_buffer: Tensor | None = None

    def use_grad_buffer(self, on: bool = True) -> None:
        """Write the weight gradient into a buffer kept across steps (module docstring) instead of letting
        autograd allocate it. Off by default: the gradient then skips autograd's accumulation hooks, which
        DistributedDataParallel (fine-tuning) relies on to all-reduce gradients; the head trainer turns it on."""
        self.grad_buffer = on

    def _keep_runs(self, rows: list[int]) -> None:
        self._grad_buffer = None   # made again, at the new size, by the next step

    @property
    def n_matrices(self) -> int:
        return self.n_runs * (self.copies or 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and x.shape[0] == 1 and self.n_runs > 1:   # shared by every run
            x = x.expand(self.n_runs, *x.shape[1:])
        _check_runs(x, self.n_runs, "StackedLinear input")
        if x.shape[-1] != self.in_features:
            raise RunShapeError(f"StackedLinear expects {self.in_features} input features, got {x.shape[-1]}")
        lead = x.shape[:-1]
        if self.copies is not None:
            if x.dim() < 3 or x.shape[1] not in (1, self.copies):
                raise RunShapeError(f"StackedLinear with {self.copies} copies expects input [R, {self.copies}, ..., "
                                    f"{self.in_features}], got {tuple(x.shape)}")
            if x.shape[1] == 1:
                x = x.expand(self.n_runs, self.copies, *x.shape[2:])
                lead = x.shape[:-1]
        s, i, o = self.n_matrices, self.in_features, self.out_features
        flat = x.reshape(s, -1, i)
        weight = self.weight.view(s, i, o)
        bias = self.bias.view(s, o) if self.bias is not None else None
        if self.grad_buffer and torch.is_grad_enabled() and self.weight.requires_grad:
            out = _StackedMatmul.apply(flat, weight, bias, self)
        elif bias is None:
            out = torch.bmm(flat, weight)
        else:
            out = torch.baddbmm(bias.unsqueeze(1), flat, weight)
        return out.reshape(*lead, o)

    @torch.no_grad()
    def _add_weight_grad(self, x: Tensor, grad: Tensor) -> None:
        """weight.grad (+)= x^T @ grad, [S, in, out], into the kept buffer; records the per-run squared norm."""
        p = self.weight
        s, i, o = self.n_matrices, self.in_features, self.out_features
        xt = x.transpose(1, 2)
        if p.grad is None:
            buf = self._grad_buffer
            if buf is None or buf.shape != p.shape or buf.device != p.device or buf.dtype != p.dtype:
                buf = self._grad_buffer = torch.empty_like(p, memory_format=torch.contiguous_format)
            if xt.dtype == buf.dtype and grad.dtype == buf.dtype:
                torch.bmm(xt, grad, out=buf.view(s, i, o))
            else:  # mixed precision: the product is computed in the autocast dtype, stored in float32
                buf.view(s, i, o).copy_(torch.bmm(xt, grad.to(xt.dtype)))
            p.grad = buf
            n = x.shape[1]
            if i * o >= GRAM_NORM_MIN_SIZE and 4 * n * n < i * o:   # cheaper than reading the gradient back
                gram = torch.bmm(x, xt).float() * torch.bmm(grad, grad.transpose(1, 2)).float()
                sq = gram.sum((1, 2)).view(self.n_runs, -1).sum(1).to(buf.dtype)
                p._stacked_sq_norm = (buf, buf._version, sq)
        else:               # a second use in the same step: accumulate (the recorded norm goes stale)
            p.grad.view(s, i, o).add_(torch.bmm(xt, grad.to(xt.dtype)).to(p.grad.dtype))

    def extra_repr(self) -> str:
        copies = f", copies={self.copies}" if self.copies is not None else ""
        return f"runs={self.n_runs}{copies}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class StackedLayerNorm(nn.Module):
    """LayerNorm over the last (feature) dim with a per-run (per-copy) affine transform, or none (`affine=False`).

    Used instead of BatchNorm: the reference's BatchNorm before cross-entropy with batch 8 is a known defect,
    and LayerNorm does not couple the samples of a batch (nor, here, the runs). With `copies=C` the input is
    [R, C, ..., dim] and copy c has its own affine.
    """

    def __init__(self, n_runs: int, dim: int, affine: bool = True, eps: float = 1e-5, *,
                 copies: int | None = None) -> None:
        super().__init__()
        self.n_runs, self.dim, self.affine, self.eps, self.copies = n_runs, dim, affine, eps, copies
        if affine:
            lead = (n_runs,) if copies is None else (n_runs, copies)
            self.weight = nn.Parameter(torch.ones(*lead, dim))
            self.bias = nn.Parameter(torch.zeros(*lead, dim))

    def _affine_view(self, p: Tensor, x: Tensor) -> Tensor:
        lead = 1 if self.copies is None else 2
        return p.view(*p.shape[:lead], *([1] * (x.dim() - lead - 1)), p.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        _check_runs(x, self.n_runs, "StackedLayerNorm input")
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        if self.affine:
            y = torch.addcmul(self._affine_view(self.bias, y), y, self._affine_view(self.weight, y))
        return y

    def copy_forward(self, x: Tensor, c: int) -> Tensor:
        """Copy c alone: x [R, ..., dim] normalised with copy c's affine."""
        y = F.layer_norm(x, (self.dim,), eps=self.eps)
        if self.affine:
            view = (self.n_runs, *([1] * (x.dim() - 2)), self.dim)
            y = torch.addcmul(self.bias[:, c].view(view), y, self.weight[:, c].view(view))
        return y

    def extra_repr(self) -> str:
        copies = f", copies={self.copies}" if self.copies is not None else ""
        return f"runs={self.n_runs}{copies}, dim={self.dim}, affine={self.affine}"


class StackedDropout(nn.Module):
    """Dropout whose mask for run r comes from run r's generator, so joint training equals solo training.

    Identity in eval mode. Without generators (`generators=None`) it falls back to the global RNG, which is
    still correct dropout but no longer run-independent. `mask` gives a whole step's masks at once so a
    caller can slice them. With `draw_ahead` (the head trainer's setting) each run's generator draws the
    masks of several steps of the same shape in one call: the same values, in the same order, as one draw
    per step, at a fraction of the per-call cost (the generators then run ahead of the masks used, which
    only matters to a caller that checkpoints them mid-epoch, as fine-tuning does: it leaves this off).
    """

    DRAW_AHEAD_FLOATS = 1 << 18   # masks held ahead per run and module (1 MB of float32); steps never depend on R

    def __init__(self, p: float, generators: Sequence[torch.Generator] | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.run_p: list[float] | None = None   # per-run probabilities (set_run_probabilities), else p for all
        self.draw_ahead = False
        self.generators: list[torch.Generator] | None = None
        self.set_generators(generators)

    def set_run_probabilities(self, ps: Sequence[float] | None) -> None:
        """Run r drops with probability ps[r] (runs of a joint group may differ in dropout); None: `p` for all.
        Run r's mask is then exactly its mask alone: the same draws from its generator, compared with its p."""
        if ps is not None:
            ps = [float(p) for p in ps]
            if not all(0.0 <= p < 1.0 for p in ps):
                raise ValueError(f"dropout probabilities must be in [0, 1), got {ps}")
            if len(set(ps)) == 1:
                self.p, ps = ps[0], None
        self.run_p = ps
        self._ahead = None

    @property
    def active(self) -> bool:
        """Whether any run drops anything."""
        return any(p > 0 for p in self.run_p) if self.run_p is not None else self.p > 0
    def set_generators(self, generators: Sequence[torch.Generator] | None, draw_ahead: bool = False) -> None:
        self.generators = list(generators) if generators is not None else None
        self.draw_ahead = draw_ahead and generators is not None
        self._ahead: Tensor | None = None   # [R, k, *shape] scaled keep-masks not used yet
        self._used = 0

    def _draw(self, n_runs: int, steps: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Scaled keep-masks [R, steps, *shape] (values 0 or 1/(1-p))."""
        gens = self.generators
        if gens is None:
            draws = torch.rand((n_runs, steps, *shape), device=like.device)
        else:
            draws = torch.empty((len(gens), steps, *shape), device=gens[0].device)
            for r, g in enumerate(gens):   # one draw per run: the same values as torch.rand with that generator
                torch.rand((steps, *shape), generator=g, device=g.device, out=draws[r])
        if self.run_p is None:
            return (draws >= self.p).to(device=like.device, dtype=like.dtype) * (1.0 / (1.0 - self.p))
        view = (len(self.run_p),) + (1,) * (draws.dim() - 1)                       # [R, 1, ...]
        p = torch.tensor(self.run_p, dtype=draws.dtype, device=draws.device).view(view)
        scale = torch.tensor([1.0 / (1.0 - q) for q in self.run_p], dtype=like.dtype, device=like.device).view(view)
        return (draws >= p).to(device=like.device, dtype=like.dtype) * scale

    def mask(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """Scaled keep-mask [R, *shape] in `like`'s dtype and device."""
        shape = tuple(shape)
        n_runs = like.shape[0] if self.generators is None else len(self.generators)
        if not self.draw_ahead:
            return self._draw(n_runs, 1, shape, like)[:, 0]
        ahead = self._ahead
        if (ahead is None or self._used == ahead.shape[1] or tuple(ahead.shape[2:]) != shape
                or ahead.dtype != like.dtype or ahead.device != like.device):
            steps = max(1, self.DRAW_AHEAD_FLOATS // max(1, math.prod(shape)))   # not on R: joint == solo
            ahead = self._ahead = self._draw(n_runs, steps, shape, like)
            self._used = 0
        self._used += 1
        return ahead[:, self._used - 1]

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not self.active:
            return x
        if self.generators is not None:
            _check_runs(x, len(self.generators), "StackedDropout input")
        return x * self.mask(x.shape[1:], x)

    def _keep_runs(self, rows: list[int]) -> None:
        """The kept runs' generators, probabilities and masks drawn ahead (their next masks, already drawn)."""
        if self.generators is not None:
            self.generators = [self.generators[r] for r in rows]
        if self.run_p is not None:
            self.run_p = [self.run_p[r] for r in rows]
        if self._ahead is not None:
            self._ahead = self._ahead[rows]

    def extra_repr(self) -> str:
        return f"p={self.run_p if self.run_p is not None else self.p}"


def attention(q: Tensor, k: Tensor, v: Tensor, n_heads: int, key_padding_mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention over stacked inputs.

    q [..., Tq, D], k/v [..., Tk, D] (the same leading dims), key_padding_mask [..., Tk] bool (True = padding,
    PyTorch's convention) -> [..., Tq, D]. A query whose keys are all padding gets a zero context instead of
    NaN. The leading dims are folded into SDPA's batch dim.
    """
    *lead, tq, d = q.shape
    tk = k.shape[-2]
    dh = d // n_heads

    def heads(x: Tensor, t: int) -> Tensor:   # [..., T, D] -> [N, H, T, D/H]
        return x.reshape(-1, t, n_heads, dh).transpose(1, 2)

    attn_mask = has_key = None
    if key_padding_mask is not None:
        valid = ~key_padding_mask.bool()
        has_key = valid.any(-1)                                   # [...]
        allowed = valid | ~has_key.unsqueeze(-1)                  # all-padding rows: allow all, zeroed below
        attn_mask = allowed.reshape(-1, 1, 1, tk)
    ctx = F.scaled_dot_product_attention(heads(q, tq), heads(k, tk), heads(v, tk), attn_mask=attn_mask)
    ctx = ctx.transpose(1, 2).reshape(*lead, tq, d)
    if has_key is not None:
        ctx = ctx * has_key.to(ctx.dtype).unsqueeze(-1).unsqueeze(-1)
    return ctx


class StackedMultiheadAttention(nn.Module):
    """R independent multi-head attention layers (C copies each): q, fused k/v and out projections per run.

    `forward(query, kv, key_padding_mask)` with query [R, (C,) ..., Tq, D] and kv [R, (C,) ..., Tk, D] (a C dim
    of 1 is shared by all copies). Dropout is applied to the attention output, not to the attention weights,
    because SDPA's internal dropout uses the global RNG and would break the per-run independence.
    """

    def __init__(self, n_runs: int, dim: int, n_heads: int, dropout: float = 0.0,
                 generators: Sequence[torch.Generator] | None = None, *, copies: int | None = None) -> None:
        super().__init__()
        if n_heads < 1 or dim % n_heads:
            raise ValueError(f"attention dim {dim} is not divisible by n_heads {n_heads}")
        self.n_runs, self.dim, self.n_heads, self.copies = n_runs, dim, n_heads, copies
        self.q_proj = StackedLinear(n_runs, dim, dim, generators, copies=copies)
        self.kv_proj = StackedLinear(n_runs, dim, 2 * dim, generators, copies=copies)
        self.out_proj = StackedLinear(n_runs, dim, dim, generators, copies=copies)
        self.dropout = StackedDropout(dropout)

    def forward(self, query: Tensor, kv: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q = self.q_proj(query)
        k, v = self.kv_proj(kv).chunk(2, dim=-1)
        if key_padding_mask is not None:
            if key_padding_mask.shape[-1] != k.shape[-2]:
                raise RunShapeError(f"key_padding_mask shape {tuple(key_padding_mask.shape)} does not match "
                                    f"{k.shape[-2]} keys")
            key_padding_mask = key_padding_mask.expand(k.shape[:-1])
        return self.dropout(self.out_proj(attention(q, k, v, self.n_heads, key_padding_mask)))

    def extra_repr(self) -> str:
        copies = f", copies={self.copies}" if self.copies is not None else ""
        return f"runs={self.n_runs}{copies}, dim={self.dim}, heads={self.n_heads}"
