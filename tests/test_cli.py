"""The `avb` group: every lazily named subcommand exists, and the light CLI copies of registries agree."""
import importlib

from click.testing import CliRunner

from extract.cli import COMMANDS, main


def test_every_subcommand_in_the_lazy_map_resolves_and_has_help():
    for name, (target, _) in COMMANDS.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
        result = CliRunner().invoke(main, [name, "--help"])
        first_line = result.output.splitlines()[0] if result.output else ""
        assert result.exit_code == 0 and first_line.startswith("Usage:") and f" {name} " in first_line, result.output
    listed = CliRunner().invoke(main, ["--help"]).output
    assert all(f"  {name} " in listed for name in COMMANDS)


def test_cli_choices_match_the_registries_they_mirror():
    from heads.cli import ARCH_CHOICES, WEIGHTING_CHOICES
    from heads.names import ARCHS, WEIGHTINGS

    assert tuple(ARCH_CHOICES) == tuple(ARCHS)
    assert tuple(WEIGHTING_CHOICES) == tuple(WEIGHTINGS)
