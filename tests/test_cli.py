"""The `avb` group: every lazily named subcommand exists, and the light CLI copies of registries agree."""
import importlib
import re

from click.testing import CliRunner

from extract.app.cli import COMMANDS, main


def test_every_subcommand_in_the_lazy_map_resolves_and_has_help():
    for name, (target, _) in COMMANDS.items():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target
        result = CliRunner().invoke(main, [name, "--help"])
        first_line = result.output.splitlines()[0] if result.output else ""
        assert result.exit_code == 0 and first_line.startswith("Usage:") and f" {name} " in first_line, result.output
    listed = CliRunner().invoke(main, ["--help"]).output
    assert all(f"  {name} " in listed for name in COMMANDS)


# ------------------------------------------------------------------------- one convention for every command

def _commands():
    """Every (name, click command) of `avb`, the subcommands of its groups included."""
    import click

    ctx = click.Context(main)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        if isinstance(command, click.Group):
            for sub in command.list_commands(ctx):
                yield f"{name} {sub}", command.get_command(ctx, sub)
        else:
            yield name, command


def test_every_command_spells_progress_bars_the_same_way():
    for name, command in _commands():
        options = {opt: param for param in command.params for opt in getattr(param, "opts", ())}
        if "--progress" in options or "--quiet" in options:
            assert options["--progress"].secondary_opts == ["--no-progress"], name
            assert options["--quiet"].hidden, name       # the older spelling, still accepted


def test_old_and_new_spellings_of_synth_and_corpus_check_agree(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    runner = CliRunner()
    small = ["--clips", "9", "--max-seconds", "1"]
    assert runner.invoke(main, ["synth", str(old), *small, "--quiet"]).exit_code == 0
    done = runner.invoke(main, ["synth", "--out", str(new), *small, "--no-progress"])
    assert done.exit_code == 0, done.output
    files = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file())
    assert all((old / f).read_bytes() == (new / f).read_bytes() for f in files)

    positional = runner.invoke(main, ["corpus", "check", str(old), "--json"])
    option = runner.invoke(main, ["corpus", "check", "--corpus", str(old), "--json"])
    assert positional.exit_code == option.exit_code == 0 and positional.output == option.output
    both = runner.invoke(main, ["corpus", "check", str(old), "--corpus", str(new)])
    assert both.exit_code == 2 and "different paths" in both.output
    assert runner.invoke(main, ["corpus", "check", str(old), "--corpus", str(old)]).exit_code == 0
    missing = runner.invoke(main, ["corpus", "check"])
    assert missing.exit_code == 2 and missing.output.startswith("Usage: ")
    assert missing.output.splitlines()[-1] == "Error: Missing argument 'ROOT'."    # as before the option existed
    assert runner.invoke(main, ["synth"]).exit_code == 2
    # click's "Did you mean" never proposes the option added for the old spelling, and still proposes the others
    bogus = runner.invoke(main, ["corpus", "check", str(old), "--bogus"]).output.splitlines()[-1]
    assert bogus.startswith("Error: No such option") and "--bogus" in bogus and "Did you mean" not in bogus
    assert re.search(r"Did you mean '?--json'?\?", runner.invoke(main, ["corpus", "check", str(old), "--jsn"]).output)


def test_old_and_new_spellings_of_cache_info_agree(tmp_path):
    from helpers import make_signal_cache

    path = make_signal_cache(tmp_path / "c.h5", sizes=(6, 4, 2))
    positional = CliRunner().invoke(main, ["cache", "info", str(path), "--json"])
    option = CliRunner().invoke(main, ["cache", "info", "--cache", str(path), "--json"])
    assert positional.exit_code == option.exit_code == 0 and positional.output == option.output


# ------------------------------------------------------------------------- each default defined once

def _option_defaults(command) -> dict:
    import click

    ctx = click.Context(command)
    defaults = {p.name: p.get_default(ctx) for p in command.params if isinstance(p, click.Option)}
    return {k: v for k, v in defaults.items() if v is not None and not type(v).__name__ == "Sentinel"}   # no default


def _spelled(value):
    """A dataclass default as the option spells it: tuples comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def _assert_defaults_come_from(command, configs, unowned, renames=None):
    """Every option with a default equals the same-named field of one of `configs` (or is in `unowned`)."""
    import dataclasses

    defaults = _option_defaults(command)
    fields = {}
    for cls in configs:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                fields.setdefault((renames or {}).get(f.name, f.name), (cls.__name__, f.default))
    for name, value in defaults.items():
        if name in unowned:
            continue
        assert name in fields, f"{command.name} --{name}: no config field owns its default"
        owner, want = fields[name]
        assert value == _spelled(want), f"{command.name} --{name}: {value!r} != {owner}.{name} = {want!r}"


def test_heads_cli_defaults_are_the_config_dataclasses():
    from heads.cli import ablate_command, train_command
    from heads.model.architectures import HeadConfig
    from heads.training.grid import GridConfig
    from heads.training.joint import TrainConfig

    unowned = {"device", "report_to", "progress", "quiet_alias"}
    renames = {"branch_use_frames": "branch_frames"}
    # train's --folds/--fold-seed are the grid's (one round of the grid's cross-validation)
    _assert_defaults_come_from(train_command, [TrainConfig, HeadConfig, GridConfig], unowned, renames)
    _assert_defaults_come_from(ablate_command, [GridConfig, TrainConfig, HeadConfig], unowned | {"ci", "n_boot"},
                               renames)
    # the options named like fields: a renamed or forgotten one would slip through the loop above
    assert {"hidden", "dropout", "input_layer", "chain_order", "n_heads", "branch_blocks", "branch_frames",
            "epochs", "batch_size", "lr", "precision", "arch", "weighting", "seed"} <= set(
                _option_defaults(train_command))
    assert {"archs", "weightings", "seeds", "epochs"} <= set(_option_defaults(ablate_command))


def test_probe_demo_and_finetune_cli_defaults_are_their_configs():
    from extract.app.demo import DemoConfig, demo_command
    from extract.finetune import FinetuneConfig, finetune_command
    from heads.analysis.probe import ProbeConfig, probe_command

    _assert_defaults_come_from(probe_command, [ProbeConfig], {"progress", "quiet_alias"})
    _assert_defaults_come_from(demo_command, [DemoConfig], {"progress", "quiet_alias", "quick"})
    # --no-decoded-audio is the off switch of the decoded_audio field (run_config.decoded_audio_setting)
    _assert_defaults_come_from(finetune_command, [FinetuneConfig], {"progress", "quiet_alias", "no_decoded_audio"})


def test_dump_cli_defaults_are_its_config():
    from extract.dump import DumpConfig, dump_command

    _assert_defaults_come_from(dump_command, [DumpConfig], {"progress", "quiet_alias", "frame_layers",
                                                            "no_decoded_audio"})


def test_score_cli_defaults_are_the_bootstrap_config():
    from extract.app.score import score_command
    from heads.analysis.bootstrap import BootstrapConfig

    _assert_defaults_come_from(score_command, [BootstrapConfig], {"split", "as_json"})
