"""Train dictionaries on an activation store: `TrainConfig` + `train(cfg)`, and the `Trainer` behind it.

One pass over the data trains every dictionary of a run: several hooks and a sweep over
k (or λ) all take their steps on the same batches, so the store is read once.  The
`Trainer` only needs a batch source — `start_batch -> iterator of {hook: (batch, width)}`
— so it trains from the store (`store.batches`) or from tensors in memory
(`tensor_batches`, used by tests and benchmarks) alike.

Resuming: a checkpoint holds, per dictionary, the weights, the optimiser moments, the
dead-latent counters and the random generator (safetensors + JSON, no pickle), plus the
step.  The batch source restarts at that step, so a resumed run sees exactly the batches
it would have seen and ends with the same weights as one that was never stopped.

Under torchrun (saekit.distributed), `placement="data"` is DDP: every rank holds every
dictionary and reads its own part of each global batch (`store.batches(rank=,
world_size=)`, batch_size / world_size rows); gradients, the per-latent "fired" flags and
running buffers (BatchTopK's threshold) are all-reduced in one message per dictionary
and step, so all ranks take the same Adam step, see the same dead latents and keep
identical weights (decoder projection included); rank-dependent moves (initialisation
from data, codebook dead-code replacement) are broadcast from rank 0.  Rank 0 alone
writes metrics, checkpoints and the dictionaries.  `placement="hooks"` deals the hooks
out to the ranks instead: each trains its hooks' dictionaries on whole batches, reading
only those hooks, and writes them itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from saekit import distributed, metrics, outdir, precision, runs
from saekit.runs import RunPaths, run_name, run_paths
from saekit.models import resolve_device
from saekit.config import check_fields, to_dict
from saekit.dictionaries import build
from saekit.dictionaries.base import ACTIVATIONS, CODER_KINDS, KINDS, DictConfig, Dictionary, Provenance
from saekit.dictionaries.fast import warm_kernels
from saekit.errors import SaekitError
from saekit.prefetch import can_overlap, prefetch
from saekit.engine import Engine, Objective
from saekit.store import open_store, resolve_store_hooks, store_eval_batches
from saekit.store.scatter import BATCH_ORDER

BatchSource = Callable[[int], Iterator[dict[str, Tensor]]]
"""start_batch -> endless iterator of {hook: float tensor (batch_size, width)}; batch i is always the same."""


@dataclass
class TrainConfig:
    """A training run: which store and hooks, which dictionaries (a sweep is a list of k or l1), how long."""

    store: str = ""
    """Activation store directory (written by `saekit harvest`)."""
    hooks: list[str] = field(default_factory=lambda: ["all"], metadata={"aliases": ["--hook"]})
    """Hooks to train on, comma-separated, or `all`; each gets its own dictionaries, all fed by one read of the store."""
    out: str = "dictionaries"
    """Output directory; each dictionary goes to <out>/<hook>/<kind>-<hyperparameters>/."""
    arch: DictConfig = field(default_factory=DictConfig)
    """Architecture of every dictionary of the run (flags --kind, --d-dict, --groups, --similarity); d_in comes from the store, k or l1 from the sweep lists below."""
    target: list[str] = field(default_factory=list)
    """transcoder, skip-transcoder, clt: the hooks to predict (MLP outputs, e.g. blocks.0.hook_mlp_out), in --hook's order."""
    expansion: int = 8
    """Latents per input dimension, used when d_dict is 0."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active latents per token (topk, batchtopk) or codes per group (codebook); several values = a sweep, one dictionary per value (its arch.k)."""
    l1: list[float] = field(default_factory=lambda: [1.0])
    """L1 coefficient λ for relu (loss = MSE/d_in + λ/d_in Σ f_i‖W_dec,i‖); several values = a sweep, one dictionary per value (its arch.l1).
    Default 1, not the April update's 5: from saekit's unit-norm init a given λ reaches a lower L0
    (benchmarks/README.md, "ReLU/L1 at low L0")."""
    lr: float | None = field(default=None, metadata={"range": "positive"})
    """Adam learning rate; default (not given): 2e-4 / sqrt(d_dict / 16384) (sparsify's rule; codebooks ×5), recorded in config.json.
    topk and batchtopk train their matrices at 3× it (their unit decoder rows turn slowly; TopKSAE.weight_lr_scale)."""
    batch_size: int = 4096
    """Activation rows (tokens) per optimiser step."""
    tokens: int | None = None
    """Training tokens per dictionary (steps = tokens / batch_size, rounded up); default: --passes over the store's train split, at most 10M tokens."""
    passes: float = 10.0
    """Without --tokens: passes over the store's train split (capped at 10M tokens, at least one pass); a warning names runs of more than 50 passes."""
    seed: int = 0
    """Seed for the initialisation, the data order and dead-code replacement."""
    l1_warmup: float = 0.05
    """relu: fraction of training over which λ rises linearly from 0."""
    aux_k: int = 0
    """topk/batchtopk: latents used by the AuxK loss; 0 means d_in / 2."""
    aux_coef: float = 0.03125
    """topk/batchtopk: weight α of the AuxK loss (Gao et al. use 1/32)."""
    grad_clip: float = 1.0
    """Clip each dictionary's gradient norm at grad_clip / d_in (SAELens's clip at 1: its loss is ours × d_in); 0 turns it off."""
    dead_tokens: int = 0
    """A latent that has not fired for this many tokens is dead (AuxK, code replacement, dead fraction shown); 0: a tenth of the run's tokens, within [50k, 1M]."""
    replace_every: int = 100
    """codebook: look for dead codes and replace them every this many steps."""
    init_rows: int = 16384
    """Rows sampled at the start to set b_dec (geometric median) or the k-means codebook."""
    checkpoint_every: int = 1_000_000
    """Write a checkpoint every this many tokens (0: only at the end)."""
    log_every: int = 50
    """Steps between progress/metrics.jsonl updates (the only times the trainer waits for the device)."""
    eval_tokens: int = 100_000
    """Held-out tokens (the store's eval split) for the final MSE, FVU, L0 and dead fraction."""
    buffer_rows: int = 0
    """Rows held in the store's shuffling buffer; 0 uses the store's default."""
    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    precision: str = "auto"
    """Matmul precision of the training step: auto (bfloat16 autocast on a CUDA GPU that has it, else float32), float32, bfloat16 or float16 (fp32, bf16, fp16 also work);
    weights and Adam's state stay float32; bfloat16 and float16 need a CUDA device."""
    resume: bool = False
    """Continue from the last checkpoint in --out (same batches, same final weights as an uninterrupted run); rerunning the same command also resumes."""
    keep_checkpoints: bool = False
    """Keep the last checkpoints beside the finished dictionary (default: removed once it is written)."""
    objective: str = "offline"
    """offline (reconstruct stored activations) or e2e (splice into the frozen model, minimise KL(clean ‖ spliced); saekit.inmodel.e2e, dispatched by the CLI)."""
    model: str = ""
    """e2e: the frozen model (empty = the store's model)."""
    data: str = ""
    """e2e: train on this text (.txt/.jsonl/folder) instead of the store's token sequences."""
    mse_coef: float = 0.0
    """e2e: weight of the normalised reconstruction term added to the KL."""
    placement: str = "data"
    """Under torchrun: data (DDP: every rank trains every dictionary on its share of each batch) or hooks (each rank trains the dictionaries of its own hooks)."""

    def __post_init__(self):
        if self.arch.kind not in KINDS:
            raise ValueError(f"kind {self.arch.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("batch_size", "expansion", "log_every", "replace_every", "passes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"tokens must be positive, got {self.tokens}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if not self.k or any(k <= 0 for k in self.k):
            raise ValueError(f"k must be positive integers, got {self.k}")
        if not self.l1 or any(v < 0 for v in self.l1):
            raise ValueError(f"l1 must be non-negative, got {self.l1}")
        a = self.arch
        for name, sweep in (("k", "k"), ("l1", "l1"), ("d_in", None)):
            if getattr(a, name) != getattr(DictConfig(), name):
                raise ValueError(f"arch.{name} is set per dictionary by the run ({f'its sweep list {sweep}' if sweep else 'from the store'}); "
                                 f"{f'give {sweep} = [...] (--{sweep}) instead' if sweep else 'leave it out'}")
        if a.d_dict and not uses_l1(self) and a.kind != "clt" and max(self.k) >= a.d_dict // a.groups:
            raise ValueError(f"k={max(self.k)} must be smaller than d_dict{'/groups' if a.groups > 1 else ''}={a.d_dict // a.groups}")
        if a.kind in CODER_KINDS:
            check_coder_config(self)
        elif self.target:
            raise ValueError(f"--target is for the kinds {', '.join(CODER_KINDS)}; a {a.kind} dictionary reconstructs its own --hook")
        if not self.hooks:
            raise ValueError("hooks is empty: name at least one hook, or `all`")
        if self.objective not in ("offline", "e2e"):
            raise ValueError(f"objective {self.objective!r} is not offline or e2e")
        if precision.canonical(self.precision) not in precision.COMPUTE:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(precision.COMPUTE)} (or fp32, bf16, fp16)")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        check_fields(self)  # the remaining ranges: lr positive when given, no NaN


def uses_l1(cfg: TrainConfig) -> bool:
    """Whether the run sweeps λ (relu, or a coder kind with the relu activation) rather than k."""
    return cfg.arch.kind == "relu" or (cfg.arch.kind in CODER_KINDS and cfg.arch.activation == "relu")


def check_coder_config(cfg: TrainConfig) -> None:
    """`__post_init__`'s checks of the several-hook kinds (what needs no store)."""
    if cfg.arch.activation not in ACTIVATIONS:
        raise ValueError(f"activation {cfg.arch.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if cfg.arch.kind == "crosscoder" and cfg.target:
        raise ValueError("a crosscoder predicts its own --hook list; drop --target")
    if cfg.arch.kind in ("transcoder", "skip-transcoder") and [h.lower() for h in cfg.hooks] == ["all"]:
        raise ValueError(f"--kind {cfg.arch.kind} needs --hook: the MLP input(s) it reads (e.g. blocks.0.mlp.hook_in), one per --target")
    if cfg.arch.kind in ("transcoder", "skip-transcoder") and not cfg.target:
        raise ValueError(f"--kind {cfg.arch.kind} needs --target: the MLP output it predicts (e.g. --hook blocks.0.mlp.hook_in --target blocks.0.hook_mlp_out)")
    if cfg.arch.kind in ("transcoder", "skip-transcoder") and len(cfg.target) != len(cfg.hooks):
        raise ValueError(f"--kind {cfg.arch.kind}: {len(cfg.hooks)} --hook but {len(cfg.target)} --target; give one input hook per target, in the same order")
    if cfg.arch.groups > 1:
        raise ValueError("groups > 1 is only for kind=codebook")


PLACEMENTS = ("data", "hooks")
DEFAULT_TOKENS = 10_000_000
"""The cap of the default budget (and the budget where no store says how big the data is)."""
WARN_PASSES = 50


def resolve_tokens(cfg: TrainConfig, train_rows: int) -> TrainConfig:
    """The run's token budget, written back so config.json records it; warns when a run repeats its data many times."""
    import warnings

    if cfg.tokens is None:
        tokens = max(min(int(cfg.passes * train_rows), DEFAULT_TOKENS), train_rows, cfg.batch_size)
        return dataclasses.replace(cfg, tokens=tokens)
    if train_rows and cfg.tokens > WARN_PASSES * train_rows:
        warnings.warn(f"--tokens {cfg.tokens:,} is {cfg.tokens / train_rows:.0f} passes over the store's {train_rows:,} training rows; "
                      "the dictionary will see the same rows many times (harvest more, or lower --tokens)", stacklevel=2)
    return cfg


# Fields that decide what a run computes; a checkpoint written under other values is refused.
# (lr, tokens, device, logging and checkpoint cadence may change across a resume.)
IDENTITY_FIELDS = ("store", "hooks", "arch", "expansion", "k", "l1",
                   "batch_size", "seed", "buffer_rows", "l1_warmup", "aux_k", "aux_coef", "dead_tokens",
                   "replace_every", "init_rows")


# --- batch sources -------------------------------------------------------------------------------

def tensor_batches(data: dict[str, Tensor], batch_size: int, seed: int = 0) -> BatchSource:
    """A batch source over tensors in memory: reshuffled each epoch, batch i a pure function of (seed, i)."""
    n = next(iter(data.values())).shape[0]

    def perm(epoch: int) -> Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    def source(start_batch: int = 0) -> Iterator[dict[str, Tensor]]:
        pos = start_batch * batch_size  # global row position in the endless shuffled stream
        epoch, p = pos // n, perm(pos // n)
        while True:
            idx = []
            need = batch_size
            while need:
                off = pos - epoch * n
                take = min(need, n - off)
                idx.append(p[off:off + take])
                pos += take
                need -= take
                if pos == (epoch + 1) * n:
                    epoch += 1
                    p = perm(epoch)
            rows = torch.cat(idx)
            yield {h: x[rows] for h, x in data.items()}

    return source


class HookSource(NamedTuple):
    width: int
    prov: Provenance


# --- which hooks each dictionary reads and predicts -------------------------------------------------

class RunSpec(NamedTuple):
    """One dictionary's hooks (a sweep trains one per k or λ): it reads `inputs`, predicts `targets`."""

    inputs: list[str]
    targets: list[str]
    folder: str
    """Its folder under --out: the hook (SAE), the target (transcoders), the kind (crosscoder, clt)."""


MLP_IN = (r"blocks\.(\d+)\.mlp\.hook_in", r"blocks\.(\d+)\.ln2\.hook_out", r"blocks\.(\d+)\.ln2\.hook_normalized")
"""An MLP's input after its LayerNorm, per hook naming (TransformerLens 4's bridge first), as `--hook all` of a CLT finds them."""
MLP_OUT = (r"blocks\.(\d+)\.hook_mlp_out", r"blocks\.(\d+)\.mlp\.hook_out")
"""An MLP's output: what a transcoder or CLT may predict."""


def _layer(hook: str, patterns: tuple[str, ...]) -> int | None:
    for pat in patterns:
        m = re.fullmatch(pat, hook)
        if m:
            return int(m.group(1))
    return None


def _layer_of(hook: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def run_specs(cfg: TrainConfig, hooks: list[str], store_hooks: list[str] | None = None, n_layers: int = 0) -> list[RunSpec]:
    """Each dictionary's input and target hooks; SaekitError (naming the fix) for a pairing that cannot work.

    `hooks` are --hook resolved against the store (`all`: every hook); `store_hooks` lists
    the store's hooks (for the messages and a CLT's `--hook all`); `n_layers` the model's
    layer count (0: unknown, e.g. an imported store), which a CLT must cover.
    """
    store_hooks = list(store_hooks or hooks)
    targets = list(cfg.target)
    for t in targets:
        if t not in store_hooks:
            raise SaekitError(f"--target {t!r} is not in the store; hooks present: {', '.join(store_hooks)}")
    if cfg.arch.kind not in CODER_KINDS:
        return [RunSpec([h], [h], h) for h in hooks]
    if cfg.arch.kind == "crosscoder":
        return [RunSpec(list(hooks), list(hooks), "crosscoder")]
    outs_in_store = [h for h in store_hooks if _layer(h, MLP_OUT) is not None]
    for t in targets:
        if _layer(t, MLP_OUT) is None:
            raise SaekitError(f"--target {t!r} is not an MLP output; a {cfg.arch.kind} predicts one of: {', '.join(outs_in_store) or 'none in this store'} "
                              "(harvest blocks.L.hook_mlp_out)")
    if cfg.arch.kind in ("transcoder", "skip-transcoder"):
        specs = []
        for h, t in zip(hooks, targets):
            if h == t:
                raise SaekitError(f"--hook and --target are both {h!r}; a transcoder reads the MLP's input (e.g. blocks.L.mlp.hook_in)")
            if _layer_of(h) is not None and _layer_of(h) != _layer_of(t):
                raise SaekitError(f"--hook {h} (layer {_layer_of(h)}) and --target {t} (layer {_layer_of(t)}) are different layers; "
                                  f"pair each MLP's input with its own output, e.g. blocks.{_layer_of(t)}.mlp.hook_in")
            specs.append(RunSpec([h], [t], t))
        return specs
    # clt: one input and one output per layer, every layer of the model
    if not targets:
        ins = sorted((h for h in store_hooks if _layer(h, MLP_IN) is not None), key=lambda h: _layer(h, MLP_IN))
        by_layer = {}
        for h in ins:
            by_layer.setdefault(_layer(h, MLP_IN), h)  # the first naming in MLP_IN's order wins
        hooks = list(by_layer.values()) if [h.lower() for h in cfg.hooks] == ["all"] else hooks
        targets = sorted(outs_in_store, key=lambda h: _layer(h, MLP_OUT))
        targets = list({_layer(h, MLP_OUT): h for h in reversed(targets)}.values())[::-1]
    in_layers = [_layer_of(h) for h in hooks]
    out_layers = [_layer(t, MLP_OUT) for t in targets]
    known = [l for l in in_layers + out_layers if l is not None]
    want = list(range(n_layers or (max(known) + 1 if known else 0)))  # unknown layer count (imported store): 0 .. the last named
    missing = [f"blocks.{l}.mlp.hook_in" for l in want if l not in in_layers] + [f"blocks.{l}.hook_mlp_out" for l in want if l not in out_layers]
    if missing:
        raise SaekitError(f"a clt needs every layer's MLP input and output in the store; missing: {', '.join(missing)} "
                          f"(harvest them, or name them with --hook / --target)")
    if in_layers != out_layers or in_layers != sorted(in_layers):
        raise SaekitError(f"clt: --hook layers {in_layers} and --target layers {out_layers} differ; give one MLP input and one MLP output "
                          "per layer, in layer order")
    return [RunSpec(list(hooks), targets, "clt")]


# --- one dictionary being trained ----------------------------------------------------------------

@dataclass
class Run:
    name: str
    hook: str
    """Its first input hook (an SAE's only hook)."""
    dictionary: Dictionary
    opt: torch.optim.Optimizer
    paths: RunPaths
    generator: torch.Generator
    since_fired: Tensor
    """(d_dict,) tokens since each latent last fired."""
    acc: dict[str, Tensor] = field(default_factory=dict)
    nan_step: Tensor | None = None
    """-1, or the first step whose loss was not finite (kept on the device: no per-step sync)."""
    last: dict = field(default_factory=dict)
    """The last row written to metrics.jsonl (shown by the progress bar)."""
    spec: RunSpec | None = None
    """A coder kind's input and target hooks (None: an SAE of `hook`)."""

    @property
    def label(self) -> str:
        return f"{self.spec.folder if self.spec else self.hook}/{self.name}"


def default_lr(kind: str, d_dict: int) -> float:
    lr = 2e-4 / math.sqrt(d_dict / 2**14)
    return lr * 5 if kind == "codebook" else lr




def used_config(cfg: TrainConfig, dcfg: DictConfig, lr: float) -> dict:
    """The run's config as one dictionary was trained: automatic values (0 = pick) resolved, other kinds' knobs None."""
    used = to_dict(cfg) | {"arch": to_dict(dcfg), "lr": lr}
    coder = dcfg.kind in CODER_KINDS
    if dcfg.kind in ("topk", "batchtopk") or coder and dcfg.activation in ("topk", "batchtopk"):
        used["aux_k"] = min(cfg.aux_k or (dcfg.d_out if coder else dcfg.d_in) // 2, dcfg.d_dict)  # as TopKSAE._k_aux / Coder.aux_loss resolve it
    else:
        used["aux_k"] = used["aux_coef"] = None
    if not uses_l1(cfg):
        used["l1"] = used["l1_warmup"] = None
    else:
        used["k"] = None
    if not coder:
        used["activation"] = None
    if dcfg.kind != "codebook":
        used["replace_every"] = None
    return used


def _make_adam(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    # fused Adam: one kernel for all parameters (CPU support since torch 2.4).
    try:
        return torch.optim.Adam(groups, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(groups)


class Trainer(Objective):
    """Trains every dictionary of a `TrainConfig` over one stream of batches.

    The reconstruction objective of `saekit.engine`: `step` takes one optimiser step for every
    dictionary on the same batch (`_step`); the engine logs (`_log`), checkpoints
    (`_checkpoint`) and stops on NaN, the only times values are read back from the device.
    """

    unit = "tokens"
    nan_advice = "lower --lr (or fix the data)"

    def __init__(self, cfg: TrainConfig, hooks: dict[str, HookSource], batches: BatchSource, *, progress: bool = True,
                 dist: distributed.DistEnv | None = None, data_parallel: bool = False, run_hooks: list[str] | None = None,
                 specs: list[RunSpec] | None = None):
        """`dist` + `data_parallel`: this is one rank of a DDP run (the batch source yields this rank's rows).

        `run_hooks`: every hook of the run when this rank trains only some (placement
        "hooks"), so checkpoints carry the same identity as a single-process run's.
        `specs`: each dictionary's input and target hooks (default: `run_specs` of cfg over
        `hooks`; an SAE per hook).  `hooks` holds every hook they read.
        """
        self.cfg = cfg
        self.hooks = hooks
        self.batches = batches
        self.progress = progress
        self.dist = dist or distributed.DistEnv(0, 1, 0)
        self.ddp = data_parallel and self.dist.distributed
        self.writes = self.dist.is_main or not self.ddp
        """Whether this rank writes metrics, checkpoints and dictionaries (all but rank 0 of a DDP run)."""
        self.device = distributed.device(cfg.device, self.dist) if self.dist.distributed else resolve_device(cfg.device)
        self.n_steps = math.ceil((cfg.tokens or DEFAULT_TOKENS) / cfg.batch_size)
        self.dead_tokens = metrics.dead_window_tokens(cfg.dead_tokens, self.n_steps * cfg.batch_size)
        """The dead window in tokens, resolved (cfg.dead_tokens 0: from the run's length)."""
        self.step = 0
        if specs is None:
            explicit = [h.lower() for h in cfg.hooks] != ["all"] and cfg.arch.kind in CODER_KINDS
            specs = run_specs(cfg, [h for h in (cfg.hooks if explicit else hooks) if h in hooks and h not in cfg.target], list(hooks))
        # a coder's identity also holds what each dictionary reads and predicts (the SAE kinds' hash is unchanged)
        coder_io = {"reads": [[sp.inputs, sp.targets] for sp in specs], "activation": cfg.arch.activation} if cfg.arch.kind in CODER_KINDS else {}
        self.ident = runs.identity_hash(to_dict(cfg), IDENTITY_FIELDS, hooks=list(run_hooks or hooks), **coder_io)
        # Checkpoints written when the default window was a fixed 1M tokens resume where that is still the window.
        legacy = cfg.dead_tokens == 0 and self.dead_tokens == metrics.DEAD_WINDOW[2]
        self.accepted_idents = {self.ident} | ({runs.identity_hash(to_dict(cfg) | {"dead_tokens": self.dead_tokens}, IDENTITY_FIELDS,
                                                                  hooks=list(run_hooks or hooks), **coder_io)} if legacy else set())
        self.runs = [self._make_run(sp, k, l1) for sp in specs for k, l1 in self._sweep()]
        self.scales = {h: torch.tensor(float(src.prov.scale), device=self.device) for h, src in hooks.items()}
        self.tokens_per_s = float("nan")
        self.precision = precision.precision_for(self.device, cfg.precision)  # auto: bfloat16 autocast on CUDA; float32 master weights, TF32
        precision.apply_matmul_flags(self.precision)
        self.per_step = cfg.batch_size
        if self.device.type == "cpu":
            warm_kernels()  # numba's runtime and compiled kernels load here, not inside the first step

    # --- construction ----------------------------------------------------------------------
    def _sweep(self) -> list[tuple[int | None, float | None]]:
        if uses_l1(self.cfg):
            return [(None, l1) for l1 in self.cfg.l1]
        return [(k, None) for k in self.cfg.k]

    def _make_run(self, spec: RunSpec, k: int | None, l1: float | None) -> Run:
        cfg = self.cfg
        hook, src = spec.inputs[0], self.hooks[spec.inputs[0]]
        coder = cfg.arch.kind in CODER_KINDS
        if coder:
            in_w = [self.hooks[h].width for h in spec.inputs]
            out_w = [self.hooks[h].width for h in spec.targets]
            # a CLT's d_dict counts every layer's latents: expansion × one layer's input width per layer
            d_dict = cfg.arch.d_dict or cfg.expansion * (sum(in_w) if cfg.arch.kind == "clt" else max(in_w))
            arch = dict(d_in=sum(in_w), d_out=sum(out_w), in_widths=in_w, out_widths=out_w, activation=cfg.arch.activation)
            prov = dataclasses.replace(src.prov, in_hooks=list(spec.inputs), out_hooks=list(spec.targets),
                                       in_scales=[float(self.hooks[h].prov.scale) for h in spec.inputs],
                                       out_scales=[float(self.hooks[h].prov.scale) for h in spec.targets])
        else:
            d_dict = cfg.arch.d_dict or cfg.expansion * src.width
            arch, prov = dict(d_in=src.width), dataclasses.replace(src.prov)
        try:
            dcfg = dataclasses.replace(cfg.arch, d_dict=d_dict, k=k, l1=l1 or 0.0, **arch)
        except ValueError as e:
            raise SaekitError(f"{spec.folder}: {e}; change --k/--d-dict/--expansion/--groups") from None
        d = build(dcfg, prov).to(self.device)
        # A CLT's lr follows its latents per layer, not their total: on a toy store (2 layers, 512 per layer,
        # 100k tokens) the total's lr left its FVU 1.16-1.18x per-layer transcoders', the per-layer lr 0.82-0.87x
        # (benchmarks/README.md, "Transcoders, skip transcoders, CLTs").
        lr = cfg.lr if cfg.lr is not None else default_lr(cfg.arch.kind, d_dict // len(spec.inputs) if cfg.arch.kind == "clt" else d_dict)
        d.train_config = used_config(cfg, dcfg, lr) | {"dead_tokens": self.dead_tokens}  # the window used, 0 resolved
        gen = torch.Generator().manual_seed(cfg.seed)
        d.reset_parameters(gen)
        d.to(self.device)
        opt = _make_adam(d.param_groups(lr), self.device)
        if coder:
            name = f"{dcfg.kind}-" + (f"relu-l1_{l1:g}" if l1 is not None else f"{dcfg.activation}-k{k}")
        else:
            name = run_name(dcfg.kind, k, l1, dcfg.groups)
        return Run(name, hook, d, opt, run_paths(cfg.out, spec.folder, name), gen,
                   torch.zeros(d_dict, device=self.device), nan_step=torch.tensor(-1, device=self.device),
                   spec=spec if coder else None)

    def prepare(self) -> None:
        """Resume from the last common checkpoint, or initialise from a data sample (refusing to overwrite a run)."""
        steps = [set(r.paths.checkpoint_steps()) for r in self.runs]
        common = sorted(set.intersection(*steps)) if steps else []
        # A rerun of the same command resumes too (the checkpoints' identity check still refuses other settings).
        last = common[-1] if common else None
        if self.ddp:  # rank 0's checkpoints decide; every rank must see them (the --out folder must be shared)
            last = distributed.broadcast_object(last)
            distributed.agree(None if last is None or last in common else
                              f"rank {self.dist.rank} cannot see checkpoint step {last} in {self.cfg.out}; "
                              "put --out on a file system every node shares")
        if last is not None:
            self._load_checkpoint([s for s in common if s <= last])
            self._sync_state()
            return
        err = None
        for r in self.runs:
            if (r.paths.dir / "config.json").exists():
                err = f"{r.paths.dir} already holds a finished dictionary; choose another --out, or delete that folder to train it again"
                break
        if self.dist.distributed:
            distributed.agree(err)  # every rank has looked before any rank creates a folder
        elif err:
            raise SaekitError(err)
        self._init_from_data()
        self._sync_state()
        if self.writes:
            for r in self.runs:
                runs.MetricsLog(r.paths.metrics).start()

    def _sync_state(self) -> None:
        """DDP: every rank takes rank 0's parameters and buffers (as DDP does at construction)."""
        if self.ddp:
            for r in self.runs:
                distributed.broadcast_tensors([*r.dictionary.parameters(), *_running_buffers(r.dictionary)])

    def _init_from_data(self) -> None:
        rows = max(self.cfg.init_rows, 1)
        if self.ddp:  # each rank samples its share; the init then sees the union, as a single process would
            rows = -(-rows // self.dist.world_size)
        it = self.batches(0)
        sample: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        got = 0
        while got < rows:
            b = next(it)
            for h in self.hooks:
                sample[h].append(b[h])
            got += next(iter(b.values())).shape[0]
        # Rows spread evenly over the batches read: a batch's rows are in their order in the buffer (units in turn),
        # so its first rows would come from a few sequences only.
        pick = torch.linspace(0, got - 1, rows).round().long() if got > rows else slice(None)
        xs = {h: torch.cat(v)[pick].to(self.device, torch.float32) * self.scales[h] for h, v in sample.items()}
        if self.ddp:
            xs = {h: distributed.all_gather_cat(x) for h, x in xs.items()}
        for r in self.runs:
            if r.spec is None:
                r.dictionary.init_from_data(xs[r.hook])
            else:
                r.dictionary.init_from_data(_cat(xs, r.spec.inputs), target=_cat(xs, r.spec.targets))

    # --- training ----------------------------------------------------------------------------
    def fit(self) -> list[Run]:
        """Resume or initialise, then train to cfg.tokens."""
        self.prepare()
        return self.loop()

    def loop(self) -> list[Run]:
        """The training steps from self.step on, through the engine (timed alone by benchmarks/train_speed.py)."""
        if self.step >= self.n_steps:
            return self.runs
        cfg = self.cfg
        needed = itertools.islice(self.batches(self.step), self.n_steps - self.step)  # no read-ahead past the end
        # On CPU the prefetch thread also casts and scales, so all of batch i+1's preparation overlaps
        # step i (torch releases the GIL), but only where a core is free for it; device copies stay on
        # the main thread's stream.
        on_cpu = self.device.type == "cpu"
        self._it = prefetch(map(self._scaled, needed) if on_cpu else needed, size=2, name="saekit-batches",
                            background=can_overlap(self.device))
        ckpt_steps = max(1, cfg.checkpoint_every // cfg.batch_size) if cfg.checkpoint_every else 0
        self._engine = Engine(self, self.n_steps, cfg.log_every, ckpt_steps, progress=self.progress and self.dist.is_main)
        try:
            self._engine.run(self.step)
        finally:
            self._it.close()
        return self.runs

    # --- the objective: what a step computes, what a log row and a checkpoint hold ---------------
    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    def take_step(self, step: int) -> None:
        xn = next(self._it) if self.device.type == "cpu" else self._scaled(next(self._it))
        cats: dict[tuple[str, ...], Tensor] = {}  # a sweep's runs share their inputs' concatenation
        for r in self.runs:
            if r.spec is None:
                self._step(r, xn[r.hook])
            else:
                ins, outs = tuple(r.spec.inputs), tuple(r.spec.targets)
                x = cats[ins] if ins in cats else cats.setdefault(ins, _cat(xn, ins))
                y = cats[outs] if outs in cats else cats.setdefault(outs, _cat(xn, outs))
                self._step(r, x, y)
        self.step = step + 1

    def log_rows(self, step: int, seconds: float) -> list[dict]:
        self.tokens_per_s = self._engine.rate
        return self._log()

    def bad_steps(self) -> list[int | None]:
        if self.ddp:  # the first bad step on any rank (all ranks stop together)
            big = torch.iinfo(torch.int64).max
            first = torch.stack([torch.where(r.nan_step < 0, big, r.nan_step) for r in self.runs]).to(torch.int64)
            distributed.flat_all_reduce([first], "min")
            for r, s in zip(self.runs, first):
                r.nan_step = torch.where(s == big, -1, s)
        return [int(r.nan_step) if int(r.nan_step) >= 0 else None for r in self.runs]

    def metrics_logs(self) -> list[runs.MetricsLog | None]:
        return [runs.MetricsLog(r.paths.metrics) if self.writes else None for r in self.runs]

    def checkpoint_roots(self) -> list[Path]:
        return [r.paths.checkpoints for r in self.runs]

    def save_checkpoint(self, step: int) -> None:
        self._checkpoint()

    def progress_info(self, row: dict) -> str:
        skip = ("step", "tokens", "lr", "tokens_per_s", "l0", "dead_fraction", "dead_window_tokens")
        terms = " ".join(f"{k}={row[k]:.4g}" for k in row if k not in skip)
        return f"{terms} L0={row.get('l0', 0):.1f} {metrics.dead_note(row.get('dead_fraction'), self.dead_tokens, 'training', last=True)}"

    def _scaled(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A batch on the device, float32, in the dictionaries' units."""
        return {h: batch[h].to(self.device, torch.float32, non_blocking=True) * self.scales[h] for h in self.hooks}

    def _step(self, r: Run, xn: Tensor, target: Tensor | None = None) -> None:
        cfg, d = self.cfg, r.dictionary
        # dead=None skips AuxK's top-k, decode and backward (its term would be exactly 0): always
        # while fewer than dead_tokens tokens have been seen (no latent can be dead yet; known
        # without reading the device), and on CPU, where reading `dead.any()` costs no sync, whenever
        # none is dead.  On the toy store's TopK SAE this made a CPU step 3× faster.
        dead = metrics.dead_mask(r.since_fired, self.dead_tokens) if self.step * cfg.batch_size > self.dead_tokens else None
        if dead is not None and dead.device.type == "cpu" and not bool(dead.any()):
            dead = None
        state = {"dead": dead, "aux_k": cfg.aux_k or None, "aux_coef": cfg.aux_coef}
        if target is not None:
            state["target"] = target
        if uses_l1(cfg):
            warm = max(1, round(cfg.l1_warmup * self.n_steps))
            state["l1_coef"] = d.cfg.l1 * min(1.0, (self.step + 1) / warm)
        with precision.autocast(self.precision):
            out = d.training_forward(xn, **state)
        r.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        fired, rows = out.fired, xn.shape[0]
        if self.ddp:
            fired = self._all_reduce_step(d, fired)
            rows *= self.dist.world_size
        d.before_step()
        if cfg.grad_clip:
            # The first gradients are ~20× those a few hundred steps later.  Unclipped, they fill
            # Adam's second moment (β2 = 0.999 remembers ~1000 steps), so every later step is
            # small; clipping halved TopK's FVU at 100 and 500 steps (benchmarks/README.md).
            # No host sync: the norm stays on the device.
            torch.nn.utils.clip_grad_norm_(d.parameters(), cfg.grad_clip / d.cfg.d_in)
        r.opt.step()
        d.after_step()
        with torch.no_grad():
            r.since_fired = torch.where(fired, torch.zeros_like(r.since_fired), r.since_fired + rows)
            bad = ~torch.isfinite(out.loss.detach())
            r.nan_step = torch.where(bad & (r.nan_step < 0), torch.full_like(r.nan_step, self.step), r.nan_step)
            for name, t in {"loss": out.loss, **out.terms, "l0": out.l0}.items():
                r.acc[name] = r.acc.get(name, 0) + t.detach().float()  # terms may be bfloat16 under autocast
            r.acc["n"] = r.acc.get("n", 0) + 1
        if (self.step + 1) % cfg.replace_every == 0:
            self._replace_dead(r, xn)

    def _all_reduce_step(self, d: Dictionary, fired: Tensor) -> Tensor:
        """DDP: average gradients and running buffers over ranks, OR the fired flags; one message. Returns fired."""
        params = list(d.parameters())
        for p in params:
            if p.grad is None:  # every rank must send the same layout
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bufs = [b for b in _running_buffers(d) if b.is_floating_point()]
        flags = fired.to(grads[0].dtype)
        distributed.flat_all_reduce([*grads, *bufs, flags], "sum")
        w = self.dist.world_size
        for t in (*grads, *bufs):
            t.div_(w)
        return flags > 0

    def _replace_dead(self, r: Run, xn: Tensor) -> None:
        dead = metrics.dead_mask(r.since_fired, self.dead_tokens)
        masks = r.dictionary.resample_dead(dead, xn, r.generator)
        if self.ddp and masks:  # replacements drawn from rank 0's rows; `dead` (hence masks) is the same everywhere
            distributed.broadcast_tensors(list(r.dictionary.parameters()))
        if not masks:
            return
        params = dict(r.dictionary.named_parameters())
        for pname, mask in masks.items():
            st = r.opt.state.get(params[pname], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][mask] = 0
        r.since_fired = torch.where(dead, torch.zeros_like(r.since_fired), r.since_fired)

    def _log(self) -> list[dict]:
        """Each run's averages since the last log (global ones under DDP); reads the device."""
        if self.ddp:  # log the global batch's averages
            for r in self.runs:
                keys = sorted(k for k in r.acc if k != "n")
                vals = [torch.as_tensor(r.acc[k], dtype=torch.float32, device=self.device).reshape(1) for k in keys]
                distributed.flat_all_reduce(vals, "mean")
                r.acc.update(zip(keys, (v[0] for v in vals)))
        for r in self.runs:
            n = r.acc.pop("n", 1)
            row = {"step": self.step, "tokens": self.step * self.cfg.batch_size}
            row |= {k: float(v) / n for k, v in r.acc.items()}
            filled = row["tokens"] > self.dead_tokens  # before that no latent can be dead: null, not a reassuring 0
            row["dead_fraction"] = float(metrics.dead_mask(r.since_fired, self.dead_tokens).float().mean()) if filled else None
            row["dead_window_tokens"] = self.dead_tokens  # the last this many training tokens
            row["lr"] = r.opt.param_groups[-1]["lr"]  # the run's lr (matrices may take a multiple: Dictionary.weight_lr_scale)
            row["tokens_per_s"] = self.tokens_per_s
            r.acc.clear()
            r.last = row
        return [r.last for r in self.runs]

    # --- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        """Write every run's state at self.step (runs.save_checkpoint: atomic, checksummed, last two kept)."""
        if not self.writes:
            return
        for r in self.runs:
            tensors, meta = _run_state(r)
            meta |= {"tokens": self.step * self.cfg.batch_size, "identity": self.ident, "train_config": to_dict(self.cfg),
                     "batch_order": BATCH_ORDER}
            runs.save_checkpoint(r.paths.checkpoints, self.step, tensors, meta)

    def _load_checkpoint(self, steps: list[int]) -> None:
        """Resume from the newest of `steps` every run can read (a damaged one is named in a warning and skipped)."""
        for step in reversed(steps):
            states = []
            for r in self.runs:
                got = runs.try_read_checkpoint(r.paths.checkpoint(step), str(self.device))
                if got is None:
                    break
                if got[1].get("identity") not in self.accepted_idents:
                    runs.check_identity(r.paths.dir, got[1], self.ident, to_dict(self.cfg), IDENTITY_FIELDS,
                                        config_key="train_config", unnamed="hooks")
                states.append(got)
            if len(states) < len(self.runs):
                continue
            _note_batch_order(states[0][1], self.cfg.out)
            for r, (tensors, meta) in zip(self.runs, states):
                _load_run_state(r, tensors, meta)
                if self.writes:
                    runs.MetricsLog(r.paths.metrics).truncate(step)
            self.step = step
            return
        raise SaekitError(f"every checkpoint in {self.cfg.out} is damaged (see the warnings); "
                          "delete the checkpoints folders and rerun without --resume")

    # --- evaluation and output ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_batches: Iterable[dict[str, Tensor]], max_tokens: int) -> dict[str, dict]:
        """MSE (normalised, per element), FVU, L0 and dead fraction of every run on held-out rows."""
        accs = {r.label: (metrics.FVUAccumulator(), torch.zeros(r.dictionary.cfg.d_dict, device=self.device), [0.0, 0.0]) for r in self.runs}
        per_hook = {r.label: {h: metrics.FVUAccumulator() for h in r.spec.targets} for r in self.runs if r.spec is not None}
        seen = 0
        for batch in eval_batches:
            if seen >= max_tokens:
                break
            take = min(max_tokens - seen, next(iter(batch.values())).shape[0])
            for r in self.runs:
                d = r.dictionary.eval()
                fvu_acc, fires, l0_sum = accs[r.label]
                if r.spec is None:
                    x = batch[r.hook][:take].to(self.device, torch.float32)
                    codes = d.encode(x)
                    x_hat = d.decode(codes)
                    l0_sum[1] += ((x - x_hat) * d.scale).pow(2).sum().item()
                else:  # a coder: its prediction of every target hook from its inputs, per hook and all together
                    codes = d.encode_hooks({h: batch[h][:take].to(self.device, torch.float32) for h in r.spec.inputs})
                    pred = d.predict({h: batch[h][:take].to(self.device, torch.float32) for h in r.spec.inputs})
                    for h in r.spec.targets:
                        per_hook[r.label][h].update(batch[h][:take].to(self.device, torch.float32), pred[h])
                    x = _cat({h: batch[h][:take].to(self.device, torch.float32) for h in r.spec.targets}, r.spec.targets)
                    x_hat = _cat(pred, r.spec.targets)
                    l0_sum[1] += ((x - x_hat) * d.out_scale).pow(2).sum().item()
                fvu_acc.update(x, x_hat)
                fires += (codes != 0).sum(0)
                l0_sum[0] += metrics.l0(codes) * take
                d.train()
            seen += take
        out = {}
        for r in self.runs:
            fvu_acc, fires, (l0_sum, sq) = accs[r.label]
            if seen == 0:
                out[r.label] = {"eval_tokens": 0}
                continue
            f = fvu_acc.value()
            width = r.dictionary.cfg.d_out if r.spec is not None else r.dictionary.cfg.d_in
            out[r.label] = {"eval_tokens": seen, "mse": sq / (seen * width), "fvu": f,
                            "explained_variance": 1 - f, "l0": l0_sum / seen, "dead_fraction": metrics.dead_fraction(fires),
                            "dead_window_tokens": seen}
            if r.spec is not None:
                out[r.label]["fvu_per_hook"] = {h: a.value() for h, a in per_hook[r.label].items()}
        return out

    def save(self, summaries: dict[str, dict] | None = None) -> list[Path]:
        """Write every dictionary (config.json + weights); returns their folders (written by rank 0 alone under DDP)."""
        paths = []
        for r in self.runs:
            if not self.writes:
                paths.append(r.paths.dir)
                continue
            d = r.dictionary
            d.summary = {"train_steps": self.step, "train_tokens": self.step * self.cfg.batch_size,
                         "tokens_per_s": self.tokens_per_s, **(summaries or {}).get(r.label, {})}
            paths.append(d.save(r.paths.dir))
            if not self.cfg.keep_checkpoints:
                shutil.rmtree(r.paths.checkpoints, ignore_errors=True)  # the dictionary is final; --keep-checkpoints keeps them
        return paths


def _cat(xs: dict[str, Tensor], names) -> Tensor:
    """The hooks' rows side by side, (n, Σ width): a coder's input or target."""
    return xs[names[0]] if len(names) == 1 else torch.cat([xs[h] for h in names], dim=1)


def _running_buffers(d: Dictionary) -> list[Tensor]:
    """Buffers training changes (BatchTopK's threshold); `scale` is fixed by the store, non-persistent ones (a CLT's masks) by the config."""
    fixed = getattr(d, "_non_persistent_buffers_set", set())
    return [b for name, b in d.named_buffers() if name != "scale" and name not in fixed]


def _note_batch_order(meta: dict, out) -> None:
    """Warn when a checkpoint was written by a loader that ordered the rows inside a batch differently (the same
    rows per batch: the run continues correctly, but not bit for bit as the older version would have)."""
    if meta.get("batch_order", 1) != BATCH_ORDER:
        warnings.warn(f"{out}: this checkpoint was written by an earlier saekit whose batches held the same rows in "
                      "another order; the resumed run is not bit-identical to one the earlier version would finish", stacklevel=2)


def _run_state(r: Run) -> tuple[dict[str, Tensor], dict]:
    """A run's resumable state as flat tensors + JSON (Adam's state dict flattened, no pickle)."""
    t = {f"model.{k}": v for k, v in r.dictionary.state_dict().items()}
    osd = r.opt.state_dict()
    for idx, st in osd["state"].items():
        for name, v in st.items():
            t[f"opt.{idx}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    t["since_fired"] = r.since_fired
    t["generator"] = r.generator.get_state()
    t = {k: v.detach().contiguous().cpu() for k, v in t.items()}
    return t, {"param_groups": osd["param_groups"]}


def _load_run_state(r: Run, t: dict[str, Tensor], meta: dict) -> None:
    r.dictionary.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v  # Optimizer.load_state_dict places `step` itself
    r.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    r.since_fired = t["since_fired"].to(r.since_fired.device)
    r.generator.set_state(t["generator"].cpu())


# --- from a store ---------------------------------------------------------------------------------

def train(cfg: TrainConfig, progress: bool = True) -> list[Path]:
    """Train every dictionary `cfg` describes on its store; returns their folders (config.json + weights).

    Started by torchrun, the ranks share the work as `cfg.placement` says (module docstring);
    every rank returns every folder once they are all written.
    """
    env = distributed.env()
    if cfg.objective == "e2e":  # stage 2 does not import saekit.inmodel
        raise SaekitError("objective e2e trains through the model: call saekit.inmodel.e2e.train_e2e(from_train_config(cfg)) "
                          "(`saekit train --objective e2e` does)")
    with outdir.claim(cfg.out, "train", rank=env.rank):  # a folder, writable, and no other writer
        return _train(cfg, progress, env)


def _train(cfg: TrainConfig, progress: bool, env: distributed.DistEnv) -> list[Path]:
    device = distributed.device(cfg.device, env) if env.distributed else resolve_device(cfg.device)
    with distributed.session(device) as env:
        return _train_store(cfg, progress, env)


def _train_store(cfg: TrainConfig, progress: bool, env: distributed.DistEnv) -> list[Path]:
    store = open_store(cfg.store)
    n_seq = max(store.n_sequences, 1)
    cfg = resolve_tokens(cfg, round(store.n_rows * len(store.split("train")) / n_seq))  # config.json records the budget used
    hooks = resolve_store_hooks(store, cfg.hooks)
    specs = run_specs(cfg, hooks, list(store.hooks), int(getattr(store.model, "n_layers", 0) or 0))
    if cfg.arch.kind in CODER_KINDS:  # every hook a dictionary reads or predicts, in one read of the store
        hooks = list(dict.fromkeys(h for sp in specs for h in sp.inputs + sp.targets))
        if env.distributed and cfg.placement == "hooks":
            raise SaekitError(f"--kind {cfg.arch.kind} reads several hooks per dictionary: use --placement data under torchrun")
    mine, batch_size, rank, world = hooks, cfg.batch_size, 0, 1
    ddp = env.distributed and cfg.placement == "data"
    if env.distributed and cfg.placement == "hooks":
        if env.world_size > len(hooks):
            raise SaekitError(f"--placement hooks with {env.world_size} processes but {len(hooks)} hook(s): "
                              f"start at most {len(hooks)} processes, or use --placement data")
        mine = hooks[env.rank::env.world_size]
    elif ddp:
        if cfg.batch_size % env.world_size:
            raise SaekitError(f"--batch-size {cfg.batch_size} is the global batch and must divide by the {env.world_size} "
                              f"processes; pass --batch-size {cfg.batch_size // env.world_size * env.world_size or env.world_size}")
        batch_size, rank, world = cfg.batch_size // env.world_size, env.rank, env.world_size
    model = store.model.to_dict() if hasattr(store.model, "to_dict") else dict(store.model or {})
    sources = {}
    for h in mine:
        scale = float(store.stats(h)["scale"])
        prov = Provenance(hook=h, model=model, hook_shape=list(store.hook_shape(h)), scale=scale, store=str(cfg.store))
        sources[h] = HookSource(int(store.hook_width(h)), prov)
    kw = {"buffer_rows": cfg.buffer_rows} if cfg.buffer_rows else {}
    device = distributed.device(cfg.device, env) if env.distributed else resolve_device(cfg.device)  # the Trainer's

    def stream(start: int):  # the Trainer reads it one batch ahead in a background thread
        return store.batches(mine, batch_size, split="train", seed=cfg.seed, start_batch=start, rank=rank, world_size=world,
                             device=device if device.type == "cuda" else None, **kw)  # CUDA: pinned, copied and cast by the loader

    first = None
    if env.distributed:  # open the first stream now, so a rank with too little data fails on every rank, not in a hang
        err = None
        try:
            first = stream(0)
        except SaekitError as e:
            err = str(e)
        distributed.agree(err)

    def batches(start: int) -> Iterator[dict[str, Tensor]]:
        nonlocal first
        if start == 0 and first is not None:
            it, first = first, None
            return it
        return stream(start)

    trainer = Trainer(cfg, sources, batches, progress=progress, dist=env, data_parallel=ddp, run_hooks=hooks,
                      specs=specs if cfg.arch.kind in CODER_KINDS else None)
    trainer.fit()
    summaries = {}
    if cfg.eval_tokens and trainer.writes:
        summaries = trainer.evaluate(store_eval_batches(store, mine), cfg.eval_tokens)
    paths = trainer.save(summaries)
    if env.distributed:
        gathered = distributed.all_gather_object([str(p) for p in paths])  # also: nobody returns before all are saved
        paths = list(dict.fromkeys(Path(p) for part in gathered for p in part))
    return paths
