"""Steering a codebook model with a state's codes at every codebook (`steer --codebook-model --state`)."""

from __future__ import annotations

import pytest
import torch

from saekit.errors import SaekitError
from saekit.toy.fsm import BOS_ID, load_fsm
from test_toy_tables import exact_codebook_model, toy_in_model  # noqa: F401 - the toy model with its hooks (module fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_patches_force_the_last_digits_or_every_digit_of_each_state(toy_in_model):
    from saekit.analysis.codebook_steer import state_patches

    fsm = load_fsm("toy")
    cbm = exact_codebook_model(toy_in_model, fsm)
    hooks = cbm.hooks
    s = 7
    digs = [int(x) for x in fsm.state_digits()[s]]
    t = torch.tensor([[BOS_ID, 1, 2, 3, 4, 5], [BOS_ID, 1, 2, BOS_ID, 4, 5]])  # row 1: an end of walk where a first digit would be
    final = state_patches(cbm, fsm, s, hooks, "final")(t)
    assert sorted(set(final[hooks[0]].pos[0].tolist())) == [2, 4]  # each state's last digit
    whole = state_patches(cbm, fsm, s, hooks, "state")(t)
    assert sorted(set(whole[hooks[0]].pos[0].tolist())) == [1, 2, 3, 4, 5]
    assert sorted(set(whole[hooks[0]].pos[1].tolist())) == [1, 2, 4, 5]  # the BOS at 3 is left alone
    # the codes at a last digit are the state's own; at a first digit d, those after BOS + state + d
    rec = cbm.run(torch.tensor([[BOS_ID, *digs, 3]]), record=True)[1]
    for h in hooks:
        p = whole[h]
        at = {int(q): p.codes[0, j] for j, q in enumerate(p.pos[0])}
        assert torch.equal(at[2], rec.codes[h][0, 2]) and torch.equal(at[3], rec.codes[h][0, 3])
    with pytest.raises(SaekitError, match="positions"):
        state_patches(cbm, fsm, s, hooks, "middle")


def test_forcing_a_states_codes_makes_generations_follow_its_successors(toy_in_model):
    """Greedy walks with state S forced continue from S far more often than unsteered ones.

    The codebooks' codes are the activations of every BOS + state + next first digit input at every position, so the
    codes forced (those of S's last digit, and of a first digit after S) are exact.
    """
    from saekit.analysis.codebook_steer import state_patches
    from saekit.toy.eval import state_digit_inputs
    from saekit.toy.steer import TrackedState, toy_report

    fsm = load_fsm("toy")
    cbm = exact_codebook_model(toy_in_model, fsm, state_digit_inputs(fsm))
    steered_follow, plain_follow = [], []
    for s in (3, 41, 77):
        prompt = torch.tensor([[BOS_ID, *[int(x) for x in fsm.state_digits()[(s + 37) % fsm.n_states]]]])
        plain = cbm.sample(1, 21, 0, prompt=prompt, temperature=0)[:, 3:]
        st = cbm.sample(1, 21, 0, prompt=prompt, temperature=0, patches=state_patches(cbm, fsm, s, cbm.hooks, "state"))[:, 3:]
        rep = toy_report(fsm, TrackedState(s, 0, 0, 0, 1, 1, 0, 1), prompt[0, 1:].tolist(), st.tolist(), plain.tolist())
        steered_follow.append(rep.steered_stats.follow_rate)
        plain_follow.append(rep.unsteered_stats.follow_rate)
    steered, plain = sum(steered_follow) / 3, sum(plain_follow) / 3
    assert steered > 0.8 and steered > plain + 0.5, (steered_follow, plain_follow)


def test_steer_state_user_errors_on_the_shipped_codebook_model():
    from typer.testing import CliRunner

    from saekit.toy import paper_dir
    from saekit_cli.main import app

    r = CliRunner()
    out = r.invoke(app, ["steer", "--help"])
    assert out.exit_code == 0 and "--state" in out.output and "--sites" in out.output
    base = ["steer", "--codebook-model", str(paper_dir()), "--device", "cpu", "--prompt", "12"]
    for extra, msg in ((["--state", "500"], "no state"), (["--state", "5", "--prompt", "123"], "whole states"),
                       (["--state", "5", "--sites", "mlp[9]"], "names no codebook"), ([], "--state")):
        out = r.invoke(app, base + extra)
        assert isinstance(out.exception, SaekitError) and msg in str(out.exception), extra
