"""Every benchmark in one run, then all figures side by side with the goals they are judged by.

    python -m tests.benchmarks.run_all            # full size: ~1.2 GB generated cache, wav2vec2-base-sized models
    python -m tests.benchmarks.run_all --quick    # tiny sizes, well under a minute

Each benchmark runs in its own process (so each peak RSS is its own and a crash names its script) and
writes its figures as JSON; (c) reads (b)'s grid time and (a)'s dump ratio for its speedups. The summary
prints (a) dump ratio, (b) grid wall time and step times, (c) speedup, (d) memory ratio and (e) the grid
against the plain per-run loop against their goals, and the
machine load before and after, since the 2 CPU cores may be shared with other work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tests.benchmarks.bench_common import bench_parser, machine_line

REPO = Path(__file__).resolve().parents[2]
GOALS = (  # (bench, figure, goal text)
    ("dump", "dump time / bare forward time", "(a) goal <= 1.05"),
    ("heads", "full grid wall time", "(b) goal <= 130 min"),
    ("heads", "vanilla ms per step (12 runs jointly, batch 8)", "(b) goal <= 8 ms"),
    ("heads", "chain ms per step (12 runs jointly, batch 8)", "(b) goal <= 8 ms"),
    ("heads", "branch ms per step (12 runs jointly, batch 8)", "(b) goal <= 80 ms"),
    ("e2e", "speedup of (b) over (c)", "(c) reported"),
    ("e2e", "speedup of (b) + stage 1 over (c)", "(c) reported"),
    ("heads", "peak RSS / in-memory cache", "(d) goal <= 2"),
    ("vs_plain", "vanilla speed-up of the grid over the plain loop", "(e) goal >= 8x"),
    ("vs_plain", "branch speed-up of the grid over the plain loop", "(e) goal >= 5x"),
)


def _run(module: str, args: list[str], json_path: Path) -> dict:
    cmd = [sys.executable, "-m", f"tests.benchmarks.{module}", *args, "--json", str(json_path)]
    print(f"\n$ python -m tests.benchmarks.{module} {' '.join(args)}", flush=True)
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise SystemExit(f"tests.benchmarks.{module} failed with exit code {proc.returncode}")
    return json.loads(json_path.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> None:
    args = bench_parser("run_all", __doc__, "every benchmark in its --quick mode",
                        threads="torch intra-op threads for every benchmark",
                        json_help="write all figures to this JSON file").parse_args(argv)
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    print(machine_line(args.threads), flush=True)
    with tempfile.TemporaryDirectory(prefix="avb-bench-all-") as tmp:
        out = Path(tmp)
        results = {"dump": _run("bench_dump", common, out / "dump.json")}
        results["heads"] = _run("bench_heads", common, out / "heads.json")
        ratio = results["dump"]["figures"]["dump time / bare forward time"]["value"]
        results["e2e"] = _run("bench_e2e", common + ["--heads-json", str(out / "heads.json"),
                                                     "--dump-ratio", f"{ratio:.4f}"], out / "e2e.json")
        plain = ["--epochs", "1", "--rounds", "1", "--archs", "vanilla,branch"] if args.quick else []
        results["vs_plain"] = _run("bench_vs_plain", common + plain, out / "vs_plain.json")

    print("\n==== all figures" + (" (quick mode: sizes are tiny, the figures only prove the scripts run)"
                                  if args.quick else ""))
    width = max(len(name) for r in results.values() for name in r["figures"])
    for bench in ("dump", "heads", "e2e", "vs_plain"):
        for name, f in results[bench]["figures"].items():
            value = f["value"]
            text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
            print(f"[{f['item']}] {name:<{width}}  {text:>10} {f['unit']:<8} {f['note']}")
    print("\n==== goals")
    for bench, name, goal in GOALS:
        f = results[bench]["figures"][name]
        print(f"{goal:<22} {name}: {f['value']:.4g} {f['unit']}  {f['note']}")
    print(machine_line(args.threads), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
