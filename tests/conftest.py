"""Shared fixtures: a tiny GPT-2-architecture Hugging Face model and tokenizer written to a temp dir.

Random weights are fine: tests compare saekit against a plain `transformers` forward of
the same files, never against remembered numbers.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,"


def write_tiny_gpt2(path, *, n_layer=2, n_embd=32, n_head=4, n_positions=64, seed=0) -> str:
    """A character-level GPT-2 with random weights, saved with its tokenizer in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    cfg = GPT2Config(
        vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=4 * n_embd, bos_token_id=0, eos_token_id=0,
    )
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="[UNK]",
        pad_token="<|endoftext|>",
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> str:
    """A small corpus: one document per line."""
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "42", "7", "far", "away", "and", "then"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "." for _ in range(200)]
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: small matmuls run faster, and on a shared machine two threads spin-wait
    on each other.  Modules of small-matrix tests opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
