"""The small pieces shared by saekit's own language-model trainers (the toy FSM model, the pycode text model).

Both train a Hugging Face GPT-2 from scratch on CPU with AdamW, linear warmup then cosine
decay to a tenth, gradient clipping at 1; the data and evaluation differ, so only these
pieces are shared, with the model's shape and schedule (`LMConfig`, nested as `lm` in both configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LMConfig:
    """A small GPT-2's shape and its AdamW schedule (nested as `lm` in ToyTrainConfig and PyTrainConfig; flags --n-layer, --lr, ...)."""

    ctx: int = 128
    """Sequence length in tokens, BOS included (also the model's n_positions)."""
    n_layer: int = 2
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_head: int = 4
    """Attention heads per block."""
    d_mlp: int = 512
    """MLP hidden width."""
    batch_size: int = 32
    """Sequences per step."""
    steps: int = 3000
    """Optimiser steps."""
    lr: float = 3e-3
    """Peak AdamW learning rate (linear warmup, then cosine decay to a tenth)."""
    warmup: int = 100
    """Warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices."""
    threads: int = 0
    """CPU threads for torch during training (0: leave torch's default; 1 is fastest for tiny models or a busy machine)."""

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        for name in ("steps", "batch_size", "n_layer", "d_model", "n_head", "d_mlp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, LayerNorm gains and 1-D tensors are not decayed)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warmup to lr, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def next_token_logits_loss(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), mean next-token cross-entropy) of a causal LM on (B, T) token ids."""
    logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return logits, loss


def train_step(model, opt: torch.optim.Optimizer, tokens: torch.Tensor, lr: float) -> float:
    """One AdamW step at learning rate lr on a batch of token ids; returns the loss."""
    for g in opt.param_groups:
        g["lr"] = lr
    _, loss = next_token_logits_loss(model, tokens)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()
