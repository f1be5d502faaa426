"""What each loss weighting costs per training step: one VANILLA run, and 8 runs stacked, side by side.

    python -m tests.benchmarks.bench_weightings              # wav2vec2-base widths, 1,600 Train clips, 3 rounds
    python -m tests.benchmarks.bench_weightings --quick      # tiny widths, seconds

For every registered weighting the trainer itself (`heads.training.joint.JointTraining`, the paper's VANILLA
head and settings, batch 8) is built on a generated pooled cache and one epoch of steps (`train_epoch`: every
step's forward, loss weighting, backward, optimiser step, and for FAMO its forward pass after the step) is
timed. The weightings alternate (forward, then backward order, `--rounds` times) and each keeps its best
epoch, as the machine is shared and noisy; the figure is ms per step, and its ratio to uniform weighting's.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from heads.names import WEIGHTINGS
from tests.benchmarks.bench_common import (
    BASE_DIMS,
    QUICK_DIMS,
    Figures,
    begin,
    bench_parser,
    make_cache_in_child,
    run_benchmark,
    workdir,
)


def epoch_seconds(cache: object, weighting: str, runs: int, out: Path) -> tuple[float, int]:
    """(seconds of one epoch of steps, steps in it) of `runs` VANILLA runs stacked, all with `weighting`."""
    import torch

    from heads.training.joint import JointTraining, TrainConfig

    configs = [TrainConfig(weighting=weighting, seed=s, epochs=1) for s in range(runs)]
    job = JointTraining(cache, configs, [out / f"{weighting}-{runs}-{s}" for s in range(runs)], frames=None,
                        device=torch.device("cpu"))
    start, steps = time.perf_counter(), job.steps
    job.train_epoch(1)
    return time.perf_counter() - start, job.steps - steps


def run(args: argparse.Namespace) -> Figures:
    fig, _ = begin("weightings", args.threads)
    from cache.reader import load_cache

    sizes = (160, 16, 0) if args.quick else (1600, 16, 0)
    with workdir() as tmp:
        cache = load_cache(make_cache_in_child(tmp / "cache.h5", sizes, QUICK_DIMS if args.quick else BASE_DIMS))
        epoch_seconds(cache, "uniform", args.stack, tmp)   # warm-up: first calls, allocator, page cache
        best: dict[tuple[str, int], float] = {}
        for round_ in range(args.rounds):
            order = list(WEIGHTINGS) if round_ % 2 == 0 else list(reversed(WEIGHTINGS))
            for runs in (1, args.stack):
                for weighting in order:
                    seconds, steps = epoch_seconds(cache, weighting, runs, tmp)
                    key = (weighting, runs)
                    best[key] = min(best.get(key, float("inf")), 1000 * seconds / steps)
        for runs in (1, args.stack):
            label = "1 run" if runs == 1 else f"{runs} runs stacked"
            for weighting in WEIGHTINGS:
                ms = best[(weighting, runs)]
                fig.add("a", f"{weighting}: ms per step, {label}", ms, "ms",
                        f"{ms / best[('uniform', runs)]:.2f}x uniform")
    fig.note(f"VANILLA, batch 8, {sizes[0]} Train clips ({sizes[0] // 8} steps per epoch), best of {args.rounds} "
             "alternated rounds")
    return fig


def parser() -> argparse.ArgumentParser:
    p = bench_parser("bench_weightings", __doc__, "tiny widths and 160 Train clips, seconds")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds; each weighting keeps its best")
    p.add_argument("--stack", type=int, default=8, help="runs in the stacked measurement")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    run_benchmark(parser(), run, argv)


if __name__ == "__main__":
    main()
