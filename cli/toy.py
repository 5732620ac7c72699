"""`saekit toy train | data | eval`: the built-in FSM toy model, its corpus and its ground-truth score."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from saekit_cli.console import make_console
from saekit_cli.options import App, config_options

toy_app = App(help="The built-in toy model: walks on a random finite-state machine, with ground-truth states.", no_args_is_help=True)
console = make_console()


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    )


@toy_app.command("train")
@config_options("saekit.toy.train:ToyTrainConfig")
def train(cfg):
    """Train a small GPT-2 or GPT-NeoX on FSM walks (CPU) and save it in Hugging Face format with fsm.json; --preset paper is Codebook Features' TokFSM model."""
    from saekit.toy.train import check_out, train_toy

    check_out(cfg)

    command = "saekit toy " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("train"):]) if "train" in sys.argv else None
    with _progress() as bar:
        task = bar.add_task("training", total=cfg.lm.steps, info="")
        last = {}

        def update(step: int, info: dict) -> None:
            if "eval" in info:
                last.update(info["eval"])
                if not console.is_terminal:  # a log file gets one line per evaluation instead of a bar
                    e = info["eval"]
                    console.print(f"step {step}: train loss {info['loss']:.4f}, eval loss {e['loss']:.4f} (optimum {e['optimum']:.4f}, "
                                  f"unigram {e['unigram']:.4f}), transition accuracy {e['transition_accuracy']:.2%}")
            text = f"loss {info['loss']:.3f}"
            if last:
                text += f" | eval {last['loss']:.3f} (optimum {last['optimum']:.3f}) | transitions {last['transition_accuracy']:.1%}"
            bar.update(task, completed=step, info=text)

        out, result = train_toy(cfg, progress=update, command=command)
    from rich.table import Table

    table = Table(title=f"toy model → {out}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("held-out loss (nats/token)", f"{result.loss:.4f}")
    table.add_row("optimum (FSM entropy)", f"{result.optimum:.4f}")
    table.add_row("unigram entropy", f"{result.unigram:.4f}")
    table.add_row(f"transition accuracy ({result.n_transitions} steps)", f"{result.transition_accuracy:.2%}")
    console.print(table)


@toy_app.command("data")
@config_options("saekit.toy.corpus:ToyDataConfig")
def data(cfg):
    """Write a toy corpus (one sequence a line, for `harvest --packing doc`) and its labels beside it."""
    from saekit.toy.corpus import write_corpus

    text, labels, seq_len = write_corpus(cfg)
    console.print(f"wrote {cfg.n_seq} sequences of {seq_len - 1} digits to {text}, labels to {labels}")
    console.print(f"next: saekit harvest --model {cfg.model} --data {text} --packing doc --context-size {seq_len} ...")


@toy_app.command("eval")
def evaluate(
    dicts: Optional[List[Path]] = typer.Option(None, "--dict", help="Dictionary folder to score (repeat for several); needs --store."),
    store: Optional[Path] = typer.Option(None, "--store", help="Activation store harvested from `saekit toy data` output with --packing doc."),
    codebook_model: Optional[Path] = typer.Option(None, "--codebook-model", help="A `saekit finetune --out` folder (or the shipped toy-codebooks / toy-paper): score it with all its codebooks active, on fresh walks (the paper's tables)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the full result (per state) to this JSON file."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file from `saekit toy data` (else the FSM comes from the store's model)."),
    split: str = typer.Option("eval", "--split", help="Store split to score: eval, train or all."),
    n_seq: int = typer.Option(256, "--n-seq", help="With --codebook-model: fresh walks scored for codes and neurons."),
    sample_seqs: int = typer.Option(32, "--sample-seqs", help="With --codebook-model: walks sampled (with and without codebooks) for transition accuracy."),
    min_recall: float = typer.Option(0.01, "--min-recall", help="A state's best code is the most precise one with recall above this (the paper's 1%)."),
    device: str = typer.Option("auto", "--device", help="With --codebook-model: cpu, cuda, cuda:1, ... or auto (cuda when available)."),
):
    """For every FSM state, the feature that best detects "state s was just completed"; vs. the best single neuron.

    With --dict/--store: offline dictionaries on a store (best F1, and precision at matched recall).  With
    --codebook-model: the Codebook Features TokFSM tables (precision at matched recall against the best neuron of all
    attention and MLP sites, code purity, first-transition and transition accuracy), all codebooks active.
    """
    from saekit.errors import SaekitError

    if codebook_model:
        if dicts or store:
            raise SaekitError("give either --codebook-model or --dict/--store, not both")
        return _paper(codebook_model, json_out, n_seq, sample_seqs, min_recall, device)
    if not dicts or not store:
        raise SaekitError("pass --dict DIR (repeat for several) and --store DIR, or --codebook-model DIR (a `saekit finetune --out` folder)")
    from saekit.toy.eval import state_recovery, write_json

    with _progress() as bar:
        task = bar.add_task("scoring", total=None, info="")
        result = state_recovery(
            [str(d) for d in dicts], str(store), labels=str(labels) if labels else None, split=split, min_recall=min_recall,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    from rich.table import Table

    table = Table(title=f"FSM state recovery on {result.n_tokens} tokens ({result.split} split, {int(result.combined.present.sum())}/{result.n_states} states seen)")
    for c, j in (("features", "left"), ("mean best F1", "right"), ("states with F1 ≥ 0.9", "right")):
        table.add_column(c, justify=j)
    for d in result.dicts:
        table.add_row(f"{d.kind} {d.hook} ({d.d_dict})", f"{d.scores.mean_best_f1:.3f}", f"{d.scores.share_f1_ge:.1%}")
    if len(result.dicts) > 1:
        table.add_row("all dictionaries", f"{result.combined.mean_best_f1:.3f}", f"{result.combined.share_f1_ge:.1%}")
    table.add_row("best single neuron", f"{result.neurons.mean_best_f1:.3f}", f"{result.neurons.share_f1_ge:.1%}")
    console.print(table)
    m = result.matched
    if m is not None:
        console.print(f"precision at matched recall (best feature with recall > {min_recall:g} per state): features {m.mean_precision:.3f}, "
                      f"best neuron of {', '.join(result.matched_neuron_hooks)} at the same recall {m.mean_neuron_precision:.3f}; "
                      f"feature more precise for {m.share_codes_better:.1%} of states")
    if json_out:
        console.print(f"wrote {write_json(result, str(json_out))}")


def _paper(folder: Path, json_out, n_seq: int, sample_seqs: int, min_recall: float, device: str) -> None:
    from rich.table import Table

    from saekit.analysis.codebook_model import CodebookModel
    from saekit.toy.eval import paper_tables, write_json
    from saekit.toy.fsm import load_fsm

    with console.status("loading the codebook model") as status:
        cbm = CodebookModel.load(str(folder), device=device)
        fsm = load_fsm(cbm.path)
        r = paper_tables(cbm, fsm, n_seq=n_seq, sample_seqs=sample_seqs, min_recall=min_recall, progress=status.update)
    t = Table(title=f"codes vs FSM states, all codebooks active ({r.n_tokens} tokens of {n_seq} fresh walks; "
                    f"neurons: {len(r.neuron_hooks)} attention/MLP sites, {r.n_neurons} neurons)")
    cols = ("layer", "site", "codes", "mean best F1", "code precision @ matched recall", "its recall", "neuron precision @ same recall",
            "code better", "pure codes (states)", "pure codes (state+digit)")
    for c in cols:
        t.add_column(c, justify="left" if c in ("site",) else "right")
    for h in r.hooks:
        m = h.matched
        t.add_row(str(h.layer), h.site, str(h.d_dict), f"{h.f1.mean_best_f1:.3f}", f"{m.mean_precision:.3f}",
                  f"{float(m.recall[m.scored].mean()) if m.scored.any() else float('nan'):.3f}", f"{m.mean_neuron_precision:.3f}",
                  f"{m.share_codes_better:.1%}", f"{h.purity_states:.1%}", f"{h.purity_state_digit:.1%}")
    m = r.combined
    t.add_row("all", "", "", f"{r.combined_f1.mean_best_f1:.3f}", f"{m.mean_precision:.3f}",
              f"{float(m.recall[m.scored].mean()) if m.scored.any() else float('nan'):.3f}", f"{m.mean_neuron_precision:.3f}",
              f"{m.share_codes_better:.1%}", "", "")
    console.print(t)
    t2 = Table(title="the codebook model as a model of the FSM")
    for c in ("measure", "codebooks active", "codebooks removed"):
        t2.add_column(c, justify="left" if c == "measure" else "right")
    t2.add_row("first-transition accuracy (top-10 next states ∈ successors)", f"{r.first_transition:.2%}", f"{r.first_transition_no_codebooks:.2%}")
    t2.add_row(f"transition accuracy ({sample_seqs} sampled walks, {r.n_transitions} steps)", f"{r.transition:.2%}", f"{r.transition_no_codebooks:.2%}")
    console.print(t2)
    if json_out:
        console.print(f"wrote {write_json(r, str(json_out))}")


def register(app) -> None:
    app.add_typer(toy_app, name="toy")
