"""Dictionary kinds (relu, topk, batchtopk SAEs; k-sparse codebooks) behind one interface."""

from saekit.dictionaries.base import KINDS, DictConfig, Dictionary, ForwardOutput, Provenance, build, load_saekit


def load(path, device="cpu") -> Dictionary:
    """Load a dictionary folder in any supported format (saekit; SAELens and sparsify via interop)."""
    from pathlib import Path

    from saekit.models import resolve_device

    from saekit import hub

    device = str(resolve_device(str(device)))  # `auto` → cuda when available
    p = hub.fetch(path) if hub.is_hub(path) else Path(path)  # hf://ORG/REPO/PATH: the Hub's cache folder
    if (p / "config.json").is_file() and (p / "weights.safetensors").is_file():
        return load_saekit(p, device)
    try:
        from saekit.interop import detect_and_load
    except ImportError:
        detect_and_load = None
    if detect_and_load is not None:
        return detect_and_load(p, device)
    from saekit.errors import SaekitError

    raise SaekitError(f"{p} is not a dictionary folder (expected config.json + weights.safetensors)")


__all__ = ["KINDS", "DictConfig", "Dictionary", "ForwardOutput", "Provenance", "build", "load", "load_saekit"]
