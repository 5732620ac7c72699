"""CLI for the `toy` stage (not written yet)."""


def register(app) -> None:
    pass
