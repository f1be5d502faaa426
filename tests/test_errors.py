"""Errors never hide a bug: a user's error is one line, anything else shows its traceback and says it is a bug.

`command_errors()` (cache.command_kit.command) turns an `AvbError` or an OSError into `Error: <one line>` and
exit 1; any other exception (a numpy or torch ValueError included) is printed with its traceback and a line
saying it is a bug; AVB_DEBUG=1 shows the traceback of every error.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import click
import pytest
from click.testing import CliRunner

from cache.command_kit.command import REPORT_BUG, command_errors
from cache.command_kit.errors import AvbError
from cache.command_kit.interrupt import Interrupted

# Errors that are not the user's to fix: an internal contract between two of our functions was broken.
INTERNAL = {"heads.model.losses.LossInputError", "heads.model.layers.RunShapeError"}


class OddInput(AvbError):
    pass


def command_raising(err: BaseException) -> click.Command:
    @click.command()
    def cmd() -> None:
        with command_errors():
            raise err
    return cmd


def run(err: BaseException, **env: str):
    return CliRunner().invoke(command_raising(err), [], env=env)


def test_a_users_error_is_one_line_without_a_traceback():
    result = run(OddInput("data.csv, row 3: not a number: 'x'"))
    assert result.exit_code == 1
    assert result.output == "Error: data.csv, row 3: not a number: 'x'\n"


def test_an_os_error_names_the_path_in_one_line():
    result = run(FileNotFoundError(2, "No such file or directory", "/data/missing.wav"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "/data/missing.wav" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast together with shapes (3,) (4,)"),
                                 KeyError("hidden_12"), TypeError("unsupported operand")])
def test_any_other_exception_is_a_bug_with_its_traceback(bug):
    """A numpy-style ValueError is not dressed as the user's input error: it shows where it came from."""
    result = run(bug)
    assert result.exit_code == 1
    lines = result.output.rstrip("\n").splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert any("test_errors.py" in line and "in cmd" in line for line in lines)   # the frame that raised it
    assert lines[-1] == f"Error: {type(bug).__name__}: {bug} -- {REPORT_BUG}"
    assert result.output.count("Traceback") == 1


def test_avb_debug_shows_the_traceback_of_a_users_error_too():
    quiet = run(OddInput("bad setting"))
    loud = run(OddInput("bad setting"), AVB_DEBUG="1")
    assert "Traceback" not in quiet.output
    assert loud.output.startswith("Traceback (most recent call last):")
    assert loud.output.rstrip("\n").splitlines()[-1] == "Error: bad setting" and loud.exit_code == 1
    assert "Traceback" not in run(OddInput("bad setting"), AVB_DEBUG="0").output


def test_click_usage_errors_and_interruptions_keep_their_own_exit_codes():
    assert run(click.UsageError("no such thing")).exit_code == 2
    result = run(Interrupted(15))
    assert result.exit_code == 143 and "Traceback" not in result.output


def project_error_classes() -> list[type]:
    found = {}
    for pkg in ("cache", "extract", "heads"):
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, f"{pkg}."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == info.name and issubclass(cls, Exception) and cls.__name__.endswith("Error"):
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


def test_every_error_a_user_can_cause_is_an_avb_error():
    """Each module's error class derives from AvbError (or OSError for a failed write): a plain ValueError
    raised anywhere is then a bug by construction, never a silent one-liner."""
    classes = project_error_classes()
    assert len(classes) > 20   # the walk really found the modules' error classes
    wrong = [f"{c.__module__}.{c.__qualname__}" for c in classes
             if not issubclass(c, (AvbError, OSError)) and f"{c.__module__}.{c.__qualname__}" not in INTERNAL]
    assert wrong == []
    for name in INTERNAL:
        module, _, cls = name.rpartition(".")
        assert not issubclass(getattr(importlib.import_module(module), cls), AvbError), name
