"""Synthetic feature worlds: activations whose true features are known, to judge dictionaries against.

A world has `n_features` unit directions in `d` dimensions (n_features ≫ d: superposition).
Each row is `x = Σ_i a_i · dir_i + noise`, where feature i fires with probability p_i
(a power law over i, scaled to a target mean L0) and fires with a magnitude a_i > 0 drawn
from a chosen distribution.  Options make the world harder the way real models are:

- correlation: features in groups of `corr_group` share a Gaussian factor (a Gaussian
  copula), so they fire together more often than chance while each keeps its p_i;
- hierarchy: the first `n_parents` features (the most frequent) each have `children`
  children that fire only when the parent does; with `exclusive`, at most one sibling at
  a time.  This is where dictionaries absorb a parent into its children;
- noise: isotropic Gaussian noise of std `noise` per dimension.

Output: a normal token-less store (`saekit.store.importer.write_rows_store`) under hook
`cfg.hook`, and beside the shards `truth/features.safetensors` (directions, p, parent)
and `truth/acts-NNNNN.safetensors` (each row's true activations, CSR, ~1M rows per
file).  Row r of the generator is sequence r // ctx, position r % ctx.
Everything is a function of `seed`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saekit.errors import SaekitError

TRUTH_DIR = "truth"
MAGNITUDES = ("uniform", "constant", "normal", "exponential")
CHUNK_VALUES = 1 << 24
"""Rows are generated in chunks of about this many (row, feature) draws (64 MB of float32)."""
TRUTH_FILE_ROWS = 1 << 20
"""Rows of true activations per `truth/acts-NNNNN.safetensors` (at least; whole generated chunks)."""


@dataclass
class SynthConfig:
    """A synthetic world: its features, how they fire, and the store to write."""

    out: str = ""
    """Store directory to create (must not exist, or be empty)."""
    n_features: int = 512
    """Number of true features N (N > d puts them in superposition)."""
    d: int = 128
    """Dimension of the activations."""
    rows: int = 1_000_000
    """Rows (activation vectors) to generate."""
    l0: float = 8.0
    """Expected number of features firing per row (sets the scale of the power law)."""
    power: float = 0.5
    """Firing probability of feature i ∝ (i + 1)^-power (0: all equal)."""
    magnitude: str = "uniform"
    """Firing magnitude distribution: uniform (mean ± std·√3, clipped at 0), constant, normal (folded), exponential."""
    mag_mean: float = 1.0
    """Mean firing magnitude."""
    mag_std: float = 0.25
    """Spread of the firing magnitude (ignored by constant and exponential)."""
    correlation: float = 0.0
    """Correlation (0..1) of the latent Gaussians of features in the same group: they fire together more than chance."""
    corr_group: int = 4
    """Features per correlated group (consecutive ids after the hierarchy)."""
    n_parents: int = 0
    """Parent features in the hierarchy (the most frequent features); 0: no hierarchy."""
    children: int = 4
    """Children per parent; a child fires only when its parent does."""
    child_prob: float = 0.5
    """Probability that a child fires when its parent does (with exclusive: that one of the siblings does)."""
    exclusive: bool = True
    """At most one child of a parent fires at a time (mutually exclusive siblings)."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every dimension."""
    hook: str = "synth"
    """Hook name the activations are stored under."""
    context_size: int = 128
    """Rows per stored pseudo-sequence (the unit of the eval split)."""
    holdout: float = 0.05
    """Share of sequences kept as the eval split (scored by `saekit eval truth`)."""
    dtype: str = "float32"
    """Stored dtype: float32, float16 or bfloat16."""
    shard_tokens: int = 1 << 20
    """Rows per shard file."""
    seed: int = 0
    """Seed of everything random: directions, probabilities, rows."""
    generate_on: str = "cpu"
    """Where rows are generated: cpu or cuda (each has its own random stream: the same seed gives other rows on the other)."""

    def __post_init__(self):
        if self.n_features < 1 or self.d < 1:
            raise ValueError(f"n_features ({self.n_features}) and d ({self.d}) must be positive")
        if self.rows < 1:
            raise ValueError(f"rows ({self.rows}) must be positive")
        if self.l0 <= 0:
            raise ValueError(f"l0 ({self.l0}) must be positive")
        for name in ("correlation", "child_prob"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"{name} {v} is a probability and must be in [0, 1]")
        if self.power < 0 or self.mag_mean <= 0 or self.mag_std < 0 or self.noise < 0:
            raise ValueError("power, mag_std and noise must be ≥ 0 and mag_mean > 0")
        if self.magnitude not in MAGNITUDES:
            raise ValueError(f"magnitude {self.magnitude!r} is not one of {', '.join(MAGNITUDES)}")
        if self.n_parents < 0 or self.children < 1 or self.corr_group < 1:
            raise ValueError("n_parents must be ≥ 0, children and corr_group ≥ 1")
        if self.n_parents * (1 + self.children) > self.n_features:
            raise ValueError(f"n_parents·(1 + children) = {self.n_parents * (1 + self.children)} features exceed n_features {self.n_features}")
        if not self.out:
            raise ValueError("out is required: the store directory to create (--out DIR)")


@dataclass
class World:
    """The fixed part of a world: directions, firing probabilities, the hierarchy."""

    directions: torch.Tensor
    """(N, d) unit rows."""
    p: torch.Tensor
    """(N,) marginal firing probability of each feature."""
    parent: torch.Tensor
    """(N,) int64: the parent's id, -1 for roots."""

    @property
    def children_of(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c, par in enumerate(self.parent.tolist()):
            if par >= 0:
                out.setdefault(par, []).append(c)
        return out


def make_world(cfg: SynthConfig) -> World:
    """Directions and probabilities (seeded; independent of `rows`)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n, d = cfg.n_features, cfg.d
    dirs = torch.randn(n, d, generator=g, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=1, keepdim=True)).float()
    base = torch.arange(1, n + 1, dtype=torch.float64).pow(-cfg.power)
    parent = torch.full((n,), -1, dtype=torch.int64)
    n_par, k = cfg.n_parents, cfg.children
    child_ids = torch.arange(n_par, n_par + n_par * k)
    parent[child_ids] = torch.arange(n_par).repeat_interleave(k)
    per_child = cfg.child_prob / k if cfg.exclusive else cfg.child_prob
    # Expected L0 is linear in the power law's scale s: s·(Σ_roots base + Σ_parents base·k·per_child).
    roots = parent < 0
    unit = base[roots].sum() + base[:n_par].sum() * k * per_child
    s = cfg.l0 / float(unit)
    p = base * s
    if float(p[roots].max()) > 1:
        raise SaekitError(f"l0 {cfg.l0} is too high for {n} features with power {cfg.power} (the most frequent feature would fire "
                          f"with probability {float(p[roots].max()):.2f} > 1); lower --l0 or --power, or raise --n-features")
    p[child_ids] = p[parent[child_ids]] * per_child
    return World(dirs, p.float(), parent)


def _magnitudes(cfg: SynthConfig, n: int, g: torch.Generator, device) -> torch.Tensor:
    m, s = cfg.mag_mean, cfg.mag_std
    if cfg.magnitude == "constant":
        return torch.full((n,), m, device=device)
    if cfg.magnitude == "uniform":
        half = s * math.sqrt(3)
        return (m - half + 2 * half * torch.rand(n, generator=g, device=device)).clamp_min(0)
    if cfg.magnitude == "normal":
        return (m + s * torch.randn(n, generator=g, device=device)).abs()
    return torch.empty(n, device=device).exponential_(1 / m, generator=g)


def sample_rows(cfg: SynthConfig, world: World, m: int, g: torch.Generator, device="cpu"):
    """m rows: (x (m, d) float32, true activations as CSR (indptr (m+1,), indices, values))."""
    n = cfg.n_features
    p = world.p.to(device)
    n_par, k = cfg.n_parents, cfg.children
    roots = (world.parent < 0).to(device)
    if cfg.correlation > 0:  # Gaussian copula: fire where z_i < Φ⁻¹(p_i), z = √ρ·factor(group) + √(1-ρ)·ε
        n_groups = math.ceil(n / cfg.corr_group)
        factor = torch.randn(m, n_groups, generator=g, device=device)
        group = torch.arange(n, device=device) // cfg.corr_group
        z = math.sqrt(cfg.correlation) * factor[:, group] + math.sqrt(1 - cfg.correlation) * torch.randn(m, n, generator=g, device=device)
        fire = z < torch.special.ndtri(p.double().clamp(1e-12, 1 - 1e-12)).float()
    else:
        fire = torch.rand(m, n, generator=g, device=device) < p
    fire &= roots  # children are decided by their parents below
    if n_par:
        par_fire = fire[:, :n_par]
        if cfg.exclusive:
            which = torch.randint(0, k, (m, n_par), generator=g, device=device)
            on = par_fire & (torch.rand(m, n_par, generator=g, device=device) < cfg.child_prob)
            rows, pars = on.nonzero(as_tuple=True)
            fire[rows, n_par + pars * k + which[rows, pars]] = True
        else:
            on = par_fire[:, :, None] & (torch.rand(m, n_par, k, generator=g, device=device) < cfg.child_prob)
            fire[:, n_par : n_par + n_par * k] = on.reshape(m, n_par * k)
    rows, feats = fire.nonzero(as_tuple=True)  # row-major: already CSR order
    values = _magnitudes(cfg, len(rows), g, device)
    dirs = world.directions.to(device)
    x = torch.zeros(m, cfg.d, device=device)
    x.index_add_(0, rows, values[:, None] * dirs[feats])
    if cfg.noise > 0:
        x += cfg.noise * torch.randn(m, cfg.d, generator=g, device=device)
    indptr = torch.zeros(m + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return x, (indptr.cpu(), feats.to(torch.int32).cpu(), values.cpu())


def synth(cfg: SynthConfig, progress=None) -> Path:
    """Generate the world and write it as a store with its truth beside the shards; returns the store's path."""
    from saekit.store.importer import write_rows_store

    world = make_world(cfg)
    device = torch.device(cfg.generate_on)
    # Chunks bounded so the dense (m, N) firing draw stays ~64 MB; whole pseudo-sequences per chunk.
    ctx = cfg.context_size
    m = max(ctx, CHUNK_VALUES // cfg.n_features // ctx * ctx)

    file_rows = m * -(-TRUTH_FILE_ROWS // m)  # true activations per truth file: whole chunks, ~1M rows

    def chunks(folder: Path):
        tdir = folder / TRUTH_DIR
        tdir.mkdir(parents=True, exist_ok=True)
        save_file({"directions": world.directions.contiguous(), "p": world.p.contiguous(), "parent": world.parent.contiguous()},
                  str(tdir / "features.safetensors"), metadata={"settings": json.dumps(asdict(cfg))})
        g = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        held: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def flush(upto: int) -> None:
            start = upto - sum(len(h[0]) - 1 for h in held)
            ptr = [held[0][0]]
            for ip, _, _ in held[1:]:
                ptr.append(ip[1:] + ptr[-1][-1])
            save_file({"indptr": torch.cat(ptr), "indices": torch.cat([h[1] for h in held]), "values": torch.cat([h[2] for h in held])},
                      str(tdir / f"acts-{start // file_rows:05d}.safetensors"), metadata={"row_start": str(start), "row_stop": str(upto)})
            held.clear()

        for a in range(0, cfg.rows, m):
            b = min(cfg.rows, a + m)
            x, csr = sample_rows(cfg, world, b - a, g, device)
            held.append(csr)
            if b % file_rows == 0 or b == cfg.rows:
                flush(b)
            if progress:
                progress(b, cfg.rows)
            yield {cfg.hook: x.cpu()}

    expected_l0 = float(world.p.sum())
    origin = {"kind": "synth", "settings": asdict(cfg), "truth": TRUTH_DIR, "expected_l0": expected_l0, "chunk_rows": file_rows}
    return write_rows_store(cfg.out, {cfg.hook: cfg.d}, chunks, context_size=ctx, dtype=cfg.dtype, holdout=cfg.holdout,
                            shard_tokens=max(cfg.shard_tokens, ctx), origin=origin)


def stream_batches(cfg: SynthConfig, batch_size: int, device: str | torch.device = "cpu"):
    """A training batch source of fresh rows from the world, never stored (the published benchmark's 200M samples).

    `source(start_batch)` yields {hook: (batch_size, d)}; batch i is drawn from its own seed,
    so a resumed run sees exactly the batches it would have, and no batch repeats the
    store's rows (those use generator seed `seed + 1`, these ≥ 2^40).
    """
    world = make_world(cfg)
    dev = torch.device(device)

    def source(start_batch: int = 0):
        i = start_batch
        while True:
            g = torch.Generator(device=dev).manual_seed((1 << 40) + cfg.seed * 1_000_003 + i)
            x, _ = sample_rows(cfg, world, batch_size, g, dev)
            yield {cfg.hook: x}
            i += 1

    return source


# --------------------------------------------------------------------------- reading the truth back


@dataclass
class Truth:
    """What a synthetic store knows about itself."""

    world: World
    settings: dict
    folder: Path
    chunk_rows: int

    def acts(self, start: int, stop: int) -> torch.Tensor:
        """True activations of generator rows [start, stop), dense (stop - start, N) float32 (callers keep ranges small)."""
        out = torch.zeros(stop - start, self.world.p.shape[0])
        for i in range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
            t = load_file(str(self.folder / f"acts-{i:05d}.safetensors"))
            base = i * self.chunk_rows
            lo, hi = max(start, base) - base, min(stop, base + self.chunk_rows) - base
            ip = t["indptr"]
            a, b = int(ip[lo]), int(ip[hi])
            rows = torch.repeat_interleave(torch.arange(hi - lo), ip[lo + 1 : hi + 1] - ip[lo:hi])
            out[rows + base + lo - start, t["indices"][a:b].long()] = t["values"][a:b]
        return out


def load_truth(store_path: str | Path) -> Truth:
    """The truth beside a `saekit synth` store; a SaekitError for any other store."""
    from saekit.store import read_manifest

    manifest = read_manifest(store_path)
    origin = manifest.get("origin", {})
    folder = Path(store_path) / origin.get("truth", TRUTH_DIR)
    if origin.get("kind") != "synth" or not (folder / "features.safetensors").is_file():
        raise SaekitError(f"store {store_path} has no ground truth (it was not written by `saekit synth`); "
                          "pass --truth a synthetic store")
    f = load_file(str(folder / "features.safetensors"))
    return Truth(World(f["directions"], f["p"], f["parent"]), origin.get("settings", {}), folder, int(origin["chunk_rows"]))
