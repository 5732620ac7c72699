"""`saekit synth`: the world's rows are its features, and its firing statistics are the ones asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saekit.config import from_dict
from saekit.errors import SaekitError
from saekit.store import ActivationStore, read_manifest
from saekit.synth import SynthConfig, load_truth, make_world, synth


def store_rows(path, hook="synth"):
    s = ActivationStore(path)
    acts = s.read_acts(hook, 0, s.n_sequences)
    return torch.from_numpy(acts[s.row_mask(s.read_tokens(0, s.n_sequences))])


def test_rows_are_true_acts_times_directions(tmp_path, monkeypatch):
    monkeypatch.setattr("saekit.synth.CHUNK_VALUES", 40 * 100)  # chunks of 100 rows,
    monkeypatch.setattr("saekit.synth.TRUTH_FILE_ROWS", 250)  # truth files of 300 rows: 10 files
    cfg = SynthConfig(out=str(tmp_path / "w"), n_features=40, d=16, rows=3000, l0=4, context_size=50, shard_tokens=1000)
    synth(cfg)
    t = load_truth(cfg.out)
    assert len(list(t.folder.glob("acts-*.safetensors"))) == 10
    A = t.acts(0, cfg.rows)
    x = store_rows(cfg.out)
    assert x.shape == (3000, 16)
    torch.testing.assert_close(x, A @ t.world.directions, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.acts(1234, 2345), A[1234:2345])
    assert torch.allclose(t.world.directions.norm(dim=1), torch.ones(40))
    m = read_manifest(cfg.out)["origin"]
    assert m["kind"] == "synth" and m["settings"]["n_features"] == 40 and m["tokens"] is False
    # the power law: frequent features first, mean L0 as asked
    assert torch.all(t.world.p[:-1] >= t.world.p[1:])
    assert abs((A > 0).sum(1).float().mean().item() - 4) < 0.2


def test_seeded(tmp_path):
    a = SynthConfig(out=str(tmp_path / "a"), n_features=20, d=8, rows=500, l0=2, noise=0.1, correlation=0.5)
    synth(a)
    synth(SynthConfig(**{**a.__dict__, "out": str(tmp_path / "b")}))
    synth(SynthConfig(**{**a.__dict__, "out": str(tmp_path / "c"), "seed": 1}))
    assert torch.equal(store_rows(a.out), store_rows(tmp_path / "b"))
    assert not torch.equal(store_rows(a.out), store_rows(tmp_path / "c"))


def test_hierarchy_exclusive_and_correlation(tmp_path):
    cfg = SynthConfig(out=str(tmp_path / "w"), n_features=60, d=16, rows=20000, l0=3, power=0.3, n_parents=3, children=4,
                      child_prob=0.8, correlation=0.6, corr_group=4)
    synth(cfg)
    t = load_truth(cfg.out)
    fire = t.acts(0, cfg.rows) > 0
    par = t.world.parent
    kids = (par >= 0).nonzero().squeeze(1)
    assert len(kids) == 12
    assert not (fire[:, kids] & ~fire[:, par[kids]]).any()  # a child fires only with its parent
    assert (fire[:, 3:15].reshape(-1, 3, 4).sum(-1) <= 1).all()  # exclusive siblings
    # a parent's children fire in ~child_prob of its firings
    share = fire[:, 3:15].reshape(-1, 3, 4).any(-1)[fire[:, :3]].float().mean().item()
    assert abs(share - 0.8) < 0.03
    # marginals kept by the copula; features of one group fire together more than chance
    emp = fire.float().mean(0)
    roots = par < 0
    assert torch.allclose(emp[roots], t.world.p[roots], atol=0.02)
    c = torch.corrcoef(fire[:, 16:40].float().T)
    same = torch.tensor([[i // 4 == j // 4 and i != j for j in range(24)] for i in range(24)])
    diff = ~same & ~torch.eye(24, dtype=torch.bool)
    assert c[same].mean() > 0.1 > c[diff].abs().mean()


@pytest.mark.parametrize("field, value, match", [
    ("n_features", 0, "must be positive"),
    ("d", -1, "must be positive"),
    ("correlation", 1.5, r"probability and must be in \[0, 1\]"),
    ("child_prob", -0.1, r"probability and must be in \[0, 1\]"),
])
def test_config_errors(tmp_path, field, value, match):
    with pytest.raises(SaekitError, match=match):
        from_dict(SynthConfig, {"out": str(tmp_path / "w"), field: value})


def test_l0_too_high_refused_before_writing(tmp_path):
    with pytest.raises(SaekitError, match="too high"):
        synth(SynthConfig(out=str(tmp_path / "w"), n_features=10, d=4, rows=100, l0=8, power=1.0))
    assert not (tmp_path / "w").exists()


def test_world_independent_of_rows():
    a = make_world(SynthConfig(out="x", n_features=30, d=8, rows=100))
    b = make_world(SynthConfig(out="x", n_features=30, d=8, rows=5000))
    assert torch.equal(a.directions, b.directions) and torch.equal(a.p, b.p)
    assert np.isclose(float(a.p.sum()), 8.0)


def test_stream_batches_follow_the_world_and_resume_exactly():
    from saekit.synth import stream_batches

    cfg = SynthConfig(out="unused", n_features=30, d=8, rows=1, l0=2)
    src = stream_batches(cfg, 64)
    it = src(0)
    b = [next(it)["synth"] for _ in range(3)]
    assert b[0].shape == (64, 8) and not torch.equal(b[0], b[1])
    assert torch.equal(next(src(2))["synth"], b[2])
    # rows are non-negative combinations of the world's directions: in their cone, never all zero on average
    assert b[0].norm(dim=1).mean() > 0.5
