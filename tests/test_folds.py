"""Speaker-independent cross-validation folds: disjoint groups, stratification, roles, errors, the folds file."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cache.command_kit.errors import AvbError
from heads.training.folds import (
    FoldError,
    assign_folds,
    fold_roles,
    read_folds_csv,
    splits_for_fold,
    write_folds_csv,
)


def random_corpus(seed: int, clips: int = 300, speakers: int = 20, classes: int = 5) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = [f"spk{g:02d}" for g in rng.integers(0, speakers, clips)]
    labels = rng.integers(0, classes, clips).astype(np.float64)
    labels[rng.random(clips) < 0.1] = np.nan   # unknown labels: a stratum of their own
    return groups, labels


def check_partition(groups: list[str], folds: np.ndarray, k: int) -> None:
    assert folds.shape == (len(groups),) and folds.dtype.kind == "i"
    assert set(folds.tolist()) == set(range(k))          # every clip in exactly one fold, no fold empty
    fold_of: dict[str, int] = {}
    for group, fold in zip(groups, folds.tolist()):
        if group:
            assert fold_of.setdefault(group, fold) == fold, f"group {group} is in two folds"


@pytest.mark.parametrize("stratified", [False, True])
@pytest.mark.parametrize("k", [3, 5])
def test_every_fold_is_group_disjoint_and_every_clip_in_one_fold(stratified: bool, k: int) -> None:
    for seed in range(4):
        groups, labels = random_corpus(seed)
        folds = assign_folds(groups, k, stratify=labels if stratified else None, seed=seed)
        check_partition(groups, folds, k)
        sizes = np.bincount(folds, minlength=k)
        assert sizes.min() > 0.5 * len(groups) / k   # roughly balanced


def test_stratification_balances_classes_that_plain_grouping_does_not() -> None:
    # Hand check: 12 speakers of 5 clips; the even speakers say only A, the odd ones only B. Three folds of
    # four speakers each can hold exactly two A speakers and two B speakers: (10 A, 10 B) per fold.
    groups = [f"s{i // 5:02d}" for i in range(60)]
    labels = np.array(["A" if (i // 5) % 2 == 0 else "B" for i in range(60)])
    unbalanced = 0
    for seed in range(6):
        folds = assign_folds(groups, 3, stratify=labels, seed=seed)
        check_partition(groups, folds, 3)
        counts = [(int(np.sum((folds == f) & (labels == "A"))), int(np.sum((folds == f) & (labels == "B"))))
                  for f in range(3)]
        assert counts == [(10, 10)] * 3, (seed, counts)
        plain = assign_folds(groups, 3, seed=seed)
        unbalanced += any(np.sum((plain == f) & (labels == "A")) != 10 for f in range(3))
    assert unbalanced > 0   # without the label, some seeds do put 3 A speakers in one fold


def test_stratified_class_shares_stay_near_the_corpus_shares() -> None:
    groups, labels = random_corpus(7, clips=600, speakers=40, classes=3)
    folds = assign_folds(groups, 4, stratify=labels, seed=0)
    known = ~np.isnan(labels)
    overall = np.bincount(labels[known].astype(int), minlength=3) / known.sum()
    for f in range(4):
        member = known & (folds == f)
        share = np.bincount(labels[member].astype(int), minlength=3) / member.sum()
        assert np.abs(share - overall).max() < 0.06, (f, share, overall)


def test_stratify_accepts_class_index_columns_strings_and_unknowns() -> None:
    groups = [f"g{i % 6}" for i in range(36)]
    column = np.array([[i % 3] for i in range(36)], dtype=np.float32)    # a corpus label array [N, 1]
    column[::7] = np.nan
    names = np.array(["x", "y", "", "x"] * 9, dtype=object)             # "" is unknown
    for stratify in (column, names, [i % 2 for i in range(36)]):
        check_partition(groups, assign_folds(groups, 3, stratify=np.asarray(stratify), seed=1), 3)
    with pytest.raises(FoldError, match=r"^the stratification label has shape \(5,\); expected one value per "
                                        r"clip \(36\)$"):
        assign_folds(groups, 3, stratify=np.zeros(5))


def test_same_seed_same_folds_other_seeds_differ() -> None:
    groups, labels = random_corpus(3)
    for stratify in (None, labels):
        first = assign_folds(groups, 5, stratify=stratify, seed=11)
        np.testing.assert_array_equal(first, assign_folds(list(groups), 5, stratify=stratify, seed=11))
        others = [assign_folds(groups, 5, stratify=stratify, seed=s) for s in range(5)]
        assert any(not np.array_equal(first, other) for other in others)


def test_an_empty_group_is_a_group_of_its_own() -> None:
    groups = ["", "", "", "a", "a", "a"]
    for seed in range(5):
        folds = assign_folds(groups, 4, seed=seed)   # 4 groups: three lone clips and "a"
        check_partition(groups, folds, 4)
        assert len(set(folds[3:].tolist())) == 1
        assert len(set(folds[:3].tolist()) - {folds[3]}) == 3
    assert set(assign_folds(["", ""], 2).tolist()) == {0, 1}   # no group column at all: clip-level folds


def test_plain_grouping_is_balanced_largest_group_first() -> None:
    # Hand-worked: groups of 6, 3, 2, 2, 1 clips, largest first, each into the fold holding fewer clips:
    # a(6) -> 0; b(3) -> 1; c(2) -> 1 (3 < 6); d(2) -> 1 (5 < 6); e(1) -> 0 (6 < 7): loads 7 and 7.
    groups = ["a"] * 6 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2 + ["e"]
    for seed in range(5):
        folds = assign_folds(groups, 2, seed=seed)
        assert sorted(np.bincount(folds).tolist()) == [7, 7]
        assert folds[0] == folds[-1] != folds[6]


def test_fold_roles_for_four_folds() -> None:
    # Hand-worked for K = 4: eval k, select k + 1 (mod 4), train the other two.
    assert fold_roles(0, 4) == ([2, 3], 1, 0)
    assert fold_roles(1, 4) == ([0, 3], 2, 1)
    assert fold_roles(2, 4) == ([0, 1], 3, 2)
    assert fold_roles(3, 4) == ([1, 2], 0, 3)
    assert fold_roles(0, 3) == ([2], 1, 0)
    # Over the K rounds every fold is evaluated once and selects once.
    rounds = [fold_roles(f, 5) for f in range(5)]
    assert sorted(r[2] for r in rounds) == list(range(5)) and sorted(r[1] for r in rounds) == list(range(5))


def test_splits_for_fold_feed_the_train_val_test_code() -> None:
    folds = np.array([0, 1, 2, 3, 0, 3, 1])
    assert splits_for_fold(folds, 0, 4).tolist() == ["Test", "Val", "Train", "Train", "Test", "Train", "Val"]
    assert splits_for_fold(folds, 3, 4).tolist() == ["Val", "Train", "Train", "Test", "Val", "Test", "Train"]
    # Over all rounds each clip is in Test exactly once.
    tests = np.sum([splits_for_fold(folds, f, 4) == "Test" for f in range(4)], axis=0)
    assert tests.tolist() == [1] * len(folds)
    with pytest.raises(FoldError, match=r"^fold numbers must lie in 0\.\.2 \(or -1: in no fold\), got 0\.\.3$"):
        splits_for_fold(folds, 0, 3)
    # A clip in no fold (-1) gets no split: neither trained, selected nor scored on.
    assert splits_for_fold(np.array([-1, 0, 1, 2]), 0, 3).tolist() == ["", "Test", "Val", "Train"]


def test_plan_folds_leaves_unlabelled_clips_out_and_stratifies_by_the_first_classification_task() -> None:
    from heads.tasks import Task, TaskSet
    from heads.training.folds import plan_folds

    tasks = TaskSet((Task("v", "regression", ("v",), low=0, high=1), Task("c", "classification", ("c",), ("a", "b"))))
    n = 40
    labels = {"v": np.linspace(0, 1, n)[:, None], "c": (np.arange(n) % 2).astype(float)[:, None]}
    labels["v"][:4] = np.nan
    labels["c"][:4] = np.nan                 # clips 0..3: no label at all
    labels["c"][4] = np.nan                  # clip 4: a regression label only -> still in a fold
    groups = [f"s{i // 4}" for i in range(n)]
    folds = plan_folds(groups, tasks, labels, 3, seed=1)
    assert folds[:4].tolist() == [-1] * 4 and (folds[4:] >= 0).all()
    expected = assign_folds(groups[4:], 3, stratify=labels["c"][4:], seed=1)
    np.testing.assert_array_equal(folds[4:], expected)


def test_error_messages_are_one_line() -> None:
    speakers = ["s1", "s2", "s3"] * 4
    cases = [
        (lambda: assign_folds(speakers, 1), "--folds must be at least 2, got 1"),
        (lambda: assign_folds(["s1"] * 6, 3, column="speaker"),
         "group column 'speaker' has one group; --folds needs at least 2"),
        (lambda: assign_folds(speakers, 5, column="speaker"),
         "--folds 5 asks for more folds than the 3 groups in column 'speaker'"),
        (lambda: assign_folds([], 3), "no clips to assign to folds"),
        (lambda: fold_roles(0, 2), ("--folds 2 leaves no fold to train on (one fold selects, one is evaluated); "
                                    "K must be >= 3")),
        (lambda: fold_roles(4, 4), "fold 4 is not one of 0..3"),
    ]
    for call, message in cases:
        with pytest.raises(FoldError, match=f"^{re.escape(message)}$") as info:
            call()
        assert isinstance(info.value, AvbError) and "\n" not in str(info.value)


def test_folds_csv_round_trip_and_bad_files(tmp_path: Path) -> None:
    ids = ["03", "01", "02", "a,b"]
    groups = ["spk1", "spk2", "", "spk1"]
    folds = assign_folds(groups, 3, seed=2)
    path = tmp_path / "sub" / "folds.csv"
    write_folds_csv(path, ids, groups, folds)
    assert path.read_text().splitlines()[0] == "id,group,fold"
    assert [p.name for p in path.parent.iterdir()] == ["folds.csv"]   # no temporary left behind
    got_ids, got_groups, got_folds = read_folds_csv(path)
    assert got_ids == ids and got_groups == groups
    np.testing.assert_array_equal(got_folds, folds)

    with pytest.raises(FoldError, match="do not align"):
        write_folds_csv(path, ids, groups, folds[:2])
    bad = tmp_path / "bad.csv"
    for text, message in (
        ("id,fold\n1,0\n", f"{bad}: the header must be id,group,fold"),
        ("id,group,fold\n1,a,0\n1,b,1\n", f"{bad}, row 3: id '1' is empty or repeated"),
        ("id,group,fold\n1,a,x\n", f"{bad}, row 2 (id 1): fold 'x' is not a non-negative integer"),
        ("id,group,fold\n1,a\n", f"{bad}, row 2: expected 3 cells (id,group,fold), got 2"),
    ):
        bad.write_text(text)
        with pytest.raises(FoldError, match=f"^{re.escape(message)}$"):
            read_folds_csv(bad)
    with pytest.raises(FoldError, match="cannot read the folds file"):
        read_folds_csv(tmp_path / "missing.csv")
