"""`saekit store import`: every file layout becomes a store whose rows equal the arrays; bad files are refused whole."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saekit.errors import SaekitError
from saekit.store import ActivationStore, has_tokens, require_tokens
from saekit.store.importer import ImportConfig, import_store


def rows_of(store_path, hook):
    """Every counted row of a store, in order: (n, width)."""
    s = ActivationStore(store_path)
    acts = s.read_acts(hook, 0, s.n_sequences)
    return acts[s.row_mask(s.read_tokens(0, s.n_sequences))]


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)


def test_npy_rows_equal_and_stats(tmp_path, x):
    np.save(tmp_path / "a.npy", x)
    out = import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s"), context_size=64, chunk_rows=70,
                                    shard_tokens=256, holdout=0.1))
    s = ActivationStore(out)
    assert s.hooks == ["acts"] and s.n_rows == 1000 and len(s.manifest["shards"]) > 1
    np.testing.assert_array_equal(rows_of(out, "acts"), x)
    np.testing.assert_allclose(s.stats("acts")["mean"], x.mean(0), atol=1e-5)
    assert len(s.split("eval")) == 2 and not has_tokens(s.manifest)
    batch = next(iter(s.batches(["acts"], 100)))["acts"]
    assert batch.shape == (100, 12)
    with pytest.raises(SaekitError, match="without tokens"):
        require_tokens(s.manifest, out, "splice-eval")
    assert not (tmp_path / "s.partial").exists()


def test_npy_sequences_keep_their_shape(tmp_path, x):
    seq = x.reshape(50, 20, 12)
    np.save(tmp_path / "a.npy", seq.astype(np.float16))
    out = import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s"), hooks=["blocks.3.hook_resid_post"]))
    s = ActivationStore(out)
    assert s.context_size == 20 and s.n_sequences == 50 and s.dtype == "float16"
    np.testing.assert_array_equal(s.read_acts("blocks.3.hook_resid_post", 0, 50), seq.astype(np.float16).astype(np.float32))
    assert s.manifest["hooks"]["blocks.3.hook_resid_post"]["layer"] == 3


def test_safetensors_one_tensor_and_per_hook(tmp_path, x):
    save_file({"whatever": torch.from_numpy(x).bfloat16()}, tmp_path / "one.safetensors")
    out = import_store(ImportConfig(acts=str(tmp_path / "one.safetensors"), out=str(tmp_path / "s1"), context_size=16))
    assert ActivationStore(out).hooks == ["whatever"] and ActivationStore(out).dtype == "bfloat16"
    np.testing.assert_array_equal(rows_of(out, "whatever"), torch.from_numpy(x).bfloat16().float().numpy())

    y = x[:, :5] * 3
    save_file({"h.a": torch.from_numpy(x), "h.b": torch.from_numpy(y.copy())}, tmp_path / "two.safetensors")
    out = import_store(ImportConfig(acts=str(tmp_path / "two.safetensors"), out=str(tmp_path / "s2"), context_size=16))
    assert sorted(ActivationStore(out).hooks) == ["h.a", "h.b"]
    np.testing.assert_array_equal(rows_of(out, "h.a"), x)
    np.testing.assert_array_equal(rows_of(out, "h.b"), y)
    out = import_store(ImportConfig(acts=str(tmp_path / "two.safetensors"), out=str(tmp_path / "s3"), hooks=["h.b"]))
    assert ActivationStore(out).hooks == ["h.b"]


def test_folder_concatenates_in_name_order(tmp_path, x):
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "part-0.npy", x[:300])
    save_file({"acts": torch.from_numpy(x[300:].copy())}, tmp_path / "f" / "part-1.safetensors")
    out = import_store(ImportConfig(acts=str(tmp_path / "f"), out=str(tmp_path / "s"), hooks=["acts"], context_size=32))
    np.testing.assert_array_equal(rows_of(out, "acts"), x)


@pytest.mark.parametrize("bad, match", [
    (np.zeros(10, np.float32), r"\[n, d\] or \[n_seq, ctx, d\]"),
    (np.zeros((2, 3, 4, 5), np.float32), r"\[n, d\] or \[n_seq, ctx, d\]"),
    (np.zeros((10, 4), np.int64), "floating point"),
])
def test_refuses_bad_arrays(tmp_path, bad, match):
    np.save(tmp_path / "a.npy", bad)
    with pytest.raises(SaekitError, match=match):
        import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s")))
    assert not (tmp_path / "s").exists()


def test_nan_leaves_nothing_behind(tmp_path, x):
    x = x.copy()
    x[777, 3] = np.nan
    np.save(tmp_path / "a.npy", x)
    with pytest.raises(SaekitError, match="row 777"):
        import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s"), chunk_rows=100, shard_tokens=128, context_size=16))
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_refuses_non_empty_out_and_mismatched_files(tmp_path, x):
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "keep.txt").write_text("mine")
    with pytest.raises(SaekitError, match="not empty"):
        import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s")))
    assert (tmp_path / "s" / "keep.txt").read_text() == "mine"
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "0.npy", x)
    np.save(tmp_path / "f" / "1.npy", x[:, :4])
    with pytest.raises(SaekitError, match="disagree"):
        import_store(ImportConfig(acts=str(tmp_path / "f"), out=str(tmp_path / "t")))


def test_cli_one_line_error(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 4), np.int32))
    r = subprocess.run([sys.executable, "-m", "saekit", "store", "import", "--acts", str(tmp_path / "a.npy"), "--out", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s").exists()


def test_splice_eval_and_analyze_refuse_a_tokenless_store(tmp_path, x):
    from saekit.analysis.analyze import AnalyzeConfig, analyze
    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.splice import SpliceConfig, splice_eval

    np.save(tmp_path / "a.npy", x)
    store = import_store(ImportConfig(acts=str(tmp_path / "a.npy"), out=str(tmp_path / "s"), context_size=10))
    d = build(DictConfig(kind="topk", d_in=12, d_dict=24, k=2), Provenance(hook="acts")).save(tmp_path / "d")
    with pytest.raises(SaekitError, match="without tokens or a model .*splice-eval needs a harvested store"):
        splice_eval(SpliceConfig(store=str(store), dicts=[str(d)]))
    with pytest.raises(SaekitError, match="without tokens or a model .*analyze"):
        analyze(AnalyzeConfig(dict=str(d), store=str(store), out=str(tmp_path / "an")))
    assert not (tmp_path / "an").exists()
