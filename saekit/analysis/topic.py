"""Topic steering: find the features of a topic from text, force them on, count on-topic generations.

The Codebook Features talk steers a model to a topic by switching on the codes that fire on
that topic's words, and measures the share of generations that are on topic.  Here:

1. **Topic positions.** A topic is a regular expression over text (a word list is the
   alternation `\\b(raise|except|Error)\\b`).  On a store's train split, a token position
   is on topic when its text overlaps a match of the pattern in its sequence's text.
2. **Topic features.** Each feature's firing (code ≠ 0) is scored as a detector of the
   topic positions (precision, recall, F1, from counts over the split); the best `n` by F1
   are the topic's features.
3. **Steering** (`saekit steer --topic REGEX --store DIR`, `SteerConfig`). `n_prompts` prompts are cut from the starts of held-out sequences whose
   continuation is off topic; each is continued `samples` times with and without the
   features (paired seeds, `steer.steering_delta`), and a continuation is on topic when the
   pattern matches its text.  The result is the two match rates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from saekit.analysis.ids import feature_id
from saekit.analysis.steer import SteerConfig
from saekit.errors import SaekitError


@dataclass
class TopicFeature:
    id: str
    index: int
    precision: float
    recall: float
    f1: float


@dataclass
class TopicResult:
    topic: str
    features: list[TopicFeature]
    strength: float
    steered_rate: float
    unsteered_rate: float
    n_generations: int
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """(prompt, unsteered continuation, steered continuation) for the first prompts."""

    def to_dict(self) -> dict:
        return {"topic": self.topic, "features": [f.__dict__ for f in self.features], "strength": self.strength,
                "steered_rate": self.steered_rate, "unsteered_rate": self.unsteered_rate, "n_generations": self.n_generations,
                "examples": self.examples}


def compile_topic(pattern: str) -> re.Pattern:
    if not pattern:
        raise SaekitError("no topic; pass --topic REGEX (a word list as \\b(word1|word2)\\b)")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise SaekitError(f"--topic {pattern!r} is not a valid regular expression: {e}") from None


def topic_positions(pieces: list[str], pattern: re.Pattern) -> np.ndarray:
    """(T,) bool: which tokens (their text pieces, in order) overlap a match of `pattern` in the joined text."""
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - np.array([len(p) for p in pieces], dtype=ends.dtype) if pieces else ends
    on = np.zeros(len(pieces), bool)
    for m in pattern.finditer("".join(pieces)):
        a, b = m.span()
        if b == a:
            continue
        on |= (starts < b) & (ends > a)
    return on


def detection_scores(fired: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature precision, recall and F1 of fired (r, d) bool as a detector of target (r,) bool."""
    tp = (fired & target[:, None]).sum(0).astype(np.float64)
    pred = fired.sum(0).astype(np.float64)
    pos = float(target.sum())
    prec = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    rec = tp / pos if pos else np.zeros_like(tp)
    f1 = np.divide(2 * tp, pred + pos, out=np.zeros_like(tp), where=(pred + pos) > 0)
    return prec, rec, f1


_PIECES: dict[tuple[int, int], str] = {}


def _pieces(tok, ids) -> list[str]:
    """Each token's text (cached per tokenizer and id: decoding one token at a time is slow)."""
    from saekit.analysis.steer import decode

    out = []
    for i in ids:
        key = (id(tok), int(i))
        if key not in _PIECES:
            _PIECES[key] = decode(tok, [int(i)])
        out.append(_PIECES[key])
    return out


def ahead(on: np.ndarray, lead: int) -> np.ndarray:
    """(T,) bool: the topic appears within the next `lead` tokens (lead 0: on the token itself)."""
    if lead == 0:
        return on
    out = np.zeros_like(on)
    for j in range(1, lead + 1):
        out[:-j] |= on[j:]
    return out


def find_topic_features(d, store, tok, pattern: re.Pattern, n: int, max_tokens: int, lead: int = 0) -> list[TopicFeature]:
    """The n features whose firing best detects the topic's positions on the store's train split (by F1).

    With `lead` > 0 the target is "the topic appears within the next `lead` tokens": a feature that
    fires *on* a topic word says the word was just read (forcing it on makes the model continue as
    after the word), while one that fires before it predicts the word.
    """
    from saekit.analysis.multihook import check_hooks_in_store, encode_rows

    hooks = check_hooks_in_store(d, store)  # a transcoder's latents fire on its input hook
    fired_parts, target_parts = [], []
    seen = 0
    for _, toks, acts in store.iter_sequences(hooks, "train", 32):
        mask = np.asarray(store.row_mask(toks))
        for s in range(toks.shape[0]):
            valid = toks[s] >= 0
            on = np.zeros(toks.shape[1], bool)
            on[valid] = topic_positions(_pieces(tok, toks[s][valid]), pattern)
            target_parts.append(ahead(on, lead)[mask[s]])
        m = torch.as_tensor(mask)
        fired_parts.append((encode_rows(d, {h: torch.as_tensor(acts[h])[m] for h in hooks}) != 0).cpu().numpy())
        seen += int(mask.sum())
        if seen >= max_tokens:
            break
    fired, target = np.concatenate(fired_parts), np.concatenate(target_parts)
    if not target.any():
        raise SaekitError(f"the topic {pattern.pattern!r} matches nothing in the store's train split; choose a topic its text contains")
    prec, rec, f1 = detection_scores(fired, target)
    best = np.argsort(-f1, kind="stable")[:n]
    return [TopicFeature(feature_id(d, int(i)), int(i), float(prec[i]), float(rec[i]), float(f1[i])) for i in best]


def off_topic_prompts(store, tok, pattern: re.Pattern, n: int, prompt_tokens: int, max_new: int, seed: int) -> list[list[int]]:
    """Token prefixes (BOS + prompt_tokens) of held-out sequences whose prompt and next max_new tokens are off topic."""
    rng = store.split("eval")
    if len(rng) == 0:
        raise SaekitError("the store has no eval split to take prompts from; harvest with --holdout > 0")
    toks = store.read_tokens(rng.start, rng.stop)
    order = np.random.default_rng(seed).permutation(len(toks))
    out = []
    for i in order:
        row = toks[i]
        if (row[: 1 + prompt_tokens + max_new] < 0).any():
            continue
        if pattern.search("".join(_pieces(tok, row[1: 1 + prompt_tokens + max_new]))):
            continue
        out.append([int(t) for t in row[: 1 + prompt_tokens]])
        if len(out) == n:
            break
    if not out:
        raise SaekitError("no held-out sequence is long enough and off topic for a prompt; lower --prompt-tokens or harvest more text")
    return out


def topic_steer(cfg: SteerConfig, *, model=None, dictionary=None, store=None) -> TopicResult:
    """Find the topic's features, steer with them, and count on-topic continuations (module docstring)."""
    from saekit.analysis.steer import check_model, decode, generate, patched_hooks, steering_hooks

    if not cfg.store and store is None:
        raise SaekitError("topic steering needs --store: a store at the dictionary's hook to find the topic's features in")
    from saekit.interop import load as load_dict
    from saekit.models import load_model
    from saekit.store import ActivationStore

    pattern = compile_topic(cfg.topic or "")
    d = dictionary if dictionary is not None else load_dict(cfg.dict, device=cfg.device)
    store = store if store is not None else ActivationStore(cfg.store)
    if model is None:
        name = (d.prov.model or {}).get("name") or store.model.name
        model = load_model(name, compat=bool(store.model.compat), device=cfg.device)
    check_model(d, model)
    tok = model.tokenizer
    feats = find_topic_features(d, store, tok, pattern, cfg.n_features, cfg.max_tokens, cfg.topic_lead)
    prompts = off_topic_prompts(store, tok, pattern, cfg.n_prompts, cfg.prompt_tokens, cfg.max_new_tokens, cfg.seed)
    device = next(model.bridge.parameters()).device
    fns = steering_hooks(d.to(device), [f.index for f in feats], cfg.strength)

    hits = {"steered": 0, "unsteered": 0}
    examples = []
    for j, p in enumerate(prompts):
        start = torch.tensor([p] * cfg.samples, device=device)
        plain = generate(model.bridge, start, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + j)
        with patched_hooks(model.bridge, fns):
            steered = generate(model.bridge, start, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed + j)
        texts = {"unsteered": [decode(tok, r.tolist()) for r in plain], "steered": [decode(tok, r.tolist()) for r in steered]}
        for arm, ts in texts.items():
            hits[arm] += sum(bool(pattern.search(t)) for t in ts)
        if j < 3:
            examples.append((decode(tok, p[1:]), texts["unsteered"][0], texts["steered"][0]))
    total = len(prompts) * cfg.samples
    return TopicResult(cfg.topic, feats, cfg.strength, hits["steered"] / total, hits["unsteered"] / total, total, examples)
