"""`avb heads search`: trials trained together against the same trials one at a time, side by side.

    python -m tests.benchmarks.bench_search              # 16 VANILLA trials, batches of 8 vs 1, 5 epochs
    python -m tests.benchmarks.bench_search --quick      # tiny sizes, seconds

Both sides are the whole `avb heads search` process (imports, cache load, the Optuna study in SQLite, every Val
pass), on the same generated pooled cache (wav2vec2-base widths; 2,400 Train, 800 Val, 400 Test clips), the
same space (lr, dropout, weighting, DRUW's beta) and sampler seed, pruning off. `--batch 8` asks 8 trials at a
time and trains those of one shape as one stacked model; `--batch 1` trains them one by one. The sides alternate
(stacked, one-by-one, one-by-one, stacked) and the ratio is taken from the faster run of each side. Last, the
stacked side runs once more with the median pruner (Optuna's: no pruning before 5 trials are finished), whose
pruned trials leave their stacks: its time and how many trials it pruned.
"""
from __future__ import annotations

import argparse
import csv
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

SPACE = """\
lr: {low: 1.0e-4, high: 3.0e-3, log: true}
dropout: {low: 0.0, high: 0.5}
weighting: [uniform, dwa, rruw, druw]
druw_beta: {low: 0.0, high: 2.0}
"""


def main(argv: list[str] | None = None) -> Figures:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_search", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny cache and heads")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of each side (alternating)")
    p.add_argument("--no-pruning", dest="pruning", action="store_false",
                   help="skip the third run: the stacked side with the median pruner")
    args = p.parse_args(argv)
    fig = Figures("search")
    print(machine_line(args.threads), flush=True)
    dims, sizes = (QUICK_DIMS, (64, 32, 16)) if args.quick else (BASE_DIMS, (2400, 800, 400))
    head = ["--hidden", "16"] if args.quick else ["--hidden", "256"]
    with workdir(prefix="avb-bench-search-") as tmp:
        cache = make_cache_in_child(tmp / "cache.h5", sizes, dims)
        (tmp / "space.yaml").write_text(SPACE)
        base = [sys.executable, "-m", "extract.app.cli", "heads", "search", "--cache", str(cache), "--space",
                str(tmp / "space.yaml"), "--trials", str(args.trials), "--epochs", str(args.epochs), "--pruner",
                "none", "--arch", "vanilla", "--device", "cpu", "--no-progress", *head]
        times: dict[str, list[float]] = {"stacked": [], "one_by_one": []}
        order = ["stacked", "one_by_one", "one_by_one", "stacked"] * args.rounds
        for k, side in enumerate(order[:2 * args.rounds]):
            batch = args.batch if side == "stacked" else 1
            times[side].append(timed(base + ["--batch", str(batch), "--out", str(tmp / f"{side}-{k}")],
                                     args.threads))
            print(f"  {side:<11} {times[side][-1]:7.1f} s", flush=True)
        best = {side: min(t) for side, t in times.items()}
        item = f"{args.trials} VANILLA trials x {args.epochs} epochs"
        fig.add(item, f"batches of {args.batch} (stacked)", best["stacked"], "s")
        fig.add(item, "batches of 1 (one by one)", best["one_by_one"], "s")
        fig.add(item, "ratio", best["one_by_one"] / best["stacked"], "x", "goal >= 3")
        if args.pruning:   # the stacked side again with the median pruner: pruned trials leave their stacks
            out = tmp / "pruned"
            pruner = base[:base.index("--pruner") + 1] + ["median"] + base[base.index("--pruner") + 2:]
            seconds = timed(pruner + ["--batch", str(args.batch), "--out", str(out)], args.threads)
            with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
                states = [row["state"] for row in csv.DictReader(handle)]
            fig.add(item, f"batches of {args.batch}, median pruner", seconds, "s",
                    f"{states.count('PRUNED')} of {len(states)} trials pruned; one run")
    fig.write(args.json)
    return fig


if __name__ == "__main__":
    main()
