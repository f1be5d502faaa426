"""Ways of combining the task losses into one: the paper's uniform, DWA, RRUW and DRUW (eqs. 3-6), three
loss-based methods from the literature that cost nothing extra per step (UW, RLW, GLS), and FAMO, which costs
one gradient-free forward pass per step.

Each weighting is an `nn.Module` vectorised over R runs that share the weighting kind: `forward` maps the raw
task losses [R, K] to one total per run [R] (regularisers included), `weights()` gives the effective multiplier
on each task loss [R, K] for the per-epoch log, and `end_epoch` receives the epoch-average raw task losses.
Every parameter and buffer has leading dim R and row r depends only on run r, so a run trained alone equals
the same run trained jointly. Learnable parameters (the RRUW/DRUW uncertainty) train with the head's
optimiser at the head learning rate; give them no weight decay (it would pull every alpha towards 1).

The paper applies weighting across the tasks only (the authors' code also weighted every dimension inside
each regression task); so does this module. A weighting that draws random numbers (RLW) gets one generator
per run from `set_run_seeds`, so it too gives the same run jointly and alone.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cache.command_kit.errors import AvbError


class WeightingError(AvbError):
    """An unknown weighting, a bad option, or losses of the wrong shape."""


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise WeightingError(f"option {name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise WeightingError(f"option {name} must be finite and {bound}, got {value!r}")
    return x


class Weighting(nn.Module):
    """Base class: the shape contract shared by every weighting kind."""

    name: ClassVar[str]

    def __init__(self, n_runs: int, n_tasks: int) -> None:
        super().__init__()
        if int(n_runs) < 1 or int(n_tasks) < 1:
            raise WeightingError(f"a weighting needs n_runs >= 1 and n_tasks >= 1, got {n_runs} and {n_tasks}")
        self.n_runs = int(n_runs)
        self.n_tasks = int(n_tasks)

    def _check(self, losses: Tensor, what: str) -> Tensor:
        if tuple(losses.shape) != (self.n_runs, self.n_tasks):
            raise WeightingError(
                f"{self.name} weighting expects {what} of shape [{self.n_runs}, {self.n_tasks}] (runs, tasks), "
                f"got {tuple(losses.shape)}")
        return losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses

    def forward(self, losses: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def end_epoch(self, epoch_losses: Tensor) -> None:
        """Receive the epoch-average raw task losses [R, K]; only the dynamic weightings use them."""
        self._check(epoch_losses, "epoch losses")

    def set_run_seeds(self, seeds: list[int]) -> None:
        """The runs' seeds, for a weighting that draws random numbers (the others ignore them)."""

    # A weighting that learns from each step's effect (FAMO) sets this: the trainer then measures the same
    # batch's task losses again after the optimiser's step, without dropout, and hands them to `after_step`.
    measures_steps: ClassVar[bool] = False

    def after_step(self, losses_after: Tensor) -> None:
        """The raw task losses [R, K] of the step's batch after the step (only if `measures_steps`)."""

    def extra_repr(self) -> str:
        return f"n_runs={self.n_runs}, n_tasks={self.n_tasks}"


class UniformWeighting(Weighting):
    """Fixed equal weights: total = sum_k L_k (the paper's baseline)."""

    name = "uniform"

    def forward(self, losses: Tensor) -> Tensor:
        return self._check(losses, "losses").sum(-1)

    def weights(self) -> Tensor:
        return torch.ones(self.n_runs, self.n_tasks)


class DWAWeighting(Weighting):
    """Dynamic Weight Averaging (paper eqs. 3-4; Liu et al. 2019).

    lambda_k(t) = K * softmax_k(w_k(t-1) / T), w_k(t-1) = L_k(t-1) / L_k(t-2), with L the EPOCH-AVERAGE raw
    task losses handed to `end_epoch`, T = 2, and lambda = 1 for the first two epochs; the lambdas sum to K.
    Total = sum_k lambda_k L_k. This follows Liu et al., not the authors' code (per-batch updates, T = 10):
    batch losses are noisy, so their ratio mostly measures the noise.

    Lambdas are buffers (no gradient). A loss of exactly 0 in epoch t-2 has its ratio taken against a tiny
    floor, and a non-finite ratio (a diverged run) becomes neutral (1), so lambda always stays finite.
    """

    name = "dwa"
    _FLOOR = 1e-12

    def __init__(self, n_runs: int, n_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(n_runs, n_tasks)
        self.temperature = _positive("temperature", temperature)
        self.register_buffer("lambdas", torch.ones(self.n_runs, self.n_tasks))
        self.register_buffer("loss_prev", torch.zeros(self.n_runs, self.n_tasks))   # L(t-1)
        self.register_buffer("loss_prev2", torch.zeros(self.n_runs, self.n_tasks))  # L(t-2)
        self.register_buffer("epochs_seen", torch.zeros(self.n_runs, dtype=torch.long))

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses")
        return (self.lambdas.to(losses.dtype) * losses).sum(-1)

    def weights(self) -> Tensor:
        return self.lambdas.detach().clone()

    @torch.no_grad()
    def end_epoch(self, epoch_losses: Tensor) -> None:
        epoch_losses = self._check(epoch_losses, "epoch losses").detach().to(self.loss_prev)
        self.loss_prev2.copy_(self.loss_prev)
        self.loss_prev.copy_(epoch_losses)
        self.epochs_seen += 1
        ratio = self.loss_prev / self.loss_prev2.clamp_min(self._FLOOR)
        ratio = torch.nan_to_num(ratio, nan=1.0, posinf=1.0 / self._FLOOR, neginf=0.0)
        dynamic = self.n_tasks * torch.softmax(ratio / self.temperature, dim=-1)
        ready = (self.epochs_seen >= 2).unsqueeze(-1)
        self.lambdas.copy_(torch.where(ready, dynamic, torch.ones_like(dynamic)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


class RRUWWeighting(Weighting):
    """Restrained Revised Uncertainty Weighting (paper eq. 5; Song et al.):

        total = sum_k L_k / alpha_k^2 + sum_k log(1 + alpha_k^2) + |phi - sum_k |log alpha_k||.

    Departure from the printed equation: the paper prints the regulariser log(1 + log alpha_k^2), which is
    undefined for alpha_k^2 < 1/e. We use log(1 + alpha_k^2), the regulariser of Liebel & Koerner (2018, the
    paper's ref. [22]) and what the authors' code computed. The restraint keeps the paper's |log alpha_k| (the
    code used |alpha_k|).

    Parametrisation: the learnable parameter is s_k = log alpha_k^2 ([R, K]), so 1/alpha^2 = exp(-s) and the
    regulariser is softplus(s), both stable. s is kept in [log alpha_min^2, log alpha_max^2]: the value used is
    clamped (gradient passed straight through, so the loss can pull alpha back from a bound) and the stored
    parameter is projected back into the range at each forward, so it cannot drift far past a bound. Without a
    floor a task whose loss tends to 0 drives alpha to 0 and 1/alpha^2 explodes, as it could in the authors' code.

    alpha_init = 1.0 (not the code's 1/N): every task starts at weight 1, i.e. exactly the uniform baseline, and
    the regulariser is defined there; 1/N = 0.25 would start each task at weight 16, a 16x larger effective
    learning rate on the heads in the first steps, for no stated reason.
    """

    name = "rruw"

    def __init__(
        self,
        n_runs: int,
        n_tasks: int,
        phi: float = 1.0,
        alpha_init: float = 1.0,
        alpha_min: float = 1e-3,
        alpha_max: float = 1e3,
    ) -> None:
        super().__init__(n_runs, n_tasks)
        self.phi = _positive("phi", phi, allow_zero=True)
        alpha_init = _positive("alpha_init", alpha_init)
        alpha_min = _positive("alpha_min", alpha_min)
        alpha_max = _positive("alpha_max", alpha_max)
        if not alpha_min <= alpha_init <= alpha_max:
            raise WeightingError(
                f"options need alpha_min <= alpha_init <= alpha_max, got {alpha_min}, {alpha_init}, {alpha_max}")
        self.alpha_init, self.alpha_min, self.alpha_max = alpha_init, alpha_min, alpha_max
        self.s_min, self.s_max = 2.0 * math.log(alpha_min), 2.0 * math.log(alpha_max)
        self.log_alpha_sq = nn.Parameter(torch.full((self.n_runs, self.n_tasks), 2.0 * math.log(alpha_init)))

    def _s(self) -> Tensor:
        """log alpha^2 clamped to its range, with the gradient passed straight through."""
        s = self.log_alpha_sq
        return s + (s.detach().clamp(self.s_min, self.s_max) - s.detach())

    def _project(self) -> None:
        # Projected gradient descent with a one-step lag; through .data so autograd's version check is untouched.
        self.log_alpha_sq.data.clamp_(self.s_min, self.s_max)

    def alphas(self) -> Tensor:
        """The current alpha of each run and task, [R, K] (for logging)."""
        return torch.exp(0.5 * self._s().detach())

    def regularisers(self, s: Tensor) -> Tensor:
        """sum_k log(1 + alpha_k^2) + |phi - sum_k |log alpha_k||, per run [R]."""
        return torch.nn.functional.softplus(s).sum(-1) + (self.phi - (0.5 * s).abs().sum(-1)).abs()

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses")
        self._project()
        s = self._s()
        return (torch.exp(-s) * losses).sum(-1) + self.regularisers(s)

    def weights(self) -> Tensor:
        return torch.exp(-self._s().detach())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, phi={self.phi}, alpha_init={self.alpha_init}, "
                f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}")


class DRUWWeighting(RRUWWeighting):
    """Dynamic Restrained Uncertainty Weighting (paper eq. 6): RRUW plus DWA's lambda on each task,

        total = sum_k (1/alpha_k^2 + beta * lambda_k(t)) L_k + sum_k log(1 + alpha_k^2) + |phi - sum_k |log alpha_k||,

    beta balances the DWA term against the uncertainty term (the paper's open question): beta = 1 is the
    paper's DRUW, beta = 0 is RRUW exactly.
    with the same regulariser departure and alpha parametrisation as `RRUWWeighting`, and lambda from a
    contained `DWAWeighting` (epoch-average losses, temperature 2, lambda = 1 for the first two epochs).
    Its options are RRUW's (phi, alpha_init, alpha_min, alpha_max; passed on as `rruw_options`), DWA's
    temperature and beta.
    """

    name = "druw"

    def __init__(self, n_runs: int, n_tasks: int, temperature: float = 2.0, beta: float = 1.0,
                 **rruw_options: float) -> None:
        super().__init__(n_runs, n_tasks, **rruw_options)
        self.beta = _positive("beta", beta, allow_zero=True)
        self.dwa = DWAWeighting(n_runs, n_tasks, temperature=temperature)

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses")
        self._project()
        s = self._s()
        rruw = (torch.exp(-s) * losses).sum(-1) + self.regularisers(s)
        if self.beta == 0.0:              # exactly RRUW
            return rruw
        dwa = self.dwa(losses)
        return (dwa if self.beta == 1.0 else self.beta * dwa) + rruw

    def weights(self) -> Tensor:
        return super().weights() + self.beta * self.dwa.weights()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"

    def end_epoch(self, epoch_losses: Tensor) -> None:
        self.dwa.end_epoch(epoch_losses)


class UWWeighting(RRUWWeighting):
    """Uncertainty Weighting (Kendall et al. 2018), the method RRUW revises:

        total = sum_k L_k / alpha_k^2 + sum_k log alpha_k^2,

    i.e. exp(-s_k) L_k + s_k with s = log alpha^2 learnable (the classification form of Kendall et al.; their
    regression form only halves both terms). Without RRUW's softplus regulariser and restraint the optimum
    s_k = log L_k follows a vanishing loss to -inf, so s is kept in [log alpha_min^2, log alpha_max^2] as in
    RRUW: finite weights on degenerate losses. Starts at weight 1 per task (alpha_init = 1), as RRUW.
    """

    name = "uw"

    def __init__(self, n_runs: int, n_tasks: int, alpha_init: float = 1.0, alpha_min: float = 1e-3,
                 alpha_max: float = 1e3) -> None:
        super().__init__(n_runs, n_tasks, phi=0.0, alpha_init=alpha_init, alpha_min=alpha_min, alpha_max=alpha_max)

    def regularisers(self, s: Tensor) -> Tensor:
        return s.sum(-1)

    def extra_repr(self) -> str:
        return (f"n_runs={self.n_runs}, n_tasks={self.n_tasks}, alpha_init={self.alpha_init}, "
                f"alpha_min={self.alpha_min}, alpha_max={self.alpha_max}")


class RLWWeighting(Weighting):
    """Random Loss Weighting (Lin et al. 2022): at every step lambda = K * softmax(z), z ~ N(0, I_K), drawn from
    each run's own generator; total = sum_k lambda_k L_k. Lin et al. normalise the weights to sum 1; the
    factor K keeps them on the scale of uniform weighting and DWA (mean 1), so the learning rate means the same.
    """

    name = "rlw"
    SEED_OFFSET = 0x51_7A11   # the draws are seeded apart from the head's init and dropout streams

    def __init__(self, n_runs: int, n_tasks: int) -> None:
        super().__init__(n_runs, n_tasks)
        self.generators: list[torch.Generator] = []
        self.register_buffer("last", torch.ones(self.n_runs, self.n_tasks))

    def set_run_seeds(self, seeds: list[int]) -> None:
        if len(seeds) != self.n_runs:
            raise WeightingError(f"rlw weighting got {len(seeds)} seeds for {self.n_runs} runs")
        self.generators = [torch.Generator().manual_seed(int(seed) + self.SEED_OFFSET) for seed in seeds]

    def _keep_runs(self, rows: list[int]) -> None:   # heads.model.layers.keep_runs_
        self.generators = [self.generators[r] for r in rows] if self.generators else []

    def get_extra_state(self) -> Tensor:
        """The generators' states [R, bytes] in the state dict, so a checkpoint (fine-tuning's
        `accelerator.save_state`) resumes the same draws; a tensor, as safetensors stores only tensors."""
        if not self.generators:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.stack([g.get_state() for g in self.generators])

    def set_extra_state(self, state: Tensor) -> None:
        if state.numel() == 0:
            return
        if state.shape[0] != self.n_runs:
            raise WeightingError(f"rlw weighting state holds {state.shape[0]} generators for {self.n_runs} runs")
        self.generators = [torch.Generator() for _ in range(self.n_runs)]
        for g, row in zip(self.generators, state):
            g.set_state(row.to(torch.uint8).cpu().clone())   # a copy: set_state on a row view crashes (torch 2.13)

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses")
        if not self.generators:
            raise WeightingError("rlw weighting needs the runs' seeds (set_run_seeds) before its first step")
        z = torch.stack([torch.randn(self.n_tasks, generator=g) for g in self.generators])   # [R, K], one per step
        self.last = self.n_tasks * torch.softmax(z, dim=-1)
        return (self.last.to(losses) * losses).sum(-1)

    def weights(self) -> Tensor:
        return self.last.detach().clone()


class GLSWeighting(Weighting):
    """Geometric Loss Strategy (Chennupati et al. 2019): total = (prod_k L_k)^(1/K), computed as
    exp(mean_k log L_k) with each loss floored at 1e-12, so a loss of exactly 0 gives a finite total and
    gradient. Its effective weight on task k is d total / d L_k = total / (K L_k), logged per step."""

    name = "gls"
    _FLOOR = 1e-12

    def __init__(self, n_runs: int, n_tasks: int) -> None:
        super().__init__(n_runs, n_tasks)
        self.register_buffer("last", torch.ones(self.n_runs, self.n_tasks))

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses").clamp_min(self._FLOOR)
        total = torch.exp(torch.log(losses).mean(-1))
        self.last = (total.detach().unsqueeze(-1) / (self.n_tasks * losses.detach())).float().cpu()
        return total

    def weights(self) -> Tensor:
        return self.last.detach().clone()


class FAMOWeighting(Weighting):
    """Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023): task logits xi [R, K], z = softmax(xi).

    Each step descends K * sum_k z_k log L_k / c with c = sum_k z_k / L_k held constant, i.e. the task
    gradients weighted K z_k / (c L_k) (they sum to K, as uniform weighting's, so the learning rate means the
    same; the paper's weights sum to 1). After the optimiser's step the trainer measures the same batch's losses
    again (`measures_steps`) and xi takes an Adam step (`lr`, L2 `decay`, the paper's 0.025 and 0.001) along
    J_softmax(xi)^T (log L_before - log L_after): the tasks whose loss fell least gain weight. Losses are floored
    at 1e-8 (the paper's offset), so a loss of 0 stays finite. Cost: one forward pass per step, without
    gradients or dropout, of every run in the stack (measured in the README).
    """

    name = "famo"
    measures_steps = True
    _FLOOR = 1e-8
    _BETAS = (0.9, 0.999)
    _EPS = 1e-8

    def __init__(self, n_runs: int, n_tasks: int, lr: float = 0.025, decay: float = 1e-3) -> None:
        super().__init__(n_runs, n_tasks)
        self.lr = _positive("lr", lr)
        self.decay = _positive("decay", decay, allow_zero=True)
        for name in ("logits", "exp_avg", "exp_avg_sq", "before"):
            self.register_buffer(name, torch.zeros(self.n_runs, self.n_tasks))
        self.register_buffer("last", torch.ones(self.n_runs, self.n_tasks))
        self.register_buffer("steps", torch.zeros(self.n_runs, dtype=torch.long))

    def forward(self, losses: Tensor) -> Tensor:
        losses = self._check(losses, "losses").clamp_min(self._FLOOR)
        z = torch.softmax(self.logits, dim=-1).to(losses.dtype)
        c = (z / losses).sum(-1, keepdim=True).detach()
        self.before = losses.detach().to(self.before.dtype)
        self.last = (self.n_tasks * z / (c * losses)).detach().to(self.last.dtype)
        return self.n_tasks * (z * torch.log(losses) / c).sum(-1)

    @torch.no_grad()
    def after_step(self, losses_after: Tensor) -> None:
        after = self._check(losses_after, "losses after the step").to(self.before.dtype).clamp_min(self._FLOOR)
        delta = torch.log(self.before) - torch.log(after)
        delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0)   # a diverged run moves no logit
        z = torch.softmax(self.logits, dim=-1)
        grad = z * (delta - (z * delta).sum(-1, keepdim=True)) + self.decay * self.logits   # J^T delta + L2
        (b1, b2), self.steps = self._BETAS, self.steps + 1
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.steps.to(grad.dtype).unsqueeze(-1)
        denom = (self.exp_avg_sq / (1 - b2 ** t)).sqrt() + self._EPS
        self.logits -= self.lr * self.exp_avg / (1 - b1 ** t) / denom

    def weights(self) -> Tensor:
        return self.last.detach().clone()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lr={self.lr}, decay={self.decay}"


WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (UniformWeighting, DWAWeighting, RRUWWeighting, DRUWWeighting, UWWeighting,
                              RLWWeighting, GLSWeighting, FAMOWeighting)
}


def weighting_options(name: str) -> dict[str, Any]:
    """The options a weighting kind accepts, with their defaults (the paper's settings)."""
    return _options(_lookup(name))


def _options(cls: type[Weighting]) -> dict[str, Any]:
    params = list(inspect.signature(cls.__init__).parameters.values())[3:]  # self, n_runs, n_tasks
    own = {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}
    if any(p.kind is p.VAR_KEYWORD for p in params):   # the rest are the base class's (DRUW: RRUW's)
        return {**_options(cls.__mro__[1]), **own}
    return own


def _lookup(name: str) -> type[Weighting]:
    try:
        return WEIGHTINGS[name.lower()]
    except (KeyError, AttributeError):
        raise WeightingError(f"unknown loss weighting {name!r}; expected one of {', '.join(WEIGHTINGS)}") from None


def build_weighting(name: str, n_runs: int, n_tasks: int, **options: Any) -> Weighting:
    """Build the weighting called `name` for `n_runs` stacked runs, checking its options by name."""
    cls = _lookup(name)
    valid = weighting_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise WeightingError(
            f"loss weighting {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(valid) or 'none'}")
    return cls(n_runs, n_tasks, **options)
