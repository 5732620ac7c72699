"""Time the original Codebook Features library's in-model codebook training steps (runs in ITS venv).

Builds the TokFSM model and codebooks of the library's own `fsm_main.yaml` as its
`train_fsm_model.load_model` does (GPT-NeoX, 4 layers, d 128, codebooks at every layer on the
attention pre-projection (one group per head) and the MLP output, k = 1, 1000 codes,
inner product, the "aeloss" objective), the optimiser its script builds (AdamW, codebook
and model groups, lr 1e-3), and times `loss.backward(); opt.step()` on given token
batches.  Prints one JSON line.  Used by benchmarks/codebook_speed.py; set up the venv with
benchmarks/peers/setup_codebook_features.sh.

Usage: python codebook_features_step.py --batch 64 --steps 20 --warmup 3 --threads 1 [--logging]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logging", action="store_true", help="keep the codebooks' metric logging on (the library's default)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    import transformers
    from codebook_features import models  # (train_fsm_model loads an `evaluate` metric from the Hub at import: not offline)

    codebook_args = dict(codebook_at=["attn_preproj", "mlp"], codebook_type=["group", "vanilla"], num_codebooks=[-1, 1],
                         k_codebook=[1, 1], num_codes=1000, layers_to_snap="all", similarity_metric="inner_product",
                         loss="aeloss", kmeans_init=False, codebook_kwargs={"replace_after_steps": 0, "replace_rho": 1e-4})
    # what train_fsm_model.load_model builds for fsm_main.yaml
    config = transformers.GPTNeoXConfig(vocab_size=11, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                        rotary_emb_base=10000, bos_token_id=10, eos_token_id=10, max_position_embeddings=a.seq_len)
    model = models.wrap_codebook(transformers.GPTNeoXForCausalLM(config), config=models.CodebookModelConfig(**codebook_args))
    if a.logging:
        model.enable_logging()
    if not a.logging:
        model.disable_logging()
    model.train()
    params = [{"params": model.get_codebook_params(), "lr": 1e-3, "weight_decay": 0.0},
              {"params": model.get_model_params(), "lr": 1e-3, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, 1e-3)
    rng = np.random.default_rng(a.seed)

    def batch() -> torch.Tensor:
        t = rng.integers(0, 10, size=(a.batch, a.seq_len))
        t[:, 0] = 10  # BOS
        return torch.from_numpy(t).long()

    def step(t: torch.Tensor) -> float:
        out = model(input_ids=t, labels=t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    for _ in range(a.warmup):
        step(batch())
    data = [batch() for _ in range(a.steps)]
    w0, c0 = time.perf_counter(), time.process_time()
    for t in data:
        loss = step(t)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n_cb = sum(1 for _ in model.all_codebooks.values())
    tokens = a.steps * a.batch * a.seq_len
    print(json.dumps({"side": "codebook-features 0.1.2", "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall,
                      "tokens_per_cpu_s": tokens / cpu, "last_loss": loss, "layers_with_codebooks": n_cb, "threads": a.threads,
                      "batch": a.batch, "steps": a.steps, "logging": a.logging}))


if __name__ == "__main__":
    main()
