"""Codebooks inside the forward pass: the straight-through maths, `InModelCodebook`, and the --codebooks spec.

Codebook Features (Tamkin et al. 2023, §3): at a hook the activation x is replaced by the sum of
the k codes most similar to it (per group); the forward value is the codebook's, the backward
pass is the identity (straight-through), and a commitment term pulls the chosen codes towards
their inputs.  `saekit.inmodel.finetune` states the whole objective.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saekit import metrics
from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError, did_you_mean
from saekit.inmodel.sites import HOOK_RE

OBJECTIVES = ("commit", "paper")

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


def reconstruction(x_hat: Tensor, x_in: Tensor) -> Tensor:
    """Per-row ‖x̂ − sg[x_in]‖² summed over the width: (n, d_in) → (n,).  Codebook Features' reconstruction term."""
    return (x_hat - x_in.detach()).pow(2).sum(-1)


def codes_out_reference(x_in: Tensor, codebook: Tensor, idx: Tensor, objective: str) -> tuple[Tensor, Tensor]:
    """The codebook's output and per-row term, (n, d_in) and (n,), with autograd (the definition; any k).

    paper: out = x̂ + x_in − sg[x_in] (the LM loss reaches the chosen codes and, straight through, x_in),
    term = `reconstruction`; commit: out = `straight_through(x_in, x̂)`, term = `commitment`.
    """
    from saekit.dictionaries.codebook import sum_codes

    x_hat = sum_codes(idx, codebook)  # (n, d_in), differentiable in the chosen codes
    if objective == "paper":
        return x_hat + (x_in - x_in.detach()), reconstruction(x_hat, x_in)
    return straight_through(x_in, x_hat), commitment(x_hat, x_in)


class _ChosenCodes(torch.autograd.Function):
    """`codes_out_reference` for k = 1 with the backward written out: one gather forward, one index_add back.

    Autograd would chain ~10 elementwise passes over (n, d_in) through the sum, the square and the
    straight-through sums; here ∂/∂x_in = g_out and ∂/∂c (chosen code c) = Σ_rows [g_out if the LM
    loss reaches the codes] + 2·g_term·(x̂ − x_in) / term_div.
    """

    @staticmethod
    def forward(ctx, x_in: Tensor, codebook: Tensor, flat: Tensor, lm_to_codes: bool, term_div: float):
        G, C, d_g = codebook.shape
        n = x_in.shape[0]
        x_hat = codebook.reshape(G * C, d_g).index_select(0, flat).view(n, G * d_g)
        diff = x_hat - x_in
        term = torch.linalg.vector_norm(diff, dim=-1).square()  # one fused pass (a product, then a sum: two)
        if term_div != 1.0:
            term = term / term_div
        ctx.save_for_backward(diff, flat)
        ctx.lm_to_codes, ctx.term_div, ctx.shape = lm_to_codes, term_div, codebook.shape
        return x_hat, term

    @staticmethod
    def backward(ctx, g_out: Tensor, g_term: Tensor):
        diff, flat = ctx.saved_tensors
        G, C, d_g = ctx.shape
        coef = (g_term * (2 / ctx.term_div))[:, None]
        g_hat = torch.addcmul(g_out, diff, coef) if ctx.lm_to_codes else diff * coef
        g_codes = g_hat.new_zeros(G * C, d_g).index_add_(0, flat, g_hat.view(-1, d_g)).view(G, C, d_g)
        return g_out, g_codes, None, None, None


def codes_out(x_in: Tensor, codebook: Tensor, idx: Tensor, objective: str) -> tuple[Tensor, Tensor]:
    """`codes_out_reference`, through `_ChosenCodes` for k = 1 (same values; gradients to float rounding)."""
    G, C, _ = codebook.shape
    if idx.shape[-1] != 1:
        return codes_out_reference(x_in, codebook, idx, objective)
    flat = (idx[..., 0] + torch.arange(G, device=idx.device) * C).reshape(-1)  # (n·G,) into the (G·C, d_g) table
    div = 1.0 if objective == "paper" else float(x_in.shape[-1])
    return _ChosenCodes.apply(x_in, codebook, flat, objective == "paper", div)


def norm_scale(x: Tensor) -> float:
    """sqrt(d / E‖x‖²): the store's normalisation (E‖scale·x‖² = d), from a sample of rows (n, d)."""
    msq = x.double().pow(2).sum(-1).mean().item()
    return math.sqrt(x.shape[-1] / msq) if msq > 0 else 1.0


# --- a codebook inside the forward pass --------------------------------------------------------

class InModelCodebook(nn.Module):
    """A saekit `Codebook` spliced into the forward pass with the straight-through estimator.

    Per call (x: (B, T, d_in), rows where `mask` is False are left as they are):

        x_in = normalise(scale · x)          # the codebook's input: scaled, or a per-group LayerNorm (scale = 1)
        x̂   = Σ_{top-k codes per group} c   # codes chosen without gradient
        out  = (x̂ + x_in − sg[x_in]) / scale  # value x̂ (in x's units), gradient identity to x_in

    and the codebook's term, with its gradient reaching the chosen codes only (sg[x_in]):

        objective=commit: out uses sg[x̂] (the LM loss never reaches the codes), term ‖x̂ − sg[x_in]‖² / d_in;
        objective=paper:  the LM loss reaches the chosen codes through out, term ‖x̂ − sg[x_in]‖² (summed over
                          the width: Codebook Features' "aeloss").

    `last_commit` (mean over rows), `last_fvu` (the term as a fraction of the input's variance: unlike the
    term it does not grow with the input's scale) and `last_fired` (codes chosen at least once) are kept
    for the trainer.
    """

    def __init__(self, dictionary: Dictionary, objective: str = "commit"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.d = dictionary
        self.objective = objective
        self.mask: Tensor | None = None
        self.last_commit: Tensor | None = None
        self.last_fvu: Tensor | None = None
        self.last_fired: Tensor | None = None
        self._rows: Tensor | None = None  # the last forward's normalised inputs, all positions
        self._keep: Tensor | None = None  # and which of them were replaced (None: all)

    @property
    def last_rows(self) -> Tensor | None:
        """Normalised inputs (n, d_in) of the rows the last forward replaced (gathered only when asked: dead-code replacement)."""
        if self._rows is None or self._keep is None:
            return self._rows
        return self._rows[self._keep]

    def forward(self, x: Tensor) -> Tensor:
        from saekit.dictionaries.codebook import choose_codes

        d = self.d
        B, T, width = x.shape
        G, C, _ = d.codebook.shape
        # Every position goes through the codebook and the mask picks, per position, its output or x: a gather
        # before and a scatter after (x[mask], out[mask] = ...) cost more than the masked-off rows (BOS: 1/T).
        keep = None if self.mask is None or bool(self.mask.all()) else self.mask.reshape(B * T)  # (B·T,) bool
        if keep is not None and not bool(keep.any()):  # e.g. a batch of BOS only (the first sampling step)
            self.last_commit = d.codebook.sum() * 0  # zero, but still part of the graph
            self.last_fvu = torch.zeros((), dtype=torch.float64, device=x.device)
            self.last_fired = torch.zeros(d.cfg.d_dict, device=x.device)
            return x
        rows = x.reshape(B * T, width)
        scale = float(d.scale)
        xn = rows.float() if scale == 1.0 else rows.float() * scale  # (B·T, d_in); scale 1 (LayerNorm'd input): no copy
        x_in = d.normalise_n(xn)  # differentiable in x (and the LayerNorm's affine)
        with torch.no_grad():
            idx = choose_codes(x_in, d.codebook, d.k, d.cfg.similarity)  # (B·T, G, k)
        out_n, term = codes_out(x_in, d.codebook, idx, self.objective)  # (B·T, d_in), (B·T,)
        if keep is not None:  # the terms and counts of the replaced positions only
            term, idx = term[keep], idx[keep]
        self.last_commit = term.mean()
        with torch.no_grad():  # the term's scale-free twin: it stays comparable while the input's scale (a LayerNorm's gain) changes
            err = term.detach().sum() * (1.0 if self.objective == "paper" else float(width))  # Σ‖x̂ − x_in‖² (commit divides by d_in)
            self.last_fvu = metrics.fvu_of_error(err, x_in.detach() if keep is None else x_in.detach()[keep])
        flat = (idx + torch.arange(G, device=x.device)[None, :, None] * C).flatten()
        self.last_fired = torch.zeros(d.cfg.d_dict, device=x.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        self._rows, self._keep = xn.detach(), keep
        out = (out_n if scale == 1.0 else out_n / scale).to(x.dtype).view(B, T, width)
        return out if keep is None else torch.where(keep.view(B, T, 1), out, x)


# --- the codebook spec --------------------------------------------------------------------------

SPEC_HELP = (
    "Codebooks to insert: entries separated by ';', each SITE:key=value,... "
    "SITE is attn (attn.hook_z, every layer), mlp (hook_mlp_out), resid (hook_resid_post), optionally "
    "with layers in brackets (mlp[0,2], attn[1-3]), or a full hook name (blocks.1.hook_mlp_out). "
    "Keys: k (codes chosen per group; required), codes (codes per group; default 8 x the group width), "
    "groups (a number, or heads = one group per attention head), sim (cosine | inner; cosine picks by inner "
    "product over the code's norm, which is Codebook Features' inner_product). "
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
        elif HOOK_RE.match(site):
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


def build_codebook(spec: CodebookSpec, shape: list[int], init: Dictionary | None = None, input_norm: str = "scale") -> Dictionary:
    """A Codebook for a hook of per-position `shape`, from the spec, taking what is unset from `init`."""
    from saekit.dictionaries.codebook import Codebook

    width = int(np.prod(shape))
    if init is not None:
        if init.cfg.kind != "codebook":
            raise SaekitError(f"--init dictionary for {spec.hook} is kind {init.cfg.kind!r}; joint training needs a codebook")
        if init.cfg.input_norm != input_norm:
            raise SaekitError(f"--init codebook for {spec.hook} has input_norm={init.cfg.input_norm}, the run asks for {input_norm}; "
                              f"pass --input-norm {init.cfg.input_norm}")
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
    cfg = DictConfig(kind="codebook", d_in=width, d_dict=per * groups, k=k, groups=groups, similarity=sim, input_norm=input_norm)
    d = Codebook(cfg, Provenance(hook=spec.hook, hook_shape=list(shape)))
    if init is not None:
        d.load_state_dict(init.state_dict())
    return d


def find_init(root: str, hooks: list[str]) -> dict[str, Dictionary]:
    """Dictionaries under `root` (one folder or a tree, e.g. `saekit train --out`), by hook; one per hook."""
    from saekit.interop import find_dictionary_folders, load

    p = Path(root)
    if not p.exists():
        raise SaekitError(f"--init {root} does not exist; pass a dictionary folder or a folder of them")
    found: dict[str, Dictionary] = {}
    for f in find_dictionary_folders(p, ("saekit",)):
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
