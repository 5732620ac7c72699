"""A codebook model for evaluation: a model with ALL its codebooks in the forward pass, whose codes can be read and patched.

Codebook Features evaluates (and intervenes on) the model it trained, with every codebook
active: at each codebook's hook the activation x is replaced by decode(encode(x)), so the
layers above see only codes.  `CodebookModel` is that model at inference, built from a
`saekit finetune --out` folder (out/model + out/codebooks/<hook>/) or from any model plus
saekit codebooks for its hooks.  One forward (`run`) can

- record each codebook's input activations (the "neurons" of its site) and codes, and
- patch codes: at chosen hooks and one position per row, the codes are overwritten
  (dense code vectors of d_dict, 1 = chosen) before decoding, as the paper's tutorial
  overwrites code ids at the final token.

The forward value at a hook is `d.decode(d.encode(x))` through the `Dictionary` interface,
at the positions `finetune` replaces (BOS left as it is when the run used --skip-bos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from saekit.errors import SaekitError


@dataclass
class Patch:
    """Codes to force at one hook: row i gets `codes[i, j]` (d_dict,) at position `pos[i, j]`."""

    pos: Tensor
    """(B, P) int64 positions per row (or (B,) for one)."""
    codes: Tensor
    """(B, P, d_dict) dense codes, 1 at each chosen code (or (B, d_dict) for one position)."""


@dataclass
class RunRecord:
    """What one recorded forward saw at every codebook: inputs and codes, (B, T, width) and (B, T, d_dict)."""

    inputs: dict[str, Tensor] = field(default_factory=dict)
    codes: dict[str, Tensor] = field(default_factory=dict)


class CodebookModel:
    """A Hugging Face causal LM with saekit codebooks at its hooks (module docstring)."""

    def __init__(self, hf: nn.Module, codebooks: dict, sites: dict, bos_id: int, skip_bos: bool = True, path: str = "",
                 tokenizer=None):
        from saekit.inmodel.sites import Splicer

        self.hf = hf.eval()
        self.codebooks = codebooks
        """{hook: Dictionary}, in layer order."""
        self.neuron_hooks = [h for h in sites if site_of(h) in ("attn", "mlp")]
        """Every attention and MLP site with a place in the model: what `run(record=True)` records (the neuron baseline)."""
        self.splicer = Splicer(hf, list(sites.values()))
        self.bos_id = bos_id
        self.skip_bos = skip_bos
        self.path = path
        self.tokenizer = tokenizer
        self.device = next(hf.parameters()).device

    @property
    def hooks(self) -> list[str]:
        return list(self.codebooks)

    @classmethod
    def load(cls, folder: str, model: str | None = None, device: str = "cpu") -> "CodebookModel":
        # device: cpu, cuda, cuda:1, ... or auto
        """From a `saekit finetune --out` folder (its model/ and codebooks/), or a folder of codebooks plus `model`."""
        from saekit.inmodel.model import load_in_model
        from saekit.interop import find_dictionary_folders, load
        from saekit.models import hook_layer

        from saekit.toy import codebook_model_dir

        root = Path(codebook_model_dir(folder))
        if not root.is_dir():
            raise SaekitError(f"codebook model {folder} does not exist; pass a `saekit finetune --out` folder")
        if model is None:  # out/model (a report's path may be relative to where finetune ran), else the report's model
            rep = root / "report.json"
            if (root / "model" / "config.json").is_file():
                model = str(root / "model")
            elif rep.is_file():
                model = json.loads(rep.read_text()).get("model")
        if not model:
            raise SaekitError(f"{folder} holds no model/ and no report.json naming one; pass the model the codebooks belong to (--model)")
        cb_root = root / "codebooks" if (root / "codebooks").is_dir() else root
        dicts = {}
        for f in find_dictionary_folders(cb_root, ("saekit",)):
            d = load(f)
            if d.cfg.kind != "codebook":
                continue
            if d.prov.hook in dicts:
                raise SaekitError(f"{folder} holds two codebooks for {d.prov.hook}; keep one per hook")
            dicts[d.prov.hook] = d
        if not dicts:
            raise SaekitError(f"{folder} holds no saekit codebooks; pass a `saekit finetune --out` folder")
        skip_bos = _skip_bos(root, dicts)
        hooks = sorted(dicts, key=lambda h: (hook_layer(h), h))
        neurons = [f"blocks.{layer}.{s}" for layer in range(n_layers(model)) for s in ("attn.hook_z", "hook_mlp_out")]
        from saekit.models import resolve_device

        im = load_in_model(model, hooks + [h for h in neurons if h not in hooks], resolve_device(device))
        return cls(im.hf, {h: dicts[h].to(im.hf.device).eval() for h in hooks}, im.sites, im.bos_id, skip_bos, str(model), im.tokenizer)

    @torch.no_grad()
    def run(self, tokens: Tensor, *, patches: dict[str, Patch] | None = None, force: dict[str, list[int]] | None = None,
            force_at: Tensor | None = None, record: bool = False, codebooks: bool = True) -> tuple[Tensor, RunRecord | None]:
        """Logits (B, T, vocab) of token batch (B, T) with every codebook active (or none when `codebooks` is False).

        `force[hook]`: code indices switched on at every replaced position (or where the bool
        `force_at[pos]` is True, positions past its end excluded), each as its group's choice (the
        group's own codes are dropped), as the library's `generate_with_codes`.
        """
        from saekit.tokens import model_input, row_mask

        t = tokens.to(self.device).long()
        inp = model_input(t, self.bos_id)
        if not codebooks:
            return self.hf(input_ids=inp).logits, None
        mask = row_mask(t, self.skip_bos)
        rec = RunRecord() if record else None
        patches, force = patches or {}, force or {}
        unknown = (set(patches) | set(force)) - set(self.codebooks)
        if unknown:
            raise SaekitError(f"no codebook at {sorted(unknown)}; this model has codebooks at {', '.join(self.codebooks)}")

        def layer(h: str, d):
            def fn(x: Tensor) -> Tensor:  # x (B, T, width)
                B, T, w = x.shape
                codes = d.encode(x.reshape(B * T, w).float()).reshape(B, T, -1)  # (B, T, d_dict)
                p = patches.get(h)
                if p is not None:
                    pos = p.pos.to(x.device)
                    pos = pos[:, None] if pos.dim() == 1 else pos
                    codes[torch.arange(B, device=x.device)[:, None], pos] = p.codes.to(codes).reshape(B, pos.shape[1], -1)
                per = d.cfg.d_dict // max(d.cfg.groups, 1)
                if h in force:
                    at = torch.ones(T, dtype=torch.bool, device=x.device) if force_at is None else \
                        torch.nn.functional.pad(force_at.to(x.device), (0, max(0, T - force_at.shape[0])))[:T]
                    for i in force[h]:
                        g = i // per
                        codes[:, at, g * per:(g + 1) * per] = 0
                    for i in force[h]:
                        codes[:, at, i] = 1
                codes = codes * mask[..., None]  # untouched positions (BOS, padding) carry no codes
                if rec is not None:
                    rec.inputs[h] = x.detach().float()
                    rec.codes[h] = codes
                out = d.decode(codes.reshape(B * T, -1)).reshape(B, T, w).to(x.dtype)
                return torch.where(mask[..., None], out, x)

            return fn

        def reader(h: str):
            def fn(x: Tensor) -> Tensor:
                rec.inputs[h] = x.detach().float()
                return x

            return fn

        fns = {h: layer(h, d) for h, d in self.codebooks.items()}
        if rec is not None:
            fns |= {h: reader(h) for h in self.neuron_hooks if h not in fns}
        with self.splicer.active(fns):
            logits = self.hf(input_ids=inp).logits
        return logits, rec

    @torch.no_grad()
    def sample(self, n_seq: int, ctx: int, seed: int, prompt: Tensor | None = None,
               patches: dict[str, Patch] | Callable[[Tensor], dict[str, Patch]] | None = None,
               temperature: float = 1.0, codebooks: bool = True, force: dict[str, list[int]] | None = None,
               force_at: Tensor | None = None) -> Tensor:
        """Sample continuations to `ctx` tokens (temperature 0: greedy), codebooks active; no KV cache, so every step sees the same mask.

        `patches` may be a function of the tokens so far (B, L) that returns the patches for that step.
        """
        t = prompt.to(self.device).long() if prompt is not None else torch.full((n_seq, 1), self.bos_id, device=self.device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        while t.shape[1] < ctx:
            p = patches(t) if callable(patches) else patches
            logits = self.run(t, patches=p, force=force, force_at=force_at, codebooks=codebooks)[0][:, -1].float().cpu()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
            t = torch.cat([t, nxt.to(t.device)], 1)
        return t.cpu()


def n_layers(model: str) -> int:
    """Depth of a model from its config.json (n_layer / num_hidden_layers)."""
    from saekit.models import resolve_model_path

    f = Path(resolve_model_path(model)) / "config.json"
    try:
        c = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaekitError(f"cannot read {f} ({e}); pass a Hugging Face model directory") from None
    for key in ("n_layer", "num_hidden_layers", "n_layers", "num_layers"):
        if key in c:
            return int(c[key])
    raise SaekitError(f"{f} names no layer count (n_layer / num_hidden_layers)")


def site_of(hook: str) -> str:
    """attn | mlp | resid | other: the kind of site a hook is (for per-site tables and patch specs)."""
    if hook.endswith("attn.hook_z") or hook.endswith("hook_attn_out"):
        return "attn"
    if hook.endswith("hook_mlp_out") or ".mlp." in hook:
        return "mlp"
    if "resid" in hook:
        return "resid"
    return "other"


def resolve_patch_sites(spec: str, hooks: list[str]) -> list[str]:
    """Hooks named by a patch spec: `attn[0]`, `mlp[1]`, `attn`, `mlp`, `all`, a hook name, or several joined with '+'."""
    import re

    from saekit.models import hook_layer

    out: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split("+"))):
        m = re.fullmatch(r"(attn|mlp|resid|all)(?:\[([0-9,\- ]+)\])?", part)
        if m:
            layers = None
            if m.group(2):
                layers = set()
                for r in m.group(2).replace(" ", "").split(","):
                    a, _, b = r.partition("-")
                    layers |= set(range(int(a), int(b or a) + 1))
            got = [h for h in hooks if (m.group(1) == "all" or site_of(h) == m.group(1)) and (layers is None or hook_layer(h) in layers)]
        elif part in hooks:
            got = [part]
        else:
            got = []
        if not got:
            raise SaekitError(f"patch site {part!r} names no codebook of this model (it has {', '.join(hooks)}); "
                              "use attn[L], mlp[L], attn, mlp, all or a hook name, joined with '+'")
        out += [h for h in got if h not in out]
    if not out:
        raise SaekitError(f"empty patch site {spec!r}; use e.g. attn[0], mlp[1], attn, mlp or all")
    return out


def _skip_bos(root: Path, dicts: dict) -> bool:
    """Whether the run left BOS unreplaced: the finetune's config.json, else its report.json's config, else what the
    codebooks' own training config says (a shipped folder may keep only the codebooks and the report); True if none says.
    Evaluating with a different rule than training ran would feed the model a BOS activation it never saw."""
    for name, key in (("config.json", None), ("report.json", "config")):
        f = root / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except json.JSONDecodeError:
                continue
            cfg = cfg.get(key, {}) if key else cfg
            if isinstance(cfg, dict) and "skip_bos" in cfg:
                return bool(cfg["skip_bos"])
    said = {bool(d.train_config["skip_bos"]) for d in dicts.values() if isinstance(d.train_config, dict) and "skip_bos" in d.train_config}
    if len(said) > 1:
        raise SaekitError(f"the codebooks in {root} were trained with different BOS rules (skip_bos); keep one run's codebooks")
    return said.pop() if said else True
