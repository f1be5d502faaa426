"""Grid axes beyond arch x weighting x seed (`avb heads ablate --vary`): parsing, the product, joint equal to
alone, every chain order, resume and grown grids, and the result tables' columns."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from grids import grid_config
from helpers import make_signal_cache

from cache.reader import load_cache
from extract.app.cli import main as avb
from heads.model.architectures import HeadConfig
from heads.tasks import AVB
from heads.training import grid as grid_mod
from heads.training.axes import AxisError, parse_vary, resolve, variants
from heads.training.grid import run_grid
from heads.training.joint import TrainConfig, train_runs

torch.set_num_threads(1)

HEAD = HeadConfig(hidden=16, n_heads=2, branch_blocks=2)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory) -> Path:
    return make_signal_cache(tmp_path_factory.mktemp("cache") / "signal.h5", sizes=(96, 48, 16))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_parse_types_each_field_and_refuses_in_one_line():
    axes = parse_vary(["lr=1e-3,3e-3", "hidden=64,128", "input_layer=last,weighted", "druw_beta=0,0.5",
                       "chain_order=two+type+high+culture"])
    assert axes == {"lr": (0.001, 0.003), "hidden": (64, 128), "input_layer": ("last", "weighted"),
                    "druw_beta": (0.0, 0.5), "chain_order": (("two", "type", "high", "culture"),)}
    for spec, message in (("colour=1", "--vary: unknown field 'colour'; expected one of lr, weight_decay"),
                          ("hidden=64,x", "--vary hidden: 'x' is not an integer"),
                          ("lr=0.1,0.1", "--vary lr: a value is listed twice"),
                          ("lr", "--vary 'lr': expected FIELD=V1,V2,..."),
                          ("dwa_phi=1", "--vary: unknown field 'dwa_phi'")):
        with pytest.raises(AxisError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
            parse_vary([spec])
    with pytest.raises(AxisError, match="^--vary chain_order: task order 'type' must name each of"):
        resolve(parse_vary(["chain_order=type"]), AVB)


def test_all_chain_orders_and_where_each_axis_applies():
    axes = resolve(parse_vary(["chain_order=all", "druw_beta=0,1", "n_heads=2,4"]), AVB)
    assert len(axes["chain_order"]) == 24 and len(set(axes["chain_order"])) == 24
    assert axes["chain_order"][0] == ("type", "two", "high", "culture")
    assert len(variants(axes, "chain", "druw")) == 48          # orders x beta; n_heads is BRANCH's
    assert len(variants(axes, "chain", "uniform")) == 24
    assert variants(axes, "vanilla", "uniform") == [{}]
    assert len(variants(axes, "branch", "druw")) == 4


def test_varied_runs_that_keep_the_shapes_train_in_one_stack_and_equal_alone(cache_file, tmp_path, monkeypatch):
    calls = []
    real = grid_mod.train_runs
    monkeypatch.setattr(grid_mod, "train_runs", lambda cache, configs, dirs, **kw: (
        calls.append([c.name for c in configs]), real(cache, configs, dirs, **kw))[1])
    grid = grid_config(cache_file, archs=("vanilla",), weightings=("uniform", "druw"), seeds=(0,), epochs=2,
                       head=HEAD, vary=parse_vary(["lr=0.001,0.004", "dropout=0.1,0.4", "druw_beta=0,2"]))
    run_grid(grid, tmp_path / "grid", progress=False, bootstrap=None)
    assert len(calls) == 1 and len(calls[0]) == 4 + 8              # one stack: lr, dropout, beta are per run
    rows = read_csv(tmp_path / "grid" / "results.csv")
    assert list(rows[0])[:6] == ["arch", "weighting", "seed", "lr", "dropout", "druw_beta"]
    assert {r["druw_beta"] for r in rows if r["weighting"] == "uniform"} == {""}
    cache = load_cache(cache_file)
    for name in ("vanilla-druw-s0-lr=0.004-dropout=0.4-druw_beta=2", "vanilla-uniform-s0-lr=0.001-dropout=0.1"):
        config = json.loads((tmp_path / "grid" / name / "config.json").read_text())
        cfg = TrainConfig.from_dict({k: v for k, v in config.items() if k not in ("run_format", "cache",
                                                                                   "cache_attrs")})
        alone = train_runs(cache, [cfg], [tmp_path / "alone" / name], progress=False)[0]
        together = json.loads((tmp_path / "grid" / name / "metrics.json").read_text())
        for key in (*AVB.metric_keys, "mean"):
            assert together[key] == pytest.approx(alone[key], abs=1e-5), (name, key)
    druw = json.loads((tmp_path / "grid" / "vanilla-druw-s0-lr=0.004-dropout=0.4-druw_beta=2" / "config.json")
                      .read_text())
    assert druw["lr"] == 0.004 and druw["head"]["dropout"] == 0.4 and druw["weighting_options"] == {"beta": 2.0}


def test_chain_orders_resume_and_a_grown_grid_reuses_its_runs(cache_file, tmp_path, monkeypatch):
    calls = []
    real = grid_mod.train_runs
    monkeypatch.setattr(grid_mod, "train_runs", lambda cache, configs, dirs, **kw: (
        calls.append([c.name for c in configs]), real(cache, configs, dirs, **kw))[1])
    orders = "chain_order=type+two+high+culture,culture+high+two+type"
    args = dict(archs=("chain", "vanilla"), weightings=("uniform",), seeds=(0,), epochs=1, head=HEAD)
    run_grid(grid_config(cache_file, **args, vary=parse_vary([orders])), tmp_path / "g", progress=False,
             bootstrap=None)
    assert len(calls) == 3                         # each chain order its own stack (other shapes), and VANILLA
    stamp = (tmp_path / "g" / "vanilla-uniform-s0" / "metrics.json").stat().st_mtime_ns
    calls.clear()
    run_grid(grid_config(cache_file, **args, vary=parse_vary([orders])), tmp_path / "g", progress=False,
             bootstrap=None)
    assert calls == []                             # resumed: nothing left to train
    grown = orders + ",two+type+high+culture"
    run_grid(grid_config(cache_file, **args, vary=parse_vary([grown])), tmp_path / "g", progress=False,
             bootstrap=None)
    assert calls == [["chain-uniform-s0-chain_order=two+type+high+culture"]]
    assert (tmp_path / "g" / "vanilla-uniform-s0" / "metrics.json").stat().st_mtime_ns == stamp
    config = json.loads((tmp_path / "g" / "chain-uniform-s0-chain_order=culture+high+two+type" / "config.json")
                        .read_text())
    assert config["head"]["chain_order"] == ["culture", "high", "two", "type"]
    table = (tmp_path / "g" / "results.md").read_text()
    assert "*CHAIN* chain_order=two+type+high+culture" in table and len(read_csv(tmp_path / "g" / "results.csv")) == 4


def test_cli_vary_and_its_errors(cache_file, tmp_path):
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(tmp_path / "g"),
                                   "--archs", "chain,vanilla", "--weightings", "druw", "--epochs", "1", "--hidden",
                                   "16", "--vary", "chain_order=all", "--vary", "druw_beta=0,1", "--ci", "0",
                                   "--batch-size", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    folders = sorted(p.name for p in (tmp_path / "g").iterdir() if p.is_dir())
    assert len(folders) == 24 * 2 + 2            # CHAIN: every order x beta; VANILLA: beta only
    assert "vanilla-druw-s0-druw_beta=1" in folders
    res = CliRunner().invoke(avb, ["heads", "ablate", "--cache", str(cache_file), "--out", str(tmp_path / "h"),
                                   "--vary", "colour=red"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "unknown field 'colour'" in res.output and not (tmp_path / "h").exists()
