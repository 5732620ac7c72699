"""saekit hook names placed on a plain Hugging Face model, and the Splicer that replaces activations there.

In-model training runs the Hugging Face `AutoModelForCausalLM` itself (so the result saves as
a normal model directory), not the TransformerLens bridge; the bridge only says which HF module
a saekit hook lives on (`hook_site`).  A test checks the activations there equal
`saekit.models.capture`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor, nn

from saekit.errors import SaekitError, did_you_mean

# saekit hook suffix (after `blocks.{L}.`) → (bridge component below the block, which side of its forward).
HOOK_SITES: dict[str, tuple[str, str]] = {
    "hook_resid_pre": ("", "input"),
    "hook_resid_post": ("", "output"),
    "hook_attn_out": ("attn", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "attn.hook_z": ("attn.o", "input"),
    "mlp.hook_post": ("mlp.out", "input"),
}
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class Site(NamedTuple):
    hook: str
    module: str
    """Dotted path of the Hugging Face module (e.g. transformer.h.0.attn.c_proj)."""
    side: str
    """input: the hook is the module's first input; output: its (first) output."""


def hook_site(adapter, hook: str) -> Site:
    """Where a saekit hook lives in the Hugging Face model, via the bridge's component map."""
    m = HOOK_RE.match(hook)
    if not m or m.group(2) not in HOOK_SITES:
        names = ", ".join(f"blocks.L.{s}" for s in HOOK_SITES)
        hint = did_you_mean(m.group(2), HOOK_SITES) if m else ""
        raise SaekitError(f"in-model training supports the hooks {names}; {hook!r} is not one of them{hint}")
    layer, suffix = m.group(1), m.group(2)
    component, side = HOOK_SITES[suffix]
    tl_path = f"blocks.{layer}" + (f".{component}" if component else "")
    try:
        module = adapter.translate_transformer_lens_path(tl_path)
    except ValueError as e:
        raise SaekitError(f"cannot place {hook!r} in this architecture ({e}); choose a hook_resid_post or hook_mlp_out hook") from None
    return Site(hook, module, side)


class Splicer:
    """Replaces hook activations in a Hugging Face model by `fn(x)` while active (hooks removed in `finally`).

    `fns[hook](x)` gets the activation flattened to (B, T, width) and returns the same
    shape.  The Hugging Face modules report attention and block outputs as tuples; only
    the first element (the hidden states) is replaced.
    """

    def __init__(self, hf: nn.Module, sites: list[Site]):
        self.hf = hf
        self.sites = sites

    @contextlib.contextmanager
    def active(self, fns: dict[str, Callable[[Tensor], Tensor]]):
        unknown = set(fns) - {s.hook for s in self.sites}
        if unknown:
            raise ValueError(f"hooks {sorted(unknown)} have no site in this Splicer (pass them to load_in_model)")
        handles = []
        try:
            for s in self.sites:
                if s.hook not in fns:
                    continue
                mod = self.hf.get_submodule(s.module)
                fn = fns[s.hook]
                if s.side == "output":
                    handles.append(mod.register_forward_hook(_output_hook(fn)))
                else:
                    handles.append(mod.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()


def _apply(fn, x: Tensor) -> Tensor:
    shape = x.shape
    return fn(x.reshape(shape[0], shape[1], -1)).reshape(shape)


def _output_hook(fn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_apply(fn, output[0]), *output[1:])
        return _apply(fn, output)

    return hook


def _input_hook(fn):
    def hook(module, args, kwargs):
        if args:
            return (_apply(fn, args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, kwargs | {key: _apply(fn, kwargs[key])}

    return hook
