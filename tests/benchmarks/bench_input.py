"""Training crops from the decoded-audio store against decoding the WAVs, side by side, and `avb dump` from each.

    python -m tests.benchmarks.bench_input                  # 2,000 clips of 3.7 s, at 16 kHz and at 48 kHz
    python -m tests.benchmarks.bench_input --quick          # 200 clips, under a minute
    python -m tests.benchmarks.bench_input --clips 5000 --workers 2 --json input.json

A generated A-VB corpus (`extract.synth`, every clip 3.7 s, 16 kHz 16-bit mono WAVs) and a copy of it at 48 kHz
(each WAV resampled 3x by `resample_poly` and written again as 16-bit PCM) go into a fresh temp folder, and
`decode_corpus` writes each one's store, audio-16k.h5 (int16 for the 16 kHz corpus: lossless; float32 for the
48 kHz one: the decoder's own output), timed. All files were just written, so they sit in the OS page cache:
the figures are decoding and reading costs, not disk reads.

One process: `ClipDataset(train=True)` over every row (Train + Val + Test), item by item (`dataset[k]`, as one
process without DataLoader workers does), for four paths: 16 kHz WAVs, 48 kHz WAVs, the 16 kHz store and the
48 kHz store. The paths alternate (forward, then backward order, `--rounds` times) and each keeps its best
run, as the machine is shared and noisy. Then through a torch DataLoader as fine-tuning builds it (batches of
8, `collate_clips`, `EpochShuffleSampler`, `loader_options` for a CPU device) with 0 and `--workers` workers, for
the 48 kHz WAVs and both stores; with workers, the second epoch is timed (the workers persist), so the figure
is the steady rate, not the start-up.

A GPU's demand is an estimate, written out: wav2vec2-base's training FLOP per 2.5 s clip (the 3 x 2 x params x
frames rule of thumb, and a layer-by-layer count from Wav2Vec2Config's defaults, which adds the CNN running at
the sample rate), at an ASSUMED 200 TFLOP/s effective, gives the clips/s one GPU would consume; each input
path's clips/s is set beside it. No GPU measured this.

Last, the whole `avb dump` process over the 48 kHz corpus with a tiny random backbone (tests/tiny_model.py),
from the WAVs (--no-decoded-audio) and from the store (found as CORPUS/audio-16k.h5), alternated (WAVs, store,
store, WAVs, ...), best of each; the caches of the two sides must be bit-for-bit equal.

Goals (the issue's): the 48 kHz store >= 50x the 48 kHz WAVs in one process, >= 5,000 clips/s from the store in
one process, and the dump from the store >= 2x faster than from the WAVs.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.benchmarks.bench_common import (
    Figures,
    machine_line,
    set_threads,
    timed,
    verdict,
    workdir,
)

PATHS = {  # key: (label, corpus, read from the store)
    "wav16": ("16 kHz WAV", "c16", False),
    "wav48": ("48 kHz WAV", "c48", False),
    "store16": ("16 kHz store (int16)", "c16", True),
    "store48": ("48 kHz store (float32)", "c48", True),
}
LOADER_PATHS = ("wav48", "store16", "store48")
BATCH = 8
CLIP_S = 2.5
ASSUMED_TFLOPS = 200.0            # effective training throughput of one GPU: an assumption, not a measurement
GOAL_RATIO, GOAL_CLIPS_S, GOAL_DUMP = 50.0, 5000.0, 2.0


# ------------------------------------------------------------------------------------------ corpora

def make_corpora(root: Path, clips: int, seconds: float) -> dict[str, Any]:
    """The generated 16 kHz corpus and its 48 kHz copy (same clips, same labels), opened."""
    import soundfile
    from scipy.signal import resample_poly

    from extract.audio import write_wav
    from extract.description import open_corpus
    from extract.synth import synthesize_corpus

    c16, c48 = root / "c16", root / "c48"
    synthesize_corpus(c16, clips, seed=0, min_seconds=seconds, max_seconds=seconds, progress=False)
    shutil.copytree(c16, c48, ignore=shutil.ignore_patterns("*.wav"))
    corpus16 = open_corpus(c16)
    for clip in corpus16.ids:
        src = Path(corpus16.audio_path(clip))
        wave, rate = soundfile.read(str(src), dtype="float64")
        if rate != 16000:
            raise SystemExit(f"{src}: expected a 16 kHz WAV from extract.synth, got {rate} Hz")
        dst = c48 / src.relative_to(c16)
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_wav(dst, np.clip(resample_poly(wave, 3, 1), -1.0, 1.0), 48000, "PCM_16")
    corpus48 = open_corpus(c48)
    if list(corpus48.ids) != list(corpus16.ids):
        raise SystemExit("the 48 kHz copy does not hold the same clips as the 16 kHz corpus")
    return {"c16": corpus16, "c48": corpus48}


# --------------------------------------------------------------------------------------- the reads

def one_process_rate(corpus: Any, store_path: Path | None, epoch: int) -> float:
    """Clips/s of ClipDataset(train=True) over every row, item by item, in this process."""
    from extract.clips import ClipDataset
    from extract.decoded_audio import DecodedAudio

    store = DecodedAudio(store_path) if store_path is not None else None   # the file opens at the first read
    dataset = ClipDataset(corpus, np.arange(len(corpus.ids)), clip_seconds=CLIP_S, train=True, seed=0, store=store)
    dataset.set_epoch(epoch)
    n = len(dataset)
    t = time.perf_counter()
    for k in range(n):
        dataset[k]
    return n / (time.perf_counter() - t)


def loader_rate(corpus: Any, store_path: Path | None, workers: int, epoch: int) -> float:
    """Clips/s of one epoch through a DataLoader built as fine-tuning builds it, once its workers are up."""
    import torch
    from torch.utils.data import DataLoader

    from extract.clips import (
        ClipDataset,
        EpochShuffleSampler,
        collate_clips,
        loader_options,
    )
    from extract.decoded_audio import DecodedAudio

    store = DecodedAudio(store_path) if store_path is not None else None
    dataset = ClipDataset(corpus, np.arange(len(corpus.ids)), clip_seconds=CLIP_S, train=True, seed=0, store=store)
    dataset.set_epoch(epoch)
    sampler = EpochShuffleSampler(len(dataset), seed=0)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collate_clips,
                        **loader_options(workers, torch.device("cpu")))
    if workers > 0:   # one untimed epoch starts the (persistent) workers; the next epoch is timed
        for _ in loader:
            pass
        dataset.set_epoch(epoch + 1)   # the workers hold their own copy: this changes only which crops are named
        sampler.set_epoch(epoch + 1)
    t = time.perf_counter()
    n = sum(len(batch["rows"]) for batch in loader)
    seconds = time.perf_counter() - t
    del loader
    gc.collect()      # the persistent workers end with their iterator
    if n != len(dataset):
        raise SystemExit(f"the DataLoader gave {n} clips, expected {len(dataset)}")
    return n / seconds


def best_of(keys: list[str], rounds: int, measure: Callable[[str, int], float], what: str) -> dict[str, float]:
    """Every key measured `rounds` times, the order alternating (forward, backward, ...); the best of each."""
    runs: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            runs[key].append(measure(key, r))
            print(f"  {what} {key:<20} round {r + 1}: {runs[key][-1]:9.0f} clips/s", flush=True)
    return {k: max(v) for k, v in runs.items()}


# ------------------------------------------------------------------------------------- GPU demand

def training_flop_per_clip(clip_s: float = CLIP_S) -> dict[str, float]:
    """wav2vec2-base's training FLOP for one clip: the rule of thumb and a layer-by-layer count.

    A multiply-add is 2 FLOP and backward costs about twice forward, so training is 3 x forward. Layer by
    layer (Wav2Vec2Config's defaults): the 7 CNN layers at their own frame rates (C_out x C_in x kernel per
    output frame), the feature projection, the grouped positional convolution, the 12 transformer layers'
    linear maps (4 h^2 + 2 h f per frame) and attention's two frames^2 x h products per layer. Norms,
    activations and softmax are left out (a few per cent)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(layerdrop=0.0)
    samples = round(clip_s * 16000)
    length, in_ch, cnn = samples, 1, 0
    for ch, kernel, stride in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
        length = (length - kernel) // stride + 1
        cnn += length * ch * in_ch * kernel
        in_ch = ch
    frames, h, f, layers = length, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    projection = frames * in_ch * h
    pos_conv = frames * h * (h // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
    linear = layers * frames * (4 * h * h + 2 * h * f)
    attention = layers * 2 * frames * frames * h
    macs = cnn + projection + pos_conv + linear + attention
    with torch.device("meta"):      # counted without allocating them
        params = float(sum(t.numel() for t in Wav2Vec2Model(cfg).parameters()))
    return {"frames": frames, "params": params, "rule": 3 * 2 * params * frames, "layers": 3 * 2 * macs,
            "cnn_share": cnn / macs}


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> Figures:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_input", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="200 clips (unless --clips is given), under a minute")
    p.add_argument("--clips", type=int, default=None, help="clips in the generated corpus (default 2000; 200 quick)")
    p.add_argument("--seconds", type=float, default=3.7, help="length of every clip (default 3.7)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader figures (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / BLAS threads of the avb dump runs (default 1: two threads on a shared 2-core "
                        "machine make the tiny model's forward 10x slower)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora, stores and caches")
    args = p.parse_args(argv)
    clips = args.clips if args.clips is not None else (200 if args.quick else 2000)
    rounds = max(1, args.rounds)
    fig = Figures("input")
    set_threads(1)    # the reads are single-threaded; torch's threads only add noise here
    print(machine_line(1), flush=True)
    with workdir(args.keep, prefix="avb-bench-input-") as tmp:
        t = time.perf_counter()
        corpora = make_corpora(tmp, clips, args.seconds)
        fig.note(f"{clips} generated clips of {args.seconds:g} s, 16 kHz and 48 kHz 16-bit mono WAVs, written in "
                 f"{time.perf_counter() - t:.1f} s; all in the OS page cache")
        stores = decode_stores(fig, corpora)

        print(f"\none process, ClipDataset(train=True) item by item, best of {rounds}:", flush=True)
        one = best_of(list(PATHS), rounds, lambda key, r: one_process_rate(
            corpora[PATHS[key][1]], stores[PATHS[key][1]] if PATHS[key][2] else None, r), "one process")
        item = "one process"
        for key, (label, _, from_store) in PATHS.items():
            fig.add(item, f"{label} clips/s", one[key], "clips/s",
                    f"goal >= {GOAL_CLIPS_S:.0f}" if from_store else "")
        fig.add(item, "48 kHz store / 48 kHz WAV", one["store48"] / one["wav48"], "x", f"goal >= {GOAL_RATIO:g}")
        fig.add(item, "16 kHz store / 16 kHz WAV", one["store16"] / one["wav16"], "x")

        worker_counts = sorted({0, max(0, args.workers)})
        keys = [f"{key}/{w}" for w in worker_counts for key in LOADER_PATHS]
        print(f"\nDataLoader (batch {BATCH}, shuffled, collate_clips) with {' and '.join(map(str, worker_counts))} "
              f"workers, best of {rounds}:", flush=True)

        def measure_loader(name: str, r: int) -> float:
            key, w = name.split("/")
            corpus = PATHS[key][1]
            return loader_rate(corpora[corpus], stores[corpus] if PATHS[key][2] else None, int(w), r)

        loaded = best_of(keys, rounds, measure_loader, "DataLoader")
        for w in worker_counts:
            for key in LOADER_PATHS:
                fig.add("DataLoader", f"{PATHS[key][0]}, {w} workers clips/s", loaded[f"{key}/{w}"], "clips/s")
            fig.add("DataLoader", f"48 kHz store / 48 kHz WAV, {w} workers",
                    loaded[f"store48/{w}"] / loaded[f"wav48/{w}"], "x")

        gpu_demand(fig, one)
        dump_sides(fig, tmp, corpora["c48"], rounds, args.threads)
        summary(fig)
    print(machine_line(1), flush=True)
    fig.write(args.json)
    return fig


def decode_stores(fig: Figures, corpora: dict[str, Any]) -> dict[str, Path]:
    """Each corpus's store, decode_corpus timed; refuses a store of the unexpected dtype."""
    from extract.decoded_audio import DecodedAudio, decode_corpus

    stores = {}
    for name, rate, dtype in (("c16", 16, "int16"), ("c48", 48, "float32")):
        corpus = corpora[name]
        t = time.perf_counter()
        summary = decode_corpus(corpus, progress=False)
        seconds = time.perf_counter() - t
        if summary.dtype != dtype or DecodedAudio(summary.path).dtype != dtype or summary.clips != len(corpus.ids):
            raise SystemExit(f"{summary.path}: expected {len(corpus.ids)} clips as {dtype}, got {summary}")
        fig.add("decode", f"decode the {rate} kHz WAVs into a {dtype} store", seconds, "s",
                f"{len(corpus.ids) / seconds:.0f} clips/s")
        fig.add("decode", f"{rate} kHz corpus store size", summary.path.stat().st_size / 1e6, "MB")
        stores[name] = summary.path
    return stores


def gpu_demand(fig: Figures, one: dict[str, float]) -> None:
    flop = training_flop_per_clip()
    print(f"\nGPU demand (an ESTIMATE: the {ASSUMED_TFLOPS:g} TFLOP/s is an assumption until a GPU measures it):\n"
          f"  rule of thumb: 3 (forward + backward) x 2 FLOP/MAC x {flop['params'] / 1e6:.1f}e6 params x "
          f"{flop['frames']} frames = {flop['rule']:.3g} FLOP per {CLIP_S:g} s clip, "
          f"{BATCH * flop['rule'] / 1e12:.2f} TFLOP per batch of {BATCH}\n"
          f"  layer by layer (adds the CNN at the sample rate: {flop['cnn_share']:.0%} of the forward MACs): "
          f"{flop['layers']:.3g} FLOP per clip, {BATCH * flop['layers'] / 1e12:.2f} TFLOP per batch of {BATCH}\n"
          f"  {ASSUMED_TFLOPS:g}e12 FLOP/s / {flop['layers']:.3g} FLOP = "
          f"{ASSUMED_TFLOPS * 1e12 / flop['layers']:.0f} clips/s (rule of thumb: "
          f"{ASSUMED_TFLOPS * 1e12 / flop['rule']:.0f} clips/s)", flush=True)
    item = "GPU estimate"
    fig.add(item, "training FLOP per clip, rule of thumb", flop["rule"], "FLOP", "3 x 2 x params x frames")
    fig.add(item, "training FLOP per clip, layer by layer", flop["layers"], "FLOP")
    fig.add(item, f"training TFLOP per batch of {BATCH}", BATCH * flop["layers"] / 1e12, "TFLOP",
            "the issue says about 0.7")
    fig.add(item, "assumed effective GPU throughput", ASSUMED_TFLOPS, "TFLOP/s", "an assumption, not measured")
    demand = fig.add(item, "GPU demand", ASSUMED_TFLOPS * 1e12 / flop["layers"], "clips/s",
                     "estimate: assumed throughput / layer-by-layer FLOP")
    print(f"\n  {'input path (one process)':<26}{'clips/s':>10}{'/ GPU demand':>14}", flush=True)
    for key, (label, _, _) in PATHS.items():
        print(f"  {label:<26}{one[key]:>10.0f}{one[key] / demand:>13.2f}x", flush=True)
    for key, (label, _, _) in PATHS.items():
        fig.add(item, f"{label} / GPU demand", one[key] / demand, "x", "estimate")


def dump_sides(fig: Figures, tmp: Path, corpus: Any, rounds: int, threads: int) -> None:
    """`avb dump` of the 48 kHz corpus from the WAVs and from the store, alternated; their caches must agree."""
    from tests.helpers import assert_same_cache
    from tests.tiny_model import make_tiny_backbone

    model = make_tiny_backbone(tmp / "tiny")
    base = [sys.executable, "-m", "extract.app.cli", "dump", "--corpus", str(corpus.root), "--model", str(model),
            "--frame-layers", "hidden_2", "--no-progress"]   # frames too: assert_same_cache compares them
    sides = {"wavs": ["--no-decoded-audio"], "store": []}
    times: dict[str, list[float]] = {side: [] for side in sides}
    outs: dict[str, Path] = {}
    order = (["wavs", "store", "store", "wavs"] * rounds)[:2 * rounds]
    print(f"\navb dump of the 48 kHz corpus ({len(corpus.ids)} clips, tiny backbone, {threads} threads), "
          f"best of {rounds}:", flush=True)
    for k, side in enumerate(order):
        out = tmp / f"dump-{side}-{k}.h5"
        times[side].append(timed(base + ["--out", str(out)] + sides[side], threads))
        outs.setdefault(side, out)
        print(f"  {side:<6} {times[side][-1]:7.2f} s", flush=True)
    try:
        assert_same_cache(outs["wavs"], outs["store"])
    except AssertionError as err:
        raise SystemExit(f"the dump from the store differs from the dump from the WAVs: {err!r}") from None
    fig.note(f"the caches dumped from the WAVs and from the store are bit-for-bit equal ({outs['wavs'].name}, "
             f"{outs['store'].name})")
    best = {side: min(t) for side, t in times.items()}
    item = "avb dump"
    fig.add(item, "whole process from the 48 kHz WAVs (--no-decoded-audio)", best["wavs"], "s")
    fig.add(item, "whole process from the store (audio-16k.h5)", best["store"], "s")
    fig.add(item, "WAVs / store", best["wavs"] / best["store"], "x", f"goal >= {GOAL_DUMP:g}")


def summary(fig: Figures) -> None:
    v = {name: f["value"] for name, f in fig.values.items()}
    print("\n==== goals", flush=True)
    rows = [("48 kHz store / 48 kHz WAV, one process", v["48 kHz store / 48 kHz WAV"], GOAL_RATIO, "x"),
            ("48 kHz store clips/s, one process", v["48 kHz store (float32) clips/s"], GOAL_CLIPS_S, "clips/s"),
            ("16 kHz store clips/s, one process", v["16 kHz store (int16) clips/s"], GOAL_CLIPS_S, "clips/s"),
            ("avb dump, WAVs / store", v["WAVs / store"], GOAL_DUMP, "x")]
    for name, value, goal, unit in rows:
        print(f"  {name:<40} {value:9.4g} {unit:<8} goal >= {goal:g}: "
              f"{verdict(value, goal, lower_is_better=False)}", flush=True)


if __name__ == "__main__":
    main()
