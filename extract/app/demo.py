"""`avb demo`: the whole pipeline on a generated corpus with a small random wav2vec2 -- no download, minutes on a CPU.

It is the embedded default that proves an install: every stage a real A-VB study runs, in order, through the
same Python entry points the commands use, with nothing fetched from the network:

    1 synth      generated corpus in the official layout          DIR/corpus
    2 backbone   random wav2vec2 from a Wav2Vec2Config             DIR/pretrained (save_pretrained)
    3 finetune   end-to-end fine-tuning, best epoch kept           DIR/finetune/backbone
    4 dump       per-layer pooled states of every clip             DIR/cache.h5
    5 ablation   3 heads x 4 loss weightings (Table I)             DIR/ablation/results.md
    6 ensemble   the paper's "combined" submission (Table II)      DIR/ensemble/A-VB-*.csv
    7 report     figures and index.html (needs matplotlib)         DIR/report/index.html
    8 predict    `avb predict` on a few corpus wavs                DIR/predict/predictions.csv

Resumable: each stage writes DIR/.stages/<stage>.json when it starts and marks it done (with its output files)
when they are complete. A rerun skips done stages whose settings (theirs and every earlier stage's) are
unchanged and whose outputs exist; it resumes an interrupted stage with the same settings (fine-tuning from its
checkpoint, the dump from its shards, the ablation from its finished runs); any other stage, and every stage
after one that ran, is redone from scratch after its output is deleted.

The random backbone is not pre-trained, so its fine-tuning uses a backbone learning rate of 1e-4 instead of the
paper's 1e-5 (which is tuned for moving a pre-trained model a little). Scores on the generated corpus say that
the pipeline works end to end, not what HUME-VB would give.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from cache.command_kit.atomic import write_json_atomic, written_via
from cache.command_kit.command import command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.jsonable import jsonable
from cache.command_kit.lock import LOCK_NAME, hold_output
from cache.command_kit.options import progress_option
from heads.runs import (
    BACKBONE_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RESULTS_MD,
    read_json_object,
)

STAGES_DIR = ".stages"
MARKER = "demo.json"

# The demo backbone: wav2vec2's overall CNN stride (320 samples = 20 ms per frame, 124 frames per 2.5 s clip)
# with three narrow conv layers, and a 4-layer, 64-d transformer -- small enough for a 2-core CPU.
DEMO_BACKBONE: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
    conv_dim=(32, 32, 32), conv_kernel=(10, 8, 4), conv_stride=(5, 8, 8),
    num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=8, layerdrop=0.0,
)
# --quick: the tests' tiny backbone (2 layers, 32-d).
QUICK_BACKBONE: dict[str, Any] = {**DEMO_BACKBONE, "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64, "conv_dim": (16, 16, 16),
                                  "num_conv_pos_embeddings": 8}


class DemoError(AvbError):
    """An output folder the demo cannot use, or a stage that failed; one line for the user."""


@dataclass
class DemoConfig:
    """Demo settings; the defaults run in about 3-4 minutes on a 2-core laptop CPU (printed per stage)."""

    out: str = "avb-demo"
    clips: int = 240
    max_seconds: float = 4.0
    seed: int = 0
    backbone: dict[str, Any] = field(default_factory=lambda: dict(DEMO_BACKBONE))
    finetune_epochs: int = 3
    finetune_lr_backbone: float = 1e-4
    epochs: int = 20                 # head epochs in the ablation
    head_hidden: int = 256           # the paper's head width
    head_n_heads: int = 8
    predict_files: int = 5

    @classmethod
    def quick(cls, out: str) -> DemoConfig:
        """A much smaller run (used by the tests): ~20-40 s on a 2-core CPU."""
        return cls(out=out, clips=48, max_seconds=2.0, backbone=dict(QUICK_BACKBONE), finetune_epochs=1,
                   epochs=3, head_hidden=32, head_n_heads=4, predict_files=3)

    def validate(self) -> None:
        if self.clips < 30:
            raise DemoError(f"--clips must be at least 30 (fine-tuning needs a batch of 8 labelled Train clips and "
                            f"every split all 8 types), got {self.clips}")
        for name in ("finetune_epochs", "epochs", "predict_files"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------------- paths

@dataclass
class DemoPaths:
    root: Path

    corpus = property(lambda self: self.root / "corpus")
    pretrained = property(lambda self: self.root / "pretrained")
    finetune = property(lambda self: self.root / "finetune")
    backbone = property(lambda self: self.root / "finetune" / BACKBONE_DIR)
    cache = property(lambda self: self.root / "cache.h5")
    ablation = property(lambda self: self.root / "ablation")
    ensemble = property(lambda self: self.root / "ensemble")
    report = property(lambda self: self.root / "report")
    predict = property(lambda self: self.root / "predict")
    predictions = property(lambda self: self.root / "predict" / "predictions.csv")


# ------------------------------------------------------------------------------------------------ stages

def stage_synth(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from extract.synth import summary_line, synthesize_corpus  # noqa: PLC0415

    synthesize_corpus(p.corpus, cfg.clips, cfg.seed, max_seconds=cfg.max_seconds, progress=progress)
    click.echo(summary_line(p.corpus))
    return [p.corpus / "labels" / "type_info.csv"]


def stage_backbone(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    import torch  # noqa: PLC0415
    from transformers import Wav2Vec2Config, Wav2Vec2Model  # noqa: PLC0415

    from extract.finetune import state_bytes  # noqa: PLC0415

    torch.manual_seed(cfg.seed)
    model = Wav2Vec2Model(Wav2Vec2Config(**cfg.backbone))
    tmp = p.root / ".pretrained.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with written_via(tmp, p.pretrained, state_bytes(model)):
        model.save_pretrained(tmp)
    tmp.rename(p.pretrained)   # the folder appears complete or not at all
    n = sum(t.numel() for t in model.parameters())
    click.echo(f"random wav2vec2: {cfg.backbone['num_hidden_layers']} layers x {cfg.backbone['hidden_size']}-d, "
               f"CNN {list(cfg.backbone['conv_dim'])}, {n / 1e3:.0f}k parameters -> {p.pretrained}")
    return [p.pretrained / CONFIG_FILE]


def stage_finetune(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from extract.finetune import FinetuneConfig, run_finetune  # noqa: PLC0415

    ft = FinetuneConfig(corpus=str(p.corpus), model=str(p.pretrained), out=str(p.finetune),
                        epochs=cfg.finetune_epochs, lr_backbone=cfg.finetune_lr_backbone, seed=cfg.seed,
                        resume=resume)
    metrics = run_finetune(ft, progress=progress)
    best = metrics.get("best") or {}
    if best:
        click.echo(f"best epoch {best['epoch']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in best.get("val", {}).items() if isinstance(v, (int, float))))
    return [p.backbone / CONFIG_FILE]


def stage_dump(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from extract.dump import DumpConfig, run_dump  # noqa: PLC0415

    run_dump(DumpConfig(corpus=str(p.corpus), model=str(p.backbone), out=str(p.cache)), progress=progress)
    return [p.cache]


def stage_ablation(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from heads.model.architectures import HeadConfig  # noqa: PLC0415
    from heads.training.grid import GridConfig, run_grid  # noqa: PLC0415
    from heads.training.joint import TrainConfig  # noqa: PLC0415

    head = HeadConfig(hidden=cfg.head_hidden, n_heads=cfg.head_n_heads)
    grid = GridConfig(cache=str(p.cache), seeds=(cfg.seed,), run=TrainConfig(epochs=cfg.epochs, head=head))
    run_grid(grid, p.ablation.resolve(), progress=progress)
    return [p.ablation / RESULTS_MD]


def stage_ensemble(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from heads.analysis.ensemble import EnsembleConfig, build_ensemble, format_table  # noqa: PLC0415

    # Absolute run paths in members.json, so `avb predict --heads DIR/ensemble` works from any folder.
    result = build_ensemble([p.ablation.resolve()], p.ensemble, EnsembleConfig(strategy="combined"))
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(format_table(result))
    return [p.ensemble / METRICS_FILE] + submission_files(p)


def stage_report(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("matplotlib") is None:
        click.echo("skipped: matplotlib is not installed (pip install 'avb-heads[plot]' for the figures)")
        return []
    from heads.analysis.report import make_report  # noqa: PLC0415

    files, warnings = make_report([p.ablation, p.ensemble], p.report)
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)
    click.echo(f"{len(files)} files in {p.report}")
    return [p.report / "index.html"]


def stage_predict(cfg: DemoConfig, p: DemoPaths, progress: bool, resume: bool) -> list[Path]:
    from extract.app.predict import write_predictions  # noqa: PLC0415
    from extract.serve.predictor import Predictor  # noqa: PLC0415

    wavs = sorted((p.corpus / "audio" / "wav").glob("*.wav"))[: cfg.predict_files]
    predictor = Predictor.load(p.ensemble, model=p.backbone, device="auto", progress=progress)
    preds = predictor.predict(wavs, progress=progress)
    write_predictions(p.predictions, preds)
    click.echo(f"avb predict --model {p.backbone} --heads {p.ensemble} --out {p.predictions} "
               f"<{len(wavs)} wavs>")
    for path, name, two in zip(preds.names, preds.class_names("type"), preds.values["two"]):
        click.echo(f"  {Path(path).name}: {name:<7} valence {two[0]:.3f} arousal {two[1]:.3f}")
    return [p.predictions]


def submission_files(p: DemoPaths) -> list[Path]:
    from heads.submission import submission_name  # noqa: PLC0415
    from heads.tasks import AVB  # noqa: PLC0415  (the demo's corpus is a generated A-VB corpus)

    return [p.ensemble / submission_name(task, "avb", 1) for task in AVB]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    run: Callable[[DemoConfig, DemoPaths, bool, bool], list[Path]]
    output: Callable[[DemoPaths], Path]          # deleted before the stage is redone from scratch
    settings: Callable[[DemoConfig], dict[str, Any]]


STAGES: tuple[Stage, ...] = (
    Stage("synth", "generate the corpus", stage_synth, lambda p: p.corpus,
          lambda c: {"clips": c.clips, "max_seconds": c.max_seconds, "seed": c.seed}),
    Stage("backbone", "build a random wav2vec2 (no download)", stage_backbone, lambda p: p.pretrained,
          lambda c: {"backbone": c.backbone, "seed": c.seed}),
    Stage("finetune", "fine-tune it end to end on the four tasks", stage_finetune, lambda p: p.finetune,
          lambda c: {"epochs": c.finetune_epochs, "lr_backbone": c.finetune_lr_backbone}),
    Stage("dump", "dump per-layer pooled states to the HDF5 cache", stage_dump, lambda p: p.cache,
          lambda c: {}),
    Stage("ablation", "train 3 heads x 4 loss weightings (Table I)", stage_ablation, lambda p: p.ablation,
          lambda c: {"epochs": c.epochs, "hidden": c.head_hidden, "n_heads": c.head_n_heads}),
    Stage("ensemble", "combined ensemble and submission files (Table II)", stage_ensemble, lambda p: p.ensemble,
          lambda c: {"strategy": "combined"}),
    Stage("report", "figures and index.html", stage_report, lambda p: p.report, lambda c: {}),
    Stage("predict", "avb predict on new audio", stage_predict, lambda p: p.predict,
          lambda c: {"files": c.predict_files}),
)


# ------------------------------------------------------------------------------------------------ driver

def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prepare_out(root: Path) -> None:
    """Refuse to scatter demo outputs over a folder that holds something else."""
    if root.exists() and not root.is_dir():
        raise DemoError(f"--out {root} exists and is not a directory")
    if root.is_dir() and any(p.name != LOCK_NAME for p in root.iterdir()) and not (root / MARKER).is_file():
        raise DemoError(f"--out {root} is not empty and holds no {MARKER}; choose a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)


@dataclass
class StageResult:
    name: str
    seconds: float
    skipped: bool


def run_demo(cfg: DemoConfig, *, progress: bool = True) -> list[StageResult]:
    """Run (or resume) every stage; returns each stage's elapsed time (0 and skipped=True when already done)."""
    cfg.validate()
    paths = DemoPaths(Path(cfg.out))
    prepare_out(paths.root)
    with hold_output(paths.root):   # a second demo on the same folder stops at once
        return _run_stages(cfg, paths, progress)


def _run_stages(cfg: DemoConfig, paths: DemoPaths, progress: bool) -> list[StageResult]:
    write_json_atomic(paths.root / MARKER, {"config": asdict(cfg)})
    upstream: dict[str, Any] = {}
    redo_rest = False
    results: list[StageResult] = []
    for i, stage in enumerate(STAGES, start=1):
        upstream = {**upstream, stage.name: jsonable(stage.settings(cfg))}
        stamp_path = paths.root / STAGES_DIR / f"{stage.name}.json"
        stamp = _read_stamp(stamp_path)
        same = stamp is not None and stamp.get("settings") == upstream
        outputs_ok = same and all(Path(f).exists() for f in stamp.get("outputs", []))
        click.echo(f"\n=== [{i}/{len(STAGES)}] {stage.name}: {stage.title} ===")
        if same and stamp.get("done") and outputs_ok and not redo_rest:
            click.echo(f"done in an earlier run ({stamp.get('seconds', 0):.1f} s); skipped")
            results.append(StageResult(stage.name, 0.0, True))
            continue
        # Resume only a stage that was interrupted under the same settings, after unchanged earlier stages;
        # anything else starts from an empty output. Once a stage runs, every later one is redone.
        resume = same and not stamp.get("done") and not redo_rest
        if not resume:
            _remove(stage.output(paths))
        redo_rest = True
        write_json_atomic(stamp_path, {"settings": upstream, "done": False})
        start = time.perf_counter()
        outputs = stage.run(cfg, paths, progress, resume)
        seconds = time.perf_counter() - start
        write_json_atomic(stamp_path, {"settings": upstream, "done": True, "seconds": seconds,
                                       "outputs": [str(f) for f in outputs]})
        click.echo(f"--- {stage.name}: {seconds:.1f} s")
        results.append(StageResult(stage.name, seconds, False))
    return results


def summary(cfg: DemoConfig, results: list[StageResult], total: float) -> str:
    """The closing text: Table I, the ensemble row, the outputs and the time per stage."""
    from heads.tasks import AVB  # noqa: PLC0415

    p = DemoPaths(Path(cfg.out))
    lines = ["", "=== results (validation split of the generated corpus) ===", "",
             (p.ablation / RESULTS_MD).read_text(encoding="utf-8").rstrip(), ""]
    metrics = read_json_object(p.ensemble / METRICS_FILE)
    keys = [*AVB.headline_keys.values(), "mean"]
    lines += ["combined ensemble (Table II): " + "  ".join(f"{k} {metrics[k]:.4f}" for k in keys), "",
              "outputs:",
              f"  corpus            {p.corpus}",
              f"  random backbone   {p.pretrained}",
              f"  fine-tuned        {p.backbone}",
              f"  feature cache     {p.cache}",
              f"  ablation          {p.ablation / 'results.md'} (+ results.csv, results.json, one folder per run)",
              f"  ensemble          {p.ensemble} ({', '.join(f.name for f in submission_files(p))})"]
    index = p.report / "index.html"
    lines.append(f"  report            {index if index.exists() else '(skipped: matplotlib not installed)'}")
    lines += [f"  predictions       {p.predictions}", "", "time per stage:"]
    lines += [f"  {r.name:<9} {'skipped (done earlier)' if r.skipped else f'{r.seconds:6.1f} s'}" for r in results]
    lines.append(f"  total     {total:6.1f} s")
    return "\n".join(lines)


@click.command("demo")
@click.option("--out", default=DemoConfig.out, show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for every output (a rerun resumes it).")
@click.option("--clips", type=int, default=None, help=f"Corpus size [default: {DemoConfig.clips}, --quick 48].")
@click.option("--epochs", type=int, default=None,
              help=f"Head epochs in the ablation [default: {DemoConfig.epochs}, --quick 3].")
@click.option("--finetune-epochs", type=int, default=None,
              help=f"Backbone fine-tuning epochs [default: {DemoConfig.finetune_epochs}, --quick 1].")
@click.option("--seed", type=int, default=DemoConfig.seed, show_default=True, help="Corpus, backbone and head seed.")
@click.option("--quick", is_flag=True, help="A much smaller version (tiny backbone, 48 clips, few epochs): ~20-40 s.")
@progress_option()
def demo_command(out: Path, clips: int | None, epochs: int | None, finetune_epochs: int | None, seed: int,
                 quick: bool, progress: bool) -> None:
    """Run the whole pipeline on a generated corpus with a small random wav2vec2 (no download): synth,
    fine-tune, dump, 3 x 4 ablation, combined ensemble, report and predict."""
    cfg = DemoConfig.quick(str(out)) if quick else DemoConfig(out=str(out))
    cfg.seed = seed
    for name, value in (("clips", clips), ("epochs", epochs), ("finetune_epochs", finetune_epochs)):
        if value is not None:
            setattr(cfg, name, value)
    click.echo(f"avb demo{' --quick' if quick else ''}: {cfg.clips} clips, fine-tuning {cfg.finetune_epochs} "
               f"epoch(s), heads {cfg.epochs} epochs -> {out}")
    from extract.backbone import hf_progress_bars  # noqa: PLC0415

    start = time.perf_counter()
    with command_errors():  # DemoError, every stage's own one-line errors, write errors, SIGINT/SIGTERM
        with hf_progress_bars(False):  # sub-second weight loads/saves: their bars would only bury the stages
            results = run_demo(cfg, progress=progress)
        click.echo(summary(cfg, results, time.perf_counter() - start))
