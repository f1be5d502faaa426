"""(c) The seed paper's way: every run of the grid fine-tunes wav2vec2 end to end, estimated from a measured step.

    python -m tests.benchmarks.bench_e2e            # wav2vec2-base-sized random backbone, batch 8 of 2.5 s clips
    python -m tests.benchmarks.bench_e2e --quick    # the tests' tiny backbone
    python -m tests.benchmarks.bench_e2e --heads-json heads.json   # also print the speedup of (b) over (c)

The measured step is the project's own stage-1 model (`extract.finetune.FinetuneModel`: backbone in train mode
with SpecAugment, masked-mean pooling, a VANILLA head, uniform weighting) with AdamW at the paper's two rates,
on a batch of 8 clips of 2.5 s. An evaluation forward (eval mode, no gradient) is measured too. Then

    one run = 30 x (19,990 x train s/clip + 19,396 x eval s/clip) + 19,815 x eval s/clip   (Test predictions)
    grid    = 36 runs (3 architectures x 4 weightings x 3 seeds)

which leaves out audio decoding and the evaluation metrics, so it is a lower bound for the seed paper's way.
With (b)'s grid time the speedup is printed twice: stage 2 alone against (c), and stage 1 + stage 2 (one
end-to-end fine-tuning run, one dump of all 59,201 clips, then (b)) against (c).
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from tests.benchmarks.bench_common import (
    HUME_SIZES,
    Figures,
    begin,
    bench_parser,
    fmt_duration,
    machine_line,
    random_wav2vec2,
    run_benchmark,
)

EPOCHS = 30
RUNS = 36
BATCH = 8


def run(args: argparse.Namespace) -> Figures:
    import torch
    from transformers.utils import logging as hf_logging

    from extract.backbone import layer_dims, load_backbone
    from extract.finetune import FinetuneModel
    from heads.model.architectures import HeadConfig, build_head
    from heads.model.weighting import build_weighting
    from heads.tasks import AVB
    from tests.benchmarks.bench_common import workdir

    hf_logging.disable_progress_bar()   # the save/load bars of the generated model would bury the figures
    fig, threads = begin("e2e", args.threads)
    with workdir() as tmp:
        random_wav2vec2(tmp / "model", args.quick)
        backbone = load_backbone(tmp / "model")      # SpecAugment p = 0.05 on time and features, as stage 1
    head = build_head(HeadConfig(arch="vanilla", hidden=32 if args.quick else 256), layer_dims(backbone), [0], AVB)
    model = FinetuneModel(backbone, head, build_weighting("uniform", n_runs=1, n_tasks=4))
    optimizer = torch.optim.AdamW([{"params": list(backbone.parameters()), "lr": 1e-5},
                                   {"params": list(head.parameters()), "lr": 1e-3}], weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    samples = int(2.5 * 16000)
    waves = 0.1 * torch.randn(BATCH, samples, generator=g)
    mask = torch.ones(BATCH, samples, dtype=torch.long)
    targets = {name: torch.rand(BATCH, t.label_dim, generator=g) for name, t in zip(AVB.names, AVB) if name != "type"}
    targets["type"] = torch.randint(0, 8, (BATCH, 1), generator=g).float()

    def train_step() -> float:
        t = time.perf_counter()
        model.train()
        loss = model(waves, mask, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        return time.perf_counter() - t

    def eval_step() -> float:
        t = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            model(waves, mask)
        return time.perf_counter() - t

    train_step()   # warm-up (first-call allocations, optimizer state)
    eval_step()
    steps = args.steps or (2 if args.quick else 3)
    train_s = min(train_step() for _ in range(steps)) if args.best else sum(train_step() for _ in range(steps)) / steps
    eval_s = sum(eval_step() for _ in range(steps)) / steps
    n_train, n_val, n_test = HUME_SIZES
    per_clip_train, per_clip_eval = train_s / BATCH, eval_s / BATCH
    one_run = EPOCHS * (n_train * per_clip_train + n_val * per_clip_eval) + n_test * per_clip_eval
    grid = RUNS * one_run
    name = "tiny test backbone" if args.quick else "wav2vec2-base-sized"
    n_params = sum(p.numel() for p in backbone.parameters())
    fig.add("c", "backbone parameters", n_params / 1e6, "M", f"{name}, random weights")
    fig.add("c", "end-to-end train step (batch 8, 2.5 s clips)", train_s, "s", f"mean of {steps} measured steps")
    fig.add("c", "train s per clip", per_clip_train, "s")
    fig.add("c", "eval s per clip", per_clip_eval, "s", "forward in eval mode, batch 8")
    fig.add("c", "one run end to end (30 epochs)", one_run / 3600, "h", "estimated from the measured steps")
    fig.add("c", f"grid end to end ({RUNS} runs)", grid / 3600, "h", f"estimated; {fmt_duration(grid)}")
    fig.add("c", "grid end to end (s)", grid, "s", "estimated")
    if args.heads_json is not None:
        heads = json.loads(Path(args.heads_json).read_text(encoding="utf-8"))["figures"]
        grid_b = heads["full grid wall time (s)"]["value"]
        fig.add("c", "speedup of (b) over (c)", grid / grid_b, "x", "stage-2 grid vs end-to-end grid")
        dump_s = sum(HUME_SIZES) * per_clip_eval * args.dump_ratio
        both = one_run + dump_s + grid_b
        fig.add("c", "speedup of (b) + stage 1 over (c)", grid / both, "x",
                f"one fine-tuning run ({fmt_duration(one_run)}) + dump of {sum(HUME_SIZES)} clips "
                f"({fmt_duration(dump_s)}) + (b) ({fmt_duration(grid_b)})")
    print(machine_line(threads), flush=True)
    return fig


def parser() -> argparse.ArgumentParser:
    p = bench_parser("bench_e2e", __doc__, "tiny backbone: seconds (for the test suite)")
    p.add_argument("--steps", type=int, default=0, help="measured training steps (default 3; quick 2)")
    p.add_argument("--best", action="store_true", help="take the fastest step instead of the mean")
    p.add_argument("--heads-json", type=Path, default=None, help="figures of bench_heads (--json) for the speedup")
    p.add_argument("--dump-ratio", type=float, default=1.05,
                   help="dump time / bare forward time for the stage-1 estimate (default: the goal of (a))")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    run_benchmark(parser(), run, argv)


if __name__ == "__main__":
    main()
