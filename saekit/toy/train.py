"""Train the toy model: a small GPT-2 (Hugging Face `GPT2LMHeadModel`) on walks of a random FSM.

Data is drawn fresh every step from the FSM (an endless stream, so no dropout and no
overfitting to a fixed corpus); the step's batch depends only on (seed, step), so a run
is reproducible from its seed.  The result is a plain Hugging Face directory (config,
safetensors weights, a character-level tokenizer) plus `fsm.json`, so every stage of
saekit loads it like any other model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saekit.config import apply_preset, command_flags, to_dict
from saekit.errors import SaekitError
from saekit.lmtrain import LMConfig, adamw, lr_at, next_token_logits_loss, train_step
from saekit.toy.fsm import (BOS_ID, BOS_TOKEN, FSM, VOCAB_SIZE, check_shape, generate, load_matrix, optimum_loss, transition_accuracy,
                            unigram_entropy)


ARCHS = ("gpt2", "gpt-neox")
# Codebook Features' TokFSM model (train_fsm_model.py + fsm_main.yaml of library 0.1.2): GPT-NeoX with Hugging Face's
# defaults (rotary on a quarter of each head, parallel residual), 4 layers, hidden 128, MLP 512, 4 heads, sequences of
# 128, and the FSM its seed 42 draws (100 states, 10 successors, two digits).  The layer sizes are saekit's defaults too.
PRESETS: dict[str, dict] = {
    "paper": {"arch": "gpt-neox", "rotary_pct": 0.25, "fsm_seed": 42, "n_states": 100, "out_degree": 10, "digits": 2,
              "n_layer": 4, "d_model": 128, "d_mlp": 512, "n_head": 4, "ctx": 128},
}


def with_preset(cfg: "ToyTrainConfig") -> "ToyTrainConfig":
    """cfg with its preset's values in every field still at the dataclass default (what the user set wins)."""
    return apply_preset(cfg, PRESETS[cfg.preset]) if cfg.preset else cfg


@dataclass
class ToyTrainConfig:
    """Everything that decides a toy model: the FSM, the transformer and the optimisation."""

    out: str = ""
    """Directory to write the model to (Hugging Face format + fsm.json + README.md)."""
    overwrite: bool = False
    """Replace an existing model in --out."""
    n_states: int = 100
    """Number of FSM states."""
    out_degree: int = 10
    """Successors per state, each taken with equal probability."""
    digits: int = 2
    """Digit tokens that write one state (10**digits must be >= n_states)."""
    fsm_seed: int = 0
    """Seed of the random FSM (its successor table); 42 gives the Codebook Features library's fsm.npy."""
    fsm: str | None = None
    """Transition-matrix file (.npy, (S, S) floats, equal successors per row) to use instead of a random FSM; n_states and out_degree come from it."""
    arch: str = "gpt2"
    """Transformer family: gpt2 (learnt positions) or gpt-neox (rotary positions, as the Codebook Features TokFSM model)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the training stream."""
    lm: LMConfig = field(default_factory=lambda: LMConfig(n_layer=4, batch_size=64, steps=1000))
    """The transformer's shape and the optimisation (flags --ctx, --n-layer, --d-model, --n-head, --d-mlp, --batch-size, --steps, --lr, --warmup, --weight-decay, --threads)."""
    eval_every: int = 100
    """Measure held-out loss and transition accuracy every this many steps (0: only at the end)."""
    eval_seqs: int = 64
    """Held-out sequences for the loss, and sequences generated for transition accuracy."""
    rotary_pct: float = 1.0
    """gpt-neox: share of each head's width that gets rotary positions (Codebook Features' model: 0.25, the Hugging Face default)."""
    preset: str = ""
    """paper: Codebook Features' TokFSM model (GPT-NeoX, 4 layers, d_model 128, MLP 512, 4 heads, rotary, its FSM) for every field left at its default; empty: none."""

    def __post_init__(self):
        if self.preset not in ("", *PRESETS):
            raise ValueError(f"preset={self.preset!r} is not one of {', '.join(PRESETS)}")
        if not 0 < self.rotary_pct <= 1:
            raise ValueError(f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.fsm is None:
            check_shape(self.n_states, self.out_degree, self.digits)
        if self.lm.ctx < self.digits + 2:
            raise ValueError(f"ctx={self.lm.ctx} must hold BOS and at least one state plus a digit ({self.digits + 2} tokens)")
        if self.eval_seqs < 1:
            raise ValueError(f"eval_seqs={self.eval_seqs} must be at least 1")


@dataclass
class ToyEval:
    """How good a toy model is, in nats per token and as a share of valid FSM steps."""

    loss: float
    """Mean next-token cross-entropy on held-out sequences."""
    optimum: float
    """The FSM's exact next-token entropy: the lowest loss possible."""
    unigram: float
    """Loss of the best position-blind digit-frequency model (the plateau before learning)."""
    transition_accuracy: float
    """Share of state-to-state steps in sampled generations that the FSM allows."""
    n_transitions: int
    """Steps counted for transition_accuracy."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def build_model(cfg: ToyTrainConfig):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.arch == "gpt-neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=cfg.lm.d_model, num_hidden_layers=cfg.lm.n_layer, num_attention_heads=cfg.lm.n_head,
            intermediate_size=cfg.lm.d_mlp, max_position_embeddings=cfg.lm.ctx, rotary_pct=cfg.rotary_pct, use_parallel_residual=True,
            bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID, hidden_dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=False,
        ))
    hf = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=cfg.lm.ctx, n_embd=cfg.lm.d_model, n_layer=cfg.lm.n_layer, n_head=cfg.lm.n_head,
        n_inner=cfg.lm.d_mlp, bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(hf)


def make_tokenizer():
    """Character-level tokenizer: digit d → id d, `<|endoftext|>` → 10 (also the stand-in for unknown characters)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {str(d): d for d in range(10)} | {BOS_TOKEN: BOS_ID}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=BOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN, pad_token=BOS_TOKEN, unk_token=BOS_TOKEN,
        model_max_length=10**6,
    )


@torch.no_grad()
def sample(model, n_seq: int, ctx: int, seed: int) -> np.ndarray:
    """Generate n_seq sequences of up to ctx tokens from BOS at temperature 1, seeded.

    Uses `generate` (KV-cached, stable across transformers versions).  A sampled EOS ends
    its sequence (the rest is padded with EOS), which `transition_accuracy` counts as one
    invalid step.
    """
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    was_training = model.training
    model.eval()
    gen = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=ctx - 1,
        bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=BOS_ID,
    )
    ids = torch.full((n_seq, 1), BOS_ID, dtype=torch.long)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pad == eos warning does not apply: nothing is padded on input
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    finally:
        hf_logging.set_verbosity(verbosity)
        model.train(was_training)
    return out.numpy()


@torch.no_grad()
def evaluate(model, fsm: FSM, ctx: int, n_seq: int = 64, seed: int = 0) -> ToyEval:
    """Held-out loss (fresh sequences from a stream training never uses) and transition accuracy."""
    was_training = model.training
    model.eval()
    tokens, _ = generate(fsm, n_seq, ctx, seed=[seed, 1])
    t = torch.from_numpy(tokens)
    loss = next_token_logits_loss(model, t)[1].item()
    acc, n = transition_accuracy(fsm, sample(model, n_seq, ctx, seed))
    model.train(was_training)
    return ToyEval(loss, optimum_loss(fsm, ctx), unigram_entropy(fsm, ctx), acc, n)


def check_out(cfg: ToyTrainConfig) -> Path:
    """Refuse a missing or occupied --out before any work."""
    if not cfg.out:
        raise SaekitError("no output directory; pass --out DIR")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise SaekitError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    return out


def _prepare_out(cfg: ToyTrainConfig) -> tuple[Path, Path]:
    out = check_out(cfg)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return out, tmp


def make_fsm(cfg: ToyTrainConfig) -> FSM:
    """The run's FSM: from --fsm when given (its digits from --digits if that can write every state), else random."""
    if cfg.fsm:
        return load_matrix(cfg.fsm, cfg.digits)
    return FSM.random(cfg.n_states, cfg.out_degree, cfg.digits, cfg.fsm_seed)


def readme_text(cfg: ToyTrainConfig, fsm: FSM, result: ToyEval, seconds: float, command: str, n_params: int) -> str:
    arch = "GPT-NeoX (rotary positions)" if cfg.arch == "gpt-neox" else "GPT-2"
    return f"""# saekit toy model

A {cfg.lm.n_layer}-layer {arch} (d_model {cfg.lm.d_model}, d_mlp {cfg.lm.d_mlp}, {cfg.lm.n_head} heads, {n_params:,} parameters)
trained by saekit on random walks of a finite-state machine ({fsm.n_states} states,
{fsm.out_degree} equally likely successors each, every state written as {fsm.digits} digit tokens;
the FSM is in `fsm.json`). Vocabulary: digits 0-9 are ids 0-9, `<|endoftext|>` (BOS/EOS) is id 10.

Made with:

    {command}

| measure | value |
| --- | --- |
| held-out loss (nats/token) | {result.loss:.4f} |
| optimum (exact next-token entropy of the FSM) | {result.optimum:.4f} |
| unigram entropy (plateau before learning) | {result.unigram:.4f} |
| transition accuracy (valid steps in {result.n_transitions} sampled transitions) | {result.transition_accuracy:.2%} |
| training time on this machine's CPU | {seconds / 60:.1f} min |

Load it with `saekit.models.load_model("toy")` or pass `--model toy` to any command.
"""


def train_toy(cfg: ToyTrainConfig, progress: Callable[[int, dict], None] | None = None, command: str | None = None) -> tuple[Path, ToyEval]:
    """Train, evaluate and save a toy model to cfg.out; returns (directory, final evaluation).

    `progress(step, info)` is called after every step (info: loss, lr, and the latest
    evaluation when one was made).  The model is written to `<out>.partial` and renamed
    when complete, so an interrupted run never leaves a half-written model under --out.
    """
    cfg = with_preset(cfg)
    threads = torch.get_num_threads()
    if cfg.lm.threads:
        torch.set_num_threads(cfg.lm.threads)
    try:
        return _train(cfg, progress, command)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ToyTrainConfig, progress, command) -> tuple[Path, ToyEval]:
    out, tmp = _prepare_out(cfg)
    fsm = make_fsm(cfg)
    model = build_model(cfg)
    model.train()
    opt = adamw(model, cfg.lm.lr, cfg.lm.weight_decay)
    history = []
    t0 = time.time()
    for step in range(cfg.lm.steps):
        lr = lr_at(step, cfg.lm.lr, cfg.lm.warmup, cfg.lm.steps)
        tokens, _ = generate(fsm, cfg.lm.batch_size, cfg.lm.ctx, seed=[cfg.seed, 0, step])
        info = {"loss": train_step(model, opt, torch.from_numpy(tokens), lr), "lr": lr}
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.lm.steps:
            ev = evaluate(model, fsm, cfg.lm.ctx, cfg.eval_seqs, seed=cfg.seed)
            info["eval"] = ev.to_dict()
            history.append({"step": step + 1, "train_loss": info["loss"], **ev.to_dict()})
        if progress:
            progress(step + 1, info)
    seconds = time.time() - t0
    result = evaluate(model, fsm, cfg.lm.ctx, max(cfg.eval_seqs, 64), seed=cfg.seed)
    history.append({"step": cfg.lm.steps, **result.to_dict()})

    model.save_pretrained(tmp, safe_serialization=True)
    make_tokenizer().save_pretrained(tmp)
    fsm.save(tmp / "fsm.json")
    command = command or "saekit toy train " + command_flags(cfg, skip=("overwrite",))
    n_params = sum(p.numel() for p in model.parameters())
    summary = {"config": to_dict(cfg) | {"out": None}, "command": command, "result": result.to_dict(), "seconds": seconds, "history": history}
    (tmp / "toy_train.json").write_text(json.dumps(summary, indent=2))
    (tmp / "README.md").write_text(readme_text(cfg, fsm, result, seconds, command, n_params))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out, result
