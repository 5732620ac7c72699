"""Feature ids as users type them: `layer.feature` for SAEs, `layer.group.code` for codebooks.

The Codebook Features paper names a code by where it lives (`7.12.7884`: layer 7, head or
group 12, code 7884), so a reader can find it again in the model; saekit uses the same
shape.  A codebook's latents are laid out group-major (group g owns columns
`g*per .. (g+1)*per - 1`, `per = d_dict // groups`), which is how `Codebook` stores them.
"""

from __future__ import annotations

import re

from saekit.errors import SaekitError
from saekit.models import hook_layer

# ASCII digits separated by single dots: int() alone would take `1_0`, ` 5` and other scripts' digits (`٣`).
_ID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def _layout(d) -> tuple[int, int, int, bool]:
    """(layer, d_dict, groups, is_codebook) of a dictionary."""
    layer = hook_layer(d.prov.hook or "")
    return layer, int(d.cfg.d_dict), max(int(d.cfg.groups), 1), d.cfg.kind == "codebook"


def feature_id(d, index: int) -> str:
    """The id of latent `index` of dictionary `d`."""
    layer, d_dict, groups, cb = _layout(d)
    if cb:
        per = d_dict // groups
        return f"{layer}.{index // per}.{index % per}"
    return f"{layer}.{index}"


def feature_ids(d) -> list[str]:
    """Ids of every latent, in index order."""
    return [feature_id(d, i) for i in range(int(d.cfg.d_dict))]


def parse_feature_id(d, text: str) -> int:
    """The latent index named by `text` (an id such as `3.17` / `3.1.42`, or a bare index).

    Refuses ids whose layer is not the dictionary's, or whose group/code/feature is out of
    range, naming the valid range so the user can fix the id.
    """
    layer, d_dict, groups, cb = _layout(d)
    s = str(text).strip()
    if not _ID.fullmatch(s):
        raise SaekitError(f"feature id {s!r} is not numbers separated by dots; use {feature_id(d, 0)} ({_form(cb)})")
    nums = [int(p) for p in s.split(".")]
    if len(nums) == 1:
        idx = nums[0]
    else:
        if nums[0] != layer:
            raise SaekitError(f"feature id {s!r} is for layer {nums[0]}, but this dictionary is at layer {layer} ({d.prov.hook}); use {layer}.…")
        if cb:
            if len(nums) != 3:
                raise SaekitError(f"codebook feature ids are layer.group.code, e.g. {feature_id(d, 0)}; got {s!r}")
            per = d_dict // groups
            g, c = nums[1], nums[2]
            if not 0 <= g < groups:
                raise SaekitError(f"feature id {s!r}: group {g} out of range; this codebook has groups 0..{groups - 1}")
            if not 0 <= c < per:
                raise SaekitError(f"feature id {s!r}: code {c} out of range; each group has codes 0..{per - 1}")
            return g * per + c
        if len(nums) != 2:
            raise SaekitError(f"SAE feature ids are layer.feature, e.g. {feature_id(d, 0)}; got {s!r}")
        idx = nums[1]
    if not 0 <= idx < d_dict:
        raise SaekitError(f"feature {s!r} out of range: this dictionary has features 0..{d_dict - 1} (ids {feature_id(d, 0)} to {feature_id(d, d_dict - 1)})")
    return idx


def parse_feature_ids(d, items) -> list[int]:
    """Several ids (a list, or one comma-separated string) → latent indices."""
    if isinstance(items, str):
        items = [x for x in items.split(",") if x.strip()]
    out = [parse_feature_id(d, x) for x in items]
    if not out:
        raise SaekitError(f"no feature given; pass --feature {feature_id(d, 0)} (comma-separated for several)")
    return out


def _form(cb: bool) -> str:
    return "layer.group.code" if cb else "layer.feature"
