"""Train the pycode text model: a byte-level BPE tokenizer and a small GPT-2 on the stdlib corpus.

Seeded end to end: the tokenizer is trained on the train files in sorted order, and step i's
batch is drawn from the token stream by a generator seeded with (seed, i), so rerunning the
command on the same Python version gives the same model.  The held-out files are never
trained on; the report compares the model with unigram and bigram models counted on the
same training tokens.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from saekit.config import command_flags, to_dict
from saekit.errors import SaekitError
from saekit.lmtrain import LMConfig, adamw, lr_at, next_token_logits_loss, train_step
from saekit.pycode import corpus

EOT = "<|endoftext|>"
EOT_ID = 0


@dataclass
class PyTrainConfig:
    """Everything that decides a pycode model: tokenizer, transformer, optimisation."""

    out: str = ""
    """Directory to write the model to (Hugging Face format + README.md + pycode_train.json)."""
    overwrite: bool = False
    """Replace an existing model in --out."""
    vocab_size: int = 2048
    """BPE vocabulary size (byte-level, so any text can be encoded)."""
    lm: LMConfig = field(default_factory=LMConfig)
    """The transformer's shape and the optimisation (flags --ctx, --n-layer, --d-model, --n-head, --d-mlp, --batch-size, --steps, --lr, --warmup, --weight-decay, --threads)."""
    eval_every: int = 500
    """Measure held-out loss every this many steps (0: only at the end)."""
    eval_tokens: int = 100_000
    """Held-out tokens used for each evaluation."""
    seed: int = 0
    """Seed of the initialisation and of the batch stream."""

    def __post_init__(self):
        if self.eval_tokens < 1:
            raise ValueError(f"eval_tokens={self.eval_tokens} must be at least 1")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 300 (256 bytes + merges)")
        if self.lm.ctx < 8:
            raise ValueError(f"ctx={self.lm.ctx} must be at least 8")


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) with `<|endoftext|>` as id 0 (BOS, EOS and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(docs, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT,
                                   model_max_length=10**6)


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents' tokens as one int32 stream, each document preceded by `<|endoftext|>`."""
    parts = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        parts.append(np.asarray([EOT_ID] + ids, dtype=np.int32))
    return np.concatenate(parts)


def batch(stream: np.ndarray, batch_size: int, ctx: int, seed: int, step: int) -> torch.Tensor:
    """Step `step`'s batch: BOS + ctx-1 tokens from random offsets, seeded by (seed, step)."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - ctx, size=batch_size)
    out = np.empty((batch_size, ctx), dtype=np.int64)
    out[:, 0] = EOT_ID
    for i, s in enumerate(starts):
        out[i, 1:] = stream[s:s + ctx - 1]
    return torch.from_numpy(out)


def heldout_windows(stream: np.ndarray, ctx: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping BOS + ctx-1 windows of the held-out stream, up to about max_tokens."""
    n = min(len(stream) // (ctx - 1), max(1, max_tokens // ctx))
    w = stream[: n * (ctx - 1)].reshape(n, ctx - 1)
    return torch.from_numpy(np.concatenate([np.full((n, 1), EOT_ID, np.int32), w], 1).astype(np.int64))


@dataclass
class PyEval:
    """Held-out next-token loss (nats) and accuracy of the model and of two count baselines."""

    loss: float
    accuracy: float
    unigram_loss: float
    unigram_accuracy: float
    bigram_loss: float
    bigram_accuracy: float
    bigram_lambda: float
    """The bigram model interpolates λ·bigram + (1-λ)·unigram; λ is the best of a small grid on these tokens."""
    tokens: int
    """Predicted positions scored."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def baselines(train: np.ndarray, windows: torch.Tensor, vocab: int) -> dict:
    """Unigram and interpolated bigram loss/accuracy on the windows' predicted positions."""
    uni = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    uni /= uni.sum()
    big = np.bincount(train[:-1].astype(np.int64) * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float64)
    row = big.sum(1, keepdims=True)
    cond = np.divide(big, row, out=np.zeros_like(big), where=row > 0)
    w = windows.numpy()
    prev, nxt = w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)
    out = {"unigram_loss": float(-np.log(uni[nxt]).mean()), "unigram_accuracy": float((nxt == uni.argmax()).mean())}
    best = None
    for lam in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        loss = float(-np.log(lam * cond[prev, nxt] + (1 - lam) * uni[nxt]).mean())
        if best is None or loss < best[0]:
            best = (loss, lam)
    pred = (0.999 * cond + 0.001 * uni).argmax(1)  # rows never seen fall back to the unigram's choice
    out |= {"bigram_loss": best[0], "bigram_lambda": best[1], "bigram_accuracy": float((pred[prev] == nxt).mean())}
    return out


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, base: dict, batch_size: int = 64) -> PyEval:
    was = model.training
    model.eval()
    tot_loss = correct = n = 0.0
    for i in range(0, len(windows), batch_size):
        t = windows[i:i + batch_size]
        logits, loss = next_token_logits_loss(model, t)
        m = t[:, 1:].numel()
        tot_loss += loss.item() * m
        correct += (logits[:, :-1].argmax(-1) == t[:, 1:]).sum().item()
        n += m
    model.train(was)
    return PyEval(tot_loss / n, correct / n, tokens=int(n), **base)


def build_model(cfg: PyTrainConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.lm.ctx, n_embd=cfg.lm.d_model, n_layer=cfg.lm.n_layer, n_head=cfg.lm.n_head,
        n_inner=cfg.lm.d_mlp, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=EOT_ID,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))


def check_out(cfg: PyTrainConfig) -> Path:
    if not cfg.out:
        raise SaekitError("no output directory; pass --out DIR")
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise SaekitError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    return out


def train_pycode(cfg: PyTrainConfig, progress: Callable[[int, dict], None] | None = None, command: str | None = None) -> tuple[Path, PyEval]:
    """Train, evaluate and save; the model is written to `<out>.partial` and renamed when complete."""
    out = check_out(cfg)
    threads = torch.get_num_threads()
    if cfg.lm.threads:
        torch.set_num_threads(cfg.lm.threads)
    try:
        t0 = time.time()
        tokenizer = train_tokenizer(corpus.documents("train"), cfg.vocab_size)
        train = token_stream(tokenizer, corpus.documents("train"))
        windows = heldout_windows(token_stream(tokenizer, corpus.documents("heldout")), cfg.lm.ctx, cfg.eval_tokens)
        base = baselines(train, windows, cfg.vocab_size)
        model = build_model(cfg)
        model.train()
        opt = adamw(model, cfg.lm.lr, cfg.lm.weight_decay)
        history = []
        for step in range(cfg.lm.steps):
            lr = lr_at(step, cfg.lm.lr, cfg.lm.warmup, cfg.lm.steps)
            info = {"loss": train_step(model, opt, batch(train, cfg.lm.batch_size, cfg.lm.ctx, cfg.seed, step), lr), "lr": lr}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.lm.steps:
                ev = evaluate(model, windows, base)
                info["eval"] = ev.to_dict()
                history.append({"step": step + 1, "train_loss": info["loss"], "loss": ev.loss, "accuracy": ev.accuracy})
            if progress:
                progress(step + 1, info)
        result = evaluate(model, windows, base)
        seconds = time.time() - t0
    finally:
        torch.set_num_threads(threads)
    history.append({"step": cfg.lm.steps, "loss": result.loss, "accuracy": result.accuracy})
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # some writers create files owner-only; give them the user's normal permissions
        os.chmod(f, 0o666 & ~umask)
    command = command or "saekit pycode train " + command_flags(cfg, skip=("overwrite",))
    n_params = sum(p.numel() for p in model.parameters())
    summary = {"config": to_dict(cfg) | {"out": None}, "command": command, "result": result.to_dict(), "seconds": seconds,
               "history": history, "python": platform.python_version(), "train_tokens": int(len(train)),
               "train_files": len(corpus.files("train")), "heldout_files": len(corpus.files("heldout"))}
    (tmp / "pycode_train.json").write_text(json.dumps(summary, indent=2))
    (tmp / "README.md").write_text(readme_text(cfg, result, summary, n_params))
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
    return out, result


def readme_text(cfg: PyTrainConfig, r: PyEval, s: dict, n_params: int) -> str:
    rows = "\n".join(f"| {h['step']} | {h['loss']:.4f} | {h['accuracy']:.2%} |" for h in s["history"])
    return f"""# saekit pycode model

A {cfg.lm.n_layer}-layer GPT-2 (d_model {cfg.lm.d_model}, d_mlp {cfg.lm.d_mlp}, {cfg.lm.n_head} heads, {n_params:,} parameters,
byte-level BPE vocabulary of {cfg.vocab_size}) trained by saekit on the source code of the Python
{s['python']} standard library ({s['train_files']} files, {s['train_tokens']:,} tokens; tests, IDLE and
site-packages left out; {s['heldout_files']} files held out by a hash of their path).

Made with:

    {s['command']}

Held-out next-token prediction ({r.tokens:,} positions of the held-out files):

| model | loss (nats/token) | accuracy |
| --- | --- | --- |
| this model | {r.loss:.4f} | {r.accuracy:.2%} |
| bigram (interpolated with the unigram, λ = {r.bigram_lambda}) | {r.bigram_loss:.4f} | {r.bigram_accuracy:.2%} |
| unigram | {r.unigram_loss:.4f} | {r.unigram_accuracy:.2%} |

Training took {s['seconds'] / 60:.1f} min on this machine's CPU. Load it with
`saekit.models.load_model("pycode")` or pass `--model pycode` to any command.

| step | held-out loss | accuracy |
| --- | --- | --- |
{rows}
"""
