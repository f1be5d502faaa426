"""heads.names: the one list of every registry's names, importable without torch."""
import subprocess
import sys

from heads import names


def test_names_import_without_torch_or_numpy():
    code = "import sys, heads.names; assert not {'torch', 'numpy'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_dump_and_heads_command_modules_load_without_torch():
    """Their --help must not pay torch's import: the names and settings they need are torch-free."""
    code = "import sys, extract.dump, heads.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_registry_has_exactly_the_names_in_their_order():
    from heads.analysis.ensemble import STRATEGIES
    from heads.model.architectures import ARCHITECTURES
    from heads.model.weighting import WEIGHTINGS

    assert tuple(ARCHITECTURES) == names.ARCHS == ("vanilla", "chain", "branch")
    assert tuple(WEIGHTINGS) == names.WEIGHTINGS == ("uniform", "dwa", "rruw", "druw", "uw", "rlw", "gls", "famo")
    assert names.PAPER_WEIGHTINGS == ("uniform", "dwa", "rruw", "druw")
    assert tuple(names.WEIGHTING_TITLES) == names.WEIGHTINGS
    assert tuple(STRATEGIES) == names.ENSEMBLE_STRATEGIES
    for name, cls in WEIGHTINGS.items():
        assert cls.name == name


def test_shared_defaults_reach_every_config():
    from extract.finetune import FinetuneConfig
    from heads.training.grid import GridConfig
    from heads.training.joint import TrainConfig

    assert FinetuneConfig.epochs == TrainConfig.epochs == GridConfig().run.epochs == names.DEFAULT_EPOCHS == 30
    assert FinetuneConfig.clip_seconds == names.CLIP_SECONDS == 2.5
    assert GridConfig.max_group_bytes is None   # the device's budget: DEFAULT_MAX_GROUP_BYTES on the CPU
    assert GridConfig.archs == names.ARCHS and GridConfig.weightings == names.PAPER_WEIGHTINGS
