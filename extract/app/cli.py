"""The `avb` command: one click group whose subcommands live beside the code they drive.

Subcommands are imported lazily, so `avb --help` and the light commands (`synth`, `corpus check`, `score`)
start without importing torch or transformers. The root group is the top of the dependency chain
(extract.app -> extract -> heads -> cache), which is why it lives in the application layer.
"""
from __future__ import annotations

import importlib

import click

# name -> ("module:attribute", one-line help shown by `avb --help` without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("extract.synth:synth_command", "Write a generated corpus (A-VB layout, or a corpus.yaml)."),
    "corpus": ("extract.app.corpus_cli:corpus_group", "Validate, describe and summarise a corpus."),
    "score": ("extract.app.score:score_command", "Score submission-format prediction CSVs against corpus labels."),
    "finetune": ("extract.finetune:finetune_command", "Fine-tune a wav2vec2 backbone on the corpus's tasks (stage 1)."),
    "dump": ("extract.dump:dump_command", "Dump per-layer hidden states of a backbone to an HDF5 cache."),
    "cache": ("cache.cli:cache_group", "Inspect HDF5 feature caches."),
    "heads": ("heads.cli:heads_group", "Train heads x loss weightings from a feature cache (stage 2)."),
    "ensemble": ("heads.analysis.ensemble:ensemble_command", "Ensemble runs; write predictions (A-VB: submissions)."),
    "predict": ("extract.app.predict:predict_command", "Predict a trained model's tasks for new audio files."),
    "export": ("extract.serve.export:export_command", "Export a model as ONNX + a Hub-ready folder (model card)."),
    "report": ("heads.analysis.report:report_command", "Plot validation curves, loss weights, probes and results (HTML)."),
    "probe": ("heads.analysis.probe:probe_command", "Linear probes of every cached layer for every task."),
    "demo": ("extract.app.demo:demo_command", "Run the whole pipeline on a generated corpus with a tiny model."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="avb-heads")
def main() -> None:
    """Vocal-burst emotion recognition (A-VB 2022): fine-tune wav2vec2 once, cache its layers,
    then train and ensemble multi-task heads from the cache in minutes."""


if __name__ == "__main__":
    main()
