"""The `saekit` command: registers each stage's commands and turns user errors into one line."""

from __future__ import annotations

import errno
import os

import typer

from saekit.errors import SaekitError

app = typer.Typer(
    name="saekit",
    help="Dictionary learning on a frozen model's activations: harvest → train → splice-eval → analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per stage; each adds its commands to `app`.
from saekit_cli import analyze, export, finetune, harvest, pipeline, splice, toy, train  # noqa: E402
from saekit_cli import store, synth, truth  # noqa: E402  (issue 24: ground truth)

for _module in (pipeline, harvest, toy, train, splice, analyze, export, finetune, store, synth, truth):
    _module.register(app)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero (never a traceback for a user mistake)."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise SystemExit(code)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SaekitError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume where it stopped", 130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fail(f"disk full while writing {e.filename or ''}: free space or choose another --out; finished shards are kept")
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            fail(f"cannot write {e.filename or ''}: permission denied; choose a writable --out directory")
        raise


if __name__ == "__main__":
    main()
