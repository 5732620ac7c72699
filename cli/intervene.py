"""`saekit intervene`: patch state B's codes into walks ending in state A on the toy model (activations or code ids)."""

from __future__ import annotations

from saekit_cli.console import make_console
from saekit_cli.options import config_options

console = make_console()
WHERE = {"final": "the final token", "state": "both digits of the last state", "generated": "the last state and every generated position"}


def register(app) -> None:
    @app.command("intervene")
    @config_options("saekit.analysis.intervene:InterveneConfig")
    def intervene_cmd(cfg):
        """Toy model: patch state B's codes into walks ending in state A; success rate and JS divergence.

        With --codebook-model (a `saekit finetune --out` folder, or the shipped toy-codebooks / toy-paper): every codebook runs in the forward pass and code ids
        are overwritten at the --patch sites, as in the Codebook Features TokFSM tutorial.
        """
        from rich.table import Table

        if cfg.codebook_model:
            from saekit.analysis.intervene import run_codebook_intervention

            r = run_codebook_intervention(cfg)
            t = Table(title=f"code-id intervention, all codebooks active ({r.n_pairs} pairs, walks of {r.states} states, "
                            f"patched at {WHERE[r.positions]}{', A and B share no successor' if r.disjoint else ''})")
            for c, j in (("patched", "left"), ("JS from clean B", "right"), ("normalised JS", "right"),
                         ("top-10 next states ∈ succ(B)", "right"), ("greedy next state ∈ succ(B) \\ succ(A)", "right"),
                         ("share of clean B's", "right"), ("∈ succ(A) \\ succ(B)", "right")):
                t.add_column(c, justify=j)
            for row in (r.clean_a, *r.rows, r.clean_b):
                t.add_row(row.name, f"{row.js:.4f}", f"{row.js_normalised:.3f}", f"{row.top_accuracy:.1%}", f"{row.success_rate:.1%}",
                          f"{row.success_of_ceiling:.1%}", f"{row.stays_rate:.1%}")
            console.print(t)
            if cfg.out:
                console.print(f"wrote {cfg.out}")
            return
        from saekit.analysis.intervene import run_intervention

        r = run_intervention(cfg)
        t = Table(title=f"code intervention at layers {r.layers} ({r.n_pairs} pairs{', no shared successor' if cfg.disjoint else ''}, error={r.error})")
        t.add_column("run")
        t.add_column("next state ∈ succ(B) \\ succ(A)", justify="right")
        t.add_column("JS from clean B (nats)", justify="right")
        t.add_row("clean A (floor)", f"{r.clean_a_success:.1%}", f"{r.clean_a_js:.4f}")
        t.add_row("A with B's codes", f"{r.success_rate:.1%}", f"{r.js:.4f}")
        t.add_row("clean B (ceiling)", f"{r.clean_b_success:.1%}", "0")
        console.print(t)
