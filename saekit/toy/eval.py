"""Ground-truth interpretability score on the toy model: does some feature mean "state s just completed"?

For every FSM state s the target is the set of tokens where a state has just been
completed and it is s (the last digit of s).  A feature "detects" s with the F1 of
{tokens where it fires} against that set; each state gets its best feature.  Counting
is one streaming pass over the store's eval split: with F (n_tok, n_feat) the 0/1
fired matrix and Y (n_tok, n_states) the 0/1 target matrix,

    TP = Fᵀ Y,   fired = Σ_tok F,   pos = Σ_tok Y,   F1[f, s] = 2 TP / (fired_f + pos_s).

The baseline is the raw activations: each neuron thresholded at a few quantiles, in
both directions (above or below), each (neuron, threshold, direction) treated as a
feature.  A dictionary that beats it has found the FSM's states more cleanly than
the model's own basis (the test of Codebook Features §4, Tamkin et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from saekit import metrics
from saekit.errors import SaekitError
from saekit.toy.fsm import FSM, labels_from_tokens, load_fsm, load_labels

F1_GOOD = 0.9
QUANTILES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)


# --- pure scoring --------------------------------------------------------------------------------


@dataclass
class Counts:
    """Streaming counts for (feature, state) pairs."""

    tp: torch.Tensor
    """(n_feat, n_states) float64: tokens where feature f fired and state s was just completed."""
    fired: torch.Tensor
    """(n_feat,) float64: tokens where feature f fired."""
    pos: torch.Tensor
    """(n_states,) float64: tokens where state s was just completed."""
    n_tok: int = 0
    """Labelled tokens counted."""

    @classmethod
    def zeros(cls, n_feat: int, n_states: int) -> "Counts":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(n_feat, n_states), z(n_feat), z(n_states))

    def update(self, fired: torch.Tensor, state: torch.Tensor) -> None:
        """fired: (n_tok, n_feat) bool; state: (n_tok,) int64 completed state or −1 (none)."""
        y = torch.zeros(state.shape[0], self.pos.shape[0], dtype=torch.float32)
        hit = state >= 0
        y[hit.nonzero().squeeze(-1), state[hit]] = 1.0
        f = fired.to(torch.float32)
        # Exact in float32 per batch (counts < 2**24); accumulate in float64.
        self.tp += (f.T @ y).double()
        self.fired += f.sum(0).double()
        self.pos += y.sum(0).double()
        self.n_tok += int(state.shape[0])


@dataclass
class StateScores:
    """The best feature for each state and the summary scores."""

    best_feature: np.ndarray
    """(n_states,) index of the best feature for each state."""
    f1: np.ndarray
    """(n_states,) its F1."""
    precision: np.ndarray
    recall: np.ndarray
    n_positive: np.ndarray
    """(n_states,) tokens where the state was just completed (states with none are left out of the means)."""

    @property
    def present(self) -> np.ndarray:
        return self.n_positive > 0

    @property
    def mean_best_f1(self) -> float:
        return float(self.f1[self.present].mean()) if self.present.any() else float("nan")

    @property
    def share_f1_ge(self) -> float:
        return float((self.f1[self.present] >= F1_GOOD).mean()) if self.present.any() else float("nan")


def best_f1(tp: torch.Tensor, fired: torch.Tensor, pos: torch.Tensor) -> StateScores:
    """Each state's best feature by F1 = 2·TP / (fired + pos), with its precision and recall.

    tp (n_feat, n_states), fired (n_feat,), pos (n_states,).  A feature that never fires
    has F1 0 for every state.
    """
    precision, recall, f1 = metrics.firing_f1(tp, fired, pos)  # the definitions `saekit eval truth` uses
    best = metrics.best_latents(f1)
    idx = torch.arange(tp.shape[1])
    best_f1_val, prec, rec = f1[best, idx], precision[best, idx], recall[best, idx]
    pos = pos.double()
    return StateScores(best.numpy(), best_f1_val.numpy(), prec.numpy(), rec.numpy(), pos.numpy())


def score_codes(codes: Iterable[tuple[torch.Tensor, torch.Tensor]], n_feat: int, n_states: int) -> StateScores:
    """Score a stream of (codes (n_tok, n_feat), completed state (n_tok,) or −1); a feature fires where its code ≠ 0."""
    c = Counts.zeros(n_feat, n_states)
    for f, s in codes:
        c.update(f != 0, s)
    return best_f1(c.tp, c.fired, c.pos)


def neuron_counts_update(c: Counts, acts: torch.Tensor, thresholds: torch.Tensor, state: torch.Tensor) -> None:
    """Add a batch to the neuron-baseline counts: feature (i, q) fires where acts[:, i] > thresholds[q, i].

    The "below" direction is not counted here: its TP and fired follow from these by
    complement (see `neuron_scores`).  acts (n_tok, width), thresholds (n_q, width).
    """
    fired = acts[:, None, :] > thresholds[None, :, :]  # (n_tok, n_q, width)
    c.update(fired.reshape(acts.shape[0], -1), state)


def neuron_scores(c: Counts) -> StateScores:
    """Best (neuron, threshold, direction) per state; "below" = not "above": TP = pos − TP, fired = n_tok − fired."""
    tp = torch.cat([c.tp, c.pos[None, :] - c.tp])
    fired = torch.cat([c.fired, c.n_tok - c.fired])
    return best_f1(tp, fired, c.pos)


# --- the paper's summary: precision at matched recall, code purity (Codebook Features §4) ---------
#
# Codebook Features (its `code_search_utils`) scores a state by the code with the highest
# precision among codes whose recall exceeds 1%, and compares it with the best single
# neuron *at the same recall*: each neuron's threshold is set so that it fires on that
# share of the state's tokens, and its precision is what it then fires on overall.  Neurons
# are taken above their threshold only (as the library does) over every attention and MLP
# site of every layer.


@dataclass
class RecallMatched:
    """Each state's best code (by precision, recall > min_recall) and the best neuron at the same recall."""

    code: np.ndarray
    """(n_states,) index of the best code (−1: no code reaches the minimum recall)."""
    precision: np.ndarray
    recall: np.ndarray
    neuron: np.ndarray
    """(n_states,) index of the best neuron at the code's recall (−1 when not computed)."""
    neuron_precision: np.ndarray
    n_positive: np.ndarray

    @property
    def scored(self) -> np.ndarray:
        return (self.n_positive > 0) & (self.code >= 0)

    @property
    def mean_precision(self) -> float:
        """Mean over states seen; a state no code reaches counts as precision 0."""
        present = self.n_positive > 0
        return float(np.where(self.code >= 0, self.precision, 0.0)[present].mean()) if present.any() else float("nan")

    @property
    def mean_neuron_precision(self) -> float:
        m = self.scored
        return float(self.neuron_precision[m].mean()) if m.any() else float("nan")

    @property
    def share_codes_better(self) -> float:
        """Share of scored states whose best code is more precise than the best neuron at its recall (the library's summary)."""
        m = self.scored
        return float((self.precision[m] > self.neuron_precision[m]).mean()) if m.any() else float("nan")


def best_code_at_recall(tp: torch.Tensor, fired: torch.Tensor, pos: torch.Tensor, min_recall: float = 0.01) -> RecallMatched:
    """Per state the most precise code among those with recall > min_recall (ties: the higher recall).

    tp (n_feat, n_states), fired (n_feat,), pos (n_states,).
    """
    precision, recall, _ = metrics.firing_f1(tp, fired, pos)
    ok = recall > min_recall
    score = torch.where(ok, precision * 2 + recall * 1e-9, torch.full_like(precision, -1.0))  # precision first, recall breaks ties
    best = score.argmax(0)
    idx = torch.arange(tp.shape[1])
    has = ok.any(0)
    code = torch.where(has, best, torch.full_like(best, -1))
    S = tp.shape[1]
    return RecallMatched(code.numpy(), torch.where(has, precision[best, idx], 0).numpy(), torch.where(has, recall[best, idx], 0).numpy(),
                         np.full(S, -1), np.zeros(S), pos.double().numpy())


def neuron_precision_at_recall(acts: torch.Tensor, state: torch.Tensor, recall: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best neuron per state at a given recall: (precision (n_states,), neuron (n_states,)).

    acts (n_tok, n_neurons), state (n_tok,) the completed state or −1, recall (n_states,).
    For state s with m tokens, n = max(1, ⌊recall_s · m⌋); neuron j's threshold is its n-th
    largest activation on those tokens, and its precision = (s-tokens ≥ threshold) /
    (all tokens ≥ threshold).  States with recall 0 or no tokens get precision 0, neuron −1.
    """
    acts = acts.float()
    S = len(recall)
    sorted_all = acts.T.contiguous().sort(dim=1).values  # (n_neurons, n_tok)
    n_tok = acts.shape[0]
    prec = np.zeros(S)
    best = np.full(S, -1)
    for s in range(S):
        on = acts[state == s]  # (m, n_neurons)
        m = on.shape[0]
        if m == 0 or recall[s] <= 0:
            continue
        n = max(1, int(np.floor(recall[s] * m + 1e-9)))
        thresh = on.topk(n, dim=0).values[-1]  # (n_neurons,) the n-th largest
        tp = (on >= thresh).sum(0).double()
        fired = (n_tok - torch.searchsorted(sorted_all, thresh[:, None].contiguous(), right=False)[:, 0]).double()
        p = tp / fired.clamp_min(1)
        j = int(p.argmax())
        prec[s], best[s] = float(p[j]), j
    return prec, best


def code_purity(codes: torch.Tensor) -> tuple[float, int]:
    """Share of codes that fire on exactly one input: codes (n_inputs, d_dict) 0/1 → (share, codes that fired).

    The Codebook Features "pure codes" of its TokFSM tutorial: every input is one short
    string (a state, or a state and the next digit) and the code is read at its last token.
    """
    per_code = (codes != 0).sum(0)
    fired = int((per_code > 0).sum())
    return (float((per_code == 1).sum()) / fired if fired else float("nan")), fired


# --- over a store ----------------------------------------------------------------------------------


@dataclass
class DictResult:
    path: str
    hook: str
    kind: str
    d_dict: int
    scores: StateScores
    feature_ids: list[str] = field(default_factory=list)


@dataclass
class RecoveryResult:
    """`toy eval`'s answer: per dictionary, the union of all dictionaries, and the neuron baseline."""

    dicts: list[DictResult]
    combined: StateScores
    """Each state's best feature over all dictionaries together."""
    combined_ids: list[str]
    neurons: StateScores
    """Best thresholded single neuron of the raw activations, over the dictionaries' hooks."""
    neuron_ids: list[str]
    n_states: int
    n_tokens: int
    split: str
    matched: "RecallMatched | None" = None
    """Each state's most precise feature (recall > min_recall) over all dictionaries, against the best neuron at that recall."""
    matched_neuron_hooks: list[str] = field(default_factory=list)
    """The store's hooks whose neurons the matched-recall baseline searched."""

    def to_dict(self) -> dict:
        def per_state(s: StateScores, ids: list[str]) -> list[dict]:
            return [
                {"state": i, "feature": ids[s.best_feature[i]], "f1": float(s.f1[i]), "precision": float(s.precision[i]),
                 "recall": float(s.recall[i]), "n_positive": int(s.n_positive[i])}
                for i in range(len(s.f1))
            ]

        all_ids = self.combined_ids
        return {
            "mean_best_f1": self.combined.mean_best_f1,
            "share_states_f1_ge_0.9": self.combined.share_f1_ge,
            "neuron_mean_best_f1": self.neurons.mean_best_f1,
            "neuron_share_states_f1_ge_0.9": self.neurons.share_f1_ge,
            "n_states": self.n_states,
            "n_states_present": int(self.combined.present.sum()),
            "n_tokens": self.n_tokens,
            "split": self.split,
            "dictionaries": [
                {"path": d.path, "hook": d.hook, "kind": d.kind, "d_dict": d.d_dict, "mean_best_f1": d.scores.mean_best_f1,
                 "share_states_f1_ge_0.9": d.scores.share_f1_ge, "per_state": per_state(d.scores, d.feature_ids)}
                for d in self.dicts
            ],
            "per_state": per_state(self.combined, self.combined_ids),
            "neuron_per_state": per_state(self.neurons, self.neuron_ids),
        } | ({} if self.matched is None else {"matched_recall": {
            "mean_feature_precision": self.matched.mean_precision, "mean_neuron_precision": self.matched.mean_neuron_precision,
            "share_states_feature_better": self.matched.share_codes_better, "neuron_hooks": self.matched_neuron_hooks,
            "per_state": [{"state": i, "feature": all_ids[c] if c >= 0 else None, "precision": float(self.matched.precision[i]),
                           "recall": float(self.matched.recall[i]), "neuron_precision": float(self.matched.neuron_precision[i])}
                          for i, c in enumerate(self.matched.code.tolist())]}})


def store_fsm(store, labels: str | None = None) -> FSM:
    """The FSM that made a store's text: from a labels file if given, else the store's model's fsm.json."""
    if labels:
        fsm, _, _ = load_labels(labels)
        return fsm
    model = (store.manifest.get("model") or {}).get("name", "")
    try:
        return load_fsm(model)
    except SaekitError:
        raise SaekitError(
            f"the store was harvested from model {model!r}, which is not a toy model (no fsm.json found there), so its tokens have no "
            "FSM labels; harvest `saekit toy data` output with --model toy --packing doc, or pass --labels FILE"
        ) from None


def feature_ids(d, hook: str) -> list[str]:
    """`layer.feature` for SAEs, `layer.group.code` for codebooks (as elsewhere in saekit)."""
    from saekit.models import hook_layer

    layer = hook_layer(hook)
    if d.cfg.kind == "codebook":
        per = d.cfg.d_dict // max(d.cfg.groups, 1)
        return [f"{layer}.{i // per}.{i % per}" for i in range(d.cfg.d_dict)]
    return [f"{layer}.{i}" for i in range(d.cfg.d_dict)]


def _thresholds(store, hook: str, rows: int = 20000, split: str = "eval") -> torch.Tensor:
    """(n_q, width) per-neuron quantiles of a hook's activations on the first `rows` counted rows of the split."""
    got, n = [], 0
    for _, tokens, acts in store.iter_sequences([hook], split, 16):
        mask = torch.as_tensor(np.asarray(store.row_mask(tokens)))
        a = torch.as_tensor(np.asarray(acts[hook]), dtype=torch.float32)[mask]
        got.append(a)
        n += a.shape[0]
        if n >= rows:
            break
    if not got:
        raise SaekitError(f"the store's {split} split is empty; harvest with --holdout > 0 or pass --split all")
    x = torch.cat(got)
    return torch.quantile(x, torch.tensor(QUANTILES, dtype=torch.float32), dim=0)


def state_recovery(
    dicts: list[str],
    store_path: str,
    *,
    labels: str | None = None,
    split: str = "eval",
    batch_seqs: int = 16,
    min_recall: float = 0.01,
    max_rows: int = 50_000,
    progress: Callable[[int, int], None] | None = None,
) -> RecoveryResult:
    """Score dictionaries (folders) on a toy store: best feature per FSM state, and the neuron baseline."""
    from saekit import load as load_dict
    from saekit.store import ActivationStore

    if not dicts:
        raise SaekitError("no dictionaries given; pass --dict DIR (repeat for several)")
    store = ActivationStore(store_path)
    packing = ((store.manifest.get("text") or {}).get("packing"))
    if packing not in (None, "doc"):
        raise SaekitError(f"the store was harvested with --packing {packing}, so positions do not line up with FSM states; harvest toy data with --packing doc")
    fsm = store_fsm(store, labels)
    loaded = []
    for p in dicts:
        d = load_dict(p)
        hook = d.prov.hook
        if hook not in store.hooks:
            raise SaekitError(f"dictionary {p} was trained on hook {hook!r}, which the store does not hold (it has {', '.join(store.hooks)}); harvest that hook or pass a matching dictionary")
        if store.hook_width(hook) != d.cfg.d_in:
            raise SaekitError(f"dictionary {p} expects width {d.cfg.d_in} but the store's {hook} has width {store.hook_width(hook)}; pass a dictionary for this model")
        loaded.append((p, hook, d))
    hooks = sorted({h for _, h, _ in loaded})
    thresholds = {h: _thresholds(store, h, split=split) for h in hooks}
    from saekit.analysis.codebook_model import site_of

    # the matched-recall baseline searches every attention/MLP site the store holds (the paper: all of them), else the dicts' hooks
    neuron_hooks = [h for h in store.hooks if site_of(h) in ("attn", "mlp")] or hooks
    kept_acts, kept_states, kept = [], [], 0

    counts = [Counts.zeros(d.cfg.d_dict, fsm.n_states) for _, _, d in loaded]
    ncounts = {h: Counts.zeros(thresholds[h].shape[0] * thresholds[h].shape[1], fsm.n_states) for h in hooks}
    rng = store.split(split)
    total = len(rng)
    done = 0
    with torch.no_grad():
        for start, tokens, acts in store.iter_sequences(sorted(set(hooks) | set(neuron_hooks)), split, batch_seqs):
            tokens = np.asarray(tokens)
            lab = labels_from_tokens(fsm, tokens)
            mask = np.asarray(store.row_mask(tokens))
            target = np.where(lab.complete, lab.state, -1)[mask]
            state = torch.from_numpy(target.astype(np.int64))
            m = torch.from_numpy(mask)
            for h in hooks:
                a = torch.as_tensor(np.asarray(acts[h]), dtype=torch.float32)[m]
                neuron_counts_update(ncounts[h], a, thresholds[h], state)
                for (_, dh, d), c in zip(loaded, counts):
                    if dh == h:
                        c.update(d.encode(a) != 0, state)
            if kept < max_rows:
                kept_acts.append(torch.cat([torch.as_tensor(np.asarray(acts[h]), dtype=torch.float32)[m] for h in neuron_hooks], 1))
                kept_states.append(state)
                kept += int(state.shape[0])
            done += tokens.shape[0]
            if progress:
                progress(done, total)
    if not counts or counts[0].n_tok == 0:
        raise SaekitError(f"the store's {split} split has no counted tokens; harvest with --holdout > 0 or pass --split all")

    results = []
    for (p, h, d), c in zip(loaded, counts):
        results.append(DictResult(str(p), h, d.cfg.kind, d.cfg.d_dict, best_f1(c.tp, c.fired, c.pos), feature_ids(d, h)))
    all_ids = [f"{Path(r.path).name}:{i}" if len(results) > 1 else i for r in results for i in r.feature_ids]
    combined = best_f1(torch.cat([c.tp for c in counts]), torch.cat([c.fired for c in counts]), counts[0].pos)

    n_ids, n_tp, n_fired = [], [], []
    for h in hooks:
        c = ncounts[h]
        n_q, width = thresholds[h].shape
        n_tp += [c.tp, c.pos[None, :] - c.tp]
        n_fired += [c.fired, c.n_tok - c.fired]
        for direction in (">", "<="):
            n_ids += [f"{h}[{i % width}]{direction}q{QUANTILES[i // width]}" for i in range(n_q * width)]
    neurons = best_f1(torch.cat(n_tp), torch.cat(n_fired), counts[0].pos)
    # precision at matched recall: codes counted on the whole split, neurons on its first max_rows rows
    tp, fired = torch.cat([c.tp for c in counts]), torch.cat([c.fired for c in counts])
    matched = _fill_neurons(best_code_at_recall(tp, fired, counts[0].pos, min_recall), torch.cat(kept_acts), torch.cat(kept_states))
    return RecoveryResult(results, combined, all_ids, neurons, n_ids, fsm.n_states, counts[0].n_tok, split, matched, neuron_hooks)


def write_json(result: "RecoveryResult | PaperResult", path: str) -> Path:
    from saekit.runs import write_json

    p = Path(path)
    write_json(p, result.to_dict())
    return p


# --- the paper's tables on a codebook model (all codebooks in the forward pass) ---------------------


def state_inputs(fsm: FSM) -> np.ndarray:
    """(n_states, 1 + digits): BOS + each state's digits (the tutorial's "bigram" inputs for 2 digits)."""
    from saekit.toy.fsm import BOS_ID

    return np.concatenate([np.full((fsm.n_states, 1), BOS_ID), fsm.state_digits()], 1).astype(np.int64)


def state_digit_inputs(fsm: FSM) -> np.ndarray:
    """BOS + a state's digits + a first digit one of its successors can start with (the "trigram" inputs), each once."""
    rows = set()
    digs = fsm.state_digits()
    for s in range(fsm.n_states):
        for d in set(digs[fsm.successors[s], 0].tolist()):
            rows.add((*digs[s].tolist(), d))
    from saekit.toy.fsm import BOS_ID

    return np.array([(BOS_ID, *r) for r in sorted(rows)], dtype=np.int64)


def next_state_logprobs(run: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor, fsm: FSM) -> torch.Tensor:
    """(n, n_states) log P(the next `digits` tokens write state s' | prompt), chained over digits.

    `run(tokens (n, T)) → logits (n, T, vocab)`.  One forward per prefix of digits−1 digits
    (10 for 2-digit states), as the library's `get_next_state_probs`.
    """
    import itertools

    n, T = prompts.shape
    D = fsm.digits
    out = torch.full((n, 10 ** D), float("-inf"))
    for prefix in itertools.product(range(10), repeat=D - 1):
        t = torch.cat([prompts, torch.tensor(prefix, dtype=torch.long).expand(n, D - 1)], 1)
        lp = torch.log_softmax(run(t)[:, T - 1:].float().cpu(), -1)  # (n, D, vocab): digit j at position T-1+j
        head = sum((lp[:, j, prefix[j]] for j in range(D - 1)), torch.zeros(n))
        base = sum(p * 10 ** (D - 1 - j) for j, p in enumerate(prefix))
        out[:, base:base + 10] = head[:, None] + lp[:, D - 1, :10]
    return out[:, : fsm.n_states]


def successor_overlap(logp: torch.Tensor, states: np.ndarray, fsm: FSM) -> np.ndarray:
    """(n,) share of the out_degree most likely next states that are successors of `states` (top-10 accuracy for the paper's FSM)."""
    top = logp.topk(fsm.out_degree, dim=-1).indices.numpy()
    valid = fsm.valid_mask()
    return valid[np.asarray(states)[:, None], top].mean(1)


def first_transition_accuracy(run: Callable[[torch.Tensor], torch.Tensor], fsm: FSM) -> float:
    """Mean over states s of |top-out_degree next states after BOS + s ∩ successors(s)| / out_degree (the library's)."""
    logp = next_state_logprobs(run, torch.from_numpy(state_inputs(fsm)), fsm)
    return float(successor_overlap(logp, np.arange(fsm.n_states), fsm).mean())


@dataclass
class HookTable:
    """One codebook (layer, site) of a codebook model: per-state scores, summary and purity."""

    hook: str
    layer: int
    site: str
    d_dict: int
    f1: StateScores
    """Today's best-F1 report."""
    matched: RecallMatched
    """Best code per state by precision at recall > min_recall, against the best neuron at that recall."""
    purity_states: float
    """Share of codes (read at the last token) that fire for exactly one state input."""
    purity_state_digit: float
    """The same over state + next-digit inputs."""


@dataclass
class PaperResult:
    """`saekit toy eval --codebook-model`: the Codebook Features TokFSM tables for one codebook model."""

    hooks: list[HookTable]
    combined: RecallMatched
    """Each state's best code over all codebooks, against the best neuron over all neuron sites."""
    combined_f1: StateScores
    neuron_hooks: list[str]
    n_neurons: int
    n_tokens: int
    first_transition: float
    """First-transition accuracy with every codebook active."""
    first_transition_no_codebooks: float
    """The same model with its codebooks removed."""
    transition: float
    """Share of valid state steps in walks sampled with every codebook active."""
    transition_no_codebooks: float
    n_transitions: int
    min_recall: float

    def to_dict(self) -> dict:
        def matched(m: RecallMatched) -> dict:
            return {"mean_code_precision": m.mean_precision, "mean_neuron_precision": m.mean_neuron_precision,
                    "share_codes_better_than_neurons": m.share_codes_better,
                    "per_state": [{"state": s, "code": int(m.code[s]), "precision": float(m.precision[s]), "recall": float(m.recall[s]),
                                   "neuron": int(m.neuron[s]), "neuron_precision": float(m.neuron_precision[s]),
                                   "n_positive": int(m.n_positive[s])} for s in range(len(m.code))]}

        return {
            "summary": {"mean_code_precision_at_matched_recall": self.combined.mean_precision,
                        "mean_neuron_precision_at_matched_recall": self.combined.mean_neuron_precision,
                        "share_states_code_better": self.combined.share_codes_better, "mean_best_f1": self.combined_f1.mean_best_f1,
                        "first_transition_accuracy": self.first_transition,
                        "first_transition_accuracy_no_codebooks": self.first_transition_no_codebooks,
                        "transition_accuracy": self.transition, "transition_accuracy_no_codebooks": self.transition_no_codebooks,
                        "n_transitions": self.n_transitions, "n_tokens": self.n_tokens, "min_recall": self.min_recall,
                        "neuron_hooks": self.neuron_hooks, "n_neurons": self.n_neurons},
            "combined": matched(self.combined),
            "hooks": [{"hook": h.hook, "layer": h.layer, "site": h.site, "d_dict": h.d_dict, "mean_best_f1": h.f1.mean_best_f1,
                       "purity_states": h.purity_states, "purity_state_digit": h.purity_state_digit, **matched(h.matched)}
                      for h in self.hooks],
        }


def _fill_neurons(m: RecallMatched, acts: torch.Tensor, state: torch.Tensor) -> RecallMatched:
    prec, best = neuron_precision_at_recall(acts, state, np.where(m.code >= 0, m.recall, 0.0))
    m.neuron_precision, m.neuron = prec, best
    return m


@torch.no_grad()
def paper_tables(cbm, fsm: FSM, *, n_seq: int = 256, ctx: int | None = None, sample_seqs: int = 32, batch_seqs: int = 32,
                 min_recall: float = 0.01, seed: int = 1234, progress: Callable[[str], None] | None = None) -> PaperResult:
    """All the paper's TokFSM measures on a `CodebookModel` (saekit.analysis.codebook_model), on fresh walks.

    Codes and neurons are read in the same forward, with every codebook active, at the
    positions a codebook replaces (BOS excluded); a state's tokens are those where it has
    just been completed.
    """
    from saekit.analysis.codebook_model import site_of
    from saekit.models import hook_layer
    from saekit.toy.fsm import generate
    from saekit.tokens import row_mask

    say = progress or (lambda _: None)
    n_ctx = int(getattr(cbm.hf.config, "n_positions", getattr(cbm.hf.config, "max_position_embeddings", 128)))
    ctx = min(ctx or n_ctx, n_ctx)
    tokens, labels = generate(fsm, n_seq, ctx, seed=[seed, 2])
    counts = {h: Counts.zeros(d.cfg.d_dict, fsm.n_states) for h, d in cbm.codebooks.items()}
    acts, states = [], []
    say(f"codes and neurons on {n_seq} walks")
    for i in range(0, n_seq, batch_seqs):
        t = torch.from_numpy(tokens[i:i + batch_seqs])
        _, rec = cbm.run(t, record=True)
        mask = row_mask(t, True).to(cbm.device)
        st = torch.from_numpy(np.where(labels.complete, labels.state, -1)[i:i + batch_seqs])[mask.cpu()]
        for h in cbm.codebooks:
            counts[h].update(rec.codes[h][mask].cpu() != 0, st)
        acts.append(torch.cat([rec.inputs[h][mask].cpu() for h in cbm.neuron_hooks], 1))
        states.append(st)
    acts_t, state_t = torch.cat(acts), torch.cat(states)

    say("code purity")
    pur = {}
    for name, inp in (("states", state_inputs(fsm)), ("state_digit", state_digit_inputs(fsm))):
        _, rec = cbm.run(torch.from_numpy(inp), record=True)
        for h in cbm.codebooks:
            pur[h, name] = code_purity(rec.codes[h][:, -1].cpu())[0]

    tables = []
    for h, d in cbm.codebooks.items():
        c = counts[h]
        m = _fill_neurons(best_code_at_recall(c.tp, c.fired, c.pos, min_recall), acts_t, state_t)
        tables.append(HookTable(h, hook_layer(h), site_of(h), d.cfg.d_dict, best_f1(c.tp, c.fired, c.pos), m,
                                pur[h, "states"], pur[h, "state_digit"]))
    all_c = list(counts.values())
    tp, fired, pos = torch.cat([c.tp for c in all_c]), torch.cat([c.fired for c in all_c]), all_c[0].pos
    combined = _fill_neurons(best_code_at_recall(tp, fired, pos, min_recall), acts_t, state_t)

    say("first-transition accuracy")
    ft = first_transition_accuracy(lambda t: cbm.run(t)[0], fsm)
    ft0 = first_transition_accuracy(lambda t: cbm.run(t, codebooks=False)[0], fsm)
    say(f"transition accuracy on {sample_seqs} sampled walks (each way)")
    from saekit.toy.fsm import transition_accuracy

    acc, n = transition_accuracy(fsm, cbm.sample(sample_seqs, ctx, seed).numpy())
    acc0, _ = transition_accuracy(fsm, cbm.sample(sample_seqs, ctx, seed, codebooks=False).numpy())
    return PaperResult(tables, combined, best_f1(tp, fired, pos), list(cbm.neuron_hooks), int(acts_t.shape[1]), int(state_t.shape[0]),
                       ft, ft0, acc, acc0, n, min_recall)
