"""`saekit analyze`: read a store once through a dictionary and write what each feature means.

Outputs in `--out` (format `saekit-analysis` v1; nothing is pickled):
- `stats.safetensors`: the per-feature tensors of `StatsResult` plus logit effects;
- `features.json`: ids, flags (dead, dense), token strings, and per feature its numbers,
  histogram, top contexts, contexts sampled across its activation quartiles, logit effects,
  nearest features by decoder cosine and, on the toy model, the FSM state it tracks —
  what the dashboard and notebooks read;
- `dashboard.html`: the self-contained dashboard (`saekit.analysis.dashboard`);
- `density.png`: histogram of log10 feature frequency;
- `neuronpedia/batch-N.json`: the features in Neuronpedia's upload layout (`saekit.analysis.neuronpedia`);
- `feature_table.md` / `feature_table.html`: per feature an offline explanation (the token
  rule that best predicts its firing, `saekit.analysis.explain`), its precision, recall and
  F1 as a detector on held-out text, and example activations with the firing token marked.
Every file is written under a temporary name and renamed, so an interrupted run never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saekit.analysis.explain import ExplainPass, share_explained
from saekit.analysis.ids import feature_ids
from saekit.analysis.multihook import check_hooks_in_store, decoder_matrix, encode_rows, in_hooks, is_single, out_directions, out_hooks
from saekit import metrics, outdir
from saekit.analysis.stats import FeatureStats, StatsResult, decoder_neighbours, logit_effects
from saekit.errors import SaekitError
from saekit.models import check_model, hook_layer
from saekit.runs import atomic
from saekit.tokens import PAD

FORMAT = "saekit-analysis"
VERSION = 1
# Dense codes for one batch are (n_seq, ctx, d_dict) floats; keep that near this many elements.
BATCH_ELEMENTS = 1 << 24


@dataclass
class AnalyzeConfig:
    """What `saekit analyze` reads and writes."""

    dict: str = ""
    """Dictionary folder (config.json + weights.safetensors)."""
    store: str = ""
    """Activation store folder harvested at the dictionary's hook."""
    out: str = ""
    """Output folder for stats.safetensors, features.json, dashboard.html, density.png."""
    split: str = "all"
    """Which sequences of the store to read: all, train or eval."""
    tokens: int | None = None
    """Stop after this many counted tokens (default: the whole split)."""
    top_n: int = 20
    """Top activating contexts kept per feature."""
    samples: int = 20
    """Contexts drawn at random among each feature's firings, shown grouped by activation quartile (0: none)."""
    neighbours: int = 5
    """Nearest other features by decoder cosine listed per feature."""
    window: int = 8
    """Tokens shown on each side of a context's firing token."""
    bins: int = 32
    """Bins of each feature's activation histogram."""
    n_logits: int = 10
    """Promoted and suppressed tokens listed per feature."""
    logits: bool = True
    """Compute logit effects (loads the model for its unembedding)."""
    model: str | None = None
    """Model to take the unembedding and tokenizer from (default: the store's model)."""
    dense_threshold: float = 0.1
    """Features firing on more than this share of tokens are flagged dense."""
    batch_seqs: int | None = None
    """Sequences per batch (default: sized so a batch's dense codes stay near 16M numbers)."""
    device: str = "auto"
    """Device for encoding: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    explain: bool = True
    """Explain each feature by a token rule searched on the train split and scored on the eval split."""
    explain_terms: int = 6
    """Most tokens / bigrams in one explanation."""

    def __post_init__(self):
        if self.split not in ("all", "train", "eval"):
            raise ValueError(f"split {self.split!r} is not all, train or eval")
        if self.samples < 0 or self.neighbours < 0:
            raise ValueError("samples and neighbours must be >= 0")
        if self.top_n < 1 or self.bins < 1 or self.window < 0 or self.n_logits < 1:
            raise ValueError("top_n, bins and n_logits must be >= 1 and window >= 0")
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold={self.dense_threshold} must be in (0, 1]")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("tokens must be >= 1 when given")
        if self.explain_terms < 1:
            raise ValueError("explain_terms must be >= 1")


def check_match(d, store) -> str:
    """Refuse a dictionary that was not trained for this store's model and hooks; returns the (first) hook it reads.

    A transcoder, crosscoder or CLT is read at its in hooks (`multihook`), all of which the store must hold.
    """
    hook = d.prov.hook
    if not hook:
        raise SaekitError("the dictionary records no hook; it cannot be matched to a store (retrain or re-export it with saekit)")
    if not is_single(d):
        check_model("the dictionary", d.prov.model, store.model, against=f"store {store.path}'s model",
                    fix="use a store harvested from the dictionary's model with the same --compat setting")
        return check_hooks_in_store(d, store)[0]
    if hook not in store.hooks:
        raise SaekitError(f"the dictionary is for hook {hook}, but the store has only {', '.join(store.hooks)}; harvest {hook} or pass the matching store")
    width = store.hook_width(hook)
    if width != d.cfg.d_in:
        raise SaekitError(f"the dictionary expects width {d.cfg.d_in} at {hook}, the store has {width}; they come from different models")
    check_model("the dictionary", d.prov.model, store.model, against=f"store {store.path}'s model",
                fix="use a store harvested from the dictionary's model with the same --compat setting")
    return hook


def residual_directions(bridge, hook: str, dirs: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Map decoder directions at `hook` into the residual stream, or say why not.

    Residual-stream hooks and block outputs (resid_pre/mid/post, attn_out, mlp_out) are
    already in it.  `attn.hook_z` (heads flattened) reaches it through each head's W_O and
    `mlp.hook_post` through W_out, both linear, so the direction is carried through them
    (biases do not depend on the feature and are left out).  Anything else (queries, keys,
    attention patterns, pre-activations) acts on the logits only through non-linear
    paths, so no direct logit effect is reported.
    """
    cfg = bridge.cfg
    layer = hook_layer(hook)
    d_in = dirs.shape[1]
    last = hook.split(".")[-1]
    if last in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out") or hook in ("hook_embed", "hook_pos_embed"):
        if d_in == cfg.d_model:
            return dirs, "direction @ W_U (the hook writes to the residual stream)"
    if hook.endswith("attn.hook_z") and layer >= 0:
        W_O = bridge.W_O[layer].detach().float()  # (n_heads, d_head, d_model)
        if W_O.shape[0] * W_O.shape[1] == d_in:
            return torch.einsum("fhe,hem->fm", dirs.reshape(dirs.shape[0], W_O.shape[0], W_O.shape[1]), W_O), "direction @ W_O @ W_U (through each head's output matrix)"
    if hook.endswith("mlp.hook_post") and layer >= 0:
        W_out = bridge.W_out[layer].detach().float()  # (d_mlp, d_model)
        if W_out.shape[0] == d_in:
            return dirs @ W_out, "direction @ W_out @ W_U (through the MLP's output matrix)"
    return None, f"no logit effects: {hook} reaches the logits only through non-linear paths"


STREAM = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
"""Hooks that are the residual stream itself (a later one already contains an earlier one's content)."""


def _stream_order(h: str) -> tuple[int, int]:
    return hook_layer(h), STREAM.index(h.split(".")[-1])


def logit_directions(bridge, d, indices: list[int] | None = None) -> tuple[torch.Tensor | None, str]:
    """Each latent's direct write into the residual stream (n, d_model), or None and why not.

    An SAE: its direction at its hook (`analyze.residual_directions`).  A dictionary writing
    several hooks that write to the residual stream (a CLT's MLP outputs): the sum of its
    directions there, each carried into the stream.  Several residual-stream hooks (a
    crosscoder over resid_post): the direction at the last one, which the unembedding reads.
    """
    if is_single(d):
        dirs = d.directions().detach().float().cpu()
        return residual_directions(bridge, d.prov.hook, dirs if indices is None else dirs[indices])
    outs = out_hooks(d)
    stream = [h for h in outs if h.split(".")[-1] in STREAM]
    writes = [h for h in outs if h not in stream]
    if stream and writes:
        return None, f"no logit effects: the out hooks mix residual-stream hooks ({', '.join(stream)}) and hooks that write to it"
    use = [max(stream, key=_stream_order)] if stream else writes
    parts = []
    for _, dirs in out_directions(d, indices):
        total = None
        for h in use:
            r, note = residual_directions(bridge, h, dirs[h])
            if r is None:
                return None, note
            total = r if total is None else total + r
        parts.append(total)
    how = (f"direction at {use[0]} (the last residual-stream hook it writes) @ W_U" if stream else
           f"direction @ W_U summed over the hooks it writes ({', '.join(use)})" if len(use) > 1 else
           f"direction at {use[0]} @ W_U")
    return torch.cat(parts), how


def final_ln_weight(bridge, compat: bool) -> torch.Tensor | None:
    """The final LayerNorm's weight, or None when compatibility mode folded it into W_U."""
    if compat:
        return None
    for name, p in bridge.ln_final.named_parameters():
        if name.endswith("weight"):
            return p.detach().float()
    return None


def _stats_to_tensors(res: StatsResult) -> dict[str, torch.Tensor]:
    return {
        "count": res.count, "act_sum": res.act_sum, "act_max": res.act_max, "hist": res.hist,
        "hist_max": res.hist_max, "top_values": res.top_values, "top_seq": res.top_seq, "top_pos": res.top_pos,
        "window_tokens": res.window_tokens, "window_acts": res.window_acts,
        "n_rows": torch.tensor([res.n_rows], dtype=torch.int64),
    }


def _r(x: float) -> float:
    """Round to 4 significant digits, to keep the JSON small."""
    if x == 0 or not math.isfinite(x):
        return 0.0 if not math.isfinite(x) else x
    return float(f"{x:.4g}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def run_pass(d, store, hook: str, cfg: AnalyzeConfig, progress: Callable[[int, int], None] | None = None,
             fsm=None, explain: ExplainPass | None = None) -> StatsResult | tuple[StatsResult, object]:
    """The one streaming pass: encode every counted position and feed `FeatureStats` (and `explain`).

    The codes come from the dictionary's in hooks (`hook` for an SAE; a transcoder's MLP input).

    With `fsm` (a toy store), also count each feature's firings against "state s was just
    completed" (`saekit.toy.eval.Counts`) and return (stats, counts).
    """
    rng = store.split(cfg.split)
    n_total = len(rng)
    if n_total == 0 or store.n_tokens == 0:
        raise SaekitError(f"the store's {cfg.split} split is empty; harvest more tokens or choose --split all")
    d_dict = int(d.cfg.d_dict)
    ctx = store.context_size
    batch = cfg.batch_seqs or max(1, min(256, BATCH_ELEMENTS // max(1, ctx * d_dict)))
    acc = FeatureStats(d_dict, top_n=cfg.top_n, window=cfg.window, bins=cfg.bins, samples=cfg.samples)
    counts = None
    if fsm is not None:
        from saekit.toy.eval import Counts

        counts = Counts.zeros(d_dict, fsm.n_states)
    done = 0
    hooks = [hook] if is_single(d) else in_hooks(d)
    for start, raw_tokens, acts in store.iter_sequences(hooks, cfg.split, batch):
        mask = torch.as_tensor(np.asarray(store.row_mask(raw_tokens))).bool()
        tokens = torch.as_tensor(np.asarray(raw_tokens))
        n, t = mask.shape
        codes = torch.zeros(n, t, d_dict)
        if mask.any():
            codes[mask] = encode_rows(d, {h: torch.as_tensor(acts[h])[mask] for h in hooks}).float().cpu()
        if cfg.tokens is not None and acc.n_rows + int(mask.sum()) > cfg.tokens:
            # Cut the batch at the token budget, counting rows in order.
            keep = cfg.tokens - acc.n_rows
            flat = mask.reshape(-1).clone()
            idx = flat.nonzero().squeeze(1)
            flat[idx[keep:]] = False
            mask = flat.reshape(n, t)
        acc.update(codes, tokens, mask, start)
        if explain is not None:
            explain.update(codes, tokens, mask, start)
        if counts is not None:
            from saekit.toy.fsm import labels_from_tokens

            lab = labels_from_tokens(fsm, np.asarray(raw_tokens))
            state = torch.as_tensor(np.where(lab.complete, lab.state, -1))[mask]
            counts.update(codes[mask] != 0, state)
        done += n
        if progress:
            progress(done, n_total)
        if cfg.tokens is not None and acc.n_rows >= cfg.tokens:
            break
    if acc.n_rows == 0:
        raise SaekitError("the store has no counted tokens in this split (only padding/BOS); harvest longer documents")
    return acc.result() if counts is None else (acc.result(), counts)


def store_fsm_or_none(store):
    """The FSM of a toy store harvested one walk per sequence, else None (any other store)."""
    from saekit.toy.fsm import load_fsm

    if ((store.manifest.get("text") or {}).get("packing")) != "doc":
        return None
    try:
        return load_fsm(store.model.name)
    except SaekitError:
        return None


def fsm_states(counts) -> tuple[list[int], list[float], list[float], list[float]]:
    """Each feature's best state by F1 of its firing against "state s was just completed" (−1 when it never
    fired), with that F1, its precision (share of the feature's firings that are s's completion) and recall."""
    tp, fired, pos = counts.tp, counts.fired, counts.pos
    f1 = 2 * tp / (fired[:, None] + pos[None, :]).clamp_min(1e-300)  # (d, n_states)
    best_f1, best = f1.max(1)
    tp_best = tp.gather(1, best[:, None]).squeeze(1)
    precision = tp_best / fired.clamp_min(1)
    recall = tp_best / pos[best].clamp_min(1)
    best = torch.where(fired > 0, best, torch.full_like(best, -1))
    return best.tolist(), best_f1.tolist(), precision.tolist(), recall.tolist()


def analyze(cfg: AnalyzeConfig, progress: Callable[[int, int], None] | None = None) -> Path:
    """Run the pass, compute logit effects, write all outputs; returns the output folder."""
    if not cfg.dict or not cfg.store or not cfg.out:
        raise SaekitError("analyze needs --dict DIR --store DIR --out DIR")
    if not Path(cfg.store).is_dir():
        raise SaekitError(f"store {cfg.store} does not exist; run `saekit harvest` first or fix --store")
    with outdir.claim(cfg.out, "analyze"):
        return _analyze(cfg, progress)


def _analyze(cfg: AnalyzeConfig, progress: Callable[[int, int], None] | None) -> Path:
    from saekit.interop import load as load_dict
    from saekit.store import ActivationStore, require_tokens

    d = load_dict(cfg.dict, device=cfg.device)
    store = ActivationStore(cfg.store)
    require_tokens(store.manifest, cfg.store, "analyze (top contexts, logit effects)")
    hook = check_match(d, store)
    fsm = store_fsm_or_none(store)
    eval_rng = store.split("eval")
    # Explanations need text of both splits: built on train sequences, scored on eval ones.
    can_explain = cfg.explain and cfg.split == "all" and len(eval_rng) > 0 and len(store.split("train")) > 0
    ex = ExplainPass(int(d.cfg.d_dict), eval_rng.start) if can_explain else None
    res = run_pass(d, store, hook, cfg, progress, fsm=fsm, explain=ex)
    states = None
    if fsm is not None:
        res, counts = res
        states = fsm_states(counts)

    model_name = cfg.model or store.model.name
    from saekit.models import load_model

    loaded = load_model(model_name, compat=bool(store.model.compat))
    logit = None
    note = "logit effects not computed (--no-logits)"
    if cfg.logits:
        resid, note = logit_directions(loaded.bridge, d)  # through the decoder into the out hooks
        if resid is not None:
            W_U = loaded.bridge.W_U.detach().float().cpu()
            logit = logit_effects(resid, W_U, gamma=final_ln_weight(loaded.bridge, bool(store.model.compat)), n=cfg.n_logits)
    dec = decoder_matrix(d) if cfg.neighbours else None
    neigh = decoder_neighbours(dec, cfg.neighbours) if dec is not None else None
    meta = build_features_json(d, res, logit, loaded.tokenizer, cfg, hook, note, neighbours=neigh, states=states,
                               model=store.model.name)
    if ex is not None:
        add_explanations(meta, ex, loaded.tokenizer, cfg)
    elif cfg.explain:
        meta["explain_note"] = "no explanations: they are built on the train split and scored on the eval split, so run with --split all on a store with both"

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _stats_to_tensors(res)
    if logit is not None:
        tensors |= dict(zip(("promote_ids", "promote_vals", "suppress_ids", "suppress_vals"), logit))
    with atomic(out / "stats.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    _atomic_write_bytes(out / "features.json", json.dumps(meta).encode())
    from saekit.analysis.dashboard import density_plot, render_dashboard

    _atomic_write_bytes(out / "dashboard.html", render_dashboard(meta).encode())
    density_plot(meta, out / "density.png")
    from saekit.analysis.neuronpedia import write_neuronpedia

    write_neuronpedia(meta, out / "neuronpedia")
    if ex is not None:
        from saekit.analysis.table import feature_table_html, feature_table_md

        _atomic_write_bytes(out / "feature_table.md", feature_table_md(meta).encode())
        _atomic_write_bytes(out / "feature_table.html", feature_table_html(meta).encode())
    return out


def add_explanations(meta: dict, ex: ExplainPass, tokenizer, cfg: AnalyzeConfig) -> None:
    """Put each feature's explanation and held-out detection score into features.json's records."""
    expls = ex.explain(lambda t: tokenizer.decode([t]), max_terms=cfg.explain_terms)
    for f, e in zip(meta["features"], expls):
        f["explanation"] = {
            "text": e.text, "terms": [[t.prev, t.token] for t in e.terms],
            "precision": _r(e.heldout.precision), "recall": _r(e.heldout.recall), "f1": _r(e.heldout.f1),
            "heldout_fires": e.heldout.fires, "build_f1": _r(e.build.f1),
        }
    share = share_explained(expls, 0.5)
    meta["explained_f1_ge_0.5"] = None if math.isnan(share) else _r(share)
    meta["explain_note"] = ("token rules searched on the store's train split, scored as detectors on its eval split "
                            "(precision, recall, F1 over held-out positions)")


def _context(toks: list[int], acts: list[float], value: float, seq: int, pos: int, window: int) -> dict:
    keep = [k for k, t in enumerate(toks) if t != PAD]
    return {"seq": seq, "pos": pos, "value": _r(value), "center": window - keep[0] if keep else 0,
            "tokens": [toks[k] for k in keep], "acts": [_r(acts[k]) for k in keep]}


def quartile_groups(samples: list[dict], n_groups: int = 4) -> list[dict]:
    """Sampled contexts split by activation quantile: [{lo, hi, share, contexts}], highest group first.

    The sample is uniform over the feature's firings, so its quantiles estimate the
    feature's; `share` is the fraction of the sample in the group (SAEDashboard's intervals).
    """
    if not samples:
        return []
    ordered = sorted(samples, key=lambda c: c["value"])
    n = len(ordered)
    groups = []
    for g in range(n_groups):
        part = ordered[g * n // n_groups : (g + 1) * n // n_groups]
        if part:
            groups.append({"quantile": [g / n_groups, (g + 1) / n_groups], "lo": part[0]["value"], "hi": part[-1]["value"],
                           "share": _r(len(part) / n), "contexts": part[::-1]})
    return groups[::-1]


def build_features_json(d, res: StatsResult, logit, tokenizer, cfg: AnalyzeConfig, hook: str, logit_note: str,
                        neighbours=None, states=None, model: str | None = None) -> dict:
    """Everything a reader of the features needs, as plain JSON (token ids with a string table)."""
    ids = feature_ids(d)
    freq = res.frequency.tolist()
    mean = res.act_mean.tolist()
    used: set[int] = set(int(t) for t in res.window_tokens.unique().tolist() if t != PAD)
    if res.sample_tokens is not None:
        used |= set(int(t) for t in res.sample_tokens.unique().tolist() if t != PAD)
    if logit is not None:
        used |= set(logit[0].unique().tolist()) | set(logit[2].unique().tolist())
    vocab = {str(t): tokenizer.decode([t]) for t in sorted(used)}
    feats = []
    for i, fid in enumerate(ids):
        ctxs = []
        for j in range(res.top_values.shape[1]):
            if res.top_seq[i, j] < 0:
                break
            ctxs.append(_context(res.window_tokens[i, j].tolist(), res.window_acts[i, j].tolist(), float(res.top_values[i, j]),
                                 int(res.top_seq[i, j]), int(res.top_pos[i, j]), cfg.window))
        sampled = []
        if res.sample_seq is not None:
            for j in range(res.sample_seq.shape[1]):
                if res.sample_seq[i, j] >= 0:
                    sampled.append(_context(res.sample_tokens[i, j].tolist(), res.sample_acts[i, j].tolist(),
                                            float(res.sample_values[i, j]), int(res.sample_seq[i, j]), int(res.sample_pos[i, j]), cfg.window))
        f = {
            "id": fid, "index": i, "frequency": _r(freq[i]), "count": int(res.count[i]), "mean": _r(mean[i]),
            "max": _r(float(res.act_max[i])), "hist": res.hist[i].tolist(), "hist_max": _r(float(res.hist_max[i])),
            "contexts": ctxs, "quantiles": quartile_groups(sampled),
        }
        if neighbours is not None:
            f["neighbours"] = [[int(k), _r(float(v))] for k, v in zip(neighbours[0][i].tolist(), neighbours[1][i].tolist())]
        if states is not None:
            f["fsm_state"], f["fsm_f1"] = int(states[0][i]), _r(float(states[1][i]))
            f["fsm_precision"], f["fsm_recall"] = _r(float(states[2][i])), _r(float(states[3][i]))
        if logit is not None:
            f["promotes"] = [[int(t), _r(float(v))] for t, v in zip(logit[0][i].tolist(), logit[1][i].tolist())]
            f["suppresses"] = [[int(t), _r(float(v))] for t, v in zip(logit[2][i].tolist(), logit[3][i].tolist())]
        feats.append(f)
    dead = [ids[i] for i in range(len(ids)) if res.count[i] == 0]
    dense = [ids[i] for i in range(len(ids)) if freq[i] > cfg.dense_threshold]
    return {
        "format": FORMAT, "version": VERSION, "dictionary": str(cfg.dict), "store": str(cfg.store), "split": cfg.split,
        "hook": hook, "in_hooks": in_hooks(d) if d.prov.hook else [hook], "out_hooks": out_hooks(d) if d.prov.hook else [hook],
        "layer": hook_layer(hook), "kind": d.cfg.kind, "d_dict": int(d.cfg.d_dict), "groups": int(d.cfg.groups),
        "n_rows": res.n_rows, "top_n": cfg.top_n, "window": cfg.window, "dense_threshold": cfg.dense_threshold,
        "logit_note": logit_note, "dead": dead, "dense": dense, "vocab": vocab, "features": feats,
        "dead_window_tokens": res.n_rows, "dead_window": metrics.dead_window(res.n_rows, "analysed"),  # dead: not fired in these tokens
        "model": model, "fsm": states is not None,
    }


@dataclass
class Analysis:
    """A loaded `saekit analyze` output: `meta` (features.json) and `tensors` (stats.safetensors)."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    def feature(self, fid: str) -> dict:
        """One feature's JSON record by id (e.g. '1.42' or '1.0.7')."""
        for f in self.meta["features"]:
            if f["id"] == fid:
                return f
        raise SaekitError(f"no feature {fid!r} in this analysis; ids run from {self.meta['features'][0]['id']} to {self.meta['features'][-1]['id']}")

    def context_text(self, fid: str, j: int = 0) -> str:
        """Context j of a feature as text, the firing token in [[brackets]]."""
        c = self.feature(fid)["contexts"][j]
        v = self.meta["vocab"]
        return "".join(f"[[{v[str(t)]}]]" if k == c["center"] else v[str(t)] for k, t in enumerate(c["tokens"]))


def load_analysis(path: str | os.PathLike) -> Analysis:
    """Load an analysis folder (JSON + safetensors; nothing is executed)."""
    p = Path(path)
    if not (p / "features.json").is_file() or not (p / "stats.safetensors").is_file():
        raise SaekitError(f"{p} is not a saekit analysis folder (expected features.json and stats.safetensors); run `saekit analyze`")
    meta = json.loads((p / "features.json").read_text())
    if meta.get("format") != FORMAT:
        raise SaekitError(f"{p / 'features.json'} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return Analysis(meta=meta, tensors=load_file(str(p / "stats.safetensors")))
