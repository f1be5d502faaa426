"""Busy output folders (cache.command_kit.lock): a second writer stops at once, readers are never blocked, ranks
share one lock.

The lock's holder in these tests is another process (`holder`: a small script that takes the lock and waits),
as it would be for a user who starts a second command in another terminal.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from grids import grid_config
from helpers import accelerate_command, make_signal_cache, subprocess_env
from tiny_model import make_tiny_backbone

from cache.command_kit.lock import (
    LOCK_NAME,
    FolderInUse,
    OutputLock,
    OutputUnavailable,
    hold_output,
    holds_output,
    lock_path,
)
from extract.app.cli import main
from extract.synth import synthesize_corpus

REPO = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent("""
    import sys
    from cache.command_kit.lock import hold_output
    with hold_output(sys.argv[1], is_file=sys.argv[2] == "file"):
        print("held", flush=True)
        sys.stdin.read()   # until the test closes our stdin (or kills us)
""")


class Holder:
    """Another process holding the lock of `target` until `release()` (or its death)."""

    def __init__(self, target: Path, is_file: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), "file" if is_file else "dir"],
                                     cwd=REPO, env=subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def holders():
    made: list[Holder] = []

    def make(target: Path, is_file: bool = False) -> Holder:
        made.append(Holder(target, is_file))
        return made[-1]

    yield make
    for holder in made:
        if holder.proc.poll() is None:
            holder.kill()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def busy(result, target: Path, pid: int) -> None:
    """Exit 1 and one error line (after at most the progress bars of loading a backbone: fine-tuning checks its
    folder once its Accelerator exists)."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert result.stderr.splitlines()[-1] == f"Error: {target} is in use by another avb process (pid {pid})"
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("busy")
    corpus = synthesize_corpus(root / "corpus", 30, seed=5, max_seconds=1.0, progress=False)
    return {"root": root, "corpus": corpus, "model": make_tiny_backbone(root / "model"),
            "cache": make_signal_cache(root / "signal.h5", sizes=(60, 30, 10))}


# ----------------------------------------------------------------------------------------------- the lock

def test_the_lock_file_names_its_holder_and_is_removed_on_release(tmp_path):
    with hold_output(tmp_path / "run"):
        stamp = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert stamp["pid"] == os.getpid() and stamp["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    assert lock_path(tmp_path / "c.h5", is_file=True) == tmp_path / f".c.h5{LOCK_NAME}"


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, holders):
    run = tmp_path / "run"
    holder = holders(run)
    with pytest.raises(FolderInUse, match=rf"^{run} is in use by another avb process \(pid {holder.pid}\)$"):
        OutputLock(run).acquire()
    holder.kill()                                     # like kill -9: its lock file stays behind
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid
    with hold_output(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with hold_output(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_the_holder_may_take_its_own_lock_again(tmp_path, holders):
    run = tmp_path / "run"
    with hold_output(run), hold_output(run):   # a command that wraps a locked function
        pass
    assert not (run / LOCK_NAME).exists()
    holders(run).release()                     # and it really was released


def test_the_decorator_locks_the_folder_named_by_an_argument(tmp_path, holders):
    @holds_output("out_dir")
    def write(cache_path, out_dir):
        assert (Path(out_dir) / LOCK_NAME).exists()
        return "done"

    assert write("c.h5", out_dir=tmp_path / "grid") == "done"
    holder = holders(tmp_path / "grid")
    with pytest.raises(FolderInUse, match=f"pid {holder.pid}"):
        write("c.h5", tmp_path / "grid")


class FakeRanks:
    """Stands in for an Accelerator of a two-process launch, seen from one rank."""

    num_processes = 2

    def __init__(self, main: bool) -> None:
        self.is_main_process = main


def test_ranks_share_rank_0s_lock_and_all_fail_with_its_error(tmp_path, monkeypatch, holders):
    import accelerate.utils

    sent: list = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list",
                        lambda objects, from_process=0: sent.append(list(objects)) or objects)
    with hold_output(tmp_path / "ft", ranks=FakeRanks(main=True)):     # rank 0 takes it and says so
        assert (tmp_path / "ft" / LOCK_NAME).exists()
    assert sent == [[None]] and not (tmp_path / "ft" / LOCK_NAME).exists()
    with hold_output(tmp_path / "ft", ranks=FakeRanks(main=False)):    # rank 1 never touches the file
        assert not (tmp_path / "ft" / LOCK_NAME).exists()
    with hold_output(tmp_path / "grid", ranks=SimpleNamespace(world=2, is_main=True)):   # world / is_main work too
        assert (tmp_path / "grid" / LOCK_NAME).exists()
    assert sent[-1] == [None] and not (tmp_path / "grid" / LOCK_NAME).exists()

    holder = holders(tmp_path / "ft")
    with pytest.raises(FolderInUse):
        with hold_output(tmp_path / "ft", ranks=FakeRanks(main=True)):
            pass
    message = f"{tmp_path / 'ft'} is in use by another avb process (pid {holder.pid})"
    assert sent[-1] == [message]
    # rank 1 receives rank 0's message in place (as torch.distributed.broadcast_object_list fills the list)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list",
                        lambda objects, from_process=0: objects.__setitem__(0, message) or objects)
    with pytest.raises(OutputUnavailable, match=f"^{re.escape(message)}$"):
        with hold_output(tmp_path / "ft", ranks=FakeRanks(main=False)):
            pass


def test_a_multi_process_launch_without_an_accelerate_state_is_refused(tmp_path, monkeypatch):
    from accelerate import PartialState

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(PartialState, "_shared_state", {})
    with pytest.raises(RuntimeError, match="create the Accelerator first or pass ranks="):
        with hold_output(tmp_path / "grid"):
            pass


# ----------------------------------------------------------------------------------------------- commands

def test_a_second_writer_on_a_busy_folder_exits_1_naming_the_holder(world, tmp_path, holders):
    """heads ablate, heads train, dump, finetune and demo: one line, exit 1, nothing written beside the lock."""
    grid, run, ft, demo = tmp_path / "grid", tmp_path / "run", tmp_path / "ft", tmp_path / "demo"
    cache_out = tmp_path / "c.h5"
    pids = {path: holders(path).pid for path in (grid, run, ft, demo)}
    pids[cache_out] = holders(cache_out, is_file=True).pid
    busy(invoke("heads", "ablate", "--cache", world["cache"], "--out", grid, "--epochs", "1", "--no-progress"),
         grid, pids[grid])
    busy(invoke("heads", "train", "--cache", world["cache"], "--out", run, "--epochs", "1", "--no-progress"),
         run, pids[run])
    busy(invoke("dump", "--corpus", world["corpus"], "--model", world["model"], "--out", cache_out, "--quiet"),
         cache_out, pids[cache_out])
    busy(invoke("finetune", "--corpus", world["corpus"], "--model", world["model"], "--out", ft, "--epochs", "1",
                "--quiet"), ft, pids[ft])
    busy(invoke("demo", "--quick", "--out", demo, "--quiet"), demo, pids[demo])
    for folder in (grid, run, ft, demo):
        assert [p.name for p in folder.iterdir()] == [LOCK_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".c.h5" + LOCK_NAME, "demo", "ft", "grid", "run"])


def test_read_only_commands_are_never_blocked(world, tmp_path, holders):
    from heads.model.architectures import HeadConfig
    from heads.training.grid import run_grid

    grid = tmp_path / "grid"
    run_grid(grid_config(world["cache"], archs=("vanilla",), weightings=("uniform", "dwa"), epochs=1,
                         head=HeadConfig(hidden=8)), grid, progress=False)
    holders(grid)
    holders(world["cache"], is_file=True)
    assert invoke("cache", "info", world["cache"]).exit_code == 0
    assert invoke("report", grid, "--out", tmp_path / "report").exit_code == 0
    ensemble = invoke("ensemble", grid, "--out", tmp_path / "ensemble")
    assert ensemble.exit_code == 0, ensemble.output
    preds = tmp_path / "preds"
    holders(preds)
    val = [line for line in (world["corpus"] / "labels" / "two_info.csv").read_text().splitlines() if ",Val," in line]
    (preds / "two.csv").write_text("File_ID,Valence,Arousal\n" + "".join(f"{r.split(',')[0]},0.5,0.5\n" for r in val))
    scored = invoke("score", "--corpus", world["corpus"], preds / "two.csv")
    assert scored.exit_code == 0, scored.output


@pytest.mark.slow
def test_both_ranks_of_an_accelerate_launch_stop_on_a_busy_cache(world, tmp_path, holders):
    """Two ranks, one lock: rank 0 finds it taken and tells rank 1, so both stop before writing a shard.
    (Two ranks sharing a free lock is what every two-process dump in test_dump.py and test_interruption.py does.)"""
    out = tmp_path / "c.h5"
    holder = holders(out, is_file=True)
    cmd = [*accelerate_command("extract.dump", 2), "--corpus", str(world["corpus"]), "--model", str(world["model"]),
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    line = f"Error: {out} is in use by another avb process (pid {holder.pid})"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]      # each rank says it, in one line
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.h5" + LOCK_NAME]
