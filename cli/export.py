"""CLI for `saekit export`: write a dictionary in another tool's format (SAELens)."""

from __future__ import annotations

import typer
from saekit_cli.options import config_options


def register(app) -> None:
    @app.command("export")
    @config_options("saekit.interop:ExportConfig")
    def export(cfg) -> None:
        """Write a dictionary as a SAELens folder (cfg.json + sae_weights.safetensors) that SAE.load_from_disk reads.

        relu → standard, topk → topk, batchtopk and matryoshka → jumprelu (their threshold on every latent), jumprelu → jumprelu; saekit's input scale is folded into the weights, so SAELens reconstructs the hook's original activations. Codebooks have no SAELens equivalent.
        """
        from saekit.interop import export as export_dictionary

        out = export_dictionary(cfg)
        typer.echo(f"wrote {cfg.format} dictionary to {out}")
