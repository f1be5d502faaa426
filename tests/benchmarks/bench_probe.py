"""`avb probe` at HUME-VB size.

    python -m tests.benchmarks.bench_probe            # 59,201-clip cache of 14 layers (~1.2 GB in the temp dir)
    python -m tests.benchmarks.bench_probe --quick    # a tiny cache, seconds

Probe: a generated, learnable float16 cache of 19,990 Train / 19,396 Val / 19,815 Test clips with wav2vec2-base's
layers (cnn 512-d + hidden_0..hidden_12 768-d) is probed end to end by `heads.analysis.probe.run_probe` (every layer x
the four tasks, reading each layer from the file); the figure is its wall time, goal <= 3 min. The time of one
layer's ridge (the three regression tasks) and logistic (TYPE) parts is printed beside it.

(The bootstrap of `avb score --ci` is timed by `bench_bootstrap`.)
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_common import (
    BASE_DIMS,
    HUME_SIZES,
    Figures,
    machine_line,
    make_cache_in_child,
    set_threads,
    verdict,
    workdir,
)

GOAL_PROBE_S = 180.0
QUICK_SIZES = (400, 300, 100)
QUICK_DIMS = {"cnn": 32, **{f"hidden_{i}": 48 for i in range(5)}}


def bench_probe(figs: Figures, cache: Path, threads: int) -> None:
    from cache.reader import load_cache
    from heads.analysis.probe import ProbeConfig, probe_layer, run_probe
    from heads.analysis.threads import limited_threads
    from heads.tasks import AVB

    result = run_probe(cache, ProbeConfig(threads=threads), progress=False)
    n_layers = len(result.layers)
    figs.add("p", "probe wall time", result.seconds, "s",
             f"{n_layers} layers x 4 tasks, {result.n_train} Train / {result.n_val} Val clips; "
             f"goal <= {GOAL_PROBE_S:.0f} s: {verdict(result.seconds, GOAL_PROBE_S)}")
    layer = result.layers[-1]
    data = load_cache(cache, layers=[layer], splits=["Train", "Val"])
    train, val = data.indices("Train"), data.indices("Val")
    labels = {split: {t: np.asarray(data.labels[t][rows], np.float64) for t in AVB.names}
              for split, rows in (("Train", train), ("Val", val))}
    x = data.pooled[layer]
    for name, tasks in (("ridge (two, high, culture)", ("two", "high", "culture")), ("logistic (type)", ("type",))):
        with limited_threads(threads):
            start = time.perf_counter()
            probe_layer(x[train], labels["Train"], x[val], labels["Val"], [AVB[t] for t in tasks])
            figs.add("p", f"one {layer} layer, {name}", time.perf_counter() - start, "s")
    for task, best in result.best().items():
        figs.note(f"best layer for {task}: {best['layer']} ({best['metric']} {best['val_score']:.4f})")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_probe", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks the script, not the figures)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS and torch threads of the probe (its default, 1, is the fastest on a busy machine)")
    p.add_argument("--keep", action="store_true", help="keep the generated cache")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    threads = args.threads
    print(machine_line(set_threads(max(1, threads))), flush=True)
    figs = Figures("probe")
    sizes, dims = (QUICK_SIZES, QUICK_DIMS) if args.quick else (HUME_SIZES, BASE_DIMS)
    with workdir(args.keep) as tmp:
        start = time.perf_counter()
        cache = make_cache_in_child(tmp / "probe.h5", sizes, dims)
        figs.note(f"generated a {sum(sizes)}-clip cache of {len(dims)} layers in {time.perf_counter() - start:.0f} s")
        bench_probe(figs, cache, threads)
    print(machine_line(max(1, threads)), flush=True)
    figs.write(args.json)


if __name__ == "__main__":
    main()
