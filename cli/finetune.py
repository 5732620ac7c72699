"""`saekit finetune`: codebooks trained inside the model (Codebook Features), and the talk's loss/accuracy table."""

from __future__ import annotations

from saekit_cli.console import make_console
from saekit_cli.options import config_options, module_constant

SPEC_HELP = module_constant("saekit.inmodel.codebooks", "SPEC_HELP")  # read from source: no torch for --help

console = make_console()


def print_table(table: list[dict], title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    fsm = all("transition_accuracy" in row for row in table)  # a toy model: valid FSM steps of sampled walks
    for col in ("model", "loss", "accuracy", "tokens") + (("transition accuracy",) if fsm else ()):
        t.add_column(col, justify="left" if col == "model" else "right")
    for row in table:
        t.add_row(row["model"], f"{row['loss']:.4f}", f"{row['accuracy']:.2%}", f"{row['tokens']:,}",
                  *([f"{row['transition_accuracy']:.2%}"] if fsm else []))
    console.print(t)


def register(app) -> None:
    @app.command("finetune", help=(
        "Insert k-sparse codebooks into a model and train them with it: loss = next-token CE + Σ commitment "
        "‖C_out − sg[C_in]‖², straight-through gradients (Codebook Features).  --objective paper lets the LM loss "
        "train the codes too (the library's own objective); --preset paper takes all of Codebook Features' TokFSM "
        "settings (k = 1 codebooks of 1,000 codes on every layer's attention heads and MLP output, LayerNorm'd input); "
        "--from-scratch trains model and codebooks together from random weights.  Writes OUT/model (Hugging Face), "
        "OUT/codebooks/<hook>/ (saekit dictionaries for splice-eval, analyze, steer, toy eval), OUT/baseline "
        "(fine-tuned without codebooks) and OUT/report.json, and prints held-out loss and accuracy of the original, "
        "fine-tuned and codebook models.\n\n--codebooks: " + SPEC_HELP + "\n\nExample: saekit finetune --model toy "
        "--data toy.txt --codebooks 'attn:k=8,groups=heads;mlp:k=16' --steps 300 --out ft"))
    @config_options("saekit.inmodel.finetune:FinetuneConfig", config_file=True)
    def finetune(cfg):
        from saekit.inmodel.finetune import finetune as run

        res = run(cfg)
        print_table(res.table, f"held-out next-token loss and accuracy ({cfg.eval_sequences} sequences)")
        console.print(f"model: {res.model}")
        for p in res.codebooks:
            console.print(f"codebook: {p}")
        console.print(f"report: {res.out / 'report.json'}")
        console.print(f"the same table on other tokens: saekit splice-eval --finetuned {res.out} [--data FILE | --store DIR]")
