"""A long recording read window by window (`audio_windows`) against the whole-file decode, side by side.

    python -m tests.benchmarks.bench_long_audio                  # a 10-minute 48 kHz stereo WAV
    python -m tests.benchmarks.bench_long_audio --minutes 60     # an hour (a 690 MB file, ~7 GB whole decode)
    python -m tests.benchmarks.bench_long_audio --quick          # one minute in 5 s blocks, seconds
    python -m tests.benchmarks.bench_long_audio --minutes 60 --predict   # + `avb predict --model-dir --window`

A generated N-minute 16-bit stereo WAV (a gliding tone under noise, written block by block) goes into a fresh
temp folder. Each side then runs in its own child process, so each peak RSS is that side's alone: `windows` runs
`audio_windows(path, 2.5, 1.25)` (30 s blocks), `whole` runs `load_audio(path, max_seconds=inf)` and slices the
same windows out of it, and with --predict, `predict` runs the whole ONNX path (`Predictor.load(export)
.predict([path], window=2.5, hop=1.25)`) on a random model of wav2vec2-base's size (12 layers, 768 wide, a
VANILLA head) exported by `avb export` first. A child reports its peak RSS (VmHWM: since its exec) and its RSS after the
imports, the seconds of the read alone, the number of windows and a checksum of them (the sum of every window's
sum of squares), which must agree between the two sides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.bench_common import REPO, Figures, machine_line, workdir

WINDOW_S, HOP_S = 2.5, 1.25


def _rss_now_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries that across fork + exec, so a
    child of a large parent (the one that built the export) would report the parent's size."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def child(side: str, path: str, block_s: float) -> dict:
    """One side, in a fresh process: the read, timed, and this process's memory."""
    import numpy as np
    import scipy.signal  # noqa: F401 -- imported before the baseline RSS, as the read needs it

    from extract.audio import SAMPLE_RATE, audio_windows, load_audio, window_starts

    baseline = _rss_now_bytes()
    t = time.perf_counter()
    n, checksum = 0, 0.0
    if side == "predict":
        from extract.serve.predictor import Predictor

        predictor = Predictor.load(os.environ["AVB_BENCH_EXPORT"])
        baseline = _rss_now_bytes()     # the model loaded: what the windows add comes on top
        t = time.perf_counter()
        preds = predictor.predict([path], window=WINDOW_S, hop=HOP_S)   # the default batch
        n = len(preds.input_of_window)
        checksum = float(preds.values["type"].sum())
    elif side == "windows":
        for w in audio_windows(path, WINDOW_S, HOP_S, block_s=block_s):
            n += 1
            checksum += float(np.dot(w.wave.astype(np.float64), w.wave))
    else:
        wave = load_audio(path, max_seconds=math.inf)
        window, hop = round(WINDOW_S * SAMPLE_RATE), round(HOP_S * SAMPLE_RATE)
        for start in window_starts(len(wave), window, hop):
            w = wave[start:start + window]
            n += 1
            checksum += float(np.dot(w.astype(np.float64), w))
    seconds = time.perf_counter() - t
    peak = _peak_rss_bytes()
    return {"windows": n, "seconds": seconds, "peak_rss": peak, "baseline_rss": baseline, "checksum": checksum}


def write_recording(path: Path, minutes: float, rate: int, seconds_per_block: float = 10.0) -> int:
    """A `minutes`-long 16-bit stereo WAV, written block by block (bounded memory); returns its frames."""
    import numpy as np
    import soundfile

    n = round(minutes * 60 * rate)
    block = round(seconds_per_block * rate)
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", samplerate=rate, channels=2, subtype="PCM_16", format="WAV") as f:
        for start in range(0, n, block):
            t = np.arange(start, min(start + block, n)) / rate
            tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(2 * np.pi * t / 7)) * t)
            noise = 0.05 * rng.standard_normal((len(t), 2))
            f.write(np.stack([tone, 0.7 * tone], 1) + noise)
    return n


def make_base_export(root: Path) -> Path:
    """A random wav2vec2-base-sized backbone (no download) and a VANILLA head on its last layer, as a run
    folder, exported by `avb export`: what a real model costs in memory, not what it predicts."""
    import torch
    from safetensors.torch import save_file
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from extract.backbone import layer_dims, layer_names
    from extract.serve.export import ExportConfig, export_model
    from heads.model.architectures import build_head
    from heads.runs import RUN_FORMAT
    from heads.tasks import AVB
    from heads.training.joint import TrainConfig

    torch.manual_seed(0)
    backbone = Wav2Vec2Model(Wav2Vec2Config(layerdrop=0.0))
    backbone.save_pretrained(root / "backbone")
    dims = layer_dims(backbone)
    config = TrainConfig(arch="vanilla")
    head = build_head(config.head, dims, [0], AVB)
    run = root / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in head.run_state_dict(0).items()}, str(run / "head.safetensors"))
    attrs = {"layers": layer_names(backbone), "layer_dims": dims, "tasks": AVB.to_json(), "clip_seconds": 2.5,
             "backbone": {"config": json.loads(backbone.config.to_json_string(use_diff=False))}}
    (run / "config.json").write_text(json.dumps({**config.to_dict(), "run_format": RUN_FORMAT,
                                                 "cache_attrs": attrs}))
    export_model(ExportConfig(str(run), str(root / "export"), str(root / "backbone"), progress=False))
    return root / "export"


def run_child(side: str, path: Path, block_s: float) -> dict:
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_long_audio", "--child", side, "--path", str(path),
           "--block", str(block_s)]
    print(f"$ python {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {side} child failed (exit code {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> Figures | None:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.bench_long_audio",
                                description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="a one-minute recording read in 5 s blocks (unless --minutes / --block are given)")
    p.add_argument("--minutes", type=float, default=None, help="length of the recording (default 10; 1 with --quick)")
    p.add_argument("--rate", type=int, default=48000, help="its sample rate (default 48000)")
    p.add_argument("--block", type=float, default=None, help="audio_windows' block_s (default 30; 5 with --quick)")
    p.add_argument("--keep", action="store_true", help="keep the generated WAV")
    p.add_argument("--predict", action="store_true",
                   help="also run avb predict's ONNX path with --window on a wav2vec2-base-sized random export")
    p.add_argument("--child", choices=("windows", "whole", "predict"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.path, 30.0 if args.block is None else args.block)), flush=True)
        return None
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 10.0)
    args.block = args.block if args.block is not None else (5.0 if args.quick else 30.0)
    fig = Figures("long_audio")
    print(machine_line(1), flush=True)
    item = f"{minutes:g} min {args.rate / 1000:g} kHz stereo WAV"
    with workdir(args.keep, prefix="avb-bench-long-audio-") as tmp:
        path = tmp / "long.wav"
        frames = write_recording(path, minutes, args.rate)
        fig.note(f"{path.name}: {frames} frames, {path.stat().st_size / 1e6:.1f} MB on disk; window {WINDOW_S} s, "
                 f"hop {HOP_S} s, blocks of {args.block:g} s")
        result = {side: run_child(side, path, args.block) for side in ("windows", "whole")}
        if args.predict:
            os.environ["AVB_BENCH_EXPORT"] = str(make_base_export(tmp / "model"))
            result["predict"] = run_child("predict", path, args.block)
    win, whole = result["windows"], result["whole"]
    mb = 1 << 20
    fig.add(item, "windows read", win["windows"])
    fig.add(item, "windowed read seconds", win["seconds"], "s")
    fig.add(item, "whole-file decode seconds", whole["seconds"], "s")
    fig.add(item, "windowed peak RSS", win["peak_rss"] / mb, "MiB", f"{win['baseline_rss'] / mb:.0f} MiB after imports")
    fig.add(item, "whole-file peak RSS", whole["peak_rss"] / mb, "MiB",
            f"{whole['baseline_rss'] / mb:.0f} MiB after imports")
    fig.add(item, "peak RSS whole / windowed", whole["peak_rss"] / win["peak_rss"], "x")
    rel = abs(win["checksum"] - whole["checksum"]) / max(abs(whole["checksum"]), 1e-30)
    fig.add(item, "window checksum relative difference", rel, "", "the windows equal the whole decode's slices")
    print(f"\n{'':<24}{'windowed':>12}{'whole file':>12}")
    print(f"{'windows':<24}{win['windows']:>12d}{whole['windows']:>12d}")
    print(f"{'read seconds':<24}{win['seconds']:>12.2f}{whole['seconds']:>12.2f}")
    print(f"{'peak RSS (MiB)':<24}{win['peak_rss'] / mb:>12.0f}{whole['peak_rss'] / mb:>12.0f}")
    print(f"{'RSS after imports (MiB)':<24}{win['baseline_rss'] / mb:>12.0f}{whole['baseline_rss'] / mb:>12.0f}",
          flush=True)
    if "predict" in result:
        pred = result["predict"]
        fig.add(item, "avb predict --window (ONNX, wav2vec2-base size) seconds", pred["seconds"], "s",
                f"{pred['windows']} windows")
        fig.add(item, "avb predict --window peak RSS", pred["peak_rss"] / mb, "MiB",
                f"{pred['baseline_rss'] / mb:.0f} MiB with the model loaded")
        print(f"{'predict peak RSS (MiB)':<24}{pred['peak_rss'] / mb:>12.0f}  ({pred['windows']} windows in "
              f"{pred['seconds']:.0f} s; {pred['baseline_rss'] / mb:.0f} MiB with the model loaded)", flush=True)
    if win["windows"] != whole["windows"] or rel > 1e-9:
        raise SystemExit("the windowed read and the whole-file decode disagree")
    fig.write(args.json)
    return fig


if __name__ == "__main__":
    main()
