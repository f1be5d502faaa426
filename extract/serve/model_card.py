"""The README.md of an exported folder: a model card in the Hugging Face Hub format.

YAML front matter (license, tags, metrics, base model), then what the model predicts, its Val scores with
bootstrap intervals (recomputed from the source's Val predictions and its cache's labels, the way `avb
heads ablate` computes them), the training configuration, a short example that needs numpy, soundfile and
onnxruntime only (tested by running it), intended use and limitations.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cache.command_kit.errors import AvbError
from heads.runs import FINETUNE, METRICS_FILE, predictions_dir, read_json_object
from heads.tasks import TaskSet

# The example of the card; {clip_seconds} is the only placeholder. Kept under 25 lines (tested).
EXAMPLE = '''\
import json

import numpy as np
import onnxruntime as ort
import soundfile as sf

config = json.load(open("config.json"))
session = ort.InferenceSession("model.onnx")
wave, rate = sf.read("clip.wav", dtype="float32", always_2d=True)
wave = wave.mean(axis=1)                                # mono
if rate != 16000:                                       # avb predict resamples polyphase; linear is close
    wave = np.interp(np.arange(0, len(wave), rate / 16000), np.arange(len(wave)), wave).astype(np.float32)
n = int(round(config["clip_seconds"] * 16000))          # the first {clip_seconds:g} s, zero-padded
clip, mask = np.zeros((1, n), np.float32), np.zeros((1, n), np.int64)
clip[0, :len(wave[:n])], mask[0, :len(wave[:n])] = wave[:n], 1
outputs = session.run(None, {{"waveform": clip, "attention_mask": mask}})
for task, values in zip(config["outputs"], outputs):
    print(task, dict(zip(config["columns"][task], values[0].round(3).tolist())))
'''

TRAIN_FIELDS = ("arch", "weighting", "lr", "weight_decay", "batch_size", "epochs", "patience", "grad_clip", "seed",
                "lr_backbone", "lr_head", "clip_seconds", "spec_time_p", "spec_feature_p", "freeze_cnn")
HEAD_FIELDS = ("input_layer", "hidden", "dropout", "chain_order", "n_heads", "branch_blocks", "branch_use_frames")


def val_scores(heads: Any, kind: str | None) -> tuple[dict[str, float], dict[str, list[float]], str]:
    """(scores, intervals, where they come from). Runs and ensembles: their Val predictions scored on their
    cache's Val labels with bootstrap intervals; fine-tuning outputs, or a cache not readable here: the recorded
    best scores without intervals, and the reason."""
    from heads.analysis.bootstrap import BootstrapConfig, score_intervals  # noqa: PLC0415
    from heads.analysis.ensemble import read_cache_labels, read_split_predictions  # noqa: PLC0415
    from heads.metrics import score_all  # noqa: PLC0415

    recorded = _recorded_scores(Path(heads.source))
    if kind == FINETUNE:
        return recorded, {}, "recorded by fine-tuning at its best epoch (it keeps no per-clip predictions, so no " \
                             "intervals)"
    run = heads.runs[0]
    cache = run.config.get("cache")
    try:
        labels = read_cache_labels(cache, run.config.get("cv_round")) if cache else None
        preds = read_split_predictions(predictions_dir(heads.source, "Val"), heads.tasks)
    except AvbError as err:
        return recorded, {}, f"recorded at training; no intervals ({err})"
    if labels is None or preds is None or sorted(preds.ids) != sorted(labels.val_ids):
        return recorded, {}, "recorded at training; no intervals (the Val predictions or the cache are not here)"
    values = preds.reindexed(labels.val_ids)
    config = BootstrapConfig()
    scores = score_all(heads.tasks, labels.val_labels, values)
    cis = score_intervals(heads.tasks, labels.val_labels, values, config)
    how = (f"{len(labels.val_ids)} Val clips of {cache}; {int(config.level * 100)} % percentile bootstrap "
           f"intervals over clips ({config.n_boot} resamples)")
    return scores, cis, how


def _recorded_scores(folder: Path) -> dict[str, float]:
    try:
        metrics = read_json_object(folder / METRICS_FILE)
    except AvbError:
        return {}
    best = metrics.get("best", metrics)
    source = best.get("val", best) if isinstance(best, dict) else {}
    return {k: float(v) for k, v in source.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _front_matter(config: dict[str, Any], tasks: TaskSet, license_: str) -> str:
    metrics = sorted({"uar" if t.is_classification else "ccc" for t in tasks})
    lines = ["---", f"license: {license_}", "library_name: onnx", "pipeline_tag: audio-classification", "tags:"]
    lines += [f"- {tag}" for tag in ("audio", "speech-emotion-recognition", "vocal-bursts", "multi-task", "onnx",
                                      "avb-heads")]
    lines += ["metrics:"] + [f"- {m}" for m in metrics]
    base = (config["cache"]["attrs"].get("backbone") or {}).get("name_or_path")
    if isinstance(base, str) and base.count("/") == 1 and not Path(base).exists():   # a Hub id, not a local path
        lines.append(f"base_model: {base}")
    return "\n".join(lines + ["---", ""])


def _score_table(tasks: TaskSet, scores: dict[str, float], cis: dict[str, list[float]]) -> list[str]:
    rows = ["| score | Val | 95 % interval |", "|---|---|---|"]
    for key in [*tasks.metric_keys, "mean"]:
        if key in scores:
            ci = cis.get(key)
            rows.append(f"| {key} | {scores[key]:.4f} | {f'{ci[0]:.4f} – {ci[1]:.4f}' if ci else '–'} |")
    return rows


def _training(heads: Any, kind: str | None) -> list[str]:
    lines = []
    if len(heads.runs) > 1 or any(len(m) > 1 for m in heads.members.values()):
        lines.append("An ensemble; per task the weighted average of its members' outputs:")
        for name, chosen in heads.members.items():
            parts = ", ".join(f"{heads.runs[i].path.name} × {w:.3g}" for i, w in chosen)
            lines.append(f"- {name}: {parts}")
        lines.append("")
    for run in heads.runs:
        config = run.config
        fields = {k: config[k] for k in TRAIN_FIELDS if k in config}
        head = config.get("head") if isinstance(config.get("head"), dict) else {}
        fields.update({k: head[k] for k in HEAD_FIELDS if k in head})
        what = "fine-tuned end to end with its backbone" if kind == FINETUNE else "trained on cached features"
        lines.append(f"- `{run.path.name}` ({what}): " + ", ".join(f"{k}={json.dumps(v)}" for k, v in fields.items()))
    return lines


def model_card(config: dict[str, Any], heads: Any, kind: str | None, license_: str) -> str:
    """The README.md text of an exported folder."""
    tasks: TaskSet = heads.tasks
    scores, cis, how = val_scores(heads, kind)
    corpus = tasks.name or "its corpus"
    task_lines = [f"- **{t.name}** ({t.kind}): " + (f"{len(t.classes)} classes ({', '.join(t.classes)})"
                  if t.is_classification else f"{len(t.columns)} value(s) in [{t.low:g}, {t.high:g}] "
                  f"({', '.join(t.columns[:6])}{', ...' if len(t.columns) > 6 else ''})") for t in tasks]
    parity = config["parity"]
    lines = [
        _front_matter(config, tasks, license_),
        f"# {corpus}: {', '.join(tasks.names)} from raw audio",
        "",
        f"A multi-task model exported by avb-heads (`avb export`) from {_article(config['source']['kind'])}: a "
        f"wav2vec2-family backbone and {len(heads.runs)} trained head(s) in one ONNX graph. It reads 16 kHz "
        f"mono audio (the first {heads.clip_seconds:g} s of a clip, or windows of a long recording) and "
        "predicts:",
        "",
        *task_lines,
        "",
        "## Files",
        "",
        "- `model.onnx`: inputs `waveform` [batch, samples] float32 and `attention_mask` [batch, samples] int64 "
        "(1 = real sample); one output per task, named after it (class probabilities, or values).",
        "- `config.json`: tasks, columns, classes, sample rate, clip length, the source runs and the cache they "
        "were trained on.",
        "- `backbone/`: the backbone (`transformers.AutoModel.from_pretrained(\"backbone\")`).",
        "- `heads.safetensors`: the heads' weights, for PyTorch users.",
        "",
        f"At export, onnxruntime's outputs matched PyTorch's within {parity['max_abs_diff']:.2g} (limit "
        f"{parity['tolerance']:g}) on batches {parity['batches']}.",
        "",
        "## Scores",
        "",
        f"Val scores: {how}.",
        "",
        *(_score_table(tasks, scores, cis) if scores else ["(no scores recorded)"]),
        "",
        "## Training configuration",
        "",
        *_training(heads, kind),
        "",
        "## How to use",
        "",
        "With numpy, soundfile and onnxruntime only:",
        "",
        "```python",
        EXAMPLE.format(clip_seconds=heads.clip_seconds).rstrip(),
        "```",
        "",
        "With avb-heads (`pip install 'avb-heads[export]'`), whole clips or long recordings in windows:",
        "",
        "```bash",
        "avb predict --model-dir . clips/ --out predictions.csv",
        f"avb predict --model-dir . long.flac --window {heads.clip_seconds:g} --hop {heads.clip_seconds / 2:g} "
        "--out long.csv",
        "```",
        "",
        "```python",
        "from extract.serve.predictor import Predictor",
        "records = Predictor.load(\".\").predict([\"clip.wav\"]).records()",
        "```",
        "",
        "## Intended use",
        "",
        f"Research on the tasks above for short non-verbal vocalisations like those of {corpus}: comparing "
        "models, analysing corpora, and as a baseline. Scores are on the Val split of the same corpus.",
        "",
        "## Limitations",
        "",
        f"- Trained on {corpus} only; other recording conditions, speakers, languages and cultures may score "
        "lower, and no figure here measures that.",
        f"- Sees the first {heads.clip_seconds:g} s of a clip; a long recording is cut into windows whose outputs "
        "are averaged, with no segmentation of where a vocalisation is.",
        "- Emotion labels are perceived ratings; the model is not a measure of anyone's internal state and is "
        "not for decisions about people (clinical, hiring, surveillance).",
        "",
    ]
    return "\n".join(lines)


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"
