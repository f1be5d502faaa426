"""extract.dump: sharded dump with real accelerate processes, checked against direct backbone passes."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import S, accelerate_launch, conv_frames, corpus_and_backbone

from cache.reader import FrameReader, load_cache, read_attrs
from extract.audio import crop_or_pad, load_audio
from extract.corpus import read_corpus
from extract.dump import DumpConfig, dump_command, run_dump, shard_path
from heads.tasks import AVB, TYPE_CLASSES

torch.set_num_threads(1)


def launch(args: list[str], processes: int, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """`accelerate launch -m extract.dump` for real: N processes (gloo on CPU)."""
    return accelerate_launch("extract.dump", args, processes, cwd, timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    return (root, *corpus_and_backbone(root, 26, seed=3, max_seconds=3.0))


@pytest.fixture(scope="module")
def dumps(setup):
    """The same dump with 1 and with 2 processes, frames of hidden_1 at stride 4."""
    root, corpus, model = setup
    out = {}
    for n in (1, 2):
        path = root / f"cache{n}.h5"
        proc = launch(["--corpus", str(corpus), "--model", str(model), "--out", str(path), "--frame-layers",
                       "hidden_1", "--frame-stride", "4", "--batch-size", "4", "--quiet"], n, root)
        assert f"{n} process" in proc.stderr
        out[n] = path
    return out


def direct_states(model_dir: Path, corpus_root: Path, clip_id: str) -> tuple[int, dict[str, np.ndarray]]:
    """Valid frame count and all layer states of one clip, from AutoModel + a plain forward pass."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    wave = load_audio(corpus_root / "audio" / "wav" / f"{clip_id}.wav")
    clip, _ = crop_or_pad(wave, S)
    with torch.no_grad():
        out = model(torch.from_numpy(clip)[None], output_hidden_states=True)
    states = {"cnn": out.extract_features[0].numpy()}
    states.update({f"hidden_{i}": h[0].numpy() for i, h in enumerate(out.hidden_states)})
    return conv_frames(min(len(wave), S)), states


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_cache(setup, dumps):
    _, corpus_root, _ = setup
    corpus = read_corpus(corpus_root)
    one, two = load_cache(dumps[1]), load_cache(dumps[2])
    assert one.ids.tolist() == two.ids.tolist() == corpus.ids
    assert one.splits.tolist() == two.splits.tolist() == corpus.splits.tolist()
    assert np.array_equal(one.n_frames, two.n_frames)
    for task in AVB.names:
        np.testing.assert_array_equal(one.labels[task], corpus.labels[task])
        np.testing.assert_array_equal(two.labels[task], corpus.labels[task])
    assert np.isnan(one.labels["high"][corpus.indices("Test")]).all()
    assert one.label_classes == {"type": list(TYPE_CLASSES)}
    assert one.layers == ["cnn", "hidden_0", "hidden_1", "hidden_2"]
    for layer in one.layers:
        assert one.pooled[layer].dtype == np.float16
        np.testing.assert_allclose(one.pooled[layer].astype(np.float32), two.pooled[layer].astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
    with FrameReader(dumps[1]) as f1, FrameReader(dumps[2]) as f2:
        rows = list(range(len(one.ids)))
        a, b = f1.get(rows)["hidden_1"], f2.get(rows)["hidden_1"]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not list(dumps[2].parent.glob("cache2.h5.shard-*"))  # merged and cleaned up


@pytest.mark.slow
def test_cache_equals_direct_forward_pass(setup, dumps):
    _, corpus_root, model_dir = setup
    cache = load_cache(dumps[2])
    attrs = read_attrs(dumps[2])
    assert attrs["backbone"]["model_type"] == "wav2vec2"
    assert attrs["backbone"]["config"]["hidden_size"] == 32
    assert (attrs["sample_rate"], attrs["clip_seconds"], attrs["pooling"]) == (16000, 2.5, "masked_mean")
    assert (attrs["frame_layers"], attrs["frame_stride"], attrs["dtype"]) == (["hidden_1"], 4, "float16")
    lengths = [len(load_audio(corpus_root / "audio" / "wav" / f"{i}.wav")) for i in cache.ids]
    # a short (padded) clip and a long (cut) one
    picks = [int(np.argmin(lengths)), int(np.argmax(lengths))]
    assert lengths[picks[0]] < S < lengths[picks[1]]
    with FrameReader(dumps[2]) as frames:
        stored_frames = frames.get(picks)["hidden_1"]
    for k, row in enumerate(picks):
        n, states = direct_states(model_dir, corpus_root, str(cache.ids[row]))
        assert cache.n_frames[row] == n
        for layer, h in states.items():
            np.testing.assert_allclose(cache.pooled[layer][row].astype(np.float32), h[:n].mean(0),
                                       rtol=2e-3, atol=2e-3)
        assert stored_frames[k].shape == (math.ceil(n / 4), 32)
        np.testing.assert_allclose(stored_frames[k].astype(np.float32), states["hidden_1"][:n:4],
                                   rtol=2e-3, atol=2e-3)


def test_rerun_after_crash_reuses_complete_shards_and_redoes_the_rest(setup, monkeypatch, tmp_path):
    _, corpus_root, model_dir = setup
    out = tmp_path / "c.h5"
    cfg = DumpConfig(corpus=str(corpus_root), model=str(model_dir), out=str(out), batch_size=8)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during merge")

    monkeypatch.setattr("extract.dump.merge_shards", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dump(cfg, progress=False)
    shard = shard_path(out, 0, 1)
    assert shard.exists() and not out.exists()  # a partial result never sits at the final path
    monkeypatch.undo()

    result = run_dump(cfg, progress=False)
    assert result.reused_shards == [0] and not result.skipped
    assert out.exists() and not shard.exists()
    first = load_cache(out)

    # A complete output with the same settings is left alone.
    assert run_dump(cfg, progress=False).skipped

    # A damaged shard (e.g. copied in half) is recomputed, not trusted.
    out.unlink()
    shard.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    again = run_dump(cfg, progress=False)
    assert again.reused_shards == [] and not shard.exists()
    second = load_cache(out)
    for layer in first.pooled:
        np.testing.assert_array_equal(first.pooled[layer], second.pooled[layer])


def test_stale_shard_with_other_settings_is_not_reused(setup, tmp_path):
    _, corpus_root, model_dir = setup
    out = tmp_path / "d.h5"
    run_dump(DumpConfig(corpus=str(corpus_root), model=str(model_dir), out=str(out), clip_seconds=1.0), progress=False)
    out.rename(shard_path(out, 0, 1))  # a complete cache, but of 1 s clips, sitting where the shard goes
    result = run_dump(DumpConfig(corpus=str(corpus_root), model=str(model_dir), out=str(out)), progress=False)
    assert result.reused_shards == []
    assert read_attrs(out)["clip_seconds"] == 2.5
    assert load_cache(out).n_frames.max() == conv_frames(S)


def test_cli_errors_are_one_line(setup, tmp_path):
    _, corpus_root, model_dir = setup
    runner = CliRunner()
    res = runner.invoke(dump_command, ["--corpus", str(corpus_root), "--model", str(model_dir), "--out",
                                       str(tmp_path / "x.h5"), "--frame-layers", "hidden_7"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        "Error: unknown frame layer(s) hidden_7; this backbone has cnn, hidden_0, hidden_1, hidden_2")
    res = runner.invoke(dump_command, ["--corpus", str(corpus_root), "--model", str(tmp_path / "none"), "--out",
                                       str(tmp_path / "x.h5")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1].startswith(
        f"Error: cannot load backbone '{tmp_path / 'none'}': it is not a local directory")
    other = tmp_path / "other.h5"
    other.write_bytes(b"not a cache")
    res = runner.invoke(dump_command, ["--corpus", str(corpus_root), "--model", str(model_dir), "--out", str(other)])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {other} exists and was not made by this dump (other settings, clips or an incomplete file); "
        "pass --overwrite to replace it")
    assert other.read_bytes() == b"not a cache"
