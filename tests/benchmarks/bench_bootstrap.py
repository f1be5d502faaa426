"""`avb score --ci 0.95` at Val size: 19,396 clips, all four tasks, 1,000 bootstrap resamples.

    python -m tests.benchmarks.bench_bootstrap            # HUME-VB's Val size
    python -m tests.benchmarks.bench_bootstrap --quick    # 300 clips

A labels-only corpus in the official layout (the label CSVs of `extract.synth`, no audio: scoring never reads
it) and one official prediction file per task are written to the temp dir; then the `avb score` command runs
in this process, alternately without and with `--ci 0.95` (`--repeat` times each, the best kept). The figures:
both wall times, and the intervals alone (`heads.analysis.bootstrap.score_intervals` on what the command scores).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.benchmarks.bench_common import (
    HUME_SIZES,
    Figures,
    bench_parser,
    machine_line,
    workdir,
)


def write_labels_only_corpus(root: Path, n_val: int, seed: int = 0) -> list[str]:
    """labels/*.csv for a Val split of n_val clips (and 8 Train clips); returns the Val ids."""
    from extract.synth import Clip, label_tables
    from heads.tasks import AVB, COUNTRIES, TYPE_CLASSES

    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n_val + 8):
        high = rng.random(10)
        clips.append(Clip(clip_id=f"{i:05d}", split="Val" if i < n_val else "Train",
                          voc_type=TYPE_CLASSES[i % 8], country=COUNTRIES[i % 4], seconds=1.0, latent=np.zeros(4),
                          high=high / high.max(), two=rng.random(2), culture=rng.random(len(AVB["culture"].columns))))
    (root / "labels").mkdir(parents=True)
    for name, text in label_tables(clips).items():
        (root / "labels" / name).write_text(text, encoding="utf-8")
    return [c.clip_id for c in clips[:n_val]]


def write_predictions(folder: Path, ids: list[str], seed: int = 1) -> list[Path]:
    from heads.submission import PROBS_FILE
    from heads.submission import write_predictions as write_files
    from heads.tasks import AVB

    rng = np.random.default_rng(seed)
    preds = {t.name: rng.random((len(ids), 8 if t.is_classification else len(t.columns))) for t in AVB}
    return [p for p in write_files(folder, AVB, ids, preds, team="bench", number=1) if p.name != PROBS_FILE]


def main(argv: Sequence[str] | None = None) -> None:
    from click.testing import CliRunner

    from extract.app.cli import main as avb

    p = bench_parser("bench_bootstrap", __doc__, "300 Val clips (checks the script, not the figure)", threads=None,
                     json_help="write the figures to this JSON file")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command (the best is reported)")
    args = p.parse_args(argv)
    print(machine_line(1), flush=True)
    figs = Figures("bootstrap")
    n_val = 300 if args.quick else HUME_SIZES[1]
    with workdir() as tmp:
        ids = write_labels_only_corpus(tmp / "corpus", n_val)
        files = [str(f) for f in write_predictions(tmp / "pred", ids)]
        times: dict[str, float] = {}
        for _ in range(args.repeat):     # alternated, best of each: the machine may be shared
            for label, extra in (("without --ci", []), ("with --ci 0.95", ["--ci", "0.95"])):
                start = time.perf_counter()
                result = CliRunner().invoke(avb, ["score", "--corpus", str(tmp / "corpus"), "--json", *extra, *files])
                times[label] = min(times.get(label, float("inf")), time.perf_counter() - start)
                if result.exit_code != 0:
                    raise SystemExit(result.output)
        for label, seconds in times.items():
            figs.add("s", f"avb score {label}", seconds, "s", f"{n_val} Val clips, 4 tasks, best of {args.repeat}")
        # the intervals alone, on exactly what the command scores (best of --repeat)
        from extract.app.score import read_split_predictions
        from extract.corpus import read_corpus
        from heads.analysis.bootstrap import BootstrapConfig, score_intervals
        from heads.tasks import AVB

        labels, preds = read_split_predictions(read_corpus(tmp / "corpus"), "Val", [Path(f) for f in files])
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            score_intervals(AVB, labels, preds, BootstrapConfig(level=0.95, n_boot=1000))
            best = min(best, time.perf_counter() - start)
        figs.add("s", "bootstrap intervals alone (1000 resamples, 4 tasks)", best, "s", f"best of {args.repeat}")
    print(machine_line(1), flush=True)
    figs.write(args.json)


if __name__ == "__main__":
    main()
