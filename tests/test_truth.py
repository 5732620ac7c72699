"""Ground-truth scores: the truth scores 1, noise scores low, latent order does not matter, matching is optimal."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from saekit import metrics
from saekit.dictionaries.base import DictConfig, Provenance
from saekit.errors import SaekitError
from saekit.dictionaries.jumprelu import JumpReLUSAE
from saekit.synth import SynthConfig, load_truth, synth
from saekit.truth import TruthConfig, score_truth


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("truth") / "w"
    synth(SynthConfig(out=str(out), n_features=16, d=128, rows=12000, l0=3, power=0.3, magnitude="constant",
                      n_parents=2, children=3, holdout=0.25))
    return str(out)


def detector(D: torch.Tensor, path, threshold=0.5) -> str:
    """A JumpReLU dictionary whose latents read and write the rows of D."""
    d = JumpReLUSAE(DictConfig(kind="jumprelu", d_in=D.shape[1], d_dict=D.shape[0]), Provenance(hook="synth"))
    with torch.no_grad():
        d.W_enc.copy_(D.T)
        d.W_dec.copy_(D)
        d.threshold.fill_(threshold)
        d.apply_b_dec_to_input.fill_(0)
    d.save(path)
    return str(path)


def test_true_directions_score_one_random_low_permutation_same(world, tmp_path):
    D = load_truth(world).world.directions
    g = torch.Generator().manual_seed(1)
    R = torch.randn(24, 128, generator=g)
    paths = [detector(D, tmp_path / "true"), detector(D[torch.randperm(16, generator=g)], tmp_path / "perm"),
             detector(R / R.norm(dim=1, keepdim=True), tmp_path / "rand")]
    res = score_truth(TruthConfig(dicts=paths, truth=world, json_out=str(tmp_path / "r.json")))
    true, perm, rand = res["dictionaries"]
    assert res["rows"] == 12000 - 70 * 128  # the last ceil(0.25 · 94) of 94 sequences of 128 rows (the last one 96 rows)
    assert true["mcc"] > 0.999 and true["mean_f1"] > 0.99 and true["uniqueness"] == 1.0 and true["dead_frac"] == 0
    # codes = the true activations plus interference from the other directions: L0 and length a little over
    assert abs(true["l0"] - true["true_l0"]) < 0.05 and abs(true["shrinkage"] - 1) < 0.05 and true["absorption"] < 0.01
    for k in ("mcc", "mean_f1", "uniqueness", "absorption", "l0", "fvu", "shrinkage"):
        assert perm[k] == pytest.approx(true[k], abs=1e-6), k
    assert rand["mcc"] < 0.4 and rand["mean_f1"] < 0.5
    assert json.loads((tmp_path / "r.json").read_text())["dictionaries"][0]["per_feature"]["f1"][0] > 0.99


def test_absorbed_parent_is_seen(world, tmp_path):
    """Children's latents that also write the parent, and a parent latent that only fires alone: absorption."""
    t = load_truth(world)
    D = t.world.directions.clone()
    kids = t.world.children_of
    W_enc, W_dec = D.T.clone(), D.clone()
    for par, ch in kids.items():
        for c in ch:
            W_dec[c] = D[c] + D[par]
            W_enc[:, c] = D[c]
        W_enc[:, par] = D[par] - sum(D[c] for c in ch)  # silent whenever a child is on
    d = JumpReLUSAE(DictConfig(kind="jumprelu", d_in=128, d_dict=16), Provenance(hook="synth"))
    with torch.no_grad():
        d.W_enc.copy_(W_enc), d.W_dec.copy_(W_dec), d.threshold.fill_(0.5), d.apply_b_dec_to_input.fill_(0)
    d.save(tmp_path / "abs")
    r = score_truth(TruthConfig(dicts=[str(tmp_path / "abs")], truth=world))["dictionaries"][0]
    assert r["absorption"] > 0.3  # child_prob 0.5: about half of a parent's firings come with a child


def test_hungarian_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n_lat, n_true in [(4, 4), (5, 3), (3, 5), (6, 6)]:
        dec, true = torch.randn(n_lat, 7, generator=g), torch.randn(n_true, 7, generator=g)
        cos = (torch.nn.functional.normalize(dec, dim=1) @ torch.nn.functional.normalize(true, dim=1).T).abs()
        best = max(sum(cos[i, j].item() for i, j in zip(perm, range(n_true)) if i is not None)
                   for perm in itertools.permutations(list(range(n_lat)) + [None] * max(0, n_true - n_lat), n_true))
        assert metrics.mcc(dec, true) == pytest.approx(best / n_true, abs=1e-6)


def test_firing_metric_functions():
    tp = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    p, r, f1 = metrics.firing_f1(tp, torch.tensor([4.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert p[0, 0] == 0.75 and r[0, 0] == 1.0 and f1[0, 0] == pytest.approx(6 / 7) and f1[1, 1] == pytest.approx(4 / 6)
    assert metrics.best_latents(f1).tolist() == [0, 1]
    assert metrics.uniqueness(torch.tensor([0, 0, 1])) == pytest.approx(1 / 3)
    pf = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)
    assert metrics.absorption(pf, torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool), torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool)) == 0.25


def test_width_mismatch_and_non_synthetic_store(world, tmp_path):
    R = torch.randn(8, 64)
    with pytest.raises(SaekitError, match="64-dimensional"):
        score_truth(TruthConfig(dicts=[detector(R, tmp_path / "d")], truth=world))
    r = subprocess.run([sys.executable, "-m", "saekit", "eval", "truth", "--dict", str(tmp_path / "d"), "--truth", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
