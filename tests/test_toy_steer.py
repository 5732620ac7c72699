"""Steering read against the toy FSM: walks by state, the state a feature tracks, follow rates."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from saekit.toy.fsm import BOS_ID, FSM


def _fsm() -> FSM:
    return FSM.random(n_states=12, out_degree=3, digits=2, seed=0)


def test_segment_groups_digits_by_state_and_marks_steps():
    from saekit.toy.steer import render, segment, walk_stats

    fsm = _fsm()
    a = 5
    b = int(fsm.successors[a][0])
    bad = next(s for s in range(fsm.n_states) if s not in fsm.successors[b])
    target = a  # successors of a are what "follows" means
    c = int(fsm.successors[b][1])
    digits = lambda s: [s // 10, s % 10]  # noqa: E731
    prompt = digits(a)
    gen = digits(b) + digits(bad) + [BOS_ID] + digits(c) + [4]  # legal, illegal, end of walk, new walk, partial
    steps = segment(fsm, prompt, gen, target)
    assert [s.text for s in steps] == [f"{a:02d}", f"{b:02d}", f"{bad:02d}", "⏎", f"{c:02d}", "4"]
    assert [s.generated for s in steps] == [False, True, True, True, True, True]
    assert [s.legal for s in steps] == [True, True, False, True, True, True]
    assert steps[1].follows and steps[2].follows == (bad in fsm.successors[a])

    assert render(steps) == f"{a:02d} │ {b:02d} {bad:02d}✗ ⏎ {c:02d} 4"
    st = walk_stats([steps])
    # judged: b (after a) and bad (after b); c starts a new walk and has no predecessor
    assert (st.states, st.legal, st.follow) == (2, 1, 1 + int(bad in fsm.successors[a]))


def test_tracked_state_finds_the_state_a_feature_fires_on(monkeypatch):
    """A dictionary whose latent j fires exactly where state j was just completed is found with F1 1."""
    import saekit.models as models
    from saekit.toy.steer import tracked_state

    fsm = _fsm()

    def fake_capture(bridge, tokens, hooks):
        # "activations": the one-hot of the state completed at each position (from the tokens, as the labels are)
        from saekit.toy.fsm import labels_from_tokens

        lab = labels_from_tokens(fsm, tokens.numpy())
        s = np.where(lab.complete, lab.state, fsm.n_states)
        return {hooks[0]: torch.nn.functional.one_hot(torch.as_tensor(s), fsm.n_states + 1).float()}

    monkeypatch.setattr(models, "capture", fake_capture)

    class OneHotDict(torch.nn.Module):
        prov = SimpleNamespace(hook="blocks.0.hook_resid_post")

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.eye(fsm.n_states + 1)[:, : fsm.n_states])

        def encode(self, x):
            return x @ self.w

    model = SimpleNamespace(info=SimpleNamespace(n_ctx=33), bridge=torch.nn.Linear(1, 1))
    for j in (3, 7):
        t = tracked_state(model, OneHotDict(), j, fsm, n_seq=32)
        assert t.state == j and t.f1 == 1.0 and t.precision == 1.0 and t.recall == 1.0
        assert t.n_tokens == 32 * 32 and 0 < t.fire_rate < 1 and t.mean_act == 1.0


def test_toy_report_counts_follow_rates_against_chance():
    from saekit.toy.steer import TrackedState, toy_report

    fsm = _fsm()
    s = 4
    succ = fsm.successors[s]
    # steered: every generated state is a successor of s (a legal walk that keeps re-entering them is not needed)
    steered = [[d for t in (succ[0], succ[1], succ[2]) for d in (t // 10, t % 10)]]
    other = [t for t in range(fsm.n_states) if t not in succ][:3]
    unsteered = [[d for t in other for d in (t // 10, t % 10)]]
    tr = TrackedState(s, 1.0, 1.0, 1.0, 0.1, 1.0, 100)
    rep = toy_report(fsm, tr, [0, s], steered, unsteered)
    assert rep.steered_stats.follow_rate == 1.0 and rep.unsteered_stats.follow_rate == 0.0
    assert rep.steered_stats.states == 3 and rep.chance == fsm.out_degree / fsm.n_states
    assert rep.successors == succ.tolist()
