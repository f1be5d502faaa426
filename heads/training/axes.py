"""Grid axes beyond architecture x weighting x seed: `avb heads ablate --vary FIELD=V1,V2,...`.

An axis is a training field (lr, weight_decay, batch_size, grad_clip, patience, lr_factor, epochs), a head field
(hidden, dropout, input_layer, chain_order, n_heads, branch_blocks) or one weighting's option, spelled
`<weighting>_<option>` (dwa_temperature, rruw_phi, druw_beta, ...). The grid is the product of all axes, each
applied only where it means something: `chain_order` to CHAIN runs, `n_heads` and `branch_blocks` to BRANCH
runs, `input_layer` to VANILLA and CHAIN runs, a weighting's option to that weighting's runs, so no two runs
of a grid are the same run. `chain_order=all` is every permutation of the cache's tasks (24 for A-VB); an order
is written with `+` between tasks (`two+type+high+culture`).

A run's folder name gains `-<field>=<value>` for each axis that applies to it, in the order the axes were
given (`chain-uniform-s0-chain_order=two+type+high+culture-lr=0.003`): readable, and stable for a given
command. Runs whose axes leave the stacked shapes alone (lr, dropout, weighting options) still train in one
joint group (`heads.training.joint.shape_key`).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from cache.command_kit.errors import AvbError
from heads.model.architectures import HeadConfig
from heads.model.weighting import weighting_options
from heads.names import WEIGHTINGS
from heads.tasks import TaskSet

TRAIN_AXES: tuple[str, ...] = ("lr", "weight_decay", "batch_size", "grad_clip", "patience", "lr_factor", "epochs")
HEAD_AXES: tuple[str, ...] = ("hidden", "dropout", "input_layer", "chain_order", "n_heads", "branch_blocks")
# The architectures a head axis changes anything for (the others: every architecture).
AXIS_ARCHS: dict[str, tuple[str, ...]] = {
    "chain_order": ("chain",), "n_heads": ("branch",), "branch_blocks": ("branch",),
    "input_layer": ("vanilla", "chain"),
}
ALL_ORDERS = "all"


class AxisError(AvbError):
    """A --vary that names no field, or a value the field cannot take; one line."""


def _weighting_option(name: str) -> tuple[str, str] | None:
    """'druw_beta' -> ('druw', 'beta') when that weighting has that option."""
    for weighting in WEIGHTINGS:
        prefix = weighting + "_"
        if name.startswith(prefix) and name[len(prefix):] in weighting_options(weighting):
            return weighting, name[len(prefix):]
    return None


def valid_names() -> list[str]:
    return [*TRAIN_AXES, *HEAD_AXES, *(f"{w}_{o}" for w in WEIGHTINGS for o in weighting_options(w))]


def _typed(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise AxisError(f"--vary {name}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def parse_vary(specs: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """['lr=1e-3,3e-3', 'chain_order=all'] -> {'lr': (0.001, 0.003), 'chain_order': ('all',)}, typed by field."""
    from heads.training.joint import TrainConfig  # noqa: PLC0415 - joint imports this module's users

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_AXES}
    defaults.update({f.name: f.default for f in dataclasses.fields(HeadConfig) if f.name in HEAD_AXES})
    axes: dict[str, tuple[Any, ...]] = {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise AxisError(f"--vary {spec!r}: expected FIELD=V1,V2,...")
        if name in axes:
            raise AxisError(f"--vary {name} is given twice")
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise AxisError(f"--vary {name}: no values")
        if name == "chain_order":
            values: list[Any] = [ALL_ORDERS] if parts == [ALL_ORDERS] else [tuple(p.lower().split("+")) for p in parts]
        elif name in defaults:
            kind = type(defaults[name]) if not isinstance(defaults[name], tuple) else str
            values = [_typed(name, p, kind) if kind in (int, float) else p for p in parts]
        elif _weighting_option(name) is not None:
            values = [_typed(name, p, float) for p in parts]
        else:
            raise AxisError(f"--vary: unknown field {name!r}; expected one of {', '.join(valid_names())}")
        if len(set(values)) != len(values):
            raise AxisError(f"--vary {name}: a value is listed twice")
        axes[name] = tuple(values)
    return axes


def resolve(axes: Mapping[str, Sequence[Any]], tasks: TaskSet) -> dict[str, tuple[Any, ...]]:
    """`chain_order=all` as every permutation of the tasks; every listed order checked against them."""
    out = {}
    for name, values in axes.items():
        if name == "chain_order":
            if list(values) == [ALL_ORDERS]:
                values = list(itertools.permutations(tasks.names))
            try:
                values = [tasks.parse_order(list(v)) for v in values]
            except AvbError as err:
                raise AxisError(f"--vary chain_order: {err}") from None
        out[name] = tuple(tuple(v) if isinstance(v, list) else v for v in values)
    return out


def applies(name: str, arch: str, weighting: str) -> bool:
    option = _weighting_option(name)
    if option is not None:
        return option[0] == weighting
    return arch in AXIS_ARCHS.get(name, (arch,))


def value_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variants(axes: Mapping[str, Sequence[Any]], arch: str, weighting: str) -> list[dict[str, Any]]:
    """The combinations of the axes that apply to runs of `arch` x `weighting` ([{}] without any)."""
    names = [n for n in axes if applies(n, arch, weighting)]
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def apply(cfg: Any, values: Mapping[str, Any]) -> Any:
    """A TrainConfig with the axes' values set, and its `variant` (the folder name's suffix)."""
    train = {n: v for n, v in values.items() if n in TRAIN_AXES}
    head = {n: tuple(v) if n == "chain_order" else v for n, v in values.items() if n in HEAD_AXES}
    options = dict(cfg.weighting_options)
    for name, value in values.items():
        option = _weighting_option(name)
        if option is not None:
            options[option[1]] = value
    variant = "".join(f"-{n}={value_text(v)}" for n, v in values.items())
    return dataclasses.replace(cfg, **train, head=dataclasses.replace(cfg.head, **head), weighting_options=options,
                               variant=variant)


def axis_value(cfg: Any, name: str) -> Any:
    """The value of axis `name` in a run's config (its default where the axis does not apply)."""
    if name in TRAIN_AXES:
        return getattr(cfg, name)
    if name in HEAD_AXES:
        return getattr(cfg.head, name)
    weighting, option = _weighting_option(name) or ("", "")
    return cfg.weighting_options.get(option, weighting_options(weighting).get(option)) \
        if cfg.weighting == weighting else None
