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

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saekit import metrics
from saekit.config import check_signs, to_dict
from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError, did_you_mean
from saekit.splice import PAD, masked_mean, model_input, scored_mask, splice_mask  # noqa: F401  (PAD: part of the token-array contract)


# --- pure maths ---------------------------------------------------------------------------------

def straight_through(x: Tensor, x_hat: Tensor) -> Tensor:
    """Forward value x̂, backward identity to x: sg[x̂] + (x − sg[x]) (Bengio et al. 2013; VQ-VAE §3.2).

    ∂out/∂x = I and ∂out/∂x̂ = 0, so the model's loss flows past the codebook to the
    layers below as if the hook were not there, and never reaches the codes.  Written
    this way (not x + sg[x̂ − x]) the value is exactly x̂: x − sg[x] is exactly 0.
    """
    return x_hat.detach() + (x - x.detach())


def commitment(x_hat_n: Tensor, xn: Tensor) -> Tensor:
    """Per-row ‖x̂_n − sg[x_n]‖² / d_in: (n, d_in) → (n,).  Its gradient reaches x̂_n (the codes) only."""
    return (x_hat_n - xn.detach()).pow(2).sum(-1) / xn.shape[-1]


def norm_scale(x: Tensor) -> float:
    """sqrt(d / E‖x‖²): the store's normalisation (E‖scale·x‖² = d), from a sample of rows (n, d)."""
    msq = x.double().pow(2).sum(-1).mean().item()
    return math.sqrt(x.shape[-1] / msq) if msq > 0 else 1.0


# --- hook names → Hugging Face modules --------------------------------------------------------

# saekit hook suffix (after `blocks.{L}.`) → (bridge component below the block, which side of its forward).
HOOK_SITES: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "attn.hook_z": ("attn.o", "input"),
    "mlp.hook_post": ("mlp.out", "input"),
}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class Site(NamedTuple):
    hook: str
    module: str
    """Dotted path of the Hugging Face module (e.g. transformer.h.0.attn.c_proj)."""
    side: str
    """input: the hook is the module's first input; output: its (first) output."""


def hook_site(adapter, hook: str) -> Site:
    """Where a saekit hook lives in the Hugging Face model, via the bridge's component map."""
    m = _HOOK_RE.match(hook)
    if not m or m.group(2) not in HOOK_SITES:
        names = ", ".join(f"blocks.L.{s}" for s in HOOK_SITES)
        hint = did_you_mean(m.group(2), HOOK_SITES) if m else ""
        raise SaekitError(f"in-model training supports the hooks {names}; {hook!r} is not one of them{hint}")
    layer, suffix = m.group(1), m.group(2)
    component, side = HOOK_SITES[suffix]
    tl_path = f"blocks.{layer}" + (f".{component}" if component else "")
    try:
        module = adapter.translate_transformer_lens_path(tl_path)
    except ValueError as e:
        raise SaekitError(f"cannot place {hook!r} in this architecture ({e}); choose a hook_resid_post or hook_mlp_out hook") from None
    return Site(hook, module, side)


class Splicer:
    """Replaces hook activations in a Hugging Face model by `fn(x)` while active (hooks removed in `finally`).

    `fns[hook](x)` gets the activation flattened to (B, T, width) and returns the same
    shape.  The Hugging Face modules report attention and block outputs as tuples; only
    the first element (the hidden states) is replaced.
    """

    def __init__(self, hf: nn.Module, sites: list[Site]):
        self.hf = hf
        self.sites = sites

    @contextlib.contextmanager
    def active(self, fns: dict[str, Callable[[Tensor], Tensor]]):
        unknown = set(fns) - {s.hook for s in self.sites}
        if unknown:
            raise ValueError(f"hooks {sorted(unknown)} have no site in this Splicer (pass them to load_in_model)")
        handles = []
        try:
            for s in self.sites:
                if s.hook not in fns:
                    continue
                mod = self.hf.get_submodule(s.module)
                fn = fns[s.hook]
                if s.side == "output":
                    handles.append(mod.register_forward_hook(_output_hook(fn)))
                else:
                    handles.append(mod.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()


def _apply(fn, x: Tensor) -> Tensor:
    shape = x.shape
    return fn(x.reshape(shape[0], shape[1], -1)).reshape(shape)


def _output_hook(fn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_apply(fn, output[0]), *output[1:])
        return _apply(fn, output)

    return hook


def _input_hook(fn):
    def hook(module, args, kwargs):
        if args:
            return (_apply(fn, args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, kwargs | {key: _apply(fn, kwargs[key])}

    return hook


# --- a codebook inside the forward pass --------------------------------------------------------

class InModelCodebook(nn.Module):
    """A saekit `Codebook` spliced into the forward pass with the straight-through estimator.

    Per call (x: (B, T, d_in), rows where `mask` is False are left as they are):

        x_n  = scale · x;   x̂_n = Σ_{top-k codes per group} c      (codes chosen without gradient)
        out  = straight_through(x, x̂_n / scale)                  # value x̂, gradient identity to x
        commit = masked mean of commitment(x̂_n, x_n)              # gradient to the chosen codes only

    `last_commit` and `last_fired` (codes chosen at least once) are kept for the trainer.
    """

    def __init__(self, dictionary: Dictionary):
        super().__init__()
        self.d = dictionary
        self.mask: Tensor | None = None
        self.last_commit: Tensor | None = None
        self.last_fired: Tensor | None = None
        self.last_rows: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        from saekit.dictionaries.codebook import choose_codes, sum_codes

        d = self.d
        mask = self.mask if self.mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        rows = x[mask]  # (n, d_in)
        G, C, _ = d.codebook.shape
        if rows.shape[0] == 0:  # e.g. a batch of BOS only (the first sampling step): nothing to replace
            self.last_commit = d.codebook.sum() * 0  # zero, but still part of the graph
            self.last_fired = torch.zeros(d.cfg.d_dict, device=x.device)
            return x
        xn = rows.float() * d.scale
        with torch.no_grad():
            idx = choose_codes(xn, d.codebook, d.k, d.cfg.similarity)  # (n, G, k)
        x_hat_n = sum_codes(idx, d.codebook)  # (n, d_in), differentiable in the codes
        self.last_commit = commitment(x_hat_n, xn).mean()
        flat = (idx + torch.arange(G, device=x.device)[None, :, None] * C).flatten()
        self.last_fired = torch.zeros(d.cfg.d_dict, device=x.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        self.last_rows = xn.detach()
        out = x.clone()
        out[mask] = straight_through(rows, (x_hat_n / d.scale).to(rows.dtype))
        return out


# --- the codebook spec --------------------------------------------------------------------------

SPEC_HELP = (
    "Codebooks to insert: entries separated by ';', each SITE:key=value,... "
    "SITE is attn (attn.hook_z, every layer), mlp (hook_mlp_out), resid (hook_resid_post), optionally "
    "with layers in brackets (mlp[0,2], attn[1-3]), or a full hook name (blocks.1.hook_mlp_out). "
    "Keys: k (codes chosen per group; required), codes (codes per group; default 8 x the group width), "
    "groups (a number, or heads = one group per attention head), sim (cosine | inner). "
    "Example: 'attn:k=8,groups=heads;mlp[3]:k=100,codes=4096'."
)
SHORTHANDS = {"attn": "attn.hook_z", "mlp": "hook_mlp_out", "resid": "hook_resid_post"}
_SITE_RE = re.compile(r"^(attn|mlp|resid)(?:\[([0-9,\- ]+)\])?$")


@dataclass
class CodebookSpec:
    """One codebook to insert, as parsed from the spec (codes/groups resolved against the hook later)."""

    hook: str
    k: int | None = None
    codes: int | None = None
    """Codes per group (C); None = from --init or 8 × the group width."""
    groups: int | str | None = None
    """A number, `heads`, or None (1, or what --init says)."""
    similarity: str | None = None


def _layers(text: str | None, n_layers: int) -> list[int]:
    if not text:
        return list(range(n_layers))
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        a, _, b = part.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise SaekitError(f"bad layer list {text!r} in --codebooks; write e.g. [0,2] or [1-3]")
        out += list(range(int(a), int(b or a) + 1))
    bad = [layer for layer in out if layer >= n_layers]
    if bad:
        raise SaekitError(f"layers {bad} in --codebooks do not exist: the model has {n_layers} (0-{n_layers - 1})")
    return sorted(set(out))


def parse_spec(spec: str, n_layers: int) -> list[CodebookSpec]:
    """Parse `SITE:key=value,...;...` (see SPEC_HELP) into one CodebookSpec per hook, in spec order."""
    if not spec or not spec.strip():
        raise SaekitError("no codebooks given; pass --codebooks, e.g. 'mlp:k=16' (see --help)")
    out: dict[str, CodebookSpec] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        site, _, opts = entry.partition(":")
        site = site.strip()
        kw: dict[str, Any] = {}
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, val = item.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not val:
                raise SaekitError(f"--codebooks entry {entry!r}: {item!r} is not key=value (keys: k, codes, groups, sim)")
            if key in ("k", "codes"):
                if not val.isdigit() or int(val) < 1:
                    raise SaekitError(f"--codebooks entry {entry!r}: {key} must be a positive integer, got {val!r}")
                kw[key] = int(val)
            elif key == "groups":
                if val != "heads" and (not val.isdigit() or int(val) < 1):
                    raise SaekitError(f"--codebooks entry {entry!r}: groups must be a positive integer or 'heads', got {val!r}")
                kw["groups"] = val if val == "heads" else int(val)
            elif key in ("sim", "similarity"):
                if val not in ("cosine", "inner"):
                    raise SaekitError(f"--codebooks entry {entry!r}: sim must be cosine or inner, got {val!r}")
                kw["similarity"] = val
            else:
                raise SaekitError(f"--codebooks entry {entry!r}: unknown key {key!r}{did_you_mean(key, ['k', 'codes', 'groups', 'sim'])}; keys: k, codes, groups, sim")
        m = _SITE_RE.match(site)
        if m:
            hooks = [f"blocks.{layer}.{SHORTHANDS[m.group(1)]}" for layer in _layers(m.group(2), n_layers)]
        elif _HOOK_RE.match(site):
            hooks = [site]
        else:
            raise SaekitError(f"--codebooks entry {entry!r}: site {site!r} is not attn, mlp, resid (optionally with [layers]) or a hook name like blocks.0.hook_mlp_out")
        for h in hooks:
            if h in out:
                raise SaekitError(f"--codebooks names hook {h} twice; give each hook one entry")
            out[h] = CodebookSpec(h, **kw)
    if not out:
        raise SaekitError("no codebooks given; pass --codebooks, e.g. 'mlp:k=16' (see --help)")
    return list(out.values())


def build_codebook(spec: CodebookSpec, shape: list[int], init: Dictionary | None = None) -> Dictionary:
    """A Codebook for a hook of per-position `shape`, from the spec, taking what is unset from `init`."""
    from saekit.dictionaries.codebook import Codebook

    width = int(np.prod(shape))
    if init is not None:
        if init.cfg.kind != "codebook":
            raise SaekitError(f"--init dictionary for {spec.hook} is kind {init.cfg.kind!r}; joint training needs a codebook")
        if init.cfg.d_in != width:
            raise SaekitError(f"--init codebook for {spec.hook} has d_in={init.cfg.d_in}, the hook has width {width}")
    groups = spec.groups
    if groups == "heads":
        if len(shape) != 2:
            raise SaekitError(f"groups=heads needs a hook with a head axis (attn.hook_z); {spec.hook} has shape {shape}")
        groups = shape[0]
    if groups is None:
        groups = init.cfg.groups if init is not None else 1
    if width % groups:
        raise SaekitError(f"{spec.hook}: width {width} is not divisible by groups={groups}")
    per = spec.codes or (init.cfg.d_dict // init.cfg.groups if init is not None else 8 * (width // groups))
    k = spec.k or (init.cfg.k if init is not None else None)
    if not k:
        raise SaekitError(f"{spec.hook}: no k given; add k=... to its --codebooks entry")
    sim = spec.similarity or (init.cfg.similarity if init is not None else "cosine")
    if k >= per:
        raise SaekitError(f"{spec.hook}: k={k} must be smaller than codes per group ({per}); raise codes= or lower k=")
    if init is not None:
        mine = (groups, per, k, sim)
        theirs = (init.cfg.groups, init.cfg.d_dict // init.cfg.groups, init.cfg.k, init.cfg.similarity)
        if mine != theirs:
            raise SaekitError(f"{spec.hook}: --codebooks asks for groups={groups}, codes={per}, k={k}, sim={sim} but the --init "
                              f"codebook has groups={theirs[0]}, codes={theirs[1]}, k={theirs[2]}, sim={theirs[3]}; drop the keys to take them from --init")
    cfg = DictConfig(kind="codebook", d_in=width, d_dict=per * groups, k=k, groups=groups, similarity=sim)
    d = Codebook(cfg, Provenance(hook=spec.hook, hook_shape=list(shape)))
    if init is not None:
        d.load_state_dict(init.state_dict())
    return d


def find_init(root: str, hooks: list[str]) -> dict[str, Dictionary]:
    """Dictionaries under `root` (one folder or a tree, e.g. `saekit train --out`), by hook; one per hook."""
    from saekit.dictionaries import load

    p = Path(root)
    if not p.exists():
        raise SaekitError(f"--init {root} does not exist; pass a dictionary folder or a folder of them")
    folders = [p] if (p / "config.json").is_file() else sorted(c.parent for c in p.rglob("config.json") if (c.parent / "weights.safetensors").is_file())
    found: dict[str, Dictionary] = {}
    for f in folders:
        d = load(f)
        h = d.prov.hook
        if h in hooks and d.cfg.kind == "codebook":
            if h in found:
                raise SaekitError(f"--init {root} holds several codebooks for {h}; point --init at one folder per hook")
            if (d.prov.model or {}).get("compat"):
                raise SaekitError(f"--init {f} was trained with compatibility mode on; in-model training runs the unprocessed model")
            found[h] = d
    if not found:
        raise SaekitError(f"--init {root} holds no codebook for any of {', '.join(hooks)}")
    return found


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
    """Steps between replacements of dead codes (codes unchosen for dead_tokens tokens); 0 = never."""
    dead_tokens: int = 100_000
    """A code not chosen for this many tokens is dead and gets replaced."""
    checkpoint_every: int = 200
    """Steps between checkpoints (0: only at the end)."""
    log_every: int = 10
    """Steps between progress updates and metrics.jsonl lines."""
    seed: int = 0
    """Seed of the data order, the initialisation and code replacement."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    resume: bool = False
    """Continue from the last checkpoint in --out (exactly the batches an uninterrupted run would see)."""

    def __post_init__(self):
        if self.data and self.store:
            raise ValueError("give either data or store, not both")
        check_signs(self, positive=("steps", "batch_size", "eval_sequences", "log_every", "init_rows"),
                    non_negative=("lr", "codebook_lr", "commit_coef", "checkpoint_every", "replace_every", "dead_tokens"))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.packing not in ("concat", "doc"):
            raise ValueError(f"packing {self.packing!r} is not concat or doc")


# Fields that change what a run computes; a checkpoint written under other values is refused.
FINETUNE_IDENTITY = ("model", "codebooks", "data", "store", "text_field", "packing", "init", "freeze_model", "lr", "codebook_lr",
                     "commit_coef", "batch_size", "seq_len", "eval_sequences", "skip_bos", "init_rows", "replace_every",
                     "dead_tokens", "seed")


def identity_hash(cfg, fields: tuple[str, ...]) -> str:
    d = to_dict(cfg)
    return hashlib.sha256(json.dumps({k: d[k] for k in fields}, sort_keys=True).encode()).hexdigest()[:16]


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

    def checkpoint(self, phase: str, step: int) -> Path:
        return self.checkpoints(phase) / f"step-{step:08d}"

    def checkpoint_steps(self, phase: str) -> list[int]:
        d = self.checkpoints(phase)
        if not d.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in d.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


# --- data ---------------------------------------------------------------------------------------

class TokenData(NamedTuple):
    train: np.ndarray
    """int32 (n_train, T), PAD = -1."""
    eval: np.ndarray
    """int32 (n_eval, T): held out, never trained on."""
    source: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SaekitError(f"unknown device {device!r}; use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaekitError(f"device {device} asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def load_tokens(data: str, store: str, tokenizer, bos_id: int, seq_len: int, n_train: int, n_eval: int,
                text_field: str = "text", n_ctx: int | None = None, packing: str = "concat") -> TokenData:
    """Training and held-out sequences from text (first n_eval sequences held out) or a store's splits.

    At most n_train training sequences are read: a longer corpus is not needed for the
    steps asked, a shorter one is cycled through in epochs.
    """
    if store:
        from saekit.train import open_store

        st = open_store(store)
        tr, ev = st.split("train"), st.split("eval")
        if len(tr) == 0:
            raise SaekitError(f"store {store} has no training sequences")
        if len(ev) == 0:
            raise SaekitError(f"store {store} has no eval split; harvest it with --holdout > 0 or pass --data")
        train = np.asarray(st.read_tokens(tr.start, min(tr.stop, tr.start + n_train)), dtype=np.int32)
        evals = np.asarray(st.read_tokens(ev.start, min(ev.stop, ev.start + n_eval)), dtype=np.int32)
        if n_ctx is not None and train.shape[1] > n_ctx:
            raise SaekitError(f"store {store} has sequences of {train.shape[1]} tokens, longer than the model's context {n_ctx}")
        return TokenData(train, evals, f"store:{store}")
    if not data:
        raise SaekitError("no training data; pass --data FILE (text) or --store DIR")
    if n_ctx is not None and seq_len > n_ctx:
        raise SaekitError(f"--seq-len {seq_len} is longer than the model's context ({n_ctx}); lower it")
    from saekit.text import sequences

    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos_id
    seqs = sequences(data, tokenizer, seq_len, bos_id=bos_id, eos_id=eos, packing=packing, text_field=text_field)
    got = []
    for s in seqs:
        got.append(s)
        if len(got) >= n_eval + n_train:
            break
    if len(got) <= n_eval:
        raise SaekitError(f"{data} gives only {len(got)} sequences of {seq_len} tokens, all needed for the {n_eval} held-out ones; "
                          "add text, lower --eval-sequences or --seq-len")
    arr = np.stack(got).astype(np.int32)
    return TokenData(arr[n_eval:], arr[:n_eval], f"data:{data}")


def batch_at(train: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The sequences of step `step`: epochs of seeded permutations, so any step can be recomputed (resume)."""
    n = train.shape[0]
    idx = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx.append(perm[pos])
    return train[np.asarray(idx)]


# --- model loading and saving --------------------------------------------------------------------

class InModel(NamedTuple):
    hf: nn.Module
    """The Hugging Face causal LM that is trained."""
    tokenizer: Any
    path: str
    """Directory (or Hub name) it was loaded from."""
    info: Any
    """ModelInfo of the original model."""
    bos_id: int
    sites: dict[str, Site]
    shapes: dict[str, list[int]]


def load_in_model(name: str, hooks: list[str], device: torch.device) -> InModel:
    """The HF model to train plus, from the TransformerLens bridge, the hook sites and per-position shapes."""
    from transformers import AutoModelForCausalLM

    from saekit.models import load_model, resolve_hooks, resolve_model_path

    loaded = load_model(name)
    specs = resolve_hooks(loaded, hooks)
    sites = {h: hook_site(loaded.bridge.adapter, h) for h in hooks}
    bos = loaded.bos_id
    info, tok = loaded.info, loaded.tokenizer
    del loaded  # the bridge only served the hook map and shapes
    path = resolve_model_path(name)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    hf.eval()  # dropout off: short fine-tunes, and a resumed run reproduces an uninterrupted one
    return InModel(hf, tok, path, info, bos, sites, {s.name: list(s.shape) for s in specs})


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".index.json")


def save_hf_model(hf: nn.Module, tokenizer, source: str, dest: Path) -> Path:
    """Write a normal HF model directory atomically; extra files of the source (e.g. the toy's fsm.json) are copied."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    src = Path(source)
    if src.is_dir():
        for f in src.iterdir():
            if f.is_file() and not (tmp / f.name).exists() and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def model_info_of(path: Path, like) -> dict:
    """ModelInfo dict of a written model directory (same shape as the original, new fingerprint)."""
    from saekit.models import fingerprint

    return dataclasses.replace(like, name=str(path), fingerprint=fingerprint(str(path)), compat=False).to_dict()


# --- evaluation ---------------------------------------------------------------------------------

class LMScore(NamedTuple):
    loss: float
    """Mean next-token cross-entropy (nats) over scored positions."""
    accuracy: float
    """Share of scored positions where the argmax is the next token."""
    tokens: int


@torch.no_grad()
def lm_score(hf: nn.Module, tokens: np.ndarray, bos_id: int, batch_size: int = 8,
             splicer: Splicer | None = None, layers: dict[str, InModelCodebook] | None = None,
             skip_bos: bool = True) -> LMScore:
    """Held-out loss and accuracy, with the codebooks in `layers` active when given."""
    dev = next(hf.parameters()).device
    ce_sum = acc_sum = n = 0.0
    for i in range(0, tokens.shape[0], batch_size):
        t = torch.as_tensor(tokens[i:i + batch_size], dtype=torch.long, device=dev)
        logits = _forward(hf, t, bos_id, splicer, layers, skip_bos)
        m = scored_mask(t)
        inp = model_input(t, bos_id)
        ce_sum += (metrics.ce_per_token(logits, inp) * m).sum().item()
        acc_sum += (metrics.correct_per_token(logits, inp) * m).sum().item()
        n += m.sum().item()
    return LMScore(ce_sum / max(n, 1), acc_sum / max(n, 1), int(n))


def _forward(hf, t: Tensor, bos_id: int, splicer: Splicer | None, layers: dict[str, InModelCodebook] | None,
             skip_bos: bool) -> Tensor:
    inp = model_input(t, bos_id)
    if not layers:
        return hf(input_ids=inp).logits
    mask = splice_mask(t, skip_bos)
    for layer in layers.values():
        layer.mask = mask
    with splicer.active({h: layer for h, layer in layers.items()}):
        return hf(input_ids=inp).logits


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
        groups.append({"params": codes, "lr": cfg.codebook_lr})
    if not groups:
        raise SaekitError("nothing to train: --freeze-model with no codebooks")
    opt = torch.optim.Adam(groups)
    dev = next(hf.parameters()).device
    since = {h: torch.zeros(layer.d.cfg.d_dict, device=dev) for h, layer in layers.items()}
    return Phase(name, hf, layers, opt, since, torch.Generator().manual_seed(cfg.seed))


def train_step(ph: Phase, t: Tensor, bos_id: int, splicer: Splicer | None, cfg) -> dict[str, Tensor]:
    """One optimiser step on token batch t (B, T): CE (+ β Σ commitment); returns the detached terms."""
    logits = _forward(ph.hf, t, bos_id, splicer, ph.layers, cfg.skip_bos)
    inp = model_input(t, bos_id)
    m = scored_mask(t)
    ce = masked_mean(metrics.ce_per_token(logits, inp), m)
    terms = {"ce": ce}
    loss = ce
    for h, layer in ph.layers.items():
        terms[f"commit/{h}"] = layer.last_commit
        loss = loss + cfg.commit_coef * layer.last_commit
    ph.opt.zero_grad(set_to_none=True)
    loss.backward()
    ph.opt.step()
    with torch.no_grad():
        n_rows = splice_mask(t, cfg.skip_bos).sum()
        for h, layer in ph.layers.items():
            ph.since_fired[h] = torch.where(layer.last_fired > 0, torch.zeros_like(ph.since_fired[h]), ph.since_fired[h] + n_rows)
    ph.step += 1
    if ph.layers and cfg.replace_every and ph.step % cfg.replace_every == 0:
        _replace_dead(ph, cfg)
    return {k: v.detach() for k, v in terms.items()}


def _replace_dead(ph: Phase, cfg) -> None:
    """Dead codes → recent inputs (Codebook.resample_dead); their Adam moments are reset."""
    for h, layer in ph.layers.items():
        dead = ph.since_fired[h] > cfg.dead_tokens
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
        t[f"codebook.{h}"] = layer.d.codebook
        t[f"since.{h}"] = ph.since_fired[h]
    opt_t, groups = optimizer_tensors(ph.opt)
    t |= opt_t
    t["generator"] = ph.generator.get_state()
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}, {"param_groups": groups, "step": ph.step}


def load_phase_state(ph: Phase, t: dict[str, Tensor], meta: dict) -> None:
    params = dict(ph.hf.named_parameters())
    with torch.no_grad():
        for k, v in t.items():
            if k.startswith("model."):
                params[k[6:]].copy_(v)
            elif k.startswith("codebook."):
                ph.layers[k[9:]].d.codebook.copy_(v)
            elif k.startswith("since."):
                ph.since_fired[k[6:]] = v.to(ph.since_fired[k[6:]].device)
    load_optimizer(ph.opt, t, meta["param_groups"])
    ph.generator.set_state(t["generator"])
    ph.step = int(meta["step"])


def write_checkpoint(folder: Path, ph: Phase, ident: str, cfg_dict: dict, keep: list[Path]) -> None:
    tensors, meta = phase_state(ph)
    save_checkpoint(folder, tensors, meta | {"identity": ident, "config": cfg_dict}, keep)


def read_checkpoint(folder: Path, ph: Phase, ident: str, identity_fields: tuple[str, ...], cfg_dict: dict) -> None:
    tensors, meta = open_checkpoint(folder, ident, identity_fields, cfg_dict)
    load_phase_state(ph, tensors, meta)


# --- checkpoint files (also used by saekit.e2e) ------------------------------------------------

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list]:
    """The optimiser's state as flat `opt.{param index}.{name}` tensors plus its param_groups (JSON), so a
    checkpoint is safetensors + JSON rather than a pickled state_dict."""
    osd = opt.state_dict()
    t = {f"opt.{idx}.{name}": v if torch.is_tensor(v) else torch.tensor(v) for idx, st in osd["state"].items() for name, v in st.items()}
    return t, osd["param_groups"]


def load_optimizer(opt: torch.optim.Optimizer, t: dict[str, Tensor], param_groups: list) -> None:
    """Inverse of `optimizer_tensors`; keys of `t` not starting with `opt.` are ignored."""
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(folder: Path, tensors: dict[str, Tensor], meta: dict, keep: list[Path]) -> None:
    """state.safetensors + state.json written in a temp folder renamed when complete (a crash never leaves a
    half checkpoint under its final name); older checkpoints in `keep` beyond the last two removed."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    for old in keep[:-2]:
        shutil.rmtree(old, ignore_errors=True)


def open_checkpoint(folder: Path, ident: str, identity_fields: tuple[str, ...], cfg_dict: dict,
                    device: str = "cpu", unnamed: str = "unknown") -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of a checkpoint written by `save_checkpoint`, refused unless it was written under the
    same identity; the error names the differing fields (`unnamed` when the identity differs elsewhere)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"), device=device)
    except (OSError, ValueError) as e:
        raise SaekitError(f"checkpoint {folder} is damaged ({e}); delete it to resume from the one before") from None
    if meta.get("identity") != ident:
        old = meta.get("config", {})
        diff = [k for k in identity_fields if old.get(k) != cfg_dict.get(k)]
        raise SaekitError(f"{folder} was written with other settings ({', '.join(diff) or unnamed} differ); "
                          "rerun with the original options or choose another --out")
    return tensors, meta


class _Bar:
    """Rich progress bar for a phase (no-op when progress is off)."""

    def __init__(self, enabled: bool, label: str, total: int, done: int):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.p.add_task(label, total=total, completed=done, info="")
            self.p.start()

    def update(self, step: int, info: str) -> None:
        if self.p:
            self.p.update(self.task, completed=step, info=info)

    def stop(self) -> None:
        if self.p:
            self.p.stop()


def run_phase(ph: Phase, data: TokenData, bos_id: int, splicer: Splicer | None, cfg, paths_ckpt: Callable[[int], Path],
              done_steps: Callable[[], list[int]], ident: str, identity_fields: tuple[str, ...], metrics_file: Path,
              progress: bool) -> None:
    """Train `ph` to cfg.steps, resuming from its last checkpoint when cfg.resume; checkpoints and metrics.jsonl lines."""
    cfg_dict = to_dict(cfg)
    done = done_steps()
    if done and cfg.resume:
        read_checkpoint(paths_ckpt(done[-1]), ph, ident, identity_fields, cfg_dict)
    if ph.step >= cfg.steps:
        return
    dev = next(ph.hf.parameters()).device
    bar = _Bar(progress, ph.name, cfg.steps, ph.step)
    acc: dict[str, float] = {}
    n_acc, t0, s0 = 0, time.perf_counter(), ph.step
    try:
        while ph.step < cfg.steps:
            t = torch.as_tensor(batch_at(data.train, ph.step, cfg.batch_size, cfg.seed), dtype=torch.long, device=dev)
            terms = train_step(ph, t, bos_id, splicer, cfg)
            for k, v in terms.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            last = ph.step == cfg.steps
            if ph.step % cfg.log_every == 0 or last:
                row = {"phase": ph.name, "step": ph.step} | {k: float(v) / n_acc for k, v in acc.items()}
                if not all(math.isfinite(v) for k, v in row.items() if k not in ("phase", "step")):
                    raise SaekitError(f"{ph.name}: loss became NaN/inf at step {ph.step}; lower --lr / --codebook-lr and rerun "
                                      "with --resume (the last good checkpoint is kept)")
                row["steps_per_s"] = (ph.step - s0) / (time.perf_counter() - t0)
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                ph.last = row
                commit = [v for k, v in row.items() if k.startswith("commit/")]
                info = f"ce={row['ce']:.4f}" + (f" commit={sum(commit) / len(commit):.4f}" if commit else "")
                bar.update(ph.step, info)
                acc, n_acc = {}, 0
            if last or (cfg.checkpoint_every and ph.step % cfg.checkpoint_every == 0):
                write_checkpoint(paths_ckpt(ph.step), ph, ident, cfg_dict, [paths_ckpt(s) for s in done_steps() + [ph.step]])
    finally:
        bar.stop()


@torch.no_grad()
def sample_rows(hf: nn.Module, splicer: Splicer, hooks: list[str], data: TokenData, bos_id: int, rows: int,
                batch_size: int, skip_bos: bool) -> dict[str, Tensor]:
    """Activation rows (n, width) of each hook at spliced positions: up to `rows`, at most one pass over the training set."""
    got: dict[str, list[Tensor]] = {h: [] for h in hooks}
    dev = next(hf.parameters()).device
    n = 0
    for i in range(0, data.train.shape[0], batch_size):
        if n >= rows:
            break
        t = torch.as_tensor(data.train[i:i + batch_size], dtype=torch.long, device=dev)
        mask = splice_mask(t, skip_bos)

        def saver(h):
            def fn(x):
                got[h].append(x[mask].float())
                return x

            return fn

        with splicer.active({h: saver(h) for h in hooks}):
            hf(input_ids=model_input(t, bos_id))
        n += int(mask.sum())
    return {h: torch.cat(v)[:rows] for h, v in got.items()}


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
    if not cfg.model:
        raise SaekitError("no model given; pass --model (a Hub name, a local HF directory or 'toy')")
    if not cfg.out:
        raise SaekitError("no output folder given; pass --out DIR")
    paths = FinetunePaths(Path(cfg.out))
    if paths.report.exists():
        if not cfg.resume:
            raise SaekitError(f"{cfg.out} already holds a finished finetune; choose another --out")
        rep = json.loads(paths.report.read_text())  # finished: --resume just reports it
        return FinetuneResult(paths.out, Path(rep["model"]), [Path(p) for p in rep["codebooks"]], rep["table"])
    if (paths.out / "checkpoints").exists() and not cfg.resume:
        raise SaekitError(f"{cfg.out} holds an unfinished finetune; pass --resume to continue it or choose another --out")
    dev = resolve_device(cfg.device)
    from saekit.models import load_model  # noqa: F401  (import check before the slow part)

    # Hooks: parse against the model's depth (n_layers from the bridge inside load_in_model).
    from saekit.models import resolve_model_path

    n_layers = _n_layers(resolve_model_path(cfg.model))
    specs = parse_spec(cfg.codebooks, n_layers)
    hooks = [s.hook for s in specs]
    im = load_in_model(cfg.model, hooks, dev)
    splicer = Splicer(im.hf, list(im.sites.values()))
    need = cfg.steps * cfg.batch_size
    data = load_tokens(cfg.data, cfg.store, im.tokenizer, im.bos_id, cfg.seq_len, need, cfg.eval_sequences, cfg.text_field,
                       n_ctx=im.info.n_ctx, packing=cfg.packing)
    inits = find_init(cfg.init, hooks) if cfg.init else {}
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if not cfg.resume:
        paths.metrics.write_text("")
    torch.manual_seed(cfg.seed)

    # Codebooks: shape from the spec / --init; scale and k-means from a sample of the original model's activations.
    original = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size)
    sample = sample_rows(im.hf, splicer, [h for h in hooks if h not in inits], data, im.bos_id, cfg.init_rows,
                         cfg.batch_size, cfg.skip_bos) if len(inits) < len(hooks) else {}
    layers: dict[str, InModelCodebook] = {}
    for s in specs:
        d = build_codebook(s, im.shapes[s.hook], inits.get(s.hook))
        if s.hook in inits:
            d.scale.fill_(float(inits[s.hook].scale))
        else:
            scale = norm_scale(sample[s.hook])
            d.scale.fill_(scale)
            d.init_from_data(sample[s.hook] * scale, seed=cfg.seed)
        layers[s.hook] = InModelCodebook(d.to(dev))

    ident = identity_hash(cfg, FINETUNE_IDENTITY)
    joint = make_phase("codebook model", im.hf, layers, cfg)
    run_phase(joint, data, im.bos_id, splicer, cfg, lambda s: paths.checkpoint("joint", s),
              lambda: paths.checkpoint_steps("joint"), ident, FINETUNE_IDENTITY, paths.metrics, progress)
    with_codes = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size, splicer, layers, cfg.skip_bos)
    without_codes = lm_score(im.hf, data.eval, im.bos_id, cfg.batch_size)

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
        dead = float((joint.since_fired[h].cpu() > cfg.dead_tokens).float().mean())
        d.summary = {"objective": "joint", "train_steps": cfg.steps, "commitment": joint.last.get(f"commit/{h}"),
                     "dead_fraction": dead}
        d.train_config = to_dict(cfg) | {"objective": "joint"}
        saved.append(d.save(paths.codebook(h)))
    del joint, layers
    im.hf.cpu()
    del im

    table = [{"model": "original", **original._asdict()}]
    if cfg.baseline and not cfg.freeze_model:
        base = load_in_model(cfg.model, hooks, dev)
        bph = make_phase("fine-tuned (no codebooks)", base.hf, {}, cfg)
        run_phase(bph, data, base.bos_id, None, cfg, lambda s: paths.checkpoint("baseline", s),
                  lambda: paths.checkpoint_steps("baseline"), ident, FINETUNE_IDENTITY, paths.metrics, progress)
        table.append({"model": "fine-tuned, no codebooks", **lm_score(base.hf, data.eval, base.bos_id, cfg.batch_size)._asdict()})
        save_hf_model(base.hf, base.tokenizer, base.path, paths.baseline)
    table.append({"model": "codebook model", **with_codes._asdict()})
    if not cfg.freeze_model:
        table.append({"model": "codebook model, codebooks removed", **without_codes._asdict()})
    report = {"table": table, "model": str(model_dir), "codebooks": [str(p) for p in saved], "eval_sequences": int(data.eval.shape[0]),
              "data": data.source, "steps": cfg.steps, "config": to_dict(cfg)}
    tmp = paths.report.with_name("report.json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, paths.report)
    shutil.rmtree(paths.out / "checkpoints", ignore_errors=True)  # the result is complete; its checkpoints are not needed
    return FinetuneResult(paths.out, model_dir, saved, table)


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
