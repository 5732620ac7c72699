"""`saekit store import`: activations made elsewhere become an activation store."""

from __future__ import annotations

import typer
from saekit_cli.options import App, config_options

store_app = App(help="Activation stores made from files: import .npy / .safetensors activations.", no_args_is_help=True)


@store_app.command("import")
@config_options("saekit.store.importer:ImportConfig")
def import_(cfg) -> None:
    """Stream a .npy / .safetensors file (or a folder of them) into a store that train, truth and info read like a harvested one.

    The store has no tokens and no model, so splice-eval and analyze refuse it; train and `saekit eval truth` use it.
    """
    from saekit.store import ActivationStore
    from saekit.store.importer import import_store

    out = import_store(cfg)
    s = ActivationStore(out)
    typer.echo(f"wrote store {out}: {s.n_rows} rows, hooks {', '.join(f'{h} ({s.hook_width(h)})' for h in s.hooks)}, "
               f"eval split {len(s.split('eval'))} of {s.n_sequences} sequences")


def register(app) -> None:
    app.add_typer(store_app, name="store")
