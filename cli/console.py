"""One place that makes rich consoles: wide enough for saekit's tables when output is not a terminal."""

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if not c.is_terminal:
        c = Console(stderr=stderr, width=200)
    return c
