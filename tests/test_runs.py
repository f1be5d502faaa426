"""Run folders: discovery of complete runs, and refusal of folders from another run-folder format."""
import json

import pytest

from heads.runs import RUN_FORMAT, RunDirError, find_runs, read_json_object, read_run_config


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
