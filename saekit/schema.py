"""Check a file from a user before trusting it: JSON fields against a schema, tensors from the safetensors header.

A dictionary folder or a store manifest may be damaged, edited by hand or hostile.  Every
loader checks the JSON it reads here (types, with a bool never taken for a number, ranges,
required fields) and the shapes and dtypes of the weights from the safetensors *header*
(8-byte length + JSON) before any matrix is allocated, so `d_dict: 1e12` or a truncated
file is one `SaekitError` line naming the file and the field, not a traceback or an
exhausted memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saekit.errors import SaekitError

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "number": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,), "list": (list,),
}

_NAMES = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string", "dict": "an object", "list": "a list"}


@dataclass(frozen=True)
class Field:
    """What one JSON field must be: `type` (int | number | bool | str | dict | list), an inclusive range, presence."""

    type: str
    required: bool = True
    null: bool = False
    """None (JSON null) is accepted."""
    min: float | None = None
    max: float | None = None
    above: float | None = None
    """Exclusive lower bound (e.g. 0 for a positive scale)."""
    choices: tuple = ()


def Int(min=None, **kw) -> Field:  # noqa: N802 - reads like a type in a schema literal
    return Field("int", min=min, **kw)


def Num(**kw) -> Field:  # noqa: N802
    return Field("number", **kw)


def Str(**kw) -> Field:  # noqa: N802
    return Field("str", **kw)


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from `path`, or one line saying the file is missing, unreadable, not JSON or not an object."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SaekitError(f"{path} is missing; the {what} is incomplete") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SaekitError(f"cannot read {path} ({e}); the {what} is damaged") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SaekitError(f"{path} is not valid JSON ({e}); the {what} is damaged") from None
    if not isinstance(raw, dict):
        raise SaekitError(f"{path} holds a JSON {type(raw).__name__}, expected an object; the {what} is damaged")
    return raw


def problem(value: Any, f: Field) -> str | None:
    """Why `value` does not fit `f` (None when it does)."""
    if value is None:
        return None if f.null else "is null"
    ok = _TYPES[f.type]
    if isinstance(value, bool) and bool not in ok or not isinstance(value, ok):
        return f"is {json.dumps(value)[:40]}, expected {_NAMES[f.type]}"
    if f.type == "number" and not math.isfinite(value):
        return f"is {value}, expected a finite number"
    if f.min is not None and value < f.min:
        return f"is {value}, expected at least {f.min}"
    if f.max is not None and value > f.max:
        return f"is {value}, expected at most {f.max}"
    if f.above is not None and not value > f.above:
        return f"is {value}, expected more than {f.above}"
    if f.choices and value not in f.choices:
        return f"is {value!r}, expected one of {', '.join(map(repr, f.choices))}"
    return None


def check(obj: dict, spec: dict[str, Field], where: str, *, prefix: str = "") -> dict:
    """Raise one SaekitError for the first field of `obj` that breaks `spec`; fields not in `spec` pass unchecked."""
    if not isinstance(obj, dict):
        raise SaekitError(f"{where}: {prefix.rstrip('.') or 'the file'} is {type(obj).__name__}, expected an object; the file is damaged")
    for name, f in spec.items():
        if name not in obj:
            if f.required:
                raise SaekitError(f"{where}: field {prefix}{name!r} is missing; the file is damaged or not of this format")
            continue
        why = problem(obj[name], f)
        if why:
            raise SaekitError(f"{where}: field {prefix}{name} {why}; the file is damaged")
    return obj


# --- safetensors, from the header alone ------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # safetensors' own limit


def tensor_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) of every tensor in a safetensors file, checking that the file holds all their bytes."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise SaekitError(f"{p} is not a safetensors file (header length {n}, file {size} bytes); the file is damaged or truncated")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SaekitError(f"cannot read {p} as safetensors ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise SaekitError(f"{p}: the safetensors header is not an object; the file is damaged")
    data = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(t, dict) and t.get("dtype") in DTYPE_BYTES and isinstance(t.get("shape"), list) \
            and all(type(d) is int and d >= 0 for d in t["shape"]) and isinstance(t.get("data_offsets"), list) \
            and len(t["data_offsets"]) == 2 and all(type(o) is int for o in t["data_offsets"])
        if not ok:
            raise SaekitError(f"{p}: the safetensors header entry for {name!r} is malformed; the file is damaged")
        shape = tuple(t["shape"])
        start, end = t["data_offsets"]
        if end - start != math.prod(shape) * DTYPE_BYTES[t["dtype"]] or start < 0:
            raise SaekitError(f"{p}: tensor {name!r} of shape {shape} does not match its byte range; the file is damaged")
        if end > data:
            raise SaekitError(f"{p} is truncated: tensor {name!r} needs bytes up to {end}, the file holds {data}; download or save it again")
        out[name] = (t["dtype"], shape)
    return out


def check_tensors(path: str | os.PathLike, want: dict[str, tuple[int, ...]], *, optional: dict[str, tuple[int, ...]] | None = None,
                  config: str = "the config") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a safetensors file holds exactly the float tensors `want` (+ any of `optional`) with those shapes."""
    optional = optional or {}
    header = tensor_header(path)
    missing = sorted(set(want) - set(header))
    unexpected = sorted(set(header) - set(want) - set(optional))
    if missing or unexpected:
        raise SaekitError(f"{path}: expected tensors {sorted(want)}; missing {missing}, unexpected {unexpected}; "
                          f"the weights and {config} do not belong together")
    for name, shape in {**want, **optional}.items():
        if name not in header:
            continue
        dtype, got = header[name]
        if tuple(got) != tuple(shape):
            raise SaekitError(f"{path}: tensor {name} has shape {tuple(got)} but {config} says {tuple(shape)}; "
                              "the weights and the config do not belong together")
        if dtype not in FLOATS:
            raise SaekitError(f"{path}: tensor {name} is {dtype}, expected a float type; the file is damaged")
    return header


# --- the saekit dictionary format (config.json) --------------------------------------------------

DICTIONARY = {"format": Str(), "version": Int(min=1), "kind": Str(), "arch": Field("dict"),
              "provenance": Field("dict", required=False), "train": Field("dict", required=False), "summary": Field("dict", required=False)}
ARCH = {"kind": Str(), "d_in": Int(min=1), "d_dict": Int(min=1), "k": Int(min=1, required=False, null=True),
        "l1": Num(min=0, required=False), "groups": Int(min=1, required=False), "similarity": Str(required=False)}
PROVENANCE = {"hook": Str(required=False, null=True), "model": Field("dict", required=False, null=True),
              "hook_shape": Field("list", required=False), "scale": Num(above=0, required=False), "store": Str(required=False, null=True)}


def check_dictionary_config(raw: dict, where: Path) -> dict:
    """A saekit config.json's fields (the architecture and provenance included), before anything is built from it."""
    check(raw, DICTIONARY, str(where))
    check(raw["arch"], ARCH, str(where), prefix="arch.")
    check(raw.get("provenance") or {}, PROVENANCE, str(where), prefix="provenance.")
    return raw
