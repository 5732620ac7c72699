"""The trainer's optimisation details: gradient clipping (what Adam sees, and that it helps a short run)."""

from __future__ import annotations

import pytest
import torch

from saekit.dictionaries import Provenance
from saekit.train import HookSource, TrainConfig, Trainer, tensor_batches
from saekit.config import from_flags

D_IN, N_ATOMS, K_TRUE = 32, 96, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def planted(n: int, seed: int) -> torch.Tensor:
    """k-sparse positive combinations of fixed unit atoms, shaped like a residual stream: row norms
    heavy-tailed (log-normal scale) and one atom carrying much of the variance on every row."""
    A = torch.randn(N_ATOMS, D_IN, generator=torch.Generator().manual_seed(7))
    A = A / A.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, N_ATOMS - 1, generator=g).topk(K_TRUE, dim=-1).indices + 1
    c = torch.zeros(n, N_ATOMS).scatter(1, idx, 1 + 2 * torch.rand(n, K_TRUE, generator=g))
    c[:, 0] = 6 * torch.randn(n, generator=g)  # the dominant direction (the toy hook's first PC: 47% of variance)
    return (c @ A) * torch.exp(0.7 * torch.randn(n, 1, generator=g))


def make(tmp_path, name, x, **kw):
    base = dict(kind="topk", d_dict=128, k=[K_TRUE], tokens=100 * 512, batch_size=512, lr=1e-3, init_rows=1024,
                log_every=10, checkpoint_every=0, out=str(tmp_path / name), device="cpu")
    cfg = from_flags(TrainConfig, **(base | kw))
    scale = float((D_IN / x.pow(2).sum(-1).mean()).sqrt())  # as a store's scale: E‖x_n‖² = d_in
    return Trainer(cfg, {"h": HookSource(D_IN, Provenance(hook="h", scale=scale))}, tensor_batches({"h": x}, cfg.batch_size), progress=False)


def test_adam_sees_clipped_gradients(tmp_path):
    """Every step Adam takes uses a gradient of norm ≤ grad_clip / d_in; with grad_clip 0 the early ones are larger."""
    x = planted(4096, 0)
    norms = {}
    for clip in (0.5, 0.0):
        t = make(tmp_path, f"c{clip}", x, grad_clip=clip, tokens=5 * 512)
        seen = norms[clip] = []
        opt = t.runs[0].opt
        params = list(t.runs[0].dictionary.parameters())
        step = opt.step

        def recording_step(*a, _step=step, _params=params, _seen=seen, **k):
            _seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in _params])))
            return _step(*a, **k)

        opt.step = recording_step
        t.fit()
    assert len(norms[0.5]) == len(norms[0.0]) == 5
    assert max(norms[0.5]) <= 0.5 / D_IN * (1 + 1e-5)
    assert norms[0.0][0] > 0.5 / D_IN  # the bound was active, so the test says something


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_clipping_helps_a_short_run(tmp_path, kind):
    """The reason for the default: with the same lr and steps, clipped training reaches a lower held-out loss.

    The loss is the objective itself (the normalised MSE, AuxK being 0 with no dead latents;
    for relu, MSE + λ L1 at the default λ).
    """
    x, held = planted(8192, 0), planted(2048, 1)
    loss = {}
    for clip in (1.0, 0.0):
        t = make(tmp_path, f"{kind}{clip}", x, kind=kind, grad_clip=clip)
        t.fit()
        d = t.runs[0].dictionary.eval()
        with torch.no_grad():
            loss[clip] = float(d.training_forward(held * d.scale).loss)
    assert loss[1.0] < 0.97 * loss[0.0], loss


def test_grad_clip_validated():
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1)


@pytest.mark.parametrize("kind, scale", [("topk", 3.0), ("batchtopk", 3.0), ("relu", 1.0), ("codebook", 1.0)])
def test_matrices_learn_at_the_kinds_lr_multiple(tmp_path, kind, scale):
    """Adam's groups: W_enc/W_dec (2-D) at lr × weight_lr_scale, biases at lr; every parameter in exactly one group."""
    t = make(tmp_path, kind, planted(1024, 0), kind=kind, lr=2e-3, tokens=512)
    d, opt = t.runs[0].dictionary, t.runs[0].opt
    assert type(d).weight_lr_scale == scale
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, seen)) == sorted(id(p) for p in d.parameters())
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(2e-3 * (scale if p.dim() >= 2 else 1.0))


def test_a_larger_matrix_lr_lowers_topk_loss_of_a_short_run(tmp_path, monkeypatch):
    """Why TopK's matrices take 3× the lr: at the same lr and steps the held-out MSE is lower than at 1×."""
    from saekit.dictionaries.sae import TopKSAE

    x, held = planted(8192, 0), planted(2048, 1)
    mse = {}
    for scale in (3.0, 1.0):
        monkeypatch.setattr(TopKSAE, "weight_lr_scale", scale)
        t = make(tmp_path, f"s{scale}", x, lr=3e-4)
        t.fit()
        d = t.runs[0].dictionary.eval()
        with torch.no_grad():
            mse[scale] = float(d.training_forward(held * d.scale).terms["mse"])
    assert mse[3.0] < 0.9 * mse[1.0], mse
