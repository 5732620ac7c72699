"""The built-in text model: a small GPT-2 trained by saekit on the Python standard library's source.

Every machine with Python has this corpus offline, so the text demos (feature tables, topic
steering, the codebook capable-LM table) run anywhere without a network.
"""

from pathlib import Path

NAME = "pycode"


def pretrained_dir() -> Path:
    """The shipped text model (Hugging Face format), reachable as `--model pycode`."""
    return Path(__file__).parent / "pretrained"
