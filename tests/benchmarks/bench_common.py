"""Shared pieces of the benchmark scripts: generated caches, figures, memory and machine notes.

The benchmarks print every figure as one line `[x] name: value unit` (x = the issue's item a-d) so a person
reads them and `run_all` / the quick test parse them, and write the same figures as JSON with `--json`.
Generated caches go into the system temp dir and are deleted at the end unless `--keep` is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# HUME-VB (A-VB 2022) clip counts per split, and wav2vec2-base's layers (cnn + 13 hidden states).
HUME_SIZES: tuple[int, int, int] = (19_990, 19_396, 19_815)
BASE_DIMS: dict[str, int] = {"cnn": 512, **{f"hidden_{i}": 768 for i in range(13)}}
QUICK_DIMS: dict[str, int] = {"cnn": 16, **{f"hidden_{i}": 24 for i in range(5)}}   # the --quick runs' tiny widths
N_LATENT = 8
LINE_PREFIX = "[{item}] "
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Figures:
    """The figures of one benchmark run, printed as they are added and dumped as JSON at the end."""

    bench: str
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, item: str, name: str, value: float, unit: str = "", note: str = "") -> float:
        """Record and print one figure; `item` is the issue's letter (a-d)."""
        value = float(value)
        self.values[name] = {"item": item, "value": value, "unit": unit, "note": note}
        text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
        tail = f"  ({note})" if note else ""
        print(f"{LINE_PREFIX.format(item=item)}{name}: {text} {unit}{tail}".rstrip(), flush=True)
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"    note: {text}", flush=True)

    def write(self, path: str | os.PathLike | None) -> None:
        if path is not None:
            Path(path).write_text(json.dumps({"bench": self.bench, "figures": self.values, "notes": self.notes},
                                             indent=1), encoding="utf-8")


def timed(cmd: list[str], threads: int) -> float:
    """Wall seconds of a whole command run from the repository (a fresh process, `threads` BLAS threads)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return wall


def set_threads(n: int) -> int:
    """torch's intra-op threads; returns the number in force."""
    import torch

    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def machine_line(threads: int) -> str:
    """CPU count, torch threads and the load average: figures taken on a busy shared machine say so."""
    load = os.getloadavg()
    busy = " (machine under load from other processes)" if load[0] > 0.5 else ""
    return (f"machine: {os.cpu_count()} CPUs, torch threads {threads}, load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}{busy}")


def begin(bench: str, threads: int) -> tuple[Figures, int]:
    """The figures of `bench`, once torch's threads are set (returned) and the machine line is printed."""
    threads = set_threads(threads)
    print(machine_line(threads), flush=True)
    return Figures(bench), threads


def bench_parser(module: str, doc: str, quick_help: str, *, threads: str | None = "torch intra-op threads (default 2)",
                 json_help: str = "also write the figures to this JSON file") -> argparse.ArgumentParser:
    """The options every benchmark script shares: --quick, --threads (default 2; None: no such option), --json."""
    p = argparse.ArgumentParser(prog=f"python -m tests.benchmarks.{module}", description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    if threads is not None:
        p.add_argument("--threads", type=int, default=2, help=threads)
    p.add_argument("--json", type=Path, default=None, help=json_help)
    return p


def run_benchmark(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Figures],
                  argv: Sequence[str] | None) -> None:
    """A benchmark's main: parse `argv`, run, write the figures to --json (if given)."""
    args = parser.parse_args(argv)
    run(args).write(args.json)


def random_wav2vec2(directory: Path, quick: bool) -> Path:
    """A randomly initialised wav2vec2 saved to `directory`: the tests' tiny model with `quick`, else
    wav2vec2-base's architecture (the Wav2Vec2Config defaults, without LayerDrop)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    if quick:
        from tests.tiny_model import tiny_config
        config = tiny_config()
    else:
        config = Wav2Vec2Config(layerdrop=0.0)
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(directory)
    return directory


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


@contextmanager
def workdir(keep: bool = False, prefix: str = "avb-bench-") -> Iterator[Path]:
    """A fresh folder in the system temp dir, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"    kept {path}", flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- caches

def _label_columns() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    from heads.tasks import AVB, TYPE_CLASSES

    return {k: list(t.columns) for k, t in zip(AVB.names, AVB)}, {"type": list(TYPE_CLASSES)}


def make_cache(
    path: str | os.PathLike,
    sizes: Sequence[int] = HUME_SIZES,
    dims: dict[str, int] | None = None,
    *,
    seed: int = 0,
    frame_layers: Sequence[str] = (),
    frame_stride: int = 1,
    n_frames: int = 124,
    block: int = 2048,
) -> Path:
    """Write a random but learnable float16 cache with the given split sizes, block by block.

    Every layer is a fixed random projection of an 8-d latent z per clip plus noise, and the labels are
    functions of z (TYPE = argmax of a projection, the regression targets sigmoids of projections), so a
    head really learns on it. Blocks keep the generator's memory small (a HUME-VB-sized cache is ~1.2 GB).
    With `frame_layers`, those layers are also stored frame by frame at `frame_stride`: frames scatter
    around the pooled value and average to it.
    """
    from cache.writer import CacheWriter
    from heads.tasks import AVB

    dims = dict(BASE_DIMS if dims is None else dims)
    columns, classes = _label_columns()
    rng = np.random.default_rng(seed)
    proj = {layer: rng.normal(size=(N_LATENT, d)).astype(np.float32) / math.sqrt(N_LATENT) for layer, d in dims.items()}
    label_proj = {name: rng.normal(size=(N_LATENT, 8 if name == "type" else len(AVB[name].columns)))
                  for name in AVB.names}
    splits = np.array(["Train"] * sizes[0] + ["Val"] * sizes[1] + ["Test"] * sizes[2])
    n = len(splits)
    kept = -(-n_frames // frame_stride)
    if frame_layers:  # keep a block's float32 frames near 64 MB
        per_clip = kept * sum(dims[layer] for layer in frame_layers) * 4
        block = max(16, min(block, (64 << 20) // per_clip))
    with CacheWriter(path, layer_dims=dims, label_columns=columns, label_classes=classes, dtype="float16",
                     frame_layers=list(frame_layers), frame_stride=frame_stride,
                     attrs={"backbone": {"name_or_path": "generated", "model_type": "wav2vec2"},
                            "sample_rate": 16000, "clip_seconds": 2.5}) as writer:
        for start in range(0, n, block):
            brng = np.random.default_rng((seed, start))
            b = min(block, n - start)
            z = brng.normal(size=(b, N_LATENT)).astype(np.float32)
            labels = {"type": np.argmax(z @ label_proj["type"], 1).astype(np.float32)[:, None]}
            for name in ("two", "high", "culture"):
                labels[name] = (1.0 / (1.0 + np.exp(-0.7 * (z @ label_proj[name])))).astype(np.float32)
            unlabelled = splits[start:start + b] == "Test"
            for values in labels.values():
                values[unlabelled] = np.nan
            pooled = {layer: z @ p + 0.5 * brng.standard_normal((b, p.shape[1]), dtype=np.float32)
                      for layer, p in proj.items()}
            frames = None
            if frame_layers:
                frames = {}
                for layer in frame_layers:
                    wiggle = 0.3 * brng.standard_normal((b, kept, dims[layer]), dtype=np.float32)
                    wiggle -= wiggle.mean(1, keepdims=True)
                    frames[layer] = list(pooled[layer][:, None, :] + wiggle)
            writer.append([f"{i:06d}" for i in range(start, start + b)], splits[start:start + b].tolist(), labels,
                          np.full(b, n_frames, dtype=np.int32), pooled, frames)
    return Path(path)


def make_cache_in_child(path: Path, sizes: Sequence[int], dims: dict[str, int] | None = None, **kw: Any) -> Path:
    """make_cache in a separate process, so its buffers never count towards this process's peak RSS."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=make_cache, args=(path, tuple(sizes), dims), kwargs=kw)
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not Path(path).is_file():
        raise RuntimeError(f"generating {path} failed (exit code {proc.exitcode})")
    return Path(path)


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def verdict(value: float, goal: float, *, lower_is_better: bool = True) -> str:
    """'MET' or 'MISSED by x.xx×' for a figure against its goal."""
    ok = value <= goal if lower_is_better else value >= goal
    if ok:
        return "MET"
    factor = value / goal if lower_is_better else goal / value
    return f"MISSED by {factor:.2f}x"
