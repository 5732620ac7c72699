"""Analysis of dictionaries that read some hooks and write others (transcoders, crosscoders, CLTs).

A latent of such a dictionary is *read* at its in hooks (its contexts come from the
activations there: a transcoder's from the MLP input) and *writes* at its out hooks (its
effect on the model goes through its decoder there: a transcoder's into the MLP output).
Only the shared hook interface is used (`in_hooks`, `out_hooks`, `encode_hooks`,
`decode_hooks`), so every kind that implements it works; an SAE reads and writes one hook
and keeps its own `encode` / `directions`.

A latent's decoder direction at out hook h is what one unit of it adds there:
`decode_hooks(e_i)[h] − decode_hooks(0)[h]` (decoders are affine in the codes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from saekit.errors import SaekitError

NEIGHBOUR_LIMIT = 1 << 27
"""Most numbers in the (d_dict, Σ out widths) decoder matrix that nearest neighbours are computed on."""


def in_hooks(d) -> list[str]:
    return list(getattr(d, "in_hooks", None) or [d.prov.hook])


def out_hooks(d) -> list[str]:
    return list(getattr(d, "out_hooks", None) or [d.prov.hook])


def is_single(d) -> bool:
    """Reads and writes the same one hook (an SAE or codebook)."""
    return in_hooks(d) == out_hooks(d) and len(out_hooks(d)) == 1


def _device(d) -> torch.device:
    t = next(iter(d.state_dict().values()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def encode_rows(d, acts: dict[str, Tensor]) -> Tensor:
    """Codes (n, d_dict) from {in hook: (n, width) rows in the hook's original units}."""
    dev = _device(d)
    if is_single(d):
        return d.encode(acts[d.prov.hook].float().to(dev))
    return d.encode_hooks({h: x.float().to(dev) for h, x in acts.items()})


@torch.no_grad()
def out_directions(d, indices: list[int] | Tensor | None = None, chunk: int = 4096) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """(latent indices (c,), {out hook: (c, width) decoder directions in original units}) in chunks of latents."""
    d_dict = int(d.cfg.d_dict)
    idx = torch.arange(d_dict) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    dev = _device(d)
    if is_single(d):
        dirs = d.directions().detach().float()
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk]
            yield part, {d.prov.hook: dirs[part.to(dirs.device)].cpu()}
        return
    base = {h: v.float() for h, v in d.decode_hooks(torch.zeros(1, d_dict, device=dev)).items()}
    for s in range(0, len(idx), chunk):
        part = idx[s : s + chunk]
        codes = torch.zeros(len(part), d_dict, device=dev)
        codes[torch.arange(len(part), device=dev), part.to(dev)] = 1.0
        pred = d.decode_hooks(codes)
        yield part, {h: (pred[h].float() - base[h]).cpu() for h in out_hooks(d)}


def hook_deltas(d, indices: list[int], strength: float) -> dict[str, Tensor]:
    """{out hook: (width,) vector}: `strength` × the sum of the latents' decoder directions there (what steering adds)."""
    total: dict[str, Tensor] = {}
    for _, dirs in out_directions(d, indices):
        for h, v in dirs.items():
            total[h] = total.get(h, 0) + strength * v.sum(0)
    return total


def decoder_matrix(d) -> Tensor | None:
    """(d_dict, Σ out widths) decoder directions, for nearest neighbours by cosine; None when over `NEIGHBOUR_LIMIT`."""
    if is_single(d):
        return d.directions().detach().float().cpu()
    parts = []
    for _, dirs in out_directions(d):
        parts.append(torch.cat([dirs[h] for h in out_hooks(d)], 1))
        if sum(p.numel() for p in parts) > NEIGHBOUR_LIMIT:
            return None
    return torch.cat(parts)


def check_hooks_in_store(d, store) -> list[str]:
    """The in hooks, all of which must be in the store at the dictionary's width; returns them."""
    hooks = in_hooks(d)
    missing = [h for h in hooks if h not in store.hooks]
    if missing:
        raise SaekitError(f"the dictionary reads {', '.join(missing)}, but the store has only {', '.join(store.hooks)}; "
                          f"harvest {','.join(missing)} or pass the matching store")
    if is_single(d):
        return hooks
    dev = _device(d)
    widths = list(getattr(d.cfg, "in_widths", None) or [])  # per in hook; else every in hook has d_in
    for i, h in enumerate(hooks):
        width, want = store.hook_width(h), widths[i] if i < len(widths) else int(d.cfg.d_in)
        if width == want:
            continue
        try:  # d_in may mean something else for this kind: the encoder is the judge
            d.encode_hooks({h: torch.zeros(1, width, device=dev)})
            if widths:
                raise ValueError
        except Exception:
            raise SaekitError(f"the dictionary expects width {want} at {h}, the store has {width}; "
                              "they come from different models") from None
    return hooks
