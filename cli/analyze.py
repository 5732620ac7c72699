"""CLI for the `analyze` stage (not written yet)."""


def register(app) -> None:
    pass
