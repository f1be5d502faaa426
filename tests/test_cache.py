"""The HDF5 feature cache: writer -> reader round trips, shard merge, hand-written files, and every error path."""
from __future__ import annotations

import json
import math
import multiprocessing
import pickle
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache.format import read_ranges, read_rows
from cache.reader import (
    CacheError,
    FrameReader,
    cache_info,
    check_compatible,
    compat_attrs,
    load_cache,
    read_attrs,
)
from cache.writer import CacheWriter, merge_shards
from extract.app.cli import main

DIMS = {"cnn": 6, "hidden_0": 4, "hidden_1": 4}
COLUMNS = {"two": ["Valence", "Arousal"], "type": ["Voc_Type"]}
CLASSES = {"type": ["Gasp", "Laugh", "Cry"]}
ATTRS = {"backbone": {"name_or_path": "tiny", "model_type": "wav2vec2", "config": {"hidden_size": 4}},
         "sample_rate": 16000, "clip_seconds": 2.5}
SPLIT_CYCLE = ["Train", "Val", "Test"]


def make_clips(n: int, seed: int = 0, stride: int = 2, frame_layers=("hidden_1",)) -> dict:
    """n clips of random features and labels; Test rows unlabeled, one Train row with a missing label."""
    rng = np.random.default_rng(seed)
    ids = [f"{10000 + 7 * i % 97:05d}-{i}" for i in range(n)]
    splits = [SPLIT_CYCLE[i % 3] for i in range(n)]
    two = rng.uniform(0, 1, size=(n, 2)).astype(np.float32)
    typ = rng.integers(0, 3, size=(n, 1)).astype(np.float32)
    for i, s in enumerate(splits):
        if s == "Test":
            two[i] = np.nan
            typ[i] = np.nan
    if n > 3:
        two[3, 1] = np.nan
    n_frames = rng.integers(1, 12, size=n).astype(np.int32)
    pooled = {layer: rng.normal(0, 3, size=(n, d)).astype(np.float32) for layer, d in DIMS.items()}
    frames = {layer: [rng.normal(size=(math.ceil(t / stride), DIMS[layer])).astype(np.float32) for t in n_frames]
              for layer in frame_layers}
    return {"ids": ids, "splits": splits, "labels": {"two": two, "type": typ}, "n_frames": n_frames,
            "pooled": pooled, "frames": frames}


def subset(clips: dict, rows) -> dict:
    rows = list(rows)
    return {
        "ids": [clips["ids"][r] for r in rows], "splits": [clips["splits"][r] for r in rows],
        "labels": {k: v[rows] for k, v in clips["labels"].items()}, "n_frames": clips["n_frames"][rows],
        "pooled": {k: v[rows] for k, v in clips["pooled"].items()},
        "frames": {k: [v[r] for r in rows] for k, v in clips["frames"].items()},
    }


def write(path: Path, clips: dict, *, blocks=None, stride: int = 2, frame_layers=("hidden_1",), **kw) -> Path:
    n = len(clips["ids"])
    blocks = blocks or [n]
    with CacheWriter(path, layer_dims=DIMS, label_columns=COLUMNS, label_classes=CLASSES, attrs=ATTRS,
                     frame_layers=frame_layers, frame_stride=stride, **kw) as w:
        start = 0
        for size in blocks:
            part = subset(clips, range(start, start + size))
            w.append(part["ids"], part["splits"], part["labels"], part["n_frames"], part["pooled"],
                     part["frames"] if frame_layers else None)
            start += size
    return path


def h5_contents(path: Path) -> dict:
    """Every dataset and attribute of a file, as plain numpy/python values (code_version left out)."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()
                        if k != "code_version"}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj.asstr()[()] if h5py.check_string_dtype(obj.dtype) else obj[()]
                out[name] = (data, obj.dtype.str if not h5py.check_string_dtype(obj.dtype) else "str",
                             dict(obj.attrs))
        f.visititems(visit)
    return out


def assert_same_contents(a: dict, b: dict) -> None:
    assert a["attrs"] == b["attrs"]
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "attrs":
            continue
        np.testing.assert_array_equal(a[key][0], b[key][0], err_msg=key)
        assert a[key][1:] == b[key][1:], key


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_values_order_nan_and_attrs(tmp_path):
    clips = make_clips(7)
    path = write(tmp_path / "c.h5", clips)
    data = load_cache(path)

    assert data.ids.tolist() == clips["ids"]
    assert data.splits.tolist() == clips["splits"]
    np.testing.assert_array_equal(data.n_frames, clips["n_frames"])
    assert data.layers == list(DIMS) and data.layer_dims == DIMS
    for layer in DIMS:
        got = data.pooled[layer]
        assert got.dtype == np.float16 and got.shape == (7, DIMS[layer])
        np.testing.assert_array_equal(got, clips["pooled"][layer].astype(np.float16))
        # float16 keeps ~3 significant digits: relative error <= 2^-11 for normal numbers
        np.testing.assert_allclose(got.astype(np.float32), clips["pooled"][layer], rtol=2 ** -11, atol=1e-4)
    for name in COLUMNS:
        assert data.labels[name].dtype == np.float32
        np.testing.assert_array_equal(np.isnan(data.labels[name]), np.isnan(clips["labels"][name]))
        np.testing.assert_array_equal(data.labels[name], clips["labels"][name])  # NaN == NaN here
    assert np.isnan(data.labels["two"][3, 1]) and not np.isnan(data.labels["two"][3, 0])
    assert data.label_columns == COLUMNS and data.label_classes == CLASSES
    assert data.frame_layers == ["hidden_1"] and data.frame_stride == 2

    attrs = read_attrs(path)
    assert attrs["backbone"] == ATTRS["backbone"]
    assert attrs["layers"] == list(DIMS) and attrs["layer_dims"] == DIMS
    assert attrs["sample_rate"] == 16000 and type(attrs["sample_rate"]) is int
    assert attrs["clip_seconds"] == 2.5 and attrs["n_clips"] == 7
    assert attrs["format"] == "avb-feature-cache" and attrs["format_version"] == 1
    assert attrs["pooling"] == "masked_mean" and attrs["dtype"] == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]  # no temp file left beside it


def test_float32_is_stored_exactly_and_extra_attrs_round_trip(tmp_path):
    clips = make_clips(4)
    attrs = dict(ATTRS, corpus={"root": "/data/avb", "n": 4}, note="hello", seed=3)
    with CacheWriter(tmp_path / "c.h5", layer_dims=DIMS, label_columns=COLUMNS, attrs=attrs, dtype="float32") as w:
        w.append(clips["ids"], clips["splits"], clips["labels"], clips["n_frames"], clips["pooled"])
    data = load_cache(tmp_path / "c.h5")
    for layer in DIMS:
        assert data.pooled[layer].dtype == np.float32
        np.testing.assert_array_equal(data.pooled[layer], clips["pooled"][layer])
    assert data.attrs["corpus"] == {"root": "/data/avb", "n": 4}
    assert data.attrs["note"] == "hello" and data.attrs["seed"] == 3
    assert data.attrs["frame_layers"] == [] and data.label_classes == {}


def test_several_appends_equal_one_append_and_datasets_are_chunked(tmp_path):
    clips = make_clips(11)
    one = write(tmp_path / "one.h5", clips, chunk_rows=4)
    many = write(tmp_path / "many.h5", clips, blocks=[3, 1, 5, 2], chunk_rows=4)
    assert_same_contents(h5_contents(one), h5_contents(many))
    with h5py.File(many, "r") as f:
        assert f["pooled/cnn"].shape == (11, 6)             # trimmed from chunk-rounded capacity
        assert f["pooled/cnn"].chunks == (4, 6)             # chunked along N, full width
        assert f["pooled/cnn"].maxshape == (None, 6)
        assert f["ids"].shape == (11,) and f["frame_offsets"].shape == (12,)
        assert f["pooled/cnn"].compression is None


def test_small_file_gets_chunks_no_larger_than_itself(tmp_path):
    path = write(tmp_path / "c.h5", make_clips(5), chunk_rows=1024)
    with h5py.File(path, "r") as f:
        assert f["pooled/hidden_0"].chunks == (5, 4)


def test_empty_cache_is_valid(tmp_path):
    with CacheWriter(tmp_path / "e.h5", layer_dims=DIMS, label_columns=COLUMNS, attrs=ATTRS,
                     frame_layers=["cnn"]) as w:
        pass
    assert w.n_clips == 0
    data = load_cache(tmp_path / "e.h5")
    assert len(data) == 0 and data.pooled["cnn"].shape == (0, 6) and data.labels["two"].shape == (0, 2)
    assert FrameReader(tmp_path / "e.h5").offsets.tolist() == [0]


def test_load_cache_selects_layers_and_splits(tmp_path):
    clips = make_clips(10)
    path = write(tmp_path / "c.h5", clips)
    data = load_cache(path, layers=["hidden_1", "cnn"], splits=["Train", "Test"])
    rows = [i for i, s in enumerate(clips["splits"]) if s in ("Train", "Test")]
    assert data.layers == ["hidden_1", "cnn"] and set(data.pooled) == {"hidden_1", "cnn"}
    assert data.layer_dims == {"hidden_1": 4, "cnn": 6}
    assert data.rows.tolist() == rows
    assert data.ids.tolist() == [clips["ids"][r] for r in rows]
    np.testing.assert_array_equal(data.pooled["cnn"], clips["pooled"]["cnn"][rows].astype(np.float16))
    np.testing.assert_array_equal(data.labels["two"], clips["labels"]["two"][rows])
    np.testing.assert_array_equal(data.n_frames, clips["n_frames"][rows])
    assert data.indices("Test").tolist() == [i for i, r in enumerate(rows) if clips["splits"][r] == "Test"]
    assert data.indices("Val").tolist() == []
    with pytest.raises(CacheError, match=r"has no layer 'hidden_9'; it holds cnn, hidden_0, hidden_1"):
        load_cache(path, layers=["hidden_9"])
    with pytest.raises(CacheError, match=r"unknown split 'train'; expected one of Train, Val, Test"):
        load_cache(path, splits=["train"])


# ---------------------------------------------------------------------------------------------- frames
def test_ragged_frames_offsets_and_frame_reader(tmp_path):
    clips = make_clips(9, stride=3, frame_layers=("hidden_0", "hidden_1"))
    path = write(tmp_path / "c.h5", clips, stride=3, frame_layers=("hidden_0", "hidden_1"), blocks=[4, 5],
                 chunk_rows=2)
    lengths = [math.ceil(t / 3) for t in clips["n_frames"]]
    with h5py.File(path, "r") as f:
        offsets = f["frame_offsets"][()]
        assert offsets.dtype == np.int64
        assert offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert f["frames/hidden_1"].shape == (sum(lengths), 4)
        for i in range(9):
            np.testing.assert_array_equal(f["frames/hidden_0"][offsets[i]:offsets[i + 1]],
                                          clips["frames"]["hidden_0"][i].astype(np.float16))

    reader = FrameReader(path, layers=["hidden_1"])
    assert len(reader) == 9 and reader.lengths().tolist() == lengths
    got = reader.get([8, 0, 4, 4])
    assert list(got) == ["hidden_1"]
    for arr, i in zip(got["hidden_1"], [8, 0, 4, 4]):
        np.testing.assert_array_equal(arr, clips["frames"]["hidden_1"][i].astype(np.float16))
    full, offs = reader.load_all()
    np.testing.assert_array_equal(full["hidden_1"], np.concatenate(clips["frames"]["hidden_1"]).astype(np.float16))
    assert offs.tolist() == offsets.tolist()
    assert reader.nbytes() == sum(lengths) * 4 * 2
    with pytest.raises(CacheError, match=r"need .* GiB, more than the allowed"):
        reader.load_all(max_bytes=10)
    with pytest.raises(CacheError, match=r"clip index 9 out of range for 9 clips"):
        reader.get([9])
    with pytest.raises(CacheError, match=r"has no frames for layer 'cnn'; frame layers are hidden_0, hidden_1"):
        FrameReader(path, layers=["cnn"])

    # Pickling (DataLoader workers with spawn) drops the open handle; the copy reopens lazily.
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._h5 is None
    np.testing.assert_array_equal(copy.get([2])["hidden_1"][0], clips["frames"]["hidden_1"][2].astype(np.float16))
    reader.close()


def _child_read(reader: FrameReader, out: str) -> None:
    np.save(out, reader.get([1])["hidden_1"][0])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_frame_reader_reopens_after_fork(tmp_path):
    clips = make_clips(3)
    path = write(tmp_path / "c.h5", clips)
    reader = FrameReader(path)
    reader.get([0])                                  # parent opens its handle before the fork
    proc = multiprocessing.get_context("fork").Process(target=_child_read, args=(reader, str(tmp_path / "x.npy")))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), clips["frames"]["hidden_1"][1].astype(np.float16))
    reader.close()


def test_pooled_only_cache_has_no_frame_reader(tmp_path):
    path = write(tmp_path / "c.h5", make_clips(3), frame_layers=())
    with h5py.File(path, "r") as f:
        assert "frames" not in f and "frame_offsets" not in f
    with pytest.raises(CacheError, match=r"holds no frame-level layers"):
        FrameReader(path)


def test_read_rows_and_ranges_match_naive_indexing(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(5000, 3)).astype(np.float32)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(64, 3))
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["x"]
        rows = np.concatenate([rng.integers(0, 5000, 200), [0, 4999, 17, 17]])  # unsorted, repeated, far apart
        np.testing.assert_array_equal(read_rows(ds, rows), data[rows])
        assert read_rows(ds, []).shape == (0, 3)
        starts = rng.integers(0, 4990, 50)
        ends = starts + rng.integers(0, 10, 50)
        for got, s, e in zip(read_ranges(ds, starts, ends), starts, ends):
            np.testing.assert_array_equal(got, data[s:e])


# ---------------------------------------------------------------------------------------------- merge
def write_shards(tmp_path: Path, clips: dict, n_shards: int) -> list[Path]:
    """Round-robin shards, as ranks of a distributed dump would write them, each in reversed order."""
    n = len(clips["ids"])
    paths = []
    for r in range(n_shards):
        rows = list(range(r, n, n_shards))[::-1]
        paths.append(write(tmp_path / f"shard{r}.h5", subset(clips, rows), chunk_rows=2))
    return paths


@pytest.mark.parametrize("n_shards", [2, 3])
def test_merge_equals_single_writer(tmp_path, n_shards):
    clips = make_clips(10)
    single = write(tmp_path / "single.h5", clips)
    shards = write_shards(tmp_path, clips, n_shards)
    merged = merge_shards(shards, tmp_path / "merged.h5", order=clips["ids"], chunk_rows=3)
    assert merged == tmp_path / "merged.h5"
    a, b = h5_contents(single), h5_contents(merged)
    assert_same_contents(a, b)


def test_merge_sorts_by_id_by_default_and_reorders(tmp_path):
    clips = make_clips(8)
    shards = write_shards(tmp_path, clips, 3)
    merged = load_cache(merge_shards(shards, tmp_path / "m.h5"))
    assert merged.ids.tolist() == sorted(clips["ids"])
    rows = [clips["ids"].index(i) for i in sorted(clips["ids"])]
    np.testing.assert_array_equal(merged.pooled["cnn"], clips["pooled"]["cnn"][rows].astype(np.float16))
    np.testing.assert_array_equal(merged.labels["two"], clips["labels"]["two"][rows])
    frames = FrameReader(tmp_path / "m.h5").get(range(8))["hidden_1"]
    for got, r in zip(frames, rows):
        np.testing.assert_array_equal(got, clips["frames"]["hidden_1"][r].astype(np.float16))

    order = clips["ids"][::-1]
    again = load_cache(merge_shards(shards, tmp_path / "r.h5", order=order))
    assert again.ids.tolist() == order
    np.testing.assert_array_equal(again.pooled["hidden_0"], clips["pooled"]["hidden_0"][::-1].astype(np.float16))


def test_merge_refuses_duplicates_and_bad_order(tmp_path):
    clips = make_clips(6)
    a = write(tmp_path / "a.h5", subset(clips, [0, 1, 2]))
    b = write(tmp_path / "b.h5", subset(clips, [2, 3, 4, 5]))
    with pytest.raises(CacheError) as err:
        merge_shards([a, b], tmp_path / "m.h5")
    assert str(err.value) == f"{b}, row 0 (File_ID [{clips['ids'][2]}]): duplicate File_ID (also {a}, row 2)"
    c = write(tmp_path / "c.h5", subset(clips, [3, 4, 5]))
    with pytest.raises(CacheError, match=re.escape(f"order lacks id '{clips['ids'][5]}'")):
        merge_shards([a, c], tmp_path / "m.h5", order=clips["ids"][:5])
    with pytest.raises(CacheError, match=r"order lists id 'nope', which is in none of the shards"):
        merge_shards([a, c], tmp_path / "m.h5", order=clips["ids"][:5] + ["nope"])
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_mismatched_attrs(tmp_path):
    clips = make_clips(6)
    a = write(tmp_path / "a.h5", subset(clips, [0, 1, 2]))
    rest = subset(clips, [3, 4, 5])
    other = dict(ATTRS, backbone={"name_or_path": "other", "model_type": "hubert", "config": {}})
    with CacheWriter(tmp_path / "b.h5", layer_dims=DIMS, label_columns=COLUMNS, label_classes=CLASSES,
                     attrs=other, frame_layers=["hidden_1"], frame_stride=2) as w:
        w.append(rest["ids"], rest["splits"], rest["labels"], rest["n_frames"], rest["pooled"], rest["frames"])
    with pytest.raises(CacheError, match=r"b\.h5 differs from .*a\.h5 in attribute 'backbone'"):
        merge_shards([a, tmp_path / "b.h5"], tmp_path / "m.h5")
    c = write(tmp_path / "c.h5", subset(make_clips(6, stride=3), [3, 4, 5]), stride=3)
    with pytest.raises(CacheError, match=r"c\.h5 differs from .*a\.h5 in attribute 'frame_stride': 3 vs 2"):
        merge_shards([a, c], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


# ---------------------------------------------------------------------------------------------- plain h5py
def _plain_cache(path: Path, **overrides) -> dict:
    """A cache written with plain h5py from FORMAT.md alone (no project code)."""
    ids = ["a1", "b2", "c3", "d4"]
    splits = ["Train", "Train", "Val", "Test"]
    n_frames = np.array([3, 5, 2, 4], np.int32)
    pooled = {"cnn": np.arange(4 * 5, dtype=np.float32).reshape(4, 5) / 7,
              "hidden_0": -np.arange(4 * 3, dtype=np.float32).reshape(4, 3)}
    high = np.array([[0.1, 0.2, 0.3], [0.4, np.nan, 0.6], [0.7, 0.8, 0.9], [np.nan] * 3], np.float32)
    with h5py.File(path, "w") as f:
        attrs = {"format": "avb-feature-cache", "format_version": 1,
                 "backbone": json.dumps({"name_or_path": "hand", "model_type": "wav2vec2", "config": {}}),
                 "layers": json.dumps(["cnn", "hidden_0"]), "layer_dims": json.dumps({"cnn": 5, "hidden_0": 3}),
                 "pooling": "masked_mean", "dtype": "float32", "sample_rate": 16000, "clip_seconds": 2.5,
                 "frame_layers": json.dumps([]), "frame_stride": 1, "n_clips": 4}
        attrs.update(overrides)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
        f.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        f.create_dataset("splits", data=splits, dtype=h5py.string_dtype())
        f.create_dataset("n_frames", data=n_frames)
        ds = f.create_dataset("labels/high", data=high)
        ds.attrs["columns"] = json.dumps(["Awe", "Fear", "Sadness"])
        for layer, arr in pooled.items():
            f.create_dataset(f"pooled/{layer}", data=arr)
    return {"ids": ids, "splits": splits, "pooled": pooled, "high": high, "n_frames": n_frames}


def test_plain_h5py_cache_loads(tmp_path):
    want = _plain_cache(tmp_path / "p.h5")
    data = load_cache(tmp_path / "p.h5")
    assert data.ids.tolist() == want["ids"] and data.splits.tolist() == want["splits"]
    np.testing.assert_array_equal(data.n_frames, want["n_frames"])
    np.testing.assert_array_equal(data.pooled["cnn"], want["pooled"]["cnn"])
    np.testing.assert_array_equal(data.pooled["hidden_0"], want["pooled"]["hidden_0"])
    np.testing.assert_array_equal(data.labels["high"], want["high"])
    assert data.label_columns == {"high": ["Awe", "Fear", "Sadness"]}
    assert data.attrs["backbone"]["name_or_path"] == "hand"
    assert data.indices("Train").tolist() == [0, 1]


def test_format_md_example_writes_a_valid_cache(tmp_path, monkeypatch):
    doc = (Path(__file__).resolve().parents[1] / "cache" / "FORMAT.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "FORMAT.md", "exec"), {})
    data = load_cache("example.h5", layers=["hidden_0"], splits=["Train", "Val"])
    assert data.ids.tolist() == ["10026", "10027"] and data.pooled["hidden_0"].shape == (2, 768)
    assert data.label_classes["type"][7] == "Other" and data.labels["type"][:, 0].tolist() == [1.0, 7.0]
    reader = FrameReader("example.h5")
    assert reader.get([0])["hidden_1"][0].shape == (62, 768)
    assert reader.lengths().tolist() == [62, 30, 1]
    reader.close()


# ---------------------------------------------------------------------------------------------- bad files
def test_not_hdf5_truncated_incomplete_and_wrong_version(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"id,split\n1,Train\n" * 10)
    with pytest.raises(CacheError) as err:
        read_attrs(junk)
    assert str(err.value) == f"{junk} is not an HDF5 file"

    good = write(tmp_path / "good.h5", make_clips(40))
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CacheError, match=r"cut\.h5 cannot be opened: the HDF5 file is truncated or corrupt"):
        load_cache(cut)

    _plain_cache(tmp_path / "nonc.h5", n_clips=None)
    with pytest.raises(CacheError) as err:
        load_cache(tmp_path / "nonc.h5")
    assert str(err.value) == f"{tmp_path / 'nonc.h5'} is incomplete: attribute 'n_clips' is missing (was it interrupted?)"

    _plain_cache(tmp_path / "v2.h5", format_version=2)
    with pytest.raises(CacheError) as err:
        read_attrs(tmp_path / "v2.h5")
    assert str(err.value) == f"{tmp_path / 'v2.h5'} has unsupported format_version 2 (this code reads 1)"

    _plain_cache(tmp_path / "fmt.h5", format="something-else")
    with pytest.raises(CacheError, match=r"is not an avb feature cache \(attribute 'format' is 'something-else'"):
        read_attrs(tmp_path / "fmt.h5")

    with pytest.raises(CacheError, match=r"missing\.h5: no such file"):
        read_attrs(tmp_path / "missing.h5")


def test_datasets_disagreeing_with_attrs_are_corrupt(tmp_path):
    _plain_cache(tmp_path / "n.h5", n_clips=5)
    with pytest.raises(CacheError, match=r"n\.h5 is corrupt: dataset 'ids' has shape \(4,\) but n_clips is 5"):
        read_attrs(tmp_path / "n.h5")
    _plain_cache(tmp_path / "d.h5", layer_dims=json.dumps({"cnn": 6, "hidden_0": 3}))
    with pytest.raises(CacheError, match=r"dataset 'pooled/cnn' has shape \(4, 5\), expected \(4, 6\)"):
        read_attrs(tmp_path / "d.h5")
    _plain_cache(tmp_path / "t.h5", dtype="float16")
    with pytest.raises(CacheError, match=r"'pooled/cnn' is float32 but attribute 'dtype' says float16"):
        read_attrs(tmp_path / "t.h5")
    _plain_cache(tmp_path / "j.h5", layers="[cnn, hidden_0]")
    with pytest.raises(CacheError, match=r"attribute 'layers' is not valid JSON"):
        read_attrs(tmp_path / "j.h5")


def test_interrupted_writer_leaves_nothing(tmp_path):
    clips = make_clips(5)
    with pytest.raises(RuntimeError, match="boom"):
        with CacheWriter(tmp_path / "c.h5", layer_dims=DIMS, label_columns=COLUMNS, attrs=ATTRS, chunk_rows=2) as w:
            w.append(clips["ids"], clips["splits"], clips["labels"], clips["n_frames"], clips["pooled"])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_file(tmp_path):
    path = write(tmp_path / "c.h5", make_clips(3))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with CacheWriter(path, layer_dims=DIMS, label_columns=COLUMNS, attrs=ATTRS):
            raise RuntimeError("crash")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.h5"]


# ---------------------------------------------------------------------------------------------- writer validation
def test_append_validation_messages(tmp_path):
    clips = make_clips(3)
    w = CacheWriter(tmp_path / "c.h5", layer_dims=DIMS, label_columns=COLUMNS, label_classes=CLASSES, attrs=ATTRS,
                    frame_layers=["hidden_1"], frame_stride=2)
    base = dict(ids=clips["ids"], splits=clips["splits"], labels=clips["labels"], n_frames=clips["n_frames"],
                pooled=clips["pooled"], frames=clips["frames"])

    def fails(message, **change):
        with pytest.raises(CacheError) as err:
            w.append(**{**base, **change})
        assert str(err.value) == message

    LABEL_TYPE, FRAMES_1, POOLED_0 = "labels['type']", "frames['hidden_1']", "pooled['hidden_0']"

    def at(row: int, clip_id: str, what: str | None = None) -> str:   # file, row, File_ID and column of one clip
        return f"append: {tmp_path / 'c.h5'}, row {row} (File_ID [{clip_id}])" + (f", {what}" if what else "")

    fails("append: pooled['cnn'] has shape (3, 5), expected (3, 6)",
          pooled={**clips["pooled"], "cnn": np.zeros((3, 5))})
    fails("append: pooled lacks 'hidden_0'", pooled={k: v for k, v in clips["pooled"].items() if k != "hidden_0"})
    fails("append: labels has unexpected 'high'", labels={**clips["labels"], "high": np.zeros((3, 10))})
    fails("append: labels['two'] has shape (3, 3), expected (3, 2)", labels={**clips["labels"], "two": np.zeros((3, 3))})
    fails(f"{at(1, clips['ids'][1], LABEL_TYPE)}: 3.0 is not a class index in 0..2 (or NaN)",
          labels={**clips["labels"], "type": np.array([[0], [3], [np.nan]])})
    fails(f"{at(0, clips['ids'][0], 'split')}: 'train' is not one of Train, Val, Test",
          splits=["train", "Val", "Test"])
    fails("append: id '[10000]' has brackets; the cache stores ids without them", ids=["[10000]", "b", "c"])
    fails(f"{at(2, 'x')}: duplicate File_ID (already appended)", ids=["x", "y", "x"])
    fails(f"{at(0, 'a', 'n_frames')}: 0; every clip needs >= 1 valid frame",
          ids=["a", "b", "c"], n_frames=np.array([0, 2, 3]))
    bad = [clips["frames"]["hidden_1"][0], np.zeros((9, 4)), clips["frames"]["hidden_1"][2]]
    t1 = int(clips["n_frames"][1])
    fails(f"{at(1, clips['ids'][1], FRAMES_1)}: shape (9, 4), expected "
          f"({math.ceil(t1 / 2)}, 4) = (ceil(n_frames {t1} / stride 2), dim)", frames={"hidden_1": bad})
    big = {**clips["pooled"], "hidden_0": np.full((3, 4), 1e5, np.float32)}
    fails(f"{at(0, clips['ids'][0], POOLED_0)}: not finite after casting to float16 "
          f"(source value {np.float32(1e5)!r})", pooled=big)
    # Nothing above was buffered: the valid batch still goes in, and its ids are not "duplicates".
    w.append(**base)
    w.close()
    assert load_cache(tmp_path / "c.h5").ids.tolist() == clips["ids"]
    with pytest.raises(CacheError, match="append after close"):
        w.append(**base)


def test_writer_argument_validation(tmp_path):
    def fails(message, **kw):
        args = dict(layer_dims=DIMS, label_columns=COLUMNS, attrs=ATTRS)
        args.update(kw)
        with pytest.raises(CacheError) as err:
            CacheWriter(tmp_path / "c.h5", **args)
        assert str(err.value) == message

    fails("attrs may not set 'n_clips': the writer derives it from its own arguments", attrs={**ATTRS, "n_clips": 3})
    fails("attrs lacks 'sample_rate' (required: backbone, sample_rate, clip_seconds)",
          attrs={k: v for k, v in ATTRS.items() if k != "sample_rate"})
    fails("frame layer 'hidden_7' is not in layer_dims (cnn, hidden_0, hidden_1)", frame_layers=["hidden_7"])
    fails("dtype must be one of float16, float32, got 'bfloat16'", dtype="bfloat16")
    fails("invalid layer name 'a/b': must be a non-empty string without '/'", layer_dims={"a/b": 3})
    fails("label 'two' has classes, so it must have exactly one column (the class index)",
          label_classes={"two": ["x"]})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- compat + info
def test_check_compatible_names_the_key(tmp_path):
    attrs = read_attrs(write(tmp_path / "c.h5", make_clips(3)))
    expected = compat_attrs(attrs)
    assert set(expected) == {"backbone", "layers", "layer_dims", "pooling", "sample_rate", "clip_seconds"}
    check_compatible(attrs, json.loads(json.dumps(expected)))  # a JSON round trip (run config) still matches
    check_compatible(attrs, {"layers": tuple(DIMS)})
    other = dict(expected, backbone={**ATTRS["backbone"], "name_or_path": "facebook/wav2vec2-base"})
    with pytest.raises(CacheError) as err:
        check_compatible(attrs, other, source="c.h5")
    assert str(err.value) == ("c.h5: cache attribute 'backbone.name_or_path' is 'tiny', but "
                              "'facebook/wav2vec2-base' is expected (features from a different backbone or layer set)")
    with pytest.raises(CacheError, match=r"cache attribute 'layers' is \['cnn', 'hidden_0', 'hidden_1'\], but "
                                         r"\['cnn', 'hidden_0'\] is expected"):
        check_compatible(attrs, {"layers": ["cnn", "hidden_0"]})
    with pytest.raises(CacheError, match=r"cache attribute 'layer_dims.hidden_1' is 4, but 8 is expected"):
        check_compatible(attrs, {"layer_dims": {**DIMS, "hidden_1": 8}})
    with pytest.raises(CacheError, match=r"cache lacks attribute 'corpus'"):
        check_compatible(attrs, {"corpus": "x"})


def test_cache_info_counts_and_sizes(tmp_path):
    clips = make_clips(10)
    path = write(tmp_path / "c.h5", clips)
    info = cache_info(path)
    assert info["n_clips"] == 10
    assert info["splits"] == {"Train": 4, "Val": 3, "Test": 3}
    assert info["labels"]["type"] == {"width": 1, "columns": ["Voc_Type"], "classes": CLASSES["type"]}
    assert info["labels"]["two"] == {"width": 2, "columns": ["Valence", "Arousal"]}
    assert info["file_bytes"] == path.stat().st_size
    assert info["pooled_bytes"] == 10 * sum(DIMS.values()) * 2  # float16, no compression, chunks fit the file
    n_stored = sum(math.ceil(t / 2) for t in clips["n_frames"])
    assert info["n_stored_frames"] == n_stored
    assert info["frames_bytes"] >= n_stored * 4 * 2 + 11 * 8
    assert info["bytes_per_clip"]["pooled"] == pytest.approx(info["pooled_bytes"] / 10)
    assert info["bytes_per_clip"]["total"] == pytest.approx(path.stat().st_size / 10)


def test_cli_info_text_and_json(tmp_path):
    path = write(tmp_path / "c.h5", make_clips(10))
    runner = CliRunner()
    res = runner.invoke(main, ["cache", "info", str(path)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "avb-feature-cache v1" in out
    assert "backbone:       tiny (wav2vec2)" in out
    assert "layers:         3: cnn (6), hidden_0 (4), hidden_1 (4)" in out
    assert "pooling:        masked_mean" in out and "dtype:          float16" in out
    assert re.search(r"frame layers:   hidden_1 \(stride 2, \d+ frames stored\)", out)
    assert "clips:          10 (Train 4, Val 3, Test 3)" in out
    assert "labels:         two[2], type[1] (3 classes)" in out
    assert "size on disk:" in out and "bytes per clip:" in out

    res = runner.invoke(main, ["cache", "info", str(path), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert {"format_version", "backbone", "layers", "layer_dims", "pooling", "dtype", "frame_layers", "frame_stride",
            "n_clips", "splits", "labels", "file_bytes", "pooled_bytes", "frames_bytes", "bytes_per_clip",
            "attrs"} <= set(info)
    assert info["splits"] == {"Train": 4, "Val": 3, "Test": 3} and info["layer_dims"] == DIMS


def test_cli_info_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_text("not a cache")
    res = CliRunner().invoke(main, ["cache", "info", str(junk)])
    assert res.exit_code != 0
    assert res.output.strip() == f"Error: {junk} is not an HDF5 file"
    res = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "none.h5")])
    assert res.exit_code != 0 and res.output.strip() == f"Error: {tmp_path / 'none.h5'}: no such file"


def _clip_info_cache(path, ids, info, names=("group", "backbone_trained")):
    with CacheWriter(path, layer_dims={"cnn": 3}, label_columns={}, clip_info=list(names),
                     attrs={"backbone": {"name_or_path": "x"}, "sample_rate": 16000, "clip_seconds": 1.0}) as w:
        w.append(ids=ids, splits=["Train"] * len(ids), labels={}, n_frames=np.ones(len(ids), np.int32),
                 pooled={"cnn": np.zeros((len(ids), 3), np.float32)}, clip_info=info)
    return path


def test_clip_info_is_stored_loaded_by_split_and_merged_in_order(tmp_path):
    a = _clip_info_cache(tmp_path / "a.h5", ["3", "1"], {"group": ["s3", "s1"], "backbone_trained": [True, False]})
    b = _clip_info_cache(tmp_path / "b.h5", ["2"], {"group": ["s2"], "backbone_trained": [False]})
    merged = merge_shards([a, b], tmp_path / "m.h5")
    data = load_cache(merged)
    assert data.ids.tolist() == ["1", "2", "3"]
    assert data.clip_info["group"].tolist() == ["s1", "s2", "s3"]
    assert data.clip_info["backbone_trained"].tolist() == [0, 0, 1]
    with h5py.File(merged) as f:
        assert f["clip_info/group"].shape == (3,) and f["clip_info/backbone_trained"].dtype == np.uint8
    assert load_cache(tmp_path / "b.h5").clip_info["group"].tolist() == ["s2"]
    assert load_cache(tmp_path / "m.h5", splits=["Train"]).clip_info["group"].tolist() == ["s1", "s2", "s3"]


def test_clip_info_refusals(tmp_path):
    with pytest.raises(CacheError, match="unknown clip_info 'speaker'; expected some of group, backbone_trained"):
        CacheWriter(tmp_path / "x.h5", layer_dims={"cnn": 3}, label_columns={}, clip_info=["speaker"],
                    attrs={"backbone": {}, "sample_rate": 16000, "clip_seconds": 1.0})
    with pytest.raises(CacheError, match=r"append: clip_info\['group'\] has 1 values for 2 ids"):
        _clip_info_cache(tmp_path / "y.h5", ["1", "2"], {"group": ["s1"], "backbone_trained": [0, 0]})
    with pytest.raises(CacheError, match="append: clip_info lacks 'backbone_trained'"):
        _clip_info_cache(tmp_path / "z.h5", ["1"], {"group": ["s1"]})
    a = _clip_info_cache(tmp_path / "a.h5", ["1"], {"group": ["s1"]}, names=("group",))
    b = _clip_info_cache(tmp_path / "b.h5", ["2"], {}, names=())
    with pytest.raises(CacheError, match="in its clip_info"):
        merge_shards([a, b], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
