"""The batch-size trade-off: grid time and Val score for head batch sizes 8 (the paper's), 32 and 128.

    python -m tests.benchmarks.bench_batch                 # 3 archs x 12 runs x 10 epochs per batch size
    python -m tests.benchmarks.bench_batch --quick         # tiny sizes, seconds

A larger batch means fewer, larger steps per epoch: the per-step costs (the optimiser's pass over every
parameter, the per-operation overhead) are paid less often. The learning rate follows the square-root scaling
rule for Adam-type optimisers (Malladi et al., NeurIPS 2022: lr proportional to sqrt(batch) keeps the
dynamics of adaptive methods approximately unchanged), from the paper's 1e-3 at batch 8: 2e-3 at 32, 4e-3 at
128. Every other setting is the paper's; the epochs are the same for every batch size. Measured on a generated
pooled cache at wav2vec2-base widths whose labels are functions of a latent every layer carries
(`bench_common.make_cache`), so the scores say how well each setting learns, not how it would do on HUME-VB.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from heads.names import ARCHS, PAPER_WEIGHTINGS
from tests.benchmarks.bench_common import (
    BASE_DIMS,
    Figures,
    machine_line,
    make_cache_in_child,
    set_threads,
    workdir,
)

BATCHES = (8, 32, 128)


def scaled_lr(batch: int, base: float = 1e-3, base_batch: int = 8) -> float:
    """The square-root scaling rule for Adam: lr(B) = lr(B0) * sqrt(B / B0)."""
    return base * math.sqrt(batch / base_batch)


def main(argv: list[str] | None = None) -> Figures:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_batch", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train", type=int, default=2400, help="Train clips (Val is half of it)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from heads.model.architectures import HeadConfig
    from heads.training.device import resolve_device
    from heads.training.grid import GridConfig, run_grid
    from heads.training.joint import TrainConfig

    fig = Figures("batch")
    threads = set_threads(args.threads)
    print(machine_line(threads), flush=True)
    quick = args.quick
    dims = {"cnn": 16, **{f"hidden_{i}": 24 for i in range(5)}} if quick else BASE_DIMS
    sizes = (96, 48, 0) if quick else (args.train, args.train // 2, 0)
    epochs = 2 if quick else args.epochs
    head = HeadConfig(hidden=16, n_heads=2, branch_blocks=2) if quick else HeadConfig()
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    rows = []
    with workdir(prefix="avb-bench-batch-") as tmp:
        cache = make_cache_in_child(tmp / "cache.h5", sizes, dims)
        for arch in archs:
            for batch in BATCHES:
                lr = scaled_lr(batch)
                t = time.perf_counter()
                grid = GridConfig(cache=str(cache), archs=(arch,), weightings=PAPER_WEIGHTINGS, seeds=(0, 1, 2),
                                  run=TrainConfig(epochs=epochs, batch_size=batch, lr=lr, head=head))
                runs = run_grid(grid, tmp / f"{arch}-b{batch}", device=resolve_device(args.device), progress=False)
                wall = time.perf_counter() - t
                means = np.array([r["mean"] for r in runs])
                rows.append((arch, batch, lr, wall, means.mean(), means.std(ddof=1), means.max()))
                fig.add("f", f"{arch} batch {batch} grid time", wall, "s",
                        f"12 runs x {epochs} epochs, lr {lr:.2g}, {sizes[0]} Train clips")
                fig.add("f", f"{arch} batch {batch} Val mean score", means.mean(), "",
                        f"mean over the 12 runs (sd {means.std(ddof=1):.4f}), best run {means.max():.4f}")
    print("\n| arch | batch | lr | grid time (s) | Val mean score, mean ± sd over 12 runs | best run |")
    print("|---|---|---|---|---|---|")
    for arch, batch, lr, wall, mean, sd, best in rows:
        print(f"| {arch.upper()} | {batch} | {lr:.2g} | {wall:.1f} | {mean:.4f} ± {sd:.4f} | {best:.4f} |")
    print(machine_line(threads), flush=True)
    fig.write(args.json)
    return fig


if __name__ == "__main__":
    main()
