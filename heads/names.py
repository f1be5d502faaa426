"""The names and shared defaults of both stages, in one torch-free place.

Each registry keeps its classes beside their code (`heads.model.architectures.ARCHITECTURES`,
`heads.model.weighting.WEIGHTINGS`, the strategies of `heads.analysis.ensemble`); this module owns their *names* (in the paper's order), so a command line,
a config check or a table can name them without importing torch. tests/test_names.py checks that every
registry's keys equal the names here.

The defaults below are the paper's settings that more than one config or command shares.
"""
from __future__ import annotations

# ------------------------------------------------------------------------------------------------ names
ARCHS: tuple[str, ...] = ("vanilla", "chain", "branch")                 # heads.model.architectures.ARCHITECTURES
WEIGHTINGS: tuple[str, ...] = (                                          # heads.model.weighting.WEIGHTINGS
    "uniform", "dwa", "rruw", "druw", "uw", "rlw", "gls", "famo")
PAPER_WEIGHTINGS: tuple[str, ...] = WEIGHTINGS[:4]   # the paper's Table I, and the default grid
# Group titles of the loss weightings as the paper's Table I prints them (and the four added beside them).
WEIGHTING_TITLES: dict[str, str] = {
    "uniform": "Uniform Weighting",
    "dwa": "Dynamic Weight Average",
    "rruw": "Restrained Revised Uncertainty Weighting",
    "druw": "Dynamic Restrained Uncertainty Weighting",
    "uw": "Uncertainty Weighting",
    "rlw": "Random Loss Weighting",
    "gls": "Geometric Loss Strategy",
    "famo": "Fast Adaptive Multitask Optimization",
}
ENSEMBLE_STRATEGIES: tuple[str, ...] = ("combined", "mean", "greedy")   # heads.analysis.ensemble.STRATEGIES

# ------------------------------------------------------------------------------------------------ defaults
DEFAULT_EPOCHS = 30            # training epochs, of the backbone fine-tuning and of every head run
CLIP_SECONDS = 2.5             # every clip is cut or zero-padded to this length (the paper's random 2.5 s crops)
# Training-state budget of one joint head-training call on the CPU (see heads.training.grid.joint_groups).
HEAD_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")   # heads.training.device: --precision of the heads
DEFAULT_MAX_GROUP_MIB = 640
DEFAULT_MAX_GROUP_BYTES = DEFAULT_MAX_GROUP_MIB * 2**20
