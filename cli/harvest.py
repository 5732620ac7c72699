"""CLI for the harvest stage: `saekit harvest`, `saekit info`, `saekit hooks`."""

from __future__ import annotations

from pathlib import Path

import typer
from saekit_cli.console import make_console
from saekit_cli.options import config_options

from saekit.errors import SaekitError


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_summary(s: dict, console) -> None:
    from rich.table import Table

    m = s["model"]
    t = Table(title=f"activation store {s['path']}", show_header=False, title_justify="left")
    t.add_row("model", f"{m['name']} ({m['n_layers']} layers, d_model {m['d_model']}, fingerprint {m['fingerprint']}{', compat' if m.get('compat') else ''})")
    t.add_row("tokens", f"{s['n_tokens']:,} ({s['n_rows']:,} training rows, BOS and padding excluded)")
    t.add_row("sequences", f"{s['n_sequences']:,} × {s['context_size']} tokens; eval split: last {s['eval_sequences']:,} (holdout {s['holdout']})")
    t.add_row("shards", f"{s['n_shards']}{'' if s['complete'] else ' (incomplete: rerun the harvest command to finish)'}")
    t.add_row("dtype", s["dtype"])
    t.add_row("size on disk", _size(s["bytes"]))
    text = s.get("text", {})
    if text:
        t.add_row("text", f"{text.get('source')} (packing {text.get('packing')}, tokenizer {text.get('tokenizer')})")
    console.print(t)
    h = Table("hook", "layer", "width", "shape", title="hooks", title_justify="left")
    for name, v in s["hooks"].items():
        h.add_row(name, str(v["layer"]), str(v["width"]), "×".join(map(str, v["shape"])))
    console.print(h)


def register(app: typer.Typer) -> None:
    @app.command("harvest")
    @config_options("saekit.harvest:HarvestConfig", config_file=True)
    def harvest_cmd(cfg, quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary.")):
        """Run a frozen model over text and store hook activations (rerun the same command to resume)."""
        from saekit import distributed
        from saekit.harvest import describe, harvest

        path = harvest(cfg, progress=not quiet)
        if not quiet and not distributed.env().rank:  # under torchrun, rank 0 prints for everyone
            _print_summary(describe(path), make_console())

    @app.command("info")
    def info_cmd(
        store: Path = typer.Argument(..., help="Activation store directory (a `saekit harvest --out`)."),
        verify: bool = typer.Option(False, "--verify", help="Recompute every shard's checksum; exit non-zero naming damaged shards."),
    ):
        """Summarise an activation store: model, hooks and widths, tokens, shards, dtype, size on disk."""
        from saekit.harvest import describe
        from saekit.store import verify as verify_store

        console = make_console()
        problems = verify_store(store) if verify else []  # before the summary: a damaged store gets its one line only
        if problems:
            raise SaekitError(f"damaged store {store}: {'; '.join(problems)}; re-harvest into a new --out")
        _print_summary(describe(store), console)
        if verify:
            console.print("checksums: all shards ok")

    @app.command("hooks")
    def hooks_cmd(
        model: str = typer.Option("toy", "--model", help="Hugging Face model name, local directory, or `toy`."),
        compat: bool = typer.Option(False, "--compat/--no-compat", help="With TransformerLens weight processing."),
    ):
        """List the hook names a model accepts for --hooks ({L} stands for each layer)."""
        from saekit.models import load_model, valid_hook_names

        lm = load_model(model, compat=compat)
        n = lm.info.n_layers
        patterns: dict[str, set[int]] = {}
        for name in valid_hook_names(lm.bridge):
            parts = name.split(".")
            if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
                patterns.setdefault("blocks.{L}." + ".".join(parts[2:]), set()).add(int(parts[1]))
            else:
                patterns.setdefault(name, set())
        from rich.table import Table

        t = Table("hook", "layers", title=f"hooks of {model} ({n} layers)", title_justify="left")
        for pat in sorted(patterns, key=lambda p: (p.startswith("blocks"), p)):
            layers = patterns[pat]
            span = "" if not layers else (f"0..{n - 1}" if layers == set(range(n)) else ",".join(map(str, sorted(layers))))
            t.add_row(pat, span)
        make_console().print(t)
