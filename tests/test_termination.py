"""SIGINT / SIGTERM as a clean stop (cache.interrupt, cache.command), with real signals sent to this process.

The subprocess cases (dump with one and two processes, heads ablate, finetune) are in test_interruption.py beside
the kill -9 tests and share their reference runs; the demo's is in test_demo.py. Here: the mechanism itself, and
`avb heads train` stopped in-process by a real SIGTERM.
"""
from __future__ import annotations

import os
import signal
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_interruption import visible_files
from test_train import make_signal_cache

from cache.command import command_errors
from cache.interrupt import MESSAGE, Interrupted, received, termination_raises
from extract.cli import main

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


def test_heads_train_stopped_by_sigterm_writes_no_metrics_and_reruns_to_the_same_run(tmp_path, monkeypatch):
    from heads import train as train_mod

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
