"""Splice dictionaries into the frozen model and measure what the model loses.

A dictionary is only as good as what the model can still do with its reconstruction.
For each dictionary (and for all of them at once) the hook's activation is replaced by
x̂ = decode(encode(x)) during the forward pass, at every position except BOS (position 0
carries attention-sink activations that dictionaries are not trained on; `splice_bos`
includes it), and the next-token loss is compared with the clean model and with the hook
ablated (zeros, or the hook's mean activation):

    loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean)

plus ΔCE, KL(clean ‖ spliced), next-token accuracy, and the dictionary's L0, FVU and dead
fraction on the same positions.  Every number comes from `saekit.metrics`.

A dictionary that reads some hooks and writes others (the `Dictionary` hook interface) replaces
all its out hooks in one pass: a transcoder its MLP's output, from the MLP input; a CLT every
MLP output; a crosscoder all its hooks.  Its inputs come from the clean pass (`--input clean`)
or from the spliced pass as it runs (`running`: an out hook is predicted from the inputs read
before it, so a CLT's layer l uses codes of layers <= l); the ablation baselines ablate all
its out hooks at once, and FVU is reported per out hook.

Cost: per batch the clean forward runs once and is shared by every intervention.  An
intervention on a hook in block L changes nothing below it, so its forward starts from
the clean residual entering block L (`bridge(resid, start_at_layer=L)`).  TransformerLens
4.3 still executes blocks 0..L-1 in that mode (their output is thrown away), so while it
runs those blocks are swapped for a pass-through; the first batch checks that the fast
path gives the same logits as a full forward and falls back to full forwards if not.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from saekit import metrics, outdir, runs
from saekit.errors import SaekitError
from saekit.tokens import PAD, model_input, row_mask, scored_mask
from saekit.models import HookSpec, LoadedModel, check_hook_names, check_model, hook_layer, load_model, resolve_hooks, unflatten

METRIC_KEYS = (
    "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered_zero", "loss_recovered_mean",
    "delta_ce", "kl", "acc_clean", "acc_spliced", "l0", "fvu", "dead_frac", "dead_window_tokens",
)
MODES = ("running", "clean")


@dataclass
class SpliceConfig:
    """What `saekit splice-eval` evaluates, on which tokens."""

    model: str = ""
    """Model to splice into: Hub name, local HF directory or `toy`; empty = the one the store or the first dictionary was made from."""
    dicts: list[str] = field(default_factory=list, metadata={"aliases": ["--dict"]})
    """Dictionary folders to splice in (repeat --dict, or separate with commas)."""
    sweep: str | None = None
    """Folder of a training sweep: every dictionary under it is evaluated and the L0 vs loss-recovered frontier is written there (frontier.png, frontier.csv)."""
    data: str | None = None
    """Held-out text to evaluate on (.txt one document per line, .jsonl, or a folder); or use --store."""
    store: str | None = None
    """Activation store: its eval split gives the tokens and its statistics the means for mean-ablation."""
    text_field: str = "text"
    """JSONL field holding the document (with --data)."""
    context_size: int = 0
    """Tokens per sequence with --data (0 = the model's context, at most 256)."""
    packing: str = "concat"
    """How --data documents become sequences: concat (joined with EOS, cut) or doc (one per sequence, padded)."""
    json_out: str | None = field(default=None, metadata={"aliases": ["--json"]})
    """Also write the results as JSON to this file."""
    splice_bos: bool = False
    """Splice (and ablate) the BOS position too; by default position 0 keeps its clean activation."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int = 32768
    """Evaluate on at most this many (non-padding) tokens, in whole sequences (0 = all)."""
    device: str = "auto"
    """Device for the model and the dictionaries: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    compat: bool = False
    """Load the model with TransformerLens weight processing (must match how the dictionaries were trained)."""
    input: str = field(default="running", metadata={"panel": "Data"})
    """Where a transcoder or CLT reads its input: running (the spliced model's own activations as the pass reaches them, so errors compound over layers as in use; the same as clean for one SAE or one transcoder alone, and how several SAEs were always spliced at once) or clean (the clean forward's, as transcoder papers report).  Crosscoders always read the clean pass."""
    finetuned: str | None = None
    """A `saekit finetune --out` folder: evaluate its codebooks in its model and report the talk's table (loss and accuracy of the original model, the model fine-tuned without codebooks, the codebook model) on the same tokens (default: the run's held-out sequences)."""

    def __post_init__(self):
        if self.data and self.store:
            raise ValueError("give either data or store as evaluation tokens, not both")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be 0 (all) or positive, got {self.max_tokens}")
        if self.context_size < 0 or self.context_size == 1:
            raise ValueError(f"context_size must be 0 (automatic) or at least 2, got {self.context_size}")
        if self.packing not in ("concat", "doc"):
            raise ValueError(f"packing {self.packing!r} is not concat or doc")
        if self.input not in MODES:
            raise ValueError(f"input {self.input!r} is not {' or '.join(MODES)}")


@dataclass
class Target:
    """One dictionary resolved against the loaded model."""

    name: str
    """How results name it (the folder path as given)."""
    dictionary: nn.Module
    hook: HookSpec
    """The (first) hook it replaces; `hook.shape` is the per-position shape to unflatten x̂ to."""
    ins: list[HookSpec] = field(default_factory=list)
    """Hooks it reads (a transcoder: the MLP input); empty = [hook] (an SAE)."""
    outs: list[HookSpec] = field(default_factory=list)
    """Hooks it replaces, all at once (a CLT: every MLP output); empty = [hook]."""

    @property
    def reads(self) -> list[HookSpec]:
        return self.ins or [self.hook]

    @property
    def writes(self) -> list[HookSpec]:
        return self.outs or [self.hook]

    @property
    def single(self) -> bool:
        """Reads and replaces one hook (an SAE or codebook): spliced through the dictionary's own forward."""
        return [h.name for h in self.reads] == [h.name for h in self.writes] and len(self.writes) == 1


# --- pure helpers ----------------------------------------------------------------------------

def replace_rows(act: Tensor, mask: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """act (B, T, *shape) with the rows where mask (B, T) is True replaced by fn(rows (n, width))."""
    flat = act.reshape(*act.shape[:2], -1)  # (B, T, width)
    out = flat.clone()
    out[mask] = fn(flat[mask]).to(out.dtype)
    return unflatten(out, list(act.shape[2:]))


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _clean_json(x):
    """NaN/inf → None so the JSON file is valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean_json(v) for v in x]
    return x


# --- forward passes ----------------------------------------------------------------------------

class _PassThrough(nn.Module):
    """Stands in for a block whose output will be discarded: returns its hidden states unchanged."""

    def __init__(self, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_output else hidden_states


class Runner:
    """Forward passes on one bridge: a clean pass that caches what later passes restart from."""

    def __init__(self, bridge, start_layers: set[int]):
        self.bridge = bridge
        self.n_layers = int(bridge.cfg.n_layers)
        # Layers a spliced/ablated pass may start at (0 and hooks before block 0 start from tokens).
        self.start_layers = {
            L for L in start_layers if 0 < L < self.n_layers and f"blocks.{L}.hook_resid_pre" in bridge.hook_dict
        }
        blocks = getattr(bridge, "blocks", None)
        if not blocks or any("_original_component" not in b._modules for b in blocks):
            self.start_layers = set()  # not the standard block stack: every pass runs from the tokens
        self.fast: bool | None = None if self.start_layers else False
        """None = not checked yet; True = restarting from cached residuals matches a full forward."""
        self._tuple_output: bool | None = None

    @torch.no_grad()
    def clean(self, inp: Tensor, hooks: list[str]) -> tuple[Tensor, dict[str, Tensor], dict[int, Tensor]]:
        """Clean logits (B, T, vocab), the hooks' activations flattened (B, T, width), residuals entering start layers."""
        acts: dict[str, Tensor] = {}
        resid: dict[int, Tensor] = {}

        def save_act(name):
            def fn(act, hook):
                acts[name] = act.detach().reshape(*act.shape[:2], -1)
                return act
            return fn

        def save_resid(layer):
            def fn(act, hook):
                resid[layer] = act.detach().clone()
                return act
            return fn

        fwd = [(h, save_act(h)) for h in dict.fromkeys(hooks)]
        if self.fast is not False:
            fwd += [(f"blocks.{L}.hook_resid_pre", save_resid(L)) for L in sorted(self.start_layers)]
        handle = None
        if self._tuple_output is None and self.start_layers:
            # Record what a block returns (tensor or tuple) so the pass-through can mimic it.
            def spy(module, args, output):
                self._tuple_output = isinstance(output, tuple)
            handle = self.bridge.blocks[0]._modules["_original_component"].register_forward_hook(spy)
        try:
            logits = self.bridge.run_with_hooks(inp, fwd_hooks=fwd)
        finally:
            if handle is not None:
                handle.remove()
        return logits, acts, resid

    @contextlib.contextmanager
    def _skip_below(self, layer: int):
        """Blocks 0..layer-1 become pass-throughs (their output is discarded by start_at_layer anyway)."""
        blocks = list(self.bridge.blocks)[:layer]
        saved = [b._modules["_original_component"] for b in blocks]
        try:
            for b in blocks:
                b._modules["_original_component"] = _PassThrough(bool(self._tuple_output))
            yield
        finally:
            for b, orig in zip(blocks, saved):
                b._modules["_original_component"] = orig

    def _fast_run(self, resid: Tensor, layer: int, fwd_hooks) -> Tensor:
        with self._skip_below(layer):
            return self.bridge.run_with_hooks(resid, fwd_hooks=fwd_hooks, start_at_layer=layer)

    @torch.no_grad()
    def run(self, inp: Tensor, resid: dict[int, Tensor], fwd_hooks: list) -> Tensor:
        """Logits with `fwd_hooks` applied, restarting from the lowest hook's block when that is safe."""
        layer = min(hook_layer(h) for h, _ in fwd_hooks)
        if self.fast is False or layer not in self.start_layers or layer not in resid:
            return self.bridge.run_with_hooks(inp, fwd_hooks=fwd_hooks)
        if self.fast is None:
            self._check(inp, resid, layer)
        if self.fast:
            return self._fast_run(resid[layer], layer, fwd_hooks)
        return self.bridge.run_with_hooks(inp, fwd_hooks=fwd_hooks)

    def _check(self, inp: Tensor, resid: dict[int, Tensor], layer: int) -> None:
        """First use: a restarted and a full forward with a probe hook must agree, or full forwards from now on.

        The probe (halving the residual entering `layer`) checks that hooks run in the restarted
        pass; the caller's own hooks run once per pass, since they may record statistics.
        """
        probe = [(f"blocks.{layer}.hook_resid_pre", lambda act, hook: act * 0.5)]
        full = self.bridge.run_with_hooks(inp, fwd_hooks=probe)
        try:
            fast = self._fast_run(resid[layer], layer, probe)
            self.fast = bool((fast - full).abs().max() <= 1e-4 * (1 + full.abs().max()))
        except Exception:  # an architecture the restart path does not support: full forwards are always right
            self.fast = False


# --- evaluation tokens and ablation means -------------------------------------------------------

def take_tokens(seqs: Iterator[np.ndarray], max_tokens: int) -> Tensor:
    """Stack whole sequences until `max_tokens` non-padding tokens are reached (0 = all): int64 (n_seq, T)."""
    out, n = [], 0
    for s in seqs:
        out.append(np.asarray(s, dtype=np.int64))
        n += int((out[-1] != PAD).sum())
        if max_tokens and n >= max_tokens:
            break
    if not out:
        return torch.zeros(0, 0, dtype=torch.long)
    return torch.from_numpy(np.stack(out))


def text_tokens(cfg: SpliceConfig, model: LoadedModel) -> Tensor:
    """Evaluation sequences from text, tokenised and packed exactly as `harvest` does."""
    from saekit import text

    ctx = cfg.context_size or min(model.info.n_ctx, 256)
    if ctx > model.info.n_ctx:
        raise SaekitError(f"context_size {ctx} exceeds the model's context ({model.info.n_ctx}); pass --context-size {model.info.n_ctx} or less")
    from saekit.toy.corpus import check_packing

    check_packing(cfg.data, cfg.packing, ctx, "pass --packing doc --context-size {n}")
    tok = model.tokenizer
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.bos_id
    seqs = text.sequences(cfg.data, tok, ctx, bos_id=model.bos_id, eos_id=int(eos), packing=cfg.packing, text_field=cfg.text_field)
    return take_tokens(seqs, cfg.max_tokens)


def store_tokens(store, max_tokens: int, chunk: int = 256) -> Tensor:
    """The store's eval split (held out from training), at most `max_tokens` tokens."""
    split = store.split("eval")

    def seqs():
        for start in range(split.start, split.stop, chunk):
            yield from store.read_tokens(start, min(start + chunk, split.stop))

    return take_tokens(seqs(), max_tokens)


@torch.no_grad()
def mean_activations(model: LoadedModel, tokens: Tensor, hooks: list[str], batch_size: int) -> dict[str, Tensor]:
    """Mean of each hook's flattened activation over non-padding, non-BOS positions (as a store's statistics)."""
    from saekit.models import capture

    sums: dict[str, Tensor] = {}
    count = 0
    device = next(model.bridge.parameters()).device
    for i in range(0, tokens.shape[0], batch_size):
        tok = tokens[i : i + batch_size].to(device)
        mask = row_mask(tok, skip_bos=True)
        acts = capture(model.bridge, model_input(tok, model.bos_id), hooks)
        for h, a in acts.items():
            s = a[mask].double().sum(0)
            sums[h] = s if h not in sums else sums[h] + s
        count += int(mask.sum())
    if count == 0:
        raise SaekitError("the evaluation tokens have no positions after BOS; use longer sequences")
    return {h: (s / count).float() for h, s in sums.items()}


# --- checks ------------------------------------------------------------------------------------

def sweep_dictionaries(root: str | os.PathLike) -> list[Path]:
    """Every saekit dictionary folder under the sweep folder `root`, sorted; refuses a missing or empty folder."""
    r = Path(root)
    if not r.is_dir():
        raise SaekitError(f"sweep folder {r} does not exist; pass the folder your training sweep wrote")
    from saekit.interop import find_dictionary_folders

    found = find_dictionary_folders(r, ("saekit",))
    if not found:
        raise SaekitError(f"no dictionaries under {r} (looked for folders with config.json + weights.safetensors)")
    return found


def resolve_target(name: str, d, model: LoadedModel) -> Target:
    """Check a dictionary against the loaded model and find its hooks; one-line errors naming both sides."""
    prov = d.prov
    ins, outs = list(getattr(d, "in_hooks", [prov.hook])), list(getattr(d, "out_hooks", [prov.hook]))
    if not prov.hook or not all(ins + outs):
        raise SaekitError(f"dictionary {name} does not record which hook it was trained on; it cannot be spliced")
    check_model(f"dictionary {name}", prov.model, model.info)
    names = list(dict.fromkeys(ins + outs))
    for h in names:
        try:
            check_hook_names(model.bridge, [h])
        except SaekitError as e:
            raise SaekitError(f"dictionary {name}: the model {model.info.name} has no hook {h!r} ({e})") from None
    specs = dict(zip(names, resolve_hooks(model, names)))
    if ins == outs and len(outs) == 1:
        return _resolve_single(name, d, model, specs[prov.hook])
    _check_widths(name, d, model, [specs[h] for h in ins], [specs[h] for h in outs])
    return Target(name=name, dictionary=d, hook=specs[outs[0]], ins=[specs[h] for h in ins], outs=[specs[h] for h in outs])


def _resolve_single(name: str, d, model: LoadedModel, spec: HookSpec) -> Target:
    prov = d.prov
    d_in = int(d.cfg.d_in)
    if d_in != spec.width:
        raise SaekitError(
            f"dictionary {name} has width {d_in} but hook {prov.hook} of model {model.info.name} has width {spec.width}; "
            "use a dictionary trained on this hook of this model"
        )
    if prov.hook_shape and list(prov.hook_shape) != spec.shape:
        raise SaekitError(
            f"dictionary {name} was trained on hook shape {list(prov.hook_shape)} but {prov.hook} has shape {spec.shape} "
            "in the loaded model; use a dictionary trained on this model"
        )
    return Target(name=name, dictionary=d, hook=spec)


@torch.no_grad()
def _check_widths(name: str, d, model: LoadedModel, ins: list[HookSpec], outs: list[HookSpec]) -> None:
    """A multi-hook dictionary's widths against the model's hooks: inputs by encoding a zero row, outputs by decoding zero codes."""
    fix = "use a dictionary trained on these hooks of this model"
    ref = next(iter(d.buffers()), None)
    dev = ref.device if ref is not None else torch.device("cpu")
    widths = list(getattr(d.cfg, "in_widths", None) or [])  # per in hook; else every in hook has d_in
    for i, h in enumerate(ins):
        want = widths[i] if i < len(widths) else int(d.cfg.d_in)
        if want == h.width:
            continue
        try:  # d_in may mean something else for this kind: the encoder is the judge
            d.encode_hooks({h.name: torch.zeros(1, h.width, device=dev)})
            if widths:
                raise ValueError
        except Exception:
            raise SaekitError(f"dictionary {name} reads width {want} at {h.name} but that hook of model {model.info.name} "
                              f"has width {h.width}; {fix}") from None
    pred = d.decode_hooks(torch.zeros(1, int(d.cfg.d_dict), device=dev))
    for h in outs:
        if h.name not in pred:
            raise SaekitError(f"dictionary {name} lists {h.name} among its out hooks but predicts no activation for it; "
                              "the dictionary's files are inconsistent, retrain or re-export it")
        w = int(pred[h.name].shape[-1])
        if w != h.width:
            raise SaekitError(f"dictionary {name} writes width {w} at {h.name} but that hook of model {model.info.name} "
                              f"has width {h.width}; {fix}")


# --- the evaluation ----------------------------------------------------------------------------

class _Stats:
    """Running sums for one row of the report (one dictionary, or all at once)."""

    def __init__(self, d_dict: int, hooks: list[str]):
        self.ce_spliced = self.kl = self.correct = 0.0
        self.l0_sum = 0.0
        self.rows = 0
        self.fvu = {h: metrics.FVUAccumulator() for h in hooks}
        """Per replaced hook: the activation it would have had vs what replaced it."""
        self.fires = torch.zeros(d_dict, dtype=torch.long)

    def add_hook(self, hook: str, x: Tensor, x_hat: Tensor) -> None:
        if x.shape[0]:
            self.fvu[hook].update(x, x_hat)

    def add_codes(self, codes: Tensor) -> None:
        if codes.shape[0] == 0:
            return
        self.l0_sum += metrics.l0(codes) * codes.shape[0]
        self.rows += codes.shape[0]
        self.fires += (codes != 0).sum(0).cpu()

    def fvu_per_hook(self) -> dict[str, float]:
        return {h: acc.value() for h, acc in self.fvu.items()}

    def fvu_mean(self) -> float:
        """A multi-hook dictionary's FVU: the mean over its hooks (as "all at once" averages dictionaries)."""
        return float(np.mean(list(self.fvu_per_hook().values())))


def _predict(t: Target, inputs: dict[str, Tensor], codes: bool = True) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Codes (n, d_dict) (None unless `codes`) and {out hook: x̂ rows (n, width)} from {in hook: rows}, original units.

    Predictions come from `predict`, not `decode_hooks(encode_hooks(.))`: a skip transcoder's
    prediction adds a linear term of its input that its codes do not carry.
    """
    d = t.dictionary
    if t.single:  # the dictionary's own forward, as SAEs and codebooks have always been spliced
        out = d(inputs[t.hook.name].float())
        return out.codes, {t.hook.name: out.x_hat}
    x = {h: v.float() for h, v in inputs.items()}
    return (d.encode_hooks(x) if codes else None), d.predict(x)


class _Replacement:
    """One dictionary inside one forward pass.

    clean: every prediction comes from the clean pass's activations (computed up front);
    running: each in hook is read as the pass reaches it, and an out hook's prediction uses
    the inputs read so far (a CLT's layer l: codes of layers <= l; a transcoder: its MLP input).
    FVU compares a prediction with the activation the hook would have had in this pass; L0 is
    of the codes behind the last replaced hook (a CLT's: every layer's).
    """

    def __init__(self, t: Target, mode: str, stats: _Stats, mask: Tensor, acts: dict[str, Tensor], order: list[str]):
        self.t, self.mode, self.stats = t, mode, stats
        self.inputs: dict[str, Tensor] = {}
        self.pred: dict[str, Tensor] = {}
        self.last = max((h.name for h in t.writes), key=order.index)
        if mode == "clean":
            codes, self.pred = _predict(t, {h.name: acts[h.name][mask] for h in t.reads})
            for h in t.writes:
                stats.add_hook(h.name, acts[h.name][mask], self.pred[h.name])
            stats.add_codes(codes)

    def write(self, hook: str, rows: Tensor) -> Tensor:
        """x̂ rows for `hook`, whose activation on the spliced rows would have been `rows`."""
        if self.mode == "clean":
            return self.pred[hook]
        codes, pred = _predict(self.t, self.inputs, codes=hook == self.last)
        self.stats.add_hook(hook, rows, pred[hook])
        if codes is not None:
            self.stats.add_codes(codes)
        return pred[hook]


def _splice_hooks(reps: list[_Replacement], mask: Tensor) -> list:
    """One hook function per hook name: record running inputs, write predictions on the `mask` (B, T) rows.

    A hook that a dictionary both reads and writes (an SAE) is read before it is written;
    other dictionaries reading it see the replacement, as the spliced model does.
    """
    writers = {h.name: r for r in reps for h in r.t.writes}
    readers: dict[str, list[_Replacement]] = {}
    for r in reps:
        if r.mode == "running":
            for h in r.t.reads:
                readers.setdefault(h.name, []).append(r)

    def make(name: str):
        w, rs = writers.get(name), readers.get(name, [])

        def fn(act, hook):
            flat = act.reshape(*act.shape[:2], -1)  # (B, T, width)
            rows = flat[mask]
            if any(r is w for r in rs):
                w.inputs[name] = rows
            out = act
            if w is not None:
                new = flat.clone()
                new[mask] = w.write(name, rows).to(new.dtype)
                rows = new[mask]
                out = unflatten(new, list(act.shape[2:]))
            for r in rs:
                if r is not w:
                    r.inputs[name] = rows
            return out

        return fn

    return [(n, make(n)) for n in dict.fromkeys([*writers, *readers])]


def _ablate(hooks, mask: Tensor, means: dict[str, Tensor] | None) -> list:
    """Hooks replacing the `mask` rows of each hook by zeros (means None) or by the hook's mean."""
    def make(h):
        def fn(act, hook):
            flat = act.reshape(*act.shape[:2], -1)
            out = flat.clone()
            out[mask] = 0.0 if means is None else means[h].to(out.dtype)
            return unflatten(out, list(act.shape[2:]))
        return fn

    return [(h, make(h)) for h in hooks]


@torch.no_grad()
def reads_running(t: Target, acts: dict[str, Tensor], rows: Tensor, order: list[str]) -> bool:
    """Whether `t` can read its inputs as the model runs: each out hook's prediction from the inputs the model
    computes before it must equal the one from all of them.  Always so when every input comes first (SAE,
    transcoder); checked on these `rows` (B, T) of `acts` otherwise: a CLT passes, a crosscoder across layers fails."""
    pos = {h: i for i, h in enumerate(order)}
    ins = [h.name for h in t.reads]
    full = {h: acts[h][rows] for h in ins}
    pred = None
    for o in t.writes:
        before = [h for h in ins if pos[h] <= pos[o.name]]
        if not before:
            return False
        if len(before) == len(ins):
            continue
        pred = pred or _predict(t, full, codes=False)[1]
        part = _predict(t, {h: full[h] for h in before}, codes=False)[1][o.name]
        a = pred[o.name]
        if not torch.allclose(part, a, rtol=1e-4, atol=1e-5 * (1 + (float(a.abs().max()) if a.numel() else 0.0))):
            return False
    return True


def _modes(targets: list[Target], mode: str, acts: dict[str, Tensor], rows: Tensor, order: list[str]) -> list[str]:
    """Each target's input mode: `mode`, except clean for one that cannot read running inputs."""
    return [mode if mode == "clean" or reads_running(t, acts, rows, order) else "clean" for t in targets]


@torch.no_grad()
def logits_with(model: LoadedModel, targets: list[Target], tokens: Tensor, *, mode: str = "running",
                   splice_bos: bool = False) -> Tensor:
    """Logits (B, T, vocab) of `model` with every target spliced in at once on `tokens` (B, T; PAD = -1).

    The replacement `evaluate` measures, from one full forward (no restart): for notebooks and
    for checks against other implementations of the same splice.
    """
    if mode not in MODES:
        raise SaekitError(f"splice mode {mode!r} is not {' or '.join(MODES)}")
    device = next(model.bridge.parameters()).device
    tok = tokens.to(device)
    inp = model_input(tok, model.bos_id)
    mask = row_mask(tok, skip_bos=not splice_bos)
    for t in targets:
        t.dictionary.to(device).eval()
    runner = Runner(model.bridge, set())
    _, acts, _ = runner.clean(inp, list(dict.fromkeys(h.name for t in targets for h in t.reads + t.writes)))
    order = list(acts)
    modes = _modes(targets, mode, acts, row_mask(tok, skip_bos=False), order)
    reps = [_Replacement(t, m, _Stats(int(t.dictionary.cfg.d_dict), [h.name for h in t.writes]), mask, acts, order)
            for t, m in zip(targets, modes)]
    return model.bridge.run_with_hooks(inp, fwd_hooks=_splice_hooks(reps, mask))


@torch.no_grad()
def evaluate(
    model: LoadedModel,
    targets: list[Target],
    tokens: Tensor,
    means: dict[str, Tensor],
    *,
    splice_bos: bool = False,
    batch_size: int = 8,
    mode: str = "running",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Splice each target (and all at once) into `model` on `tokens` (n_seq, T; PAD = -1) and report the metrics.

    `means` maps each replaced hook to its mean activation (width,) for mean-ablation; `mode`
    says where transcoders and CLTs read their inputs (running | clean, see SpliceConfig.input;
    a target that cannot read running inputs, a crosscoder, reads the clean pass and its row
    says so).  Returns {"dictionaries": [row per target], "all": row or None, "eval": {...}},
    a row holding `METRIC_KEYS` plus "hooks" (what it replaces, ablated together for the
    loss-recovered baselines), "fvu_per_hook" and "mode" (per-dictionary rows also "dict",
    "hook" = hooks[0], "in_hooks").  "all" splices every target at once: its L0 is the sum
    over dictionaries (active latents per token in the whole model), its FVU the mean of the
    dictionaries' FVUs, its dead fraction over all latents pooled.  It is None when two
    targets replace the same hook.
    """
    if mode not in MODES:
        raise SaekitError(f"splice mode {mode!r} is not {' or '.join(MODES)}")
    if tokens.numel() == 0 or int(scored_mask(tokens).sum()) == 0:
        raise SaekitError("no evaluation tokens: the data gave no sequence with a next token to predict; pass more text or a store with an eval split")
    bridge = model.bridge
    device = next(bridge.parameters()).device
    outs = [tuple(h.name for h in t.writes) for t in targets]
    hooks = list(dict.fromkeys(h for o in outs for h in o))
    read = [h.name for t in targets for h in t.reads]
    distinct = len(hooks) == sum(len(o) for o in outs)
    multi = distinct and len(targets) > 1
    groups = list(dict.fromkeys(outs))  # hook sets ablated together (one per dictionary)
    runner = Runner(bridge, {h.layer for t in targets for h in t.reads + t.writes})
    for t in targets:
        t.dictionary.to(device).eval()
    mean_dev = {h: means[h].to(device) for h in hooks}

    per = [_Stats(int(t.dictionary.cfg.d_dict), list(o)) for t, o in zip(targets, outs)]
    together = [_Stats(int(t.dictionary.cfg.d_dict), list(o)) for t, o in zip(targets, outs)] if multi else None
    modes: list[str] | None = None
    ce_clean = acc_clean = 0.0
    ce_zero = dict.fromkeys(groups, 0.0)
    ce_mean = dict.fromkeys(groups, 0.0)
    all_ce = {"spliced": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0, "correct": 0.0}
    n_scored = 0
    n_tokens_total = int((tokens != PAD).sum())
    done = 0

    for i in range(0, tokens.shape[0], batch_size):
        tok = tokens[i : i + batch_size].to(device)
        inp = model_input(tok, model.bos_id)
        mask = row_mask(tok, skip_bos=not splice_bos)
        scored = scored_mask(tok)
        n_scored += int(scored.sum())

        def ce(logits):
            return float(metrics.ce_per_token(logits, inp)[scored].double().sum())

        def acc(logits):
            return float(metrics.correct_per_token(logits, inp)[scored].double().sum())

        def kl(clean, other):
            return float(metrics.kl_per_token(clean, other)[:, :-1][scored].double().sum())

        logits, acts, resid = runner.clean(inp, list(dict.fromkeys(read + hooks)))
        ce_clean += ce(logits)
        acc_clean += acc(logits)
        order = list(acts)  # the hooks in the order the forward pass reaches them
        if modes is None:
            modes = _modes(targets, mode, acts, row_mask(tok, skip_bos=False), order)

        for g in groups:
            ce_zero[g] += ce(runner.run(inp, resid, _ablate(g, mask, None)))
            ce_mean[g] += ce(runner.run(inp, resid, _ablate(g, mask, mean_dev)))

        for t, st, m in zip(targets, per, modes):
            spliced = runner.run(inp, resid, _splice_hooks([_Replacement(t, m, st, mask, acts, order)], mask))
            st.ce_spliced += ce(spliced)
            st.correct += acc(spliced)
            st.kl += kl(logits, spliced)

        if multi:
            reps = [_Replacement(t, m, st, mask, acts, order) for t, st, m in zip(targets, together, modes)]
            spliced = runner.run(inp, resid, _splice_hooks(reps, mask))
            all_ce["spliced"] += ce(spliced)
            all_ce["correct"] += acc(spliced)
            all_ce["kl"] += kl(logits, spliced)
            all_ce["zero"] += ce(runner.run(inp, resid, _ablate(hooks, mask, None)))
            all_ce["mean"] += ce(runner.run(inp, resid, _ablate(hooks, mask, mean_dev)))
        done += int((tok != PAD).sum())
        if progress is not None:
            progress(done, n_tokens_total)

    c_clean = ce_clean / n_scored

    def row(ce_s, ce_z, ce_m, kl_sum, correct, l0, fvu, dead, window) -> dict:
        return {
            "ce_clean": c_clean,
            "ce_spliced": ce_s,
            "ce_zero": ce_z,
            "ce_mean": ce_m,
            "loss_recovered_zero": metrics.loss_recovered(c_clean, ce_s, ce_z),
            "loss_recovered_mean": metrics.loss_recovered(c_clean, ce_s, ce_m),
            "delta_ce": ce_s - c_clean,
            "kl": kl_sum / n_scored,
            "acc_clean": acc_clean / n_scored,
            "acc_spliced": correct / n_scored,
            "l0": l0,
            "fvu": fvu,
            "dead_frac": dead,
            "dead_window_tokens": int(window),  # dead: not fired in these eval tokens (metrics.dead_note)
        }

    rows = []
    for t, st, g, m in zip(targets, per, outs, modes or []):
        r = row(st.ce_spliced / n_scored, ce_zero[g] / n_scored, ce_mean[g] / n_scored, st.kl, st.correct,
                _ratio(st.l0_sum, st.rows), st.fvu_mean(), metrics.dead_fraction(st.fires), st.rows)
        rows.append({"dict": t.name, "hook": g[0], "hooks": list(g), "in_hooks": [h.name for h in t.reads], "mode": m, **r,
                     "fvu_per_hook": st.fvu_per_hook()})

    all_row = None
    if multi:
        fires = torch.cat([st.fires for st in together])
        all_row = row(all_ce["spliced"] / n_scored, all_ce["zero"] / n_scored, all_ce["mean"] / n_scored, all_ce["kl"],
                      all_ce["correct"], sum(_ratio(st.l0_sum, st.rows) for st in together),
                      float(np.mean([st.fvu_mean() for st in together])), metrics.dead_fraction(fires),
                      max(st.rows for st in together))
        all_row |= {"hooks": hooks, "mode": modes[0] if len(set(modes)) == 1 else "mixed",
                    "fvu_per_hook": {h: v for st in together for h, v in st.fvu_per_hook().items()}}
    elif len(targets) == 1:  # one dictionary: "all at once" is the same run
        all_row = {k: rows[0][k] for k in (*METRIC_KEYS, "hooks", "mode", "fvu_per_hook")}

    return {
        "dictionaries": rows,
        "all": all_row,
        "clean": {"ce": c_clean, "acc": acc_clean / n_scored},
        "eval": {
            "sequences": int(tokens.shape[0]),
            "tokens": n_tokens_total,
            "scored_positions": n_scored,
            "splice_bos": splice_bos,
            "input": mode,
            "restart_from_cache": bool(runner.fast),
        },
    }


def splice_eval(cfg: SpliceConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Load the model, dictionaries and evaluation tokens named by `cfg`, evaluate, write --json / the sweep frontier.

    Returns the result dict (see `evaluate`), with "model" and "source" added, and
    "frontier" {"png", "csv"} when `cfg.sweep` is set.
    """
    from saekit.interop import load as load_dictionary

    outdir.check_file_out(cfg.json_out, "--json")  # before the evaluation, not after it
    if cfg.finetuned:
        raise SaekitError("--finetuned folders are evaluated by saekit.inmodel.report.finetuned_eval (the CLI dispatches it)")
    paths = [Path(p) for p in cfg.dicts]
    if cfg.sweep:
        paths += [p for p in sweep_dictionaries(cfg.sweep) if p not in paths]
    if not paths:
        raise SaekitError("no dictionaries given; pass --dict DIR (repeatable) or --sweep DIR")
    if not cfg.data and not cfg.store:
        raise SaekitError("no evaluation tokens given; pass --data FILE (held-out text) or --store DIR (uses its eval split)")
    for p in paths:
        if not p.exists():
            raise SaekitError(f"dictionary folder {p} does not exist; pass the folder `saekit train` wrote")
    dictionaries = [load_dictionary(p, device=cfg.device) for p in paths]

    store = None
    if cfg.store:
        from saekit.store import ActivationStore, require_tokens

        store = ActivationStore(cfg.store)
        require_tokens(store.manifest, cfg.store, "splice-eval")
    model_name = cfg.model
    if not model_name:
        recorded = store.model.to_dict() if store is not None else (dictionaries[0].prov.model or {})
        model_name = recorded.get("name") or ""
        if not model_name:
            raise SaekitError("no model given and the dictionaries do not record one; pass --model NAME")
    model = load_model(model_name, compat=cfg.compat, device=cfg.device)
    if store is not None:
        check_model(f"store {cfg.store}", store.model.to_dict(), model.info)
    targets = [resolve_target(str(p), d, model) for p, d in zip(paths, dictionaries)]

    hooks = list(dict.fromkeys(h.name for t in targets for h in t.writes))  # ablated for the baselines
    if store is not None:
        tokens = store_tokens(store, cfg.max_tokens)
        if tokens.numel() == 0:
            raise SaekitError(f"no evaluation tokens: store {cfg.store} has an empty eval split; harvest with --holdout > 0 or pass --data FILE")
        means = {h: torch.as_tensor(np.asarray(store.stats(h)["mean"]), dtype=torch.float32) for h in hooks if h in store.hooks}
        for h, m in means.items():
            if m.numel() != store.hook_width(h) or m.numel() != next(o.width for t in targets for o in t.writes if o.name == h):
                raise SaekitError(f"store {cfg.store} has width {m.numel()} for {h} but the model's hook has another; use a store harvested from this model")
        source = {"store": str(cfg.store), "split": "eval"}
    else:
        tokens = text_tokens(cfg, model)
        if tokens.numel() == 0:
            raise SaekitError(f"no evaluation tokens: {cfg.data} holds no non-empty documents; pass a file with text")
        means = {}
        source = {"data": str(cfg.data)}
    missing = [h for h in hooks if h not in means]
    if missing:  # not in the store (or text input): the mean over the evaluation tokens themselves
        means.update(mean_activations(model, tokens, missing, cfg.batch_size))

    result = evaluate(model, targets, tokens, means, splice_bos=cfg.splice_bos, batch_size=cfg.batch_size, mode=cfg.input,
                      progress=progress)
    result["model"] = model.info.to_dict()
    result["source"] = source
    if cfg.sweep:
        png, csv_path = write_frontier(result, cfg.sweep)
        result["frontier"] = {"png": str(png), "csv": str(csv_path)}
    if cfg.json_out:
        runs.write_text(cfg.json_out, json.dumps(_clean_json(result), indent=2) + "\n")
    return result


# --- output ------------------------------------------------------------------------------------

def frontier_points(rows: list[dict], key: str = "loss_recovered_mean") -> list[dict]:
    """The Pareto frontier: rows no other row beats on both L0 (lower) and `key` (higher), by L0."""
    good = [r for r in rows if r.get(key) is not None and math.isfinite(r[key]) and math.isfinite(r["l0"])]
    good.sort(key=lambda r: (r["l0"], -r[key]))
    out, best = [], -math.inf
    for r in good:
        if r[key] > best:
            out.append(r)
            best = r[key]
    return out


CSV_FIELDS = ("dict", "hook", "l0", "loss_recovered_mean", "loss_recovered_zero", "delta_ce", "kl", "fvu", "dead_frac",
              "ce_clean", "ce_spliced", "acc_spliced", "on_frontier")


def write_frontier(result: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """frontier.csv (every dictionary, by L0, frontier marked) and frontier.png (L0 vs loss recovered) in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    rows = sorted(result["dictionaries"], key=lambda r: r["l0"])
    front = {id(r) for r in frontier_points(rows)}
    csv_path = out / "frontier.csv"
    with runs.atomic(csv_path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "on_frontier": id(r) in front})

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = (("loss_recovered_mean", "o", "C0", "vs mean-ablation"), ("loss_recovered_zero", "^", "C1", "vs zero-ablation"))
    for key, marker, color, label in series:
        pts = [(r["l0"], r[key]) for r in rows if r[key] is not None and math.isfinite(r[key])]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, alpha=0.6, label=f"loss recovered {label}")
        fr = frontier_points(rows, key)  # the line joins the frontier: nothing else is both sparser and better
        if len(fr) > 1:
            ax.plot([r["l0"] for r in fr], [r[key] for r in fr], color=color, lw=1)
    l0s = [r["l0"] for r in rows if r["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("loss recovered")
    ax.set_title(f"L0 vs loss recovered ({len(rows)} dictionaries)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png = out / "frontier.png"
    with runs.atomic(png) as tmp_png:
        fig.savefig(tmp_png, dpi=120)
    plt.close(fig)
    return png, csv_path


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def short_names(paths: list[str]) -> list[str]:
    """Dictionary folders relative to their common parent, for tables (the JSON keeps full paths)."""
    if len(paths) == 1:
        return [Path(paths[0]).name]
    common = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.relpath(os.path.abspath(p), common) for p in paths]


def _dead_header(result: dict) -> str:
    windows = {r.get("dead_window_tokens") for r in result["dictionaries"]}
    return f"dead ({metrics.dead_window(windows.pop(), 'eval')})" if len(windows) == 1 and None not in windows else "dead"


def format_table(result: dict):
    """A rich Table: one row per dictionary, then all at once."""
    from rich.table import Table

    t = Table(title="splice-eval: CE in nats per token, loss recovered vs zero / mean ablation", title_justify="left")
    for name, just in (("dictionary", "left"), ("hook", "left"), ("CE clean", "right"), ("CE spliced", "right"),
                       ("CE zero", "right"), ("CE mean", "right"), ("rec. zero", "right"), ("rec. mean", "right"),
                       ("ΔCE", "right"), ("KL", "right"), ("acc clean→spliced", "right"), ("L0", "right"),
                       ("FVU", "right"), (_dead_header(result), "right")):
        t.add_column(name, justify=just)

    def cells(r):
        return [_fmt(r["ce_clean"]), _fmt(r["ce_spliced"]), _fmt(r["ce_zero"]), _fmt(r["ce_mean"]),
                _fmt(r["loss_recovered_zero"]), _fmt(r["loss_recovered_mean"]), _fmt(r["delta_ce"], 4), _fmt(r["kl"], 4),
                f"{_fmt(r['acc_clean'])}→{_fmt(r['acc_spliced'])}", _fmt(r["l0"], 1), _fmt(r["fvu"]), _fmt(r["dead_frac"])]

    for r, name in zip(result["dictionaries"], short_names([r["dict"] for r in result["dictionaries"]])):
        t.add_row(name, hooks_label(r), *cells(r))
    if result.get("all") is not None and len(result["dictionaries"]) > 1:
        t.add_section()
        t.add_row("all at once", "", *cells(result["all"]))
    elif len(result["dictionaries"]) > 1:
        t.caption = "all at once: not run, two dictionaries replace the same hook"
    modes = {r.get("mode") for r in result["dictionaries"] if r.get("in_hooks", [r["hook"]]) != r.get("hooks", [r["hook"]])}
    if modes:  # transcoders, crosscoders, CLTs: say where their inputs came from
        note = "inputs from the " + " and ".join(f"{m} pass" for m in sorted(modes, key=str)) + " (--input; crosscoders: clean)"
        t.caption = f"{t.caption}; {note}" if t.caption else note
    return t


def hooks_label(r: dict) -> str:
    """A row's hooks for tables: the hook (SAE), `IN → OUT` (transcoder), or first…last (n hooks)."""
    ins, outs = r.get("in_hooks", [r["hook"]]), r.get("hooks", [r["hook"]])
    if ins == outs:
        return outs[0] if len(outs) == 1 else f"{outs[0]}…{outs[-1]} ({len(outs)} hooks)"
    if len(ins) == 1 and len(outs) == 1:
        return f"{ins[0]} → {outs[0]}"
    return f"{ins[0]}…{ins[-1]} → {outs[0]}…{outs[-1]} ({len(outs)} out hooks)"
