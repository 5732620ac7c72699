"""Turn a config dataclass into Typer options, so `--help` text comes from the field docstrings.

Usage::

    @app.command("harvest")
    @config_options("saekit.harvest:HarvestConfig", config_file=True)
    def harvest(cfg, verbose: bool = False): ...

Every field becomes `--field-name` (underscores → dashes).  Options default to "not
given"; the config is built from the dataclass defaults, then the TOML file
(`--config`), then the flags actually typed, so a flag always wins.

The config is named as `"module:Class"` and read from the module's *source* (`ast`), not
imported: the stage modules import torch (seconds of CPU), and `--help` must not pay for
it.  The real class is imported only when the command runs, and builds and validates the
config; `tests/test_cli.py` checks that the source reading equals the imported dataclass.

A field whose type is another config dataclass (TrainConfig's `arch: DictConfig`) is
flattened: each of its fields becomes a flag of its own name, and the typed values are
gathered back into the nested object.  A nested field gives no flag when its
`metadata={"flag": False}` says so (`d_in`, read from the store) or when the outer config
has a field of the same name (the run's sweep lists `k` and `l1`, which set the nested
value per dictionary).

Options are grouped into help panels (`PANELS`, below): one table for every command,
keyed by field name, with per-config exceptions; a field's own `metadata={"panel": ...}`
or `{"required": True}` wins over the table.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

# Help panels: panel → the field names shown in it (any config).  Fields not listed go to
# "Options".  `PANEL_EXCEPTIONS` names fields whose panel differs in one config.
PANELS: dict[str, tuple[str, ...]] = {
    "Data": ("model", "store", "data", "hooks", "hook", "text_field", "context_size", "packing", "tokens", "split",
             "holdout", "dtype", "shard_tokens", "max_tokens", "n_seq", "harvest_tokens", "seq_len", "eval_sequences",
             "compat", "splice_bos", "batch_seqs", "prompt", "target"),
    "Dictionary": ("dict", "dicts", "kind", "d_dict", "expansion", "k", "l1", "groups", "similarity", "codes", "codebook_k",
                   "codebooks", "init", "feature", "format", "l1_warmup", "activation"),
    "Optimiser": ("lr", "batch_size", "train_tokens", "seed", "grad_clip", "steps", "codebook_lr", "commit_coef",
                  "freeze_model", "warmup", "weight_decay", "lr_decay"),
    "Dead latents": ("aux_k", "aux_coef", "dead_tokens", "replace_every", "init_rows"),
    "In-model (end-to-end)": ("objective", "mse_coef"),
    "Output": ("out", "resume", "checkpoint_every", "log_every", "eval_tokens", "json_out", "overwrite", "sweep",
               "finetuned", "baseline"),
    "Device and distributed": ("device", "precision", "model_dtype", "generate_on", "placement", "buffer_rows", "threads"),
    "Topic steering": ("topic", "n_features", "n_prompts", "prompt_tokens", "topic_lead"),
    "Explanations": ("explain", "explain_terms"),
}
PANEL_EXCEPTIONS: dict[str, dict[str, str]] = {
    "TrainConfig": {"model": "In-model (end-to-end)", "data": "In-model (end-to-end)"},
}
# Fields a command cannot run without (their dataclass default is only a placeholder).
REQUIRED: dict[str, tuple[str, ...]] = {
    "HarvestConfig": ("hooks", "data", "out"),
    "TrainConfig": ("store",),
    "SpliceConfig": ("dicts",),
    "AnalyzeConfig": ("dict", "store"),
    "SteerConfig": ("dict",),
    "FinetuneConfig": ("model", "codebooks", "out"),
    "ToyDataConfig": ("out",),
    "ToyTrainConfig": ("out",),
    "PyTrainConfig": ("out",),
    "PyDataConfig": ("out",),
    "ExportConfig": ("dict", "out"),
    "ImportConfig": ("acts", "out"),
    "SynthConfig": ("out",),
    "TruthConfig": ("truth",),
}
TARGETS: list[str] = []  # every config a command was built from (tests compare the source reading with the class)
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}


def _no_flag_metavar(params):
    """Flags (and --help) take no value: show no `<bool>` type column for them."""
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_metavar(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_metavar(super().get_params(ctx))


class App(typer.Typer):
    """`typer.Typer` whose groups and commands show no `<bool>` on flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", Group)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


# -- reading a dataclass from its module's source ------------------------------------

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path, "list": list, "tuple": tuple,
          "dict": dict, "Optional": Optional, "None": None}


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config field as written in the source."""

    name: str
    type: Any
    """The annotation, evaluated (`list[int]`, `str | None`, ...)."""
    default: Any
    """The default value (a default_factory is called); `dataclasses.MISSING` when there is none."""
    doc: str
    metadata: dict


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    module: str
    name: str
    fields: tuple[FieldSpec, ...]

    def load(self):
        """The real dataclass (imports its module: torch and all)."""
        return getattr(importlib.import_module(self.module), self.name)

    def docs(self) -> dict[str, str]:
        return {f.name: f.doc for f in self.fields}

    def __call__(self, **given) -> dict:
        """The defaults as a dict (what `default_factory=Cls` or `lambda: Cls(k=32)` gives, read from source)."""
        return {f.name: f.default for f in self.fields} | given


def flags_of(spec: ConfigSpec) -> list[tuple[FieldSpec, str | None]]:
    """(field, the outer field it is nested in or None) for every option of `spec`, nested configs flattened."""
    names = {f.name for f in spec.fields}
    out: list[tuple[FieldSpec, str | None]] = []
    for f in spec.fields:
        if not isinstance(f.type, ConfigSpec):
            out.append((f, None))
            continue
        defaults = f.default if isinstance(f.default, dict) else {}
        for sub in f.type.fields:
            if sub.metadata.get("flag", True) and sub.name not in names:
                out.append((dataclasses.replace(sub, default=defaults.get(sub.name, sub.default)), f.name))
    return out


def _source_path(module: str) -> Path:
    """The file of `pkg.sub.mod`, found without importing `pkg.sub` (whose __init__ may import torch)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"no package {top}")
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise ImportError(f"no module {module}")


class _Names(dict):
    """A module's top-level names, each evaluated from the source when first asked for (imports from other saekit modules included)."""

    def __init__(self, module: str, statements: dict[str, ast.stmt]):
        super().__init__(_TYPES)
        self.sources: dict[str, Any] = {}
        for node in statements.values():
            if isinstance(node, ast.ClassDef):  # a config nested in another: read from source too
                self.sources[node.name] = (module, node.name, "class")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("saekit"):
                for a in node.names:
                    self.sources[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if node.value is not None and len(targets) == 1 and isinstance(targets[0], ast.Name):
                    self.sources[targets[0].id] = node.value

    def __missing__(self, name: str) -> Any:
        if name not in self.sources:
            raise KeyError(name)
        src = self.sources[name]
        if isinstance(src, tuple) and len(src) == 3:
            value = _read_source(f"{src[0]}:{src[1]}")
        elif isinstance(src, tuple):
            value = _module_tree(src[0])[1][src[1]]
        else:
            value = _eval(src, self)
        self[name] = value
        return value


_WANTED = re.compile(r"(class \w+|from saekit[\w.]* import|[A-Z_][A-Z0-9_]*\s*[:=])")


def _statements(text: str) -> dict[str, ast.stmt]:
    """The module's classes, saekit imports and UPPER_CASE constants, parsed alone (parsing whole stage
    modules costs ~15 ms each, which `--help` would pay for every command)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line[:1] not in ("", " ", "\t", "\n", "#", ")", "]", "}")]
    out: dict[str, ast.stmt] = {}
    for a, b in zip(starts, starts[1:] + [len(lines)]):
        if not _WANTED.match(lines[a]):
            continue
        for node in ast.parse("".join(lines[a:b])).body:  # a SyntaxError here: see _module_tree
            key = node.name if isinstance(node, ast.ClassDef) else f"{type(node).__name__}@{a}"
            out[key] = node
    return out


@functools.cache
def _module_tree(module: str) -> tuple[dict[str, ast.stmt], _Names]:
    """The top-level statements of `module` that configs need (found without importing it) and its names."""
    text = _source_path(module).read_text(encoding="utf-8")
    try:
        statements = _statements(text)
    except SyntaxError:  # a statement cut at a column-0 line inside a string: parse the whole file
        statements = {}
        for i, node in enumerate(ast.parse(text).body):
            statements[node.name if isinstance(node, ast.ClassDef) else f"{type(node).__name__}@{i}"] = node
    return statements, _Names(module, statements)


def _eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Value of a constant expression from our own source (literals, arithmetic, constants named in the module)."""
    return eval(compile(ast.Expression(body=node), "<config>", "eval"), {"__builtins__": {}}, names)


def module_constant(module: str, name: str) -> Any:
    """A module-level constant read from the source (e.g. a help text), without importing the module."""
    return _module_tree(module)[1][name]


@functools.cache
def read_config(target: str) -> ConfigSpec:
    """`"pkg.module:Class"` → its fields, from the source alone; from the imported class when the source
    cannot be read that way (a default that is not a constant expression, inheritance): slower
    `--help`, which `tests/test_cli.py` reports, but never a broken command."""
    try:
        return _read_source(target)
    except Exception:  # noqa: BLE001 - any reason the static reading fails: use the real class
        return _read_imported(target)


def _read_imported(target: str) -> ConfigSpec:
    module, name = target.split(":")
    return _spec_of_class(getattr(importlib.import_module(module), name))


def _spec_of_class(cls) -> ConfigSpec:
    from saekit.config import field_docs

    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    fields = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)  # type: ignore[misc]
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):  # nested config: as the source reading gives it
            tp = _spec_of_class(tp)
            default = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        fields.append(FieldSpec(f.name, tp, default, docs.get(f.name, ""), dict(f.metadata)))
    return ConfigSpec(cls.__module__, cls.__name__, tuple(fields))


def _read_source(target: str) -> ConfigSpec:
    module, name = target.split(":")
    statements, consts = _module_tree(module)
    cls = statements.get(name)
    if not isinstance(cls, ast.ClassDef):
        raise ImportError(f"no class {name} in {module}")
    if cls.bases:
        raise TypeError(f"{target}: configs read from source cannot inherit (put the fields in one class)")
    fields = []
    body = cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        nxt = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        default, metadata = dataclasses.MISSING, {}
        v = node.value
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "field":
            for kw in v.keywords:
                if kw.arg == "default":
                    default = _eval(kw.value, consts)
                elif kw.arg == "default_factory":  # a lambda's body is evaluated here (its own scope would not see the module's names)
                    default = _eval(kw.value.body, consts) if isinstance(kw.value, ast.Lambda) else _eval(kw.value, consts)()
                elif kw.arg == "metadata":
                    metadata = _eval(kw.value, consts)
        elif v is not None:
            default = _eval(v, consts)
        fields.append(FieldSpec(node.target.id, _eval(node.annotation, consts), default, doc, metadata))
    return ConfigSpec(module, name, tuple(fields))


# -- options ---------------------------------------------------------------------------


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


def _default_text(f: FieldSpec, required: bool) -> str:
    """`[required]`, `[default: x]`, or nothing when the default is empty (the field's text says what empty means)."""
    if required or f.default is dataclasses.MISSING:
        return " [red]\\[required][/red]"
    d = f.default
    if isinstance(d, (list, tuple)):
        d = ",".join(map(str, d))
    if d is None or d == "":
        return ""
    return f" \\[default: {d}]"


def panel_of(spec: ConfigSpec, f: FieldSpec) -> str | None:
    return f.metadata.get("panel") or PANEL_EXCEPTIONS.get(spec.name, {}).get(f.name) or _PANEL_OF.get(f.name)


def is_required(spec: ConfigSpec, f: FieldSpec) -> bool:
    return bool(f.metadata.get("required")) or f.name in REQUIRED.get(spec.name, ()) or f.default is dataclasses.MISSING


def config_options(target: str, *, config_file: bool = False, exclude: tuple[str, ...] = ()):
    """Decorator: replace the wrapped command's `cfg` parameter by one option per field of the config `target`."""
    spec = read_config(target)
    TARGETS.append(target)
    flat = [(f, outer) for f, outer in flags_of(spec) if f.name not in exclude]
    fields = [f for f, _ in flat]
    outer_of = {f.name: outer for f, outer in flat}

    def decorate(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "cfg"]
        params = []
        for f in fields:
            tp = _cli_type(f.type)
            flag = "--" + f.name.replace("_", "-")
            decls = [flag] if tp is not bool else [f"{flag}/--no-{f.name.replace('_', '-')}"]
            decls += list(f.metadata.get("aliases", ()))  # extra spellings, e.g. --hook for `hooks`
            help_text = f.doc + _default_text(f, is_required(spec, f))
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, *decls, help=help_text, show_default=False, rich_help_panel=panel_of(spec, f)),
                    annotation=Optional[tp],
                )
            )
        if config_file:
            params.append(
                inspect.Parameter(
                    "config",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(None, "--config", help="TOML file with the same fields (flat as the flags, or nested tables as in config.json); flags typed here win.",
                                         rich_help_panel="Output"),
                    annotation=Optional[Path],
                )
            )
        names = {f.name for f in fields}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            from saekit.config import from_dict, load_toml, nest

            cls = spec.load()
            # the file may spell nested fields flat, as the flags do (kind = "relu"), or as a table ([arch])
            data = nest(cls, load_toml(kwargs.pop("config"))) if config_file and kwargs.get("config") else {}
            kwargs.pop("config", None)
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            for k, v in given.items():
                if v is not None:
                    outer = outer_of[k]
                    if outer is None:
                        data[k] = v
                    else:  # a flattened nested field: back into its table (beside what the TOML file set)
                        prev = data.get(outer)
                        data[outer] = {**(prev if isinstance(prev, dict) else {}), k: v}
            cfg = from_dict(cls, data, where=f"{spec.name} options")
            return fn(cfg, **kwargs)

        order = list(PANELS)  # panels appear in PANELS' order; unpanelled options first
        params.sort(key=lambda p: -1 if p.default.rich_help_panel is None else order.index(p.default.rich_help_panel)
                    if p.default.rich_help_panel in order else len(order))
        kinds = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = sig.replace(parameters=kinds + params)
        return wrapper

    return decorate
