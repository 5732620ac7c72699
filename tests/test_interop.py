"""SAELens and sparsify folders in, SAELens folders out (saekit.interop, `saekit export`).

Foreign folders are written here by hand in each tool's documented layout (the layouts
`SAE.save_model` and sparsify's `SparseCoder.save_to_disk` write), and what saekit loads
is compared with that tool's formula, written out below in plain torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import saekit
from saekit.dictionaries import DictConfig, Dictionary, Provenance, build
from saekit.errors import SaekitError
from saekit.interop.saelens import export_saelens

D_IN, D_SAE = 12, 40
REPO = Path(__file__).resolve().parents[1]


def rand(*shape, g):
    return torch.randn(*shape, generator=g) * 0.4


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def v6_cfg(arch: str, **kw) -> dict:
    """cfg.json as SAELens 6's SAEConfig.to_dict() writes it."""
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.5.0", "sae_lens_training_version": "6.5.0",
                     "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"},
        "architecture": arch,
    }
    cfg.update(kw)
    return cfg


def saelens_tensors(g, jumprelu=False):
    t = {"W_enc": rand(D_IN, D_SAE, g=g), "b_enc": rand(D_SAE, g=g), "W_dec": rand(D_SAE, D_IN, g=g), "b_dec": rand(D_IN, g=g)}
    if jumprelu:
        t["threshold"] = torch.rand(D_SAE, generator=g) * 0.3
    return t


def inputs(g, b_dec, n=50):
    return torch.randn(n, D_IN, generator=g) + b_dec


def assert_same(d: Dictionary, x, f_ref, x_hat_ref):
    with torch.no_grad():
        out = d(x)
    assert torch.equal(out.codes > 0, f_ref > 0), "different latents active"
    torch.testing.assert_close(out.codes, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    assert 0 < (f_ref > 0).sum(-1).float().mean() < D_SAE  # the comparison exercised sparsity


# --- SAELens folders in ------------------------------------------------------------------

@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(tmp_path, apply_b_dec):
    g = torch.Generator().manual_seed(1)
    t = saelens_tensors(g)
    folder = write_saelens(tmp_path / "sae", v6_cfg("standard", apply_b_dec_to_input=apply_b_dec), t)
    d = saekit.load(folder)
    assert d.cfg.kind == "relu" and d.prov.hook == "blocks.3.hook_resid_pre" and d.prov.model["name"] == "gpt2"
    x = inputs(g, t["b_dec"])
    f = torch.relu((x - t["b_dec"] * apply_b_dec) @ t["W_enc"] + t["b_enc"])
    assert_same(d, x, f, f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("rescale", [False, True])
def test_saelens_topk(tmp_path, rescale):
    g = torch.Generator().manual_seed(2)
    t = saelens_tensors(g)
    folder = write_saelens(tmp_path / "sae", v6_cfg("topk", k=5, rescale_acts_by_decoder_norm=rescale), t)
    d = saekit.load(folder)
    assert d.cfg.kind == "topk" and d.cfg.k == 5
    x = inputs(g, t["b_dec"])
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    n = t["W_dec"].norm(dim=-1) if rescale else torch.ones(D_SAE)
    vals, idx = (pre * n).topk(5, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())  # what SAELens's encode returns
    assert_same(d, x, f, (f / n) @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_jumprelu_is_exact(tmp_path, apply_b_dec):
    """Gemma Scope style (apply_b_dec_to_input false): the flag is kept, so the result is bit-identical."""
    g = torch.Generator().manual_seed(3)
    t = saelens_tensors(g, jumprelu=True)
    folder = write_saelens(tmp_path / "sae", v6_cfg("jumprelu", apply_b_dec_to_input=apply_b_dec), t)
    d = saekit.load(folder)
    assert d.cfg.kind == "jumprelu"
    x = inputs(g, t["b_dec"])
    pre = (x - t["b_dec"] * float(apply_b_dec)) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"]).float()
    assert_same(d, x, f, f @ t["W_dec"] + t["b_dec"])
    with torch.no_grad():
        assert torch.equal(d.encode(x), f)


def test_saelens_pre_v6_flat_layout(tmp_path):
    """Older SAELens cfg.json: flat, hook_point, activation_fn_str topk with kwargs, scaling_factor tensor."""
    g = torch.Generator().manual_seed(4)
    t = saelens_tensors(g)
    t["scaling_factor"] = 0.5 + torch.rand(D_SAE, generator=g)
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "pythia-70m-deduped",
        "hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2, "hook_point_head_index": None,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": True, "normalize_activations": False, "sae_lens_training_version": "3.13.0",
        "context_size": 128, "prepend_bos": True,
    }
    d = saekit.load(write_saelens(tmp_path / "old", cfg, t))
    assert d.cfg.kind == "topk" and d.cfg.k == 6
    assert d.prov.hook == "blocks.2.hook_resid_post" and d.prov.model["name"] == "pythia-70m-deduped"
    x = inputs(g, t["b_dec"])
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    vals, idx = pre.topk(6, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert_same(d, x, f, (f * t["scaling_factor"]) @ t["W_dec"] + t["b_dec"])


def test_saelens_expected_average_scale_from_activation_scaler(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = saelens_tensors(g)
    folder = write_saelens(tmp_path / "ckpt", v6_cfg("standard", normalize_activations="expected_average_only_in"), t)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.5}))
    d = saekit.load(folder)
    assert float(d.scale) == 2.5
    x = inputs(g, t["b_dec"]) / 2.5
    f = torch.relu((2.5 * x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    assert_same(d, x, f, (f @ t["W_dec"] + t["b_dec"]) / 2.5)


# --- sparsify folders in -----------------------------------------------------------------

def write_sparsify(folder: Path, g, *, d_in=D_IN, n=D_SAE, k=4, **cfg_kw) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": n, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in, **cfg_kw}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {"encoder.weight": rand(n, d_in, g=g), "encoder.bias": rand(n, g=g), "W_dec": rand(n, d_in, g=g), "b_dec": rand(d_in, g=g)}
    save_file(t, str(folder / "sae.safetensors"))
    return t


def test_sparsify_topk(tmp_path):
    g = torch.Generator().manual_seed(6)
    run = tmp_path / "run"
    t = write_sparsify(run / "layers.1", g)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "sae": {"k": 4}}))
    d = saekit.load(run / "layers.1")
    assert d.cfg.kind == "topk" and d.cfg.k == 4 and d.cfg.d_dict == D_SAE
    assert d.prov.hook == "blocks.1.hook_resid_post" and d.prov.model == {"name": "EleutherAI/pythia-70m", "compat": False}
    x = inputs(g, t["b_dec"])
    # sparsify's SparseCoder.encode / decode: b_dec subtracted, ReLU, then top-k
    pre = torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(4, dim=-1, sorted=False)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    assert_same(d, x, f, f @ t["W_dec"] + t["b_dec"])


@pytest.mark.parametrize("hookpoint,hook", [
    ("h.0.mlp", "blocks.0.hook_mlp_out"),
    ("gpt_neox.layers.3.attention", "blocks.3.hook_attn_out"),
    ("model.layers.12.self_attn", "blocks.12.hook_attn_out"),
    ("embed_tokens", None),
])
def test_sparsify_hookpoint_names(tmp_path, hookpoint, hook):
    write_sparsify(tmp_path / hookpoint, torch.Generator().manual_seed(7))
    d = saekit.load(tmp_path / hookpoint)
    assert d.prov.hook == hook
    assert bool(d.summary["source"]["notes"]) == (hook is None)


def test_sparsify_transcoder_loads_as_a_transcoder(tmp_path):
    """(Its formula is checked in tests/test_coders.py.)"""
    write_sparsify(tmp_path / "layers.2.mlp", torch.Generator().manual_seed(8), transcode=True)
    d = saekit.load(tmp_path / "layers.2.mlp")
    assert d.cfg.kind == "transcoder" and d.out_hooks == ["blocks.2.hook_mlp_out"]


# --- saekit → SAELens → saekit ------------------------------------------------------------

def random_dictionary(kind: str, g, scale=0.37) -> Dictionary:
    prov = Provenance(hook="blocks.1.hook_resid_post", hook_shape=[D_IN], scale=scale,
                      model={"name": "toy", "fingerprint": "abc", "compat": False}, store="runs/store")
    d = build(DictConfig(kind=kind, d_in=D_IN, d_dict=D_SAE, k=5 if kind in ("topk", "batchtopk", "matryoshka") else None), prov)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(rand(*p.shape, g=g))
        if kind in ("batchtopk", "matryoshka"):
            d.threshold.fill_(0.3)
        if kind == "jumprelu":
            d.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
            d.apply_b_dec_to_input.fill_(0.0)
    return d.eval()


@pytest.mark.parametrize("kind,arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"), ("jumprelu", "jumprelu"),
                                       ("matryoshka", "jumprelu")])
def test_roundtrip_through_saelens(tmp_path, kind, arch):
    g = torch.Generator().manual_seed(9)
    d = random_dictionary(kind, g)
    folder = export_saelens(d, tmp_path / "exported")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["model_name"] == "toy"
    t = load_file(str(folder / "sae_weights.safetensors"))

    x = (torch.randn(60, D_IN, generator=g) + d.b_dec.detach()) / 0.37  # hook-scale activations
    with torch.no_grad():
        ref = d(x)
    # SAELens's formula on the exported folder, in the hook's own scale (no normalisation)
    a = 1.0 if cfg["apply_b_dec_to_input"] else 0.0
    pre = (x - a * t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        f = pre.relu()
    elif arch == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        f = pre.relu() * (pre > t["threshold"]).float()
    assert_same(d, x, f, f @ t["W_dec"] + t["b_dec"])
    torch.testing.assert_close(f @ t["W_dec"] + t["b_dec"], ref.x_hat, rtol=1e-5, atol=1e-5)

    back = saekit.load(folder)
    assert back.cfg.kind == kind and back.cfg.k == d.cfg.k
    assert back.prov.hook == d.prov.hook and back.prov.model == d.prov.model and back.prov.store == d.prov.store
    with torch.no_grad():
        again = back(x)
    torch.testing.assert_close(again.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.codes, ref.codes, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.codes > 0, ref.codes > 0)


def test_export_compat_flag_tells_saelens_how_to_load_the_model(tmp_path):
    g = torch.Generator().manual_seed(10)
    d = random_dictionary("relu", g)
    cfg = json.loads((export_saelens(d, tmp_path / "raw") / "cfg.json").read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"]["center_writing_weights"] is False
    d.prov.model = dict(d.prov.model, compat=True)
    cfg = json.loads((export_saelens(d, tmp_path / "compat") / "cfg.json").read_text())
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {}


# --- errors ------------------------------------------------------------------------------

def test_shape_mismatch_with_cfg(tmp_path):
    g = torch.Generator().manual_seed(11)
    t = saelens_tensors(g)
    t["W_enc"] = t["W_enc"].T.contiguous()  # (d_sae, d_in): written the wrong way round
    folder = write_saelens(tmp_path / "bad", v6_cfg("standard"), t)
    with pytest.raises(SaekitError, match=r"W_enc has shape \(40, 12\) but cfg.json \(d_in=12, d_sae=40\) says \(12, 40\)"):
        saekit.load(folder)


def test_unknown_architecture(tmp_path):
    folder = write_saelens(tmp_path / "gated", v6_cfg("gated"), saelens_tensors(torch.Generator().manual_seed(12)))
    with pytest.raises(SaekitError, match="architecture 'gated' is not supported; saekit reads standard, topk, jumprelu"):
        saekit.load(folder)


def test_per_token_normalisation_refused(tmp_path):
    folder = write_saelens(tmp_path / "ln", v6_cfg("standard", normalize_activations="layer_norm"),
                           saelens_tensors(torch.Generator().manual_seed(13)))
    with pytest.raises(SaekitError, match="layer_norm"):
        saekit.load(folder)


def test_folder_matching_no_layout(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(SaekitError) as e:
        saekit.load(tmp_path)
    msg = str(e.value)
    assert "found cfg.json, model.pt" in msg and "sae_weights.safetensors" in msg and "sae.safetensors" in msg


def test_run_folder_names_its_dictionaries(tmp_path):
    for name in ("layers.0", "layers.1"):
        write_sparsify(tmp_path / name, torch.Generator().manual_seed(14))
    with pytest.raises(SaekitError, match=r"holds 2 dictionaries in subfolders \(layers.0, layers.1\)"):
        saekit.load(tmp_path)


def test_codebook_has_no_saelens_equivalent(tmp_path):
    cb = Dictionary(DictConfig(kind="codebook", d_in=D_IN, d_dict=D_SAE, k=2))
    with pytest.raises(SaekitError, match="no SAELens equivalent"):
        export_saelens(cb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_loaded_hook_is_checked_against_the_model(tmp_path, tiny_model_dir):
    """A SAELens SAE for a layer the model lacks is refused when resolved against the model."""
    from saekit.models import load_model, resolve_hooks

    t = saelens_tensors(torch.Generator().manual_seed(15))
    cfg = v6_cfg("standard")
    cfg["metadata"]["hook_name"] = "blocks.7.hook_resid_post"  # the tiny model has 2 layers
    d = saekit.load(write_saelens(tmp_path / "sae", cfg, t))
    with pytest.raises(SaekitError):
        resolve_hooks(load_model(tiny_model_dir), [d.prov.hook])


# --- the CLI -----------------------------------------------------------------------------

def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run `saekit ARGS` in-process through the console entry point; (exit code, stderr)."""
    from saekit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code or 0, capsys.readouterr().err


def test_cli_export_and_errors(tmp_path, monkeypatch, capsys):
    d = random_dictionary("topk", torch.Generator().manual_seed(16))
    d.save(tmp_path / "saekit_dict")
    code, err = run_cli(monkeypatch, capsys, "export", "--dict", str(tmp_path / "saekit_dict"), "--format", "saelens", "--out", str(tmp_path / "sl"))
    assert code == 0, err
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "topk"

    write_saelens(tmp_path / "gated", v6_cfg("gated"), saelens_tensors(torch.Generator().manual_seed(17)))
    for args, needle in [
        (["--dict", str(tmp_path / "gated"), "--out", str(tmp_path / "x")], "architecture 'gated' is not supported"),
        (["--dict", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "does not exist"),
        (["--dict", str(tmp_path / "saekit_dict"), "--format", "sparsify", "--out", str(tmp_path / "x")], "format 'sparsify'"),
    ]:
        code, err = run_cli(monkeypatch, capsys, "export", *args)
        assert code == 2, (args, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "x").exists()


# --- SAELens itself (its own venv; see benchmarks/peers/setup_saelens.sh) -------------------

SAELENS_PY = Path(os.environ.get("SAELENS_VENV", "/work/venv-saelens")) / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PY.is_file(), reason="SAELens venv absent (bash benchmarks/peers/setup_saelens.sh)")
def test_saelens_itself_agrees():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/peers/saelens_roundtrip.py")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all agree" in r.stdout
