"""In-model codebook training speed: saekit vs the original Codebook Features library, side by side.

    python benchmarks/codebook_speed.py [--batch 64] [--steps 20] [--threads 1] [--repeats 2] [--profile] [--baseline-src DIR]

Both sides train the paper's TokFSM setting from the same starting point: GPT-NeoX, 4 layers,
d 128, MLP 512, 4 heads, rotary; codebooks at EVERY layer on the attention pre-projection
output (one group per head) and on the MLP output; k = 1, 1000 codes per group, inner-product
similarity; model and codebooks trained together (Adam(W), lr 1e-3).  The library runs in its
own venv (`benchmarks/peers/setup_codebook_features.sh`; script
`benchmarks/peers/codebook_features_step.py`), built as its `fsm_main.yaml` builds it with the
codebooks' metric logging off (its fastest setting); saekit runs `saekit.inmodel.finetune.train_step`
(the step `saekit finetune --preset paper` runs: the same spec, objective, LayerNorm'd input, code weight
decay, every position) on the same model shape, batch, sequence length and threads.
Tokens are random digits after BOS on both sides (the step's cost does not depend on them).
Each side is timed `--repeats` times, alternating, after `--warmup` untimed steps; reported:
tokens per second and per CPU-second (process CPU time, so a contended machine's waiting does
not count), the best repeat of each, and their ratio saekit / library.  `--baseline-src DIR` times a third side in
the same alternation: saekit imported from DIR (an older commit's `saekit/`, from `git archive`), so a change's
speed-up is a ratio measured in one run.

`--profile` adds a torch.profiler table of saekit's step (where the time goes: the k = 1
selection, the straight-through backward, the code gradients; numba's scan is outside aten and not listed).
The fast paths it times (`codebook_k1`, `inmodel.codebooks.codes_out`, the masked `torch.where`) are checked
against plain references in tests/test_inmodel_speed.py: the same loss, terms, gradients and Adam updates.
Results and history: benchmarks/README.md, "In-model codebook training speed".
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SPEC = "attn:k=1,groups=heads,codes=1000,sim=inner;mlp:k=1,codes=1000,sim=inner"


def paper_model_dir(root: Path, seq_len: int) -> str:
    """The paper's TokFSM GPT-NeoX (random init), written as a Hugging Face folder with the toy's tokenizer."""
    import shutil

    import transformers

    from saekit.models import resolve_model_path

    out = root / "neox"
    cfg = transformers.GPTNeoXConfig(vocab_size=11, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                     rotary_emb_base=10000, bos_token_id=10, eos_token_id=10, max_position_embeddings=seq_len)
    cfg.architectures = ["GPTNeoXForCausalLM"]
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(out)
    toy = Path(resolve_model_path("toy"))
    for f in ("tokenizer.json", "tokenizer_config.json", "fsm.json"):
        shutil.copy(toy / f, out / f)
    return str(out)


def saekit_setup(model_dir: str):
    """The codebook model and a training phase as `saekit finetune --preset paper` builds them (random codes, scale 1):
    the library's spec, objective, LayerNorm'd input, code weight decay and every position (BOS included)."""
    from saekit.inmodel import finetune
    from saekit.inmodel.codebooks import InModelCodebook, build_codebook, parse_spec
    from saekit.inmodel.finetune import FinetuneConfig, make_phase
    from saekit.inmodel.model import load_in_model
    from saekit.inmodel.sites import Splicer

    if hasattr(finetune, "with_preset"):  # a saekit with `--preset paper`
        cfg = finetune.with_preset(FinetuneConfig(model=model_dir, preset="paper", replace_every=0))
        norm, objective = (cfg.input_norm,), (cfg.objective,)
    else:  # an older tree (--baseline-src): the paper objective and LayerNorm'd input where it has them
        paper = "objective" in inspect.signature(InModelCodebook.__init__).parameters
        norm, objective = (("layernorm",), ("paper",)) if paper else ((), ())
        extra = {"objective": "paper", "input_norm": "layernorm"} if paper else {}
        cfg = FinetuneConfig(model=model_dir, codebooks=SPEC, lr=1e-3, codebook_lr=1e-3, replace_every=0, **extra)
    specs = parse_spec(cfg.codebooks, 4)
    im = load_in_model(model_dir, [s.hook for s in specs], torch.device("cpu"))
    im.hf.train()
    layers = {s.hook: InModelCodebook(build_codebook(s, im.shapes[s.hook], None, *norm), *objective) for s in specs}
    ph = make_phase("codebook model", im.hf, layers, cfg)
    return im, Splicer(im.hf, list(im.sites.values())), ph, cfg, objective[0] if objective else "commit"


def time_saekit(setup, batch: int, seq_len: int, steps: int, warmup: int, seed: int) -> dict:
    from saekit.inmodel.finetune import train_step

    try:
        from saekit import allocator
        allocator.keep_large_blocks()  # as `saekit finetune` does
    except ImportError:  # a saekit older than the allocator setting (--baseline-src)
        pass

    im, splicer, ph, cfg, _ = setup
    rng = np.random.default_rng(seed)

    def tokens() -> torch.Tensor:
        t = rng.integers(0, 10, size=(batch, seq_len))
        t[:, 0] = im.bos_id
        return torch.from_numpy(t).long()

    for _ in range(warmup):
        train_step(ph, tokens(), im.bos_id, splicer, cfg)
    data = [tokens() for _ in range(steps)]
    w0, c0 = time.perf_counter(), time.process_time()
    for t in data:
        terms = train_step(ph, t, im.bos_id, splicer, cfg)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = steps * batch * seq_len
    return {"side": "saekit", "tokens": n, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n / wall, "tokens_per_cpu_s": n / cpu,
            "last_loss": float(terms["ce"])}


def time_library(python: str, batch: int, seq_len: int, steps: int, warmup: int, threads: int, seed: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    p = subprocess.run([python, str(HERE / "peers" / "codebook_features_step.py"), "--batch", str(batch), "--seq-len", str(seq_len),
                        "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads), "--seed", str(seed)],
                       capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"the library's step failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def profile_saekit(setup, batch: int, seq_len: int, steps: int = 3) -> str:
    from torch.profiler import ProfilerActivity, profile

    from saekit.inmodel.finetune import train_step

    im, splicer, ph, cfg, _ = setup
    t = torch.randint(0, 10, (batch, seq_len))
    t[:, 0] = im.bos_id
    train_step(ph, t, im.bos_id, splicer, cfg)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(ph, t, im.bos_id, splicer, cfg)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def time_saekit_from(src: str, batch: int, seq_len: int, steps: int, warmup: int, threads: int, seed: int) -> dict:
    """`time_saekit` in a subprocess importing saekit from `src` (e.g. `git archive` of an older commit)."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": src}
    p = subprocess.run([sys.executable, __file__, "--saekit-only", "--batch", str(batch), "--seq-len", str(seq_len), "--steps", str(steps),
                        "--warmup", str(warmup), "--threads", str(threads), "--seed", str(seed)], capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode or not lines:
        raise SystemExit(f"saekit from {src} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1]) | {"side": f"saekit@{src}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--library-python", default=os.environ.get("CODEBOOK_VENV", "/work/venvs/codebook-features") + "/bin/python")
    ap.add_argument("--baseline-src", default=None,
                    help="also time saekit imported from this source folder (e.g. `git archive OLD saekit | tar -x -C DIR`), alternating")
    ap.add_argument("--saekit-only", action="store_true", help=argparse.SUPPRESS)  # one saekit timing as a JSON line (--baseline-src)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.saekit_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(time_saekit(saekit_setup(paper_model_dir(Path(tmp), a.seq_len)), a.batch, a.seq_len, a.steps, a.warmup, a.seed)))
        return
    if not Path(a.library_python).exists():
        raise SystemExit(f"{a.library_python} not found; run benchmarks/peers/setup_codebook_features.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        setup = saekit_setup(paper_model_dir(Path(tmp), a.seq_len))
        runs = {"saekit": [], "library": []} | ({"baseline": []} if a.baseline_src else {})
        for r in range(a.repeats):
            runs["library"].append(time_library(a.library_python, a.batch, a.seq_len, a.steps, a.warmup, a.threads, a.seed + r))
            runs["saekit"].append(time_saekit(setup, a.batch, a.seq_len, a.steps, a.warmup if r == 0 else 1, a.seed + r))
            if a.baseline_src:
                runs["baseline"].append(time_saekit_from(a.baseline_src, a.batch, a.seq_len, a.steps, a.warmup, a.threads, a.seed + r))
            for side in runs:
                x = runs[side][-1]
                print(f"repeat {r} {side:8s} {x['tokens_per_s']:8.0f} tok/s  {x['tokens_per_cpu_s']:8.0f} tok/CPU-s  "
                      f"(wall {x['wall_s']:.1f} s, CPU {x['cpu_s']:.1f} s, last loss {x['last_loss']:.3f})", flush=True)
        prof = profile_saekit(setup, a.batch, a.seq_len) if a.profile else None
    best = {s: {k: max(x[k] for x in v) for k in ("tokens_per_s", "tokens_per_cpu_s")} for s, v in runs.items()}
    ratio = {k: best["saekit"][k] / best["library"][k] for k in ("tokens_per_s", "tokens_per_cpu_s")}
    print(f"\nbatch {a.batch} × {a.seq_len} tokens, {a.threads} thread(s), {a.steps} timed steps × {a.repeats} repeats, best of each "
          f"(saekit objective: {setup[4]}):")
    print(f"  library (codebook-features 0.1.2): {best['library']['tokens_per_s']:.0f} tok/s, {best['library']['tokens_per_cpu_s']:.0f} tok/CPU-s")
    print(f"  saekit:                            {best['saekit']['tokens_per_s']:.0f} tok/s, {best['saekit']['tokens_per_cpu_s']:.0f} tok/CPU-s")
    print(f"  saekit / library: {ratio['tokens_per_s']:.2f}× tokens/s, {ratio['tokens_per_cpu_s']:.2f}× tokens per CPU-second")
    if a.baseline_src:
        b = best["baseline"]
        ratio["baseline_tokens_per_cpu_s"] = best["saekit"]["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
        print(f"  saekit from {a.baseline_src}: {b['tokens_per_s']:.0f} tok/s, {b['tokens_per_cpu_s']:.0f} tok/CPU-s "
              f"({b['tokens_per_cpu_s'] / best['library']['tokens_per_cpu_s']:.2f}× the library's per CPU-second); "
              f"saekit / it: {ratio['baseline_tokens_per_cpu_s']:.2f}× tokens per CPU-second")
    if prof:
        print("\nsaekit step profile (3 steps):\n" + prof)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "saekit_objective": setup[4], "runs": runs, "best": best, "ratio": ratio, "profile": prof}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
