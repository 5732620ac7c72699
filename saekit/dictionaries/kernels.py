"""CPU kernels for the SAE training steps, compiled with numba: per-row top-k, and sparse codes as CSR.

Both walk the rows of an (n, d_dict) pre-activation matrix once, which torch cannot do
without a general-purpose sort (top-k) or a slow `nonzero` (CSR).  `sae.py` imports this
module on first use and keeps torch-only paths for when numba is missing.

Threads: the top-k splits its rows across threads, one part per torch thread (numba
releases the GIL; the calling thread takes the first part).  The CSR kernels run in the
calling thread: the ReLU step calls four short ones between torch ops, and handing each to
a second thread while torch's OpenMP workers still spin after the previous op measured
slower than running them alone (step time 0.99 against 0.91 of the dense step's, two
threads).

Top-k.  `torch.topk` selects each row with a general-purpose partial sort, ~10 ns per value on
CPU (~20 ms per step at batch 4096, width 512, k 16: half of a training step).  Here each
row gets two linear passes and a selection:

1. t = the smallest of the maxima of k disjoint chunks of the row.  Those maxima are k
   distinct entries ≥ t, so the row's k-th largest value is ≥ t: every top-k entry is ≥ t.
2. One branch-free pass copies the entries ≥ t to a buffer (~3k of them for Gaussian-like
   rows; all of them when the row is constant).
3. A quickselect (Hoare partitions around a median of three) moves the k largest of the
   buffer to its front: ~c steps, against c·log k for the size-k heap it replaced (width 512,
   k 64: 12.0 against 17.3 ms; width 4096, k 128: 55.5 against 83.6 ms; equal at k 16).

Indices come back unsorted, as from `row_topk`; among equal values at the cut, which are
kept is unspecified, as for `torch.topk`.  Rows holding a NaN are flagged and redone with
`torch.topk` (which ranks NaN above everything), so results match torch's semantics.
On one thread at batch 4096: width 512, k 16 ~7 ms against ~13 ms for the grouped
`row_topk` and ~21 ms for `torch.topk` (benchmarks/README.md, "Speed, third pass").

Sparse codes as CSR (crow, cols, vals): ReLU codes come from `relu_csr` (a counting pass,
which also spots NaNs, sizes the arrays and a second pass fills them); k-sparse TopK codes
are CSR already (crow = 0, k, 2k, ...: `code_rows`).  Their products are plain loops over
the entries in a fixed order, so deterministic: S D (a gather of D's rows) and Sᵀ D (each
row of S scattered into the small (width, d) result: no transpose or sort).  The dot
products at S's pattern (`sampled_dots`) use torch's `sampled_addmm`.  `SparseDecode` is
the TopK decoder built on them.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# torch warns once per process that CSR support is "beta"; the products used here are tested
# against dense references (tests/test_kernels.py).
warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")


@numba.njit(nogil=True, cache=True)
def _quickselect(bv, bi, c, k):
    """Reorder bv[:c] (bi alongside) so that its first k entries are the k largest: Hoare partitions, O(c) expected."""
    lo, hi, t = 0, c - 1, k - 1
    while lo < hi:
        a, b, m = bv[lo], bv[hi], bv[(lo + hi) // 2]
        pivot = max(min(a, b), min(max(a, b), m))  # median of three
        i, j = lo, hi
        while i <= j:
            while bv[i] > pivot:
                i += 1
            while bv[j] < pivot:
                j -= 1
            if i <= j:
                bv[i], bv[j] = bv[j], bv[i]
                bi[i], bi[j] = bi[j], bi[i]
                i += 1
                j -= 1
        if t <= j:
            hi = j
        elif t >= i:
            lo = i
        else:
            break


@numba.njit(nogil=True, cache=True)
def _topk_rows(x, k, r0, r1, out, has_nan):
    """out[r] = indices of the k largest entries of x[r], for rows r0 ≤ r < r1 (1 ≤ k ≤ width)."""
    m = x.shape[1]
    chunk = m // k
    bv = np.empty(m, x.dtype)
    bi = np.empty(m, np.int64)
    for r in range(r0, r1):
        row = x[r]
        t = np.inf
        for q in range(k):
            mx = -np.inf
            for j in range(q * chunk, (q + 1) * chunk):
                mx = max(mx, row[j])
            t = min(t, mx)
        c = 0
        nan = 0
        for j in range(m):  # branch-free: always write, advance only past kept entries
            v = row[j]
            bv[c] = v
            bi[c] = j
            c += v >= t
            nan += v != v
        if nan:
            has_nan[r] = True
            continue
        _quickselect(bv, bi, c, k)
        out[r] = bi[:k]


@numba.njit(nogil=True, cache=True)
def _count_above(x, t, r0, r1, counts, has_nan):
    """counts[r] = entries > t in x[r]; has_nan[r] flags a NaN (the caller then keeps another path)."""
    for r in range(r0, r1):
        row = x[r]
        c = 0
        nan = 0
        for j in range(x.shape[1]):
            v = row[j]
            c += v > t
            nan += v != v
        counts[r] = c
        has_nan[r] = nan > 0


@numba.njit(nogil=True, cache=True)
def _fill_csr(x, r0, r1, crow, cols, vals):
    """The entries > 0 of rows r0 ≤ r < r1 at crow[r]..crow[r+1]: column and value of each."""
    for r in range(r0, r1):
        row = x[r]
        p = crow[r]
        for j in range(x.shape[1]):
            v = row[j]
            if v > 0:
                cols[p] = j
                vals[p] = v
                p += 1


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _csr_matmul(crow, cols, vals, D, r0, r1, out):
    """out[r] = Σ_p vals[p] D[cols[p]] over row r's entries, for r0 ≤ r < r1 (a fixed order: deterministic)."""
    for r in range(r0, r1):
        acc = out[r]
        acc[:] = 0
        for p in range(crow[r], crow[r + 1]):
            v = vals[p]
            src = D[cols[p]]
            for j in range(acc.shape[0]):
                acc[j] += v * src[j]


@numba.njit(nogil=True, cache=True, fastmath={"contract"})
def _csr_t_matmul(crow, cols, vals, D, r0, r1, out):
    """out[cols[p]] += vals[p] D[r] for each entry p of rows r0 ≤ r < r1: Sᵀ D without transposing S."""
    out[:] = 0
    for r in range(r0, r1):
        src = D[r]
        for p in range(crow[r], crow[r + 1]):
            v = vals[p]
            acc = out[cols[p]]
            for j in range(src.shape[0]):
                acc[j] += v * src[j]


_pool: ThreadPoolExecutor | None = None


def _by_rows(fn, n: int) -> None:
    """fn(r0, r1) over row ranges covering 0..n, one range per torch thread (the caller takes the first)."""
    global _pool
    parts = max(1, min(torch.get_num_threads(), math.ceil(n / 256)))
    if parts == 1:
        fn(0, n)
        return
    if _pool is None or _pool._max_workers < parts - 1:
        _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="saekit-kernels")
    cuts = [n * i // parts for i in range(parts + 1)]
    rest = [_pool.submit(fn, cuts[i], cuts[i + 1]) for i in range(1, parts)]
    fn(0, cuts[1])
    for f in rest:
        f.result()


def topk_indices(x: Tensor, k: int) -> Tensor:
    """Indices (n, k) int64 of the k largest entries of each row of a 2-D CPU float tensor, unsorted."""
    a = x.detach().contiguous().numpy()
    n = a.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    has_nan = np.zeros(n, dtype=np.bool_)
    _by_rows(lambda r0, r1: _topk_rows(a, k, r0, r1, out, has_nan), n)
    indices = torch.from_numpy(out)
    if has_nan.any():
        rows = torch.from_numpy(has_nan.nonzero()[0])
        indices[rows] = x.detach()[rows].topk(k, dim=-1, sorted=False).indices
    return indices


def relu_csr(x: Tensor, max_density: float = 1.0) -> tuple[int | None, tuple[Tensor, ...] | None]:
    """ReLU(x) for a 2-D CPU float tensor as CSR, if at most `max_density` of it is > 0.

    Returns (nnz, (crow (n+1,), cols (nnz,), vals (nnz,))); (nnz, None) when denser than
    max_density (only the counting pass ran); (None, None) when x holds a NaN.
    """
    a = x.detach().contiguous().numpy()
    n = a.shape[0]
    counts = np.empty(n, dtype=np.int64)
    has_nan = np.zeros(n, dtype=np.bool_)
    _count_above(a, 0.0, 0, n, counts, has_nan)
    if has_nan.any():
        return None, None
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=crow[1:])
    nnz = int(crow[-1])
    if nnz > max_density * a.size:
        return nnz, None
    cols, vals = np.empty(nnz, dtype=np.int64), np.empty(nnz, dtype=a.dtype)
    _fill_csr(a, 0, n, crow, cols, vals)
    return nnz, (torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(vals))


@numba.njit(nogil=True, cache=True)
def _fill_padded(x, t, r0, r1, vals, idx):
    """vals[r, :c], idx[r, :c] = the c entries > t of x[r] (column order), for r0 ≤ r < r1; the rest keep their 0."""
    for r in range(r0, r1):
        row = x[r]
        p = 0
        for j in range(x.shape[1]):
            v = row[j]
            if v > t:
                vals[r, p] = v
                idx[r, p] = j
                p += 1


def rows_above(x: Tensor, t: float, min_total: int) -> tuple[Tensor, Tensor] | None:
    """The entries > t of each row of a 2-D CPU float tensor, padded with zeros to the fullest row.

    Returns values (n, w) and their columns (n, w), w = the most any row has (≥ 1); padding is
    value 0 at column 0.  None when fewer than `min_total` entries are > t (only the counting pass
    ran: the caller lowers t) or when x holds a NaN.
    """
    a = x.detach().contiguous().numpy()
    n = a.shape[0]
    counts = np.empty(n, dtype=np.int64)
    has_nan = np.zeros(n, dtype=np.bool_)
    _by_rows(lambda r0, r1: _count_above(a, t, r0, r1, counts, has_nan), n)
    if has_nan.any() or counts.sum() < min_total:
        return None
    w = max(int(counts.max()), 1)
    vals, idx = np.zeros((n, w), dtype=a.dtype), np.zeros((n, w), dtype=np.int64)
    _by_rows(lambda r0, r1: _fill_padded(a, t, r0, r1, vals, idx), n)
    return torch.from_numpy(vals), torch.from_numpy(idx)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def csr_matmul(crow: Tensor, cols: Tensor, vals: Tensor, D: Tensor) -> Tensor:
    """S D for S in CSR (crow, cols, vals) with len(crow) - 1 rows and D dense (·, d) -> (rows, d)."""
    c, k, v, d = _np(crow), _np(cols), _np(vals), _np(D)
    out = np.empty((c.shape[0] - 1, d.shape[1]), dtype=d.dtype)
    _csr_matmul(c, k, v, d, 0, out.shape[0], out)
    return torch.from_numpy(out)


def sampled_dots(crow: Tensor, cols: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """A[r] · B[cols[p]] for every entry p (in row r) of a CSR pattern -> (nnz,).

    torch's `sampled_addmm` (nnz dot products, not the dense A Bᵀ): faster here than a numba
    loop (1.0–1.7 against 2.4 ms for 65k entries of width 128).
    """
    # beta=0 still reads the pattern's values (0 · NaN is NaN), so they must be finite: zeros.
    S = torch.sparse_csr_tensor(crow, cols, A.new_zeros(cols.shape[0]), (A.shape[0], B.shape[0]), check_invariants=False)
    return torch.sparse.sampled_addmm(S, A, B.t(), beta=0.0).values()


def code_rows(indices: Tensor) -> Tensor:
    """crow of k-sparse codes (n, k) seen as CSR: (n + 1,) = 0, k, 2k, ..."""
    n, k = indices.shape
    return torch.arange(0, n * k + 1, k, device=indices.device)


class SparseDecode(torch.autograd.Function):
    """x̂ = S W_dec for k-sparse codes (values, indices): `embedding_bag` forward, CSR backward.

    Backward: ∂values = `sampled_dots`(∂x̂, W_dec) at S's pattern, ∂W_dec = Sᵀ ∂x̂ (`csr_t_matmul`).
    `embedding_bag`'s own backward computes the same but scatters entry by entry and on one
    thread (~6 ms at batch 4096, d_dict 512, k 16, against ~4 ms here).
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.mark_non_differentiable(indices)
        return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        g = g.contiguous()
        crow, cols = code_rows(indices), indices.reshape(-1)
        g_values = sampled_dots(crow, cols, g, W_dec).view(indices.shape) if ctx.needs_input_grad[0] else None
        g_W = csr_t_matmul(crow, cols, values.reshape(-1), g, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return g_values, None, g_W


def csr_t_matmul(crow: Tensor, cols: Tensor, vals: Tensor, D: Tensor, width: int) -> Tensor:
    """Sᵀ D for S in CSR (crow, cols, vals) with `width` columns and D dense (rows of S, d) -> (width, d).

    S's rows are scattered into Sᵀ's (width × d, which stays in cache), so no transpose is needed.
    """
    c, k, v, d = _np(crow), _np(cols), _np(vals), _np(D)
    out = np.empty((width, d.shape[1]), dtype=d.dtype)
    _csr_t_matmul(c, k, v, d, 0, c.shape[0] - 1, out)
    return torch.from_numpy(out)


def warm() -> None:
    """Run every kernel once on a tiny float32 input, so numba loads (or compiles and caches) them now."""
    x = torch.linspace(-1.0, 1.0, 64).view(4, 16)
    topk_indices(x, 2)
    _, (crow, cols, vals) = relu_csr(x)
    rows_above(x, 0.5, 1)
    csr_matmul(crow, cols, vals, x.t().contiguous())
    csr_t_matmul(crow, cols, vals, x, 16)
