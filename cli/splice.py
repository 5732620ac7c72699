"""CLI for the `splice-eval` stage: parse, call `saekit.splice.splice_eval`, print the table."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from saekit_cli.console import make_console
from saekit_cli.options import config_options

from saekit.config import field_docs
from saekit.splice import SpliceConfig, format_finetuned_table, format_table, splice_eval


def register(app) -> None:
    @app.command("splice-eval")
    @config_options(SpliceConfig, exclude=("dicts",), config_file=True)
    def splice_eval_cmd(
        cfg: SpliceConfig,
        dicts: Optional[List[Path]] = typer.Option(None, "--dict", "--dicts", help=field_docs(SpliceConfig)["dicts"]),
    ) -> None:
        """Splice dictionaries into the model and report what it loses (CE, loss recovered, KL, L0, FVU).

        With --finetuned DIR (a `saekit finetune` output) it also prints the loss and accuracy of the original, the fine-tuned-without-codebooks and the codebook model on the same tokens.
        """
        from dataclasses import replace

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if dicts:
            # Repeated --dict flags, each possibly comma-separated, after any from --config.
            extra = [p.strip() for d in dicts for p in str(d).split(",") if p.strip()]
            cfg = replace(cfg, dicts=list(cfg.dicts) + extra)
        console = make_console()
        if not console.is_terminal:  # piped to a file: do not squeeze the table into 80 columns
            console = Console(width=220)
        columns = (TextColumn("splicing"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeRemainingColumn())
        bar_console = Console(stderr=True)
        with Progress(*columns, console=bar_console, transient=True, disable=not bar_console.is_terminal) as bar:  # no stray newline off a TTY
            task = bar.add_task("splice", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = splice_eval(cfg, progress=progress)
        console.print(format_table(result))
        if "finetuned" in result:
            console.print(format_finetuned_table(result))
        ev = result["eval"]
        console.print(f"{ev['tokens']} tokens in {ev['sequences']} sequences, {ev['scored_positions']} next-token predictions scored")
        if "frontier" in result:
            console.print(f"frontier: {result['frontier']['png']}, {result['frontier']['csv']}")
        if cfg.json_out:
            console.print(f"results: {cfg.json_out}")
