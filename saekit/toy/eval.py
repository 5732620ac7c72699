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

    def to_dict(self) -> dict:
        def per_state(s: StateScores, ids: list[str]) -> list[dict]:
            return [
                {"state": i, "feature": ids[s.best_feature[i]], "f1": float(s.f1[i]), "precision": float(s.precision[i]),
                 "recall": float(s.recall[i]), "n_positive": int(s.n_positive[i])}
                for i in range(len(s.f1))
            ]

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
        }


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

    counts = [Counts.zeros(d.cfg.d_dict, fsm.n_states) for _, _, d in loaded]
    ncounts = {h: Counts.zeros(thresholds[h].shape[0] * thresholds[h].shape[1], fsm.n_states) for h in hooks}
    rng = store.split(split)
    total = len(rng)
    done = 0
    with torch.no_grad():
        for start, tokens, acts in store.iter_sequences(hooks, split, batch_seqs):
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
    return RecoveryResult(results, combined, all_ids, neurons, n_ids, fsm.n_states, counts[0].n_tok, split)


def write_json(result: RecoveryResult, path: str) -> Path:
    from saekit.runs import write_json

    p = Path(path)
    write_json(p, result.to_dict())
    return p
