"""The precision policy (saekit.precision): float32 master weights under autocast, CPU float32 only,
no numba off the CPU.  The torch path a CUDA step takes is exercised on CPU by turning the numba
kernels off; CUDA tests skip without a device."""

from __future__ import annotations

import pytest
import torch

from saekit import precision
from saekit.dictionaries import DictConfig, build
from saekit.dictionaries import sae as sae_mod
from saekit.errors import SaekitError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_policy():
    p = precision.precision_for("cpu")
    assert p.compute == torch.float32 and not p.autocast and not p.tf32 and not p.scaled
    assert not precision.grad_scaler(p).is_enabled()
    with precision.autocast(p):
        assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(SaekitError, match="needs a CUDA device"):
        precision.precision_for("cpu", "bfloat16")
    with pytest.raises(SaekitError, match="not one of"):
        precision.precision_for("cpu", "fp8")


def test_kernel_path_by_device():
    assert precision.kernel_path("cuda") == "torch"
    assert precision.kernel_path("meta") == "torch"
    assert precision.kernel_path("cpu") in ("numba", "torch")
    # the dictionaries' own per-tensor choice agrees: never numba for a tensor off the CPU
    assert sae_mod._kernels_for(torch.empty(2, 2, device="meta")) is None
    assert sae_mod._kernels_for(torch.empty(2, 2, dtype=torch.bfloat16)) is None


def planted(n=4096, d_in=32, n_feat=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d_in, generator=g), dim=1)
    idx = torch.randint(0, n_feat, (n, k), generator=g)
    vals = torch.rand(n, k, generator=g) + 0.5
    return torch.zeros(n, n_feat).scatter_add_(1, idx, vals) @ dirs


def train(kind: str, p: precision.Precision, steps=60, device="cpu"):
    torch.manual_seed(0)
    x = planted().to(device)
    x = x * (x.shape[1] / x.pow(2).sum(1).mean()).sqrt()
    d = build(DictConfig(kind=kind, d_in=32, d_dict=128, k=3)).to(device)
    opt = torch.optim.Adam(d.param_groups(1e-3))
    scaler = precision.grad_scaler(p)
    losses = []
    for i in range(steps):
        xn = x[(i * 256) % 4096 :][:256]
        if hasattr(d, "before_step"):
            d.before_step()
        state = {}
        if kind in ("topk", "batchtopk") and i >= steps // 2:  # AuxK's path too: half the latents called dead
            state = {"dead": torch.arange(128, device=device) % 2 == 0, "aux_k": 16}
        with precision.autocast(p):
            out = d.training_forward(xn, **state)
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        for q in d.parameters():  # master weights and their gradients stay float32 under autocast
            assert q.dtype == torch.float32 and (q.grad is None or q.grad.dtype == torch.float32)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if hasattr(d, "after_step"):
            d.after_step()
        losses.append(float(out.loss.detach()))
    return losses


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu", "codebook"])
def test_bfloat16_autocast_on_the_torch_path_trains_like_float32(monkeypatch, kind):
    monkeypatch.setattr(sae_mod, "_kernels_for", lambda t: None)  # what a CUDA tensor gets: no numba
    ref = train(kind, precision.Precision(torch.device("cpu"), torch.float32, False))
    bf = train(kind, precision.Precision(torch.device("cpu"), torch.bfloat16, False))
    assert bf[-1] < 0.9 * bf[0]  # it learns
    assert abs(bf[-1] - ref[-1]) < 0.15 * ref[-1] + 1e-3  # and ends where float32 does, within bf16's rounding


@cuda
@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_cuda_autocast_trains_like_float32(compute):
    ref = train("topk", precision.precision_for("cuda", "float32"), device="cuda")
    p = precision.precision_for("cuda", compute)
    precision.apply_matmul_flags(p)
    got = train("topk", p, device="cuda")
    assert got[-1] < 0.7 * got[0]
    assert abs(got[-1] - ref[-1]) < 0.15 * ref[-1] + 1e-3
    assert precision.grad_scaler(p).is_enabled() == (compute == "float16")


def test_precision_names_and_the_cuda_choice(monkeypatch):
    assert precision.precision_for("cpu", "fp32").compute == torch.float32
    assert precision.precision_for("cpu", "Float32").compute == torch.float32
    with pytest.raises(SaekitError, match="precision bf16 needs a CUDA device"):
        precision.precision_for("cpu", "bf16")
    with pytest.raises(SaekitError, match="precision fp16 needs a CUDA device"):
        precision.precision_for("cpu", "fp16")
    # what a CUDA device resolves to (torch.device("cuda") needs no GPU; the capability query is stubbed)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.precision_for("cuda", "auto").compute == torch.bfloat16
    assert precision.precision_for("cuda", "bf16").compute == torch.bfloat16
    p = precision.precision_for("cuda", "fp16")
    assert p.compute == torch.float16 and p.scaled and p.tf32
    assert precision.precision_for("cuda", "fp32", tf32=False).autocast is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "an old GPU")
    assert precision.precision_for("cuda", "auto").compute == torch.float32
    with pytest.raises(SaekitError, match="has no bfloat16; pass --precision float16"):
        precision.precision_for("cuda", "bfloat16")


def test_train_config_precision_reaches_the_trainer(tmp_path):
    from saekit.config import from_flags
    from saekit.dictionaries import Provenance
    from saekit.train import HookSource, TrainConfig, Trainer, tensor_batches

    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, float32, bfloat16, float16"):
        TrainConfig(precision="fp8")
    data = {"h": torch.randn(512, 8)}

    def trainer(**kw):
        cfg = from_flags(TrainConfig, kind="topk", d_dict=16, k=[2], tokens=512, batch_size=128, init_rows=128,
                         checkpoint_every=0, out=str(tmp_path / "o"), device="cpu", **kw)
        return Trainer(cfg, {"h": HookSource(8, Provenance(hook="h"))}, tensor_batches(data, 128), progress=False)

    assert TrainConfig().precision == "auto"
    assert trainer().precision.compute == torch.float32  # auto on a CPU
    assert trainer(precision="fp32").precision.compute == torch.float32
    with pytest.raises(SaekitError, match="precision bf16 needs a CUDA device.*pass --precision float32 or auto, or --device cuda"):
        trainer(precision="bf16")


def test_precision_flag_on_the_cli():
    from typer.testing import CliRunner

    from saekit_cli.main import app

    res = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert res.exit_code == 0 and "--precision" in res.output
    res = CliRunner().invoke(app, ["train", "--store", "x", "--precision", "fp8"])  # saekit_cli.main.main prints it as `error: ...`, exit 2
    assert isinstance(res.exception, SaekitError) and "precision 'fp8' is not one of" in str(res.exception)
