"""Helpers shared by several test modules (no test module imports another one; see tests/conftest.py).

Heavy imports (torch, the heads) happen inside the helpers that need them, so a light test module that uses
only a CSV or cache helper stays light. Tiny backbones live in tiny_model.py, the hand-written h5py cache in
plain_cache.py.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cache.reader import FrameReader, load_cache, read_attrs
from cache.writer import CacheWriter
from heads.submission import PROBS_FILE, read_class_probs, read_submission
from heads.tasks import AVB, TYPE_CLASSES

if TYPE_CHECKING:
    import torch

    from heads.model.architectures import HeadConfig, HeadInputs

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ subprocesses

def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def accelerate_command(module: str, processes: int, mixed_precision: str = "no") -> list[str]:
    """`accelerate launch [--multi_gpu --num_processes N] -m MODULE` for real (on the CPU: gloo); append the
    module's arguments."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return launcher + ["--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
                       "-m", module]


def accelerate_launch(module: str, args: list[str], processes: int, cwd: Path,
                      timeout: int) -> subprocess.CompletedProcess:
    """`accelerate launch` of `module` for real, as a user would type it; asserts that it succeeded."""
    proc = subprocess.run(accelerate_command(module, processes) + args, cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def corpus_and_backbone(root: Path, clips: int, seed: int, max_seconds: float, **backbone: Any) -> tuple[Path, Path]:
    """A generated corpus (root/corpus) and a tiny random backbone (root/model, `backbone` overrides its config)."""
    from tiny_model import make_tiny_backbone  # noqa: PLC0415

    from extract.synth import synthesize_corpus  # noqa: PLC0415

    corpus = synthesize_corpus(root / "corpus", clips, seed=seed, max_seconds=max_seconds, progress=False)
    return corpus, make_tiny_backbone(root / "model", **backbone)


# ----------------------------------------------------------------------------------- tiny backbone

S = 40000  # 2.5 s at 16 kHz
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0, layerdrop=0.0)


def conv_frames(n: int) -> int:
    """Frames of the tiny CNN (kernels 10, 8, 4; strides 5, 8, 8), from the conv output-length formula."""
    for k, s in zip((10, 8, 4), (5, 8, 8)):
        n = (n - k) // s + 1
    return n


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), S)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        waves[b, :n] = 0.3 * torch.randn(n, generator=g)
        mask[b, :n] = 1
    return waves, mask


# ------------------------------------------------------------------------------------------- heads

L = 4                      # tiny backbone: hidden_0 .. hidden_4
B, T = 5, 6
DIMS = {"cnn": 16, **{f"hidden_{i}": 24 for i in range(L + 1)}}
VARIANTS = {
    "vanilla": dict(arch="vanilla"),
    "vanilla_weighted": dict(arch="vanilla", input_layer="weighted"),
    "chain": dict(arch="chain"),
    "branch": dict(arch="branch"),
    "branch_frames": dict(arch="branch", branch_use_frames=True),
}


def cfg_of(name: str, **kw) -> HeadConfig:
    from heads.model.architectures import HeadConfig  # noqa: PLC0415

    return HeadConfig(hidden=8, n_heads=2, **{**VARIANTS[name], **kw})


def make_inputs(n_runs: int, seed: int = 0, n_valid: list[int] | None = None) -> HeadInputs:
    import torch  # noqa: PLC0415

    from heads.model.architectures import HeadInputs  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    pooled = {k: torch.randn(n_runs, B, d, generator=g) for k, d in DIMS.items()}
    frames = {k: torch.randn(n_runs, B, T, d, generator=g) for k, d in DIMS.items()}
    n_valid = n_valid or [T, 4, 1, 3, T]
    mask = torch.zeros(n_runs, B, T, dtype=torch.bool)
    for b, n in enumerate(n_valid):
        mask[:, b, :n] = True
    return HeadInputs(pooled=pooled, frames=frames, frame_mask=mask)


def make_targets(n_runs: int, seed: int = 1) -> dict[str, torch.Tensor]:
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    out = {t: torch.rand(n_runs, B, AVB[t].label_dim, generator=g) for t in AVB.names if t != "type"}
    out["type"] = torch.randint(0, 8, (n_runs, B, 1), generator=g).float()
    return out


# ------------------------------------------------------------------------------------------ caches

SPLIT_SIZES = (300, 200, 100)


def make_signal_cache(path: Path, *, seed: int = 0, sizes=SPLIT_SIZES, invert_val: bool = False,
                      frames: bool = False) -> Path:
    """A cache whose labels are functions of a latent z that every layer carries (plus noise).

    Layers: cnn (16-d), hidden_0..hidden_2 (24-d), each a random projection of z. TYPE = argmax of a random
    projection of z; the regression targets are sigmoids of random projections. With `invert_val`, Val
    labels come from the NEGATED relation, so fitting Train makes Val worse (the best epoch is an early one).
    With `frames`, every layer is also stored per frame (the frames average to the pooled value).
    """
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    z = rng.normal(size=(n, 8)).astype(np.float32)
    splits = ["Train"] * sizes[0] + ["Val"] * sizes[1] + ["Test"] * sizes[2]
    is_val = np.array(splits) == "Val"
    zl = np.where(is_val[:, None] & invert_val, -z, z)
    labels = {"type": np.argmax(zl @ rng.normal(size=(8, 8)), 1).astype(np.float32)[:, None]}
    for name in ("two", "high", "culture"):
        k = len(AVB[name].columns)
        labels[name] = (1.0 / (1.0 + np.exp(-0.7 * (zl @ rng.normal(size=(8, k)))))).astype(np.float32)
    for name in labels:
        labels[name][sizes[0] + sizes[1]:] = np.nan  # Test rows are unlabelled
    dims = {"cnn": 16, "hidden_0": 24, "hidden_1": 24, "hidden_2": 24}
    pooled = {layer: (z @ rng.normal(size=(8, d)) + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
              for layer, d in dims.items()}
    n_frames = rng.integers(2, 7, size=n) if frames else np.full(n, 4)
    frame_data = None
    if frames:
        frame_data = {layer: [] for layer in dims}
        for i in range(n):
            for layer, d in dims.items():
                wiggle = rng.normal(size=(int(n_frames[i]), d)).astype(np.float32) * 0.2
                frame_data[layer].append(pooled[layer][i] + wiggle - wiggle.mean(0))
    with CacheWriter(path, layer_dims=dims, label_columns={t.name: list(t.columns) for t in AVB},
                     label_classes={"type": list(TYPE_CLASSES)}, dtype="float32",
                     frame_layers=list(dims) if frames else (),
                     attrs={"backbone": {"name": "synthetic"}, "sample_rate": 16000, "clip_seconds": 2.5}) as w:
        w.append([f"{i:05d}" for i in range(n)], splits, labels, n_frames, pooled, frame_data)
    return path


def assert_same_cache(a: Path, b: Path) -> None:
    """Bit-for-bit equal caches: attributes, ids, splits, labels, frame counts, pooled and frame-level states."""
    assert read_attrs(a) == read_attrs(b)
    x, y = load_cache(a), load_cache(b)
    assert x.ids.tolist() == y.ids.tolist() and x.splits.tolist() == y.splits.tolist()
    assert np.array_equal(x.n_frames, y.n_frames)
    for name in x.labels:
        assert np.array_equal(x.labels[name], y.labels[name], equal_nan=True), name
    for layer in x.pooled:
        assert x.pooled[layer].dtype == y.pooled[layer].dtype
        assert x.pooled[layer].tobytes() == y.pooled[layer].tobytes(), layer
    with FrameReader(a) as fa, FrameReader(b) as fb:
        rows = list(range(len(x.ids)))
        for layer in fa.layers:
            assert all(u.tobytes() == v.tobytes() for u, v in zip(fa.get(rows)[layer], fb.get(rows)[layer])), layer


def visible_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


# -------------------------------------------------------------------------- predictions and labels

TOL = 5e-4


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def run_val_predictions(run: Path) -> dict[str, dict[str, np.ndarray]]:
    """A run's own Val predictions (the head applied to the cache's pooled features): id -> task -> values."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path in sorted((run / "predictions" / "val").glob("A-VB-*.csv")):
        task, ids, values = read_submission(path, AVB)
        if task.is_classification:
            continue
        for i, clip in enumerate(ids):
            out.setdefault(clip, {})[task.name] = values[i]
    ids, probs = read_class_probs(run / "predictions" / "val" / PROBS_FILE, AVB, AVB["type"])
    for i, clip in enumerate(ids):
        out[clip]["type"] = probs[i]
    return out


def row_values(row: dict[str, str]) -> dict[str, np.ndarray]:
    return {
        "type": np.array([float(row[f"p_{c}"]) for c in TYPE_CLASSES]),
        **{name: np.array([float(row[c]) for c in AVB[name].columns]) for name in ("two", "high", "culture")},
    }


def val_labels(root, task):
    """Val labels read straight from the CSV with the csv module (independent of the corpus reader)."""
    with open(root / "labels" / task.info_csv, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["Split"] == "Val"]
    ids = [r["File_ID"][1:-1] for r in rows]
    if task.is_classification:
        return ids, np.array([task.classes.index(r["Voc_Type"]) for r in rows])
    return ids, np.array([[float(r[c]) for c in task.columns] for r in rows])


# ------------------------------------------------------------------------------------ trackers, read back

def mlflow_store(tracking_dir: Path) -> str:
    """The URI of the default MLflow store of a tracking dir (`mlflow.db` in it)."""
    return f"sqlite:///{(tracking_dir / 'mlflow.db').resolve()}"


def mlflow_runs(tracking_dir: Path, experiment: str) -> dict[str, Any]:
    """run name -> MLflow Run of `experiment` in the default store of a tracking dir (`mlflow.db`), found the
    way a user finds them: `mlflow.search_runs` on that store."""
    import mlflow  # noqa: PLC0415

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(mlflow_store(tracking_dir))
    if before is None:      # MLflow also sets the variable, which later tests would take for a user's setting
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return {run.info.run_name: run for run in runs}


def mlflow_history(tracking_dir: Path, run: Any, key: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `key` in an MLflow run, in step order."""
    from mlflow.tracking import MlflowClient  # noqa: PLC0415

    client = MlflowClient(tracking_uri=mlflow_store(tracking_dir))
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def wandb_offline_runs(tracking_dir: Path) -> dict[str, dict[str, Any]]:
    """display name -> {"project", "config", "history": [(step, {key: value})]} of every offline W&B run under a
    tracking dir, read with W&B's own reader of its run files (`wandb leet inspect --json`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    runs: dict[str, dict[str, Any]] = {}
    for folder in sorted((tracking_dir / "wandb").glob("offline-run-*")):
        proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(folder)], capture_output=True,
                              text=True, timeout=60, check=True)
        records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        run = next(r["run"] for r in records if r["type"] == "run")
        config = {k: v for k, v in run.get("config", {}).get("update", {}).items() if k != "_wandb"}
        history = [(int(r["history"].get("step", {}).get("num", 0)), r["history"]["item"])
                   for r in records if r["type"] == "history"]
        runs[run["display_name"]] = {"project": run["project"], "config": config, "history": history}
    return runs


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A label CSV (header, then rows), its folder made first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
