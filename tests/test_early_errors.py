"""Mistakes refused at the first command that can see them, with the fix in the message."""

from __future__ import annotations

import pytest

from saekit.errors import SaekitError


def _touch_layout(folder, files):
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(b"")


def test_dict_above_its_dictionaries_lists_the_nested_folders(tmp_path):
    import saekit
    from saekit.interop import find_dictionary_folders

    root = tmp_path / "dicts"
    _touch_layout(root / "blocks.1.hook_resid_post" / "topk-k16", ("config.json", "weights.safetensors"))
    _touch_layout(root / "blocks.1.hook_resid_post" / "topk-k16" / "checkpoints" / "step-10", ("config.json", "weights.safetensors"))
    _touch_layout(root / "blocks.0.attn.hook_z" / "codebook-k1-g4", ("config.json", "weights.safetensors"))
    _touch_layout(root / "published" / "layer_3", ("cfg.json", "sae_weights.safetensors"))
    (root / "notes").mkdir()

    found = find_dictionary_folders(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "blocks.0.attn.hook_z/codebook-k1-g4", "blocks.1.hook_resid_post/topk-k16", "published/layer_3"]
    assert find_dictionary_folders(root, ("SAELens",)) == [root / "published" / "layer_3"]
    with pytest.raises(SaekitError) as e:
        saekit.load(root)
    msg = str(e.value)
    assert "3 dictionaries" in msg and "blocks.1.hook_resid_post/topk-k16" in msg and "published/layer_3" in msg
    assert "checkpoints" not in msg
    assert f"--dict {found[0]}" in msg


def test_toy_corpus_without_doc_packing_is_refused_at_harvest(tmp_path):
    from saekit.harvest import HarvestConfig, harvest
    from saekit.toy.corpus import ToyDataConfig, write_corpus

    text, labels, seq_len = write_corpus(ToyDataConfig(out=str(tmp_path / "toy.txt"), n_seq=8))
    for kw in ({"packing": "concat", "context_size": seq_len}, {"packing": "doc", "context_size": seq_len // 2}):
        with pytest.raises(SaekitError, match=f"--packing doc --context-size {seq_len}"):
            harvest(HarvestConfig(model="toy", hooks=["blocks.0.hook_resid_post"], data=str(text), out=str(tmp_path / "s"), **kw),
                    progress=False)
        assert not (tmp_path / "s").exists()  # refused before anything was written
    # splice-eval and finetune read the same corpus the same way: concatenated walks would break the FSM's digit pairs
    from saekit.inmodel.finetune import FinetuneConfig, finetune
    from saekit.models import load_model
    from saekit.splice import SpliceConfig, text_tokens

    toy = load_model("toy", device="cpu")
    with pytest.raises(SaekitError, match=f"--packing doc --context-size {seq_len}"):
        text_tokens(SpliceConfig(model="toy", data=str(text)), toy)
    assert text_tokens(SpliceConfig(model="toy", data=str(text), packing="doc", context_size=seq_len), toy).shape == (8, seq_len)
    with pytest.raises(SaekitError, match=f"--packing doc --seq-len {seq_len}"):
        finetune(FinetuneConfig(model="toy", codebooks="mlp[0]:k=1,codes=16", data=str(text), out=str(tmp_path / "ft"), steps=1,
                                eval_sequences=2), progress=False)
    assert not (tmp_path / "ft").exists()
    # the same text without its labels file is ordinary text: nothing to refuse
    labels.unlink()
    from saekit.toy.corpus import check_packing

    check_packing(str(text), "concat", 0, "")
