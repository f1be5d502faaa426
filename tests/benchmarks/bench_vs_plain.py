"""The grid against what a researcher would write instead, side by side in one run.

    python -m tests.benchmarks.bench_vs_plain                  # VANILLA, CHAIN, BRANCH; 12 runs x 5 epochs each
    python -m tests.benchmarks.bench_vs_plain --quick          # tiny sizes, seconds
    python -m tests.benchmarks.bench_vs_plain --device cuda    # both sides on the GPU

For each architecture: the whole `avb heads ablate` process (12 runs = 4 weightings x 3 seeds, trained in its
joint groups) and the whole plain per-run PyTorch loop (`tests/benchmarks/plain_loop.py`: the same 12 runs one
after another) on the same generated pooled cache (wav2vec2-base widths; 2,400 Train clips, BRANCH 800; 800 Val,
400 Test), each started as a fresh process, so both pay their imports, the cache load and every Val pass.
The two alternate (plain, grid, grid, plain) and the ratio is taken from the faster of each side's two runs,
which damps the noise of a shared machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.benchmarks.bench_common import (
    BASE_DIMS,
    QUICK_DIMS,
    Figures,
    machine_line,
    make_cache_in_child,
    timed,
    workdir,
)


def main(argv: list[str] | None = None) -> Figures:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_vs_plain", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny cache and heads (for the test suite)")
    p.add_argument("--archs", default="vanilla,chain,branch")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of each side (alternating)")
    args = p.parse_args(argv)
    fig = Figures("vs_plain")
    print(machine_line(args.threads), flush=True)
    dims = QUICK_DIMS if args.quick else BASE_DIMS
    sizes = {"vanilla": (2400, 800, 400), "chain": (2400, 800, 400), "branch": (800, 800, 400)}
    if args.quick:
        sizes = {a: (64, 32, 16) for a in sizes}
    head = ["--hidden", "16", "--n-heads", "2"] if args.quick else ["--hidden", "256", "--n-heads", "8"]
    with workdir(prefix="avb-bench-plain-") as tmp:
        for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
            cache = make_cache_in_child(tmp / f"{arch}.h5", sizes[arch], dims)
            plain = [sys.executable, "-m", "tests.benchmarks.plain_loop", "--cache", str(cache), "--arch", arch,
                     "--epochs", str(args.epochs), "--device", args.device, *head]
            grid = [sys.executable, "-m", "extract.app.cli", "heads", "ablate", "--cache", str(cache),
                    "--epochs", str(args.epochs), "--archs", arch, "--seeds", "0,1,2", "--device", args.device,
                    "--no-progress", *head]
            times: dict[str, list[float]] = {"plain": [], "grid": []}
            order = ["plain", "grid", "grid", "plain"] * args.rounds
            for k, side in enumerate(order[:2 * args.rounds]):
                out = tmp / f"{arch}-{side}-{k}"
                cmd = (plain if side == "plain" else grid) + ["--out", str(out)]
                times[side].append(timed(cmd, args.threads))
                print(f"    {arch} {side}: {times[side][-1]:.2f} s", flush=True)
            ratio = min(times["plain"]) / min(times["grid"])
            n_train = sizes[arch][0]
            fig.add("e", f"{arch} plain per-run loop, 12 runs x {args.epochs} epochs", min(times["plain"]), "s",
                    f"{n_train} Train clips, batch 8, {args.device}")
            fig.add("e", f"{arch} avb heads ablate, 12 runs x {args.epochs} epochs", min(times["grid"]), "s",
                    "whole process, joint groups")
            fig.add("e", f"{arch} speed-up of the grid over the plain loop", ratio, "x")
    print(machine_line(args.threads), flush=True)
    fig.write(args.json)
    return fig


if __name__ == "__main__":
    main()
