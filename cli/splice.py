"""CLI for the `splice` stage (not written yet)."""


def register(app) -> None:
    pass
