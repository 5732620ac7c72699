"""The `saekit` command's front end: `--help` without the heavy stack, options read from source, help panels."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest
from typer.testing import CliRunner

HEAVY = ("torch", "transformers", "transformer_lens", "h5py", "matplotlib", "numpy", "safetensors")


def _imported_after(code: str) -> list[str]:
    """Heavy modules present in sys.modules after running `code` in a fresh interpreter."""
    probe = f"""
import sys
try:
{chr(10).join('    ' + line for line in code.splitlines())}
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("HEAVY:"))
    return [m for m in line[len("HEAVY:"):].split(",") if m]


def test_importing_the_cli_imports_no_heavy_module():
    assert _imported_after("import saekit_cli.main") == []


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["harvest", "--help"], ["toy", "data", "--help"],
                                  ["finetune", "--help"], ["splice-eval", "--help"]])
def test_help_imports_no_heavy_module(argv):
    code = f"import sys\nsys.argv = ['saekit', *{argv!r}]\nfrom saekit_cli.main import main\nmain()"
    assert _imported_after(code) == []


def test_source_reading_equals_the_dataclass():
    import importlib

    import saekit_cli.main  # noqa: F401  (registers every command)
    from saekit_cli.options import TARGETS, _spec_of_class, read_config

    from saekit.config import field_docs

    assert len(TARGETS) >= 10
    for target in TARGETS:
        spec = read_config(target)
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        real = dataclasses.fields(cls)
        assert [f.name for f in spec.fields] == [f.name for f in real], target
        for s, f in zip(spec.fields, real):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if dataclasses.is_dataclass(hints[f.name]):  # a nested config (TrainConfig.arch): read from source too
                assert s.type == _spec_of_class(hints[f.name]), (target, s.name)
                default = dataclasses.asdict(default)
            else:
                assert s.type == hints[f.name], (target, s.name)
            assert s.default == default, (target, s.name)
            assert s.doc == docs.get(f.name, ""), (target, s.name)
            assert s.metadata == dict(f.metadata), (target, s.name)


def test_every_device_option_defaults_to_auto():
    import saekit_cli.main  # noqa: F401
    from saekit_cli.options import TARGETS, read_config

    devices = {t: f.default for t in TARGETS for f in read_config(t).fields if f.name == "device"}
    assert len(devices) >= 5
    assert set(devices.values()) == {"auto"}, devices


def _help(*argv: str) -> str:
    from saekit_cli.main import app

    res = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return res.output


def test_help_panels_required_marks_and_no_bool_metavar():
    text = _help("train")
    for panel in ("Data", "Dictionary", "Optimiser", "Dead latents", "In-model (end-to-end)", "Device and distributed"):
        assert f"─ {panel} " in text, panel
    store_line = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("--store "))
    assert "[required]" in store_line
    for argv in ((), ("toy",), ("train",), ("harvest",), ("splice-eval",), ("analyze",), ("steer",), ("toy", "data"), ("pipeline",),
                 ("info",), ("hooks",), ("toy", "eval")):
        text = _help(*argv)
        assert "<bool>" not in text, argv  # flags take no value; --help included
        assert "default: none" not in text, argv
    harvest = _help("harvest")
    for flag in ("--data ", "--out ", "--hooks "):
        assert "[required]" in next(line for line in harvest.splitlines() if line.lstrip("│ ").startswith(flag)), flag


def test_a_config_the_source_reader_cannot_follow_is_read_from_the_class(tmp_path, monkeypatch):
    """A default computed by a call falls back to importing the class: same fields, the command still works."""
    pkg = tmp_path / "cfgpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(
        "from dataclasses import dataclass, field\n"
        "def _k():\n    return [4, 8]\n"
        "@dataclass\nclass Cfg:\n    k: list[int] = field(default_factory=_k)\n    \"\"\"Sweep.\"\"\"\n"
        "    name: str = 'x'\n    \"\"\"Name.\"\"\"\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from saekit_cli.options import _read_source, read_config

    with pytest.raises(Exception):
        _read_source("cfgpkg.mod:Cfg")
    spec = read_config("cfgpkg.mod:Cfg")
    assert [(f.name, f.default, f.doc) for f in spec.fields] == [("k", [4, 8], "Sweep."), ("name", "x", "Name.")]
