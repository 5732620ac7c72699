"""Code interventions on the toy FSM model (after the Codebook Features tokFSM tutorial).

Take two walks that end in different states A and B.  Run the walk ending in A, but at
the chosen layers replace the dictionary codes at the positions of its last state by the
codes the walk ending in B has at the same positions.  If the dictionaries hold the state
in their codes, the model now continues as if it were in B:

- success rate: share of pairs where the model's (greedy) next state is a valid successor
  of B and not of A — only possible if the patched codes carried B's identity;
- token success rate: the same one token ahead (the next digit starts a successor of B
  and no successor of A).  It can be much higher than the state-level rate: the state's
  second digit is predicted at a new position whose attention reads A's own tokens below
  the patched layer, so a patch at one position set cannot move it completely;
- JS divergence between the patched next-token distribution and B's clean one.

The patch edits codes, not raw activations: at each patched position
`x' = x − decode(c_A) + decode(c_B)` (`error="keep"`: what the dictionary does not explain
in A is kept, so only the coded part changes) or `x' = decode(c_B)` (`error="drop"`: the
activation becomes the reconstruction from B's codes, as in a model whose layers are
codebooks, the setting of the paper).  With several layers the patches apply in one
forward, so a later layer's A-codes already see the earlier patches, while B's codes come
from B's clean run.  Baselines printed beside: the clean A run (success should be ≈ 0)
and the clean B run (the ceiling).

With a codebook model (`--codebook-model`, a `saekit finetune --out` folder) the
intervention is the paper's own (its TokFSM tutorial): the model runs with ALL its
codebooks in the forward pass, and at the chosen sites (`--patch`: attn[0], mlp[1],
attn, mlp, all, ...) A's code ids are overwritten by B's.  Where (`--positions`): by
default at both digits of A's last state (`state`), because a state is written as two
tokens and the next state's second digit is predicted at a new position that attends to
both; patching only the final token (`final`, the tutorial's setting) leaves A's first
digit for that position to read, so the first digit follows B and the second often A.
`generated` also patches every generated position with the codes it has after B's prompt
(followed by the same generated tokens): the site then carries B's context throughout,
which with `all` sites reproduces clean B by construction (a check, not evidence).  Reported per patching, beside the clean A
floor and the clean B ceiling: JS divergence of the final next-token distribution from
clean B's, normalised by clean A's (1 = no effect, 0 = exactly B); top-out_degree
next-state accuracy (the share of the 10 most likely next states that are successors of
B); and the greedy state-level success rate above.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from saekit.errors import SaekitError
from saekit.metrics import js_per_token
from saekit.runs import write_json
from saekit.models import capture, hook_layer


@dataclass
class InterveneConfig:
    """What `saekit intervene` patches and measures."""

    dicts: list[str] = field(default_factory=list)
    """Dictionary folders trained on hooks of the toy model, comma-separated."""
    model: str = "toy"
    """The toy model (a directory with fsm.json, or `toy` for the built-in one)."""
    layers: list[int] = field(default_factory=list)
    """Layers to patch, comma-separated (default: every layer a dictionary is given for)."""
    pairs: int = 64
    """Number of (A, B) walk pairs."""
    states: int = 4
    """States per walk (the last is the one patched)."""
    error: str = "keep"
    """keep: change only the codes, keeping A's reconstruction error; drop: use B's reconstruction."""
    seed: int = 0
    """Seed for drawing the walks."""
    out: str | None = None
    """Write the result as JSON here."""
    codebook_model: str = ""
    """A `saekit finetune --out` folder (or the shipped toy-codebooks / toy-paper): run it with ALL its codebooks and patch code ids (the paper's intervention) instead of --dicts."""
    patch: list[str] = field(default_factory=list)
    """Codebook model: sites patched together, one entry per row, comma-separated: attn[L], mlp[L], attn, mlp, all, or a hook, joined with '+' (default: the tutorial's attn[0],mlp[1],attn,mlp,all)."""
    disjoint: bool = False
    """Draw only pairs whose last states A and B share no successor, so every next state is decidably B's or A's (by default a shared one counts as a failure, which caps even clean B near 90% on the paper's FSM)."""
    positions: str = "state"
    """Codebook model: where B's code ids go: state (both digits of A's last state), final (its final token, the paper's tutorial) or generated (the last state and every generated position)."""
    device: str = "auto"
    """Device for the codebook model: cpu, cuda, cuda:1, ... or auto (cuda when available)."""

    def __post_init__(self):
        if self.error not in ("keep", "drop"):
            raise ValueError(f"error {self.error!r} is not keep or drop")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions {self.positions!r} is not state, final or generated")
        if self.pairs < 1 or self.states < 1:
            raise ValueError("pairs and states must be >= 1")


@dataclass
class InterventionResult:
    """Rates over `n_pairs` (A, B) pairs at the patched `layers`."""

    layers: list[int]
    hooks: list[str]
    n_pairs: int
    success_rate: float
    """Patched run's next state ∈ succ(B) and ∉ succ(A)."""
    js: float
    """Mean JS divergence (nats) of the patched next-token distribution from B's clean one."""
    clean_a_success: float
    """The same criterion on the unpatched A run (the floor)."""
    clean_b_success: float
    """The same criterion on the clean B run (the ceiling)."""
    clean_a_js: float
    """Mean JS divergence of A's clean distribution from B's (what the patch must close)."""
    error: str
    token_success_rate: float = float("nan")
    """Patched run's next token starts a successor of B and starts no successor of A."""
    clean_a_token_success: float = float("nan")
    clean_b_token_success: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


PATCHINGS = ("attn[0]", "mlp[1]", "attn", "mlp", "all")
"""The tutorial's patchings: layer-0 attention, layer-1 MLP, all attention, all MLP, all codebooks."""


def make_pairs(fsm, n_pairs: int, n_states: int = 4, seed: int = 0, disjoint: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_a, tokens_b), each (n_pairs, 1 + digits·n_states): BOS + a walk ending on a complete state.

    Pairs are kept only when succ(B) \\ succ(A) is non-empty (otherwise success is impossible);
    with `disjoint` only when A and B share no successor.  Where they share some, a next state in
    both sets counts as neither success nor "stays", so even the clean B run succeeds only where
    its own next state is not also A's (on the paper's FSM, 10 of 100 states follow each state:
    clean B's rate sits near 90% for that reason alone).  Disjoint pairs make every greedy next
    state decidable, so the ceiling is the model's own accuracy.
    """
    from saekit.toy.fsm import BOS_ID

    rng = np.random.default_rng(seed)
    valid = fsm.valid_mask()
    digs = fsm.state_digits()
    out_a, out_b = [], []
    tries = 0
    while len(out_a) < n_pairs:
        tries += 1
        if tries > 100 * n_pairs:
            raise SaekitError("cannot find state pairs with distinct successors in this FSM; it is too small for interventions")
        walks = []
        for _ in range(2):
            w = [int(rng.integers(fsm.n_states))]
            for _ in range(n_states - 1):
                w.append(int(fsm.successors[w[-1], rng.integers(fsm.out_degree)]))
            walks.append(w)
        a, b = walks[0][-1], walks[1][-1]
        if a == b or not (valid[b] & ~valid[a]).any() or (disjoint and (valid[b] & valid[a]).any()):
            continue
        for w, out in zip(walks, (out_a, out_b)):
            out.append(np.concatenate([[BOS_ID], digs[w].reshape(-1)]))
    return np.stack(out_a), np.stack(out_b)


def last_states(fsm, tokens: np.ndarray) -> np.ndarray:
    """The state written by the last `digits` tokens of each row."""
    powers = 10 ** np.arange(fsm.digits - 1, -1, -1)
    return (np.asarray(tokens)[:, -fsm.digits:] * powers).sum(-1)


def _patch_fn(d, cb: torch.Tensor, positions: slice, error: str):
    """Hook function replacing the codes at `positions` by `cb` (n, p, d_dict)."""

    def fn(act, hook=None):
        shape = act.shape
        x = act.reshape(shape[0], shape[1], -1).clone()
        xa = x[:, positions]  # (n, p, w)
        n, p, w = xa.shape
        new_b = d.decode(cb.reshape(n * p, -1).to(xa)).reshape(n, p, w)
        if error == "keep":
            ca = d.encode(xa.reshape(n * p, w))
            new = xa + new_b - d.decode(ca).reshape(n, p, w)
        else:
            new = new_b
        x[:, positions] = new.to(x.dtype)
        return x.reshape(shape)

    return fn


@torch.no_grad()
def intervene(model, dicts, fsm, layers: list[int] | None = None, *, n_pairs: int = 64, n_states: int = 4,
              error: str = "keep", seed: int = 0, disjoint: bool = False, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> InterventionResult:
    """Patch B's codes into A at the dictionaries whose hooks are in `layers` (all when None).

    model: a LoadedModel of the toy model; dicts: dictionaries (a list or {hook: dict}),
    each trained on one hook of that model; fsm: its FSM (`saekit.toy.fsm.load_fsm`).
    """
    if error not in ("keep", "drop"):
        raise SaekitError(f"error={error!r}: use keep (patch codes, keep A's residual error) or drop (use B's reconstruction)")
    dlist = list(dicts.values()) if isinstance(dicts, dict) else list(dicts)
    if not dlist:
        raise SaekitError("no dictionaries given to patch; pass at least one trained on the toy model")
    if layers is not None:
        have = sorted({hook_layer(d.prov.hook) for d in dlist})
        missing = [l for l in layers if l not in have]
        if missing:
            raise SaekitError(f"no dictionary at layer(s) {missing}; the dictionaries given are at layers {have}")
        dlist = [d for d in dlist if hook_layer(d.prov.hook) in layers]
    from saekit.analysis.steer import check_model

    for d in dlist:
        check_model(d, model)
    hooks = [d.prov.hook for d in dlist]
    if len(set(hooks)) != len(hooks):
        raise SaekitError(f"two dictionaries for the same hook ({hooks}); pass one per hook")
    bridge = model.bridge
    device = next(bridge.parameters()).device
    ta, tb = pairs if pairs is not None else make_pairs(fsm, n_pairs, n_states, seed, disjoint)
    if ta.shape[1] > model.info.n_ctx:
        raise SaekitError(f"walks of {n_states} states do not fit the model's context ({model.info.n_ctx}); use fewer states")
    A = torch.as_tensor(ta, device=device).long()
    B = torch.as_tensor(tb, device=device).long()
    T = A.shape[1]
    pos = slice(T - fsm.digits, T)  # the last state's digits

    acts_b = capture(bridge, B, hooks)
    fns = [(d.prov.hook, _patch_fn(d, d.encode(acts_b[d.prov.hook][:, pos].reshape(-1, d.cfg.d_in)), pos, error)) for d in dlist]

    def next_state(tokens, fwd):
        """Greedy-decode one state (digits tokens) with hooks `fwd`; also the first next-token logits."""
        seq, first = tokens, None
        with bridge.hooks(fwd_hooks=fwd):
            for _ in range(fsm.digits):
                logits = bridge(seq)[:, -1].float()
                first = logits if first is None else first
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        return last_states(fsm, seq[:, T:].cpu().numpy()), first

    s_patch, l_patch = next_state(A, fns)
    s_a, l_a = next_state(A, [])
    s_b, l_b = next_state(B, [])
    valid = fsm.valid_mask()
    a_state, b_state = last_states(fsm, ta), last_states(fsm, tb)

    def rate(s):
        s = np.asarray(s)
        ok = s < fsm.n_states  # digits may spell a number that is no state
        sc = np.clip(s, 0, fsm.n_states - 1)
        hit = valid[b_state, sc] & ~valid[a_state, sc]
        return float((hit & ok).mean())

    digs = fsm.state_digits()
    first_b = np.zeros((len(ta), 10), bool)
    first_a = np.zeros((len(ta), 10), bool)
    for i in range(len(ta)):
        first_b[i, digs[fsm.successors[b_state[i]], 0]] = True
        first_a[i, digs[fsm.successors[a_state[i]], 0]] = True

    def token_rate(logits):
        t = logits.argmax(-1).cpu().numpy()
        ok = t < 10
        tc = np.clip(t, 0, 9)
        rows = np.arange(len(t))
        return float((ok & first_b[rows, tc] & ~first_a[rows, tc]).mean())

    return InterventionResult(
        layers=sorted({hook_layer(h) for h in hooks}), hooks=hooks, n_pairs=len(ta),
        success_rate=rate(s_patch), js=js_per_token(l_patch, l_b).mean().item(),
        clean_a_success=rate(s_a), clean_b_success=rate(s_b), clean_a_js=js_per_token(l_a, l_b).mean().item(), error=error,
        token_success_rate=token_rate(l_patch), clean_a_token_success=token_rate(l_a), clean_b_token_success=token_rate(l_b),
    )


# --- the paper's intervention: all codebooks in the forward pass, code ids patched --------------------


@dataclass
class PatchRow:
    """One patching (or a clean run) over all pairs."""

    name: str
    hooks: list[str]
    js: float
    """Mean JS divergence (nats) of the final next-token distribution from clean B's."""
    js_normalised: float
    """js / clean A's js: 1 = no effect, 0 = exactly B."""
    top_accuracy: float
    """Share of the out_degree most likely next states that are successors of B."""
    success_rate: float
    """Greedy next state ∈ succ(B) and ∉ succ(A)."""
    stays_rate: float = float("nan")
    """Greedy next state ∈ succ(A) and ∉ succ(B): the model still continues from A."""
    success_of_ceiling: float = float("nan")
    """success_rate / clean B's success_rate (the share of what the model itself gets right)."""


@dataclass
class CodebookInterventionResult:
    """`saekit intervene --codebook-model`: the tutorial's patchings, with the clean floor (A) and ceiling (B)."""

    rows: list[PatchRow]
    clean_a: PatchRow
    clean_b: PatchRow
    n_pairs: int
    positions: str
    states: int
    disjoint: bool = False
    """Pairs drawn with no shared successor (`make_pairs`)."""

    def to_dict(self) -> dict:
        return asdict(self)


POSITIONS = ("state", "final", "generated")
"""Where B's code ids are written (default first):
state: both digits of A's last state (A's prompt then reads as B at every position of the current state);
final: A's final token only (the paper's tutorial);
generated: the last state and every generated position, each with the codes it has after B's prompt
followed by the same generated tokens (the site carries B's context all the way)."""


@torch.no_grad()
def codebook_intervention(cbm, fsm, patchings: list[str] | tuple[str, ...] = PATCHINGS, *, n_pairs: int = 64, n_states: int = 1,
                          positions: str = "state", seed: int = 0, disjoint: bool = False,
                          pairs: tuple[np.ndarray, np.ndarray] | None = None) -> CodebookInterventionResult:
    """Patch B's code ids into A at each patching's codebooks, with every codebook of `cbm` (a CodebookModel) active.

    positions: one of POSITIONS.  Success is always read from the greedy continuation of the
    patched run: its next state must be a successor of B and not of A.
    """
    from saekit.analysis.codebook_model import Patch, resolve_patch_sites
    from saekit.toy.eval import next_state_logprobs, successor_overlap

    if positions not in POSITIONS:
        raise SaekitError(f"positions={positions!r}: use state (both digits of the last state), final (the final token, as the paper's "
                          "tutorial) or generated (the last state and every generated position)")
    sites = [(p, resolve_patch_sites(p, cbm.hooks)) for p in patchings]
    ta, tb = pairs if pairs is not None else make_pairs(fsm, n_pairs, n_states, seed, disjoint)
    if ta.shape != tb.shape:
        raise SaekitError("A and B walks must have the same length")
    A, B = torch.as_tensor(ta).long(), torch.as_tensor(tb).long()
    n, T = A.shape
    span = 1 if positions == "final" else fsm.digits
    logits_b, rec_b = cbm.run(B, record=True)
    final_b = logits_b[:, -1].float().cpu()
    a_state, b_state = last_states(fsm, ta), last_states(fsm, tb)
    valid = fsm.valid_mask()

    def patches_for(tokens: torch.Tensor, hooks: list[str]) -> dict:
        """B's codes at the patched positions of `tokens` (n, L): A's prompt, then tokens generated (or teacher-forced) after it."""
        L = tokens.shape[1]
        codes = rec_b.codes
        if positions == "generated" and L > T:  # the codes each new token has after B's prompt instead of A's
            codes = cbm.run(torch.cat([B, tokens[:, T:].cpu()], 1), record=True)[1].codes
        end = L if positions == "generated" else T
        pos = torch.arange(T - span, end).expand(n, end - T + span)
        out = {}
        for h in hooks:
            c = codes[h]
            out[h] = Patch(pos, c[torch.arange(n, device=c.device)[:, None], pos.to(c.device)])
        return out

    def measure(name: str, hooks: list[str], tokens: torch.Tensor) -> PatchRow:
        run = lambda t: cbm.run(t, patches=patches_for(t, hooks) if hooks else None)[0]  # noqa: E731
        final = run(tokens)[:, -1].float().cpu()
        js = js_per_token(final, final_b).mean().item()
        top = float(successor_overlap(next_state_logprobs(run, tokens, fsm), b_state, fsm).mean())
        seq = tokens
        for _ in range(fsm.digits):  # greedy, the patches recomputed for every new position
            seq = torch.cat([seq, run(seq)[:, -1].argmax(-1, keepdim=True).cpu()], 1)
        s = last_states(fsm, seq[:, T:].numpy())
        ok = s < fsm.n_states  # digits may spell a number that is no state
        sc = np.clip(s, 0, fsm.n_states - 1)
        success = float((ok & valid[b_state, sc] & ~valid[a_state, sc]).mean())
        stays = float((ok & valid[a_state, sc] & ~valid[b_state, sc]).mean())
        return PatchRow(name, hooks, js, float("nan"), top, success, stays)

    clean_a = measure("clean A (floor)", [], A)
    clean_b = measure("clean B (ceiling)", [], B)
    rows = [measure(name, hooks, A) for name, hooks in sites]
    for r in (clean_a, clean_b, *rows):
        r.js_normalised = r.js / clean_a.js if clean_a.js > 0 else float("nan")
        r.success_of_ceiling = r.success_rate / clean_b.success_rate if clean_b.success_rate > 0 else float("nan")
    return CodebookInterventionResult(rows, clean_a, clean_b, n, positions, n_states, disjoint and pairs is None)


def run_codebook_intervention(cfg: InterveneConfig) -> CodebookInterventionResult:
    """Load the codebook model and its FSM, run the patchings, and optionally write JSON."""
    from saekit.analysis.codebook_model import CodebookModel
    from saekit.toy.fsm import load_fsm

    if cfg.dicts:
        raise SaekitError("give either --dicts (patch activations) or --codebook-model (patch code ids with all codebooks active), not both")
    cbm = CodebookModel.load(cfg.codebook_model, device=cfg.device)
    fsm = load_fsm(cbm.path)
    res = codebook_intervention(cbm, fsm, cfg.patch or PATCHINGS, n_pairs=cfg.pairs, n_states=cfg.states, positions=cfg.positions, seed=cfg.seed,
                                disjoint=cfg.disjoint)
    if cfg.out:
        write_json(Path(cfg.out), res.to_dict())
    return res


def run_intervention(cfg: InterveneConfig) -> InterventionResult:
    """Load the toy model, its FSM and the dictionaries, patch, and optionally write JSON."""
    from saekit.interop import load as load_dict
    from saekit.models import load_model
    from saekit.toy.fsm import load_fsm

    if cfg.dicts and cfg.codebook_model:
        raise SaekitError("give either --dicts (patch activations) or --codebook-model (patch code ids with all codebooks active), not both")
    if not cfg.dicts:
        raise SaekitError("no dictionaries; pass --dicts DIR[,DIR...] trained on the toy model's hooks")
    fsm = load_fsm(cfg.model)
    lm = load_model(cfg.model)
    dicts = [load_dict(p) for p in cfg.dicts]
    res = intervene(lm, dicts, fsm, cfg.layers or None, n_pairs=cfg.pairs, n_states=cfg.states, error=cfg.error, seed=cfg.seed,
                    disjoint=cfg.disjoint)
    if cfg.out:
        p = Path(cfg.out)
        write_json(p, res.to_dict())
    return res
