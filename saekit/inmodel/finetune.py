"""In-model training: Codebook Features' joint training (codebooks inside the model, trained with it).

Offline training (`saekit.train`) fits a dictionary to stored activations of a frozen
model.  Here the codebooks sit *in* the forward pass, as in Codebook Features (Tamkin et
al. 2023, §3): at each chosen hook the activation x is replaced by the codebook output
C_out = Σ of the k codes most similar to x (per group), and the model's own next-token
loss is minimised together with one commitment term per codebook:

    L = L_CE(model with codebooks) + β Σ_i ‖C_out^i − sg[C_in^i]‖² / d_in      (mean over tokens)

with C_in = x (the hook's activation), sg = stop-gradient, in normalised space (x_n = scale·x,
so β means the same for every hook).  Where each term's gradient goes:

- forward value at the hook is C_out, but the backward pass is the identity
  (straight-through estimator, `straight_through`): ∂L_CE/∂x = ∂L_CE/∂C_out, so L_CE trains
  the model's weights *below and above* the hook, and gives the codes **no** gradient;
- the commitment term reaches **only the codes** (C_out), never the model: sg[C_in] makes
  x a constant target, so the codes move towards the inputs that choose them (the
  k-means-like "codebook loss" of VQ-VAE).  There is no term pulling the model towards the
  codes; the model adapts to the codebooks only through L_CE, because its forward pass
  runs on C_out.

The model's weights are trained too unless `freeze_model` (then only the codes learn).
The model runs as a plain Hugging Face `AutoModelForCausalLM` (so the result is saved as a
normal model directory), with saekit's hook names mapped onto its modules through the
TransformerLens bridge's component map (`hook_site`); a test checks the activations there
equal `saekit.models.capture`.  Each codebook is a `saekit.dictionaries.Codebook`, saved
with `Dictionary.save` and a Provenance naming the fine-tuned model, so splice-eval,
analyze, steer and toy eval use it unchanged.

The talk's table ("Codebook models are capable language models") is `report`: held-out
loss and accuracy of the original model, the model fine-tuned for the same steps on the
same data *without* codebooks, and the codebook model with its codebooks active.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from saekit import allocator, metrics, outdir, runs
from saekit.config import apply_preset, check_signs, to_dict
from saekit.dictionaries.base import Provenance
from saekit.engine import Engine, Objective
from saekit.errors import SaekitError
from saekit.inmodel.codebooks import OBJECTIVES, InModelCodebook, build_codebook, find_init, norm_scale, parse_spec
from saekit.inmodel.data import TokenData, batch_at, load_tokens
from saekit.inmodel.loop import LoopConfig
from saekit.inmodel.model import lm_score, load_in_model, model_info_of, sample_rows, save_hf_model, spliced_logits
from saekit.inmodel.sites import Splicer
from saekit.models import resolve_device
from saekit.tokens import masked_mean, model_input, row_mask, scored_mask


# --- configuration -----------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    """`saekit finetune`: codebooks inserted into a model and trained with it (Codebook Features)."""

    model: str = ""
    """Model to fine-tune: Hub name, local Hugging Face directory or `toy`."""
    codebooks: str = ""
    """Codebooks to insert: 'SITE:k=..,codes=..,groups=..,sim=..;...' with SITE attn | mlp | resid (optionally with layers, e.g. mlp[0,2]) or a hook name; e.g. 'attn:k=8,groups=heads;mlp:k=100'."""
    data: str = ""
    """Training text: .txt (one document per line), .jsonl or a folder of them; or use --store."""
    store: str = ""
    """Activation store whose token sequences to train on (train split) and evaluate on (eval split)."""
    text_field: str = "text"
    """JSONL field holding the document (with --data)."""
    packing: str = "concat"
    """How --data documents become sequences: concat (joined with EOS, cut) or doc (one per sequence, padded; the toy corpus needs it)."""
    out: str = ""
    """Output folder: model/ (Hugging Face), codebooks/<hook>/ (saekit dictionaries), baseline/, report.json."""
    init: str = ""
    """Start the codebooks from saekit codebooks in this folder (e.g. `saekit train --out`), matched by hook; the rest by k-means."""
    freeze_model: bool = False
    """Train only the codes; the model's weights stay as they are (no model copy is written)."""
    steps: int = 1000
    """Optimiser steps."""
    lr: float = 1e-4
    """Adam learning rate of the model's weights."""
    codebook_lr: float = 1e-3
    """Adam learning rate of the codes (normalised space, where a code has norm ≈ sqrt(d_group) / k)."""
    lr_decay: float = 0.0
    """Share of the run, at its end, over which every learning rate falls linearly towards 0 (0 = constant, as the paper; 0.2 = the last fifth)."""
    commit_coef: float = 1.0
    """β: weight of each codebook's commitment term ‖C_out − sg[C_in]‖²/d_in (normalised)."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence with --data (BOS included; at most the model's context). A store's sequences keep their length."""
    eval_sequences: int = 64
    """Held-out sequences for the loss/accuracy table (the first ones of --data, or the store's eval split)."""
    baseline: bool = True
    """Also fine-tune the model without codebooks for the same steps on the same batches (the table's 'fine-tuned' row)."""
    skip_bos: bool = True
    """Leave position 0 (BOS) unreplaced, as splice-eval does: its attention-sink activations would waste codes."""
    init_rows: int = 8192
    """Activation rows sampled before training for the scale and the k-means initialisation."""
    replace_every: int = 100
    """Steps between replacements of dead codes (codes unchosen for dead_tokens tokens); 0 = never.  None in the last replace_every steps."""
    dead_tokens: int = 100_000
    """A code not chosen for this many tokens is dead and gets replaced."""
    seed: int = 0
    """Seed of the data order, the initialisation and code replacement."""
    run: LoopConfig = field(default_factory=lambda: LoopConfig(checkpoint_every=200))
    """Checkpoint and log cadence, device, resume (flags --checkpoint-every, --log-every, --device, --resume)."""
    preset: str = ""
    """paper: Codebook Features' TokFSM settings for every field left at its default (see PRESETS); empty: none."""
    objective: str = "commit"
    """commit: the LM loss never reaches the codes (they learn from β·commitment alone); paper: the codebook's output is the chosen codes, so the LM loss trains them too, plus β·‖C_out − sg[C_in]‖² summed over the width."""
    input_norm: str = "scale"
    """Codebook input: scale (a fixed scalar from a sample) or layernorm (a learnt LayerNorm per group, as Codebook Features; the codes then replace the activation in that space)."""
    code_init: str = "kmeans"
    """New codes: kmeans (centroids of a sample of the model's activations) or normal (N(0, 1) entries, Codebook Features' init)."""
    codebook_weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay of the codes."""
    from_scratch: bool = False
    """Re-initialise the model's weights (seeded) before training: model and codebooks learn together from random init."""

    def __post_init__(self):
        if self.data and self.store:
            raise ValueError("give either data or store, not both")
        check_signs(self, positive=("steps", "batch_size", "eval_sequences", "init_rows"),
                    non_negative=("lr", "codebook_lr", "commit_coef", "replace_every", "dead_tokens"))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.packing not in ("concat", "doc"):
            raise ValueError(f"packing {self.packing!r} is not concat or doc")
        for name, allowed in (("preset", ("", *PRESETS)), ("objective", OBJECTIVES), ("input_norm", ("scale", "layernorm")),
                              ("code_init", ("kmeans", "normal"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(a or repr(a) for a in allowed)}")
        if self.from_scratch and self.freeze_model:
            raise ValueError("from_scratch trains the model from random weights; it cannot be combined with freeze_model")
        if not 0.0 <= self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay is a share of the steps, between 0 and 1; got {self.lr_decay}")
        if self.codebook_weight_decay < 0:
            raise ValueError(f"codebook_weight_decay must be non-negative, got {self.codebook_weight_decay}")


# Codebook Features' TokFSM run (its fsm_main.yaml, library 0.1.2): codebooks at every layer on the attention's
# pre-projection output (one per head) and the MLP output, k = 1 of 1,000 codes, inner product over the code's norm
# (saekit's cosine picks the same code), LayerNorm'd input, N(0, 1) codes, LM loss + reconstruction, Adam lr 1e-3
# constant for model and codes, code weight decay 0.01, every position (BOS included), batch 512.
PAPER_CODEBOOKS = "attn:k=1,codes=1000,groups=heads,sim=cosine;mlp:k=1,codes=1000,sim=cosine"
PRESETS: dict[str, dict] = {
    "paper": {"codebooks": PAPER_CODEBOOKS, "objective": "paper", "input_norm": "layernorm", "code_init": "normal",
              "lr": 1e-3, "codebook_lr": 1e-3, "commit_coef": 1.0, "codebook_weight_decay": 0.01, "skip_bos": False,
              "batch_size": 512},
}


def with_preset(cfg: FinetuneConfig) -> FinetuneConfig:
    """cfg with its preset's values in every field still at the dataclass default (what the user set wins)."""
    return apply_preset(cfg, PRESETS[cfg.preset]) if cfg.preset else cfg


# Fields that change what a run computes; a checkpoint written under other values is refused.
FINETUNE_IDENTITY = ("model", "codebooks", "data", "store", "text_field", "packing", "init", "freeze_model", "lr", "codebook_lr",
                     "commit_coef", "batch_size", "seq_len", "eval_sequences", "skip_bos", "init_rows", "replace_every",
                     "dead_tokens", "seed", "preset", "objective", "input_norm", "code_init", "codebook_weight_decay",
                     "from_scratch", "lr_decay")


def finetune_identity(cfg: FinetuneConfig) -> str:
    """The run's identity hash; lr_decay enters only when set, so checkpoints written before it existed still resume."""
    fields = FINETUNE_IDENTITY if cfg.lr_decay else tuple(f for f in FINETUNE_IDENTITY if f != "lr_decay")
    return runs.identity_hash(to_dict(cfg), fields)


def lr_factor(step: int, steps: int, decay: float) -> float:
    """Multiplier of the base learning rates for the step after `step` steps: 1, then a linear fall over the last
    `decay` share of `steps` to 1/n of its start at the final step (n = the decay's length), never 0 itself."""
    n = round(decay * steps)
    if n <= 0 or step < steps - n:
        return 1.0
    return (steps - step) / n


# --- run layout: the one place that names files --------------------------------------------------

class FinetunePaths(NamedTuple):
    out: Path

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def baseline(self) -> Path:
        return self.out / "baseline"

    @property
    def report(self) -> Path:
        return self.out / "report.json"

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def codebook(self, hook: str) -> Path:
        return self.out / "codebooks" / hook

    def checkpoints(self, phase: str) -> Path:
        return self.out / "checkpoints" / phase

    def checkpoint_steps(self, phase: str) -> list[int]:
        return runs.checkpoint_steps(self.checkpoints(phase))

# --- training loop ---------------------------------------------------------------------------

@dataclass
class Phase:
    """One training run inside a finetune job (the codebook model, or the baseline without codebooks)."""

    name: str
    hf: nn.Module
    layers: dict[str, InModelCodebook]
    opt: torch.optim.Optimizer
    since_fired: dict[str, Tensor] = field(default_factory=dict)
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    step: int = 0
    last: dict = field(default_factory=dict)


def make_phase(name: str, hf: nn.Module, layers: dict[str, InModelCodebook], cfg: FinetuneConfig) -> Phase:
    train_model = not cfg.freeze_model
    for p in hf.parameters():
        p.requires_grad_(train_model)
    groups = []
    if train_model:
        groups.append({"params": [p for p in hf.parameters()], "lr": cfg.lr})
    codes = [layer.d.codebook for layer in layers.values()]
    if codes:
        groups.append({"params": codes, "lr": cfg.codebook_lr, "weight_decay": cfg.codebook_weight_decay})
    norms = [p for layer in layers.values() for name, p in layer.d.named_parameters() if name.startswith("ln_")]
    if norms:  # the codebooks' LayerNorm affine (input_norm=layernorm), at the codes' rate, no decay
        groups.append({"params": norms, "lr": cfg.codebook_lr})
    if not groups:
        raise SaekitError("nothing to train: --freeze-model with no codebooks")
    for g in groups:
        g["base_lr"] = g["lr"]  # lr_decay scales every group from its own rate
    opt = torch.optim.AdamW(groups, weight_decay=0.0)  # decay 0 = Adam; only the codes may decay
    dev = next(hf.parameters()).device
    since = {h: torch.zeros(layer.d.cfg.d_dict, device=dev) for h, layer in layers.items()}
    return Phase(name, hf, layers, opt, since, torch.Generator().manual_seed(cfg.seed))


def train_step(ph: Phase, t: Tensor, bos_id: int, splicer: Splicer | None, cfg) -> dict[str, Tensor]:
    """One optimiser step on token batch t (B, T): CE (+ β Σ commitment); returns the detached terms."""
    logits = spliced_logits(ph.hf, t, bos_id, splicer, ph.layers, cfg.skip_bos)
    inp = model_input(t, bos_id)
    m = scored_mask(t)
    ce = masked_mean(metrics.ce_per_token(logits, inp), m)
    terms = {"ce": ce}
    loss = ce
    for h, layer in ph.layers.items():
        terms[f"commit/{h}"] = layer.last_commit
        terms[f"fvu/{h}"] = layer.last_fvu
        loss = loss + cfg.commit_coef * layer.last_commit
    ph.opt.zero_grad(set_to_none=True)
    loss.backward()
    factor = lr_factor(ph.step, cfg.steps, cfg.lr_decay)
    for g in ph.opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    ph.opt.step()
    with torch.no_grad():
        n_rows = row_mask(t, cfg.skip_bos).sum()
        for h, layer in ph.layers.items():
            ph.since_fired[h] = torch.where(layer.last_fired > 0, torch.zeros_like(ph.since_fired[h]), ph.since_fired[h] + n_rows)
    ph.step += 1
    if replaces_at(ph.step, cfg):
        _replace_dead(ph, cfg)
    return {k: v.detach() for k, v in terms.items()}


def replaces_at(step: int, cfg) -> bool:
    """Whether dead codes are replaced after `step` steps: every `replace_every` steps, but only while at least
    `replace_every` steps remain, so the run never ends on codes the model has not trained with.  (A replaced
    k = 1 code is the nearest code of the inputs it was copied from: replaced at the last step, 1,554 of 4,000
    layer-0 attention codes of the toy-codebooks recipe changed what the model computes, held-out loss
    1.2263 → 1.2518.)"""
    return bool(cfg.replace_every) and step % cfg.replace_every == 0 and step + cfg.replace_every <= cfg.steps


def _replace_dead(ph: Phase, cfg) -> None:
    """Dead codes → recent inputs (Codebook.resample_dead); their Adam moments are reset."""
    for h, layer in ph.layers.items():
        dead = metrics.dead_mask(ph.since_fired[h], cfg.dead_tokens)
        if layer.last_rows is None or not layer.last_rows.shape[0]:
            continue
        masks = layer.d.resample_dead(dead, layer.last_rows, ph.generator)
        if not masks:
            continue
        st = ph.opt.state.get(layer.d.codebook, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][masks["codebook"]] = 0
        ph.since_fired[h] = torch.where(dead, torch.zeros_like(ph.since_fired[h]), ph.since_fired[h])


def phase_state(ph: Phase) -> tuple[dict[str, Tensor], dict]:
    """Everything needed to resume a phase, as flat tensors + JSON (no pickle)."""
    t: dict[str, Tensor] = {}
    for name, p in ph.hf.named_parameters():  # named_parameters lists tied weights once
        if p.requires_grad:
            t[f"model.{name}"] = p
    for h, layer in ph.layers.items():
        for name, p in layer.d.named_parameters():  # codebook (+ ln_weight, ln_bias)
            t[f"{name}.{h}"] = p
        t[f"since.{h}"] = ph.since_fired[h]
    opt_t, groups = runs.optimizer_tensors(ph.opt)
    t |= opt_t
    t["generator"] = ph.generator.get_state()
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}, {"param_groups": groups, "step": ph.step}


def load_phase_state(ph: Phase, t: dict[str, Tensor], meta: dict) -> None:
    params = dict(ph.hf.named_parameters())
    with torch.no_grad():
        for k, v in t.items():
            if k.startswith("model."):
                params[k[6:]].copy_(v)
            elif k.startswith("since."):
                ph.since_fired[k[6:]] = v.to(ph.since_fired[k[6:]].device)
            elif k.startswith(("codebook.", "ln_weight.", "ln_bias.")):
                name, h = k.split(".", 1)
                getattr(ph.layers[h].d, name).copy_(v)
    runs.load_optimizer(ph.opt, t, meta["param_groups"])
    for g in ph.opt.param_groups:  # a checkpoint from before lr_decay: its rates are the base rates
        g.setdefault("base_lr", g["lr"])
    ph.generator.set_state(t["generator"])
    ph.step = int(meta["step"])


class PhaseObjective(Objective):
    """A phase as the engine's objective: a batch of whole sequences per step, CE (+ commitment)."""

    unit = "steps"
    nan_advice = "lower --lr / --codebook-lr"

    def __init__(self, ph: Phase, data: TokenData, bos_id: int, splicer: Splicer | None, cfg, root: Path, ident: str,
                 metrics_file: Path):
        self.ph, self.data, self.bos_id, self.splicer, self.cfg = ph, data, bos_id, splicer, cfg
        self.root, self.ident, self.cfg_dict = root, ident, to_dict(cfg)
        self.labels = [ph.name]
        self.log = runs.MetricsLog(metrics_file)
        self.acc: dict[str, Tensor] = {}
        self.n_acc = 0
        self.start = ph.step

    def take_step(self, step: int) -> None:
        dev = next(self.ph.hf.parameters()).device
        t = torch.as_tensor(batch_at(self.data.train, step, self.cfg.batch_size, self.cfg.seed), dtype=torch.long, device=dev)
        # the module's `train_step` (looked up at each call, so a test can wrap it)
        for k, v in train_step(self.ph, t, self.bos_id, self.splicer, self.cfg).items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n_acc += 1

    def bad_steps(self) -> list[int | None]:
        ok = all(math.isfinite(float(v) / self.n_acc) for v in self.acc.values())
        return [None if ok else self.ph.step]

    def log_rows(self, step: int, seconds: float) -> list[dict]:
        row = {"phase": self.ph.name, "step": step} | {k: float(v) / self.n_acc for k, v in self.acc.items()}
        row["steps_per_s"] = (step - self.start) / seconds
        self.ph.last = row
        self.acc, self.n_acc = {}, 0
        return [row]

    def progress_info(self, row: dict) -> str:
        commit = [v for k, v in row.items() if k.startswith("commit/")]
        fvu = [v for k, v in row.items() if k.startswith("fvu/")]
        return f"ce={row['ce']:.4f}" + (f" commit={sum(commit) / len(commit):.4f} fvu={sum(fvu) / len(fvu):.3f}" if commit else "")

    def metrics_logs(self) -> list[runs.MetricsLog | None]:
        return [self.log]

    def checkpoint_roots(self) -> list[Path]:
        return [self.root]

    def save_checkpoint(self, step: int) -> None:
        tensors, meta = phase_state(self.ph)
        runs.save_checkpoint(self.root, step, tensors, meta | {"identity": self.ident, "config": self.cfg_dict})


def run_phase(ph: Phase, data: TokenData, bos_id: int, splicer: Splicer | None, cfg, root: Path, ident: str,
              identity_fields: tuple[str, ...], metrics_file: Path, progress: bool) -> None:
    """Train `ph` to cfg.steps through the engine, resuming from its last good checkpoint under `root` when cfg.run.resume."""
    if cfg.run.resume:
        found = runs.latest_checkpoint(root)
        if found is not None:
            step, tensors, meta = found
            runs.check_identity(runs.checkpoint_dir(root, step), meta, ident, to_dict(cfg), identity_fields)
            load_phase_state(ph, tensors, meta)
    Engine(PhaseObjective(ph, data, bos_id, splicer, cfg, root, ident, metrics_file), cfg.steps, cfg.run.log_every,
           cfg.run.checkpoint_every, progress).run(ph.step)


# --- the job --------------------------------------------------------------------------------------

class FinetuneResult(NamedTuple):
    out: Path
    model: Path
    """The model directory to load (out/model, or the original model with --freeze-model)."""
    codebooks: list[Path]
    table: list[dict]
    """Rows {model, loss, accuracy, tokens}: original, fine-tuned without codebooks, codebook model."""


def finetune(cfg: FinetuneConfig, progress: bool = True) -> FinetuneResult:
    """Insert codebooks into cfg.model, train them (and the model) jointly, save, and report the loss/accuracy table."""
    cfg = with_preset(cfg)
    if not cfg.model:
        raise SaekitError("no model given; pass --model (a Hub name, a local HF directory or 'toy')")
    if not cfg.out:
        raise SaekitError("no output folder given; pass --out DIR")
    allocator.keep_large_blocks()  # the step's large tensors reuse their pages instead of faulting them in each step
    with outdir.claim(cfg.out, "finetune"):
        return _finetune(cfg, progress)


def _finetune(cfg: FinetuneConfig, progress: bool) -> FinetuneResult:
    paths = FinetunePaths(Path(cfg.out))
    if paths.report.exists():
        if not cfg.run.resume:
            raise SaekitError(f"{cfg.out} already holds a finished finetune; choose another --out")
        rep = json.loads(paths.report.read_text())  # finished: --resume just reports it
        return FinetuneResult(paths.out, Path(rep["model"]), [Path(p) for p in rep["codebooks"]], rep["table"])
    if (paths.out / "checkpoints").exists() and not cfg.run.resume:
        raise SaekitError(f"{cfg.out} holds an unfinished finetune; pass --resume to continue it or choose another --out")
    dev = resolve_device(cfg.run.device)
    # Hooks: parse against the model's depth (n_layers from the bridge inside load_in_model).
    from saekit.models import resolve_model_path

    n_layers = _n_layers(resolve_model_path(cfg.model))
    specs = parse_spec(cfg.codebooks, n_layers)
    hooks = [s.hook for s in specs]
    im = load_in_model(cfg.model, hooks, dev)
    if cfg.from_scratch:
        reinitialise(im.hf, cfg.seed)
    splicer = Splicer(im.hf, list(im.sites.values()))
    need = cfg.steps * cfg.batch_size
    data = load_tokens(cfg.data, cfg.store, im.tokenizer, im.bos_id, cfg.seq_len, need, cfg.eval_sequences, cfg.text_field,
                       n_ctx=im.info.n_ctx, packing=cfg.packing)
    inits = find_init(cfg.init, hooks) if cfg.init else {}
    paths.out.mkdir(parents=True, exist_ok=True)
    runs.write_json(paths.out / "config.json", to_dict(cfg))
    if not cfg.run.resume:
        runs.MetricsLog(paths.metrics).start()
    torch.manual_seed(cfg.seed)

    # Codebooks: shape from the spec / --init; scale and k-means from a sample of the original model's activations.
    original = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size)
    fsm = _fsm_of(im.path)
    original_fsm = fsm_score(im.hf, fsm, cfg.seed)
    # A sample is needed for a scale (input_norm=scale) or k-means codes; a LayerNorm'd input with N(0, 1) codes needs none.
    need_sample = cfg.input_norm == "scale" or cfg.code_init == "kmeans"
    sample = sample_rows(im.hf, splicer, [h for h in hooks if h not in inits], data, im.bos_id, cfg.init_rows,
                         cfg.batch_size, cfg.skip_bos) if len(inits) < len(hooks) and need_sample else {}
    gen = torch.Generator().manual_seed(cfg.seed)
    layers: dict[str, InModelCodebook] = {}
    for s in specs:
        d = build_codebook(s, im.shapes[s.hook], inits.get(s.hook), cfg.input_norm)
        if s.hook in inits:
            d.scale.fill_(float(inits[s.hook].scale))
        else:
            scale = norm_scale(sample[s.hook]) if cfg.input_norm == "scale" else 1.0
            d.scale.fill_(scale)
            if cfg.code_init == "kmeans":
                d.init_from_data(sample[s.hook] * scale, seed=cfg.seed)
            else:
                with torch.no_grad():
                    d.codebook.copy_(torch.randn(d.codebook.shape, generator=gen))
        layers[s.hook] = InModelCodebook(d.to(dev), cfg.objective)

    ident = finetune_identity(cfg)
    joint = make_phase("codebook model", im.hf, layers, cfg)
    run_phase(joint, data, im.bos_id, splicer, cfg, paths.checkpoints("joint"), ident, FINETUNE_IDENTITY, paths.metrics, progress)
    with_codes = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size, splicer, layers, cfg.skip_bos)
    without_codes = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size)
    with_codes_fsm = fsm_score(im.hf, fsm, cfg.seed, splicer, layers)
    without_codes_fsm = fsm_score(im.hf, fsm, cfg.seed)

    # Save the codebook model and its codebooks (Provenance → the saved model).
    if cfg.freeze_model:
        model_dir, minfo = Path(im.path), im.info.to_dict()
    else:
        model_dir = save_hf_model(im.hf, im.tokenizer, im.path, paths.model)
        minfo = model_info_of(model_dir, im.info)
    saved = []
    for h, layer in layers.items():
        d = layer.d.cpu()
        d.prov = Provenance(hook=h, model=minfo, hook_shape=im.shapes[h], scale=float(d.scale), store=cfg.store or None)
        dead = float(metrics.dead_mask(joint.since_fired[h].cpu(), cfg.dead_tokens).float().mean())
        d.summary = {"objective": "joint", "loss": cfg.objective, "train_steps": cfg.steps, "commitment": joint.last.get(f"commit/{h}"),
                     "fvu": joint.last.get(f"fvu/{h}"),
                     "dead_fraction": dead, "dead_window_tokens": cfg.dead_tokens}  # the last dead_tokens training tokens
        d.train_config = to_dict(cfg) | {"objective": "joint"}
        saved.append(d.save(paths.codebook(h)))
    del joint, layers
    im.hf.cpu()
    del im

    table = [{"model": "original", **original._asdict(), **original_fsm}]
    if cfg.baseline and not cfg.freeze_model:
        base = load_in_model(cfg.model, hooks, dev)
        if cfg.from_scratch:
            reinitialise(base.hf, cfg.seed)  # the same random start as the codebook model
        bph = make_phase("fine-tuned (no codebooks)", base.hf, {}, cfg)
        run_phase(bph, data, base.bos_id, None, cfg, paths.checkpoints("baseline"), ident, FINETUNE_IDENTITY, paths.metrics, progress)
        table.append({"model": "fine-tuned, no codebooks", **lm_score(base.hf, data.eval, base.bos_id, cfg.batch_size)._asdict(),
                      **fsm_score(base.hf, fsm, cfg.seed)})
        save_hf_model(base.hf, base.tokenizer, base.path, paths.baseline)
    table.append({"model": "codebook model", **with_codes._asdict(), **with_codes_fsm})
    if not cfg.freeze_model:
        table.append({"model": "codebook model, codebooks removed", **without_codes._asdict(), **without_codes_fsm})
    report = {"table": table, "model": str(model_dir), "codebooks": [str(p) for p in saved], "eval_sequences": int(data.eval.shape[0]),
              "data": data.source, "steps": cfg.steps, "config": to_dict(cfg)}
    runs.write_json(paths.report, report)
    shutil.rmtree(paths.out / "checkpoints", ignore_errors=True)  # the result is complete; its checkpoints are not needed
    return FinetuneResult(paths.out, model_dir, saved, table)


def _fsm_of(model_path: str):
    """The FSM of a toy model directory (its fsm.json), or None for any other model."""
    from saekit.toy.fsm import load_fsm

    return load_fsm(model_path) if (Path(model_path) / "fsm.json").is_file() else None


FSM_SEQUENCES = 64


@torch.no_grad()
def fsm_score(hf: nn.Module, fsm, seed: int, splicer: Splicer | None = None, layers: dict[str, InModelCodebook] | None = None) -> dict:
    """{transition_accuracy, transitions} of FSM_SEQUENCES walks sampled from a toy model (its codebooks active when
    given, at every position), or {} when the model has no FSM."""
    if fsm is None:
        return {}
    from saekit.toy.fsm import transition_accuracy
    from saekit.toy.train import sample

    ctx = hf.config.max_position_embeddings if hasattr(hf.config, "max_position_embeddings") else hf.config.n_positions
    if layers:
        for layer in layers.values():
            layer.mask = None  # generation feeds one token at a time: replace every position
        with splicer.active(dict(layers)):
            tokens = sample(hf, FSM_SEQUENCES, ctx, seed)
    else:
        tokens = sample(hf, FSM_SEQUENCES, ctx, seed)
    acc, n = transition_accuracy(fsm, tokens)
    return {"transition_accuracy": acc, "transitions": n}


def reinitialise(hf: nn.Module, seed: int) -> None:
    """Fresh weights from the architecture's own initialisation (seeded): for --from-scratch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf.apply(hf._init_weights)
    if getattr(hf.config, "tie_word_embeddings", False):
        hf.tie_weights()


def _n_layers(path: str) -> int:
    """Depth from the model's config.json (before the slow load), so the spec is checked first."""
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text())
        for key in ("n_layer", "num_hidden_layers", "n_layers", "num_layers"):
            if key in c:
                return int(c[key])
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise SaekitError(f"cannot read the config of model {path!r}: {str(e).splitlines()[0]}") from None
    return int(getattr(c, "num_hidden_layers", getattr(c, "n_layer", 0)))
