"""SIGINT / SIGTERM as a clean stop (cache.command_kit.interrupt, cache.command_kit.command), with real signals
sent to this process.

The subprocess cases (dump with one and two processes, heads ablate, finetune) are in test_interruption.py beside
the kill -9 tests and share their reference runs; the demo's is in test_demo.py. Here: the mechanism itself, and
`avb heads train` stopped in-process by a real SIGTERM.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import make_signal_cache, visible_files

from cache.command_kit.command import command_errors
from cache.command_kit.interrupt import (
    MESSAGE,
    Interrupted,
    received,
    termination_raises,
)
from extract.app.cli import main

HEAD_ARGS = ["--epochs", "2", "--hidden", "8", "--no-progress"]


def test_a_signal_raises_once_and_the_old_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cleaned = []
    with pytest.raises(Interrupted) as err:
        with termination_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("the signal did not interrupt")  # pragma: no cover
            finally:
                os.kill(os.getpid(), signal.SIGINT)   # a second signal while unwinding is ignored
                cleaned.append(True)
    assert err.value.signum == signal.SIGTERM and err.value.exit_code == 143
    assert cleaned == [True] and received() == signal.SIGTERM
    assert {sig: signal.getsignal(sig) for sig in before} == before


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_commands_end_an_interruption_with_one_line_and_128_plus_the_signal(sig, code, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        with command_errors():
            os.kill(os.getpid(), sig)
            pytest.fail("the signal did not interrupt")   # pragma: no cover
    assert exit_.value.code == code
    assert capsys.readouterr().err == MESSAGE + "\n"


def test_an_error_caused_by_the_signal_still_reports_the_interruption(capsys, monkeypatch):
    """A rank whose peer was stopped by the same signal sees a failed collective, not the signal: it must still
    say 'interrupted' (and only rank 0 prints it under accelerate)."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_:
        with command_errors():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Interrupted:
                raise RuntimeError("Connection closed by peer") from None
    assert exit_.value.code == 143 and capsys.readouterr().err == ""


def test_a_signal_between_creating_a_temporary_and_taking_charge_of_it_leaves_none(tmp_path, monkeypatch):
    import tempfile

    from cache.command_kit.atomic import write_text_atomic

    real = tempfile.mkstemp

    def mkstemp_then_signal(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)   # lands before atomic_path holds the name
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_signal)
    with pytest.raises(Interrupted), termination_raises():
        write_text_atomic(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_signal_that_a_finaliser_would_swallow_is_delivered_again(monkeypatch):
    """Python swallows an exception raised in a __del__ ("Exception ignored in ..."), so the handler must not
    raise there but send the signal again; the same for a finaliser the unraisable-exception hook reports. The
    decisions are checked directly: when exactly a real signal lands is up to the interpreter."""
    from types import SimpleNamespace

    import cache.command_kit.interrupt as interrupt

    again: list[int] = []
    monkeypatch.setattr(interrupt, "_deliver_again", again.append)
    monkeypatch.setitem(interrupt._state, "signum", None)
    in_del = SimpleNamespace(f_code=SimpleNamespace(co_name="__del__"), f_globals={"__name__": "torch"}, f_back=None)
    inner = SimpleNamespace(f_code=SimpleNamespace(co_name="close"), f_globals={"__name__": "tqdm"}, f_back=in_del)
    interrupt._handler(signal.SIGTERM, inner)                 # a callee of a __del__: no raise, sent again
    assert again == [signal.SIGTERM] and received() is None
    with pytest.raises(Interrupted):                          # anywhere else it raises
        interrupt._handler(signal.SIGTERM, SimpleNamespace(f_code=SimpleNamespace(co_name="step"),
                                                           f_globals={"__name__": "heads.training.joint"}, f_back=None))
    reported: list = []
    hook = interrupt._unraisable(reported.append)
    hook(SimpleNamespace(exc_value=Interrupted(signal.SIGINT)))   # swallowed by some other finaliser
    assert again == [signal.SIGTERM, signal.SIGINT] and received() is None and reported == []
    hook(SimpleNamespace(exc_value=ValueError("not ours")))
    assert len(reported) == 1                                 # anything else goes to the previous hook


def test_a_signal_while_hdf5_writes_is_raised_once_hdf5_has_returned(tmp_path):
    """An exception must not cross from the GuardedFile into HDF5 (it would leave the library broken and the
    process would crash at exit): the signal is held there and raised by the writer after the HDF5 call."""
    import numpy as np

    from cache.reader import load_cache
    from cache.writer import CacheWriter

    class Signalling:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            os.kill(os.getpid(), signal.SIGINT)   # arrives while HDF5 is inside GuardedFile.write
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    attrs = {"backbone": {}, "sample_rate": 16000, "clip_seconds": 2.5}
    with pytest.raises(Interrupted), termination_raises():
        with CacheWriter(tmp_path / "c.h5", layer_dims={"cnn": 3}, label_columns={}, attrs=attrs,
                         chunk_rows=2) as writer:
            writer._file._f = Signalling(writer._file._f)
            for i in range(4):
                writer.append([f"c{i}"], ["Train"], {}, np.array([3]), {"cnn": np.ones((1, 3), np.float32)})
    assert list(tmp_path.iterdir()) == []
    with CacheWriter(tmp_path / "c.h5", layer_dims={"cnn": 3}, label_columns={}, attrs=attrs) as writer:
        writer.append(["a"], ["Train"], {}, np.array([3]), {"cnn": np.ones((1, 3), np.float32)})
    assert load_cache(tmp_path / "c.h5").ids.tolist() == ["a"]   # HDF5 is still in order


def test_heads_train_stopped_by_sigterm_writes_no_metrics_and_reruns_to_the_same_run(tmp_path, monkeypatch):
    from heads.training import joint as train_mod

    cache = make_signal_cache(tmp_path / "signal.h5", sizes=(60, 30, 10))
    out = tmp_path / "run"
    args = ["heads", "train", "--cache", str(cache), "--out", str(out), *HEAD_ARGS]
    assert CliRunner().invoke(main, args).exit_code == 0
    reference = tmp_path / "reference"
    shutil.move(out, reference)

    real = train_mod.write_json_atomic

    def terminated_at_the_end(path, obj):   # a scheduler's SIGTERM just as the run's last file is due
        if Path(path).name == "metrics.json":
            os.kill(os.getpid(), signal.SIGTERM)
        real(path, obj)

    monkeypatch.setattr(train_mod, "write_json_atomic", terminated_at_the_end)
    result = CliRunner().invoke(main, args)
    monkeypatch.undo()
    assert result.exit_code == 143, (result.output, result.exception)
    assert result.stderr == MESSAGE + "\n"
    assert not (out / "metrics.json").exists()                    # the run is not marked complete
    assert [p for p in out.rglob(".*")] == []                     # no temporary, no lock left
    assert CliRunner().invoke(main, args).exit_code == 0
    want, got = visible_files(reference), visible_files(out)
    assert sorted(got) == sorted(want) and [n for n in want if want[n] != got[n]] == []
