"""Dictionaries that read some hooks and predict others: transcoders, skip transcoders, crosscoders, CLTs.

One class, `Coder`, in normalised space (each input hook scaled by its store scale and the
inputs concatenated, x_n (n, d_in); the targets likewise, y_n (n, d_out)):

    pre  = (x_n − b_in) W_enc + b_enc                          (n, d_dict)
    f    = act(pre)           relu | topk | batchtopk | jumprelu, as the SAE kinds of those names
    ŷ_n  = f W_dec + b_dec  [+ x_n W_skip]                     (n, d_out)
    loss = ‖y_n − ŷ_n‖² / d_out  (mean over tokens)  + the activation's term:
           relu: (λ / d_out) Σ_i f_i Σ_h ‖W_dec,i,h‖ (decoder norm summed over the out hooks h);
           topk/batchtopk: α·AuxK (dead latents reconstruct the residual, Gao et al. 2024 §A.2);
           jumprelu: λ·L0 / d_out with λ following the target L0 k (saekit.dictionaries.jumprelu).

The kinds differ only in their hooks and in which weights are structurally zero:
- `transcoder`: in [MLP input], out [MLP output] (Dunefsky et al. 2024);
- `skip-transcoder`: + W_skip (d_in, d_out), a learnt linear map, starting at 0 (Paulo et al. 2025);
- `crosscoder` (acausal): in = out = [H1..Hn]; one latent space, whose encoder on the
  concatenation is the sum of one encoder per hook, and a decoder per hook (W_dec's column
  blocks); sparsity on the whole latent vector (Lindsey et al. 2024);
- `clt`: in = [MLP input of layers 0..L−1], out = [MLP output of the same layers]; the
  latents come in L equal blocks, block l reads layer l's input only (block-diagonal W_enc)
  and writes every output at layers ≥ l (block upper-triangular W_dec); TopK/BatchTopK per
  layer, so encoding layer by layer equals encoding all at once (Ameisen et al. 2025).
  The mean over all output elements is the sum over layers of each layer's MSE / L.
  Known cost: the CLT's blocks are kept as masked dense matrices, L× the work and memory
  of the block products (simple, and exact; fine for the layer counts saekit trains).

Decoder rows are unit-norm for topk, batchtopk and jumprelu (as for the SAEs); relu
weights its L1 by the decoder norms instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from saekit.dictionaries.base import DictConfig, Dictionary, ForwardOutput, Provenance, TrainOutput
from saekit.dictionaries import fast
from saekit.dictionaries.fast import (TopKEncode, _kernels_for, aux_term, batch_topk_mask, dead_cols, recon_error, row_topk,
                                      sparse_decode, topk_codes)
from saekit.dictionaries.jumprelu import JumpReLUFn, StepFn
from saekit.dictionaries.sae import geometric_median
from saekit.errors import SaekitError


def block_masks(in_widths: list[int], out_widths: list[int], d_dict: int) -> tuple[Tensor, Tensor]:
    """A CLT's structure: encoder mask (d_in, d_dict), block l reads input l; decoder mask (d_dict, d_out), block l writes outputs ≥ l."""
    L = len(in_widths)
    m = d_dict // L
    enc = torch.zeros(sum(in_widths), d_dict)
    dec = torch.zeros(d_dict, sum(out_widths))
    i0 = o0 = 0
    for l in range(L):
        enc[i0:i0 + in_widths[l], l * m:(l + 1) * m] = 1
        dec[l * m:(l + 1) * m, o0:] = 1
        i0 += in_widths[l]
        o0 += out_widths[l]
    return enc, dec


def _segments(widths: list[int]) -> list[tuple[int, int]]:
    out, a = [], 0
    for w in widths:
        out.append((a, a + w))
        a += w
    return out


class Coder(Dictionary):
    """Read the input hooks, predict the output hooks through sparse latents (the module docstring's equations)."""

    kind = "coder"
    bandwidth = 0.1
    """jumprelu: ε of the pseudo-derivatives (as JumpReLUSAE.bandwidth)."""
    l0_rate = 0.02
    """jumprelu: how fast λ follows the target L0 (as JumpReLUSAE.l0_rate)."""
    threshold_momentum = 0.9
    """batchtopk: θ's running mean forgets at this rate per step (as BatchTopKSAE.threshold_momentum)."""

    def __init__(self, cfg: DictConfig, prov: Provenance | None = None):
        super().__init__(cfg, prov)
        self.in_widths = list(cfg.in_widths) or [cfg.d_in]
        self.out_widths = list(cfg.out_widths) or [cfg.d_out or cfg.d_in]
        d_in, d_out, d_dict = cfg.d_in, sum(self.out_widths), cfg.d_dict
        self.d_out = d_out
        self.blocks = len(self.in_widths) if cfg.kind == "clt" else 1
        """Latent blocks with their own sparsity (a CLT's layers; 1 for the others)."""
        self.act = cfg.activation
        self._ws: dict = {}  # the fused CPU step's reusable work tensors (TopKEncode; never saved)
        self.unit_norm_decoder = self.act != "relu"
        self.weight_lr_scale = 3.0 if self.unit_norm_decoder else 1.0  # unit decoder rows turn slowly (TopKSAE.weight_lr_scale)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_dict))  # (d_in, d_dict)
        self.b_enc = nn.Parameter(torch.zeros(d_dict))
        self._parameters["W_dec"] = nn.Parameter(torch.zeros(d_dict, d_out))  # (d_dict, d_out)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.b_in = nn.Parameter(torch.zeros(d_in))
        if cfg.kind == "skip-transcoder":
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))  # (d_in, d_out)
        if self.act == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_dict))
            self.register_buffer("l0_coef", torch.tensor(1.0))
        if self.act == "batchtopk":
            self.register_buffer("threshold", torch.full((self.blocks,), -1.0))  # per block; < 0: not estimated yet
        if cfg.kind == "clt":
            enc, dec = block_masks(self.in_widths, self.out_widths, d_dict)
            self.register_buffer("enc_mask", enc, persistent=False)
            self.register_buffer("dec_mask", dec, persistent=False)
        else:
            self.enc_mask = self.dec_mask = None
        p = self.prov
        in_s = list(p.in_scales) or [float(p.scale)] * len(self.in_widths)
        out_s = list(p.out_scales) or [float(p.scale)] * len(self.out_widths)
        self.register_buffer("in_scale", torch.cat([torch.full((w,), float(s)) for w, s in zip(self.in_widths, in_s)]), persistent=False)
        self.register_buffer("out_scale", torch.cat([torch.full((w,), float(s)) for w, s in zip(self.out_widths, out_s)]), persistent=False)

    # --- weights with their structure --------------------------------------------------------
    @property
    def W_dec(self) -> Tensor:
        """Decoder (d_dict, d_out) in normalised space (a CLT's masked entries are 0)."""
        W = self._parameters["W_dec"]
        return W if self.dec_mask is None else W * self.dec_mask

    @property
    def encoder(self) -> Tensor:
        return self.W_enc if self.enc_mask is None else self.W_enc * self.enc_mask

    def dec_norms(self) -> Tensor:
        """(d_dict,) Σ over out hooks of each latent's decoder norm into that hook (the crosscoder's L1 weight)."""
        W = self.W_dec
        return sum(W[:, a:b].norm(dim=-1) for a, b in _segments(self.out_widths))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random unit decoder rows and encoder columns (a crosscoder: encoder = decoderᵀ, one space), zero biases, W_skip 0."""
        W = torch.randn(self.cfg.d_dict, self.d_out, generator=generator)
        if self.dec_mask is not None:
            W *= self.dec_mask.cpu()
        W /= W.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        self._parameters["W_dec"].copy_(W)
        if self.cfg.kind == "crosscoder":
            E = W.t().clone()
        else:
            E = torch.randn(self.cfg.d_in, self.cfg.d_dict, generator=generator)
            if self.enc_mask is not None:
                E *= self.enc_mask.cpu()
            E /= E.norm(dim=0, keepdim=True).clamp_min(1e-8)
        self.W_enc.copy_(E)
        for t in (self.b_enc, self.b_dec, self.b_in):
            t.zero_()
        if hasattr(self, "W_skip"):
            self.W_skip.zero_()
        if self.act == "jumprelu":
            self.threshold.fill_(self.bandwidth)
            self.l0_coef.fill_(self.cfg.l1 or 1.0)
        if self.act == "batchtopk":
            self.threshold.fill_(-1.0)

    @torch.no_grad()
    def init_from_data(self, xn: Tensor, target: Tensor | None = None) -> None:
        """b_in ← geometric median of the inputs, b_dec ← of the targets; relu: encoder scaled to the best first fit;
        jumprelu: θ where ~8k latents (at most a tenth) fire (as JumpReLUSAE.init_from_data)."""
        y = xn if target is None else target
        self.b_in.copy_(geometric_median(xn.float()).to(self.b_in))
        self.b_dec.copy_(geometric_median(y.float()).to(self.b_dec))
        pre = self.pre_acts(xn)
        if self.act == "relu":
            yc = y.float() - self.b_dec
            y_hat = pre.relu() @ self.W_dec
            c = (y_hat * yc).sum() / y_hat.pow(2).sum().clamp_min(1e-12)
            if c > 0:
                self.W_enc.mul_(c)
        elif self.act == "jumprelu" and self.cfg.k:
            q = 1 - min(0.1, 8.0 * self.cfg.k * self.blocks / self.cfg.d_dict)
            row = min(pre.shape[0], max(1, round(q * pre.shape[0])))
            self.threshold.copy_(pre.kthvalue(row, dim=0).values.clamp_min(self.bandwidth))

    # --- maths in normalised space --------------------------------------------------------------
    def pre_acts(self, xn: Tensor, present: Tensor | None = None) -> Tensor:
        """(x_n − b_in) W_enc + b_enc, (n, d_dict); `present` (d_in,) 0/1 drops absent hooks' terms."""
        xc = xn - self.b_in
        if present is not None:
            xc = xc * present
        return torch.addmm(self.b_enc, xc, self.encoder)

    def _block_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k of ReLU(pre) within each latent block: values and global indices (n, blocks·k)."""
        n, B = pre.shape[0], self.blocks
        if B == 1:
            return topk_codes(pre, self.cfg.k)
        m = self.cfg.d_dict // B
        values, idx = topk_codes(pre.reshape(n * B, m), self.cfg.k)  # (n·B, k), within the block
        idx = idx + (torch.arange(B, device=pre.device) * m).repeat(n).unsqueeze(1)
        return values.reshape(n, -1), idx.reshape(n, -1)

    def _block_batch_topk(self, pre: Tensor) -> Tensor:
        """Dense codes: the k·n largest ReLU(pre) of each latent block over the batch."""
        if self.blocks == 1:
            return batch_topk_mask(pre, self.cfg.k)
        return torch.cat([batch_topk_mask(p, self.cfg.k) for p in pre.chunk(self.blocks, dim=1)], dim=1)

    def codes_n(self, pre: Tensor) -> Tensor:
        """Inference codes (n, d_dict) from pre-activations (batch-independent: BatchTopK uses its thresholds)."""
        if self.act == "relu":
            return pre.relu()
        if self.act == "topk":
            values, indices = self._block_topk(pre)
            return torch.zeros_like(pre).scatter(1, indices, values)
        if self.act == "batchtopk":
            theta = self.threshold.clamp_min(0).repeat_interleave(self.cfg.d_dict // self.blocks)
            return torch.where(pre > theta, pre, torch.zeros_like(pre))
        return pre.relu() * (pre > self.threshold).to(pre.dtype)  # jumprelu

    def encode_n(self, xn: Tensor) -> Tensor:
        return self.codes_n(self.pre_acts(xn))

    def decode_n(self, f: Tensor) -> Tensor:
        """f W_dec + b_dec: the latents' prediction (no skip term: that needs the input)."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    def skip_n(self, xn: Tensor) -> Tensor | None:
        return xn @ self.W_skip if hasattr(self, "W_skip") else None

    # --- training ------------------------------------------------------------------------------
    def training_forward(self, xn: Tensor, target: Tensor | None = None, dead: Tensor | None = None, aux_k: int | None = None,
                         aux_coef: float = 1 / 32, l1_coef: float | None = None, **_) -> TrainOutput:
        """One step's loss: predict `target` (n, d_out) from `xn` (n, d_in), both normalised (a crosscoder: target = xn)."""
        y = xn if target is None else target
        skip = self.skip_n(xn)
        terms: dict[str, Tensor] = {}
        if self.act == "topk" and self.blocks == 1 and fast._TOPK_STEP == "fused" and _kernels_for(xn) is not None:
            # CPU: TopKSAE's fused encoder (reused pre buffer, CSR backward), AuxK's dead-latent codes included
            cols = dead_cols(dead)
            values, indices, aux_values, aux_indices = TopKEncode.apply(
                xn, self.W_enc, self.b_enc, self.b_in, self.cfg.k, self._ws, cols, min(aux_k or self.d_out // 2, self.cfg.d_dict))
            y_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
            if skip is not None:
                y_hat = y_hat + skip
            mse, err = recon_error(y_hat, y)
            aux = err.new_zeros(()) if cols is None else aux_term(aux_values, aux_indices, self.W_dec, err)
            active = (values > 0).float()
            fired = xn.new_zeros(self.cfg.d_dict).index_add_(0, indices.flatten(), active.flatten()) > 0
            return TrainOutput(mse + aux_coef * aux, {"mse": mse, "auxk": aux}, fired, active.sum(-1).mean())
        pre = self.pre_acts(xn)  # (n, d_dict)
        if self.act == "topk":
            values, indices = self._block_topk(pre)  # (n, blocks·k)
            y_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
            active = (values > 0).float()
            fired = xn.new_zeros(self.cfg.d_dict).index_add_(0, indices.flatten(), active.flatten()) > 0
            l0 = active.sum(-1).mean()
        else:
            if self.act == "relu":
                f = pre.relu()
            elif self.act == "batchtopk":
                f = self._block_batch_topk(pre)
                self._update_threshold(f.detach())
            else:
                f = JumpReLUFn.apply(pre, self.threshold, self.bandwidth)
            y_hat = self.decode_n(f)
            on = f.detach() > 0
            fired, l0 = on.any(0), on.sum(-1).float().mean()
        if skip is not None:
            y_hat = y_hat + skip
        mse, err = recon_error(y_hat, y)
        loss = mse
        terms["mse"] = mse
        if self.act == "relu":
            lam = float(self.cfg.l1 if l1_coef is None else l1_coef)
            l1 = (f * self.dec_norms()).sum(-1).mean() / self.d_out
            terms["l1"] = l1
            loss = loss + lam * l1
        elif self.act in ("topk", "batchtopk"):
            aux = self.aux_loss(pre, err, dead, aux_k)
            terms["auxk"] = aux
            loss = loss + aux_coef * aux
        else:  # jumprelu
            l0_step = StepFn.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()
            coef = self.l0_coef.clone()
            sparsity = coef * l0_step / self.d_out
            if self.cfg.k:
                with torch.no_grad():  # λ follows the target L0 (k per block)
                    self.l0_coef.mul_(torch.exp(self.l0_rate * (l0_step.detach() / (self.cfg.k * self.blocks) - 1)))
            terms |= {"l0_penalty": sparsity.detach(), "l0_coef": coef}
            loss = loss + sparsity
        return TrainOutput(loss, terms, fired, l0)

    def aux_loss(self, pre: Tensor, err: Tensor, dead: Tensor | None, aux_k: int | None) -> Tensor:
        """AuxK: the k_aux largest dead-latent pre-activations reconstruct the residual −err (normalised); 0 when none is dead."""
        if dead is None:
            return err.new_zeros(())
        k_aux = min(aux_k or self.d_out // 2, self.cfg.d_dict)
        values, indices = row_topk(pre + torch.where(dead, 0.0, -torch.inf), k_aux)
        return aux_term(values.relu(), indices, self.W_dec, err) * dead.any()

    @torch.no_grad()
    def _update_threshold(self, f: Tensor) -> None:
        """BatchTopK: each block's θ ← running mean of the smallest activation it kept."""
        for b, fb in enumerate(f.chunk(self.blocks, dim=1)):
            pos = fb > 0
            if not bool(pos.any()):
                continue
            smallest = torch.where(pos, fb, torch.full_like(fb, torch.inf)).min()
            t = self.threshold[b]
            m = self.threshold_momentum
            self.threshold[b] = torch.where(t < 0, smallest, m * t + (1 - m) * smallest)

    def loss_terms(self, xn: Tensor, target: Tensor | None = None, **state) -> dict[str, Tensor]:
        out = self.training_forward(xn, target=target, **state)
        return {"loss": out.loss, **out.terms}

    @torch.no_grad()
    def before_step(self) -> None:
        """Unit decoder rows: remove the gradient component along each row (it would only change its norm)."""
        W, g = self._parameters["W_dec"], self._parameters["W_dec"].grad
        if self.unit_norm_decoder and g is not None:
            g.sub_((g * W).sum(-1, keepdim=True) * W)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_norm_decoder:
            W = self._parameters["W_dec"]
            W.div_(W.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        if self.act == "jumprelu":
            self.threshold.clamp_(min=0)

    # --- public, original units ----------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Codes from the input hooks concatenated (n, d_in), original units."""
        return self.encode_n(x.to(self.in_scale.dtype) * self.in_scale)

    def decode(self, f: Tensor) -> Tensor:
        """The latents' prediction of the out hooks concatenated (n, d_out), original units (no skip term)."""
        return self.decode_n(f) / self.out_scale

    def forward(self, x: Tensor) -> ForwardOutput:
        """Prediction (skip term included) and codes from the concatenated inputs."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.in_scale.dtype)
        f = self.encode(x2)
        y = self.decode(f)
        skip = self.skip_n(x2 * self.in_scale)
        if skip is not None:
            y = y + skip / self.out_scale
        return ForwardOutput(y.reshape(*shape[:-1], -1), f.reshape(*shape[:-1], -1))

    def directions(self) -> Tensor:
        """Each latent's decoder vector into the out hooks (concatenated), original units, (d_dict, d_out)."""
        return self.W_dec / self.out_scale

    def _gather(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None, list[bool]]:
        """Inputs concatenated in normalised units (absent hooks 0), the 0/1 presence mask (None: all present), which hooks."""
        have = [h in inputs for h in self.in_hooks]
        if not any(have):
            raise SaekitError(f"encode_hooks: none of the {self.cfg.kind}'s input hooks ({', '.join(self.in_hooks)}) was given")
        ref = next(inputs[h] for h in self.in_hooks if h in inputs)
        n = ref.reshape(-1, ref.shape[-1]).shape[0]
        parts = [inputs[h].reshape(n, -1).to(self.in_scale) if ok else self.in_scale.new_zeros(n, w)
                 for h, ok, w in zip(self.in_hooks, have, self.in_widths)]
        x = torch.cat(parts, dim=1) * self.in_scale
        if all(have):
            return x, None, have
        present = torch.cat([torch.full((w,), float(ok), device=x.device) for ok, w in zip(have, self.in_widths)])
        return x, present, have

    def encode_hooks(self, inputs: dict[str, Tensor]) -> Tensor:
        """Codes (n, d_dict); a missing hook contributes nothing (a CLT: the latents of layers whose input is absent stay 0)."""
        xn, present, have = self._gather(inputs)
        f = self.codes_n(self.pre_acts(xn, present))
        if self.blocks > 1 and not all(have):
            f = f * torch.tensor(have, dtype=f.dtype, device=f.device).repeat_interleave(self.cfg.d_dict // self.blocks)
        return f

    def decode_hooks(self, codes: Tensor) -> dict[str, Tensor]:
        """{out hook: (n, width)} in original units: the latents' part (a skip transcoder's skip term is in `predict`)."""
        y = self.decode(codes)
        return {h: y[:, a:b] for h, (a, b) in zip(self.out_hooks, _segments(self.out_widths))}

    def predict(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """decode_hooks(encode_hooks(inputs)), plus the skip term x W_skip for a skip transcoder."""
        out = self.decode_hooks(self.encode_hooks(inputs))
        if hasattr(self, "W_skip"):
            xn, present, _ = self._gather(inputs)
            skip = self.skip_n(xn) / self.out_scale
            out = {h: out[h] + skip[:, a:b] for h, (a, b) in zip(self.out_hooks, _segments(self.out_widths))}
        return out


class Transcoder(Coder):
    kind = "transcoder"


class SkipTranscoder(Coder):
    kind = "skip-transcoder"


class Crosscoder(Coder):
    kind = "crosscoder"


class CrossLayerTranscoder(Coder):
    kind = "clt"


def coder_from_tensors(kind: str, act: str, d_in: int, d_out: int, d_dict: int, prov: Provenance, state: dict[str, Tensor], *,
           in_widths=None, out_widths=None, k=None) -> Dictionary:
    """A coder built from another tool's tensors: `state`'s tensors (b_in 0, scales 1 unless given, the rest of its state at defaults)."""
    cfg = DictConfig(kind=kind, d_in=d_in, d_out=d_out, d_dict=d_dict, k=k, activation=act,
                     in_widths=in_widths or [d_in], out_widths=out_widths or [d_out])
    d = Coder(cfg, prov)
    own = d.state_dict()
    full = {name: state[name].to(own[name].dtype).reshape(own[name].shape) if name in state else own[name] for name in own}
    d.load_state_dict(full)
    return d
