"""The `saekit` command: registers each stage's commands and turns user errors into one line."""

from __future__ import annotations

import os
import shlex
import sys

import typer
from saekit_cli.options import App

from saekit.errors import SaekitError
from saekit.outdir import disk_error

# Importing this module must stay cheap (`saekit --help`): the stage modules (torch, transformers,
# h5py, matplotlib) are imported inside the commands that run, never at registration.
app = App(
    name="saekit",
    help="Dictionary learning on a frozen model's activations: harvest → train → splice-eval → analyze.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# One module per stage; each adds its commands to `app`.
from saekit_cli import analyze, export, finetune, harvest, intervene, pipeline, pycode, splice, store, synth, toy, train, truth  # noqa: E402

for _module in (pipeline, harvest, toy, pycode, train, splice, analyze, intervene, export, finetune, store, synth, truth):
    _module.register(app)


@app.callback()
def _options(
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load model folders that hold only pickle weights "
                                      "(pytorch_model.bin). Unpickling runs any code hidden in the file: only for files you trust."),
) -> None:
    if allow_pickle:
        os.environ["SAEKIT_ALLOW_PICKLE"] = "1"  # read by saekit.models.check_no_pickle


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero (never a traceback for a user mistake)."""
    typer.secho(f"error: {message}", err=True, fg="red")
    raise SystemExit(code)


def _interrupted(e: BaseException) -> bool:
    """Typer turns Ctrl-C into a silent exit 130; tell it apart by the KeyboardInterrupt in the chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted one: the same, plus --resume where the command needs it (train, finetune)."""
    args = list(argv)
    name = next((a for a in args if not a.startswith("-")), None)
    try:
        cmd = typer.main.get_command(app).commands.get(name)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - the plain command is still right for every stage that resumes by itself
        cmd = None
    if cmd is not None and "--resume" not in args and any("--resume" in p.opts for p in cmd.params):
        args.append("--resume")
    return shlex.join(["saekit", *args])


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    resume = f"interrupted; rerun `{resume_command(sys.argv[1:])}` to resume"
    try:
        app()
    except SaekitError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(resume, 130)
    except SystemExit as e:
        if e.code == 130 and _interrupted(e):
            fail(resume, 130)
        raise
    except Exception as e:  # disk full, permission denied, read-only: one line; anything else is a bug and keeps its traceback
        err = disk_error(e)
        if err is None:
            raise
        fail(str(err))


if __name__ == "__main__":
    main()
