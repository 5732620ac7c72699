"""`saekit eval truth`: score dictionaries against a synthetic world's known features.

Reconstruction says what a dictionary keeps; this says whether its latents are the true
features.  On the store's eval split (rows never trained on), for each dictionary:

- MCC: mean |cos| of decoder rows and true directions under the optimal one-to-one matching;
- per true feature, the latent with the best F1 of firing: its precision, recall, F1 (means
  over features that fire in the scored rows), the share with F1 ≥ 0.9, uniqueness;
- absorption (hierarchical worlds): how often a parent's latent misses a parent firing that
  one of its children's latents catches;
- shrinkage: mean ‖x̂‖/‖x‖ over rows with x ≠ 0, L0 (and the world's true L0), FVU, dead and dense fractions.

The definitions are in `saekit.metrics`; this module streams rows and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from saekit import metrics
from saekit.errors import SaekitError
from saekit.models import resolve_device


@dataclass
class TruthConfig:
    """What `saekit eval truth` scores, against which world."""

    dicts: list[str] = field(default_factory=list, metadata={"aliases": ["--dict"]})
    """Dictionary folders to score (saekit, SAELens or sparsify), comma-separated or repeated."""
    truth: str = ""
    """A store written by `saekit synth` (its truth/ folder holds the true features)."""
    json_out: str = field(default="", metadata={"aliases": ["--json"]})
    """Also write the full result (with per-feature scores) as JSON here."""
    max_rows: int = 200_000
    """Score at most this many rows of the eval split."""
    batch_size: int = 4096
    """Rows encoded at a time."""
    dense_threshold: float = 0.1
    """A latent firing on more than this share of rows counts as dense."""
    device: str = "auto"
    """Device to encode on: cpu, cuda, cuda:1, ... or auto (cuda when available)."""

    def __post_init__(self):
        if not self.truth:
            raise ValueError("truth is required: the synthetic store (--truth DIR, from `saekit synth`)")
        if self.max_rows < 1 or self.batch_size < 1:
            raise ValueError("max_rows and batch_size must be positive")
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold {self.dense_threshold} must be in (0, 1]")


def eval_rows(store, max_rows: int) -> range:
    """Generator row ids of the eval split (row r = sequence r // ctx, position r % ctx), at most `max_rows`."""
    ctx = store.context_size
    seqs = store.split("eval")
    if len(seqs) == 0:
        raise SaekitError(f"store {store.path} has no eval split (holdout 0); regenerate it with --holdout > 0")
    stop = min(seqs.stop * ctx, store.n_rows)  # only the last sequence can be padded
    return range(seqs.start * ctx, min(stop, seqs.start * ctx + max_rows))


def _batches(store, hook: str, rows: range, batch_size: int):
    """(row range, x (n, d)) over `rows`, read by whole sequences."""
    ctx = store.context_size
    per = max(1, batch_size // ctx)
    first, last = rows.start // ctx, (rows.stop - 1) // ctx + 1
    for s in range(first, last, per):
        e = min(last, s + per)
        x = torch.from_numpy(store.read_acts(hook, s, e)).reshape(-1, store.hook_width(hook))
        a, b = max(rows.start, s * ctx), min(rows.stop, e * ctx)
        yield range(a, b), x[a - s * ctx : b - s * ctx]


@torch.no_grad()
def score_dictionary(d, store, truth, hook: str, rows: range, cfg: TruthConfig) -> dict:
    """One dictionary's scores on `rows` of the synthetic store (see the module docstring)."""
    dev = resolve_device(cfg.device)
    d = d.to(dev).eval()
    n_feat = truth.world.p.shape[0]
    d_dict = d.cfg.d_dict
    tp = torch.zeros(d_dict, n_feat, device=dev, dtype=torch.float64)
    fired = torch.zeros(d_dict, device=dev, dtype=torch.float64)
    true_count = torch.zeros(n_feat, device=dev, dtype=torch.float64)
    fvu = metrics.FVUAccumulator()
    l0_sum = true_l0_sum = shrink_sum = 0.0
    shrink_n = 0
    for r, x in _batches(store, hook, rows, cfg.batch_size):
        x = x.to(dev)
        T = truth.acts(r.start, r.stop).to(dev) > 0
        out = d(x)
        Fd = out.codes != 0
        tp += Fd.double().T @ T.double()
        fired += Fd.sum(0)
        true_count += T.sum(0)
        fvu.update(x, out.x_hat)
        l0_sum += Fd.sum().item()
        true_l0_sum += T.sum().item()
        xn = x.norm(dim=1)
        some = xn > 0  # rows where nothing fired (and no noise) have no length to keep
        shrink_sum += (out.x_hat.norm(dim=1)[some] / xn[some]).sum().item()
        shrink_n += int(some.sum())
    n = len(rows)
    precision, recall, f1 = metrics.firing_f1(tp, fired, true_count)
    best = metrics.best_latents(f1)
    idx = torch.arange(n_feat, device=dev)
    live = true_count > 0  # features that fire in the scored rows
    best_f1, best_p, best_r = f1[best, idx], precision[best, idx], recall[best, idx]
    rate = fired / max(n, 1)
    children = truth.world.children_of
    absorbed = _absorption(d, store, truth, hook, rows, cfg, best, children) if children else None
    _, _, cos = metrics.match_directions(d.directions().float(), truth.world.directions.to(dev))
    return {
        "kind": d.cfg.kind,
        "d_dict": d_dict,
        "mcc": cos.sum().item() / n_feat,
        "mean_f1": best_f1[live].mean().item(),
        "mean_precision": best_p[live].mean().item(),
        "mean_recall": best_r[live].mean().item(),
        "share_f1_ge_0.9": (best_f1[live] >= 0.9).float().mean().item(),
        "uniqueness": metrics.uniqueness(best[live]),
        "absorption": absorbed,
        "shrinkage": shrink_sum / max(shrink_n, 1),
        "l0": l0_sum / max(n, 1),
        "true_l0": true_l0_sum / max(n, 1),
        "fvu": fvu.value(),
        "dead_frac": metrics.dead_fraction(fired),
        "dead_window_tokens": int(n),  # dead: not fired in these held-out rows
        "dense_frac": (rate > cfg.dense_threshold).float().mean().item(),
        "features_scored": int(live.sum()),
        "per_feature": {"best_latent": best.tolist(), "f1": best_f1.tolist(), "precision": best_p.tolist(),
                        "recall": best_r.tolist(), "true_count": true_count.long().tolist()},
    }


@torch.no_grad()
def _absorption(d, store, truth, hook: str, rows: range, cfg: TruthConfig, best, children: dict[int, list[int]]) -> float | None:
    """Mean over parents of `metrics.absorption`, from a second pass now that each feature's best latent is known."""
    dev = resolve_device(cfg.device)
    absorbed = {par: 0.0 for par in children}
    fires = {par: 0 for par in children}
    for r, x in _batches(store, hook, rows, cfg.batch_size):
        T = truth.acts(r.start, r.stop).to(dev) > 0
        Fd = d.encode(x.to(dev)) != 0
        for par, kids in children.items():
            n = int(T[:, par].sum())
            if n:
                fires[par] += n
                absorbed[par] += n * metrics.absorption(T[:, par], Fd[:, best[par]], Fd[:, best[kids]].any(1))
    vals = [absorbed[p] / fires[p] for p in children if fires[p]]
    return sum(vals) / len(vals) if vals else None


def score_truth(cfg: TruthConfig, progress=None) -> dict:
    """Score every dictionary of `cfg` on the eval split of the synthetic store `cfg.truth`."""
    from saekit.interop import load as load_dictionary
    from saekit.store import ActivationStore
    from saekit.synth import load_truth

    if not cfg.dicts:
        raise SaekitError("no dictionary to score: pass --dict DIR (repeatable)")
    truth = load_truth(cfg.truth)
    store = ActivationStore(cfg.truth)
    hook = truth.settings.get("hook") or store.hooks[0]
    width = store.hook_width(hook)
    rows = eval_rows(store, cfg.max_rows)
    results = []
    for i, p in enumerate(cfg.dicts):
        if not Path(p).exists():
            raise SaekitError(f"dictionary folder {p} does not exist")
        d = load_dictionary(p, device="cpu")
        if d.cfg.d_in != width:
            raise SaekitError(f"dictionary {p} reads {d.cfg.d_in}-dimensional inputs but {cfg.truth} holds {width}-dimensional "
                              f"rows; score it against the world it was trained on")
        r = score_dictionary(d, store, truth, hook, rows, cfg)
        results.append({"dict": str(p), **r})
        if progress:
            progress(i + 1, len(cfg.dicts))
    out = {"truth": str(cfg.truth), "hook": hook, "rows": len(rows), "world": truth.settings, "dictionaries": results}
    if cfg.json_out:
        from saekit.store.format import write_json_atomic

        Path(cfg.json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cfg.json_out), out)
    return out


COLUMNS = (("mcc", "MCC"), ("mean_f1", "mean F1"), ("share_f1_ge_0.9", "F1≥0.9"), ("uniqueness", "unique"),
           ("absorption", "absorb"), ("shrinkage", "‖x̂‖/‖x‖"), ("l0", "L0"), ("fvu", "FVU"), ("dead_frac", "dead"),
           ("dense_frac", "dense"))


def table_rows(result: dict) -> list[list[str]]:
    """The printed table: one row per dictionary, the columns of COLUMNS."""
    rows = []
    for r in result["dictionaries"]:
        rows.append([r["dict"]] + ["–" if r[k] is None else f"{r[k]:.3f}" for k, _ in COLUMNS])
    return rows

