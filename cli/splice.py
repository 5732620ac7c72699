"""CLI for the `splice-eval` stage: parse, call `saekit.splice.splice_eval`, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from saekit_cli.console import make_console
from saekit_cli.options import config_options, read_config


def register(app) -> None:
    @app.command("splice-eval")
    @config_options("saekit.splice:SpliceConfig", exclude=("dicts",), config_file=True)
    def splice_eval_cmd(
        cfg,
        dicts: Optional[List[Path]] = typer.Option(None, "--dict", "--dicts", help=read_config("saekit.splice:SpliceConfig").docs()["dicts"] + " [red]\\[required][/red]",
                                                   rich_help_panel="Dictionary"),
    ) -> None:
        """Splice dictionaries into the model and report what it loses (CE, loss recovered, KL, L0, FVU).

        With --finetuned DIR (a `saekit finetune` output) it also prints the loss and accuracy of the original, the fine-tuned-without-codebooks and the codebook model on the same tokens.
        """
        from dataclasses import replace

        from rich.console import Console

        from saekit.progress import Progress, callback
        from saekit.splice import format_table, splice_eval

        if dicts:
            # Repeated --dict flags, each possibly comma-separated, after any from --config.
            extra = [p.strip() for d in dicts for p in str(d).split(",") if p.strip()]
            cfg = replace(cfg, dicts=list(cfg.dicts) + extra)
        console = make_console()
        if not console.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
            console = Console(width=220)
        with Progress(unit="tokens", transient=True) as bar:
            bar.add("splicing", None)
            if cfg.finetuned:  # a `saekit finetune` folder: in-model training's report (stage 3 does not import it)
                from saekit.inmodel.report import finetuned_eval, format_finetuned_table

                result = finetuned_eval(cfg, progress=callback(bar))
            else:
                result = splice_eval(cfg, progress=callback(bar))
        console.print(format_table(result))
        if "finetuned" in result:
            console.print(format_finetuned_table(result))
        ev = result["eval"]
        console.print(f"{ev['tokens']} tokens in {ev['sequences']} sequences, {ev['scored_positions']} next-token predictions scored")
        if "frontier" in result:
            console.print(f"frontier: {result['frontier']['png']}, {result['frontier']['csv']}")
        if cfg.json_out:
            console.print(f"results: {cfg.json_out}")
