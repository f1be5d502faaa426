"""What the ablation's memory-bounded joint groups cost: BRANCH train steps of 12 runs in one stacked module
versus 3 groups of 4 (the default `--max-group-mib 640` at wav2vec2-base size), measured alternately.

    python -m tests.benchmarks.bench_grouping [--steps 15] [--rounds 2] [--threads 2]
"""
from __future__ import annotations

import argparse
import time


def step_ms(n_runs: int, steps: int) -> float:
    import torch

    from heads.model.architectures import HeadConfig, HeadInputs, build_head
    from heads.model.losses import task_losses
    from heads.model.optim import StackedAdamW
    from heads.tasks import AVB

    dims = {"cnn": 512, **{f"hidden_{i}": 768 for i in range(13)}}  # wav2vec2-base's layers
    model = build_head(HeadConfig(arch="branch"), dims, list(range(n_runs)), AVB)
    opt = StackedAdamW(list(model.parameters()), n_runs)
    batch = 8
    x = HeadInputs(pooled={k: torch.randn(n_runs, batch, d) for k, d in dims.items()})
    targets = {"type": torch.randint(0, 8, (n_runs, batch, 1)).float(), "two": torch.rand(n_runs, batch, 2),
               "high": torch.rand(n_runs, batch, 10), "culture": torch.rand(n_runs, batch, 40)}
    start = 0.0
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            start = time.perf_counter()
        loss = task_losses(AVB, model(x, targets), targets).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for _ in range(args.rounds):
        joint = step_ms(12, args.steps)
        grouped = sum(step_ms(4, args.steps) for _ in range(3))
        print(f"BRANCH, batch 8: 12 runs jointly {joint:.0f} ms/step; 3 groups of 4 {grouped:.0f} ms/step "
              f"(sum); ratio {grouped / joint:.2f}", flush=True)


if __name__ == "__main__":
    main()
