"""`saekit analyze | steer`: read features, steer generations (`intervene` is in cli/intervene.py)."""

from __future__ import annotations

from saekit_cli.console import make_console
from saekit_cli.options import config_options

console = make_console()


def register(app) -> None:
    @app.command("analyze")
    @config_options("saekit.analysis.analyze:AnalyzeConfig", config_file=True)
    def analyze_cmd(cfg):
        """One pass over a store: per-feature frequency, activations, top contexts, logit effects; dashboard + density plot."""
        from rich.table import Table

        from saekit.analysis.analyze import analyze, load_analysis
        from saekit.progress import Progress, callback

        with Progress(unit="sequences", transient=True) as bar:
            bar.add("analyzing", None)
            out = analyze(cfg, progress=callback(bar))
        meta = load_analysis(out).meta
        t = Table(title=f"{meta['hook']} ({meta['kind']}) → {out}")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_row("tokens analysed", str(meta["n_rows"]))
        t.add_row("features", str(meta["d_dict"]))
        n_dead = len(meta["dead"])
        t.add_row(f"dead ({meta.get('dead_window') or 'not fired in the tokens analysed'})", f"{n_dead} ({n_dead / max(meta['d_dict'], 1):.1%})")
        t.add_row(f"dense (> {meta['dense_threshold']})", str(len(meta["dense"])))
        if meta.get("explained_f1_ge_0.5") is not None:
            t.add_row("explained (held-out F1 ≥ 0.5)", f"{meta['explained_f1_ge_0.5']:.1%}")
        console.print(t)
        console.print(f"dashboard: {out / 'dashboard.html'}   density plot: {out / 'density.png'}")
        if (out / "feature_table.md").exists():
            console.print(f"feature table: {out / 'feature_table.md'} (and .html)")

    @app.command("steer")
    @config_options("saekit.analysis.steer:SteerConfig")
    def steer_cmd(cfg):
        """Generate with features switched on (SAE: direction added; codebook: codes forced on; transcoder, crosscoder, CLT: direction added at each hook it writes), beside the unsteered text.

        With --topic REGEX --store DIR: find the features that best detect the topic in the store's text, switch them on
        over held-out prompts that are off topic, and report the share of on-topic continuations, steered vs unsteered.
        """
        if cfg.topic:
            return _topic(cfg)
        from rich.table import Table

        from saekit.analysis.steer import steer

        res = steer(cfg)
        for line in res.about:
            console.print(line)
        toy = res.toy
        if toy is not None:
            tr = toy.tracked
            if tr.n_tokens == 0:  # --state: a state forced, no single feature to describe
                pass
            elif tr.fire_rate == 0:
                from saekit.metrics import dead_window

                console.print(f"it is dead ({dead_window(tr.n_tokens, 'fresh-walk')}), so it tracks no state; "
                              "choose a live one: `saekit toy eval --json` names each state's best feature, `saekit analyze` the live ones")
            else:
                ratio = f" (strength {res.strength:g} = {res.strength / tr.mean_act:.1f}× it)" if tr.mean_act > 0 else ""
                console.print(f"on {tr.n_tokens:,} tokens of fresh walks it fires on {tr.fire_rate:.1%} of tokens, best at the completion of "
                              f"FSM state {tr.state:0{toy.digits}d} (F1 {tr.f1:.2f}: precision {tr.precision:.2f}, recall {tr.recall:.2f}); "
                              f"its mean activation when it fires is {tr.mean_act:.3g}{ratio}")
            console.print(f"successors of {tr.state}: {' '.join(map(str, toy.successors))}; walks by state, prompt │ generated, ⏎ = end of walk, ✗ = a step the FSM forbids")
        t = Table(title=f"steering {', '.join(res.features)} at strength {res.strength:g} — prompt {res.prompt!r}", show_lines=True)
        t.add_column("#", justify="right")
        t.add_column("unsteered")
        t.add_column("steered")
        if toy is not None:
            from saekit.toy.steer import render

            for i, (u, s) in enumerate(zip(toy.unsteered, toy.steered)):
                t.add_row(str(i), render(u), render(s))
        else:
            for i, (u, s) in enumerate(zip(res.unsteered, res.steered)):
                t.add_row(str(i), u, s)
        console.print(t)
        if toy is not None:
            st, un = toy.steered_stats, toy.unsteered_stats
            console.print(f"generated states that are successors of {toy.tracked.state} (the walk continues as from the feature's state): "
                          f"steered {st.follow_rate:.0%} ({st.follow}/{st.states}), unsteered {un.follow_rate:.0%} ({un.follow}/{un.states}); "
                          f"chance {toy.chance:.0%}")
            console.print(f"legal steps: steered {st.legal_rate:.0%}, unsteered {un.legal_rate:.0%}")
        if res.match is not None:
            console.print(f"match {res.match!r}: steered {res.steered_rate:.0%}, unsteered {res.unsteered_rate:.0%} of {len(res.steered)} samples")

    def _topic(cfg):
        from rich.table import Table

        from saekit.analysis.topic import topic_steer

        r = topic_steer(cfg)
        t = Table(title=f"topic {r.topic!r}: features switched on at strength {r.strength:g}")
        for c in ("feature", "precision", "recall", "F1"):
            t.add_column(c, justify="left" if c == "feature" else "right")
        for f in r.features:
            t.add_row(f.id, f"{f.precision:.2f}", f"{f.recall:.2f}", f"{f.f1:.2f}")
        console.print(t)
        for p, u, s in r.examples:
            console.print(f"[bold]prompt[/] {p!r}\n  unsteered: {u!r}\n  steered:   {s!r}")
        console.print(f"on topic: steered {r.steered_rate:.1%}, unsteered {r.unsteered_rate:.1%} of {r.n_generations} generations each")
