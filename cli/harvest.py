"""CLI for the `harvest` stage (not written yet)."""


def register(app) -> None:
    pass
