"""Full disks and other write errors: one line naming the path, exit 1, nothing half-written, and a rerun after the
fault is cleared ends with exactly the outputs of an uninterrupted run.

Two ways to fill a disk:
- a real 300 KiB tmpfs (only as root, which CI is; skipped where mounting is not permitted), for the dump --
  the case that crashed with exit 139 inside HDF5 -- and for a head grid;
- an OSError(ENOSPC) injected at each write site, in-process: the text/JSON/CSV/PNG writes (atomic_path), the
  head weights (safetensors), the HDF5 cache (its GuardedFile), fine-tuning's checkpoint and export.
Each case first runs the command cleanly, sets its outputs aside, then fails it at the same path and reruns it.
"""
from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_same_cache, make_signal_cache, subprocess_env, visible_files
from tiny_model import make_tiny_backbone

import cache.guarded_file
from cache.command_kit.write_errors import (
    REASONS,
    WriteError,
    describe,
    write_errno,
    writing,
)
from extract.app.cli import main
from extract.synth import synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
HEAD_ARGS = ["--epochs", "2", "--hidden", "8", "--no-progress"]
NEEDS = r" \(needs about \d+(\.\d)? MiB more\)"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def fails_on_write(result, path: Path, reason: str = "no space left on device", hint: str = "") -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(re.escape(f"Error: {path}: {reason}") + hint, last), result.stderr
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr, result.stderr


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*") if ".tmp" in p.name or p.name.endswith(".avb-lock")]


def no_space(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", path)


# ------------------------------------------------------------------------------------------- injection

def fail_writes_of(monkeypatch, name: str, times: int = 1) -> list[str]:
    """The next `times` atomic writes of a file called `name` raise ENOSPC while writing its temporary."""
    real = Path.write_bytes
    hits: list[str] = []

    def write_bytes(self: Path, data) -> int:
        if self.name.startswith(f".{name}.tmp-") and len(hits) < times:
            hits.append(str(self))
            raise no_space(str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return hits


def fail_hdf5_writes(monkeypatch, name_prefix: str, after_bytes: int = 0) -> None:
    """Files whose name starts with `name_prefix`, written through the cache's GuardedFile, fill up after
    `after_bytes` bytes: a disk with that much room."""
    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            n = memoryview(data).nbytes
            if self.written + n > after_bytes:
                raise no_space()
            self.written += n
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def guarded_open(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        return Full(handle) if Path(path).name.startswith(name_prefix) else handle

    monkeypatch.setattr(cache.guarded_file, "open", guarded_open, raising=False)


def rerun_equals_reference(run: Callable[[], object], out: Path, monkeypatch, inject: Callable[[], object],
                           failing: Path, check_absent: Path | None = None) -> None:
    """Run cleanly, set the outputs aside, fail with `inject` (naming `failing`), rerun, compare byte for byte."""
    first = run()
    assert first.exit_code == 0, first.output
    reference = out.with_name(out.name + "-reference")
    shutil.move(out, reference)
    with monkeypatch.context() as patch:
        inject_with = inject(patch)
        failed = run()
    assert inject_with != [], "the fault was injected"
    fails_on_write(failed, failing)
    assert temporaries(out) == []
    if check_absent is not None:
        assert not check_absent.exists()
    second = run()
    assert second.exit_code == 0, second.output
    want, got = visible_files(reference), visible_files(out)
    assert sorted(got) == sorted(want)
    assert [name for name in want if want[name] != got[name]] == []


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cache.reader import load_cache
    from extract.dump import DumpConfig, run_dump
    from heads.model.architectures import HeadConfig
    from heads.training.joint import TrainConfig, train_runs

    root = tmp_path_factory.mktemp("disk_full")
    corpus = synthesize_corpus(root / "corpus", 36, seed=11, max_seconds=2.0, progress=False)
    model = make_tiny_backbone(root / "model")
    dumped = root / "dumped.h5"
    run_dump(DumpConfig(corpus=str(corpus), model=str(model), out=str(dumped), batch_size=1,
                        frame_layers=("hidden_1",)), progress=False)
    run = root / "run"
    train_runs(load_cache(dumped), [TrainConfig(epochs=2, head=HeadConfig(hidden=8))], [run], progress=False)
    return {"root": root, "corpus": corpus, "model": model, "dumped": dumped, "run": run,
            "cache": make_signal_cache(root / "signal.h5", sizes=(60, 30, 10))}


def dump_args(world: dict, out: Path) -> list[str]:
    return ["--corpus", world["corpus"], "--model", world["model"], "--out", out, "--batch-size", "1",
            "--frame-layers", "hidden_1", "--quiet"]


# ------------------------------------------------------------------------------------------- messages

@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota exceeded"),
    (errno.EIO, "input/output error (the disk or network file system failed)"),
    (errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied"),
])
def test_each_write_error_is_one_line_naming_the_final_path(world, tmp_path, monkeypatch, code, reason):
    def refuse(self, data):
        raise OSError(code, "whatever the OS says", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    result = invoke("heads", "train", "--cache", world["cache"], "--out", tmp_path / "run", *HEAD_ARGS)
    fails_on_write(result, tmp_path / "run" / "config.json", reason)   # the final path, not the temporary
    assert temporaries(tmp_path) == []


def test_a_full_disk_says_how_much_more_space_the_write_needs(tmp_path, monkeypatch):
    import cache.command_kit.write_errors as we

    monkeypatch.setattr(we, "free_bytes", lambda path: 1 << 20)
    err = WriteError(errno.ENOSPC, tmp_path / "c.h5", needed=(1 << 20) * 13 // 2)
    assert str(err) == f"{tmp_path / 'c.h5'}: no space left on device (needs about 5.5 MiB more)"
    assert describe(WriteError(errno.ENOSPC, "big.h5", needed=(1 << 30) + (1 << 20))) == \
        "big.h5: no space left on device (needs about 1024 MiB more)"
    assert describe(WriteError(errno.ENOSPC, "x", needed=1000)) == "x: no space left on device"   # fits: no guess
    assert describe(WriteError(errno.EDQUOT, "q", needed=3 << 20)) == "q: disk quota exceeded"
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "in.h5")) == \
        "in.h5: no such file or directory"
    assert describe(OSError("Unable to open file (truncated)")) == "Unable to open file (truncated)"   # as it is


def test_write_errors_are_recognised_in_every_library_disguise(tmp_path, monkeypatch):
    import cache.command_kit.write_errors as we

    h5py_text = OSError("Can't write data (file write failed: ..., errno = 28, error message = 'No space ...')")
    safetensors_text = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_errno(h5py_text) == write_errno(safetensors_text) == errno.ENOSPC
    assert write_errno(RuntimeError("Read-only file system")) == errno.EROFS
    assert write_errno(ValueError("row 3: not a number")) is None
    torch_short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(we, "free_bytes", lambda path: 100)   # the disk is then full: taken for ENOSPC
    with pytest.raises(WriteError) as err:
        with writing(tmp_path / "ckpt", size=10):
            raise torch_short_write
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "ckpt")
    monkeypatch.setattr(we, "free_bytes", lambda path: 1 << 40)   # room to spare: some other failure
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with writing(tmp_path / "ckpt"):
            raise torch_short_write
    assert set(REASONS) >= {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES}


def test_an_hdf5_error_after_a_dropped_write_is_reported_as_the_write_error(tmp_path):
    """HDF5 may trip over data the GuardedFile dropped (reading a chunk back); the user must still hear about
    the full disk, and no temporary may stay."""
    from cache.writer import CacheWriter

    writer = CacheWriter(tmp_path / "c.h5", layer_dims={"cnn": 3}, label_columns={}, expected_clips=4,
                         attrs={"backbone": {}, "sample_rate": 16000, "clip_seconds": 2.5})
    writer.append(["a", "b"], ["Train", "Val"], {}, np.array([3, 3]), {"cnn": np.ones((2, 3), np.float32)})
    writer._file.error = no_space()        # what a failed write leaves behind
    with pytest.raises(WriteError) as err:
        with writer:
            raise OSError("Can't read data (addr overflow)")   # HDF5's consequence of the dropped bytes
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path / "c.h5")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- each command, injected

def test_heads_train_on_a_full_disk_at_the_head_weights_then_rerun(world, tmp_path, monkeypatch):
    import heads.training.joint

    out = tmp_path / "run"

    def inject(patch):
        hits: list[str] = []

        def full(tensors, filename, metadata=None):
            hits.append(filename)
            raise no_space(filename)

        patch.setattr(heads.training.joint, "save_file", full)
        return hits

    rerun_equals_reference(lambda: invoke("heads", "train", "--cache", world["cache"], "--out", out, *HEAD_ARGS),
                           out, monkeypatch, inject, out / "head.safetensors", out / "metrics.json")


def test_heads_ablate_on_a_full_disk_at_a_run_and_at_the_tables_then_rerun(world, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    args = ["heads", "ablate", "--cache", world["cache"], "--out", out, "--archs", "vanilla,chain",
            "--weightings", "uniform,dwa", *HEAD_ARGS]
    rerun_equals_reference(lambda: invoke(*args), out, monkeypatch,
                           lambda patch: fail_writes_of(patch, "A-VB-High_avb_1.csv"),
                           out / "vanilla-uniform-s0" / "predictions" / "val" / "A-VB-High_avb_1.csv",
                           out / "vanilla-uniform-s0" / "metrics.json")
    shutil.rmtree(out.with_name("grid-reference"))
    rerun_equals_reference(lambda: invoke(*args), out, monkeypatch,
                           lambda patch: fail_writes_of(patch, "results.md"), out / "results.md", out / "results.md")


def test_ensemble_report_and_predict_on_a_full_disk_then_rerun(world, tmp_path, monkeypatch):
    ens, report, pred = tmp_path / "ens", tmp_path / "report", tmp_path / "pred"
    rerun_equals_reference(lambda: invoke("ensemble", world["run"], "--out", ens), ens, monkeypatch,
                           lambda patch: fail_writes_of(patch, "A-VB-Two_avb_1.csv"),
                           ens / "predictions" / "val" / "A-VB-Two_avb_1.csv", ens / "metrics.json")
    rerun_equals_reference(lambda: invoke("report", world["run"], "--out", report), report, monkeypatch,
                           lambda patch: fail_writes_of(patch, "curves.png"), report / "curves.png",
                           report / "index.html")
    wavs = sorted((world["corpus"] / "audio" / "wav").glob("*.wav"))[:3]
    rerun_equals_reference(lambda: invoke("predict", "--model", world["model"], "--heads", world["run"], "--out",
                                          pred / "p.csv", "--quiet", *wavs),
                           pred, monkeypatch, lambda patch: fail_writes_of(patch, "p.csv"), pred / "p.csv",
                           pred / "p.csv")


@pytest.mark.parametrize("where", ["shard", "merge"])
def test_dump_on_a_full_disk_at_the_shard_or_the_merge_then_rerun(world, tmp_path, monkeypatch, where):
    out = tmp_path / "c.h5"
    prefix = ".c.h5.shard-0-of-1.tmp-" if where == "shard" else ".c.h5.tmp-"
    with monkeypatch.context() as patch:
        fail_hdf5_writes(patch, prefix, after_bytes=20_000)
        result = invoke("dump", *dump_args(world, out))
    fails_on_write(result, out if where == "merge" else out.with_name("c.h5.shard-0-of-1"))
    assert temporaries(tmp_path) == [] and not out.exists()
    shards = sorted(p.name for p in tmp_path.glob("c.h5.shard-*"))
    assert shards == ([] if where == "shard" else ["c.h5.shard-0-of-1"])   # a finished shard is kept
    rerun = invoke("dump", *dump_args(world, out))
    assert rerun.exit_code == 0, rerun.output
    assert_same_cache(world["dumped"], out)


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_finetune_on_a_full_disk_at_the_checkpoint_or_the_export_then_rerun(world, tmp_path, monkeypatch, where):
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    args = ["finetune", "--corpus", world["corpus"], "--model", world["model"], "--out", out, "--epochs", "1",
            "--batch-size", "4", "--eval-batch-size", "6", "--resume", "--quiet"]

    def inject(patch):
        import accelerate
        import transformers

        hits: list[str] = []

        def full(self, path, *a, **k):
            hits.append(str(path))
            raise no_space(str(path))

        if where == "checkpoint":
            patch.setattr(accelerate.Accelerator, "save_state", full)
        else:
            patch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
        return hits

    first = invoke(*args)
    assert first.exit_code == 0, first.output
    reference = tmp_path / "ft-reference"
    shutil.move(out, reference)
    with monkeypatch.context() as patch:
        assert inject(patch) is not None
        failed = invoke(*args)
    (checkpoint,) = [p.name for p in (reference / "checkpoints").iterdir()]   # one epoch: one checkpoint
    fails_on_write(failed, out / "checkpoints" / checkpoint if where == "checkpoint" else out / "backbone")
    assert temporaries(out) == [] and not (out / "backbone").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ([] if where == "checkpoint" else [checkpoint])
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert (out / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes()
    for name in ("head.safetensors", "backbone/model.safetensors"):
        want, got = load_file(str(reference / name)), load_file(str(out / name))
        assert sorted(want) == sorted(got) and all(want[k].equal(got[k]) for k in want), name


# ---------------------------------------------------------------------------------------- a real tmpfs

@pytest.fixture
def tmpfs(tmp_path):
    """A 300 KiB tmpfs (root only); `resize(size)` grows it, as freeing space would."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode(errors='replace').strip() or 'not root'})")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_dump_onto_a_nearly_full_tmpfs_is_one_line_not_a_crash_and_the_rerun_completes(world, tmpfs):
    """The issue's report: exit 139 inside h5py. Now: exit 1, the hint, no temporary; the finished shard stays,
    and after the file system grows the same command finishes with the same cache as on a roomy disk."""
    mount, resize = tmpfs
    out = mount / "c.h5"
    cmd = [sys.executable, "-m", "extract.dump", *map(str, dump_args(world, out))]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert re.fullmatch(re.escape(f"Error: {out}: no space left on device") + NEEDS,
                        proc.stderr.splitlines()[-1]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in mount.iterdir()) == ["c.h5.shard-0-of-1"]
    resize("4m")
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_cache(world["dumped"], out)
    assert sorted(p.name for p in mount.iterdir()) == ["c.h5"]


def test_a_head_grid_filling_a_tmpfs_stops_in_one_line_and_the_rerun_is_identical(world, tmp_path, tmpfs):
    mount, resize = tmpfs
    args = ["heads", "ablate", "--cache", world["cache"], "--archs", "vanilla,chain", "--weightings",
            "uniform,dwa,rruw", *HEAD_ARGS]
    reference = tmp_path / "grid-reference"
    assert invoke(*args, "--out", reference).exit_code == 0
    out = mount / "grid"
    result = invoke(*args, "--out", out)
    assert result.exit_code == 1, result.output
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(re.escape(f"Error: {out}/") + r"\S+: no space left on device(" + NEEDS + ")?", last), last
    assert temporaries(out) == []
    resize("8m")
    assert invoke(*args, "--out", out).exit_code == 0
    want, got = visible_files(reference), visible_files(out)
    assert sorted(got) == sorted(want)
    assert [name for name in want if want[name] != got[name]] == []
