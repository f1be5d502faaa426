"""The command-line spellings every `avb` command shares, one decorator each (click only; no torch, no h5py).

The convention:
- progress bars: `--progress/--no-progress` (on by default); `--quiet`, the older spelling, is a hidden alias
  of `--no-progress`;
- the corpus, cache and output a command reads or writes are named by options (`--corpus DIR`, `--cache FILE`,
  `--out DIR`); positional arguments are for lists (prediction CSVs, run folders, audio files). A command that
  once took its folder or file as a positional argument (`avb corpus check ROOT`, `avb cache info FILE`,
  `avb synth OUT`) still accepts it there, as an alias of the option;
- a default is defined once, in the config dataclass the command builds; `ConfigDefault` lets a light command
  module take it from a module that imports torch without importing that module before it is needed.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import click

_QUIET = "quiet_alias"


class ConfigDefault:
    """A click `default` read from a config dataclass when click first needs it (a run, or the command's
    --help), e.g. `ConfigDefault("heads.model.architectures:HeadConfig.hidden")`; `convert` turns the field's
    value into the option's spelling (a tuple into "a,b,c"). The owning module is imported then, not when the command module
    is, so `avb --help` and `avb heads --help` stay free of torch."""

    def __init__(self, target: str, convert: Callable[[Any], Any] | None = None) -> None:
        self.target, self.convert = target, convert

    def __call__(self) -> Any:
        module, _, path = self.target.partition(":")
        value: Any = importlib.import_module(module)
        for name in path.split("."):
            value = getattr(value, name)
        return self.convert(value) if self.convert is not None else value

    def __str__(self) -> str:     # what --help shows as [default: ...]
        return str(self())

    def __bool__(self) -> bool:   # which side of a --flag/--no-flag is the default, in --help
        return bool(self())

    def __repr__(self) -> str:
        return f"ConfigDefault({self.target!r})"


def csv_text(values: Any) -> str:
    """A tuple default as a comma-separated option value: ("a", "b") -> "a,b"."""
    return ",".join(str(v) for v in values)


def progress_option(help: str = "Show progress bars.") -> Callable:
    """`--progress/--no-progress` as the command's `progress` parameter; `--quiet` means `--no-progress`."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            if kwargs.pop(_QUIET):
                kwargs["progress"] = False
            return func(*args, **kwargs)

        command = click.option("--quiet", _QUIET, is_flag=True, hidden=True,
                               help="Same as --no-progress (the older spelling).")(command)
        return click.option("--progress/--no-progress", default=True, help=help)(command)

    return decorate


class _NewSpelling(click.Option):
    """The option an `option_or_argument` adds for an older positional spelling."""


class OptionOrArgumentCommand(click.Command):
    """The command class of an `option_or_argument` command: click's "Did you mean ...?" for an unknown option
    never proposes the option added for the older positional spelling (so `--bogus` is not answered with
    "Did you mean '--corpus'?"), and the errors stay what they were before that option existed."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as err:
            added = {opt for p in self.params if isinstance(p, _NewSpelling) for opt in p.opts}
            if not added & set(err.possibilities or ()):
                raise
            kept = [p for p in err.possibilities if p not in added]
            raise click.NoSuchOption(err.option_name, possibilities=kept, ctx=ctx) from None


def option_or_argument(flag: str, dest: str, metavar: str, *, help: str, type: click.ParamType,
                       required: bool = True) -> Callable:
    """The option `flag` (the command's `dest` parameter), also accepted as an optional positional argument
    METAVAR (the older spelling); giving both with different values is a usage error. The errors of the older
    spelling are unchanged (`Missing argument 'METAVAR'.`, `Invalid value for 'METAVAR': ...`); the command
    needs `cls=OptionOrArgumentCommand`."""
    alias = f"{dest}_argument"

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            positional, given = kwargs.pop(alias), kwargs[dest]
            ctx = click.get_current_context()
            if positional is not None and given is not None and positional != given:
                raise click.UsageError(f"{metavar} and {flag} name different paths; give one of them", ctx)
            if positional is not None:
                kwargs[dest] = positional
            if required and kwargs[dest] is None:
                raise click.UsageError(f"Missing argument '{metavar}'.", ctx)
            return func(*args, **kwargs)

        # no help= on the argument: click takes it only from 8.5; the usage line shows the metavar
        command = click.argument(alias, metavar=metavar, required=False, type=type)(command)
        return click.option(flag, dest, cls=_NewSpelling, default=None, type=type,
                            help=help + ("  [required]" if required else ""))(command)

    return decorate
