"""The built-in toy task: walks on a random finite-state machine, with ground truth."""

from pathlib import Path


def pretrained_dir() -> Path:
    """The shipped toy model (Hugging Face format), reachable as `--model toy`."""
    return Path(__file__).parent / "pretrained"


def paper_dir() -> Path:
    """The shipped Codebook Features TokFSM codebook model: model/ (`--model toy-paper`) and codebooks/<hook>/."""
    return Path(__file__).parent / "pretrained_paper"


def codebooks_dir() -> Path:
    """The shipped toy fine-tuned with Codebook Features' TokFSM codebooks at every layer: model/ (`--model
    toy-codebooks`) and codebooks/<hook>/; the folder `--codebook-model toy-codebooks` names."""
    return Path(__file__).parent / "pretrained_codebooks"


def codebook_model_dir(name: str) -> str:
    """`toy-paper` / `toy-codebooks` → the shipped codebook-model folder; anything else is passed through."""
    return str({"toy-paper": paper_dir(), "toy-codebooks": codebooks_dir()}.get(name, name))
