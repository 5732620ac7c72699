"""benchmarks/peers/trainers.py helpers: the shared batch order and the SAELens folder written for dictionary_learning weights."""

from __future__ import annotations

import sys
from pathlib import Path

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
    for arch in ("topk", "standard"):
        if arch == "topk":
            v, i = post.topk(k, dim=-1)
            f = torch.zeros_like(post).scatter(-1, i, v)
        else:
            f = post
        want = f @ dec_w.T + b_dec
        folder = tmp_path / arch
        trainers.write_saelens_folder(folder, arch, enc_w.T, enc_b, dec_w.T, b_dec, meta, k=k if arch == "topk" else None)
        d = saekit.load(folder)
        with torch.no_grad():
            out = d(x)
        assert d.cfg.kind == {"topk": "topk", "standard": "relu"}[arch]
        assert d.prov.hook == meta["hook"] and d.prov.model["name"] == "toy"
        assert torch.allclose(out.x_hat, want, atol=1e-5)
        assert torch.equal(out.codes > 0, f > 0)
