"""`saekit analyze | steer | intervene`: read features, steer generations, patch codes on the toy model."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from saekit_cli.console import make_console
from saekit_cli.options import config_options

from saekit.analysis.analyze import AnalyzeConfig
from saekit.analysis.intervene import InterveneConfig
from saekit.analysis.steer import SteerConfig

console = make_console()


def register(app) -> None:
    @app.command("analyze")
    @config_options(AnalyzeConfig, config_file=True)
    def analyze_cmd(cfg: AnalyzeConfig):
        """One pass over a store: per-feature frequency, activations, top contexts, logit effects; dashboard + density plot."""
        from saekit.analysis.analyze import analyze, load_analysis

        with Progress(TextColumn("[bold]analyzing"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"), TimeElapsedColumn(),
                      console=console, transient=True, disable=not console.is_terminal) as bar:  # no stray newline off a TTY
            task = bar.add_task("analyze", total=None)
            out = analyze(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
        meta = load_analysis(out).meta
        t = Table(title=f"{meta['hook']} ({meta['kind']}) → {out}")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_row("tokens analysed", str(meta["n_rows"]))
        t.add_row("features", str(meta["d_dict"]))
        t.add_row("dead", str(len(meta["dead"])))
        t.add_row(f"dense (> {meta['dense_threshold']})", str(len(meta["dense"])))
        console.print(t)
        console.print(f"dashboard: {out / 'dashboard.html'}   density plot: {out / 'density.png'}")

    @app.command("steer")
    @config_options(SteerConfig)
    def steer_cmd(cfg: SteerConfig):
        """Generate with features switched on (SAE: direction added; codebook: codes forced on), beside the unsteered text."""
        from saekit.analysis.steer import steer

        res = steer(cfg)
        t = Table(title=f"steering {', '.join(res.features)} at strength {res.strength:g} — prompt {res.prompt!r}", show_lines=True)
        t.add_column("#", justify="right")
        t.add_column("unsteered")
        t.add_column("steered")
        for i, (u, s) in enumerate(zip(res.unsteered, res.steered)):
            t.add_row(str(i), u, s)
        console.print(t)
        if res.match is not None:
            console.print(f"match {res.match!r}: steered {res.steered_rate:.0%}, unsteered {res.unsteered_rate:.0%} of {len(res.steered)} samples")

    @app.command("intervene")
    @config_options(InterveneConfig)
    def intervene_cmd(cfg: InterveneConfig):
        """Toy model: patch state B's codes into walks ending in state A; success rate and JS divergence."""
        from saekit.analysis.intervene import run_intervention

        r = run_intervention(cfg)
        t = Table(title=f"code intervention at layers {r.layers} ({r.n_pairs} pairs, error={r.error})")
        t.add_column("run")
        t.add_column("next state ∈ succ(B) \\ succ(A)", justify="right")
        t.add_column("JS from clean B (nats)", justify="right")
        t.add_row("clean A (floor)", f"{r.clean_a_success:.1%}", f"{r.clean_a_js:.4f}")
        t.add_row("A with B's codes", f"{r.success_rate:.1%}", f"{r.js:.4f}")
        t.add_row("clean B (ceiling)", f"{r.clean_b_success:.1%}", "0")
        console.print(t)
