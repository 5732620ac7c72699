"""CLI for the `finetune` stage (not written yet)."""


def register(app) -> None:
    pass
