"""`saekit train`: dictionaries (SAEs, k-sparse codebooks, transcoders, crosscoders, CLTs) on an activation store."""

from __future__ import annotations

from saekit_cli.console import make_console
from saekit_cli.options import config_options


def register(app) -> None:
    @app.command("train")
    @config_options("saekit.train:TrainConfig", config_file=True)
    def train(cfg):
        """Train dictionaries on a harvested store: several hooks and a sweep over --k or --l1 share one read of the data.

        Example: saekit train --store acts --hook blocks.1.hook_resid_post --kind topk --k 16,32 --out dicts

        Transcoder: --kind transcoder --hook blocks.1.mlp.hook_in --target blocks.1.hook_mlp_out; CLT: --kind clt --hook all.
        """
        from rich.table import Table

        from saekit import distributed
        from saekit.interop import load

        if cfg.objective == "e2e":  # through the frozen model: saekit.inmodel, which stage 2 never imports
            from saekit.inmodel.e2e import from_train_config, train_e2e

            paths = train_e2e(from_train_config(cfg))
        else:
            from saekit.train import train as run_train

            paths = run_train(cfg)
        if distributed.env().rank:  # under torchrun, rank 0 prints for everyone
            return
        from saekit.metrics import dead_window

        summaries = [load(p).summary for p in paths]
        windows = {s.get("dead_window_tokens", s.get("eval_tokens")) for s in summaries if s.get("eval_tokens")}
        dead = f"dead ({dead_window(windows.pop(), 'eval')})" if len(windows) == 1 else "dead (not fired in its eval tokens)"
        table = Table(title=f"{len(paths)} dictionar{'y' if len(paths) == 1 else 'ies'} in {cfg.out} (eval split of {cfg.store})")
        for col in ("folder", "MSE", "FVU", "L0", dead, "eval tokens"):
            table.add_column(col, justify="left" if col == "folder" else "right", overflow="fold")
        for p, s in zip(paths, summaries):
            if s.get("eval_tokens"):
                table.add_row(_rel(p, cfg.out), f"{s['mse']:.4g}", f"{s['fvu']:.4f}", f"{s['l0']:.1f}", f"{s['dead_fraction']:.1%}", str(s["eval_tokens"]))
            else:
                table.add_row(_rel(p, cfg.out), "-", "-", "-", "-", "0 (store has no eval split)")
        make_console().print(table)


def _rel(p, out) -> str:
    try:
        return str(p.relative_to(out))
    except ValueError:
        return str(p)
