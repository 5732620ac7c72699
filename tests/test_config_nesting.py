"""A dictionary's architecture (DictConfig) nested in the run configs: flat CLI flags, nested objects, one layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from saekit.config import from_dict, from_flags, nest
from saekit.dictionaries.base import DictConfig
from saekit.errors import SaekitError
from saekit.inmodel.e2e import E2EConfig
from saekit.train import TrainConfig


def test_nested_configs_are_read_from_source_and_flattened():
    """No fallback to importing the class: --help stays torch-free; the nested fields become flags of their own names."""
    from saekit_cli.options import _read_source, flags_of

    train = {f.name: outer for f, outer in flags_of(_read_source("saekit.train:TrainConfig"))}
    assert {n for n, o in train.items() if o == "arch"} == {"kind", "d_dict", "groups", "similarity", "activation"}
    assert train["k"] is None and train["l1"] is None  # the run's sweep lists, not arch.k / arch.l1
    assert "arch" not in train and "d_in" not in train
    e2e = {f.name: (outer, f.default) for f, outer in flags_of(_read_source("saekit.inmodel.e2e:E2EConfig"))}
    assert e2e["k"] == ("arch", 32) and e2e["l1"] == ("arch", 5.0)  # E2E's own defaults for its nested DictConfig


def _cli(target: str):
    from saekit_cli.options import config_options

    got = {}
    app = typer.Typer()

    @app.command()
    @config_options(target, config_file=True)
    def run(cfg):
        got["cfg"] = cfg

    @app.command()
    def other():  # two commands: typer then expects the command's name
        pass

    return app, got


def test_cli_flags_build_the_nested_config(tmp_path):
    app, got = _cli("saekit.train:TrainConfig")
    res = CliRunner().invoke(app, ["run", "--store", "s", "--kind", "codebook", "--d-dict", "64", "--groups", "2",
                                   "--similarity", "inner", "--k", "1,2"])
    assert res.exit_code == 0, res.output
    cfg = got["cfg"]
    assert cfg.arch == DictConfig(kind="codebook", d_dict=64, groups=2, similarity="inner") and cfg.k == [1, 2]
    toml = tmp_path / "c.toml"
    toml.write_text('store = "s"\nk = [4]\n[arch]\nkind = "relu"\nd_dict = 96\n')
    res = CliRunner().invoke(app, ["run", "--config", str(toml), "--d-dict", "128"])  # a flag wins over the file's table
    assert res.exit_code == 0, res.output
    assert got["cfg"].arch == DictConfig(kind="relu", d_dict=128) and got["cfg"].k == [4]


def test_e2e_cli_keeps_its_nested_defaults():
    app, got = _cli("saekit.inmodel.e2e:E2EConfig")
    res = CliRunner().invoke(app, ["run", "--hooks", "h", "--kind", "batchtopk"])
    assert res.exit_code == 0, res.output
    assert got["cfg"].arch == DictConfig(kind="batchtopk", k=32, l1=5.0)


def test_flat_names_nest_the_same_way_everywhere():
    flat = dict(store="s", kind="relu", d_dict=32, l1=[0.5, 1.0], batch_size=64)
    assert nest(TrainConfig, flat) == {"store": "s", "arch": {"kind": "relu", "d_dict": 32}, "l1": [0.5, 1.0], "batch_size": 64}
    assert from_flags(TrainConfig, **flat) == from_dict(TrainConfig, nest(TrainConfig, flat))
    assert from_flags(E2EConfig, kind="relu").arch == DictConfig(kind="relu", k=32, l1=5.0)


def test_run_configs_refuse_what_the_run_sets_per_dictionary():
    with pytest.raises(ValueError, match="arch.k is set per dictionary"):
        TrainConfig(arch=DictConfig(k=8))
    with pytest.raises(ValueError, match="d_in"):
        TrainConfig(arch=DictConfig(d_in=8))
    with pytest.raises(SaekitError, match=r"belongs in the \[arch\] table"):
        from_dict(TrainConfig, {"kind": "relu"})  # a flat TOML key names its table
    with pytest.raises(SaekitError, match="is a table"):
        from_dict(TrainConfig, {"arch": "relu"})
    with pytest.raises(SaekitError, match="--groups must be positive"):
        from_dict(TrainConfig, {"arch": {"groups": 0}})


def test_the_run_config_round_trips_through_json():
    cfg = from_flags(TrainConfig, store="s", kind="codebook", d_dict=64, groups=2, k=[1])
    from saekit.config import to_dict

    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert to_dict(cfg)["arch"] == dataclasses.asdict(cfg.arch)


def test_the_automatic_lr_is_the_default_and_zero_is_refused():
    """`--lr` not given: the size rule (recorded in config.json, see test_train); 0, negative or NaN: one line, exit 2."""
    import subprocess
    import sys

    assert TrainConfig().lr is None
    for bad in ("0", "-1", "nan"):
        r = subprocess.run([sys.executable, "-m", "saekit_cli.main", "train", "--store", "nowhere", "--lr", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.startswith("error: --lr") and "Traceback" not in r.stderr, (bad, r.stderr)
    with pytest.raises(ValueError, match="--lr must be positive"):
        E2EConfig(lr=0.0)
