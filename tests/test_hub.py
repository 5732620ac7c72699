"""`hf://` dictionaries: resolved from a Hugging Face cache laid out exactly as the hub client writes it, offline."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from saekit.errors import SaekitError

REPO, COMMIT = "acme/tiny-saes", "0123456789abcdef0123456789abcdef01234567"
HOOK = "blocks.1.hook_resid_post"


def _hub_cache(tmp_path, folder, path_in_repo, repo=REPO):
    """models--acme--tiny-saes/{blobs/<sha256>, refs/main, snapshots/<commit>/<path>/<file> → ../../blobs/<sha256>}."""
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT / path_in_repo
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return tmp_path / "hub"


@pytest.fixture
def saelens_folder(tmp_path):
    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.interop.saelens import export_saelens

    torch.manual_seed(0)
    d = build(DictConfig(kind="topk", d_in=16, d_dict=32, k=4),
              Provenance(hook=HOOK, hook_shape=[16], scale=0.5, model={"name": "toy", "fingerprint": "f", "compat": False}))
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return d, export_saelens(d, tmp_path / "local")


def test_load_hf_folder_offline_from_the_cache(tmp_path, saelens_folder, monkeypatch):
    import saekit

    d, folder = saelens_folder
    cache = _hub_cache(tmp_path, folder, f"layers/{HOOK}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = saekit.load(f"hf://{REPO}/layers/{HOOK}")
    local = saekit.load(folder)
    x = torch.randn(10, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).x_hat, local(x).x_hat)
        assert torch.allclose(loaded(x).x_hat, d(x).x_hat, atol=1e-5)
    assert loaded.prov.hook == HOOK
    # the same through a CLI-style Path() that folded the double slash
    from pathlib import Path

    assert saekit.load(Path(f"hf://{REPO}/layers/{HOOK}")).cfg.d_dict == 32
    # the revision pinned by its commit
    assert saekit.load(f"hf://{REPO}/layers/{HOOK}@{COMMIT}").cfg.d_dict == 32


def test_offline_miss_and_missing_folder_say_what_to_do(tmp_path, saelens_folder, monkeypatch):
    import saekit

    _, folder = saelens_folder
    cache = _hub_cache(tmp_path, folder, HOOK)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SaekitError, match="not in the Hugging Face cache"):
        saekit.load("hf://acme/other-repo/x")
    with pytest.raises(SaekitError, match="no folder 'blocks.9.hook_resid_post'"):
        saekit.load(f"hf://{REPO}/blocks.9.hook_resid_post")


def test_release_names_resolve_to_their_repositories():
    from saekit.hub import RELEASES, parse

    r = parse("hf://gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert (r.repo, r.path, r.release) == ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", "gpt2-small-res-jb")
    assert parse("hf://pythia-70m-deduped-res-sm/blocks.0.hook_resid_pre").path == "e-res-sm"
    assert parse("hf://pythia-70m-deduped-res-sm/blocks.3.hook_resid_post").path == "3-res-sm"
    assert parse("hf://pythia-70m-deduped-res-sm/3-res-sm").path == "3-res-sm"
    assert parse("hf://llama_scope_lxr_8x/l15r_8x").path == "Llama3_1-8B-Base-L15R-8x"
    g = parse("hf://gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82@main")
    assert (g.repo, g.path, g.revision) == ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "main")
    assert parse("hf://jbloom/GPT2-Small-SAEs-Reformatted").path == ""
    assert {"gpt2-small-res-jb", "gemma-scope-2b-pt-res", "llama_scope_lxr_8x", "pythia-70m-deduped-res-sm"} <= set(RELEASES)
    with pytest.raises(SaekitError, match="names no repository"):
        parse("hf://justonename")


def test_llama_scope_release_refused_with_the_reason():
    from saekit.hub import fetch

    with pytest.raises(SaekitError, match="Llama Scope"):
        fetch("hf://llama_scope_lxr_8x/l15r_8x")


def test_gemma_scope_params_npz_from_the_cache_by_release_name(tmp_path, monkeypatch):
    """A Gemma Scope folder (params.npz) reproduces its own JumpReLU formula; hook and model come from the path."""
    import numpy as np

    import saekit

    g = np.random.default_rng(0)
    d_in, d_sae = 12, 20
    p = {"W_enc": g.normal(size=(d_in, d_sae)), "W_dec": g.normal(size=(d_sae, d_in)), "b_enc": g.normal(size=d_sae) * 0.1,
         "b_dec": g.normal(size=d_in), "threshold": np.abs(g.normal(size=d_sae)) * 0.5}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    local = tmp_path / "npz"
    local.mkdir()
    np.savez(local / "params.npz", **p)
    path = "layer_3/width_16k/average_l0_5"
    cache = _hub_cache(tmp_path, local, path, repo="google/gemma-scope-2b-pt-res")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = saekit.load(f"hf://gemma-scope-2b-pt-res/{path}")
    assert d.cfg.kind == "jumprelu" and (d.cfg.d_in, d.cfg.d_dict) == (d_in, d_sae)
    assert d.prov.hook == "blocks.3.hook_resid_post" and d.prov.model["name"] == "google/gemma-2-2b"
    x = torch.from_numpy(g.normal(size=(30, d_in)).astype(np.float32))
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    f = pre.relu() * (pre > t["threshold"])
    with torch.no_grad():
        out = d(x)
    assert torch.allclose(out.codes, f, atol=1e-5) and torch.allclose(out.x_hat, f @ t["W_dec"] + t["b_dec"], atol=1e-4)
    # a damaged file is refused with the fix
    np.savez(local / "params.npz", W_enc=p["W_enc"])
    with pytest.raises(SaekitError, match="lacks W_dec"):
        saekit.load(local)


def test_hub_model_with_only_pickle_weights_is_refused_before_loading(tmp_path, monkeypatch):
    """A Hub repo (here its cached snapshot, offline) holding only pytorch_model.bin is refused like a local folder."""
    from saekit.models import load_model

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"model_type": "gpt2"}')
    (repo / "pytorch_model.bin").write_bytes(b"not loaded: refused before any unpickling")
    cache = _hub_cache(tmp_path, repo, "", repo="acme/pickled-lm")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAEKIT_ALLOW_PICKLE", "0")
    with pytest.raises(SaekitError, match="Hub model acme/pickled-lm holds only pickle weights.*--allow-pickle"):
        load_model("acme/pickled-lm")


def test_a_hub_models_first_download_is_checked_from_the_repo_listing(tmp_path, monkeypatch):
    """Not cached yet: the Hub's file listing decides, before the loader downloads (or unpickles) anything."""
    import huggingface_hub

    from saekit import models

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("SAEKIT_ALLOW_PICKLE", "0")
    listings = {"acme/pickled-lm": ["config.json", "pytorch_model.bin", "tokenizer.json"],
                "acme/safe-lm": ["config.json", "model.safetensors", "pytorch_model.bin"]}
    asked = []

    def list_repo_files(self, repo_id, **kw):
        asked.append(repo_id)
        if repo_id not in listings:
            raise huggingface_hub.utils.RepositoryNotFoundError(f"{repo_id} not found")
        return listings[repo_id]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)

    def no_download(*a, **kw):
        raise AssertionError("the loader ran: the pickle check must come first")

    import transformer_lens.model_bridge as bridge

    monkeypatch.setattr(bridge.TransformerBridge, "boot_transformers", staticmethod(no_download))
    with pytest.raises(SaekitError, match="Hub model acme/pickled-lm holds only pickle weights.*--allow-pickle"):
        models.load_model("acme/pickled-lm")
    models.check_no_pickle("acme/safe-lm")  # safetensors beside the .bin: the loader takes those
    models.check_no_pickle("acme/missing")  # not a repo: left to the loader's own message
    assert asked == ["acme/pickled-lm", "acme/safe-lm", "acme/missing"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check_no_pickle("acme/pickled-lm")  # offline: the Hub is not asked (the loader cannot download either)
    assert len(asked) == 3
