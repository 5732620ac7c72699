"""`saekit synth`: write a synthetic world (known features in superposition) as an activation store."""

from __future__ import annotations

import typer
from saekit_cli.options import config_options


def register(app) -> None:
    @app.command("synth")
    @config_options("saekit.synth:SynthConfig", config_file=True)
    def synth_cmd(cfg) -> None:
        """Generate activations from known feature directions (power-law firing, optional correlation, hierarchy, noise).

        The store trains like a harvested one; `saekit eval truth --truth DIR` scores dictionaries against its features.
        """
        from saekit.synth import synth

        out = synth(cfg)
        from saekit.store import read_manifest

        origin = read_manifest(out)["origin"]
        typer.echo(f"wrote synthetic store {out}: {cfg.rows} rows of {cfg.n_features} features in d={cfg.d} "
                   f"(expected L0 {origin['expected_l0']:.2f}), hook {cfg.hook}; truth in {out}/{origin['truth']}")
