"""One prepared run of the whole CUDA path on a GPU host (issue 22), printing every number it measures.

    .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu-check            # on the GPU host (~5 min)
    .venv/bin/python benchmarks/gpu_check.py --small --device cpu --out /tmp/g  # the same steps, tiny, as a smoke test

Steps, each timed in this run:
1. the CUDA-only tests (tests/test_loader.py, test_precision.py, test_harvest_dtype.py);
2. the bf16 and fp32 dense matmul rates of a (batch, d_in)·(d_in, d_dict) product (the peak the
   training rate is compared with);
3. a random-weight GPT-2 of width `--width` (≥ 2,048 by default) saved with config dtype bfloat16,
   harvested at two hooks on the device in the model's dtype (`model_dtype=auto`): tokens/s;
4. TopK and BatchTopK at `--d-dict` latents trained from the store (loader: fills copied to the
   device and gathered there, and again through the host-gathered pinned ring; bf16 autocast):
   tokens/s, the fraction of the bf16 matmul peak, and the GPU's
   utilisation sampled by nvidia-smi while training; the same steps from an in-memory CUDA tensor
   (target: the store within 10%);
5. splice-eval of both dictionaries on the store's eval split;
6. the loader alone (benchmarks/loader_speed.py at width 2,304, 1, 2, 4 and 8 workers).
Failures are printed and the run goes on to the next step.  Results also go to <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

RESULTS: dict = {}


def step(name):
    def deco(fn):
        def run(*a, **kw):
            print(f"\n== {name}", flush=True)
            t = time.perf_counter()
            try:
                out = fn(*a, **kw)
                RESULTS[name] = out
                print(f"   {json.dumps(out, default=str)[:2000]}")
            except Exception as e:  # noqa: BLE001 - report and go on
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
                out = None
            print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)
            return out
        return run
    return deco


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class GpuUtil:
    """Samples nvidia-smi's utilisation.gpu every 200 ms while in the `with` block."""

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                   capture_output=True, text=True, timeout=5)
                self.samples.append(float(r.stdout.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


@step("cuda tests")
def cuda_tests():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_loader.py", "tests/test_precision.py",
                        "tests/test_harvest_dtype.py"], cwd=ROOT, capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-2000:])
    return {"rc": r.returncode, "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""}


@step("matmul peak")
def matmul_peak(dev, B, d_in, D):
    out = {}
    for dt in (torch.bfloat16, torch.float32):
        a = torch.randn(B, d_in, device=dev, dtype=dt)
        b = torch.randn(d_in, D, device=dev, dtype=dt)
        best = float("inf")
        for _ in range(5):
            sync(dev)
            t = time.perf_counter()
            for _ in range(10):
                a @ b
            sync(dev)
            best = min(best, (time.perf_counter() - t) / 10)
        out[str(dt).removeprefix("torch.")] = 2 * B * d_in * D / best
    return out


def make_model(path: Path, width: int, layers: int) -> str:
    from conftest import write_tiny_gpt2

    write_tiny_gpt2(path, n_layer=layers, n_embd=width, n_head=max(1, width // 128), n_positions=256)
    cfg = json.loads((path / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"  # what a published bf16 model says
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def make_text(path: Path, chars: int) -> str:
    from conftest import CHARS

    rng = random.Random(0)
    with open(path, "w") as f:
        n = 0
        while n < chars:
            line = "".join(rng.choice(CHARS) for _ in range(rng.randint(200, 2000)))
            f.write(line + "\n")
            n += len(line)
    return str(path)


@step("harvest")
def do_harvest(model, data, out, hooks, tokens, device):
    from saekit.harvest import HarvestConfig, harvest
    from saekit.store import ActivationStore

    cfg = HarvestConfig(model=model, hooks=hooks, data=data, context_size=256, tokens=tokens, batch_size=32,
                        device=device, out=out, shard_tokens=1 << 17)
    t = time.perf_counter()
    harvest(cfg, progress=False)
    dt = time.perf_counter() - t
    st = ActivationStore(out)
    return {"tokens": st.n_tokens, "tokens_per_s": st.n_tokens / dt, "model_dtype": st.manifest["config"].get("model_dtype", "float32"),
            "bytes_on_disk": sum(f.stat().st_size for f in Path(out).glob("shard-*.h5"))}


def steady_tokens_per_s(cfg, hooks, source, steps: int, dev) -> float:
    """tokens/s of `steps` Trainer steps after one warm-up step (allocations, Adam state, autocast caches)."""
    from saekit.train import Trainer

    t = Trainer(cfg, hooks, source, progress=False)
    t._checkpoint = lambda: None
    t.prepare()
    t.n_steps = 1
    t.loop()
    t.n_steps = 1 + steps
    sync(dev)
    t0 = time.perf_counter()
    t.loop()
    sync(dev)
    return steps * cfg.batch_size / (time.perf_counter() - t0)


@step("train from store vs memory")
def do_train(store_path, hook, kinds, d_dict, k, steps, B, device, peak, out):
    from saekit.dictionaries.base import Provenance
    from saekit.store import ActivationStore
    from saekit.train import HookSource, TrainConfig, tensor_batches
    from saekit.config import from_flags

    st = ActivationStore(store_path)
    d_in = st.hook_width(hook)
    hooks = {hook: HookSource(d_in, Provenance(hook=hook, scale=float(st.stats(hook)["scale"])))}
    dev = torch.device(device)
    rows = min(st.n_rows, 64 * B)
    mem = next(iter(st.batches(hook, rows, buffer_rows=rows + st.context_size, device=dev)))  # in memory, on the device
    res = {}
    for kind in kinds:
        cfg = from_flags(TrainConfig, kind=kind, d_dict=d_dict, k=[k], batch_size=B, tokens=(steps + 1) * B, log_every=10**9,
                          checkpoint_every=0, init_rows=B, device=device, out=str(Path(out) / kind), dead_tokens=10**9)
        # The timed loop starts at batch 1 from a stream whose first fill is already in memory (a one-time cost
        # of a run, not its rate); later fill boundaries are timed.
        def source(on_device):
            warm = st.batches(hook, B, device=dev, gather_on_device=on_device)
            next(warm)

            def store_source(start, warm=[warm]):
                if start == 1 and warm:
                    return warm.pop()
                return st.batches(hook, B, start_batch=start, device=dev, gather_on_device=on_device)
            return store_source

        with GpuUtil() as util:
            store_tps = steady_tokens_per_s(cfg, hooks, source(True), steps, dev)  # fills copied once, gathered on the GPU
        ring_tps = steady_tokens_per_s(cfg, hooks, source(False), steps, dev)  # gathered on the host into the pinned ring
        mem_tps = steady_tokens_per_s(cfg, hooks, tensor_batches(mem, B), steps, dev)
        flops = 4 * d_in * d_dict + 6 * k * d_in  # per token, sparse decoder (train_speed.py's count)
        res[kind] = {"store_tokens_per_s": store_tps, "store_ring_tokens_per_s": ring_tps,
                     "memory_tokens_per_s": mem_tps, "store_vs_memory": store_tps / mem_tps,
                     "fraction_of_bf16_peak": store_tps * flops / peak if peak else None, "gpu_util_mean": util.mean}
    return res


@step("full train + splice-eval")
def do_splice(model, store_path, hook, d_dict, k, tokens, device, out):
    from saekit.splice import SpliceConfig, splice_eval
    from saekit.train import TrainConfig, train
    from saekit.config import from_flags

    dicts = []
    for kind in ("topk", "batchtopk"):
        dicts += [str(p) for p in train(from_flags(TrainConfig, store=store_path, hooks=[hook], kind=kind, d_dict=d_dict, k=[k], tokens=tokens,
                                                   device=device, out=str(Path(out) / "dicts"), eval_tokens=20000), progress=False)]
    r = splice_eval(SpliceConfig(model=model, dicts=dicts, store=store_path, device=device, max_tokens=16384))
    return [{key: d[key] for key in ("dict", "fvu", "l0", "loss_recovered_zero", "delta_ce")} for d in r["dictionaries"]]


@step("loader alone")
def loader(small):
    args = ["--widths", "2304", "--workers", "1,2" if small else "1,2,4,8", "--mb", "40" if small else "400"]
    r = subprocess.run([sys.executable, str(HERE / "loader_speed.py"), *args], capture_output=True, text=True)
    print(r.stdout, r.stderr[-2000:])
    return {"rc": r.returncode, "out": r.stdout.strip().splitlines()[-12:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke test of the script itself")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    small = a.small
    width, layers = (64, 2) if small else (2048, 4)
    d_dict, k, B = (512, 8, 256) if small else (16384, 32, 4096)
    dev = torch.device(a.device)
    print(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    if dev.type == "cuda":
        cuda_tests()
    peak = (matmul_peak(dev, B, width, d_dict) or {}).get("bfloat16")
    model = make_model(out / "model", width, layers)
    data = make_text(out / "text.txt", 50_000 if small else 2_500_000)
    hooks = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]
    store = str(out / "store")
    do_harvest(model, data, store, hooks, 20_000 if small else 1_000_000, a.device)
    do_train(store, hooks[0], ["topk", "batchtopk"], d_dict, k, 5 if small else 100, B, a.device, peak, str(out / "speed"))
    do_splice(model, store, hooks[0], d_dict, k, 4 * B if small else 2_000_000, a.device, str(out))
    loader(small)
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
