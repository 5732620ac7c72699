"""The small pieces shared by saekit's own language-model trainers (the toy FSM model, the pycode text model).

Both train a Hugging Face GPT-2 from scratch on CPU with AdamW, linear warmup then cosine
decay to a tenth, gradient clipping at 1; the data and evaluation differ, so only these
pieces are shared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
