"""Other tools' dictionary formats: SAELens and sparsify folders in, SAELens folders out.

`saekit.dictionaries.load` hands every folder that is not a saekit dictionary to
`detect_and_load`, so `saekit.load(dir)` and every `--dict` option read these too.  The
format is told from the file names alone (each tool has its own weights file name):

    SAELens:  cfg.json + sae_weights.safetensors     (saekit.interop.saelens)
    sparsify: cfg.json + sae.safetensors             (saekit.interop.sparsify)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from saekit import outdir
from saekit.errors import SaekitError

LAYOUTS = {
    "saekit": ("config.json", "weights.safetensors"),
    "SAELens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
}
EXPORT_FORMATS = ("saelens",)


def detect_format(folder: Path) -> str | None:
    """Which layout's files `folder` holds ("saekit", "SAELens", "sparsify"), or None."""
    for name, files in LAYOUTS.items():
        if all((folder / f).is_file() for f in files):
            return name
    return None


def _expected() -> str:
    return "; ".join(f"{name}: {' + '.join(files)}" for name, files in LAYOUTS.items())


def detect_and_load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a SAELens or sparsify folder (told apart by file names) as a saekit Dictionary."""
    folder = Path(path)
    if not folder.exists():
        raise SaekitError(f"dictionary folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise SaekitError(f"{folder} is a file; pass the folder that holds the dictionary's files ({_expected()})")
    fmt = detect_format(folder)
    if fmt == "saekit":
        from saekit.dictionaries.base import load_saekit

        return load_saekit(folder, device)
    if fmt == "SAELens":
        from saekit.interop.saelens import load_saelens

        return load_saelens(folder, device)
    if fmt == "sparsify":
        from saekit.interop.sparsify import load_sparsify

        return load_sparsify(folder, device)
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and detect_format(p))
    if subdirs:
        shown = ", ".join(subdirs[:8]) + (f" and {len(subdirs) - 8} more" if len(subdirs) > 8 else "")
        raise SaekitError(
            f"{folder} holds {len(subdirs)} dictionaries in subfolders ({shown}); pass one of them, e.g. {folder / subdirs[0]}"
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
    """Target format: saelens (cfg.json + sae_weights.safetensors, for SAELens's SAE.load_from_disk)."""
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
    from saekit.dictionaries import load
    from saekit.interop.saelens import export_saelens

    d = load(cfg.dict)
    with outdir.claim(cfg.out, "export"):
        return export_saelens(d, cfg.out)


__all__ = ["EXPORT_FORMATS", "LAYOUTS", "ExportConfig", "detect_and_load", "detect_format", "export"]
