"""The main job in one call: harvest → train (a TopK SAE and a codebook) → splice-eval.

On the built-in toy model it also scores the dictionaries against the FSM's ground truth.
Each stage writes its own folder under `out` and resumes when rerun, so the pipeline does
too: rerunning after a crash picks up at the stage (and shard or checkpoint) it reached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from saekit.errors import SaekitError
from saekit.models import TOY_NAME


@dataclass
class PipelineConfig:
    """Everything `saekit pipeline` needs; every other setting is the stage's default."""

    model: str = TOY_NAME
    """Model: `toy`, a local Hugging Face directory or a Hub name."""
    hook: str = ""
    """Hook to train on (default: the residual stream after the middle block)."""
    data: str = ""
    """Text corpus (one document a line); default for the toy model: a generated FSM corpus."""
    out: str = "runs/demo"
    """Folder for every stage's output (store/, dicts/, eval.json)."""
    n_seq: int = 3000
    """Sequences of toy corpus to generate when --data is not given."""
    harvest_tokens: int = 0
    """Stop harvesting after this many tokens (0: the whole corpus)."""
    train_tokens: int = 3_000_000
    """Training tokens per dictionary."""
    expansion: int = 4
    """Dictionary width as a multiple of the hook's width (TopK SAE)."""
    k: int = 8
    """Active latents per token of the TopK SAE."""
    codes: int = 256
    """Codes in the codebook."""
    codebook_k: int = 1
    """Codes chosen per token by the codebook (k of the k-sparse codebook)."""
    device: str = "auto"
    """Device for every stage: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    seed: int = 0
    """Seed for the corpus, batches and initialisations."""


@dataclass
class PipelineResult:
    store: Path
    dictionaries: list[Path]
    splice: dict
    recovery: dict | None


def default_hook(model: str) -> str:
    """blocks.{n_layers//2 - 1 or 0}.hook_resid_post, read from the model's config without loading it."""
    from saekit.models import resolve_model_path

    cfg = Path(resolve_model_path(model)) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
        n_layers = int(raw.get("n_layer") or raw.get("num_hidden_layers"))
    except (OSError, ValueError, TypeError):
        raise SaekitError(f"cannot tell {model}'s depth to pick a hook; pass --hook blocks.L.hook_resid_post") from None
    return f"blocks.{max(n_layers // 2 - 1, 0)}.hook_resid_post"


def run_pipeline(cfg: PipelineConfig, progress: bool = True, say: Callable[[str], None] = print) -> PipelineResult:
    from saekit.harvest import HarvestConfig, harvest
    from saekit.splice import SpliceConfig, splice_eval
    from saekit.train import TrainConfig, train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    is_toy = cfg.model == TOY_NAME or (Path(cfg.model) / "fsm.json").is_file()
    hook = cfg.hook or default_hook(cfg.model)

    data, packing = cfg.data, "concat"
    if not data:
        if not is_toy:
            raise SaekitError("no --data given; pass a text file (one document a line) for a model other than the toy")
        from saekit.toy.corpus import ToyDataConfig, write_corpus

        data = str(out / "toy.txt")
        if not Path(data).is_file():
            say(f"[1/4] writing a toy corpus of {cfg.n_seq} sequences → {data}")
            write_corpus(ToyDataConfig(out=data, n_seq=cfg.n_seq, seed=cfg.seed, model=cfg.model))
        packing = "doc"

    say(f"[2/4] harvest {hook} of {cfg.model} → {out / 'store'}")
    store = harvest(
        HarvestConfig(model=cfg.model, hooks=[hook], data=data, packing=packing, tokens=cfg.harvest_tokens,
                      out=str(out / "store"), device=cfg.device, seed=cfg.seed),
        progress=progress,
    )

    say(f"[3/4] train a TopK SAE (k={cfg.k}, {cfg.expansion}× wide) and a codebook ({cfg.codes} codes, k={cfg.codebook_k})")
    common = dict(store=str(store), hooks=[hook], out=str(out / "dicts"), tokens=cfg.train_tokens,
                  seed=cfg.seed, device=cfg.device, resume=True)
    dicts = train(TrainConfig(kind="topk", k=[cfg.k], expansion=cfg.expansion, **common), progress=progress)
    dicts += train(TrainConfig(kind="codebook", k=[cfg.codebook_k], d_dict=cfg.codes, **common), progress=progress)

    say("[4/4] splice-eval on the store's held-out sequences")
    result = splice_eval(SpliceConfig(model=cfg.model, dicts=[str(d) for d in dicts], store=str(store),
                                      json_out=str(out / "eval.json"), device=cfg.device))
    recovery = None
    if is_toy and packing == "doc":
        from saekit.toy.eval import state_recovery, write_json

        rec = state_recovery([str(d) for d in dicts], str(store))
        write_json(rec, str(out / "toy_eval.json"))
        recovery = rec.to_dict()
    return PipelineResult(store, dicts, result, recovery)
