"""CLI for the `train` stage (not written yet)."""


def register(app) -> None:
    pass
