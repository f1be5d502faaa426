"""Run and ensemble folders: discovery of complete runs, refusal of folders from another run-folder format,
and members.json."""
import json
from pathlib import Path

import pytest

from heads.runs import (
    ABLATION,
    ENSEMBLE,
    FINETUNE,
    RUN,
    RUN_FORMAT,
    RunDirError,
    find_runs,
    members_record,
    output_kind,
    read_ensemble,
    read_json_object,
    read_run,
    read_run_config,
    write_members,
)
from heads.tasks import AVB


def make_run(path, *, complete=True, run_format=RUN_FORMAT):
    (path / "predictions").mkdir(parents=True)
    config = {"arch": "vanilla"} if run_format is None else {"run_format": run_format, "arch": "vanilla"}
    (path / "config.json").write_text(json.dumps(config))
    if complete:
        (path / "metrics.json").write_text("{}")
    return path


def test_find_runs_expands_ablation_dirs_skips_incomplete_and_deduplicates(tmp_path):
    grid = tmp_path / "grid"
    a = make_run(grid / "vanilla-uniform-s0")
    b = make_run(grid / "chain-dwa-s0")
    make_run(grid / "branch-rruw-s0", complete=False)
    (grid / "config.json").write_text("{}")  # the ablation's own config is not a run
    runs, warnings = find_runs([grid, a])
    assert runs == [b, a]
    assert warnings == [f"skipping incomplete run {grid / 'branch-rruw-s0'} (no metrics.json)"]


def test_find_runs_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(RunDirError, match="neither a run dir nor an ablation dir"):
        find_runs([tmp_path])
    with pytest.raises(RunDirError, match="not a directory"):
        find_runs([tmp_path / "missing"])


def test_a_run_folder_from_an_older_format_is_refused_with_the_path(tmp_path):
    old = make_run(tmp_path / "old", run_format=None)
    with pytest.raises(RunDirError) as err:
        read_run_config(old)
    assert str(err.value) == (f"{old / 'config.json'}: written with no run_format (an older version); this version "
                              f"reads run_format {RUN_FORMAT}: retrain it (avb heads train / avb heads ablate)")
    future = make_run(tmp_path / "future", run_format=RUN_FORMAT + 1)
    with pytest.raises(RunDirError, match=f"written with run_format {RUN_FORMAT + 1}"):
        read_run_config(future)
    assert read_run_config(make_run(tmp_path / "ok"))["arch"] == "vanilla"


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_bad_json_is_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(RunDirError, match=message) as err:
        read_json_object(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_output_kind_tells_runs_ensembles_finetune_outputs_and_ablations_apart(tmp_path):
    run = make_run(tmp_path / "grid" / "vanilla-uniform-s0")
    (tmp_path / "grid" / "config.json").write_text("{}")
    ens = tmp_path / "ens"
    write_members(ens, members_record(strategy="mean", top_k=1, rounds=None,
                                      tasks={t: [(run, 1.0)] for t in AVB.names}, runs=[(run, {"mean": 0.5})]))
    ft = tmp_path / "ft"
    (ft / "backbone").mkdir(parents=True)
    (ft / "head.safetensors").write_bytes(b"")
    (ft / "config.json").write_text(json.dumps({"kind": "finetune"}))
    (tmp_path / "empty").mkdir()
    assert [output_kind(p) for p in (run, tmp_path / "grid", ens, ft, tmp_path / "empty", tmp_path / "nope")] == [
        RUN, ABLATION, ENSEMBLE, FINETUNE, None, None]
    folder = read_run(run)
    assert (folder.path, folder.config["arch"], folder.metrics, folder.cache_attrs) == (run, "vanilla", {}, {})


def test_members_json_round_trips_and_member_paths_resolve_beside_a_moved_ensemble(tmp_path):
    run = make_run(tmp_path / "runs" / "a")
    ens = tmp_path / "ens"
    record = members_record(strategy="greedy", top_k=None, rounds=3,
                            tasks={t: [("runs/a", 0.25), ("runs/a", 0.75)] for t in AVB.names},
                            runs=[("runs/a", {"mean": 0.5})])
    write_members(ens, record)
    assert json.loads((ens / "members.json").read_text()) == record
    assert list(record) == ["strategy", "top_k", "rounds", "tasks", "runs"]
    loaded = read_ensemble(ens)
    assert (loaded.strategy, loaded.metrics, loaded.runs) == ("greedy", {}, [(Path("runs/a"), {"mean": 0.5})])
    assert loaded.members["type"] == [(Path("runs/a"), 0.25), (Path("runs/a"), 0.75)]
    assert loaded.member_dir(Path("runs/a")) == run       # relative to the ensemble dir's parent
    with pytest.raises(RunDirError, match=r"members.json: member run runs/b not found \(looked in runs/b, "):
        loaded.member_dir(Path("runs/b"))


@pytest.mark.parametrize("tasks, message", [
    ({}, "'tasks' must map each task to its members"),          # any task names are read; the set is checked
    ({"type": []}, "task type has no members with positive weight"),  # where the heads are loaded
    ({t: [{"run": "a"}] for t in AVB.names}, "task type has a member without run/weight"),
    ({t: [{"run": "a", "weight": 0.0}] for t in AVB.names}, "task type has no members with positive weight"),
])
def test_a_broken_members_json_is_refused_naming_the_file(tmp_path, tasks, message):
    (tmp_path / "members.json").write_text(json.dumps({"tasks": tasks}))
    with pytest.raises(RunDirError, match=message) as err:
        read_ensemble(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'members.json'}: ")
