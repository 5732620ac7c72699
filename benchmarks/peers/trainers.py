"""Train one SAE with one toolkit on activations from a file, timed; run once per (toolkit, kind) by compare.py.

    python trainers.py --trainer saekit|saelens|dictionary_learning|sparsify --kind topk|relu \
        --acts DIR/acts.safetensors --out DIR/<trainer>-<kind> --d-dict 1024 --k 32 --l1 5 \
        --lr 4e-4 --batch-size 4096 --tokens 2000000 --seed 0 --threads 2

Why a separate process per run: SAELens needs transformer-lens < 4 and saekit 4, so the
peers run in their own venv (setup_peers.sh), and a fresh process per run makes peak memory
(the kernel's high-water mark of resident memory, reset just before training starts, minus
the resident memory at that moment) one number per trainer, measured the same way for every
toolkit.  This file imports no saekit unless the trainer is
saekit, so it runs in either venv.

Every trainer gets exactly the same batches: the rows of `train` in acts.safetensors (the
hook's original units), in an order fixed by `--seed` (a fresh permutation per epoch).
Each toolkit is used as its users would use it: its own SAE classes and trainer (saekit
`Trainer`, SAELens `SAETrainer`, dictionary_learning `trainSAE`), or, for sparsify, whose
`Trainer` only trains from a model + token dataset, the body of its training step (its
`SparseCoder` forward and loss, its decoder constraints, Adam) over the same batches.  Each
normalises inputs the way its documentation recommends (saekit: the store's scale, so
E‖x‖² = d_in; SAELens: normalize_activations="expected_average_only_in"; dictionary_learning:
normalize_activations=True, E‖x‖² = 1; sparsify: none, its loss is the FVU).

Writes OUT/result.json {trainer, kind, tokens, steps, train_seconds, tokens_per_s,
rss_before_mb, peak_rss_mb, train_rss_mb, format, folder, notes} and the dictionary in a
folder saekit reads (saekit's own, SAELens's cfg.json + sae_weights.safetensors, or
sparsify's cfg.json + sae.safetensors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TRAINERS = ("saekit", "saelens", "dictionary_learning", "sparsify")
KINDS = ("topk", "relu", "relu_april", "batchtopk", "jumprelu", "jumprelu_tanh", "jumprelu_quadratic", "matryoshka", "transcoder")
"""relu_april: dictionary_learning's StandardTrainerAprilUpdate (decoder-norm-weighted L1, free decoder norms);
jumprelu_tanh: SAELens's JumpReLU in the setup its docs recommend (Anthropic's tanh loss), --l1 as its l0_coefficient;
jumprelu_quadratic: SAELens's `jumprelu` (quadratic loss around target_l0 = k) with --l1 as its l0_coefficient (`jumprelu`: 1.0);
transcoder: a TopK transcoder from meta["hook"] to meta["target_hook"]; acts.safetensors then also holds `target`."""


def _status_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc/self/status, in MB (None where there is no procfs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_mark() -> float:
    """Resident MB now, with the kernel's high-water mark reset to it (so a later peak is training's own).

    Loading the activations briefly holds extra copies; without the reset that load peak would
    hide the training peak.  Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); where that is not
    possible the process-wide ru_maxrss is used, which can only overstate the peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _status_mb("VmRSS") or 0.0


def peak_mb() -> float:
    """High-water mark of resident memory since `memory_mark` (or since the start), in MB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batch_stream(x: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of rows of x: epoch e is permutation (seed, e) cut into batches; batch i is always the same."""
    n = x.shape[0]
    pos = start_batch * batch_size
    epoch = pos // n
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    while True:
        parts, need = [], batch_size
        while need:
            off = pos - epoch * n
            take = min(need, n - off)
            parts.append(perm[off:off + take])
            pos += take
            need -= take
            if pos == (epoch + 1) * n:
                epoch += 1
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield x[torch.cat(parts)]


def write_saelens_folder(out: Path, arch: str, W_enc, b_enc, W_dec, b_dec, meta: dict, k: int | None = None,
                         threshold=None, apply_b_dec_to_input: bool = True) -> None:
    """A SAELens v6 inference folder (cfg.json + sae_weights.safetensors) for weights of another toolkit."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        tensors["threshold"] = threshold
    save_file({n: t.detach().float().contiguous().cpu() for n, t in tensors.items()}, str(out / "sae_weights.safetensors"))
    cfg = {
        "architecture": arch, "d_in": int(W_enc.shape[0]), "d_sae": int(W_enc.shape[1]), "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.0.0", "model_name": meta["model"].get("name"), "hook_name": meta["hook"],
                     "model_from_pretrained_kwargs": {"fold_ln": False, "center_writing_weights": False}},
    }
    if arch == "topk":
        cfg |= {"k": k, "rescale_acts_by_decoder_norm": False}
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))


# --- one function per toolkit: build, train (timed), save --------------------------------------
# Each returns (seconds spent training, rss before training in MB, output format, notes).

def train_saekit(a, x: torch.Tensor, meta: dict, out: Path):
    from saekit.dictionaries import Provenance
    from saekit.train import HookSource, TrainConfig, Trainer
    from saekit.config import from_flags

    hook = meta["hook"]
    coder = a.kind == "transcoder"
    target = [meta["target_hook"]] if coder else []
    cfg = from_flags(TrainConfig, store="(in memory)", hooks=[hook], out=str(out / "run"), kind=a.kind, d_dict=a.d_dict, k=[a.k],
                      l1=[a.l1], lr=a.lr, batch_size=a.batch_size, tokens=a.tokens, seed=a.seed, checkpoint_every=0,
                      eval_tokens=0, device="cpu", target=target)
    prov = Provenance(hook=hook, model=meta["model"], hook_shape=meta["hook_shape"], scale=meta["scale"], store=meta.get("store"))
    d_in = meta["width"] if coder else x.shape[1]
    sources = {hook: HookSource(d_in, prov)}
    if coder:  # x holds [input | target] side by side, so one permutation serves both
        tprov = Provenance(hook=target[0], model=meta["model"], hook_shape=meta["target_shape"], scale=meta["target_scale"],
                           store=meta.get("store"))
        sources[target[0]] = HookSource(x.shape[1] - d_in, tprov)
    trainer = Trainer(cfg, sources, lambda start: ({hook: b[:, :d_in], **({target[0]: b[:, d_in:]} if coder else {})}
                                                   for b in batch_stream(x, a.batch_size, a.seed, start)), progress=False)
    before = memory_mark()
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    folder = trainer.save()[0]
    return seconds, before, str(folder), []


def train_saelens(a, x: torch.Tensor, meta: dict, out: Path):
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig,
                          TopKTrainingSAE, TopKTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    steps = math.ceil(a.tokens / a.batch_size)
    md = SAEMetadata(model_name=meta["model"].get("name"), hook_name=meta["hook"],
                     model_from_pretrained_kwargs={"fold_ln": False, "center_writing_weights": False})
    common = dict(d_in=x.shape[1], d_sae=a.d_dict, normalize_activations="expected_average_only_in", metadata=md)
    torch.manual_seed(a.seed)
    if a.kind == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=a.k, **common))
    elif a.kind == "batchtopk":  # saved for inference as JumpReLU with its learned threshold
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=a.k, **common))
    elif a.kind in ("jumprelu", "jumprelu_quadratic"):  # its target-L0 mode (GemmaScope 2's quadratic loss), as saekit's jumprelu targets k
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        coef = {"l0_coefficient": a.l1} if a.kind == "jumprelu_quadratic" else {}
        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(jumprelu_sparsity_loss_mode="quadratic", target_l0=float(a.k), **coef, **common))
    elif a.kind == "matryoshka":  # BatchTopK with nested prefixes; the same prefix sizes as saekit's matryoshka
        from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

        widths = [a.d_dict >> s for s in (4, 3, 2, 1) if a.d_dict >> s > a.k] + [a.d_dict]
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(k=a.k, matryoshka_widths=widths, **common))
    elif a.kind == "jumprelu_tanh":  # the docs' recommended JumpReLU; no target L0, so --l1 (its l0_coefficient) is searched
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            jumprelu_sparsity_loss_mode="tanh", l0_coefficient=a.l1, jumprelu_tanh_scale=4.0, jumprelu_bandwidth=2.0,
            jumprelu_init_threshold=0.1, pre_act_loss_coefficient=3e-6, l0_warm_up_steps=steps, **common))
    else:
        # saekit's loss is SAELens's divided by d_in (both: Σ‖e‖² + λ Σ f_i‖W_dec,i‖ on E‖x‖² = d_in), so λ is the same.
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=a.l1, l1_warm_up_steps=max(1, round(0.05 * steps)), **common))
    # lr_end as LanguageModelSAERunnerConfig fills it in (unused by the default constant schedule).
    notes = ["n_batches_for_norm_estimate=16 (default 1000) so the estimate does not dominate a short run"]
    extra = {}
    if a.kind == "jumprelu_tanh":
        # The docs: λ warm-up over the whole run, lr decayed over the last 20%; the pre-act loss acts on dead latents,
        # whose window (default 1,000 steps) is set to a tenth of the run, as saekit's, or it would never act here.
        extra = dict(lr_decay_steps=steps // 5, dead_feature_window=max(1, steps // 10))
        notes.append(f"tanh mode as the docs recommend; l0_coefficient {a.l1:g} warmed up over all {steps} steps; lr decay over "
                     f"the last {steps // 5} steps; dead_feature_window {max(1, steps // 10)} steps (default 1,000)")
    tcfg = SAETrainerConfig(total_training_samples=a.tokens, train_batch_size_samples=a.batch_size, lr=a.lr, lr_end=a.lr / 10,
                            device="cpu", logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=16, **extra)
    trainer = SAETrainer(tcfg, sae, data_provider=batch_stream(x, a.batch_size, a.seed))
    before = memory_mark()
    t0 = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - t0
    folder = out / "saelens"
    sae.save_inference_model(str(folder))
    return seconds, before, str(folder), notes


def train_dictionary_learning(a, x: torch.Tensor, meta: dict, out: Path):
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    steps = math.ceil(a.tokens / a.batch_size)
    d_in = x.shape[1]
    common = dict(steps=steps, activation_dim=d_in, dict_size=a.d_dict, layer=0, lm_name=str(meta["model"].get("name")),
                  lr=a.lr, warmup_steps=0, seed=a.seed, device="cpu")
    notes = ["lr warmup 0 (default 1000 steps) to match the others' constant lr"]
    if a.kind == "topk":
        cfg = dict(trainer=TopKTrainer, dict_class=AutoEncoderTopK, k=a.k, **common)
    elif a.kind == "batchtopk":
        # Its threshold estimate starts at step 1000 by default; a shorter run would keep threshold −1
        # (every positive latent active at inference), so it starts at once here.
        cfg = dict(trainer=BatchTopKTrainer, dict_class=BatchTopKSAE, k=a.k, threshold_start_step=0, **common)
        notes.append("threshold_start_step 0 (default 1000, past the end of a short run)")
    elif a.kind == "jumprelu":  # its target-L0 JumpReLU (the same aim as saekit's jumprelu with k)
        from dictionary_learning.dictionary import JumpReluAutoEncoder
        from dictionary_learning.trainers.jumprelu import JumpReluTrainer

        cfg = dict(trainer=JumpReluTrainer, dict_class=JumpReluAutoEncoder, target_l0=float(a.k),
                   sparsity_warmup_steps=max(1, round(0.05 * steps)), **common)
        notes.append("sparsity_warmup_steps 5% of the run (default 2,000, past the end of a short run)")
    elif a.kind == "matryoshka":  # saekit's prefix sizes as its groups
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTrainer

        bounds = [a.d_dict >> s for s in (4, 3, 2, 1)] + [a.d_dict]
        fractions = [(b - a_) / a.d_dict for a_, b in zip([0] + bounds[:-1], bounds)]
        cfg = dict(trainer=MatryoshkaBatchTopKTrainer, dict_class=MatryoshkaBatchTopKSAE, k=a.k, group_fractions=fractions,
                   threshold_start_step=0, **common)
        notes.append("threshold_start_step 0 (default 1000, past the end of a short run)")
    elif a.kind == "relu_april":  # Anthropic's April update: λ' Σ f_i ‖W_dec,i‖, decoder norms free (as saekit's relu)
        from dictionary_learning.trainers.standard import StandardTrainerAprilUpdate

        cfg = dict(trainer=StandardTrainerAprilUpdate, l1_penalty=a.l1 / math.sqrt(d_in), sparsity_warmup_steps=max(1, round(0.05 * steps)),
                   **common)
        notes.append(f"l1_penalty = λ/√d_in = {a.l1 / math.sqrt(d_in):.4g} (same loss as saekit's λ on its scale)")
    else:
        # dictionary_learning normalises to E‖x‖² = 1 and penalises λ' Σ f_i (unit decoder columns); with
        # x' = x_n / √d_in that is saekit's loss / d_in when λ' = λ / √d_in.
        cfg = dict(trainer=StandardTrainer, l1_penalty=a.l1 / math.sqrt(d_in), sparsity_warmup_steps=max(1, round(0.05 * steps)), **common)
        notes.append(f"l1_penalty = λ/√d_in = {a.l1 / math.sqrt(d_in):.4g} (same loss as saekit's λ on its scale)")
    save_dir = out / "dl-run"
    before = memory_mark()
    t0 = time.perf_counter()
    trainSAE(data=batch_stream(x, a.batch_size, a.seed), trainer_configs=[cfg], steps=steps, save_dir=str(save_dir),
             normalize_activations=True, device="cpu")
    seconds = time.perf_counter() - t0
    # trainSAE writes a torch.save state dict; read it as tensors only and rewrite it in SAELens's format.
    sd = torch.load(save_dir / "trainer_0" / "ae.pt", map_location="cpu", weights_only=True)
    folder = out / "saelens-format"
    if a.kind in ("jumprelu", "matryoshka"):  # W_enc (d, n) / W_dec (n, d) as parameters, not nn.Linear
        n = sd["b_enc"].shape[0]
        thr = sd["threshold"].float() * torch.ones(n) if a.kind == "matryoshka" else sd["threshold"].float()
        # JumpReluAutoEncoder encodes x (no b_dec subtracted); the Matryoshka SAE encodes x − b_dec
        write_saelens_folder(folder, "jumprelu", sd["W_enc"], sd["b_enc"], sd["W_dec"], sd["b_dec"], meta, threshold=thr,
                             apply_b_dec_to_input=a.kind == "matryoshka")
        return seconds, before, str(folder), notes
    b_dec = sd["bias"] if a.kind in ("relu", "relu_april") else sd["b_dec"]
    arch = {"topk": "topk", "relu": "standard", "relu_april": "standard", "batchtopk": "jumprelu"}[a.kind]
    # BatchTopKSAE at inference: ReLU(pre) kept where above its scalar threshold = JumpReLU with that threshold everywhere.
    thr = sd["threshold"].float() * torch.ones(sd["encoder.bias"].shape[0]) if a.kind == "batchtopk" else None
    write_saelens_folder(folder, arch, sd["encoder.weight"].T, sd["encoder.bias"], sd["decoder.weight"].T, b_dec, meta,
                         k=a.k if a.kind == "topk" else None, threshold=thr)
    return seconds, before, str(folder), notes


def train_sparsify(a, x: torch.Tensor, meta: dict, out: Path):
    if a.kind not in ("topk", "transcoder"):
        raise SystemExit("sparsify trains TopK sparse coders and transcoders only")
    from sparsify import SparseCoder, SparseCoderConfig

    steps = math.ceil(a.tokens / a.batch_size)
    torch.manual_seed(a.seed)
    coder = a.kind == "transcoder"
    d_in = meta["width"] if coder else x.shape[1]
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=a.d_dict, k=a.k, transcode=coder), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=a.lr)
    # sparsify's Trainer defaults: auxk_alpha 0 (so no dead mask), dead after 10M tokens (only logged).
    since_fired = torch.zeros(a.d_dict, dtype=torch.long)
    data = batch_stream(x, a.batch_size, a.seed)
    before = memory_mark()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = next(data)
        xb, yb = (batch[:, :d_in], batch[:, d_in:]) if coder else (batch, batch)
        if step == 0 and not coder:
            sae.b_dec.data = batch.mean(0).to(sae.dtype)  # as sparsify's Trainer: centre the pre-activations at init
        if not coder:  # its Trainer leaves a transcoder's decoder unnormalised
            sae.set_decoder_norm_to_unit_norm()
        o = sae(x=xb, y=yb, dead_mask=None)
        o.fvu.backward()
        did_fire = torch.zeros(a.d_dict, dtype=torch.bool)
        did_fire[o.latent_indices.flatten()] = True
        if not coder:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired += batch.shape[0]
        since_fired[did_fire] = 0
    if not coder:
        sae.set_decoder_norm_to_unit_norm()
    seconds = time.perf_counter() - t0
    # sparsify names a folder after its hookpoint (an HF module); saekit maps the layer name back.
    layer = meta["hook"].split(".")[1]
    folder = out / (f"layers.{layer}.mlp" if coder else f"layers.{layer}")
    sae.save_to_disk(folder)
    (out / "config.json").write_text(json.dumps({"model": meta["model"].get("name")}))
    return seconds, before, str(folder), ["sparsify Trainer's step body (it trains only from a model); Adam, no lr warmup"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trainer", choices=TRAINERS, required=True)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--acts", type=Path, required=True, help="safetensors with `train` (n, d_in) float32 + meta.json beside it")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--d-dict", type=int, required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    # A private, resident copy: pages still to be faulted in from the file would count as training memory.
    acts = load_file(str(a.acts))
    x = acts["train"].clone()
    meta = json.loads((a.acts.parent / "meta.json").read_text())
    if a.kind == "transcoder":
        meta["width"] = x.shape[1]
        x = torch.cat([x, acts["target"]], 1)  # [input | target]: one row order for both
    fn = {"saekit": train_saekit, "saelens": train_saelens, "dictionary_learning": train_dictionary_learning,
          "sparsify": train_sparsify}[a.trainer]
    seconds, before, folder, notes = fn(a, x, meta, a.out)
    steps = math.ceil(a.tokens / a.batch_size)
    peak = peak_mb()
    result = {
        "trainer": a.trainer, "kind": a.kind, "tokens": steps * a.batch_size, "steps": steps, "train_seconds": seconds,
        "tokens_per_s": steps * a.batch_size / seconds, "rss_before_mb": before, "peak_rss_mb": peak,
        "train_rss_mb": peak - before, "folder": folder, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "notes": notes,
    }
    tmp = a.out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, a.out / "result.json")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
