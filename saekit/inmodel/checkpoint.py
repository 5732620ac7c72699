"""Checkpoint files of in-model training (`saekit.finetune`, `saekit.e2e`): safetensors + JSON, never pickle.

A checkpoint is a folder `state.safetensors` + `state.json`, written under a temporary name and
renamed when complete, and refused on resume unless it was written under the same identity
(the hash of the config fields that change what a run computes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saekit.config import to_dict
from saekit.errors import SaekitError


def identity_hash(cfg, fields: tuple[str, ...]) -> str:
    d = to_dict(cfg)
    return hashlib.sha256(json.dumps({k: d[k] for k in fields}, sort_keys=True).encode()).hexdigest()[:16]


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    """The optimiser's state as flat `opt.{param index}.{name}` tensors plus its param_groups (JSON), so a
    checkpoint is safetensors + JSON rather than a pickled state_dict."""
    osd = opt.state_dict()
    t = {f"opt.{idx}.{name}": v if torch.is_tensor(v) else torch.tensor(v) for idx, st in osd["state"].items() for name, v in st.items()}
    return t, osd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, t: dict[str, Tensor], param_groups: list) -> None:
    """Inverse of `optimizer_tensors`; keys of `t` not starting with `opt.` are ignored."""
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(folder: Path, tensors: dict[str, Tensor], meta: dict, keep: list[Path]) -> None:
    """state.safetensors + state.json written in a temp folder renamed when complete (a crash never leaves a
    half checkpoint under its final name); older checkpoints in `keep` beyond the last two removed."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in keep[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def open_checkpoint(folder: Path, ident: str, identity_fields: tuple[str, ...], cfg_dict: dict,
                    device: str = "cpu", unnamed: str = "unknown") -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of a checkpoint written by `save_checkpoint`, refused unless it was written under the
    same identity; the error names the differing fields (`unnamed` when the identity differs elsewhere)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"), device=device)
    except (OSError, ValueError) as e:
        raise SaekitError(f"checkpoint {folder} is damaged ({e}); delete it to resume from the one before") from None
    if meta.get("identity") != ident:
        old = meta.get("config", {})
        diff = [k for k in identity_fields if old.get(k) != cfg_dict.get(k)]
        raise SaekitError(f"{folder} was written with other settings ({', '.join(diff) or unnamed} differ); "
                          "rerun with the original options or choose another --out")
    return tensors, meta
