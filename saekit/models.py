"""Load a frozen model through TransformerLens 4 and resolve hook names.

One place for the hook-name rule: a hook is any name in the bridge's `hook_dict`
(`blocks.{L}.hook_resid_post`, `blocks.{L}.attn.hook_z`, ...); its layer is the `L` in
`blocks.{L}.`; activations with a head axis are flattened to `n_heads * d_head` and the
per-position shape is kept so they can be unflattened when spliced back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from saekit.errors import SaekitError, did_you_mean

TOY_NAME = "toy"
TOY_PAPER_NAME = "toy-paper"
TOY_CODEBOOKS_NAME = "toy-codebooks"
PYCODE_NAME = "pycode"
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class ModelInfo:
    """What a store or dictionary records about the model it came from."""

    name: str
    """As the user typed it (`toy`, a Hub name or a directory)."""
    fingerprint: str
    """Hash of the config and weight files, so a dictionary can tell models apart."""
    d_model: int
    n_layers: int
    n_ctx: int
    d_vocab: int
    compat: bool = False
    """TransformerLens weight processing on (`enable_compatibility_mode`)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class HookSpec:
    """A resolved hook: its name, layer, per-position shape and flattened width."""

    name: str
    layer: int
    shape: list[int] = field(default_factory=list)

    @property
    def width(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class LoadedModel:
    bridge: Any
    info: ModelInfo
    tokenizer: Any

    @property
    def bos_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise SaekitError("the tokenizer has no BOS or EOS token; saekit needs one to start each sequence")
        return int(bos)


def resolve_model_path(name: str) -> str:
    """A built-in name (`toy`, `toy-paper`, `toy-codebooks`, `pycode`) → its shipped directory; anything else is passed through."""
    if name == TOY_NAME:
        from saekit.toy import pretrained_dir

        return str(pretrained_dir())
    if name in (TOY_PAPER_NAME, TOY_CODEBOOKS_NAME):  # shipped codebook models: their model/ folder
        from saekit.toy import codebook_model_dir

        return str(Path(codebook_model_dir(name)) / "model")
    if name == PYCODE_NAME:
        from saekit.pycode import pretrained_dir

        return str(pretrained_dir())
    return name


MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def forward_dtype(path: str, device: torch.device | str, choice: str = "auto") -> torch.dtype:
    """The dtype a frozen model runs its forward in: `choice`, or for `auto` the model's own on CUDA, float32 elsewhere.

    The model's own is config.json's `dtype` (`torch_dtype` before transformers 4.56): what it was
    trained and published in (Gemma 2: bfloat16), half the memory and the tensor cores' speed.  On
    CPU most processors have no fast bfloat16 matmul, so `auto` stays float32 there.
    """
    if choice not in MODEL_DTYPES:
        raise SaekitError(f"model dtype {choice!r} is not one of {', '.join(MODEL_DTYPES)}")
    if choice != "auto":
        return getattr(torch, choice)
    if torch.device(device).type != "cuda":
        return torch.float32
    cfg = Path(path) / "config.json"
    try:
        if cfg.is_file():
            d = json.loads(cfg.read_text())
        else:
            from transformers import AutoConfig

            d = AutoConfig.from_pretrained(path).to_dict()
    except (OSError, ValueError):
        return torch.float32
    own = str(d.get("dtype") or d.get("torch_dtype") or "float32").removeprefix("torch.")
    return getattr(torch, own) if own in ("bfloat16", "float16") else torch.float32


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def allow_pickle() -> bool:
    """`saekit --allow-pickle` (or SAEKIT_ALLOW_PICKLE=1): the user accepts loading pickle weights they trust."""
    return os.environ.get("SAEKIT_ALLOW_PICKLE", "") not in ("", "0")


def _hub_files(name: str) -> list[str] | None:
    """The file names of Hub repo `name`: from the local Hugging Face cache when it holds the repo,
    else (a first download) from the Hub's listing of the repo; None when neither can say.

    The Hub is asked only when the repo is not cached, i.e. exactly when the loader would download
    it, and never when offline (HF_HUB_OFFLINE), so a cached model costs no request.
    """
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(name, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
        return [f.name for f in snap.rglob("*") if f.is_file()]
    except Exception:  # not cached (or not a repo id): ask the Hub below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return None
    try:
        from huggingface_hub import HfApi

        return [Path(f).name for f in HfApi().list_repo_files(name)]
    except Exception:  # unreachable, gated, or not a repo id: the model loader reports that itself
        return None


def check_no_pickle(path: str) -> None:
    """Refuse a model (local folder or Hub repo) whose weights exist only as pickle files (loading one can run any code in it)."""
    p = Path(path)
    if p.is_dir():
        names = [f.name for f in p.iterdir()]
        where = f"model folder {p}"
    elif allow_pickle() or p.exists() or (names := _hub_files(path)) is None:
        return
    else:
        where = f"Hub model {path}"
    if any(n.endswith(".safetensors") for n in names):
        return
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled and not allow_pickle():
        raise SaekitError(
            f"{where} holds only pickle weights ({', '.join(pickled[:3])}), and unpickling can run code hidden in the file; "
            f"convert it once with `AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`, "
            "or, for files you trust, run `saekit --allow-pickle ...`"
        )


def fingerprint(path: str) -> str:
    """A cheap identity for a model directory: config + the names, sizes and ends of weight files."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(path.encode())
        return h.hexdigest()[:16]
    for f in sorted(p.iterdir()):
        if f.suffix in (".json",) and f.name in ("config.json",):
            h.update(f.read_bytes())
        if f.suffix in (".safetensors", ".bin", ".pt"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_model(name: str, *, compat: bool = False, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Boot `name` (Hub name, local HF directory or `toy`) as a TransformerBridge, eval mode, no grads."""
    path = resolve_model_path(name)
    check_no_pickle(path)
    device = str(resolve_device(device))  # `auto` → cuda when available
    from transformer_lens.model_bridge import TransformerBridge

    for logger in ("transformers", "transformer_lens"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    # transformers' "Loading weights" tqdm bar would otherwise precede every CLI message on stderr.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        if os.path.exists(path):
            raise SaekitError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from e
        raise SaekitError(
            f"cannot load model {name!r}: it is not a local directory and could not be fetched from the "
            "Hugging Face Hub (offline?); pass a local Hugging Face-format directory or 'toy'"
        ) from e
    if compat:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    cfg = bridge.cfg
    info = ModelInfo(
        name=name,
        fingerprint=fingerprint(path),
        d_model=int(cfg.d_model),
        n_layers=int(cfg.n_layers),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
        compat=compat,
    )
    return LoadedModel(bridge=bridge, info=info, tokenizer=bridge.tokenizer)


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda when a GPU is visible, else cpu; a clear error for an unknown or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SaekitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaekitError(f"device {name} asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def hook_layer(name: str) -> int:
    """The block index a hook lives in; -1 for hooks before the first block (embeddings)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else -1


def valid_hook_names(bridge) -> list[str]:
    return sorted(bridge.hook_dict.keys())


def check_hook_names(bridge, names: list[str]) -> None:
    """Refuse unknown hook names before any work, suggesting close matches."""
    valid = valid_hook_names(bridge)
    for n in names:
        if n not in bridge.hook_dict:
            hint = did_you_mean(n, valid)
            if not hint:
                examples = [v for v in valid if v.startswith("blocks.0.")][:12]
                hint = f"; valid names look like {', '.join(examples)} (see `saekit hooks --model ...`)"
            raise SaekitError(f"unknown hook {n!r}{hint}")


def resolve_hooks(model: LoadedModel, names: list[str]) -> list[HookSpec]:
    """Validate names and find each hook's per-position shape with one 2-token forward."""
    if not names:
        raise SaekitError("no hooks given; pass --hooks blocks.0.hook_resid_post (comma-separated for several)")
    check_hook_names(model.bridge, names)
    tokens = torch.full((1, 2), model.bos_id, dtype=torch.long, device=next(model.bridge.parameters()).device)
    acts = capture(model.bridge, tokens, names, flatten=False)
    return [HookSpec(name=n, layer=hook_layer(n), shape=list(acts[n].shape[2:])) for n in names]


def stop_layer(hooks: list[str], n_layers: int) -> int | None:
    """The layer after which the forward can stop (None = run the whole model)."""
    last = max(hook_layer(h) for h in hooks)
    return None if last + 1 >= n_layers else last + 1


@torch.no_grad()
def capture(bridge, tokens: torch.Tensor, hooks: list[str], *, flatten: bool = True) -> dict[str, torch.Tensor]:
    """Activations of `hooks` for `tokens` (B, T) in one forward, stopped after the last needed layer.

    Returns name → (B, T, width) (or the raw per-position shape with flatten=False).
    """
    out: dict[str, torch.Tensor] = {}

    def saver(name):
        # Aliased hooks report their canonical name in `hook.name`, so key by the name asked for.
        def save(act, hook):
            out[name] = act.detach()
            return act

        return save

    wanted = set(hooks)
    fwd = [(h, saver(h)) for h in wanted]
    stop = stop_layer(hooks, bridge.cfg.n_layers)
    bridge.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=stop, return_type=None if stop is None else "logits")
    missing = wanted - out.keys()
    if missing:
        raise SaekitError(f"hooks {sorted(missing)} did not fire in the forward pass; choose hooks the model runs")
    if flatten:
        out = {k: v.reshape(v.shape[0], v.shape[1], -1) for k, v in out.items()}
    return out


def unflatten(act: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """(…, width) → (…, *shape): the inverse of the flattening `capture` does."""
    return act.reshape(*act.shape[:-1], *shape)


# --- does a dictionary or store fit a model -------------------------------------------------------

def _model_label(m: dict) -> str:
    fp = m.get("fingerprint")
    return f"{m.get('name', '?')}" + (f" (fingerprint {fp})" if fp else "")


def check_model(what: str, recorded: dict | None, info: ModelInfo, against: str = "the loaded model",
                fix: str = "") -> None:
    """Refuse `what` (a dictionary or store) made from another model than `info` or with other weight processing.

    The one fit check: splice-eval (dictionary or store vs the loaded model), analyze
    (dictionary vs the store's model) and steer (dictionary vs the loaded model) use it.
    """
    if not recorded:
        return  # imported dictionaries may not say; nothing to check against
    here = info.to_dict()
    fp = recorded.get("fingerprint")
    other_weights = fp and (fp != here["fingerprint"] or recorded.get("d_model", here["d_model"]) != here["d_model"])
    if other_weights or (not fp and recorded.get("name") and recorded["name"] != here["name"]):
        raise SaekitError(f"{what} was made from model {_model_label(recorded)} but {against} is {_model_label(here)} "
                          "(different models); "
                          + (fix or f"pass --model {recorded.get('name', '...')} (the same files) or use dictionaries trained on this model"))
    if "compat" in recorded and bool(recorded["compat"]) != bool(here["compat"]):
        flag = "--compat" if recorded["compat"] else "--no-compat"
        raise SaekitError(f"{what} was made with compat={bool(recorded['compat'])} (TransformerLens weight processing) but "
                          f"{against} has compat={bool(here['compat'])}; " + (fix or f"pass {flag}"))
