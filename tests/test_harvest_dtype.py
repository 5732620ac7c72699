"""Harvest's forward dtype (`--model-dtype`): the model's own on CUDA by default, float32 on CPU, recorded in
the store's identity only when it is not float32 (so older stores resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saekit import models
from saekit.harvest import HarvestConfig, config_identity, harvest
from saekit.store import ActivationStore

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_forward_dtype_policy(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert models.forward_dtype(str(tmp_path), "cpu") == torch.float32  # CPU: float32 whatever the model's own
    assert models.forward_dtype(str(tmp_path), "cuda") == torch.bfloat16  # read from config.json, no device needed
    assert models.forward_dtype(str(tmp_path), "cuda", "float32") == torch.float32
    assert models.forward_dtype(str(tmp_path), "cpu", "float16") == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert models.forward_dtype(str(tmp_path), "cuda") == torch.float32
    with pytest.raises(ValueError, match="model_dtype"):
        HarvestConfig(model_dtype="int8")


def test_identity_unchanged_for_float32():
    cfg = HarvestConfig(hooks=HOOKS, data="x.txt", out="o")
    d32, h32 = config_identity(cfg, "fp", [])
    assert "model_dtype" not in d32  # what stores harvested before the option hashed
    dbf, hbf = config_identity(cfg, "fp", [], torch.bfloat16)
    assert dbf["model_dtype"] == "bfloat16" and hbf != h32


def test_bfloat16_forward_close_to_float32(tiny_model_dir, tiny_text_file, tmp_path):
    kw = dict(model=tiny_model_dir, hooks=HOOKS, data=tiny_text_file, context_size=32, tokens=300, batch_size=8,
              dtype="float32", shard_tokens=256)
    ref = ActivationStore(harvest(HarvestConfig(**kw, out=str(tmp_path / "f32")), progress=False))
    got = ActivationStore(harvest(HarvestConfig(**kw, model_dtype="bfloat16", out=str(tmp_path / "bf16")), progress=False))
    assert "model_dtype" not in ref.manifest["config"] and got.manifest["config"]["model_dtype"] == "bfloat16"
    for h in HOOKS:
        a, b = ref.read_acts(h, 0, ref.n_sequences), got.read_acts(h, 0, got.n_sequences)
        assert not np.array_equal(a, b)  # it did run in bfloat16
        assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean(), h  # bfloat16's rounding through two blocks


@cuda
def test_cuda_harvest_in_the_models_dtype(tiny_model_dir, tiny_text_file, tmp_path):
    kw = dict(model=tiny_model_dir, hooks=HOOKS, data=tiny_text_file, context_size=32, tokens=300, batch_size=8,
              dtype="float32", shard_tokens=256)
    ref = ActivationStore(harvest(HarvestConfig(**kw, out=str(tmp_path / "cpu")), progress=False))
    got = ActivationStore(harvest(HarvestConfig(**kw, device="cuda", model_dtype="bfloat16", out=str(tmp_path / "gpu")), progress=False))
    for h in HOOKS:
        a, b = ref.read_acts(h, 0, ref.n_sequences), got.read_acts(h, 0, got.n_sequences)
        assert np.abs(a - b).mean() < 0.05 * np.abs(a).mean(), h
