"""Sparse paths of the SAE training steps against their dense / torch references, as ratios.

    python benchmarks/sparse_steps.py                      # CPU, batch 4096, d_in 128
    python benchmarks/sparse_steps.py --widths 512,4096,16384 --l0 16,64 --threads 1

Measured in one process, the two variants of each step interleaved step by step (medians):
1. ReLU: `ReluLoss` forward + backward with the codes as CSR (numba kernels) vs the dense
   step, at a chosen L0 (b_enc is set per latent so that each fires on L0/width of the rows);
2. TopK selection: `row_topk` with the numba kernel vs the grouped torch path vs `torch.topk`;
3. TopK decoder: `sparse_decode` with the CSR backward vs `embedding_bag`'s own backward.
A ratio below 1 means the sparse path is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saekit.dictionaries import fast
from saekit.dictionaries.fast import ReluLoss, row_topk, sparse_decode_bag, sparse_decode_csr, warm_kernels


def interleaved(fns: dict, steps: int) -> dict[str, float]:
    """Median ms per call of each function, calls interleaved so machine noise hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(2):  # warm-up
        for fn in fns.values():
            fn()
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def relu_params(n: int, d_in: int, width: int, l0: float, g: torch.Generator):
    x = torch.randn(n, d_in, generator=g)
    W_dec = torch.randn(width, d_in, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_enc = W_dec.t().contiguous()
    b_dec = torch.zeros(d_in)
    b_enc = -(x[:4096] @ W_enc).quantile(1 - l0 / width, dim=0)  # each latent fires on ~l0/width of the rows
    return x, [p.requires_grad_() for p in (W_enc, b_enc, W_dec, b_dec)]


def relu_step(x, ps, density: float):
    def run():
        fast.SPARSE_DENSITY = density
        loss = ReluLoss.apply(x, *ps, 1.0, ws)[0]
        torch.autograd.grad(loss, ps)
    ws: dict = {}
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--widths", default="512,4096")
    ap.add_argument("--l0", default="16,40,64")
    ap.add_argument("--k", type=int, default=16, help="TopK's k")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warm_kernels()
    g = torch.Generator().manual_seed(0)
    n, d_in = a.batch_size, a.d_in
    print(f"batch {n}, d_in {d_in}, {torch.get_num_threads()} thread(s); "
          f"ms per call (median of {a.steps}), ratio = sparse / reference")
    for width in (int(w) for w in a.widths.split(",")):
        for l0 in (float(v) for v in a.l0.split(",")):
            x, ps = relu_params(n, d_in, width, l0, g)
            with torch.no_grad():
                got = float(ReluLoss.apply(x, *ps, 1.0)[4])
            t = interleaved({"csr": relu_step(x, ps, 1e9), "dense": relu_step(x, ps, -1.0)}, a.steps)
            print(f"relu  width {width:6d}  L0 {got:6.1f}: CSR {t['csr']:7.1f}  dense {t['dense']:7.1f}  "
                  f"ratio {t['csr'] / t['dense']:.2f}")
        fast.SPARSE_DENSITY = 0.12
        pre = torch.randn(n, width, generator=g)
        def select(mode):
            def run():
                fast._TOPK = mode
                row_topk(pre, a.k)
            return run
        t = interleaved({m: select(m) for m in ("numba", "grouped", "plain")}, a.steps)
        fast._TOPK = "numba"
        print(f"topk  width {width:6d}  k {a.k}: numba {t['numba']:6.1f}  grouped {t['grouped']:6.1f}  torch.topk {t['plain']:6.1f}"
              f"  ratios {t['numba'] / t['grouped']:.2f} / {t['numba'] / t['plain']:.2f}")
        values, indices = row_topk(pre, a.k)
        values = values.relu().detach().requires_grad_()
        W = torch.randn(width, d_in, generator=g, requires_grad=True)
        up = torch.randn(n, d_in, generator=g)

        def decode(fn):
            return lambda: torch.autograd.grad((fn(values, indices, W) * up).sum(), (values, W))
        t = interleaved({"csr": decode(sparse_decode_csr), "bag": decode(sparse_decode_bag)}, a.steps)
        print(f"decode width {width:6d}  k {a.k}: CSR backward {t['csr']:6.1f}  embedding_bag {t['bag']:6.1f}  "
              f"ratio {t['csr'] / t['bag']:.2f}")


if __name__ == "__main__":
    main()
