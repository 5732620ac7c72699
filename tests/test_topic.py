"""Topic steering: topic positions from text, topic features by detection F1, and steering that raises the match rate."""

import re

import numpy as np
import pytest
import torch

from saekit.analysis.steer import SteerConfig
from saekit.analysis.topic import detection_scores, topic_positions, topic_steer

HOOK = "blocks.0.hook_resid_pre"


def test_topic_positions_cover_every_token_overlapping_a_match():
    pieces = ["def", " ra", "ise", "_it", "(", "x", ")", " raise"]
    on = topic_positions(pieces, re.compile(r"raise"))
    assert on.tolist() == [False, True, True, False, False, False, False, True]
    assert not topic_positions(pieces, re.compile(r"nothing")).any()


def test_topic_ahead_marks_the_tokens_before_a_match():
    from saekit.analysis.topic import ahead

    on = np.array([0, 0, 0, 1, 0, 0, 1], bool)
    assert ahead(on, 0).tolist() == on.tolist()
    assert ahead(on, 1).tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert ahead(on, 2).tolist() == [0, 1, 1, 0, 1, 1, 0]


def test_detection_scores_match_their_definitions():
    fired = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]], bool)
    target = np.array([1, 1, 0, 0], bool)
    p, r, f = detection_scores(fired, target)
    assert p.tolist() == [1.0, 0.5, 1.0]
    assert r.tolist() == [1.0, 0.5, 0.5]
    assert f[0] == 1.0 and f[1] == pytest.approx(0.5) and f[2] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def topic_setup(tiny_text_file, tmp_path_factory):
    """A store at the embedding hook and an SAE whose latent 0 reads and writes the embedding of 'g'.

    The tiny model's token embeddings (tied to its unembedding) are scaled up so that a
    direction added to the residual stream can move the logits far enough to change samples.
    """
    from conftest import write_tiny_gpt2
    from transformers import GPT2LMHeadModel

    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.harvest import HarvestConfig, harvest
    from saekit.models import load_model
    from saekit.store import ActivationStore

    tiny_model_dir = write_tiny_gpt2(tmp_path_factory.mktemp("tiny-big-emb"))
    m = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        m.transformer.wte.weight.mul_(20.0)
    m.save_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("topic") / "s"
    harvest(HarvestConfig(model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, context_size=32, packing="doc", tokens=2000,
                          out=str(out), holdout=0.3), progress=False)
    st = ActivationStore(out)
    lm = load_model(tiny_model_dir)
    g = lm.tokenizer.convert_tokens_to_ids("g")
    emb = lm.bridge.W_E[g].detach().float()
    scale = float(st.stats(HOOK)["scale"])
    prov = Provenance(hook=HOOK, model=st.model.to_dict(), hook_shape=st.hook_shape(HOOK), scale=scale, store=str(out))
    d = build(DictConfig(kind="relu", d_in=emb.numel(), d_dict=4), prov)
    torch.manual_seed(0)
    with torch.no_grad():
        d.W_enc.copy_(torch.randn_like(d.W_enc) * 0.01)
        d.b_enc.fill_(-1.0)  # latents 1..3 stay silent
        # Latent 0 fires where the (scaled) activation has a large component along 'g''s embedding.
        u = emb / emb.norm()
        xs = torch.as_tensor(st.read_acts(HOOK, 0, st.n_sequences)).reshape(-1, emb.numel()) * scale
        proj = xs @ u
        toks = torch.as_tensor(st.read_tokens(0, st.n_sequences)).reshape(-1)
        cut = 0.5 * (proj[toks == g].min() + proj[toks != g].max())
        d.W_enc[:, 0] = u
        d.b_enc[0] = -cut
        d.W_dec.zero_()
        d.W_dec[0] = u
        d.b_dec.zero_()
    return d, st, lm


def test_topic_features_found_and_steering_raises_the_match_rate(topic_setup):
    d, st, lm = topic_setup
    cfg = SteerConfig(topic="g", n_features=1, strength=40.0, n_prompts=4, prompt_tokens=4, samples=4, max_new_tokens=6, seed=0,
                      store=str(st.path))
    r = topic_steer(cfg, model=lm, dictionary=d, store=st)
    assert r.features[0].index == 0
    assert r.features[0].f1 > 0.9
    assert r.steered_rate > r.unsteered_rate + 0.5
    assert r.n_generations == 16


def test_cli_topic_steering_prints_rates_and_refuses_a_bad_pattern(topic_setup, tmp_path):
    import os
    import subprocess
    import sys

    d, st, lm = topic_setup
    ddir = d.save(tmp_path / "d")
    exe = [sys.executable, "-m", "saekit", "steer", "--dict", str(ddir), "--store", str(st.path), "--strength", "40",
           "--n-prompts", "2", "--prompt-tokens", "4", "--samples", "2", "--max-new-tokens", "4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    r = subprocess.run(exe + ["--topic", "g"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "on topic: steered 100.0%, unsteered 0.0% of 4 generations" in r.stdout
    r = subprocess.run(exe + ["--topic", "("], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
