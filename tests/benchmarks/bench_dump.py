"""(a) Dump overhead: clips/s of the dump against a bare forward pass of the same backbone on the same batches.

    python -m tests.benchmarks.bench_dump            # wav2vec2-base-sized random backbone, 32 generated clips
    python -m tests.benchmarks.bench_dump --quick    # the tests' tiny backbone, 16 clips

The dump is `extract.dump.dump_shard` exactly as `avb dump` runs it in one process: reading and cropping the
WAV files, the forward pass with all hidden states, masked-mean pooling of 14 layers, float16 conversion and
the atomic HDF5 write. The bare pass is `model(waves)` in inference mode on the same batches, already in
memory. Both are timed alternately (`--repeats` rounds) so a change in machine load hits both; the ratio is
the best dump time / the best bare time (goal <= 1.05); the per-round ratios and their median are printed too.
The overhead is split into its parts: hidden states + pooling (`forward_layers` on the in-memory batches,
timed in the same rounds), audio loading (the DataLoader alone) and the cache write (a CacheWriter fed the
same outputs).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from tests.benchmarks.bench_common import (
    Figures,
    begin,
    bench_parser,
    machine_line,
    random_wav2vec2,
    run_benchmark,
    verdict,
    workdir,
)

GOAL_RATIO = 1.05


def run(args: argparse.Namespace) -> Figures:
    import torch
    from torch.utils.data import DataLoader
    from transformers.utils import logging as hf_logging

    from cache.writer import CacheWriter
    from extract.backbone import forward_layers, load_backbone
    from extract.clips import ClipDataset, collate_clips
    from extract.corpus import read_corpus
    from extract.dump import DumpConfig, _writer_args, dump_shard, expected_attrs
    from extract.synth import synthesize_corpus
    from heads.tasks import AVB

    hf_logging.disable_progress_bar()   # the save/load bars of the generated model would bury the figures
    fig, threads = begin("dump", args.threads)
    n_clips = args.clips or (16 if args.quick else 32)
    batch = args.batch_size or (4 if args.quick else 16)
    with workdir(args.keep) as tmp:
        corpus_dir = synthesize_corpus(tmp / "corpus", n_clips, seed=0, progress=False)
        random_wav2vec2(tmp / "model", args.quick)
        model = load_backbone(tmp / "model").eval()   # as the dump loads it (SpecAugment is off in eval)
        n_params = sum(p.numel() for p in model.parameters())
        corpus = read_corpus(corpus_dir)
        rows = list(range(len(corpus)))
        cfg = DumpConfig(corpus=str(corpus_dir), model=str(tmp / "model"), out=str(tmp / "dump.h5"),
                         batch_size=batch)
        attrs = expected_attrs(cfg, model, AVB)

        def loader() -> DataLoader:
            return DataLoader(ClipDataset(corpus, rows, clip_seconds=cfg.clip_seconds, train=False),
                              batch_size=batch, shuffle=False, collate_fn=collate_clips)

        batches = list(loader())

        def bare() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    model(b["waves"])
            return time.perf_counter() - t

        def dump(i: int) -> float:
            t = time.perf_counter()
            dump_shard(model, corpus, rows, tmp / f"dump-{i}.h5", cfg, attrs, progress=False)
            return time.perf_counter() - t

        outputs: list = []

        def layers() -> float:
            outputs.clear()
            t = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    outputs.append(forward_layers(model, b["waves"], b["mask"]))
            return time.perf_counter() - t

        def write() -> float:
            """The cache write alone, from the outputs of the last `layers` pass (as dump_shard hands them)."""
            t = time.perf_counter()
            with CacheWriter(tmp / "write-only.h5", **_writer_args(attrs)) as writer:
                for b, (pooled, n_frames, _) in zip(batches, outputs):
                    r = b["rows"].numpy()
                    writer.append(ids=[corpus.ids[i] for i in r], splits=[str(corpus.splits[i]) for i in r],
                                  labels={name: corpus.labels[name][r] for name in AVB.names},
                                  n_frames=n_frames.cpu().numpy().astype(np.int32),
                                  pooled={k: v.float().cpu().numpy() for k, v in pooled.items()})
            return time.perf_counter() - t

        bare()  # warm-up: first-call allocations and kernel selection belong to neither side
        t_bare, t_dump, t_layers = [], [], []
        for i in range(args.repeats):
            t_bare.append(bare())
            t_dump.append(dump(i))
            t_layers.append(layers())
        t_write = min(write() for _ in range(args.repeats))
        t = time.perf_counter()
        for _ in loader():
            pass
        t_audio = time.perf_counter() - t

        # The least disturbed pass of each side: on a shared machine the other processes only ever add time.
        bare_s, dump_s = min(t_bare), min(t_dump)
        per_pair = ", ".join(f"{d / b:.3f}" for b, d in zip(t_bare, t_dump))
        name = "tiny test backbone" if args.quick else "wav2vec2-base-sized"
        fig.add("a", "backbone parameters", n_params / 1e6, "M", f"{name}, random weights")
        fig.add("a", "bare forward clips/s", n_clips / bare_s, "clips/s",
                f"{n_clips} clips of {cfg.clip_seconds} s, batch {batch}, best of {args.repeats}")
        fig.add("a", "dump clips/s", n_clips / dump_s, "clips/s",
                f"audio + forward + pooling + HDF5 write, best of {args.repeats}")
        ratio = dump_s / bare_s
        fig.add("a", "dump time / bare forward time", ratio, "x",
                f"goal <= {GOAL_RATIO}: {verdict(ratio, GOAL_RATIO)}; best vs best; pairs in run order "
                f"{per_pair}; median ratio {float(np.median([d / b for b, d in zip(t_bare, t_dump)])):.3f}")
        layers_s = min(t_layers)
        fig.add("a", "overhead: audio loading and cropping", 100 * t_audio / bare_s, "% of bare", "DataLoader alone")
        fig.add("a", "overhead: all hidden states + pooling", 100 * (layers_s - bare_s) / bare_s, "% of bare",
                f"forward_layers minus bare, best of {args.repeats} each")
        fig.add("a", "overhead: cache write", 100 * t_write / bare_s, "% of bare",
                "CacheWriter with the same outputs, float16 + HDF5")
        fig.add("a", "overhead: unexplained (load noise, loop)", 100 * (dump_s - layers_s - t_audio - t_write) / bare_s,
                "% of bare", "dump minus the three parts above")
    print(machine_line(threads), flush=True)
    return fig


def parser() -> argparse.ArgumentParser:
    p = bench_parser("bench_dump", __doc__, "tiny backbone and 16 clips: seconds (for the test suite)")
    p.add_argument("--clips", type=int, default=0, help="clips to dump (default 32; quick 16)")
    p.add_argument("--batch-size", type=int, default=0, help="clips per batch (default 16, the dump's; quick 4)")
    p.add_argument("--repeats", type=int, default=4, help="alternating bare/dump pairs (default 4)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpus, model and caches")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    run_benchmark(parser(), run, argv)


if __name__ == "__main__":
    main()
