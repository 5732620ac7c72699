"""`saekit eval truth`: score dictionaries against a synthetic world's true features."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from saekit_cli.console import make_console
from saekit_cli.options import App, config_options, read_config

eval_app = App(help="Judge dictionaries against known features.", no_args_is_help=True)


@eval_app.command("truth")
@config_options("saekit.truth:TruthConfig", exclude=("dicts",))
def truth_cmd(
    cfg,
    dicts: Optional[List[Path]] = typer.Option(None, "--dict", "--dicts", help=read_config("saekit.truth:TruthConfig").docs()["dicts"],
                                               rich_help_panel="Dictionary"),
) -> None:
    """MCC, per-feature F1, uniqueness, absorption, shrinkage, L0, dead/dense of each dictionary on a `saekit synth` store's eval split."""
    from dataclasses import replace

    from rich.table import Table

    from saekit.truth import COLUMNS, score_truth, table_rows

    if dicts:
        cfg = replace(cfg, dicts=list(cfg.dicts) + [p.strip() for d in dicts for p in str(d).split(",") if p.strip()])
    result = score_truth(cfg)
    table = Table(title=f"ground truth: {result['truth']} ({result['rows']} held-out rows)")
    table.add_column("dictionary")
    from saekit.metrics import dead_window

    for key, name in COLUMNS:
        table.add_column(f"dead ({dead_window(result['rows'], 'held-out')})" if key == "dead_frac" else name, justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    console = make_console()
    console.print(table)
    if cfg.json_out:
        console.print(f"results: {cfg.json_out}")


def register(app) -> None:
    app.add_typer(eval_app, name="eval")
