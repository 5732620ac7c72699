"""Other tools' dictionary formats: SAELens and sparsify folders in, SAELens folders out.

`load` reads a dictionary folder in any of these formats (saekit's own included), so
`saekit.load(dir)` and every `--dict` option read them all.  The
format is told from the file names alone (each tool has its own weights file name):

    SAELens:  cfg.json + sae_weights.safetensors     (saekit.interop.saelens)
    sparsify: cfg.json + sae.safetensors             (saekit.interop.sparsify)
    Gemma Scope: params.npz                          (saekit.interop.gemmascope)
    circuit-tracer CLT: W_enc_0 + W_dec_0 .safetensors (saekit.interop.circuit_tracer, with the transcoder layouts)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import outdir
from saekit.dictionaries import load_saekit
from saekit.errors import SaekitError

LAYOUTS = {
    "saekit": ("config.json", "weights.safetensors"),
    "SAELens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "Gemma Scope": ("params.npz",),
    "circuit-tracer": ("W_enc_0.safetensors", "W_dec_0.safetensors"),
}
EXPORT_FORMATS = ("saelens", "circuit-tracer")


def detect_format(folder: Path) -> str | None:
    """Which layout's files `folder` holds ("saekit", "SAELens", "sparsify"), or None."""
    for name, files in LAYOUTS.items():
        if all((folder / f).is_file() for f in files):
            return name
    return None


def find_dictionary_folders(root: str | os.PathLike, formats: tuple[str, ...] = tuple(LAYOUTS)) -> list[Path]:
    """Every dictionary folder at or below `root` whose layout is one of `formats`, sorted.

    The one scanner (sweeps, `--init`, fine-tuned codebooks, the hint for a `--dict` above its
    dictionaries).  A dictionary's own subfolders (its checkpoints) are not searched.
    """
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if detect_format(here) in formats:
            found.append(here)
            dirnames.clear()
        dirnames.sort()
    return sorted(found)


def _expected() -> str:
    return "; ".join(f"{name}: {' + '.join(files)}" for name, files in LAYOUTS.items())


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a dictionary folder in any supported format (told apart by file names) as a saekit Dictionary.

    `path` may be `hf://ORG/REPO/PATH[@REV]` (fetched into the Hub's cache, `saekit.hub`) and
    `device` may be `auto` (cuda when available).
    """
    from saekit import hub
    from saekit.models import resolve_device

    device = str(resolve_device(str(device)))
    folder = hub.fetch(path) if hub.is_hub(path) else Path(path)
    if not folder.exists():
        raise SaekitError(f"dictionary folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise SaekitError(f"{folder} is a file; pass the folder that holds the dictionary's files ({_expected()})")
    fmt = detect_format(folder)
    if fmt == "saekit":
        return load_saekit(folder, device)
    if fmt == "SAELens":
        from saekit.interop.saelens import load_saelens

        return load_saelens(folder, device)
    if fmt == "sparsify":
        from saekit.interop.sparsify import load_sparsify

        return load_sparsify(folder, device)
    if fmt == "Gemma Scope":
        from saekit.interop.gemmascope import load_gemmascope

        return load_gemmascope(folder, device)
    if fmt == "circuit-tracer":
        from saekit.interop.circuit_tracer import load_circuit_tracer

        return load_circuit_tracer(folder, device)
    below = find_dictionary_folders(folder)
    if below:
        subdirs = [str(p.relative_to(folder)) for p in below]
        shown = ", ".join(subdirs[:8]) + (f" and {len(subdirs) - 8} more" if len(subdirs) > 8 else "")
        raise SaekitError(
            f"{folder} holds {len(subdirs)} dictionar{'y' if len(subdirs) == 1 else 'ies'} in subfolders ({shown}); "
            f"pass one of them, e.g. --dict {below[0]}"
        )
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    listing = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "") if found else "nothing"
    raise SaekitError(f"{folder} is not a dictionary folder: found {listing}; expected one of {_expected()}")


@dataclass
class ExportConfig:
    """What `saekit export` converts and where it writes."""

    dict: str = ""
    """Dictionary folder to export (any format saekit reads)."""
    format: str = "saelens"
    """Target format: saelens (cfg.json + sae_weights.safetensors, for SAELens's SAE.load_from_disk; transcoders too) or
    circuit-tracer (a clt as W_enc_i / W_dec_i .safetensors per layer)."""
    out: str = ""
    """Folder to write; created if missing."""

    def __post_init__(self):
        if not self.dict:
            raise ValueError("dict is required: the dictionary folder to export (--dict DIR)")
        if not self.out:
            raise ValueError("out is required: the folder to write (--out DIR)")
        if self.format not in EXPORT_FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(EXPORT_FORMATS)}")
        if Path(self.out).resolve() == Path(self.dict).resolve():
            raise ValueError("out is the same folder as dict; choose a new folder for the export (--out DIR)")


def export(cfg: ExportConfig) -> Path:
    """Load `cfg.dict` and write it in `cfg.format` under `cfg.out`; returns the folder written."""
    from saekit.interop.circuit_tracer import export_circuit_tracer
    from saekit.interop.saelens import export_saelens

    d = load(cfg.dict)
    with outdir.claim(cfg.out, "export"):
        return export_circuit_tracer(d, cfg.out) if cfg.format == "circuit-tracer" else export_saelens(d, cfg.out)


__all__ = ["EXPORT_FORMATS", "LAYOUTS", "ExportConfig", "detect_format", "export", "find_dictionary_folders", "load"]
