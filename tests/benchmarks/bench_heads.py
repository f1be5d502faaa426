"""(b) The head grid at HUME-VB scale, and (d) cache bytes per clip and peak memory.

    python -m tests.benchmarks.bench_heads            # HUME-VB-sized pooled cache (~1.2 GB in the temp dir)
    python -m tests.benchmarks.bench_heads --quick    # a tiny cache and head, seconds

What is measured, and how the grid time is obtained. The grid is 3 architectures x 4 weightings x 3 seeds x
30 epochs at batch size 8 on a generated pooled cache of 19,990 Train / 19,396 Val / 19,815 Test clips
(14 layers, float16, learnable). Training all of it takes hours on a 2-core CPU, so for every architecture
the real `heads.training.joint.train_runs` trains its 12 runs in the joint groups `avb heads ablate` uses (as many as
fit the ablation's memory budget, `--max-group-mib`; at HUME scale VANILLA and CHAIN train 12 runs at once,
BRANCH 3 groups of 4) for one epoch over
the first `--steps` Train batches, evaluates the first `--val-rows` Val clips and predicts `--test-rows` Test
clips. The seconds of the step loop, of the per-epoch evaluation and of the final predictions are taken
apart by timing `_epoch_batches` and `_predict` from the outside, then scaled to full size:

    epoch = steps_per_epoch x (s/step) + (per-epoch Val evaluation) x Val / val_rows
    arch  = setup + 30 x epoch + (final Val + Test predictions and files) x (Val + Test) / (val_rows + test_rows)

Every grid figure is labelled "extrapolated from N measured steps". BRANCH over frames (stride 4) is measured
the same way on a small frame-level cache and extrapolated to HUME-VB size separately.

(d) bytes per clip come from `cache_info` of the generated caches; the peak RSS of this process (the cache
is generated in a child process) is compared with the bytes of the loaded cache. The training above runs in
the ablation's joint groups, so this is the peak of the grid as `avb heads ablate` trains it; the benchmark's
own buffers (the copy-bandwidth probe, the FLOP count's model) stay below it. `--archs branch --skip-frames`
measures just the largest head's step time and the memory peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from heads.names import ARCHS, PAPER_WEIGHTINGS
from heads.tasks import AVB
from tests.benchmarks.bench_common import (
    BASE_DIMS,
    HUME_SIZES,
    QUICK_DIMS,
    Figures,
    begin,
    bench_parser,
    current_rss_bytes,
    fmt_duration,
    machine_line,
    make_cache_in_child,
    peak_rss_bytes,
    run_benchmark,
    verdict,
    workdir,
)

SEEDS = (0, 1, 2)
EPOCHS = 30
BATCH = 8
GOAL_GRID_S = 130 * 60.0          # the HUME-VB-scale grid on this 2-core machine
GOAL_STEP_MS = {"vanilla": 8.0, "chain": 8.0, "branch": 80.0}   # per 12-run step at batch 8
GOAL_RSS_RATIO = 2.0
QUICK_SIZES = (160, 96, 48)


def _cache_nbytes(cache: Any) -> int:
    """Bytes of everything `load_cache` holds for the cache: features, labels, ids, splits, frame counts."""
    total = sum(a.nbytes for a in cache.pooled.values()) + sum(a.nbytes for a in cache.labels.values())
    return int(total + cache.ids.nbytes + cache.splits.nbytes + cache.n_frames.nbytes)


def _subset(cache: Any, n_train: int, n_val: int, n_test: int) -> Any:
    """The same in-memory cache with only the first n clips of each split marked as such (no copy)."""
    splits = np.full(len(cache.splits), "Skip", dtype=cache.splits.dtype)
    for name, n in (("Train", n_train), ("Val", n_val), ("Test", n_test)):
        splits[cache.indices(name)[:n]] = name
    return dataclasses.replace(cache, splits=splits)


def step_cost(cache: Any, head: Any, arch: str, frames: Any = None, group: int | None = None
              ) -> tuple[float, int, float]:
    """(FLOPs of one training step's forward + backward for all 12 runs, parameters of the 12 runs,
    seconds to build one batch of inputs: indexing in memory, or reading and padding frames).

    Counted on a stack of `group` runs (default: all 12) and scaled to 12: every run has the same shapes, so
    FLOPs and parameters grow exactly linearly, and a stack no larger than the ablation's joint groups keeps
    this measurement from setting the peak RSS that (d) reports."""
    from torch.utils.flop_counter import FlopCounterMode

    from heads.model.architectures import build_head
    from heads.model.losses import task_losses
    from heads.training import inputs

    all_seeds = [s for _ in PAPER_WEIGHTINGS for s in SEEDS]
    seeds = all_seeds[:group] if group else all_seeds
    scale = len(all_seeds) / len(seeds)
    model = build_head(dataclasses.replace(head, arch=arch), dict(cache.layer_dims), seeds, AVB).train()
    feats = inputs.Features(cache, model.required_layers, frames, model.required_frame_layers)
    labels = inputs.Labels(cache, AVB, feats.device)
    batches = inputs.device_batches(
        inputs.epoch_batches(seeds, 1, np.asarray(cache.indices("Train")), BATCH)[:5], feats.device)
    t = time.perf_counter()
    for rows in batches:
        feats.batch(rows)
    batch_s = (time.perf_counter() - t) / len(batches)
    targets = labels.batch(batches[0])
    with FlopCounterMode(display=False) as counter:
        task_losses(AVB, model(feats.batch(batches[0]), targets), targets).sum().backward()
    return (float(counter.get_total_flops()) * scale, round(sum(p.numel() for p in model.parameters()) * scale),
            batch_s)


def machine_peaks(hidden: int, in_dim: int, n_tasks: int = 4, runs: int = 12) -> tuple[float, float]:
    """(best GEMM GFLOP/s on the step's own matmul shapes with hot caches, copy bandwidth in GB/s).

    The shapes are those of a 12-run step with the tasks stacked: the task networks' first layer forward
    ([R*T, 8, in] x [in, hidden]) and its weight gradient ([R*T, in, 8] x [8, hidden]), and BRANCH's
    projections over 3 tokens ([R*T, 24, hidden] x [hidden, hidden]) and their weight gradient."""
    import torch

    best = 0.0
    s = runs * n_tasks
    for m, k, n in ((BATCH, in_dim, hidden), (in_dim, BATCH, hidden), (3 * BATCH, hidden, hidden),
                    (hidden, 3 * BATCH, hidden)):
        a, w = torch.randn(s, m, k), torch.randn(s, k, n)
        out = torch.bmm(a, w)
        t = time.perf_counter()
        reps = 20
        for _ in range(reps):
            torch.bmm(a, w, out=out)
        best = max(best, 2 * s * m * k * n * reps / (time.perf_counter() - t) / 1e9)
    src, dst = torch.ones(64 << 20), torch.empty(64 << 20)   # 256 MB each: far beyond the caches
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bandwidth = 2 * src.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9
    return best, bandwidth


def adamw_seconds(n_params: int) -> float:
    """Seconds of torch's fused AdamW over `n_params` float32 parameters (the optimiser's memory-bound pass)."""
    import torch

    p = torch.zeros(n_params)
    g, m, v = torch.full_like(p, 1e-3), torch.zeros_like(p), torch.zeros_like(p)
    step = torch.tensor(1.0)

    def once() -> None:
        torch._fused_adamw_([p], [g], [m], [v], [], [step], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01,
                            eps=1e-8, amsgrad=False, maximize=False)

    once()
    t = time.perf_counter()
    for _ in range(5):
        once()
    return (time.perf_counter() - t) / 5


def measure_arch(cache: Any, cache_path: Path, out: Path, arch: str, head: Any, *, steps: int, val_rows: int,
                 test_rows: int, full_sizes: Sequence[int], frames: Any = None,
                 max_group_bytes: int | None = None, device: Any = None) -> dict[str, Any]:
    """Train the 12 runs of `arch` on a subset the way `avb heads ablate` does: in the joint groups that fit
    `max_group_bytes` (default: the ablation's for `device`), one `train_runs` call per group on `device`
    (default: the CPU). The measured parts are summed over the groups (a "step" is one batch for all 12 runs)
    and extrapolated to full size."""
    import torch

    from heads.training import joint as train_mod
    from heads.training.grid import default_group_bytes, joint_groups, run_state_bytes
    from heads.training.joint import TrainConfig, train_runs

    n_val = min(val_rows, len(cache.indices("Val")))
    n_test = min(test_rows, len(cache.indices("Test")))
    view = _subset(cache, steps * BATCH, n_val, n_test)
    configs = [TrainConfig(arch=arch, weighting=w, seed=s, epochs=1, batch_size=BATCH, head=head)
               for w in PAPER_WEIGHTINGS for s in SEEDS]
    device = torch.device("cpu") if device is None else device
    budget = default_group_bytes(device) if max_group_bytes is None else max_group_bytes
    per_run = run_state_bytes(configs[0].head, dict(cache.layer_dims), AVB)
    groups = joint_groups(len(configs), per_run, budget)
    real_batches, real_predict = train_mod.epoch_batches, train_mod._predict
    totals = {"setup_s": 0.0, "loop_s": 0.0, "eval_s": 0.0, "eval_only_s": 0.0, "final_s": 0.0}
    for group in groups:
        marks: dict[str, float] = {}
        predicts: list[tuple[float, float]] = []

        def timed_batches(*args: Any, _marks: dict = marks, **kwargs: Any) -> Any:
            result = real_batches(*args, **kwargs)
            _marks.setdefault("loop_start", time.perf_counter())
            return result

        def timed_predict(*args: Any, _marks: dict = marks, _predicts: list = predicts, **kwargs: Any) -> Any:
            if device.type == "cuda":      # the loop's queued kernels belong to the loop, not to the evaluation
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _marks.setdefault("loop_end", start)
            result = real_predict(*args, **kwargs)
            _predicts.append((start, time.perf_counter()))
            return result

        members = [configs[i] for i in group]
        train_mod.epoch_batches, train_mod._predict = timed_batches, timed_predict
        try:
            t0 = time.perf_counter()
            train_runs(view, members, [out / arch / c.name for c in members], device=device, progress=False,
                       frames=frames)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_end = time.perf_counter()
        finally:
            train_mod.epoch_batches, train_mod._predict = real_batches, real_predict
        if len(predicts) != 3:
            raise RuntimeError(f"expected 3 prediction passes (Val each epoch, final Val and Test), "
                               f"saw {len(predicts)}")
        totals["setup_s"] += marks["loop_start"] - t0
        totals["loop_s"] += marks["loop_end"] - marks["loop_start"]
        totals["eval_s"] += predicts[1][0] - marks["loop_end"]   # Val predictions, scores, best copies, schedule
        totals["eval_only_s"] += predicts[0][1] - predicts[0][0]
        totals["final_s"] += t_end - predicts[1][0]              # final Val + Test predictions, files, weights

    step_s = totals["loop_s"] / steps
    n_train, n_val_full, n_test_full = full_sizes
    steps_per_epoch = n_train // BATCH + (1 if n_train % BATCH >= 2 else 0)
    epoch_s = steps_per_epoch * step_s + totals["eval_s"] * n_val_full / n_val
    final_full_s = totals["final_s"] * (n_val_full + n_test_full) / (n_val + n_test)
    return {
        "steps": steps, "step_s": step_s, "eval_rows_per_s": n_val / totals["eval_only_s"],
        "setup_s": totals["setup_s"], "epoch_s": epoch_s, "steps_per_epoch": steps_per_epoch,
        "arch_s": totals["setup_s"] + EPOCHS * epoch_s + final_full_s, "final_s": final_full_s,
        "groups": [len(g) for g in groups], "run_state_bytes": per_run, "budget": budget,
    }


def _groups_text(r: dict[str, Any]) -> str:
    sizes = r["groups"]
    if len(sizes) == 1:
        return f"one joint group of {sizes[0]}"
    if len(set(sizes)) == 1:
        return f"{len(sizes)} joint groups of {sizes[0]}"
    return f"joint groups of {'+'.join(map(str, sizes))}"


def run(args: argparse.Namespace) -> Figures:
    from cache.reader import cache_info, load_cache
    from heads.model.architectures import HeadConfig
    from heads.training.device import resolve_device

    fig, threads = begin("heads", args.threads)
    device = resolve_device(args.device)
    quick = args.quick
    sizes = QUICK_SIZES if quick else HUME_SIZES
    dims = QUICK_DIMS if quick else BASE_DIMS
    head = HeadConfig(hidden=32, n_heads=4, branch_blocks=2) if quick else HeadConfig()
    steps = {a: args.steps or (8 if quick else (60 if a == "branch" else 300)) for a in ARCHS}
    budget = None if args.max_group_mib is None else int(args.max_group_mib * 2**20)
    archs = [a.strip().lower() for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in ARCHS for a in archs):
        raise SystemExit(f"--archs: expected a comma-separated subset of {','.join(ARCHS)}, got {args.archs!r}")
    rss_start = current_rss_bytes()
    # Before the cache is loaded: its 2 x 256 MB copy buffers must not add to the peak RSS that (d) reports.
    gemm, bandwidth = machine_peaks(head.hidden, max(dims.values()))

    with workdir(args.keep) as tmp:
        t = time.perf_counter()
        path = make_cache_in_child(tmp / "pooled.h5", sizes, dims)
        print(f"    generated {path} in {time.perf_counter() - t:.0f} s (child process)", flush=True)
        info = cache_info(path)
        t = time.perf_counter()
        cache = load_cache(path)
        load_s = time.perf_counter() - t
        cache_bytes = _cache_nbytes(cache)
        print(f"    loaded {len(cache)} clips ({cache_bytes / 2**30:.2f} GiB in memory) in {load_s:.1f} s", flush=True)

        fig.add("b", "machine: best GEMM rate on the step's shapes", gemm, "GFLOP/s", f"{threads} thread(s), hot caches")
        fig.add("b", "machine: copy bandwidth", bandwidth, "GB/s", "256 MB buffers")
        results = {}
        floor_s = 0.0
        for arch in archs:
            results[arch] = r = measure_arch(cache, path, tmp / "runs", arch, head, steps=steps[arch],
                                             val_rows=args.val_rows, test_rows=args.test_rows, full_sizes=sizes,
                                             max_group_bytes=budget, device=device)
            flops, n_params, _ = step_cost(cache, head, arch, group=max(r["groups"]))
            n_runs = len(PAPER_WEIGHTINGS) * len(SEEDS)
            # The matmuls at the best GEMM rate, the fused AdamW pass over the parameters as measured here (reads
            # p, g, m, v, writes p, m, v), and the gradient's write by backward at the copy bandwidth.
            group = max(r["groups"])
            adamw_s = adamw_seconds(n_params // n_runs * group) * n_runs / group
            floor_step = flops / (gemm * 1e9) + adamw_s + 4 * n_params / (bandwidth * 1e9)
            floor_s += EPOCHS * r["steps_per_epoch"] * floor_step
            fig.add("b", f"{arch} ms per step ({n_runs} runs jointly, batch {BATCH})", 1e3 * r["step_s"], "ms",
                    f"goal <= {GOAL_STEP_MS[arch]:g} ms: {verdict(1e3 * r['step_s'], GOAL_STEP_MS[arch])}; "
                    f"measured over {r['steps']} steps; {_groups_text(r)} as `avb heads ablate` trains them "
                    f"({r['run_state_bytes'] / 2**20:.1f} MiB of training state per run, budget "
                    f"{r['budget'] / 2**20:.0f} MiB)")
            fig.add("b", f"{arch} GFLOP per step", flops / 1e9, "GFLOP",
                    f"forward + backward; {n_params / 1e6:.1f} M parameters in the {n_runs} runs; "
                    f"{flops / 1e9 / r['step_s']:.0f} GFLOP/s achieved over the whole step")
            fig.add("b", f"{arch} lower bound ms per step", 1e3 * floor_step, "ms",
                    f"GFLOP at the best GEMM rate + fused AdamW over the parameters ({1e3 * adamw_s:.1f} ms, "
                    "measured in groups of the same size) + the gradient written once at the copy bandwidth")
            fig.add("b", f"{arch} eval rows/s (all {n_runs} runs)", r["eval_rows_per_s"], "rows/s")
            fig.add("b", f"{arch} s per epoch", r["epoch_s"], "s",
                    f"extrapolated from {r['steps']} measured steps: {r['steps_per_epoch']} steps + Val eval")
            fig.add("b", f"{arch} {n_runs} runs x {EPOCHS} epochs", r["arch_s"] / 60, "min", "extrapolated")
        if set(archs) == set(ARCHS):
            grid_s = sum(r["arch_s"] for r in results.values())
            measured = sum(r["steps"] for r in results.values())
            fig.add("b", "full grid wall time", grid_s / 60, "min",
                    f"extrapolated from {measured} measured steps; goal <= {GOAL_GRID_S / 60:.0f} min: "
                    f"{verdict(grid_s, GOAL_GRID_S)} ({fmt_duration(grid_s)})")
            fig.add("b", "full grid wall time (s)", grid_s, "s", "extrapolated")
            fig.add("b", "grid lower bound on this machine", floor_s / 60, "min",
                    "training steps only, at the lower bound per step (no evaluation, no overhead)")
        else:
            fig.note(f"only {','.join(archs)} measured: no grid total")
        if not args.skip_frames:
            frame_layers, finfo = _measure_frames(fig, args, tmp, head, dims, sizes, steps, budget, device)

        # (d) storage and memory
        fig.add("d", "pooled cache bytes per clip", info["bytes_per_clip"]["pooled"], "B",
                f"{len(info['layers'])} layers float16; file {info['file_bytes'] / 2**30:.2f} GiB for "
                f"{info['n_clips']} clips")
        if not args.skip_frames:
            frame_dims = sum(dims[layer] for layer in frame_layers)
            per_clip_frames = finfo["bytes_per_clip"]["frames"]
            fig.add("d", "frame cache bytes per clip", per_clip_frames, "B",
                    f"{len(frame_layers)} layers ({frame_dims} values per frame) at stride {args.frame_stride}")
            all_layers_stride1 = per_clip_frames / frame_dims * sum(dims.values()) * args.frame_stride
            fig.add("d", "frame cache bytes per clip, all layers, stride 1", all_layers_stride1, "B",
                    f"scaled from the measured frame cache; x {sizes[0] + sizes[1] + sizes[2]} clips = "
                    f"{all_layers_stride1 * sum(sizes) / 1e9:.1f} GB")
        peak = peak_rss_bytes()
        fig.add("d", "in-memory cache", cache_bytes / 2**30, "GiB")
        fig.add("d", "RSS before loading (python + torch)", rss_start / 2**30, "GiB")
        fig.add("d", "peak RSS of (b)", peak / 2**30, "GiB",
                "training in the ablation's joint groups: " + "; ".join(
                    f"{a} {_groups_text(r)}" for a, r in results.items()))
        fig.add("d", "peak RSS / in-memory cache", peak / cache_bytes, "x",
                f"goal <= {GOAL_RSS_RATIO:g}: {verdict(peak / cache_bytes, GOAL_RSS_RATIO)}")
        fig.add("d", "(peak RSS - RSS before loading) / in-memory cache", (peak - rss_start) / cache_bytes, "x",
                "without the interpreter and libraries")
    print(machine_line(threads), flush=True)
    return fig


def _measure_frames(fig: Figures, args: argparse.Namespace, tmp: Path, head: Any, dims: dict[str, int],
                    sizes: Sequence[int], steps: dict[str, int], budget: int | None,
                    device: Any) -> tuple[list[str], dict]:
    """BRANCH over frames (stride 4) on a small frame-level cache, extrapolated to HUME-VB size."""
    from cache.reader import FrameReader, cache_info, load_cache
    from heads.model.architectures import branch_groups

    quick = args.quick
    frame_sizes = (96, 32, 16) if quick else (args.frame_clips, args.frame_clips // 4, args.frame_clips // 8)
    frame_head = dataclasses.replace(head, arch="branch", branch_use_frames=True)
    groups = branch_groups(len([d for d in dims if d.startswith("hidden_")]) - 1, frame_head.branch_blocks)
    frame_layers = ["cnn"] + [f"hidden_{g[-1]}" for g in groups]
    fpath = make_cache_in_child(tmp / "frames.h5", frame_sizes, dims, frame_layers=frame_layers,
                                frame_stride=args.frame_stride, seed=1)
    finfo = cache_info(fpath)
    fcache = load_cache(fpath)
    with FrameReader(fpath) as reader:
        fr = measure_arch(fcache, fpath, tmp / "frame-runs", "branch", frame_head,
                          steps=min(steps["branch"] if quick else args.frame_steps, frame_sizes[0] // BATCH),
                          val_rows=frame_sizes[1], test_rows=frame_sizes[2], full_sizes=sizes, frames=reader,
                          max_group_bytes=budget, device=device)
        fflops, _, fbatch_s = step_cost(fcache, frame_head, "branch", frames=reader, group=max(fr["groups"]))
    del fcache
    fig.add("b", "branch-frames ms per step (12 runs jointly, batch 8)", 1e3 * fr["step_s"], "ms",
            f"stride {args.frame_stride}, layers {','.join(frame_layers)}, measured over {fr['steps']} steps; "
            f"{_groups_text(fr)}")
    fig.add("b", "branch-frames GFLOP per step", fflops / 1e9, "GFLOP",
            f"{fflops / 1e9 / fr['step_s']:.0f} GFLOP/s achieved over the whole step")
    fig.add("b", "branch-frames ms per batch read (HDF5 + padding)", 1e3 * fbatch_s, "ms",
            "inside the step time above")
    fig.add("b", "branch-frames s per epoch", fr["epoch_s"], "s",
            f"extrapolated to {sizes[0]} Train / {sizes[1]} Val clips from {fr['steps']} measured steps")
    fig.add("b", "branch-frames 12 runs x 30 epochs", fr["arch_s"] / 3600, "h", "extrapolated")
    return frame_layers, finfo


def parser() -> argparse.ArgumentParser:
    p = bench_parser("bench_heads", __doc__, "tiny cache and head: runs in seconds (for the test suite)")
    p.add_argument("--steps", type=int, default=0,
                   help="measured training steps per architecture (default: 300, BRANCH 60; quick: 8)")
    p.add_argument("--val-rows", type=int, default=2048, help="Val clips evaluated per measurement")
    p.add_argument("--test-rows", type=int, default=1024, help="Test clips predicted per measurement")
    p.add_argument("--frame-clips", type=int, default=800, help="Train clips of the frame-level cache")
    p.add_argument("--frame-steps", type=int, default=20, help="measured steps of BRANCH over frames")
    p.add_argument("--frame-stride", type=int, default=4)
    p.add_argument("--max-group-mib", type=float, default=None,
                   help="training-state budget of one joint call in MiB, as `avb heads ablate --max-group-mib` "
                        "(default: the ablation's default; 0: all 12 runs in one call)")
    p.add_argument("--archs", default=",".join(ARCHS),
                   help="architectures to measure, comma-separated (default: all; the grid total needs all)")
    p.add_argument("--skip-frames", action="store_true", help="skip BRANCH over frames (and its frame cache)")
    p.add_argument("--keep", action="store_true", help="keep the generated caches and runs")
    p.add_argument("--device", default="cpu",
                   help="where the heads train, as `avb heads ablate --device` (cpu, cuda, cuda:1, mps; default cpu); "
                        "the machine figures (GEMM rate, bandwidth, lower bounds) stay the CPU's")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    run_benchmark(parser(), run, argv)


if __name__ == "__main__":
    main()
