"""End-to-end dictionaries: trained through the frozen model against the clean model's output (Braun et al. 2024).

Offline training fits x̂ to x; what a user needs is that the model still works when x̂
replaces x.  Here the dictionary is spliced into the frozen model's forward pass (every
position but BOS and padding, as splice-eval does) and trained on

    L = KL(p_clean ‖ p_spliced)  +  μ · ‖x_n − x̂_n‖² / d_in   (+ λ L1 for relu)

averaged over token positions, p the next-token distributions ("e2e" with μ = 0,
"e2e + downstream reconstruction" in Braun et al. §2 is μ > 0 at the same hook).  The
model's weights get no gradient; the gradient reaches the dictionary through the layers
above the hook.  Sparsity is the dictionary's own: TopK (and codebooks) fix L0 by
construction, relu keeps its L1 term.  Kinds: relu, topk, batchtopk, codebook from scratch,
any saekit dictionary (interop formats too) from --init.  BatchTopK trains as it does
offline: the k·n largest pre-activations over the n spliced rows of the step are kept
and its threshold θ follows them (`training_reconstruction`), so the saved dictionary
encodes with θ alone, independent of the batch.

Reached as `saekit train --objective e2e` (the CLI maps the TrainConfig with
`from_train_config`) or `train_e2e(E2EConfig)`.  The loop is `saekit.engine`'s; checkpoints
and resume are `saekit.runs`' (safetensors + JSON, batches a pure function of (seed, step)).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from saekit import metrics, runs
from saekit.config import check_fields, check_signs, to_dict
from saekit.dictionaries import build
from saekit.dictionaries.base import SAE_KINDS as KINDS, DictConfig, Dictionary, Provenance
from saekit.engine import Engine, Objective
from saekit.errors import SaekitError
from saekit.inmodel.codebooks import norm_scale
from saekit.inmodel.data import TokenData, batch_at, load_tokens
from saekit.inmodel.loop import LoopConfig
from saekit.inmodel.model import InModel, load_in_model, sample_rows
from saekit.inmodel.sites import Splicer
from saekit.models import resolve_device
from saekit.tokens import PAD, masked_mean, model_input, row_mask, scored_mask


@dataclass
class E2EConfig:
    """An end-to-end dictionary run: model frozen, dictionary spliced in, trained against KL to the clean output."""

    model: str = ""
    """Frozen model: Hub name, local HF directory or `toy`; empty = the model of --store."""
    hooks: list[str] = field(default_factory=list)
    """Hooks to train a dictionary for (comma-separated); each is trained alone, the others stay clean."""
    data: str = ""
    """Training text (.txt, .jsonl or a folder); or use --store."""
    store: str = ""
    """Activation store whose token sequences (train split; eval split held out) to use."""
    text_field: str = "text"
    """JSONL field holding the document (with --data)."""
    out: str = "dictionaries"
    """Output folder; each dictionary goes to <out>/<hook>/<kind>-...-e2e/."""
    init: str = ""
    """Start from the saekit dictionaries in this folder (matched by hook) instead of fresh ones."""
    arch: DictConfig = field(default_factory=lambda: DictConfig(k=32, l1=5.0))
    """Architecture of each new dictionary when not --init (flags --kind, --d-dict, --k, --l1, --groups, --similarity); d_in comes from the model."""
    expansion: int = 8
    """Latents per input dimension when d_dict is 0."""
    mse_coef: float = 0.0
    """μ: weight of the normalised reconstruction term ‖x_n − x̂_n‖²/d_in added to the KL."""
    steps: int = 500
    """Optimiser steps."""
    lr: float = field(default=1e-3, metadata={"range": "positive"})
    """Adam learning rate."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 0
    """Tokens per sequence with --data; 0 = the model's context, at most 128 (a store's sequences keep their length)."""
    eval_sequences: int = 32
    """Held-out sequences for the before/after KL and CE and the final FVU/L0."""
    skip_bos: bool = True
    """Leave position 0 (BOS) unspliced, as splice-eval does."""
    init_rows: int = 8192
    """Rows sampled for the scale and the data-dependent init (b_dec median, k-means codes)."""
    seed: int = 0
    """Seed of the data order and the initialisation."""
    run: LoopConfig = field(default_factory=LoopConfig)
    """Checkpoint and log cadence, device, resume (flags --checkpoint-every, --log-every, --device, --resume)."""

    def __post_init__(self):
        if self.data and self.store:
            raise ValueError("give either data or store, not both")
        if self.arch.kind not in KINDS:
            raise ValueError(f"kind {self.arch.kind!r} cannot be trained end-to-end from scratch; use one of {', '.join(KINDS)} (or --init)")
        check_signs(self, positive=("steps", "batch_size", "eval_sequences", "expansion", "init_rows"),
                    non_negative=("mse_coef",))
        check_fields(self)  # lr positive (its metadata), no NaN
        if self.arch.kind != "relu" and not (self.arch.k or 0) > 0:
            raise ValueError(f"k must be positive, got {self.arch.k}")


E2E_IDENTITY = ("model", "data", "store", "text_field", "init", "arch", "expansion", "mse_coef", "lr", "batch_size", "seq_len", "eval_sequences", "skip_bos", "init_rows", "seed")


def from_train_config(tc) -> E2EConfig:
    """`saekit train --objective e2e`: the TrainConfig fields mapped onto an E2EConfig.

    `batch_size` and `tokens` count activation rows there; here a step is a batch of whole
    sequences, so steps = tokens / batch_size rows with batch_size // context sequences each.
    """
    from saekit import distributed, precision

    if distributed.env().distributed:
        raise SaekitError("objective e2e does not run under torchrun yet; start it as a single process")
    if precision.canonical(getattr(tc, "precision", "auto")) not in ("auto", "float32"):
        raise SaekitError(f"--precision {tc.precision} is for offline training; --objective e2e trains in float32 "
                          "(leave --precision at auto)")
    ctx = 0
    if tc.store:
        from saekit.store import open_store

        ctx = open_store(tc.store).context_size
    seq_len = ctx  # 0: chosen from the model's context in train_e2e
    per_seq = ctx or 128
    seqs = max(1, tc.batch_size // per_seq)
    from saekit.train import DEFAULT_TOKENS

    steps = max(1, math.ceil((tc.tokens or DEFAULT_TOKENS) / (seqs * per_seq)))  # no store to count passes over
    hooks = [] if [h.lower() for h in tc.hooks] == ["all"] else list(tc.hooks)
    if not hooks:
        raise SaekitError("--objective e2e needs explicit --hooks (one forward per hook and step; 'all' is for offline training)")
    return E2EConfig(model=getattr(tc, "model", ""), hooks=hooks, data=getattr(tc, "data", ""), store=tc.store, out=tc.out,
                     arch=dataclasses.replace(tc.arch, k=tc.k[0], l1=tc.l1[0]), expansion=tc.expansion, mse_coef=getattr(tc, "mse_coef", 0.0), steps=steps, lr=tc.lr if tc.lr is not None else 1e-3,
                     batch_size=seqs, seq_len=seq_len, init_rows=min(tc.init_rows, 16384), seed=tc.seed,
                     run=LoopConfig(checkpoint_every=max(1, tc.checkpoint_every // (seqs * per_seq)) if tc.checkpoint_every else 0,
                                    log_every=max(1, min(tc.log_every, 10)), device=tc.device, resume=tc.resume))


# --- pure maths -----------------------------------------------------------------------------------

def e2e_loss(clean_logits: Tensor, spliced_logits: Tensor, mask: Tensor) -> Tensor:
    """Mean KL(clean ‖ spliced) over positions where mask (B, T) is True; the clean side carries no gradient."""
    return masked_mean(metrics.kl_per_token(clean_logits.detach(), spliced_logits), mask)


def spliced_reconstruction(d: Dictionary, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, codes) for rows (n, d_in), differentiable in the dictionary's parameters."""
    codes = d.encode(rows)
    return d.decode(codes), codes


def training_reconstruction(d: Dictionary, rows: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, codes) for the training step: as at inference, except BatchTopK.

    BatchTopK's inference rule (pre > θ) depends on a threshold that only training
    estimates; a fresh one (θ < 0) would keep every positive pre-activation.  So during
    training it selects the k·n largest pre-activations over the batch's n rows, as the
    offline trainer does, and moves θ towards the smallest kept value.
    """
    if d.cfg.kind == "batchtopk":
        from saekit.dictionaries.fast import batch_topk_mask

        codes = batch_topk_mask(d.pre_acts(rows.to(d.scale.dtype) * d.scale), d.cfg.k)
        d._update_threshold(codes.detach())
        return d.decode(codes), codes
    return spliced_reconstruction(d, rows)


# --- one run ------------------------------------------------------------------------------------------

def run_paths(cfg: E2EConfig, hook: str, d: Dictionary) -> runs.RunPaths:
    """The offline layout (`saekit.runs`) with an `-e2e` suffix: <out>/<hook>/<kind>-k32-e2e/."""
    c = d.cfg
    return runs.run_paths(cfg.out, hook, runs.run_name(c.kind, c.k, c.l1, c.groups) + "-e2e")


class E2EModel(NamedTuple):
    im: InModel
    splicer: Splicer


@torch.no_grad()
def e2e_eval(em: E2EModel, d: Dictionary, hook: str, tokens: np.ndarray, batch_size: int, skip_bos: bool) -> dict:
    """KL, CE (clean and spliced), FVU, L0, normalised MSE and dead fraction on held-out sequences."""
    hf, bos = em.im.hf, em.im.bos_id
    dev = next(hf.parameters()).device
    kl = ce_c = ce_s = n_pos = n_sc = mse = 0.0
    fvu = metrics.FVUAccumulator()
    fires = torch.zeros(d.cfg.d_dict, device=dev)
    l0_sum = rows_n = 0.0
    for i in range(0, tokens.shape[0], batch_size):
        t = torch.as_tensor(tokens[i:i + batch_size], dtype=torch.long, device=dev)
        inp, mask, sm = model_input(t, bos), row_mask(t, skip_bos), scored_mask(t)
        clean = hf(input_ids=inp).logits
        caught = {}

        def fn(x):
            rows = x[mask]
            x_hat, codes = spliced_reconstruction(d, rows)
            caught["rows"], caught["x_hat"], caught["codes"] = rows, x_hat, codes
            out = x.clone()
            out[mask] = x_hat.to(x.dtype)
            return out

        with em.splicer.active({hook: fn}):
            spliced = hf(input_ids=inp).logits
        valid = t != PAD
        kl += (metrics.kl_per_token(clean, spliced) * valid).sum().item()
        n_pos += valid.sum().item()
        ce_c += (metrics.ce_per_token(clean, inp) * sm).sum().item()
        ce_s += (metrics.ce_per_token(spliced, inp) * sm).sum().item()
        n_sc += sm.sum().item()
        if caught["rows"].shape[0]:
            fvu.update(caught["rows"], caught["x_hat"])
            mse += ((caught["rows"] - caught["x_hat"]) * d.scale).pow(2).sum().item()
            fires += (caught["codes"] != 0).sum(0)
            l0_sum += metrics.l0(caught["codes"]) * caught["rows"].shape[0]
            rows_n += caught["rows"].shape[0]
    f = fvu.value()
    return {"kl": kl / max(n_pos, 1), "ce_clean": ce_c / max(n_sc, 1), "ce_spliced": ce_s / max(n_sc, 1),
            "eval_tokens": int(rows_n), "fvu": f, "explained_variance": 1 - f, "mse": mse / max(rows_n * d.cfg.d_in, 1),
            "l0": l0_sum / max(rows_n, 1), "dead_fraction": metrics.dead_fraction(fires), "dead_window_tokens": int(rows_n)}


def _state(d: Dictionary, opt: torch.optim.Optimizer, step: int) -> tuple[dict[str, Tensor], dict]:
    t, groups = runs.optimizer_tensors(opt)
    t |= {f"dict.{k}": v for k, v in d.state_dict().items()}
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}, {"param_groups": groups, "step": step}


def _load_state(d: Dictionary, opt: torch.optim.Optimizer, t: dict[str, Tensor], meta: dict) -> int:
    d.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("dict.")})
    runs.load_optimizer(opt, t, meta["param_groups"])
    return int(meta["step"])


class E2EObjective(Objective):
    """KL(clean ‖ spliced) (+ mse_coef · normalised MSE, + λ · L1 for relu) of one dictionary at one hook, per step."""

    unit = "steps"
    nan_advice = "lower --lr"

    def __init__(self, cfg: E2EConfig, em: E2EModel, d: Dictionary, hook: str, data: TokenData, opt: torch.optim.Optimizer,
                 paths: runs.RunPaths, ident: str, start: int):
        self.cfg, self.em, self.d, self.hook, self.data, self.opt = cfg, em, d, hook, data, opt
        self.paths, self.ident, self.cfg_dict, self.start = paths, ident, to_dict(cfg), start
        self.labels = [f"e2e {hook}"]
        self.acc: dict[str, float] = {}
        self.n_acc = 0

    def take_step(self, step: int) -> None:
        cfg, d, hf, bos = self.cfg, self.d, self.em.im.hf, self.em.im.bos_id
        dev = next(hf.parameters()).device
        t = torch.as_tensor(batch_at(self.data.train, step, cfg.batch_size, cfg.seed), dtype=torch.long, device=dev)
        inp, mask = model_input(t, bos), row_mask(t, cfg.skip_bos)
        with torch.no_grad():
            clean = hf(input_ids=inp).logits
        terms: dict[str, Tensor] = {}

        def fn(x):
            rows = x[mask]
            x_hat, codes = training_reconstruction(d, rows)
            terms["mse"] = ((x_hat - rows) * d.scale).pow(2).sum(-1).mean() / rows.shape[-1]
            if d.cfg.kind == "relu":
                terms["l1"] = (codes @ d.W_dec.norm(dim=-1)).mean() / rows.shape[-1]
            out = x.clone()
            out[mask] = x_hat.to(x.dtype)
            return out

        with self.em.splicer.active({self.hook: fn}):
            spliced = hf(input_ids=inp).logits
        terms["kl"] = e2e_loss(clean, spliced, t != PAD)
        loss = terms["kl"] + cfg.mse_coef * terms["mse"] + cfg.arch.l1 * terms.get("l1", 0.0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        d.before_step()
        self.opt.step()
        d.after_step()
        for k, v in terms.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v.detach())
        self.n_acc += 1
        self.step_now = step + 1

    def bad_steps(self) -> list[int | None]:
        ok = all(math.isfinite(v / self.n_acc) for v in self.acc.values())
        return [None if ok else self.step_now]

    def log_rows(self, step: int, seconds: float) -> list[dict]:
        row = {"step": step} | {k: v / self.n_acc for k, v in self.acc.items()}
        row["steps_per_s"] = (step - self.start) / seconds
        self.acc, self.n_acc = {}, 0
        return [row]

    def progress_info(self, row: dict) -> str:
        return f"kl={row['kl']:.4f} mse={row['mse']:.4f}"

    def metrics_logs(self) -> list[runs.MetricsLog | None]:
        return [runs.MetricsLog(self.paths.metrics)]

    def checkpoint_roots(self) -> list[Path]:
        return [self.paths.checkpoints]

    def save_checkpoint(self, step: int) -> None:
        tensors, meta = _state(self.d, self.opt, step)
        runs.save_checkpoint(self.paths.checkpoints, step, tensors, meta | {"identity": self.ident, "config": self.cfg_dict})


def train_one(cfg: E2EConfig, em: E2EModel, d: Dictionary, hook: str, data: TokenData, progress: bool) -> Path:
    """Train dictionary `d` at `hook` end-to-end; returns its saved folder (summary: before/after KL and CE)."""
    hf = em.im.hf
    dev = next(hf.parameters()).device
    d.to(dev).train()
    paths = run_paths(cfg, hook, d)
    if (paths.dir / "config.json").is_file() and not cfg.run.resume:
        raise SaekitError(f"{paths.dir} already holds a dictionary; choose another --out (or --resume)")
    if paths.checkpoints.exists() and not cfg.run.resume:
        raise SaekitError(f"{paths.dir} holds an unfinished run; pass --resume to continue it or choose another --out")
    if (paths.dir / "config.json").is_file():
        return paths.dir
    paths.dir.mkdir(parents=True, exist_ok=True)
    before = e2e_eval(em, d.eval(), hook, data.eval, cfg.batch_size, cfg.skip_bos)
    d.train()
    opt = torch.optim.Adam(d.param_groups(cfg.lr))  # the dictionary's own lr multiples, as offline training
    cfg_dict, step = to_dict(cfg), 0
    ident = runs.identity_hash(cfg_dict, E2E_IDENTITY) + hook
    found = runs.latest_checkpoint(paths.checkpoints, device=str(dev)) if cfg.run.resume else None
    if found is not None:
        ckpt_step, tensors, meta = found
        runs.check_identity(runs.checkpoint_dir(paths.checkpoints, ckpt_step), meta, ident, cfg_dict, E2E_IDENTITY, unnamed="hook")
        step = _load_state(d, opt, tensors, meta)
    else:
        runs.MetricsLog(paths.metrics).start()
    obj = E2EObjective(cfg, em, d, hook, data, opt, paths, ident, step)
    step = Engine(obj, cfg.steps, cfg.run.log_every, cfg.run.checkpoint_every, progress).run(step)
    after = e2e_eval(em, d.eval(), hook, data.eval, cfg.batch_size, cfg.skip_bos)
    d.summary = after | {"objective": "e2e", "train_steps": step, "kl_before": before["kl"], "ce_spliced_before": before["ce_spliced"]}
    d.train_config = cfg_dict | {"objective": "e2e", "hook": hook}
    d.cpu().save(paths.dir)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)
    return paths.dir


def _find_inits(root: str, hooks: list[str]) -> dict[str, Dictionary]:
    from saekit.interop import find_dictionary_folders, load

    p = Path(root)
    if not p.exists():
        raise SaekitError(f"--init {root} does not exist; pass a dictionary folder or a folder of them")
    found = {}
    for f in find_dictionary_folders(p):
        d = load(f)
        if d.prov.hook in hooks and d.prov.hook not in found:
            found[d.prov.hook] = d
    missing = [h for h in hooks if h not in found]
    if missing:
        raise SaekitError(f"--init {root} holds no dictionary for {', '.join(missing)}")
    return found


def train_e2e(cfg: E2EConfig, progress: bool = True) -> list[Path]:
    """Train one dictionary per hook end-to-end through the frozen model; returns their folders."""
    from saekit import allocator, outdir

    allocator.keep_large_blocks()  # the step's large tensors reuse their pages instead of faulting them in each step
    with outdir.claim(cfg.out, "train"):  # a folder, writable, and no other writer
        return _train_e2e(cfg, progress)


def _train_e2e(cfg: E2EConfig, progress: bool) -> list[Path]:
    if not cfg.hooks:
        raise SaekitError("no hooks given; pass --hooks blocks.L.hook_... (one dictionary each)")
    model = cfg.model
    if not model:
        if not cfg.store:
            raise SaekitError("no model given; pass --model (or --store, whose model is used)")
        from saekit.store import open_store

        model = open_store(cfg.store).model.name
    dev = resolve_device(cfg.run.device)
    im = load_in_model(model, cfg.hooks, dev)
    for p in im.hf.parameters():
        p.requires_grad_(False)
    em = E2EModel(im, Splicer(im.hf, list(im.sites.values())))
    seq_len = cfg.seq_len or min(128, im.info.n_ctx)
    data = load_tokens(cfg.data, cfg.store, im.tokenizer, im.bos_id, seq_len, cfg.steps * cfg.batch_size,
                          cfg.eval_sequences, cfg.text_field, n_ctx=im.info.n_ctx,
                          fix="harvest it with --packing doc --context-size {n} and train on --store")
    inits = _find_inits(cfg.init, cfg.hooks) if cfg.init else {}
    torch.manual_seed(cfg.seed)
    fresh = [h for h in cfg.hooks if h not in inits]
    sample = sample_rows(im.hf, em.splicer, fresh, data, im.bos_id, cfg.init_rows, cfg.batch_size, cfg.skip_bos) if fresh else {}
    out = []
    for h in cfg.hooks:
        shape = im.shapes[h]
        width = int(np.prod(shape))
        if h in inits:
            d = inits[h]
            if d.cfg.d_in != width:
                raise SaekitError(f"--init dictionary for {h} has d_in={d.cfg.d_in}, the hook has width {width}")
            d.prov = Provenance(hook=h, model=im.info.to_dict(), hook_shape=shape, scale=float(d.scale), store=cfg.store or None)
        else:
            try:
                dc = dataclasses.replace(cfg.arch, d_in=width, d_dict=cfg.arch.d_dict or cfg.expansion * width)
            except ValueError as e:
                raise SaekitError(f"{h}: {e}") from None
            scale = norm_scale(sample[h])
            d = build(dc, Provenance(hook=h, model=im.info.to_dict(), hook_shape=shape, scale=scale, store=cfg.store or None))
            g = torch.Generator().manual_seed(cfg.seed)
            d.reset_parameters(g)
            d.init_from_data(sample[h] * scale)
        out.append(train_one(cfg, em, d, h, data, progress))
    return out
