"""Steering: generate with chosen features switched on at the dictionary's hook.

SAE features: the decoder direction (in the hook's own scale) times `strength` is added to
the activation at every position, prompt and generated tokens alike:

    x' = x + strength · Σ_i d_i

Codebook codes are *forced on*, as the topic codes of Codebook Features (§5, steering):
the code's coefficient is set to `strength` (1 = chosen like any other code) in the
codes the codebook computes for x, and the activation moves by the change in the
reconstruction, which is linear in the codes:

    c' = c with c_i ← strength for forced i;   x' = x + (c' − c) · W_dec

so a code that was already chosen is not added twice, and the part of x the codebook does
not explain is kept.

A transcoder, crosscoder or CLT latent writes through its decoder at its out hooks (a
transcoder's MLP output), so steering adds `strength` × its direction at every out hook
(`multihook.hook_deltas`): what the latent firing with that activation writes.  Steered and unsteered generations share a seed, so with
`--samples N` they are paired draws that differ only by the intervention; `--match REGEX`
reports the share of each that matches (the talk's topic-steering success rate).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from saekit.analysis.ids import feature_id, parse_feature_ids
from saekit.errors import SaekitError


@dataclass
class SteerConfig:
    """What `saekit steer` generates."""

    dict: str = ""
    """Dictionary folder whose features are switched on."""
    feature: list[str] = field(default_factory=list)
    """Feature ids to switch on, comma-separated (layer.feature for SAEs, layer.group.code for codebooks)."""
    prompt: str = ""
    """Text the generations continue."""
    model: str | None = None
    """Model to generate with (default: the one the dictionary was trained on)."""
    strength: float = 4.0
    """SAE: multiple of the decoder direction added; codebook: the forced codes' coefficient (1 = chosen)."""
    samples: int = 1
    """Generations per arm (steered and unsteered), paired by seed."""
    match: str | None = None
    """Regular expression; report how many steered vs unsteered continuations match it."""
    max_new_tokens: int = 40
    """Tokens generated after the prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    seed: int = 0
    """Seed of the sampling; the same for both arms."""
    device: str = "auto"
    """Device for the model: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    topic: str | None = None
    """Topic steering: a regular expression over text (a word list as \\b(w1|w2)\\b); the features that best detect it are found on --store and switched on."""
    store: str | None = None
    """Topic steering: store at the dictionary's hook; its train split finds the features, its eval split gives the prompts."""
    n_features: int = 1
    """Topic steering: how many of the best-matching features are switched on together."""
    n_prompts: int = 10
    """Topic steering: prompts cut from held-out sequences that do not continue on topic (each run --samples times)."""
    prompt_tokens: int = 16
    """Topic steering: tokens of each prompt."""
    max_tokens: int = 200_000
    """Topic steering: store tokens read to score the features."""
    codebook_model: str | None = None
    """A `saekit finetune --out` folder (or the shipped toy-codebooks / toy-paper): force --feature codes of its codebook --dict with ALL its codebooks active (toy)."""
    state: int | None = None
    """Codebook model (toy): force the codes state S has at every --sites codebook instead of --dict/--feature codes."""
    sites: str = "all"
    """Codebook model with --state: the codebooks forced: attn[L], mlp[L], attn, mlp, all or a hook, joined with '+'."""
    positions: str = "state"
    """Codebook model with --state: state (every digit of every state reads as following S) or final (each state's last digit gets S's codes)."""
    topic_lead: int = 0
    """Topic steering: score features against the topic appearing within the next N tokens (0: on its own tokens); features that predict a word can steer towards it where features of the word itself continue after it."""

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("samples and max_new_tokens must be >= 1")
        if min(self.n_features, self.n_prompts, self.prompt_tokens, self.max_tokens) < 1:
            raise ValueError("n_features, n_prompts, prompt_tokens and max_tokens must be >= 1")
        if self.positions not in ("state", "final"):
            raise ValueError(f"positions {self.positions!r} is not state or final")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")


@dataclass
class SteerResult:
    """Paired generations and, with a pattern, the match rates."""

    prompt: str
    features: list[str]
    strength: float
    steered: list[str]
    """Continuations (prompt excluded) with the features on."""
    unsteered: list[str]
    """Continuations from the same seeds without them."""
    match: str | None = None
    steered_rate: float | None = None
    """Share of steered continuations matching `match`."""
    unsteered_rate: float | None = None
    about: list[str] = field(default_factory=list)
    """What the features and the strength are, in words (feature id, hook, latent, what the strength multiplies)."""
    toy: object | None = None
    """On a toy model: `saekit.toy.steer.ToySteerReport` (the tracked FSM state; walks by state; follow rates)."""


def steering_delta(d, indices: list[int], strength: float):
    """A function x (n, d_in) → the change to add, for SAE or codebook (module docstring)."""
    dirs = d.directions().detach()[indices]  # (n_feat, d_in), hook scale
    if d.cfg.kind != "codebook":
        add = strength * dirs.sum(0)

        def sae_delta(x):
            return add.to(x).expand_as(x)

        return sae_delta

    def codebook_delta(x):
        codes = d.encode(x)[:, indices]  # (n, n_feat): 1 where already chosen
        return (strength - codes).to(x) @ dirs.to(x)

    return codebook_delta


@contextlib.contextmanager
def patched(bridge, hook: str, fn):
    """Run the bridge with `fn(x_flat (B, T, d_in), hook) -> x_flat` applied at `hook`; hooks removed after."""
    with patched_hooks(bridge, {hook: fn}):
        yield


@contextlib.contextmanager
def patched_hooks(bridge, fns: dict):
    """`patched` at several hooks at once: {hook: fn(x_flat) -> x_flat}."""

    def wrap(fn):
        def run(act, hook=None):
            shape = act.shape
            return fn(act.reshape(shape[0], shape[1], -1)).reshape(shape)
        return run

    with bridge.hooks(fwd_hooks=[(h, wrap(fn)) for h, fn in fns.items()]):
        yield


def steering_hooks(d, indices: list[int], strength: float) -> dict:
    """{hook: fn(x_flat (B, T, width)) -> x_flat}: the intervention at each hook the dictionary writes."""
    from saekit.analysis.multihook import hook_deltas, is_single

    if not is_single(d):
        return {h: (lambda x, v=v: x + v.to(x)) for h, v in hook_deltas(d, indices, strength).items()}
    delta = steering_delta(d, indices, strength)

    def add(x):
        n, t, w = x.shape
        return x + delta(x.reshape(n * t, w)).reshape(n, t, w)

    return {d.prov.hook: add}


@torch.no_grad()
def generate(bridge, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float, seed: int) -> torch.Tensor:
    """Sample continuations of `tokens` (N, T) → (N, max_new_tokens); plain loop, seeded generator."""
    g = torch.Generator(device=tokens.device).manual_seed(seed)
    out = tokens
    for _ in range(max_new_tokens):
        logits = bridge(out)[:, -1].float()  # (N, d_vocab)
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)
        out = torch.cat([out, nxt], 1)
    return out[:, tokens.shape[1]:]


def decode(tok, ids: list[int]) -> str:
    """Token ids → text.  A tokenizer without a decoder (the toy's digit-level WordLevel)
    would join tokens with spaces; there the pieces are concatenated as written."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and backend.decoder is None:
        return "".join(tok.decode([i]) for i in ids)
    return tok.decode(ids)


def steer(cfg: SteerConfig, *, model=None, dictionary=None) -> SteerResult:
    """Generate `cfg.samples` continuations with and without the features (see module docstring).

    `model` (a LoadedModel) and `dictionary` may be passed to reuse loaded objects.
    """
    from saekit.analysis.multihook import is_single
    from saekit.interop import load as load_dict
    from saekit.models import load_model

    if cfg.codebook_model:  # a codebook model: all its codebooks in the forward pass, codes forced (saekit.toy.steer)
        from saekit.analysis.codebook_steer import steer_codebook_model

        return SteerResult(**steer_codebook_model(cfg))
    d = dictionary if dictionary is not None else load_dict(cfg.dict, device=cfg.device)
    idx = parse_feature_ids(d, cfg.feature)
    if not cfg.prompt:
        raise SaekitError("no prompt; pass --prompt TEXT")
    pattern = None
    if cfg.match:
        try:
            pattern = re.compile(cfg.match)
        except re.error as e:
            raise SaekitError(f"--match {cfg.match!r} is not a valid regular expression: {e}") from None
    if model is None:
        name = cfg.model or (d.prov.model or {}).get("name")
        if not name:
            raise SaekitError("the dictionary records no model; pass --model")
        model = load_model(name, compat=bool((d.prov.model or {}).get("compat", False)), device=cfg.device)
    check_model(d, model)
    tok = model.tokenizer
    ids = [model.bos_id] + tok.encode(cfg.prompt, add_special_tokens=False)
    if len(ids) + cfg.max_new_tokens > model.info.n_ctx:
        raise SaekitError(f"prompt ({len(ids)} tokens) + {cfg.max_new_tokens} new tokens exceed the model's context of {model.info.n_ctx}; shorten one")
    device = next(model.bridge.parameters()).device
    d = d.to(device)
    start = torch.tensor([ids] * cfg.samples, device=device)
    plain = generate(model.bridge, start, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    with patched_hooks(model.bridge, steering_hooks(d, idx, cfg.strength)):
        steered = generate(model.bridge, start, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    dec = lambda rows: [decode(tok, r.tolist()) for r in rows]  # noqa: E731
    res = SteerResult(cfg.prompt, [feature_id(d, i) for i in idx], cfg.strength, dec(steered), dec(plain), cfg.match)
    res.about = describe(d, idx, cfg.strength) + promoted_tokens(model, d, idx)
    fsm = _toy_fsm(model) if is_single(d) else None  # the toy report encodes at the one hook
    if fsm is not None:
        from saekit.toy.steer import toy_report, tracked_state

        res.toy = toy_report(fsm, tracked_state(model, d, idx[0], fsm), ids[1:], steered.tolist(), plain.tolist())
    if pattern is not None:
        res.steered_rate = sum(bool(pattern.search(s)) for s in res.steered) / len(res.steered)
        res.unsteered_rate = sum(bool(pattern.search(s)) for s in res.unsteered) / len(res.unsteered)
    return res


def describe(d, idx: list[int], strength: float) -> list[str]:
    """One line per feature saying what its id means, and one saying what the strength does."""
    from saekit.analysis.multihook import in_hooks, is_single, out_hooks
    from saekit.models import hook_layer

    lines = []
    single = is_single(d)
    where = d.prov.hook if single else f"reads {', '.join(in_hooks(d))}, writes {', '.join(out_hooks(d))}"
    cb = d.cfg.kind == "codebook"
    groups = max(int(d.cfg.groups), 1)
    for i in idx:
        fid = feature_id(d, i)
        if cb:
            per = int(d.cfg.d_dict) // groups
            what = f"code {i % per} of group {i // per} ({per} codes × {groups} groups)"
        else:
            what = f"latent {i} of {int(d.cfg.d_dict)}"
        lines.append(f"feature {fid}: layer {hook_layer(d.prov.hook)} ({where}), {d.cfg.kind} {what}")
    if cb:
        lines.append(f"strength {strength:g}: the code's coefficient is forced to {strength:g} (1 = chosen like any code) at every position")
    else:
        at = "in the hook's scale" if single else f"at each hook it writes: {', '.join(out_hooks(d))}"
        lines.append(f"strength {strength:g}: {strength:g} × the feature's decoder direction (unit activation, {at}) "
                     "is added at every position, prompt and generated tokens alike")
    return lines


def promoted_tokens(model, d, idx: list[int], n: int = 8) -> list[str]:
    """"feature X promotes: ..." per feature: the next tokens its direction raises most through the unembedding."""
    from saekit.analysis.analyze import final_ln_weight, logit_directions
    from saekit.analysis.stats import logit_effects

    resid, _ = logit_directions(model.bridge, d, idx)
    if resid is None:
        return []
    compat = bool((d.prov.model or {}).get("compat", False))
    gamma = final_ln_weight(model.bridge, compat)
    top_ids, _, _, _ = logit_effects(resid.cpu(), model.bridge.W_U.detach().float().cpu(),
                                     gamma=None if gamma is None else gamma.cpu(), n=n)
    return [f"feature {feature_id(d, i)} promotes: " + " ".join(repr(decode(model.tokenizer, [t])) for t in row)
            for i, row in zip(idx, top_ids.tolist())]


def _toy_fsm(model):
    """The FSM of a toy model (its fsm.json), or None for any other model."""
    from saekit.toy.fsm import load_fsm

    try:
        return load_fsm(model.info.name)
    except SaekitError:
        return None


def check_model(d, model) -> None:
    """Refuse a model the dictionary was not trained on (different weights, weight processing or hook)."""
    from saekit.models import check_hook_names
    from saekit.models import check_model as check_fit

    from saekit.analysis.multihook import in_hooks, out_hooks

    if not d.prov.hook:
        raise SaekitError("the dictionary records no hook; retrain or re-export it with saekit")
    check_hook_names(model.bridge, list(dict.fromkeys(in_hooks(d) + out_hooks(d))))
    check_fit("the dictionary", d.prov.model, model.info)
