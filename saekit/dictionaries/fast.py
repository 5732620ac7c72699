"""CPU fast paths of the SAE kinds, each with its plain reference and the switch that selects it.

Every function here has an eager reference with the same signature, chosen once at import by
an environment variable (`SAEKIT_DECODE`, `SAEKIT_BATCHTOPK`, `SAEKIT_TOPK_STEP`, `SAEKIT_TOPK`,
`SAEKIT_RELU`, `SAEKIT_RELU_SPARSE`) and tested against it (tests/test_sae_fast.py,
test_sparse.py, test_kernels.py).  `dictionaries/sae.py` holds the SAE classes that use them;
`kernels.py` the numba kernels behind them.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

def sparse_decode_dense(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Reference: scatter (n, k) values into dense codes and multiply, Σ_j v_j W_dec[i_j]. -> (n, d_in)."""
    codes = torch.zeros(values.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    return codes.scatter_add(1, indices, values) @ W_dec


def sparse_decode_bag(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Same as `sparse_decode_dense` but gathers only the k rows per token (n·k·d_in work, not n·d_dict·d_in)."""
    # embedding_bag is on no autocast list: bfloat16 codes from an autocast encoder meet float32 weights here
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def sparse_decode_csr(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """`sparse_decode_bag`'s forward with a CSR backward (`kernels.SparseDecode`) on CPU; the bag elsewhere."""
    kernels = _kernels_for(values)
    if kernels is None:
        return sparse_decode_bag(values, indices, W_dec)
    return kernels.SparseDecode.apply(values, indices, W_dec)


# Chosen once at import, overridable with SAEKIT_DECODE=csr|bag|dense (STYLE.md 9: fast path + references).
# The bag's forward gathers only k decoder rows per token: at d_in=256, d_dict=4096, k=32, batch
# 4096 it and its backward took 0.4 s on one CPU thread against 2.9 s for the dense product and
# its two gradients.  "csr" (default) keeps that forward and replaces the bag's backward, which
# scatters entry by entry, with CSR products: ~6 → ~4 ms at d_dict 512, k 16 (kernels.py).
_DECODE = os.environ.get("SAEKIT_DECODE", "csr")
sparse_decode = {"csr": sparse_decode_csr, "bag": sparse_decode_bag}.get(_DECODE, sparse_decode_dense)

# BatchTopK's training selection, overridable with SAEKIT_BATCHTOPK=candidates|full (the reference).
# "candidates" by default: on CPU with numba, one threshold for the batch (`batch_topk_above`) inside
# the fused encoder; elsewhere a per-row top-4k, then a top-(k·n) over n·4k values
# (`batch_topk_candidates`); either way the sparse decoder follows (benchmarks/README.md).
_BATCHTOPK = os.environ.get("SAEKIT_BATCHTOPK", "candidates")

# TopK's training step without AuxK: SAEKIT_TOPK_STEP=fused (default, `TopKEncode`) or autograd (the reference).
_TOPK_STEP = os.environ.get("SAEKIT_TOPK_STEP", "fused")

# Per-row top-k on CPU: SAEKIT_TOPK=numba (default, `kernels`), grouped (`row_topk` in torch) or
# plain (torch.topk, the reference).  numba is imported on first use, so the CLI starts without it.
_TOPK = os.environ.get("SAEKIT_TOPK", "numba")


@functools.cache
def _kernels():
    """The numba module saekit.dictionaries.kernels, or None where numba cannot be imported."""
    try:
        from saekit.dictionaries import kernels
    except ImportError:  # numba missing or not built for this Python: the torch paths remain
        return None
    return kernels


def _kernels_for(t: Tensor):
    """`_kernels()` when t is a CPU float32/float64 tensor (what the numba kernels take), else None."""
    return _kernels() if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) else None


def warm_kernels() -> None:
    """Load numba and the compiled kernels now (compiling them on the first use after an install).

    The runtime costs ~140 MB resident and the first load a few seconds; the Trainer calls
    this at construction so the first step (and a benchmark's timed loop) does not pay it.
    """
    kernels = _kernels()
    if kernels is not None:
        kernels.warm()


# ReluLoss's CSR path: SAEKIT_RELU_SPARSE=auto (default: by this step's density) or off.
_RELU_SPARSE = os.environ.get("SAEKIT_RELU_SPARSE", "auto")


def _topk_group(width: int, k: int) -> int:
    """Group size for `row_topk`'s pre-selection: 1 (plain top-k) unless the groups leave ≥ 4k maxima."""
    for g in (8, 4):
        if width % g == 0 and width // g >= 4 * k:
            return g
    return 1


def row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values of each row of x (n, width) and their indices, unsorted; differentiable in x.

    On CPU the selection runs in `kernels` (numba: a bound from chunk maxima, one filtering
    pass, a quickselect), or where numba is unavailable (or `SAEKIT_TOPK=grouped`) in torch
    through groups: split each row into width/g strided groups of g values, keep the k groups
    with the largest maxima, and take the top-k of those k·g candidates.  Why the grouped
    selection loses nothing: if M is the k-th largest group maximum, fewer than k groups have a
    maximum above M, so every value above M sits in a kept group, and the kept groups' own
    maxima are k values ≥ M; the candidates therefore hold all values above the row's k-th
    largest and enough equal to it.  One thread, n = 4096, width 512, k 16: numba ~7 ms,
    grouped ~13 ms, `x.topk` ~21 ms.  `SAEKIT_TOPK=plain`, and CUDA (whose top-k is already
    fast), use `x.topk`.
    """
    kernels = _kernels_for(x) if _TOPK == "numba" and x.dim() == 2 else None
    if kernels is not None:
        indices = kernels.topk_indices(x, k)
        return x.gather(1, indices), indices
    g = _topk_group(x.shape[-1], k) if _TOPK in ("grouped", "numba") and x.device.type == "cpu" else 1
    if g == 1:
        return x.topk(k, dim=-1, sorted=False)
    n, width = x.shape
    with torch.no_grad():
        span = width // g  # group j = {j, j + span, j + 2·span, ...}: its max is an elementwise max of g slices
        groups = x.view(n, g, span).amax(1).topk(k, dim=-1, sorted=False).indices  # (n, k)
        cand = (groups.unsqueeze(-1) + torch.arange(0, width, span, device=x.device)).view(n, k * g)
        indices = cand.gather(1, x.gather(1, cand).topk(k, dim=-1, sorted=False).indices)
    return x.gather(1, indices), indices


def topk_codes(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest pre-activations per row, after ReLU: values (n, k) ≥ 0 and their indices (n, k)."""
    values, indices = row_topk(pre, k)
    return values.relu(), indices


def batch_topk_mask(pre: Tensor, k: int) -> Tensor:
    """Keep the k·n largest positive pre-activations of the whole batch (n, d_dict) -> dense codes.

    The reference (one top-(k·n) over all n·d_dict values); `batch_topk_candidates` is the fast path.
    """
    flat = pre.relu().flatten()
    values, idx = flat.topk(k * pre.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, values).view_as(pre)


def batch_topk_candidates(pre: Tensor, k: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """The batch top-(k·n) found among each row's m largest pre-activations, plus whether that was exact.

    Returns values (n, m) — ReLU'd, 0 where not kept, exactly k·n kept — their latent indices
    (n, m), and a 0-d bool tensor `exact`.  Why it can be exact: let t be the (k·n)-th largest
    of the n·m candidates.  A value outside row r's candidates is ≤ that row's smallest
    candidate; if that is ≤ t for every row, nothing outside the candidates beats t (at most
    ties it, and ties may go either way), so the candidates' top-(k·n) is the batch's.  A row
    whose smallest candidate is > t ("saturated": it deserves more than m latents) may be
    missing values, and then `exact` is False and the caller must use `batch_topk_mask`.
    A per-row top-m plus a top-(k·n) over n·m values is much cheaper than one over n·d_dict.
    """
    n = pre.shape[0]
    cand, indices = row_topk(pre, min(m, pre.shape[1]))  # (n, m)
    cand = cand.relu()
    flat = cand.detach().flatten()
    top, pos = flat.topk(k * n, sorted=False)
    keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, pos, True).view_as(cand)
    values = torch.where(keep, cand, torch.zeros_like(cand))
    if m >= pre.shape[1]:  # every value is a candidate
        return values, indices, torch.ones((), dtype=torch.bool, device=pre.device)
    exact = (cand.detach().amin(-1) <= top.min()).all()
    return values, indices, exact


def batch_topk_above(pre: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The batch top-(k·n) of ReLU(pre) (n, d_dict) as (n, w) values and latent indices, 0 where not kept; CPU, numba.

    Exact, like `batch_topk_candidates`, but found through one threshold for the whole batch:
    t is read off a sample of rows (every 16th: the rows are shuffled tokens) so that about
    1.25·k·n entries lie above it; `kernels.rows_above` then counts the entries > t and, if at
    least k·n are, collects them per row (padded with zeros to the fullest row).  Every one of
    the batch's k·n largest is > t, so a top-(k·n) over those is the batch's.  Too few above
    t: the sample's quantile is lowered until t reaches 0, where every positive entry is a
    candidate (and if fewer than k·n are positive, all of them are kept, as ReLU's zeros would
    be).  Two passes over pre and a top-k over ~1.25·k·n values, against a per-row top-4k for
    the candidates.  None when pre holds a NaN.
    """
    kernels = _kernels_for(pre)
    if kernels is None:
        return None
    n = pre.shape[0]
    need = k * n
    with torch.no_grad():
        sample = pre.detach()[::16].reshape(-1)
        rows = -(-n // 16)
        want = 1.25 * k * rows
        while True:
            q = min(int(want), sample.numel())
            t = max(float(sample.topk(q, sorted=False).values.min()), 0.0) if q < sample.numel() else 0.0
            found = kernels.rows_above(pre, t, need if t > 0 else 0)
            if found is not None or t == 0.0:
                break
            want *= 2
        if found is None:  # a NaN
            return None
        values, indices = found
        flat = values.reshape(-1)
        if int((flat > 0).sum()) > need:
            pos = flat.topk(need, sorted=False).indices
            keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, pos, True).view_as(values)
            values = torch.where(keep, values, torch.zeros_like(values))
    return values, indices


class ReluLoss(torch.autograd.Function):
    """ReluSAE's training loss with a hand-written backward (the fast path; `relu_loss_eager` is the reference).

    Forward, with c = b_enc − b_dec W_enc, N = n·d_in and w_i = ‖W_dec,i‖:
        f = ReLU(x_n W_enc + c)    e = f W_dec + b_dec − x_n
        loss = ‖e‖²/N + λ (Σ_n f)·w / N
    Backward (s = ∂out/∂loss / N, col = Σ_n f, g = 2 s e):
        ∂W_dec = fᵀ g + λ s col_i W_dec,i / w_i          ∂b_dec = Σ_n g − W_enc ∂b_enc
        ∂pre   = (g W_decᵀ + λ s w) ⊙ [f > 0]             ∂b_enc = Σ_n ∂pre
        ∂W_enc = x_nᵀ ∂pre − b_dec ⊗ ∂b_enc
    Autograd does the same five matmuls but also keeps pre and f, materialises ∂f twice (once
    per use of f) and adds them, and runs ReLU's backward as a separate pass; here the L1
    term's gradient rides in the matmul's bias and Σ_n f serves the loss, the W_dec gradient
    and the fired flags at once.  x_n gets no gradient.
    `ws` (a dict the caller keeps between steps) holds the (n, d_dict) work tensors, so each
    step writes into memory it already owns: a fresh 8 MB tensor costs a page fault per 4 KB
    (~5 ms at batch 4096, d_dict 512 on one CPU thread); reusing them cut the step from ~70
    to ~50 ms.  Reuse is safe: f is saved for backward, so a second forward before the first
    backward fails autograd's version check instead of corrupting it.

    Sparse path (CPU with numba, when few enough of this step's codes are > 0 (`SPARSE_DENSITY`),
    counted first): f is kept as CSR (`kernels.relu_csr`), and four of the five products use
    only its nnz entries: x̂ = f W_dec and fᵀ g, ∂preᵀ x_n (`kernels.csr_matmul`, `csr_t_matmul`),
    and ∂pre at f's pattern (`kernels.sampled_dots`).  Only the encoder's x_n W_enc stays dense.  The
    gradients equal the dense path's up to summation order, and the choice depends only on
    this step's pre-activations, so resumed runs stay bitwise equal.  Timings: benchmarks/
    README.md, "Speed, third pass".
    Returns (loss, mse, l1, col, l0): only loss is differentiable.
    """

    @staticmethod
    def forward(ctx, xn: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, lam: float,
                ws: dict | None = None):
        n, d_in = xn.shape
        N = n * d_in
        ws = {} if ws is None else ws
        c = torch.addmv(b_enc, W_enc.t(), b_dec, alpha=-1)  # (d_dict,)
        pre = torch.addmm(c, xn, W_enc, out=_scratch(ws, "f", (n, W_enc.shape[1]), xn))  # (n, d_dict)
        w = W_dec.norm(dim=-1)  # (d_dict,)
        nnz, csr = _relu_csr(pre)
        ctx.lam, ctx.ws, ctx.csr = lam, ws, csr
        if csr is None:
            f = pre.clamp_min_(0)
            e = torch.addmm(b_dec, f, W_dec).sub_(xn)  # (n, d_in): x̂_n − x_n
            col = f.sum(0)  # (d_dict,)
            if nnz is None:
                # f ≥ 0, so Σ sign(f) counts the fired entries: one vectorised pass (count_nonzero is ~6× slower on CPU).
                l0 = torch.sign(f, out=_scratch(ws, "h", f.shape, f)).sum() / n
            else:
                l0 = xn.new_tensor(nnz / n)
            ctx.save_for_backward(xn, W_enc, W_dec, b_dec, f, e, w, col)
        else:
            crow, cols, vals = csr
            kernels = _kernels()
            e = kernels.csr_matmul(crow, cols, vals, W_dec).add_(b_dec).sub_(xn)
            col = torch.zeros_like(c).index_add_(0, cols, vals)
            l0 = xn.new_tensor(nnz / n)
            ctx.save_for_backward(xn, W_enc, W_dec, b_dec, vals, e, w, col)
        mse = torch.dot(e.view(-1), e.view(-1)) / N
        l1 = torch.dot(col, w) / N
        ctx.mark_non_differentiable(mse, l1, col, l0)
        return mse + lam * l1, mse, l1, col, l0

    @staticmethod
    def backward(ctx, g_loss: Tensor, *_):
        xn, W_enc, W_dec, b_dec, f, e, w, col = ctx.saved_tensors  # f: dense codes, or the CSR values
        s = g_loss / (xn.shape[0] * xn.shape[1])
        ls = ctx.lam * s
        g = e * (2 * s)  # (n, d_in)
        gW_dec_l1 = W_dec * (ls * col / w.clamp_min(1e-12))[:, None]
        if ctx.csr is None:
            gW_dec = torch.addmm(gW_dec_l1, f.t(), g)  # (d_dict, d_in)
            # The L1 gradient λ s w rides in the matmul's bias; threshold_backward keeps it where f > 0 in one pass.
            h = torch.addmm(ls * w, g, W_dec.t(), out=_scratch(ctx.ws, "h", f.shape, f))
            g_pre = torch.ops.aten.threshold_backward.grad_input(h, f, 0, grad_input=h)  # (n, d_dict), in place
            g_benc = g_pre.sum(0)
            gW_enc = torch.addr(xn.t() @ g_pre, b_dec, g_benc, alpha=-1)  # (d_in, d_dict)
        else:
            crow, cols, _ = ctx.csr
            kernels = _kernels()
            m = W_dec.shape[0]
            gW_dec = kernels.csr_t_matmul(crow, cols, f, g, m).add_(gW_dec_l1)
            g_pre = kernels.sampled_dots(crow, cols, g, W_dec).add_((ls * w)[cols])  # (nnz,): ∂pre where f > 0
            g_benc = torch.zeros_like(w).index_add_(0, cols, g_pre)
            gW_enc = torch.addr(kernels.csr_t_matmul(crow, cols, g_pre, xn, m), g_benc, b_dec, alpha=-1).t()
        g_bdec = torch.addmv(g.sum(0), W_enc, g_benc, alpha=-1)
        return None, gW_enc, g_benc, gW_dec, g_bdec, None, None


SPARSE_DENSITY = 0.12
"""ReluLoss keeps its codes as CSR when at most this fraction of them is > 0 on one torch thread
(2 / (1 + threads) times it on more: the CSR kernels run on one thread while the dense products
use them all).  At d_in 128, d_dict 512, batch 4096 the CSR step took 0.42×, 0.60× and 0.89×
the dense one at density 0.03, 0.08 and 0.125 on one thread (break-even near 0.16), and 0.87×
at 0.08 on two (break-even near 0.095); at d_dict 4096 it took 0.25-0.37× (benchmarks/sparse_steps.py)."""


def _relu_csr(pre: Tensor):
    """`kernels.relu_csr` at this step's density threshold where it applies (CPU, float32/64, numba), else (None, None)."""
    kernels = _kernels_for(pre) if _RELU_SPARSE == "auto" else None
    return (None, None) if kernels is None else kernels.relu_csr(pre, SPARSE_DENSITY * 2 / (1 + torch.get_num_threads()))


def _scratch(ws: dict, name: str, shape: tuple, like: Tensor) -> Tensor:
    """ws[name] as an uninitialised tensor of this shape, dtype and device (reallocated only when they change)."""
    t = ws.get(name)
    if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
        t = ws[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return t


def relu_loss_eager(xn: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, lam: float,
                    ws: dict | None = None):
    """Reference for `ReluLoss` (plain autograd, same signature and outputs)."""
    N = xn.shape[0] * xn.shape[1]
    f = ((xn - b_dec) @ W_enc + b_enc).relu()
    e = f @ W_dec + b_dec - xn
    col = f.sum(0)
    mse = e.pow(2).sum() / N
    l1 = (f @ W_dec.norm(dim=-1)).sum() / N
    l0 = (f > 0).sum(-1).to(f.dtype).mean()
    return mse + lam * l1, mse.detach(), l1.detach(), col.detach(), l0


# SAEKIT_RELU=eager selects the reference (STYLE.md 9), chosen once at import like SAEKIT_DECODE.
relu_loss = relu_loss_eager if os.environ.get("SAEKIT_RELU") == "eager" else ReluLoss.apply


class TopKEncode(torch.autograd.Function):
    """A k-sparse encoder and its selection in one step that reuses its (n, d_dict) memory.

        pre = x_n W_enc + (b_enc − b_dec W_enc)      values, indices = select(pre)
    `select` is k (TopK: `topk_codes`, the k largest per row, ReLU'd) or a function returning
    (values, indices) of shape (n, m), values ≥ 0 with 0 for an unchosen slot (BatchTopK's
    selection).  Given the dead latents `cols`, it also returns AuxK's codes among them:
    aux_values, aux_indices = the k_aux largest of pre[:, cols] (ReLU'd; none when `cols` is None).
    Backward (G = ∂values and ∂aux_values side by side, 0 where a value is ≤ 0; S_G the sparse
    matrix they form, k + k_aux entries per row):
        ∂W_enc = (S_Gᵀ x_n)ᵀ − b_dec ⊗ ∂b_enc       ∂b_enc = Σ_n G per latent       ∂b_dec = −W_enc ∂b_enc
    Autograd computes the same through a fresh pre, a zero-filled (n, d_dict) gradient and a
    dense product.  Here pre lives in `ws` across steps (a fresh 8 MB tensor faults in page by
    page, ~5 ms at batch 4096, d_dict 512 on one CPU thread), and ∂W_enc is one CSR product
    over the n·(m + k_aux) entries (`kernels.csr_t_matmul`: ~1.6 ms against ~8.6 ms for the
    dense scatter and product).  Used on CPU, with numba; elsewhere the SAEs take the autograd path.
    """

    @staticmethod
    def forward(ctx, xn: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, select, ws: dict | None = None,
                cols: Tensor | None = None, k_aux: int = 0):
        ws = {} if ws is None else ws
        c = torch.addmv(b_enc, W_enc.t(), b_dec, alpha=-1)
        pre = torch.addmm(c, xn, W_enc, out=_scratch(ws, "pre", (xn.shape[0], W_enc.shape[1]), xn))
        values, indices = topk_codes(pre, select) if isinstance(select, int) else select(pre)
        if cols is None:
            aux_values, aux_indices = values.new_empty(xn.shape[0], 0), indices.new_empty(xn.shape[0], 0)
        else:
            aux_values, aux_indices = _dead_codes(pre, cols, k_aux)
        ctx.save_for_backward(xn, W_enc, b_dec, torch.cat([values, aux_values], 1), torch.cat([indices, aux_indices], 1))
        ctx.k = values.shape[1]
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values: Tensor, _, g_aux: Tensor | None, __):
        xn, W_enc, b_dec, values, indices = ctx.saved_tensors  # main and AuxK codes side by side: (n, k + k_aux)
        g = g_values if indices.shape[1] == ctx.k else torch.cat([g_values, g_aux if g_aux is not None else
                                                                  g_values.new_zeros(g_values.shape[0], indices.shape[1] - ctx.k)], 1)
        G = torch.where(values > 0, g, 0.0)
        g_benc = torch.zeros_like(W_enc[0]).index_add_(0, indices.reshape(-1), G.reshape(-1))
        kernels = _kernels()
        gW_enc_t = kernels.csr_t_matmul(kernels.code_rows(indices), indices.reshape(-1), G.reshape(-1), xn, W_enc.shape[1])
        gW_enc = torch.addr(gW_enc_t, g_benc, b_dec, alpha=-1).t()  # gW_enc_t = S_Gᵀ x_n; this is (x_n − b_dec)ᵀ S_G
        g_bdec = torch.mv(W_enc, g_benc).neg_()
        return None, gW_enc, g_benc, g_bdec, None, None, None, None


def _sq(t: Tensor) -> Tensor:
    """Σ t² as one dot product: no (n, d) temporary (on CPU a fresh 2 MB tensor costs page faults)."""
    t = t.reshape(-1)
    return torch.dot(t, t)


def _centred_sq(x: Tensor) -> Tensor:
    """‖x − mean(x)‖² over the batch as Σ‖x‖² − ‖Σx‖²/n (no centred copy), at least 1e-12."""
    return (_sq(x) - _sq(x.sum(0)) / x.shape[0]).clamp_min(1e-12)


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """‖x − x̂‖² / ‖x − mean(x)‖² over the batch (scale-free; used for the AuxK term)."""
    return _sq(x_hat - x) / _centred_sq(x)


def recon_error(x_hat: Tensor, xn: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE per element, the error x̂_n − x_n detached for AuxK): one (n, d) temporary."""
    e = x_hat.sub(xn)
    return _sq(e) / e.numel(), e.detach()


def dead_cols(dead: Tensor | None) -> Tensor | None:
    """Indices of the dead latents, or None when there are none (CPU: no device sync)."""
    cols = None if dead is None else dead.nonzero().squeeze(1)
    return None if cols is None or cols.numel() == 0 else cols


def aux_term(values: Tensor, indices: Tensor, W_dec: Tensor, err: Tensor) -> Tensor:
    """AuxK's normalised error: the dead-latent codes decoded (no b_dec) against the residual −err.

    = `normalized_mse`(ê, −err), written so that no (n, d) tensor but ê + err is formed.
    """
    return _sq(sparse_decode(values, indices, W_dec) + err) / _centred_sq(err)


def _dead_codes(pre: Tensor, cols: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK's codes: the k_aux largest of pre[:, cols] per row, ReLU'd (all of them when cols has ≤ k_aux)."""
    sub = pre.index_select(1, cols)
    if cols.numel() <= k_aux:
        return sub.relu_(), cols.expand(pre.shape[0], -1)
    values, j = row_topk(sub, k_aux)
    return values.relu_(), cols[j]


# --- base SAE -------------------------------------------------------------------------------------
