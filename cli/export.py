"""CLI for the `export` stage (not written yet)."""


def register(app) -> None:
    pass
