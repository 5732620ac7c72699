"""Typed configs shared by the library and the CLI.

Every stage has a dataclass config whose fields carry a one-line docstring (the string
literal under the field).  `field_docs` reads those, so the CLI's `--help` comes from the
same text the library documents.  `from_dict` builds a config from TOML/JSON, refusing
unknown fields with the closest valid name.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any, TypeVar

from saekit.errors import SaekitError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name → the docstring written under it in the class body (for every base class too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert TOML/CLI values to the field's type (comma strings → lists, str → Path)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is typing.Union or (sys.version_info >= (3, 10) and origin is __import__("types").UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name) if inner else value
    if origin in (list, tuple):
        item = args[0] if args else str
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, name) for v in value]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, where=f"[{name}]")
        if not isinstance(value, tp):
            raise SaekitError(f"config field {name!r} is a table of {tp.__name__} fields, got {value!r}")
        return value
    try:
        if tp is bool and isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str, Path) and not isinstance(value, tp):
            return tp(value)
    except (TypeError, ValueError):
        raise SaekitError(f"config field {name!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict, *, where: str = "config") -> T:
    """Build `cls` from a mapping, refusing unknown fields (with the close match named)."""
    names = {f.name for f in dataclasses.fields(cls)}
    hints = type_hints(cls)
    table_of = {sub.name: f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])
                for sub in dataclasses.fields(hints[f.name])}
    for key in data:
        if key in table_of and key not in names:
            raise SaekitError(f"field {key!r} belongs in the [{table_of[key]}] table of {where} ({table_of[key]}.{key})")
        if key not in names:
            raise SaekitError(f"unknown field {key!r} in {where}{did_you_mean(key, names)}; valid fields: {', '.join(sorted(names))}")
    data = {k: _over_default(cls, k, v) for k, v in data.items()}
    kwargs = {k: _coerce(v, hints[k], k) for k, v in data.items()}
    try:
        cfg = cls(**kwargs)
        check_fields(cfg)
    except ValueError as e:
        raise SaekitError(str(e)) from None
    return cfg


def _over_default(cls, name: str, value: Any) -> Any:
    """A nested config given as a table changes only the fields it names: the rest keep the outer
    config's default for it (E2EConfig's `arch` defaults to k=32, not DictConfig's k=None)."""
    default = _default(cls, name)
    if isinstance(value, dict) and dataclasses.is_dataclass(default):
        return dataclasses.asdict(default) | value
    return value


def nest(cls, flat: dict) -> dict:
    """Flat names, as the CLI spells them, in `cls`'s layout: a name that is no field of `cls` but a
    field of one of its nested configs goes into that config's table (`kind` → `arch.kind`)."""
    hints = type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    tables = {f.name: {s.name for s in dataclasses.fields(hints[f.name])} for f in dataclasses.fields(cls)
              if dataclasses.is_dataclass(hints[f.name])}
    out: dict = {}
    for key, value in flat.items():
        table = next((t for t, subs in tables.items() if key in subs), None) if key not in names else None
        if table is None:
            out[key] = {**value, **out[key]} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        else:
            out.setdefault(table, {})[key] = value
    return out


def from_flags(cls: type[T], **flat) -> T:
    """`cls` from flat options as the CLI spells them (`TrainConfig` from kind=…, d_dict=…, k=[…]): the
    library's twin of the command line; nested fields not named keep the outer default; raises what the constructor raises."""
    kwargs = {}
    for key, value in nest(cls, flat).items():
        default = _default(cls, key)
        kwargs[key] = dataclasses.replace(default, **value) if isinstance(value, dict) and dataclasses.is_dataclass(default) else value
    return cls(**kwargs)


def apply_preset(cfg: T, values: dict) -> T:
    """`cfg` with a preset's flat `values` in every field still at its class default (what the user set wins);
    a name of a nested config's field (`n_layer` of ToyTrainConfig.lm) goes into that config."""
    default = type(cfg)()
    changes, nested = {}, {}
    for f in dataclasses.fields(cfg):
        inner = getattr(cfg, f.name)
        if dataclasses.is_dataclass(inner):
            sub = {k: v for k, v in values.items() if k in {g.name for g in dataclasses.fields(inner)}}
            nested[f.name] = {k: v for k, v in sub.items() if getattr(inner, k) == getattr(getattr(default, f.name), k)}
        elif f.name in values and inner == getattr(default, f.name):
            changes[f.name] = values[f.name]
    changes |= {name: dataclasses.replace(getattr(cfg, name), **sub) for name, sub in nested.items() if sub}
    return dataclasses.replace(cfg, **changes)


def command_flags(cfg, skip: tuple[str, ...] = ()) -> str:
    """The options that rebuild `cfg` from the defaults (`--n-layer 2 --steps 30`), nested fields spelt flat as the CLI spells them."""
    def flat(obj, outer_names: set[str]) -> dict:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out |= {k: v for k, v in flat(value, set()).items() if k not in outer_names}
            elif f.metadata.get("flag", True):
                out[f.name] = value
        return out

    names = {f.name for f in dataclasses.fields(cfg)}
    defaults = {f.name: _default(type(cfg), f.name) for f in dataclasses.fields(cfg)}
    base: dict = {}
    for f in dataclasses.fields(cfg):
        d = defaults[f.name]
        base |= {k: v for k, v in flat(d, set()).items() if k not in names} if dataclasses.is_dataclass(d) else {f.name: d}
    given = flat(cfg, names)
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if k not in skip and v != base.get(k))


def _default(cls, name: str) -> Any:
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        return None
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SaekitError(f"config file {p} {'is a folder' if p.is_dir() else 'does not exist'}; give a TOML file")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"config file {p} is not valid TOML: {e}") from None


def to_dict(cfg) -> dict:
    """JSON-safe dict of a config (Paths become strings)."""

    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(cfg).items()}


def check_signs(cfg, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """For `__post_init__`: ValueError naming the first field in `positive` that is ≤ 0 or in `non_negative` that is < 0."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(cfg, name)}")


# --- ranges of numeric fields -------------------------------------------------------------------

RANGES = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must not be negative"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "unit": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "any": (lambda v: True, ""),
}
"""A field's `metadata={"range": NAME}` picks one of these; a NaN or infinite value is refused whatever the range.
List fields must not repeat a value unless their metadata says `"repeats": True`."""

DEFAULT_RANGES = {
    **dict.fromkeys(("batch_size", "expansion", "groups", "k", "samples", "max_new_tokens", "bins", "top_n", "n_logits",
                     "pairs", "states", "steps", "log_every", "shard_tokens", "eval_sequences", "init_rows", "n_seq",
                     "codes", "codebook_k", "train_tokens", "n_states", "n_layer", "d_model", "n_head", "d_mlp", "ctx",
                     "eval_seqs", "eval_every", "out_degree", "digits"), "positive"),
    **dict.fromkeys(("holdout",), "fraction"),
    **dict.fromkeys(("l1_warmup", "dense_threshold"), "unit"),
    "strength": "any",
}
"""Ranges by field name, where a field gives none in its metadata; every other number must not be negative."""


def check_fields(cfg) -> None:
    """For `__post_init__` (and run by `from_dict`): ValueError naming the first numeric field out of its range
    (NaN and infinities always are) or list field that repeats a value (`--k 8,8` would train one dictionary twice)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, (list, tuple)):
            items = list(value)
            repeated = sorted({str(v) for v in items if items.count(v) > 1})
            if repeated and not f.metadata.get("repeats"):  # metadata={"repeats": True} for a list whose values may repeat
                raise ValueError(f"{flag} lists {', '.join(repeated)} more than once; give each value once")
        else:
            items = [value]
        rule = f.metadata.get("range", DEFAULT_RANGES.get(f.name, "non_negative"))
        ok, what = RANGES[rule]
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{flag} is {v}; give a finite number")
            if not ok(v):
                raise ValueError(f"{flag} {what}, got {v}")
