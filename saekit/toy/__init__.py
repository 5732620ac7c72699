"""The built-in toy task: walks on a random finite-state machine, with ground truth."""

from pathlib import Path


def pretrained_dir() -> Path:
    """The shipped toy model (Hugging Face format), reachable as `--model toy`."""
    return Path(__file__).parent / "pretrained"


def paper_dir() -> Path:
    """The shipped Codebook Features TokFSM codebook model: model/ (`--model toy-paper`) and codebooks/<hook>/."""
    return Path(__file__).parent / "pretrained_paper"
