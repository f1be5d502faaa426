"""The task definitions carry the official column names and order (avb-format.md)."""
import pytest

from heads.tasks import AVB, COUNTRIES, EMOTIONS, TYPE_CLASSES, TaskError


def test_high_and_two_columns_are_official():
    assert AVB["high"].columns == (
        "Awe", "Excitement", "Amusement", "Awkwardness", "Fear",
        "Horror", "Distress", "Triumph", "Sadness", "Surprise",
    )
    assert AVB["two"].columns == ("Valence", "Arousal")


def test_culture_columns_have_surprise_last_and_spaces_in_countries():
    cols = AVB["culture"].columns
    assert len(cols) == 40 and len(set(cols)) == 40
    assert cols[:9] == tuple(f"China_{e}" for e in EMOTIONS[:9])
    assert cols[9] == "United States_Awe" and cols[18] == "South Africa_Awe" and cols[27] == "Venezuela_Awe"
    assert cols[-4:] == ("China_Surprise", "United States_Surprise", "South Africa_Surprise", "Venezuela_Surprise")


def test_type_task():
    task = AVB["type"]
    assert task.classes == ("Gasp", "Laugh", "Cry", "Scream", "Grunt", "Groan", "Pant", "Other")
    assert task.out_dim == 8 and task.label_dim == 1 and task.columns == ("Voc_Type",)
    assert TYPE_CLASSES == task.classes and len(COUNTRIES) == 4


def test_task_order_is_the_papers_and_lookup_errors_are_clear():
    assert AVB.names == ("type", "two", "high", "culture")
    assert AVB.get("HIGH").name == "high"
    with pytest.raises(TaskError, match="unknown task 'tone'; expected one of type, two, high, culture"):
        AVB.get("tone")
    assert AVB.parse_order("culture, high,two,type") == ("culture", "high", "two", "type")
    with pytest.raises(TaskError, match="exactly once"):
        AVB.parse_order("type,two,high,high")
