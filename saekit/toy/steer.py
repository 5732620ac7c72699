"""Steering read against the toy FSM: which state a feature tracks, and whether steering it moves the walks there.

A feature "tracks" state s when it fires where s has just been completed (the target of
`toy eval`); it is found on fresh walks drawn from the FSM, by F1.  If the feature carries
"the walk is at s", switching it on should make the model continue as from s: the next
states it writes should be successors of s.  `follow_rate` is the share of generated
states that are, steered against unsteered; with out_degree successors out of n_states
states, chance is about out_degree / n_states.

Walks are shown as digits grouped by state (`37 52 08`), EOS as `⏎` (a new walk starts
after it), a partial state at the end as its digits so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from saekit.toy.eval import Counts
from saekit.toy.fsm import BOS_ID, FSM, N_DIGITS, generate


@dataclass
class TrackedState:
    """The FSM state a feature fires on, measured on fresh walks."""

    state: int
    f1: float
    precision: float
    recall: float
    fire_rate: float
    """Share of the probe's tokens where the feature fired."""
    mean_act: float
    """Mean activation where it fired (0 when it never did)."""
    n_tokens: int
    digit: int = -1
    """Which digit of a state the feature fires on most (0 = first; −1: not measured or never fired)."""


def tracked_state(model, d, index: int, fsm: FSM, *, n_seq: int = 64, seed: int = 1234) -> TrackedState:
    """Fire the dictionary on `n_seq` fresh walks and return the state whose completion feature `index` detects best."""
    from saekit.models import capture

    ctx = int(min(model.info.n_ctx, 64))
    tokens, labels = generate(fsm, n_seq, ctx, seed=seed)
    dev = next(model.bridge.parameters()).device
    with torch.no_grad():
        acts = capture(model.bridge, torch.as_tensor(tokens, device=dev), [d.prov.hook])[d.prov.hook]
        x = acts[:, 1:].reshape(-1, acts.shape[-1])  # BOS excluded, as in the stores
        code = d.encode(x.to(next(iter(d.state_dict().values())).device))[:, index].float().cpu()
    state = torch.as_tensor(np.where(labels.complete, labels.state, -1)[:, 1:].reshape(-1))
    c = Counts.zeros(1, fsm.n_states)
    fired = code != 0
    c.update(fired[:, None], state)
    f1 = 2 * c.tp[0] / (c.fired[0] + c.pos).clamp_min(1e-300)
    best = int(f1.argmax())
    prec = float(c.tp[0, best] / c.fired[0]) if c.fired[0] > 0 else 0.0
    rec = float(c.tp[0, best] / c.pos[best]) if c.pos[best] > 0 else 0.0
    return TrackedState(best, float(f1[best]), prec, rec, float(fired.float().mean()),
                        float(code[fired].mean()) if fired.any() else 0.0, int(code.numel()))


@dataclass
class Step:
    """One group of a walk: a state's digits, an EOS, or an unfinished state."""

    text: str
    state: int | None = None
    """The state the digits write (None: EOS, unfinished, or not a state of this FSM)."""
    generated: bool = True
    """Written by the model (False: from the prompt)."""
    legal: bool = True
    """A step the FSM allows from the previous state (always True for the first of a walk)."""
    follows: bool = False
    """A successor of the tracked state."""


def segment(fsm: FSM, prompt: list[int], generated: list[int], target: int | None = None) -> list[Step]:
    """Digits after BOS (prompt, then generated) → states, with EOS starting a new walk."""
    succ = set(fsm.successors[target].tolist()) if target is not None else set()
    steps: list[Step] = []
    buf: list[int] = []
    buf_gen = False
    prev: int | None = None
    for i, t in enumerate(list(prompt) + list(generated)):
        gen = i >= len(prompt)
        if t == BOS_ID or not 0 <= t < N_DIGITS:
            if buf:
                steps.append(Step("".join(map(str, buf)), None, buf_gen or gen))
            steps.append(Step("⏎" if t == BOS_ID else f"<{t}>", None, gen))
            buf, buf_gen, prev = [], False, None
            continue
        buf.append(t)
        buf_gen = buf_gen or gen
        if len(buf) == fsm.digits:
            s = int("".join(map(str, buf)))
            ok = s < fsm.n_states
            legal = ok and (prev is None or s in set(fsm.successors[prev].tolist()))
            steps.append(Step("".join(map(str, buf)), s if ok else None, buf_gen, legal, ok and prev is not None and s in succ))
            prev = s if ok else None
            buf, buf_gen = [], False
    if buf:
        steps.append(Step("".join(map(str, buf)), None, buf_gen))
    return steps


def render(steps: list[Step]) -> str:
    """`37 52 │ 08 91 ⏎ 45`: prompt states, a bar, generated states; illegal steps marked ✗."""
    out, bar = [], False
    for s in steps:
        if s.generated and not bar:
            out.append("│")
            bar = True
        out.append(s.text + ("✗" if not s.legal else ""))
    return " ".join(out)


@dataclass
class WalkStats:
    states: int
    """Generated states that follow a state (the first of each walk has no predecessor to judge)."""
    follow: int
    """Of those, successors of the tracked state."""
    legal: int
    """Of those, steps the FSM allows."""

    @property
    def follow_rate(self) -> float:
        return self.follow / self.states if self.states else float("nan")

    @property
    def legal_rate(self) -> float:
        return self.legal / self.states if self.states else float("nan")


def walk_stats(walks: list[list[Step]]) -> WalkStats:
    st = WalkStats(0, 0, 0)
    for steps in walks:
        prev_state = False
        for s in steps:
            if s.state is not None and s.generated and prev_state:
                st.states += 1
                st.follow += s.follows
                st.legal += s.legal
            prev_state = s.state is not None
    return st


@dataclass
class ToySteerReport:
    """`saekit steer` on the toy model: the steered feature's state and what steering did to the walks."""

    tracked: TrackedState
    successors: list[int]
    steered: list[list[Step]] = field(default_factory=list)
    unsteered: list[list[Step]] = field(default_factory=list)
    steered_stats: WalkStats | None = None
    unsteered_stats: WalkStats | None = None
    chance: float = 0.0
    """out_degree / n_states: the follow rate of walks that ignore the feature."""
    digits: int = 2
    """Digits per state (for printing state ids)."""


def toy_report(fsm: FSM, tracked: TrackedState, prompt: list[int], steered: list[list[int]], unsteered: list[list[int]]) -> ToySteerReport:
    """Segment both arms against the tracked state and count how often each follows it."""
    st = [segment(fsm, prompt, g, tracked.state) for g in steered]
    un = [segment(fsm, prompt, g, tracked.state) for g in unsteered]
    return ToySteerReport(tracked, fsm.successors[tracked.state].tolist(), st, un, walk_stats(st), walk_stats(un),
                          fsm.out_degree / fsm.n_states, fsm.digits)


# --- steering a codebook model: a state's code forced on, every codebook active -----------------------


def tracked_code_state(cbm, hook: str, index: int, fsm: FSM, *, n_seq: int = 64, seed: int = 1234) -> TrackedState:
    """The state whose completion code `index` of the codebook at `hook` detects best (F1), read with all codebooks active."""
    from saekit.tokens import row_mask

    ctx = 64
    tokens, labels = generate(fsm, n_seq, ctx, seed=seed)
    t = torch.from_numpy(tokens)
    _, rec = cbm.run(t, record=True)
    mask = row_mask(t, True)
    fired = (rec.codes[hook][..., index].cpu() != 0)[mask]
    state = torch.from_numpy(np.where(labels.complete, labels.state, -1))[mask]
    digit = torch.from_numpy(labels.digit)[mask]
    c = Counts.zeros(1, fsm.n_states)
    c.update(fired[:, None], state)
    f1 = 2 * c.tp[0] / (c.fired[0] + c.pos).clamp_min(1e-300)
    best = int(f1.argmax())
    prec = float(c.tp[0, best] / c.fired[0]) if c.fired[0] > 0 else 0.0
    rec_ = float(c.tp[0, best] / c.pos[best]) if c.pos[best] > 0 else 0.0
    slot = int(torch.bincount(digit[fired], minlength=fsm.digits).argmax()) if fired.any() else -1
    return TrackedState(best, float(f1[best]), prec, rec_, float(fired.float().mean()), 1.0 if fired.any() else 0.0, int(fired.numel()),
                        slot)
