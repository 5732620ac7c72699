"""Turn a config dataclass into Typer options, so `--help` text comes from the field docstrings.

Usage::

    @app.command()
    @config_options(HarvestConfig, config_file=True)
    def harvest(cfg: HarvestConfig, verbose: bool = False): ...

Every field becomes `--field-name` (underscores → dashes).  Options default to "not
given"; the config is built from the dataclass defaults, then the TOML file
(`--config`), then the flags actually typed, so a flag always wins.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

from saekit.config import field_docs, from_dict, load_toml, type_hints


def _cli_type(tp):
    """The type Typer sees: lists and unions become strings (parsed by saekit.config)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple):
        return str
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else str
    if tp in (int, float, str, bool, Path):
        return tp
    return str


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        d = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        d = f.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if isinstance(d, (list, tuple)):
        d = ",".join(map(str, d)) if d else ""
    return f"default: {d}" if d not in (None, "") else "default: none"


def config_options(cls, *, config_file: bool = False, exclude: tuple[str, ...] = (), panel: str | None = None):
    """Decorator: replace the wrapped command's `cfg` parameter by one option per field of `cls`."""
    docs = field_docs(cls)
    hints = type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "cfg"]
        params = []
        for f in fields:
            tp = _cli_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            decls = [flag] if tp is not bool else [f"{flag}/--no-{f.name.replace('_', '-')}"]
            decls += list(f.metadata.get("aliases", ()))  # extra spellings, e.g. --hook for `hooks`
            help_text = f"{docs.get(f.name, '')} \\[{_default_text(f)}]"
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, *decls, help=help_text, show_default=False, rich_help_panel=panel),
                    annotation=Optional[tp],
                )
            )
        if config_file:
            params.append(
                inspect.Parameter(
                    "config",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, "--config", help="TOML file with the same fields; flags typed here win."),
                    annotation=Optional[Path],
                )
            )
        names = {f.name for f in fields}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            data = load_toml(kwargs.pop("config")) if config_file and kwargs.get("config") else {}
            kwargs.pop("config", None)
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            data.update({k: v for k, v in given.items() if v is not None})
            cfg = from_dict(cls, data, where=f"{cls.__name__} options")
            return fn(cfg, **kwargs)

        kinds = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = sig.replace(parameters=kinds + params)
        return wrapper

    return decorate
