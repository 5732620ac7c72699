"""`splice-eval --finetuned DIR`: a `saekit finetune` folder judged by splice-eval's own code (the talk's table).

Stage 3 (`saekit.splice`) does not know about in-model training; the CLI sends `--finetuned`
here, and this module uses splice's `evaluate` on the folder's models and codebooks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from saekit import runs
from saekit.interop import find_dictionary_folders
from saekit.errors import SaekitError
from saekit.inmodel.data import load_tokens
from saekit.models import LoadedModel, load_model
from saekit.splice import SpliceConfig, _clean_json, _fmt, evaluate, mean_activations, resolve_target, store_tokens, text_tokens


def _finetune_report(folder: Path) -> dict:
    report = folder / "report.json"
    if not folder.is_dir():
        raise SaekitError(f"--finetuned {folder} does not exist; pass the --out folder of `saekit finetune`")
    if not report.is_file():
        raise SaekitError(f"--finetuned {folder} holds no finished finetune (no report.json); finish it with "
                          "`saekit finetune ... --resume` or pass another folder")
    try:
        return json.loads(report.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{report} is damaged ({e}); rerun the finetune into a new --out") from None


def finetune_eval_tokens(run_cfg: dict, model: LoadedModel) -> Tensor:
    """The finetune's own held-out sequences (its first `eval_sequences`, or its store's eval split), as it read them."""
    data = load_tokens(run_cfg.get("data", ""), run_cfg.get("store", ""), model.tokenizer, model.bos_id,
                       int(run_cfg.get("seq_len", 128)), 1, int(run_cfg.get("eval_sequences", 64)),
                       run_cfg.get("text_field", "text"), n_ctx=model.info.n_ctx, packing=run_cfg.get("packing", "concat"))
    return torch.as_tensor(data.eval, dtype=torch.long)


def finetuned_eval(cfg: SpliceConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """`splice-eval --finetuned DIR`: the codebook model's splice result plus the talk's table.

    Codebook Features' claim is that codebook models stay capable language models, so the
    fair comparison is on one set of tokens: the original model, the same model fine-tuned
    the same steps without codebooks (`DIR/baseline`, absent with --no-baseline or
    --freeze-model), and the codebook model (`DIR/model`, or the original with
    --freeze-model) with every codebook spliced in at once, plus that model with the
    codebooks taken out.  Every number comes from `evaluate` (the same splice as any
    dictionary gets), so it is an independent check of the table `saekit finetune` wrote.
    The result is `evaluate`'s for the codebook model with "finetuned" {folder, table} added.
    """
    from saekit.interop import load as load_dictionary

    if cfg.dicts or cfg.sweep:
        raise SaekitError("--finetuned evaluates the folder's own codebooks; drop --dict/--sweep (or drop --finetuned)")
    folder = Path(cfg.finetuned)
    report = _finetune_report(folder)
    run_cfg = report.get("config", {})
    original_name = cfg.model or run_cfg.get("model", "")
    if not original_name:
        raise SaekitError(f"{folder}/report.json does not name the original model; pass --model NAME")
    cb_root = folder / "codebooks"
    paths = find_dictionary_folders(cb_root, ("saekit",)) if cb_root.is_dir() else []
    if not paths:
        raise SaekitError(f"{folder} has no codebooks under codebooks/; pass the --out folder of a finished `saekit finetune`")
    cb_model_dir = folder / "model" if (folder / "model" / "config.json").is_file() else None
    if cb_model_dir is None and not run_cfg.get("freeze_model"):
        raise SaekitError(f"{folder}/model is missing; the finetune output is incomplete, rerun it into a new --out")

    cb_model = load_model(str(cb_model_dir) if cb_model_dir else original_name, device=cfg.device)
    dictionaries = [load_dictionary(p, device=cfg.device) for p in paths]
    targets = [resolve_target(str(p), d, cb_model) for p, d in zip(paths, dictionaries)]
    if cfg.store:
        from saekit.store import ActivationStore

        tokens, source = store_tokens(ActivationStore(cfg.store), cfg.max_tokens), {"store": str(cfg.store), "split": "eval"}
    elif cfg.data:
        tokens, source = text_tokens(cfg, cb_model), {"data": str(cfg.data)}
    else:
        tokens, source = finetune_eval_tokens(run_cfg, cb_model), {"finetune_eval": report.get("data", "")}
    if tokens.numel() == 0:
        raise SaekitError("no evaluation tokens: the data gave no sequences; pass --data FILE with text or --store DIR")
    hooks = list(dict.fromkeys(t.hook.name for t in targets))
    # The codebook model's own activation means (a store's statistics describe the original model).
    means = mean_activations(cb_model, tokens, hooks, cfg.batch_size)
    result = evaluate(cb_model, targets, tokens, means, splice_bos=cfg.splice_bos, batch_size=cfg.batch_size, progress=progress)
    result["model"] = cb_model.info.to_dict()
    result["source"] = source
    cb_row = result["all"] if result["all"] is not None else result["dictionaries"][0]
    del cb_model

    def clean_row(label: str, name: str) -> dict:
        m = load_model(name, device=cfg.device)
        r = evaluate(m, [], tokens, {}, splice_bos=cfg.splice_bos, batch_size=cfg.batch_size, progress=progress)["clean"]
        return {"model": label, "path": name, "loss": r["ce"], "accuracy": r["acc"]}

    table = [clean_row("original", original_name)]
    if (folder / "baseline" / "config.json").is_file():
        table.append(clean_row("fine-tuned, no codebooks", str(folder / "baseline")))
    cb_name = str(cb_model_dir or original_name)
    table.append({"model": "codebook model", "path": cb_name, "loss": cb_row["ce_spliced"], "accuracy": cb_row["acc_spliced"]})
    if cb_model_dir is not None:
        table.append({"model": "codebook model, codebooks removed", "path": cb_name, "loss": result["clean"]["ce"],
                      "accuracy": result["clean"]["acc"]})
    result["finetuned"] = {"folder": str(folder), "steps": report.get("steps"), "table": table}
    if cfg.json_out:
        runs.write_text(cfg.json_out, json.dumps(_clean_json(result), indent=2) + "\n")
    return result


def format_finetuned_table(result: dict):
    """The talk's table ("codebook models are capable language models"): one row per model."""
    from rich.table import Table

    ft = result["finetuned"]
    ev = result["eval"]
    t = Table(title=f"{ft['folder']}: loss (nats/token) and next-token accuracy on the same {ev['scored_positions']} predictions",
              title_justify="left")
    for name, just in (("model", "left"), ("loss", "right"), ("accuracy", "right"), ("path", "left")):
        t.add_column(name, justify=just)
    for r in ft["table"]:
        t.add_row(r["model"], _fmt(r["loss"], 4), _fmt(r["accuracy"]), r["path"])
    return t
