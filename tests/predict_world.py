"""The world of the predict and export tests: a generated corpus, a tiny backbone, its dump (pooled + frames)
and three runs (vanilla, chain, frame-mode branch), made once per session (conftest's `predict_world`)."""
from __future__ import annotations

from pathlib import Path

from tiny_model import make_tiny_backbone

from cache.reader import FrameReader, load_cache
from extract.audio import load_audio
from extract.dump import DumpConfig, run_dump
from extract.synth import synthesize_corpus
from heads.model.architectures import HeadConfig
from heads.training.joint import TrainConfig, train_runs

HEAD = HeadConfig(hidden=16, n_heads=2, branch_blocks=2, dropout=0.1)


def make_world(root: Path) -> dict:
    corpus = synthesize_corpus(root / "corpus", 30, seed=5, min_seconds=0.6, max_seconds=4.0, progress=False)
    model = make_tiny_backbone(root / "model")
    cache = root / "cache.h5"
    run_dump(DumpConfig(corpus=str(corpus), model=str(model), out=str(cache), batch_size=5,
                        frame_layers=("cnn", "hidden_1", "hidden_2"), frame_stride=2), progress=False)
    data = load_cache(cache)
    runs = {}
    for arch in ("vanilla", "chain"):
        runs[arch] = root / f"run-{arch}"
        train_runs(data, [TrainConfig(arch=arch, seed=1, epochs=3, head=HEAD)], [runs[arch]], progress=False)
    runs["branch"] = root / "run-branch"
    branch = TrainConfig(arch="branch", seed=2, epochs=2, head=HeadConfig(**{**HEAD.__dict__, "arch": "branch",
                                                                              "branch_use_frames": True}))
    with FrameReader(cache) as frames:
        train_runs(data, [branch], [runs["branch"]], frames=frames, progress=False)
    return {"root": root, "corpus": corpus, "model": model, "cache": cache, "data": data, "runs": runs}


def val_wavs(world, n: int = 6) -> list[Path]:
    """Val clips, both longer than 2.5 s (cropped) and shorter (padded)."""
    data = world["data"]
    ids = sorted(str(i) for i in data.ids[data.indices("Val")])
    wav_dir = world["corpus"] / "audio" / "wav"
    seconds = {clip: len(load_audio(wav_dir / f"{clip}.wav")) / 16000 for clip in ids}
    long = [c for c in ids if seconds[c] > 2.5][: n // 2]
    short = [c for c in ids if seconds[c] < 2.5][: n - len(long)]
    assert long and short
    return [wav_dir / f"{clip}.wav" for clip in long + short]


