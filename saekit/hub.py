"""Published dictionaries by name: `hf://ORG/REPO/PATH[@REVISION]` and SAELens release names.

`saekit.load("hf://jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre")` (and every
`--dict`) downloads only that folder through `huggingface_hub` into the user's usual cache
(`HF_HOME` / `HF_HUB_CACHE`), then loads it like a local folder (SAELens or sparsify layout,
`saekit.interop`).  With `HF_HUB_OFFLINE=1`, or when the Hub cannot be reached, the cached
snapshot is used; nothing is downloaded twice.

A SAELens release name stands for its repository: `hf://gpt2-small-res-jb/blocks.8.hook_resid_pre`.
`RELEASES` is copied by hand from SAELens's `sae_lens/pretrained_saes.yaml` (the releases'
`repo_id`, `model` and the id → folder rule of their `saes:` entries), a handful of the
common ones, not the whole catalogue.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from saekit.errors import SaekitError

SCHEME = "hf://"


class Release(NamedTuple):
    repo: str
    """Hugging Face repository that holds the release's folders."""
    model: str
    """The model the SAEs were trained on (SAELens's name for it)."""
    folder: str
    """How an SAE id becomes its folder in the repository: a format string over the id's numbers
    (`{0}` = the first number in the id), or `""` when the id is the folder."""
    layout: str
    """Files each folder holds: "SAELens" or "Gemma Scope" (params.npz), both loaded by saekit, or a
    format SAELens converts on load that saekit does not read yet ("Llama Scope")."""


# From sae_lens/pretrained_saes.yaml (SAELens, checked against the file at commit 91ca16cc, Oct 2025).
RELEASES: dict[str, Release] = {
    "gpt2-small-res-jb": Release("jbloom/GPT2-Small-SAEs-Reformatted", "gpt2-small", "", "SAELens"),
    "pythia-70m-deduped-res-sm": Release("ctigges/pythia-70m-deduped__res-sm_processed", "pythia-70m-deduped", "{0}-res-sm", "SAELens"),
    "pythia-70m-deduped-mlp-sm": Release("ctigges/pythia-70m-deduped__mlp-sm_processed", "pythia-70m-deduped", "{0}-mlp-sm", "SAELens"),
    "pythia-70m-deduped-att-sm": Release("ctigges/pythia-70m-deduped__att-sm_processed", "pythia-70m-deduped", "{0}-att-sm", "SAELens"),
    "gemma-scope-2b-pt-res": Release("google/gemma-scope-2b-pt-res", "gemma-2-2b", "", "Gemma Scope"),
    "gemma-scope-2b-pt-mlp": Release("google/gemma-scope-2b-pt-mlp", "gemma-2-2b", "", "Gemma Scope"),
    "gemma-scope-2b-pt-att": Release("google/gemma-scope-2b-pt-att", "gemma-2-2b", "", "Gemma Scope"),
    "gemma-scope-9b-pt-res": Release("google/gemma-scope-9b-pt-res", "gemma-2-9b", "", "Gemma Scope"),
    "llama_scope_lxr_8x": Release("fnlp/Llama3_1-8B-Base-LXR-8x", "meta-llama/Llama-3.1-8B", "Llama3_1-8B-Base-L{0}R-8x", "Llama Scope"),
    "llama_scope_lxr_32x": Release("fnlp/Llama3_1-8B-Base-LXR-32x", "meta-llama/Llama-3.1-8B", "Llama3_1-8B-Base-L{0}R-32x", "Llama Scope"),
    "llama_scope_lxm_8x": Release("fnlp/Llama3_1-8B-Base-LXM-8x", "meta-llama/Llama-3.1-8B", "Llama3_1-8B-Base-L{0}M-8x", "Llama Scope"),
    "llama_scope_lxa_8x": Release("fnlp/Llama3_1-8B-Base-LXA-8x", "meta-llama/Llama-3.1-8B", "Llama3_1-8B-Base-L{0}A-8x", "Llama Scope"),
}


LOADABLE = ("SAELens", "Gemma Scope")


class HubRef(NamedTuple):
    repo: str
    path: str
    """Folder inside the repository ("" = its root)."""
    revision: str | None
    release: str | None


def is_hub(spec: object) -> bool:
    """`hf://...`, also after a `Path()` folded its double slash (`hf:/...`)."""
    return str(spec).startswith("hf:/")


def _normal(spec: object) -> str:
    s = str(spec)
    return SCHEME + s[len("hf:/"):].lstrip("/") if is_hub(s) else s


def _release_folder(rel: Release, sae_id: str) -> str:
    """SAE id → folder, by the release's rule (pythia's `blocks.0.hook_resid_pre` is `e-res-sm`: the embedding)."""
    if not rel.folder or not sae_id:
        return sae_id
    nums = re.findall(r"\d+", sae_id)
    if rel.repo.startswith("ctigges/") and sae_id.endswith("hook_resid_pre") and nums == ["0"]:
        return rel.folder.format("e")
    if not nums or re.fullmatch(rel.folder.replace("{0}", r"\d+").replace(".", r"\."), sae_id):
        return sae_id  # already a folder name
    return rel.folder.format(nums[0])


def parse(spec: str) -> HubRef:
    """`hf://ORG/REPO[/PATH][@REV]` or `hf://RELEASE[/SAE_ID]` → where it lives."""
    if not is_hub(spec):
        raise SaekitError(f"{spec!r} is not a hub reference; write hf://ORG/REPO/PATH or hf://RELEASE/SAE_ID")
    spec = _normal(spec)
    body = spec[len(SCHEME):].strip("/")
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
    parts = [p for p in body.split("/") if p]
    if parts and parts[0] in RELEASES:
        rel = RELEASES[parts[0]]
        return HubRef(rel.repo, _release_folder(rel, "/".join(parts[1:])), revision, parts[0])
    if len(parts) < 2:
        known = ", ".join(sorted(RELEASES))
        raise SaekitError(f"{spec!r} names no repository; write hf://ORG/REPO/PATH (e.g. hf://jbloom/GPT2-Small-SAEs-Reformatted/"
                          f"blocks.8.hook_resid_pre) or a SAELens release: {known}")
    return HubRef(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision, None)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(spec: str) -> Path:
    """Download (or find in the cache) the folder `spec` names; returns the local folder."""
    spec = _normal(spec)
    ref = parse(spec)
    if ref.release and RELEASES[ref.release].layout not in LOADABLE:
        rel = RELEASES[ref.release]
        raise SaekitError(
            f"{ref.release} ({rel.repo}) is published as {rel.layout} files, which saekit does not read yet; "
            "convert it with SAELens (SAE.from_pretrained, then save_model) and pass that folder"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = [f"{ref.path}/*"] if ref.path else None
    # The cache is the user's usual one; read the variables now (huggingface_hub reads them once, at import).
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None)
    where = f"{ref.repo}{'/' + ref.path if ref.path else ''}{'@' + ref.revision if ref.revision else ''}"
    try:
        try:
            root = snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns, cache_dir=cache, local_files_only=offline())
        except (LocalEntryNotFoundError, OSError) as e:
            if offline() or isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
                raise
            # the Hub is unreachable: fall back to what the cache holds
            root = snapshot_download(ref.repo, revision=ref.revision, allow_patterns=patterns, cache_dir=cache, local_files_only=True)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise SaekitError(f"{spec}: no repository or revision {where} on the Hugging Face Hub; check the name") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise SaekitError(
            f"{spec}: {where} is not in the Hugging Face cache and could not be downloaded ({type(e).__name__}); "
            "connect once without HF_HUB_OFFLINE=1, or pass a local folder"
        ) from None
    folder = Path(root) / ref.path
    if not folder.is_dir():
        raise SaekitError(f"{spec}: the repository {ref.repo} has no folder {ref.path!r}; check the path on the Hub")
    return folder
