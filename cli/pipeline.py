"""CLI for the `pipeline` stage (not written yet)."""


def register(app) -> None:
    pass
