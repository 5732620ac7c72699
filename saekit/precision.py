"""Numeric precision of training by device: autocast, float32 master weights, TF32, and which kernels run.

The policy, in one place so the training loop only asks for it:
- Parameters and Adam's state are always float32 (the master weights): dictionaries are never
  cast.  On CUDA the forward and backward may run under `torch.autocast` in bfloat16 (the
  default on GPUs that have it: float32's range, so no loss scaling) or float16 (with a
  `GradScaler`, since small gradients underflow float16); matmuls then take the tensor
  cores, while reductions such as the squared error, whose other operand is the float32
  batch, promote back to float32.
- TF32 for the float32 matmuls that remain (allowed by default: 10 mantissa bits, like
  bfloat16's 7, are far below a reconstruction loss's noise; `tf32=False` for exact references).
- CPU trains in float32: the numba kernels (`dictionaries/kernels.py`) take float32, and most
  CPUs have no fast bfloat16 matmul.  On CUDA there is no numba: top-k is torch's, sparse
  decoding is `embedding_bag` (`sae.sparse_decode_bag`); `kernel_path` names the choice that
  `sae._kernels_for` makes per tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from saekit.errors import SaekitError

COMPUTE = ("auto", "float32", "bfloat16", "float16")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short names a user may type for the COMPUTE choices."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def canonical(compute: str) -> str:
    """A precision name as COMPUTE spells it (fp32 → float32; case ignored); unknown names come back unchanged."""
    return ALIASES.get(compute.lower(), compute.lower())


@dataclass(frozen=True)
class Precision:
    """How a training step computes on one device (resolved by `precision_for`)."""

    device: torch.device
    """Where the step runs."""
    compute: torch.dtype
    """dtype of autocast's matmuls (float32: no autocast)."""
    tf32: bool
    """Whether float32 matmuls may use TF32 (CUDA only)."""

    @property
    def autocast(self) -> bool:
        return self.compute != torch.float32

    @property
    def scaled(self) -> bool:
        """float16 needs loss scaling (`grad_scaler`); bfloat16 does not."""
        return self.compute == torch.float16


def precision_for(device: torch.device | str, compute: str = "auto", tf32: bool = True) -> Precision:
    """The policy for `device`: `compute` auto → bfloat16 on a CUDA GPU that supports it, else float32."""
    device = torch.device(device)
    asked, compute = compute, canonical(compute)
    if compute not in COMPUTE:
        raise SaekitError(f"precision {asked!r} is not one of {', '.join(COMPUTE)} (or {', '.join(ALIASES)})")
    cuda = device.type == "cuda"
    if compute == "auto":
        compute = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    if compute != "float32" and not cuda:
        raise SaekitError(f"precision {asked} needs a CUDA device (training on {device.type} is float32: the numba kernels "
                          "take float32 and most CPUs have no fast half-precision matmul); pass --precision float32 or auto, or --device cuda")
    if compute == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise SaekitError(f"precision {asked}: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; "
                          "pass --precision float16 (loss-scaled) or float32")
    return Precision(device, _DTYPES[compute], tf32 and cuda)


def apply_matmul_flags(p: Precision) -> None:
    """Set torch's process-wide TF32 switches for `p` (no-op off CUDA)."""
    if p.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = p.tf32
        torch.backends.cudnn.allow_tf32 = p.tf32


def autocast(p: Precision):
    """Context for a step's forward and loss (the backward follows autocast's choices by itself)."""
    if not p.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=p.device.type, dtype=p.compute)


def grad_scaler(p: Precision) -> torch.amp.GradScaler:
    """Loss scaling for float16 (disabled, i.e. a pass-through, otherwise).

    Order in a step: `scaler.scale(loss).backward()`, `scaler.unscale_(opt)` before clipping
    gradients, `scaler.step(opt)`, `scaler.update()`.
    """
    return torch.amp.GradScaler(p.device.type, enabled=p.scaled)


def kernel_path(device: torch.device | str) -> str:
    """"numba" where the CPU kernels run (a CPU device with numba importable), else "torch"."""
    if torch.device(device).type != "cpu":
        return "torch"
    try:
        import numba  # noqa: F401
    except ImportError:
        return "torch"
    return "numba"
