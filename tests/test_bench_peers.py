"""benchmarks/peers helpers: the shared batch order, the SAELens folder written for dictionary_learning weights, equal-L0 matching."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))
import trainers  # noqa: E402


def test_batch_stream_is_a_pure_function_of_seed_and_index():
    x = torch.arange(10.0)[:, None]  # 10 rows, batch 4: batches straddle epochs
    first = [b for _, b in zip(range(6), trainers.batch_stream(x, 4, seed=3))]
    resumed = [b for _, b in zip(range(3), trainers.batch_stream(x, 4, seed=3, start_batch=3))]
    assert all(torch.equal(a, b) for a, b in zip(first[3:], resumed))
    epoch0 = torch.cat(first)[:10].flatten().sort().values
    assert torch.equal(epoch0, torch.arange(10.0))  # each epoch visits every row once
    other = [b for _, b in zip(range(6), trainers.batch_stream(x, 4, seed=4))]
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_dictionary_learning_weights_as_saelens_folder_load_in_saekit(tmp_path):
    """dictionary_learning's formulas (encoder Linear on x − b_dec, ReLU, top-k; decoder Linear + b_dec), via saekit.load."""
    import saekit

    g = torch.Generator().manual_seed(0)
    d_in, d_dict, k = 8, 32, 4
    enc_w, enc_b = torch.randn(d_dict, d_in, generator=g), torch.randn(d_dict, generator=g)
    dec_w, b_dec = torch.randn(d_in, d_dict, generator=g), torch.randn(d_in, generator=g)
    x = torch.randn(64, d_in, generator=g)
    post = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    meta = {"model": {"name": "toy"}, "hook": "blocks.0.hook_resid_post"}
    theta = float(post[post > 0].median())  # BatchTopKSAE at inference: ReLU(pre) kept above one scalar threshold
    for arch in ("topk", "standard", "jumprelu"):
        if arch == "topk":
            v, i = post.topk(k, dim=-1)
            f = torch.zeros_like(post).scatter(-1, i, v)
        elif arch == "jumprelu":
            f = post * (post > theta)
        else:
            f = post
        want = f @ dec_w.T + b_dec
        folder = tmp_path / arch
        trainers.write_saelens_folder(folder, arch, enc_w.T, enc_b, dec_w.T, b_dec, meta, k=k if arch == "topk" else None,
                                      threshold=torch.full((d_dict,), theta) if arch == "jumprelu" else None)
        d = saekit.load(folder)
        with torch.no_grad():
            out = d(x)
        assert d.cfg.kind == {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}[arch]
        assert d.prov.hook == meta["hook"] and d.prov.model["name"] == "toy"
        assert torch.allclose(out.x_hat, want, atol=1e-5)
        assert torch.equal(out.codes > 0, f > 0)


def test_frontier_interpolation_in_log_l0():
    """Equal-L0 matching: linear in log L0 between neighbours, None outside the range (no extrapolation)."""
    import math

    from compare import frontier_compare, interpolate_at

    pts = [(10.0, 0.4), (40.0, 0.2), (160.0, 0.1)]
    assert interpolate_at(pts, 20.0) == pytest.approx(0.3)  # halfway between 10 and 40 in log L0
    assert interpolate_at(pts, 40.0) == pytest.approx(0.2)
    assert interpolate_at(pts, 9.0) is None and interpolate_at(pts, 200.0) is None
    assert interpolate_at(pts[:1], 10.0) is None
    ev = lambda l0, fvu: {"l0": l0, "fvu": fvu, "dead_frac": 0.0, "loss_recovered_zero": 1 - fvu, "loss_recovered_mean": 0.5}  # noqa: E731
    sweep = [{"trainer": "saekit", "l1": 1, "eval": ev(100, 0.05)}, {"trainer": "saekit", "l1": 4, "eval": ev(25, 0.2)},
             {"trainer": "saelens", "l1": 2, "eval": ev(50, 0.2)}, {"trainer": "saelens", "l1": 8, "eval": ev(10, 0.5)}]
    front = frontier_compare(sweep)
    inside, outside = front["saelens"][1], front["saelens"][0]
    assert outside["l0"] == 10 and outside["fvu"]["saekit"] is None and "fvu_ratio" not in outside
    assert inside["fvu"]["saekit"] == pytest.approx(0.2 + (0.05 - 0.2) * math.log(2) / math.log(4))
    assert inside["fvu_ratio"] == pytest.approx(inside["fvu"]["saekit"] / 0.2)
    assert [p["l0"] for p in front["points"]["saekit"]] == [25, 100]
