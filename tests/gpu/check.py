"""The GPU check: every path that runs differently on a GPU, in one run of a few minutes, with a JSON summary.

    bash tests/gpu/check.sh                               # on a CUDA machine with the project installed
    python -m tests.gpu.check --device cpu --quick        # the dry run on any machine: tiny sizes, checks the script

No download: the corpus is generated (`avb synth`) and the backbone is a random wav2vec2 of wav2vec2-base's
architecture (a tiny one with --quick). Each step is timed; a failing step is recorded with its error and the
next steps still run; the exit code is 1 when any step failed. The summary (`--out`/summary.json, also printed)
holds every figure the README's "GPU check" table quotes.

1. heads: VANILLA, CHAIN and BRANCH x uniform and DRUW (6 runs in joint groups, 4 epochs) on a generated signal
   cache, on the CPU (the reference) and on DEVICE in fp32 and in bf16 autocast; each run's Val scores against
   the CPU's (kernels differ and training amplifies rounding: fp32 within 5e-3, bf16 within 5e-2 on each score).
   Then, on DEVICE, CHAIN runs with uniform, FAMO and RLW weighting in one stack whose RLW run leaves it after
   epoch 1 (a pruned search trial): the kept runs against each trained alone (within 1e-4 on each score).
2. grid step time at wav2vec2-base widths: `tests.benchmarks.bench_heads --device DEVICE --skip-frames` on its
   HUME-VB-sized pooled cache (ms per 12-run step per architecture, the extrapolated 36-run x 30-epoch grid).
3. fine-tuning: one epoch of `accelerate launch -m extract.finetune` with bf16 mixed precision (fp32 on the CPU)
   on the generated corpus; wall time, steps, steps/s, finite losses; then the same epoch reading the
   decoded-audio store (`avb corpus decode`) instead of the WAVs: its steps/s and the speed-up.
4. the dump of the fine-tuned backbone (`accelerate launch -m extract.dump`) on DEVICE: clips/s; the pooled
   features against a CPU dump of the same clips (largest absolute and relative difference).
5. `avb predict --device DEVICE` against `--device cpu` on the same files with a head run trained on the dump:
   the largest difference of any probability or value.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import accelerate_command, make_signal_cache

REPO = Path(__file__).resolve().parents[2]
HEADS_TOL = {"fp32": 5e-3, "bf16": 5e-2}       # largest |score difference| against the CPU's, per precision
DUMP_REL_TOL = 2e-2                            # relative difference of pooled features, GPU fp32 vs CPU


def _env(cpu_only: bool = False) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(cmd: list[str], log: Path, *, cpu_only: bool = False, timeout: int = 600) -> float:
    """Run a command, its output to `log`; the wall seconds. A failure raises with the log's last lines."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(cpu_only), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:6])} ...\n{tail}")
    return seconds


def _max_diff(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ steps

def check_heads(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    from cache.reader import load_cache
    from heads.model.architectures import HeadConfig
    from heads.tasks import AVB
    from heads.training.joint import TrainConfig, train_runs

    device, work = ctx["device"], ctx["work"]
    sizes = (240, 120, 40) if ctx["quick"] else (4000, 1000, 400)
    cache = load_cache(make_signal_cache(work / "signal.h5", sizes=sizes))
    head = HeadConfig(hidden=32 if ctx["quick"] else 256, n_heads=4, branch_blocks=2)
    out: dict[str, Any] = {"clips": sum(sizes), "runs": 6, "epochs": 4}
    scores: dict[str, list[dict[str, float]]] = {}
    for name, dev, precision in (("cpu", torch.device("cpu"), "fp32"), ("fp32", device, "fp32"),
                                 ("bf16", device, "bf16")):
        start, metrics = time.perf_counter(), []
        for arch in ("vanilla", "chain", "branch"):        # one joint group per architecture, as the grid does
            configs = [TrainConfig(arch=arch, weighting=w, seed=0, epochs=4, head=head, precision=precision)
                       for w in ("uniform", "druw")]
            metrics += train_runs(cache, configs, [work / f"heads-{name}" / c.name for c in configs], device=dev,
                                  progress=False)
        out[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        scores[name] = [{k: m[k] for k in (*AVB.metric_keys, "mean")} for m in metrics]
    ok = True
    for name in ("fp32", "bf16"):
        worst = max(_max_diff(a, b) for a, b in zip(scores["cpu"], scores[name]))
        out[f"{name}_max_score_diff_vs_cpu"] = worst
        out[f"{name}_tolerance"] = HEADS_TOL[name]
        ok &= worst <= HEADS_TOL[name]
    out["ok"] = bool(ok)
    return out


def check_pruned_stack(ctx: dict[str, Any]) -> dict[str, Any]:
    """On DEVICE: a stack of uniform, FAMO (its forward after each step) and RLW runs whose RLW run is dropped
    after epoch 1, as a search drops a pruned trial; the two kept runs against each trained alone there."""
    from cache.reader import load_cache
    from heads.model.architectures import HeadConfig
    from heads.tasks import AVB
    from heads.training.joint import TrainConfig, train_runs

    device, work = ctx["device"], ctx["work"]
    sizes = (240, 120, 40) if ctx["quick"] else (4000, 1000, 400)
    cache = load_cache(make_signal_cache(work / "pruned.h5", sizes=sizes))
    head = HeadConfig(hidden=32 if ctx["quick"] else 256, dropout=0.2)
    configs = [TrainConfig(arch="chain", weighting=w, seed=s, epochs=3, head=head)
               for s, w in enumerate(("uniform", "famo", "rlw"))]
    joint = train_runs(cache, configs, [work / "pruned" / c.name for c in configs], device=device, progress=False,
                       drop=lambda epoch: {configs[2].name} if epoch == 1 else set())
    worst = 0.0
    for cfg, together in zip(configs[:2], joint):
        alone = train_runs(cache, [cfg], [work / "alone" / cfg.name], device=device, progress=False)[0]
        worst = max(worst, _max_diff({k: together[k] for k in (*AVB.metric_keys, "mean")},
                                     {k: alone[k] for k in (*AVB.metric_keys, "mean")}))
    return {"dropped_is_none": joint[2] is None, "max_score_diff_vs_alone": worst, "tolerance": 1e-4,
            "ok": joint[2] is None and worst <= 1e-4}


def check_grid_step(ctx: dict[str, Any]) -> dict[str, Any]:
    figures = ctx["work"] / "bench_heads.json"
    cmd = [sys.executable, "-m", "tests.benchmarks.bench_heads", "--device", ctx["device_name"], "--skip-frames",
           "--json", str(figures)]
    cmd += ["--quick"] if ctx["quick"] else ["--steps", "100", "--val-rows", "1024", "--test-rows", "512"]
    seconds = _run(cmd, ctx["work"] / "bench_heads.log")
    wanted = ("ms per step", "full grid wall time", "s per epoch")
    picked = {name: [f["value"], f["unit"]] for name, f in json.loads(figures.read_text())["figures"].items()
              if any(w in name for w in wanted)}
    return {"seconds": round(seconds, 1), "figures": picked, "ok": bool(picked)}


def check_finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    from tests.benchmarks.bench_common import random_wav2vec2

    work = ctx["work"]
    corpus = work / "corpus"
    clips = "48" if ctx["quick"] else "240"
    _run([sys.executable, "-m", "extract.app.cli", "synth", str(corpus), "--clips", clips, "--max-seconds", "4",
          "--seed", "3", "--quiet"], work / "synth.log")
    model = random_wav2vec2(work / "pretrained", ctx["quick"])
    precision = "bf16" if ctx["cuda"] else "no"
    ft = work / "ft"
    seconds = _run(accelerate_command("extract.finetune", 1, precision) + [
        "--quiet", "--corpus", str(corpus), "--model", str(model), "--out", str(ft), "--epochs", "1",
        "--batch-size", "8", "--eval-batch-size", "16", "--mixed-precision", precision],
        work / "finetune.log", cpu_only=not ctx["cuda"])
    metrics = json.loads((ft / "metrics.json").read_text())
    steps = metrics["history"][-1]["step"]
    finite = all(math.isfinite(h["loss"]) for h in metrics["history"])
    ctx["corpus"], ctx["ft"] = corpus, ft
    # the same epoch reading the decoded-audio store (avb corpus decode) instead of decoding the WAVs
    _run([sys.executable, "-m", "extract.app.cli", "corpus", "decode", "--corpus", str(corpus), "--no-progress"],
         work / "decode.log")
    store_seconds = _run(accelerate_command("extract.finetune", 1, precision) + [
        "--quiet", "--corpus", str(corpus), "--model", str(model), "--out", str(work / "ft-store"), "--epochs", "1",
        "--batch-size", "8", "--eval-batch-size", "16", "--mixed-precision", precision],
        work / "finetune-store.log", cpu_only=not ctx["cuda"])
    (corpus / "audio-16k.h5").unlink()      # the later steps read the WAVs, as before
    return {"precision": precision, "clips": int(clips), "steps": steps, "wall_seconds": round(seconds, 1),
            "steps_per_s_with_startup": round(steps / seconds, 3),
            "store_wall_seconds": round(store_seconds, 1),
            "store_steps_per_s_with_startup": round(steps / store_seconds, 3),
            "store_speedup": round(seconds / store_seconds, 3), "finite_losses": finite, "ok": finite}


def check_dump(ctx: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from cache.reader import load_cache

    work, backbone = ctx["work"], ctx["ft"] / "backbone"
    runs = {}
    for name, cpu_only in (("device", not ctx["cuda"]), ("cpu", True)):
        out = work / f"dump-{name}.h5"
        seconds = _run(accelerate_command("extract.dump", 1) + [
            "--quiet", "--corpus", str(ctx["corpus"]), "--model", str(backbone), "--out", str(out),
            "--batch-size", "16"], work / f"dump-{name}.log", cpu_only=cpu_only)
        runs[name] = (load_cache(out), seconds)
    gpu, cpu = runs["device"][0], runs["cpu"][0]
    worst_abs = worst_rel = 0.0
    for layer in cpu.layer_dims:
        a = np.asarray(gpu.pooled[layer], dtype=np.float64)
        b = np.asarray(cpu.pooled[layer], dtype=np.float64)
        worst_abs = max(worst_abs, float(np.abs(a - b).max()))
        worst_rel = max(worst_rel, float((np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))))
    ctx["cache"] = work / "dump-device.h5"
    n = len(cpu)
    return {"clips": n, "device_seconds": round(runs["device"][1], 1), "cpu_seconds": round(runs["cpu"][1], 1),
            "device_clips_per_s_with_startup": round(n / runs["device"][1], 1),
            "max_abs_diff_vs_cpu": worst_abs, "max_rel_diff_vs_cpu": worst_rel, "rel_tolerance": DUMP_REL_TOL,
            "ok": worst_rel <= DUMP_REL_TOL}


def check_predict(ctx: dict[str, Any]) -> dict[str, Any]:
    from cache.reader import load_cache
    from extract.corpus import AUDIO_DIR
    from heads.model.architectures import HeadConfig
    from heads.training.joint import TrainConfig, train_runs

    work = ctx["work"]
    run = work / "head-run"
    train_runs(load_cache(ctx["cache"]), [TrainConfig(arch="chain", weighting="druw", epochs=2,
                                                      head=HeadConfig(hidden=64))], [run], progress=False)
    wavs = sorted(ctx["corpus"].joinpath(*AUDIO_DIR).glob("*.wav"))[:16]
    tables = {}
    for name, device in (("device", ctx["device_name"]), ("cpu", "cpu")):
        out = work / f"predict-{name}.csv"
        _run([sys.executable, "-m", "extract.app.cli", "predict", *map(str, wavs), "--model",
              str(ctx["ft"] / "backbone"), "--heads", str(run), "--device", device, "--out", str(out), "--quiet"],
             work / f"predict-{name}.log")
        with open(out, newline="") as fh:
            tables[name] = list(csv.DictReader(fh))
    worst = 0.0
    for row_d, row_c in zip(tables["device"], tables["cpu"]):
        for key, value in row_c.items():
            if key != "path" and not key.endswith("_class"):
                try:
                    worst = max(worst, abs(float(row_d[key]) - float(value)))
                except ValueError:
                    continue
    return {"files": len(wavs), "rows": len(tables["device"]), "max_abs_diff_vs_cpu": worst,
            "tolerance": 1e-2, "ok": len(tables["device"]) == len(wavs) and worst <= 1e-2}


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "heads": check_heads, "pruned_stack": check_pruned_stack, "grid_step": check_grid_step,
    "finetune": check_finetune, "dump": check_dump,
    "predict": check_predict,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device under test (default cuda; cpu for a dry run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of the script itself")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for summary.json and the logs")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = p.parse_args(argv)
    import torch

    from heads.training.device import resolve_device

    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "device": str(device), "quick": args.quick, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avb-gpu-check-") as tmp:
        ctx = {"device": device, "device_name": args.device, "cuda": device.type == "cuda", "quick": args.quick,
               "work": Path(tmp)}
        for name in [s.strip() for s in args.steps.split(",") if s.strip()]:
            t = time.perf_counter()
            print(f"--- {name}", flush=True)
            try:
                result = STEPS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others' figures
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            result["step_seconds"] = round(time.perf_counter() - t, 1)
            summary["steps"][name] = result
            print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, indent=1), flush=True)
            for log in Path(tmp).glob("*.log"):      # the logs come back with the summary
                (args.out / log.name).write_bytes(log.read_bytes())
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    summary["ok"] = all(s.get("ok") for s in summary["steps"].values())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"summary: {args.out / 'summary.json'}  ok={summary['ok']}  {summary['total_seconds']} s", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
