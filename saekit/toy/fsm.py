"""The toy language: random walks on a seeded finite-state machine, written as digit tokens.

After the TokFSM task of Codebook Features (Tamkin, Taufeeque & Goodman 2023, §4): every
state s has `out_degree` distinct successors, drawn at random and taken with equal
probability, and is written as `digits` decimal digits (state 7 with 2 digits → "07").
A sequence is BOS followed by a walk from a uniformly drawn start state, cut to length.
Because the walk starts right after BOS, the position of a token fixes which digit of a
state it is, so every token has a ground-truth label: the state it belongs to, its digit
position, whether the state is complete at this token, and the valid next states.

Token ids: digit d is id d (0..9); id 10 is the single BOS/EOS token `<|endoftext|>`.
The text form of a sequence (without BOS) is its digits with no separator, one sequence a
line; the shipped character-level tokenizer maps such a line back to exactly those ids.

The optimum loss is computed exactly from the FSM (no sampling): the state distribution
at each step is the uniform start pushed through the transition matrix, and the entropy
of digit j of a state given the previous state and digits < j is H(prefix_{j+1}) − H(prefix_j)
of the uniform distribution over that previous state's successors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from saekit.errors import SaekitError
from saekit.runs import atomic, write_text

N_DIGITS = 10
BOS_ID = 10
BOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 11
FSM_FORMAT = "saekit-toy-fsm"


@dataclass
class FSM:
    """A random FSM: `successors[s]` lists the states reachable from s (uniform probability)."""

    n_states: int
    out_degree: int
    digits: int
    seed: int
    successors: np.ndarray
    """(n_states, out_degree) int64, each row distinct states, sorted."""

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def random(cls, n_states: int = 100, out_degree: int = 10, digits: int = 2, seed: int = 0) -> "FSM":
        """Draw `out_degree` distinct successors per state (self-loops allowed) from a seeded generator."""
        check_shape(n_states, out_degree, digits)
        rng = np.random.default_rng(seed)
        succ = np.stack([np.sort(rng.choice(n_states, size=out_degree, replace=False)) for _ in range(n_states)])
        return cls(n_states, out_degree, digits, seed, succ.astype(np.int64))

    @classmethod
    def from_matrix(cls, P: np.ndarray, digits: int | None = None, where: str = "the matrix") -> "FSM":
        """The FSM of an (S, S) transition matrix whose rows each spread probability evenly over
        the same number of successors (the Codebook Features library's `fsm.npy` layout)."""
        P = np.asarray(P)
        if P.ndim != 2 or P.shape[0] != P.shape[1]:
            raise SaekitError(f"{where} has shape {P.shape}; a transition matrix is (S, S) with S the number of states")
        if not np.issubdtype(P.dtype, np.floating):
            raise SaekitError(f"{where} has dtype {P.dtype}; a transition matrix holds probabilities as floats")
        if not np.isfinite(P).all() or (P < 0).any():
            raise SaekitError(f"{where} holds negative, NaN or infinite entries; every entry must be a probability")
        if not np.allclose(P.sum(1), 1.0, atol=1e-6):
            bad = int(np.flatnonzero(~np.isclose(P.sum(1), 1.0, atol=1e-6))[0])
            raise SaekitError(f"{where}: row {bad} sums to {P[bad].sum():.6g}, not 1; each row is a state's next-state distribution")
        degree = (P > 0).sum(1)
        if (degree != degree[0]).any():
            raise SaekitError(f"{where}: states have different numbers of successors ({degree.min()}..{degree.max()}); "
                              "saekit's FSM needs the same out-degree for every state")
        k = int(degree[0])
        if not np.allclose(P[P > 0], 1.0 / k, atol=1e-6):
            raise SaekitError(f"{where}: successors are not equally likely (expected {1 / k:.6g} each); saekit's FSM walks them uniformly")
        S = P.shape[0]
        digits = digits if digits is not None else max(1, len(str(S - 1)))
        check_shape(S, k, digits)
        succ = np.stack([np.flatnonzero(row > 0) for row in P]).astype(np.int64)
        return cls(S, k, digits, -1, succ)

    # --- text form of states ---------------------------------------------------------------------
    def state_digits(self) -> np.ndarray:
        """(n_states, digits) int64: the digit tokens that write each state (most significant first)."""
        s = np.arange(self.n_states)
        powers = 10 ** np.arange(self.digits - 1, -1, -1)
        return (s[:, None] // powers[None, :]) % 10

    def transition_matrix(self) -> np.ndarray:
        """(n_states, n_states) float64: P[s, t] = 1/out_degree for t in successors[s]."""
        P = np.zeros((self.n_states, self.n_states))
        np.put_along_axis(P, self.successors, 1.0 / self.out_degree, axis=1)
        return P

    def valid_mask(self) -> np.ndarray:
        """(n_states, n_states) bool: valid[s, t] = t is a successor of s."""
        return self.transition_matrix() > 0

    # --- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["successors"] = self.successors.tolist()
        return {"format": FSM_FORMAT, "version": 1, "bos_id": BOS_ID, "bos_token": BOS_TOKEN, **d}

    @classmethod
    def from_dict(cls, d: dict, where: str = "fsm.json") -> "FSM":
        if d.get("format") != FSM_FORMAT:
            raise SaekitError(f"{where} is not a saekit toy FSM (format {d.get('format')!r}); pass a model made by `saekit toy train`")
        try:
            succ = np.asarray(d["successors"], dtype=np.int64)
            fsm = cls(int(d["n_states"]), int(d["out_degree"]), int(d["digits"]), int(d["seed"]), succ)
        except (KeyError, TypeError, ValueError) as e:
            raise SaekitError(f"{where} is damaged ({e}); regenerate it with `saekit toy train`") from None
        if succ.shape != (fsm.n_states, fsm.out_degree) or succ.min() < 0 or succ.max() >= fsm.n_states:
            raise SaekitError(f"{where}: successors table does not match n_states/out_degree; regenerate it with `saekit toy train`")
        return fsm

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        write_text(p, json.dumps(self.to_dict()))
        return p


def check_shape(n_states: int, out_degree: int, digits: int) -> None:
    """Raise ValueError for an FSM that cannot be written or walked."""
    if n_states < 2:
        raise ValueError(f"n_states={n_states} must be at least 2")
    if not 1 <= out_degree <= n_states:
        raise ValueError(f"out_degree={out_degree} must be between 1 and n_states={n_states}")
    if digits < 1 or 10**digits < n_states:
        raise ValueError(f"digits={digits} cannot write {n_states} states; need 10**digits >= n_states")


def load_matrix(path: str | os.PathLike, digits: int | None = None) -> FSM:
    """An FSM from a `.npy` transition matrix file (read without pickle)."""
    p = Path(path)
    if not p.is_file():
        raise SaekitError(f"FSM file {p} does not exist; pass a .npy file holding an (S, S) transition matrix")
    try:
        P = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SaekitError(f"{p} is not a readable .npy array ({e}); save the matrix with numpy.save") from None
    return FSM.from_matrix(P, digits, where=str(p))


def load_fsm(model_dir: str | os.PathLike) -> FSM:
    """The FSM a toy model was trained on (its `fsm.json`); `toy` names the shipped model."""
    from saekit.models import resolve_model_path

    p = Path(resolve_model_path(str(model_dir)))
    f = p / "fsm.json" if p.is_dir() else p
    if not f.is_file():
        raise SaekitError(f"{p} has no fsm.json, so it is not a toy model; pass --model toy or a directory made by `saekit toy train`")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaekitError(f"{f} is not valid JSON ({e}); regenerate it with `saekit toy train`") from None
    return FSM.from_dict(d, where=str(f))


# --- sequences and labels -------------------------------------------------------------------------


class Labels(NamedTuple):
    """Per-token ground truth, aligned with `tokens` (position 0 is BOS: state −1, digit −1)."""

    state: np.ndarray
    """(n_seq, ctx) int64: the state the token is a digit of."""
    digit: np.ndarray
    """(n_seq, ctx) int64: which digit of that state (0 = most significant)."""
    complete: np.ndarray
    """(n_seq, ctx) bool: this token is the state's last digit (the state has just been completed)."""
    next_states: np.ndarray
    """(n_seq, ctx, out_degree) int64: the valid states after the current one (its successors); −1 at BOS."""


def sample_walks(fsm: FSM, n_seq: int, n_states_per_seq: int, rng: np.random.Generator) -> np.ndarray:
    """(n_seq, n_states_per_seq) int64 state walks from a uniform start."""
    walks = np.empty((n_seq, n_states_per_seq), dtype=np.int64)
    walks[:, 0] = rng.integers(0, fsm.n_states, size=n_seq)
    for k in range(1, n_states_per_seq):
        pick = rng.integers(0, fsm.out_degree, size=n_seq)
        walks[:, k] = fsm.successors[walks[:, k - 1], pick]
    return walks


def generate(fsm: FSM, n_seq: int, ctx: int, seed: int | list[int] = 0) -> tuple[np.ndarray, Labels]:
    """`n_seq` sequences of `ctx` tokens (BOS + ctx−1 digits) and their labels; deterministic in `seed`.

    `seed` may be a list (e.g. [run seed, step]) so a trainer gets an independent stream per step.
    """
    if ctx < 2:
        raise SaekitError(f"sequence length {ctx} is too short; it must hold BOS and at least one digit")
    n_walk = ctx - 1
    n_states_per_seq = -(-n_walk // fsm.digits)
    walks = sample_walks(fsm, n_seq, n_states_per_seq, np.random.default_rng(seed))
    digs = fsm.state_digits()[walks].reshape(n_seq, -1)[:, :n_walk]  # (n_seq, n_walk)
    pos = np.arange(n_walk)
    state = np.repeat(walks, fsm.digits, axis=1)[:, :n_walk]
    digit = np.broadcast_to(pos % fsm.digits, (n_seq, n_walk))

    tokens = np.full((n_seq, ctx), BOS_ID, dtype=np.int64)
    tokens[:, 1:] = digs
    lab_state = np.full((n_seq, ctx), -1, dtype=np.int64)
    lab_state[:, 1:] = state
    lab_digit = np.full((n_seq, ctx), -1, dtype=np.int64)
    lab_digit[:, 1:] = digit
    complete = lab_digit == fsm.digits - 1
    nxt = np.full((n_seq, ctx, fsm.out_degree), -1, dtype=np.int64)
    nxt[:, 1:] = fsm.successors[state]
    return tokens, Labels(lab_state, lab_digit, complete, nxt)


def labels_from_tokens(fsm: FSM, tokens: np.ndarray) -> Labels:
    """Recover the labels of toy sequences (BOS + digits, −1 padding) from their tokens alone.

    Raises SaekitError when the tokens are not such sequences (no BOS first, a non-digit
    inside, a digit group that is not a state, or a step the FSM does not allow), so a
    store made from other text is refused instead of scored against wrong labels.
    """
    tokens = np.asarray(tokens)
    n, ctx = tokens.shape
    if n == 0:
        return Labels(*(np.zeros((0, ctx), dtype=np.int64) for _ in range(2)), np.zeros((0, ctx), bool), np.zeros((0, ctx, fsm.out_degree), np.int64))
    if not (tokens[:, 0] == BOS_ID).all():
        raise SaekitError("these sequences do not start with the toy BOS token; harvest toy data with `--packing doc`")
    body = tokens[:, 1:]
    valid_len = (body >= 0).sum(1)
    # Padding (−1) must only trail; digits are 0..9.
    if not ((body >= 0) == (np.arange(ctx - 1)[None, :] < valid_len[:, None])).all():
        raise SaekitError("padding inside a sequence; these are not toy sequences (use `saekit toy data` + `harvest --packing doc`)")
    if ((body >= N_DIGITS) & (body >= 0)).any():
        raise SaekitError("the sequences contain non-digit tokens after BOS, so they are not toy FSM text; harvest the output of `saekit toy data`")
    n_walk = ctx - 1
    n_k = -(-n_walk // fsm.digits)
    padded = np.zeros((n, n_k * fsm.digits), dtype=np.int64)
    padded[:, :n_walk] = np.where(body >= 0, body, 0)
    groups = padded.reshape(n, n_k, fsm.digits)
    powers = 10 ** np.arange(fsm.digits - 1, -1, -1)
    walks = (groups * powers).sum(-1)  # (n, n_k); the last group may be partial
    n_full = valid_len // fsm.digits
    full = np.arange(n_k)[None, :] < n_full[:, None]
    if (walks[full] >= fsm.n_states).any():
        raise SaekitError(f"a digit group names a state ≥ {fsm.n_states}; this text was not made with this model's FSM (fsm.json)")
    # Partial last states are labelled with the state the digits so far are a prefix of only
    # when that is unique; otherwise −1 (unknown), and they are never "complete".
    valid = fsm.valid_mask()
    steps = full[:, 1:] & full[:, :-1]
    ok = valid[np.clip(walks[:, :-1], 0, fsm.n_states - 1), np.clip(walks[:, 1:], 0, fsm.n_states - 1)]
    if (steps & ~ok).any():
        raise SaekitError("the sequences contain steps the FSM does not allow; they were made with another FSM than this model's fsm.json")
    state = np.repeat(np.where(full, walks, -1), fsm.digits, axis=1)[:, :n_walk]
    pos = np.arange(n_walk)
    digit = np.where(body >= 0, pos % fsm.digits, -1)
    lab_state = np.full((n, ctx), -1, dtype=np.int64)
    lab_state[:, 1:] = state
    lab_digit = np.full((n, ctx), -1, dtype=np.int64)
    lab_digit[:, 1:] = digit
    complete = (lab_digit == fsm.digits - 1) & (lab_state >= 0)
    nxt = np.full((n, ctx, fsm.out_degree), -1, dtype=np.int64)
    known = lab_state >= 0
    nxt[known] = fsm.successors[lab_state[known]]
    return Labels(lab_state, lab_digit, complete, nxt)


def to_text(tokens: np.ndarray) -> list[str]:
    """Sequences (BOS + digits) → one line each, BOS dropped (the harvester adds it back)."""
    body = np.asarray(tokens)[:, 1:]
    if ((body < 0) | (body >= N_DIGITS)).any():
        raise ValueError("to_text expects BOS followed by digit tokens only")
    return ["".join(map(str, row)) for row in body.tolist()]


def save_labels(path: str | os.PathLike, tokens: np.ndarray, labels: Labels, fsm: FSM) -> Path:
    """Write tokens and labels as safetensors (no pickle), atomically; the FSM goes in the metadata.

    Keeping the FSM in the file lets `toy eval --labels FILE` score a store whose model
    directory is gone or was not a toy directory.
    """
    import torch
    from safetensors.torch import save_file

    p = Path(path)
    tensors = {
        "tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)),
        "state": torch.from_numpy(np.ascontiguousarray(labels.state)),
        "digit": torch.from_numpy(np.ascontiguousarray(labels.digit)),
        "complete": torch.from_numpy(np.ascontiguousarray(labels.complete)),
        "next_states": torch.from_numpy(np.ascontiguousarray(labels.next_states)),
    }
    with atomic(p) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "saekit-toy-labels", "version": "1", "fsm": json.dumps(fsm.to_dict())})
    return p


def load_labels(path: str | os.PathLike) -> tuple[FSM, np.ndarray, Labels]:
    """(fsm, tokens, labels) from a file written by `save_labels`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "saekit-toy-labels":
            raise KeyError("format")
        fsm = FSM.from_dict(json.loads(meta["fsm"]), where=str(path))
        t = load_file(str(path))
        return fsm, t["tokens"], Labels(t["state"], t["digit"], t["complete"].astype(bool), t["next_states"])
    except (SafetensorError, KeyError, OSError, json.JSONDecodeError) as e:
        raise SaekitError(f"{path} is not a toy labels file (missing {e}); make one with `saekit toy data`") from None


# --- exact losses --------------------------------------------------------------------------------


def _prefix_entropies(fsm: FSM, dist: np.ndarray) -> np.ndarray:
    """H(first j digits) for j = 0..digits of a state drawn from `dist` (n_states,)."""
    digs = fsm.state_digits()
    out = np.zeros(fsm.digits + 1)
    for j in range(1, fsm.digits + 1):
        code = (digs[:, :j] * (10 ** np.arange(j - 1, -1, -1))).sum(1)
        p = np.bincount(code, weights=dist, minlength=10**j)
        p = p[p > 0]
        out[j] = -(p * np.log(p)).sum()
    return out


def _state_distributions(fsm: FSM, n_k: int) -> np.ndarray:
    """(n_k, n_states): distribution of the k-th state of a walk with a uniform start."""
    P = fsm.transition_matrix()
    dists = np.empty((n_k, fsm.n_states))
    dists[0] = 1.0 / fsm.n_states
    for k in range(1, n_k):
        dists[k] = dists[k - 1] @ P
    return dists


def position_entropies(fsm: FSM, ctx: int) -> np.ndarray:
    """(ctx−1,) exact expected next-token entropy (nats) when predicting token t+1 from tokens ≤ t.

    The k-th state (k ≥ 1) is uniform over the successors of the (k−1)-th, whose
    distribution is known; digit j's conditional entropy is averaged over that previous
    state.  The first state is uniform over all states.
    """
    n_walk = ctx - 1
    n_k = -(-n_walk // fsm.digits)
    dists = _state_distributions(fsm, n_k)
    # Conditional entropy per digit given a fixed previous state s: same for every s with the
    # same successor set, so compute per state and average with the state distribution.
    uniform_succ = np.zeros((fsm.n_states, fsm.n_states))
    np.put_along_axis(uniform_succ, fsm.successors, 1.0 / fsm.out_degree, axis=1)
    per_state = np.stack([np.diff(_prefix_entropies(fsm, uniform_succ[s])) for s in range(fsm.n_states)])  # (n_states, digits)
    first = np.diff(_prefix_entropies(fsm, np.full(fsm.n_states, 1.0 / fsm.n_states)))  # (digits,)
    ent = np.empty((n_k, fsm.digits))
    ent[0] = first
    for k in range(1, n_k):
        ent[k] = dists[k - 1] @ per_state
    return ent.reshape(-1)[:n_walk]


def optimum_loss(fsm: FSM, ctx: int) -> float:
    """The lowest possible mean next-token cross-entropy (nats) over a ctx-token sequence."""
    return float(position_entropies(fsm, ctx).mean())


def unigram_entropy(fsm: FSM, ctx: int) -> float:
    """Cross-entropy (nats) of the best position-blind unigram model: the entropy of the mean digit frequency.

    This is the plateau a model sits on before it learns any transition.
    """
    n_walk = ctx - 1
    n_k = -(-n_walk // fsm.digits)
    dists = _state_distributions(fsm, n_k)
    digs = fsm.state_digits()
    freq = np.zeros(N_DIGITS)
    for t in range(n_walk):
        k, j = divmod(t, fsm.digits)
        freq += np.bincount(digs[:, j], weights=dists[k], minlength=N_DIGITS)
    p = freq / freq.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def transition_accuracy(fsm: FSM, tokens: np.ndarray) -> tuple[float, int]:
    """Share of state-to-state steps in generated sequences (BOS + digits) that the FSM allows.

    A step counts as invalid when its digits do not name a state, or a non-digit appears.
    The first state of each sequence has no predecessor and is not counted; a sequence is
    read up to its first non-digit (counted as one invalid step).  Returns (share, n_steps).
    """
    valid = fsm.valid_mask()
    good = total = 0
    powers = 10 ** np.arange(fsm.digits - 1, -1, -1)
    for row in np.asarray(tokens)[:, 1:]:
        bad_at = np.flatnonzero((row < 0) | (row >= N_DIGITS))
        end = bad_at[0] if len(bad_at) else len(row)
        n_full = end // fsm.digits
        states = (row[: n_full * fsm.digits].reshape(n_full, fsm.digits) * powers).sum(1)
        for a, b in zip(states[:-1], states[1:]):
            total += 1
            good += int(a < fsm.n_states and b < fsm.n_states and valid[a, b])
        if len(bad_at):
            total += 1
    return (good / total if total else float("nan")), total
