"""`saekit pycode train | data`: the built-in text model of Python source, and its corpus as a harvestable file."""

from __future__ import annotations

import shlex
import sys

from saekit_cli.console import make_console
from saekit_cli.options import App, config_options

pycode_app = App(help="The built-in text model: a small GPT-2 trained on the Python standard library's source.", no_args_is_help=True)
console = make_console()


@pycode_app.command("train")
@config_options("saekit.pycode.train:PyTrainConfig")
def train(cfg):
    """Train the tokenizer and the model on this Python's standard library (CPU) and save them in Hugging Face format."""
    from rich.table import Table

    from saekit.pycode.train import check_out, train_pycode

    check_out(cfg)
    command = "saekit pycode " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train"):]) if "train" in sys.argv else None

    def update(step: int, info: dict) -> None:
        if "eval" in info or step == cfg.lm.steps or step % 50 == 0:
            e = info.get("eval")
            extra = f", held-out loss {e['loss']:.4f} (bigram {e['bigram_loss']:.4f}), accuracy {e['accuracy']:.2%}" if e else ""
            console.print(f"step {step}/{cfg.lm.steps}: train loss {info['loss']:.4f}{extra}")

    out, r = train_pycode(cfg, progress=update, command=command)
    t = Table(title=f"pycode model → {out}")
    for c in ("model", "held-out loss", "accuracy"):
        t.add_column(c, justify="left" if c == "model" else "right")
    t.add_row("this model", f"{r.loss:.4f}", f"{r.accuracy:.2%}")
    t.add_row("bigram", f"{r.bigram_loss:.4f}", f"{r.bigram_accuracy:.2%}")
    t.add_row("unigram", f"{r.unigram_loss:.4f}", f"{r.unigram_accuracy:.2%}")
    console.print(t)


@pycode_app.command("data")
@config_options("saekit.pycode.corpus:PyDataConfig")
def data(cfg):
    """Write the stdlib corpus (held-out files by default) as .jsonl for `saekit harvest --data`."""
    from saekit.pycode.corpus import write_jsonl

    out, n = write_jsonl(cfg)
    console.print(f"wrote {n} files of Python source to {out}")
    console.print(f"next: saekit harvest --model pycode --data {out} --hooks blocks.1.hook_resid_post --out runs/pystore")


def register(app) -> None:
    app.add_typer(pycode_app, name="pycode")
