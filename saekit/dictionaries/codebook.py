"""k-sparse codebooks: the Codebook Features layer (Tamkin et al. 2023, "Codebook Features").

The input slice of each group chooses its k most similar codes and is replaced by their
sum.  Codes are plain vectors, so "decode" is a lookup and the dictionary's features are
discrete: code (group g, index c) fired or it did not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.dictionaries.base import TrainOutput
from saekit.dictionaries.fast import row_topk


def code_similarity(xg: Tensor, codebook: Tensor, similarity: str) -> Tensor:
    """Similarity of each input slice to each code: xg (n, G, d_g), codebook (G, C, d_g) -> (G, n, C).

    Cosine only needs the codes normalised: dividing a row by ‖x_g‖ does not change which
    codes are its top k.
    """
    codes = F.normalize(codebook, dim=-1) if similarity == "cosine" else codebook
    return torch.bmm(xg.transpose(0, 1), codes.transpose(1, 2))  # (G, n, C)


def group_layer_norm(xn: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm of each group's slice with its own affine: xn (n, G·d_g), weight/bias (G, d_g) -> (n, G·d_g).

    Codebook Features normalises every codebook's input this way before choosing codes, and the
    chosen codes (in this normalised space) replace the activation.
    """
    G, d_g = weight.shape
    if G == 1:  # one group: the fused LayerNorm with its affine
        return F.layer_norm(xn, (d_g,), weight[0], bias[0], eps=1e-5)
    xg = F.layer_norm(xn.view(-1, G, d_g), (d_g,), eps=1e-5)
    return torch.addcmul(bias, xg, weight).reshape(xn.shape)  # one pass for the affine, not a multiply and an add


def choose_codes(xn: Tensor, codebook: Tensor, k: int, similarity: str) -> Tensor:
    """Indices of the k most similar codes per token and group: (n, G, k), values in [0, C)."""
    G, C, d_g = codebook.shape
    if k == 1 and similarity in ("cosine", "inner") and xn.device.type == "cpu":  # blocked argmax, same result (codebook_k1)
        from saekit.dictionaries.codebook_k1 import choose_codes_k1

        return choose_codes_k1(xn, codebook, similarity)
    sims = code_similarity(xn.view(-1, G, d_g), codebook, similarity)  # (G, n, C)
    with torch.no_grad():
        _, idx = row_topk(sims.reshape(-1, C), k)  # (G·n, k): numba on CPU (sae.row_topk)
    return idx.view(G, -1, k).transpose(0, 1)  # (n, G, k)


def sum_codes(idx: Tensor, codebook: Tensor) -> Tensor:
    """Σ of the chosen code vectors per group, concatenated over groups: idx (n, G, k) -> (n, G·d_g).

    One `embedding_bag` over the flattened (G·C, d_g) table (k = 1: `index_select`): gathers n·G·k rows, and its
    gradient reaches exactly the chosen codes (the direct gradient of Codebook Features).
    """
    G, C, d_g = codebook.shape
    n = idx.shape[0]
    flat = idx + torch.arange(G, device=idx.device)[None, :, None] * C  # (n, G, k) into the G·C table
    if idx.shape[-1] == 1:  # k = 1: a gather; its backward (index_add) costs 1/2-1/4 of embedding_bag's on CPU
        return codebook.reshape(G * C, d_g).index_select(0, flat.reshape(-1)).view(n, G * d_g)
    out = F.embedding_bag(flat.reshape(n * G, -1), codebook.reshape(G * C, d_g), mode="sum")  # (n·G, d_g)
    return out.view(n, G * d_g)


class Codebook(Dictionary):
    """Grouped k-sparse codebook (Codebook Features, Tamkin et al. 2023, §2).

    x_n is cut into G slices x_g of width d_in/G; group g has C = d_dict/G codes c_{g,j}:

        S_g   = top-k_j sim(x_g, c_{g,j})       sim = cos or inner product
        x̂_g   = Σ_{j ∈ S_g} c_{g,j}              x̂_n = concat_g x̂_g
        loss  = ‖x_n − x̂_n‖² / d_in

    Codes (`encode`) are dense 0/1 of shape (n, d_dict), 1 at index g·C + j for j ∈ S_g, so
    `decode(codes) = codes @ W_dec` with W_dec the block-diagonal (d_dict, d_in) matrix of
    code vectors.  The choice is not differentiable; the chosen codes get the reconstruction
    gradient directly.  Codes start at k-means centroids / k of a sample (scikit-learn);
    dead codes are replaced by recent inputs (`resample_dead`).
    """

    kind = "codebook"

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__(cfg, prov)
        G = cfg.groups
        C, d_g = cfg.d_dict // G, cfg.d_in // G
        g = torch.Generator().manual_seed(0)
        self.codebook = nn.Parameter(torch.randn(G, C, d_g, generator=g) / d_g**0.5)  # (G, C, d_g)
        if cfg.input_norm == "layernorm":  # the scale stays 1: input and codes live in the LayerNorm's space
            self.ln_weight = nn.Parameter(torch.ones(G, d_g))
            self.ln_bias = nn.Parameter(torch.zeros(G, d_g))

    def normalise_n(self, xn: Tensor) -> Tensor:
        """The codebook's input: xn itself (input_norm=scale) or its per-group LayerNorm (input_norm=layernorm)."""
        if self.cfg.input_norm == "layernorm":
            return group_layer_norm(xn, self.ln_weight, self.ln_bias)
        return xn

    @property
    def W_dec(self) -> Tensor:
        return torch.block_diag(*self.codebook.unbind(0))  # (G·C, G·d_g) = (d_dict, d_in)

    @property
    def k(self) -> int:
        return self.cfg.k or 1

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.codebook.copy_(torch.randn(self.codebook.shape, generator=generator) / self.codebook.shape[-1] ** 0.5)

    def init_from_data(self, xn: Tensor, seed: int = 0) -> None:
        """Codes ← k-means centroids of each group's slices of a sample, divided by k (k codes are summed)."""
        from sklearn.cluster import KMeans

        G, C, d_g = self.codebook.shape
        with torch.no_grad():
            x = self.normalise_n(xn.to(self.codebook)).float().cpu().view(-1, G, d_g)
        if x.shape[0] < C:  # too few rows for C clusters: keep the random init for this sample size
            return
        with torch.no_grad():
            for g in range(G):
                km = KMeans(n_clusters=C, n_init=1, max_iter=20, random_state=seed).fit(x[:, g].numpy())
                centres = torch.from_numpy(km.cluster_centers_).float()
                self.codebook[g].copy_(centres.to(self.codebook) / self.k)

    def encode_n(self, xn: Tensor) -> Tensor:
        idx = choose_codes(self.normalise_n(xn), self.codebook, self.k, self.cfg.similarity)  # (n, G, k)
        G, C, _ = self.codebook.shape
        flat = (idx + torch.arange(G, device=xn.device)[None, :, None] * C).reshape(xn.shape[0], -1)
        codes = torch.zeros(xn.shape[0], self.cfg.d_dict, dtype=self.codebook.dtype, device=xn.device)
        return codes.scatter(1, flat, 1.0)

    def decode_n(self, f: Tensor) -> Tensor:
        # codes (n, G·C) -> per group (G, n, C) @ (G, C, d_g): no block-diagonal zeros multiplied.
        G, C, d_g = self.codebook.shape
        out = torch.bmm(f.view(-1, G, C).transpose(0, 1), self.codebook)  # (G, n, d_g)
        return out.transpose(0, 1).reshape(-1, G * d_g)

    def training_forward(self, xn: Tensor, **_) -> TrainOutput:
        G, C, _ = self.codebook.shape
        xn = self.normalise_n(xn)
        with torch.no_grad():
            idx = choose_codes(xn, self.codebook, self.k, self.cfg.similarity)  # (n, G, k)
        x_hat = sum_codes(idx, self.codebook)
        mse = (x_hat - xn).pow(2).sum(-1).mean() / xn.shape[-1]
        flat = (idx + torch.arange(G, device=xn.device)[None, :, None] * C).flatten()
        fired = xn.new_zeros(self.cfg.d_dict).index_add_(0, flat, xn.new_ones(flat.shape[0])) > 0
        l0 = xn.new_tensor(float(G * self.k))
        return TrainOutput(mse, {"mse": mse}, fired, l0)

    def loss_terms(self, xn: Tensor, **state) -> dict[str, Tensor]:
        out = self.training_forward(xn, **state)
        return {"loss": out.loss, **out.terms}

    @torch.no_grad()
    def resample_dead(self, dead: Tensor, xn: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """Replace dead codes (d_dict,) bool by what the codebook misses on recent inputs.

        Rows of xn are drawn per group with probability ∝ ‖e_g‖², e_g = x_g − x̂_g (as Anthropic
        resample dead neurons towards badly reconstructed inputs).  With k > 1 a dead code of
        group g becomes the residual slice e_g: a code equal to a missing component is added where
        that component occurs.  With k = 1 nothing is added, the one code *is* the output, so the
        dead code becomes the input slice x_g itself: it is then the nearest code of that input and
        of its neighbours.  (A residual would rarely be any input's nearest code, and would give
        x − x̂ where it was: such codes died again at every replacement.)  Returns {parameter name:
        bool mask over its leading dims} so the trainer resets the optimiser's moments of the
        replaced codes.
        """
        G, C, d_g = self.codebook.shape
        mask = dead.view(G, C)
        if not bool(mask.any()):
            return {}
        xn = self.normalise_n(xn)
        idx = choose_codes(xn, self.codebook, self.k, self.cfg.similarity)
        resid = (xn - sum_codes(idx, self.codebook)).view(-1, G, d_g)  # (n, G, d_g)
        weights = resid.pow(2).sum(-1).t().float().cpu() + 1e-12  # (G, n)
        new = torch.empty(int(mask.sum()), d_g, dtype=self.codebook.dtype, device=xn.device)
        i = 0
        for g in range(G):  # G is small (e.g. n_heads): one draw per group
            m = int(mask[g].sum())
            if m:
                rows = torch.multinomial(weights[g], m, replacement=m > weights.shape[1], generator=generator).to(xn.device)
                new[i:i + m] = (resid if self.k > 1 else xn.view(-1, G, d_g))[rows, g]
                i += m
        self.codebook[mask] = new  # boolean-mask assignment walks (g, c) in the same row-major order
        return {"codebook": mask}
