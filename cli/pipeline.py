"""`saekit pipeline`: the main job (harvest → train → splice-eval), thin over saekit.pipeline."""

from __future__ import annotations

from saekit_cli.console import make_console
from saekit_cli.options import config_options


def register(app) -> None:
    @app.command("pipeline")
    @config_options("saekit.pipeline:PipelineConfig")
    def pipeline_cmd(cfg) -> None:
        """Run the whole pipeline on one hook (default: the built-in toy model) and print what the dictionaries keep."""

        from saekit.pipeline import run_pipeline
        from saekit.splice import format_table

        console = make_console()
        res = run_pipeline(cfg, say=lambda s: console.print(s, style="bold"))
        console.print(format_table(res.splice))
        if res.recovery:
            rows = res.recovery.get("dictionaries", [])
            for r in rows:
                console.print(
                    f"FSM state recovery {r.get('path', '')}: mean best F1 {r.get('mean_best_f1', float('nan')):.3f}, "
                    f"states with F1 ≥ 0.9: {r.get('share_states_f1_ge_0.9', float('nan')):.0%}"
                )
            neuron = res.recovery.get("neuron_mean_best_f1")
            if neuron is not None:
                console.print(f"best single neuron of the raw activations: mean best F1 {neuron:.3f}")
        if res.reading:
            console.print("\n[bold]reading[/bold]")
            for line in res.reading:
                console.print(line)
        total, cpu = sum(res.timings.values()), sum(res.cpu.values())
        console.print("\n[bold]time[/bold] (wall, cpu) " + ", ".join(f"{k} {v:.0f}s/{res.cpu.get(k, 0):.0f}s" for k, v in res.timings.items())
                      + f" — total {total:.0f}s wall, {cpu:.0f}s cpu")
        console.print(f"outputs in {cfg.out}/ (store/, dicts/, eval.json, analysis/)")
        for step in res.next_steps:
            console.print(f"next: {step}", soft_wrap=True)
