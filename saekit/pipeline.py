"""The main job in one call: harvest → train (a TopK SAE and a codebook) → splice-eval → analyze.

On the built-in toy model it also scores the dictionaries against the FSM's ground truth
and ends with a short reading of those numbers.  Each stage writes its own folder under
`out` and resumes when rerun, so the pipeline does too: rerunning after a crash picks up
at the stage (and shard or checkpoint) it reached.  Every stage is timed
(`PipelineResult.timings`), so a slow run says where its time went.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from saekit.errors import SaekitError
from saekit.models import TOY_NAME


@dataclass
class PipelineConfig:
    """Everything `saekit pipeline` needs; every other setting is the stage's default."""

    model: str = TOY_NAME
    """Model: `toy`, a local Hugging Face directory or a Hub name."""
    hook: str = ""
    """Hook to train on (default: the residual stream after the middle block)."""
    data: str = ""
    """Text corpus (one document a line); default for the toy model: a generated FSM corpus."""
    out: str = "runs/demo"
    """Folder for every stage's output (store/, dicts/, eval.json, analysis/)."""
    n_seq: int = 1500
    """Sequences of toy corpus to generate when --data is not given."""
    harvest_tokens: int = 0
    """Stop harvesting after this many tokens (0: the whole corpus)."""
    train_tokens: int = 1_000_000
    """Training tokens per dictionary."""
    analyze_tokens: int = 20_000
    """Held-out tokens each dictionary's dashboard is built from (0: no dashboards)."""
    expansion: int = 4
    """Dictionary width as a multiple of the hook's width (TopK SAE)."""
    k: int = 8
    """Active latents per token of the TopK SAE."""
    codes: int = 256
    """Codes in the codebook."""
    codebook_k: int = 1
    """Codes chosen per token by the codebook (k of the k-sparse codebook)."""
    device: str = "auto"
    """Device for every stage: cpu, cuda, cuda:1, ... or auto (cuda when available)."""
    seed: int = 0
    """Seed for the corpus, batches and initialisations."""


@dataclass
class PipelineResult:
    store: Path
    dictionaries: list[Path]
    splice: dict
    recovery: dict | None
    analyses: list[Path] = field(default_factory=list)
    """One `saekit analyze` folder per dictionary (dashboard.html, density.png, features.json)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage, in order."""
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds of this process per stage (all its threads): what the stage costs on a shared machine."""
    reading: list[str] = field(default_factory=list)
    """A plain reading of the numbers (toy model only)."""
    next_steps: list[str] = field(default_factory=list)
    """Commands to try next."""


class _Clock:
    """Wall and CPU time per stage: `with clock("harvest"): ...`."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.times[name] = clock.times.get(name, 0.0) + time.perf_counter() - self.t
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - self.c

        return _Stage()


def default_hook(model: str) -> str:
    """blocks.{n_layers//2 - 1 or 0}.hook_resid_post, read from the model's config without loading it."""
    from saekit.models import resolve_model_path

    cfg = Path(resolve_model_path(model)) / "config.json"
    try:
        raw = json.loads(cfg.read_text())
        n_layers = int(raw.get("n_layer") or raw.get("num_hidden_layers"))
    except (OSError, ValueError, TypeError):
        raise SaekitError(f"cannot tell {model}'s depth to pick a hook; pass --hook blocks.L.hook_resid_post") from None
    return f"blocks.{max(n_layers // 2 - 1, 0)}.hook_resid_post"


def run_pipeline(cfg: PipelineConfig, progress: bool = True, say: Callable[[str], None] = print) -> PipelineResult:
    from saekit.harvest import HarvestConfig, harvest
    from saekit.splice import SpliceConfig, splice_eval
    from saekit.dictionaries.base import DictConfig
    from saekit.train import TrainConfig, train

    clock = _Clock()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    is_toy = cfg.model == TOY_NAME or (Path(cfg.model) / "fsm.json").is_file()
    hook = cfg.hook or default_hook(cfg.model)

    data, packing, ctx = cfg.data, "concat", 128
    if data and is_toy:
        from saekit.toy.corpus import labels_path, model_context

        if labels_path(data).is_file():  # a `saekit toy data` corpus: one walk per sequence
            packing, ctx = "doc", model_context(cfg.model)
    if not data:
        if not is_toy:
            raise SaekitError("no --data given; pass a text file (one document a line) for a model other than the toy")
        from saekit.toy.corpus import ToyDataConfig, model_context, write_corpus

        data = str(out / "toy.txt")
        ctx = model_context(cfg.model)
        if not Path(data).is_file():
            say(f"[1/5] writing a toy corpus of {cfg.n_seq} sequences → {data}")
            with clock("toy corpus"):
                write_corpus(ToyDataConfig(out=data, n_seq=cfg.n_seq, seed=cfg.seed, model=cfg.model))
        packing = "doc"

    say(f"[2/5] harvest {hook} of {cfg.model} → {out / 'store'}")
    with clock("harvest"):
        store = harvest(
            HarvestConfig(model=cfg.model, hooks=[hook], data=data, packing=packing, context_size=ctx, tokens=cfg.harvest_tokens,
                          out=str(out / "store"), device=cfg.device, seed=cfg.seed),
            progress=progress,
        )

    say(f"[3/5] train a TopK SAE (k={cfg.k}, {cfg.expansion}× wide) and a codebook ({cfg.codes} codes, k={cfg.codebook_k}), "
        f"{cfg.train_tokens:,} tokens each")
    common = dict(store=str(store), hooks=[hook], out=str(out / "dicts"), tokens=cfg.train_tokens,
                  seed=cfg.seed, device=cfg.device, resume=True)
    with clock("train topk"):
        dicts = train(TrainConfig(arch=DictConfig(kind="topk"), k=[cfg.k], expansion=cfg.expansion, **common), progress=progress)
    with clock("train codebook"):
        dicts += train(TrainConfig(arch=DictConfig(kind="codebook", d_dict=cfg.codes), k=[cfg.codebook_k], **common), progress=progress)

    say("[4/5] splice-eval on the store's held-out sequences")
    with clock("splice-eval"):
        result = splice_eval(SpliceConfig(model=cfg.model, dicts=[str(d) for d in dicts], store=str(store),
                                          json_out=str(out / "eval.json"), device=cfg.device))
    recovery = None
    if is_toy and packing == "doc":
        from saekit.toy.eval import state_recovery, write_json

        with clock("toy eval"):
            rec = state_recovery([str(d) for d in dicts], str(store))
            write_json(rec, str(out / "toy_eval.json"))
        recovery = rec.to_dict()

    analyses: list[Path] = []
    if cfg.analyze_tokens:
        from saekit.analysis.analyze import AnalyzeConfig, analyze

        say(f"[5/5] analyze each dictionary on {cfg.analyze_tokens:,} held-out tokens: dashboards and density plots")
        with clock("analyze"):
            for d in dicts:
                dest = out / "analysis" / Path(d).name
                analyses.append(analyze(AnalyzeConfig(dict=str(d), store=str(store), out=str(dest), split="eval",
                                                      tokens=cfg.analyze_tokens, device=cfg.device)))
    res = PipelineResult(store, dicts, result, recovery, analyses, clock.times, clock.cpu)
    metas = [json.loads((a / "features.json").read_text()) for a in analyses]
    if recovery is not None and metas:
        res.reading = reading(recovery, metas, result)
    res.next_steps = next_steps(cfg, res, metas)
    return res


# --- what the numbers say ---------------------------------------------------------------------------


def digit_purity(meta: dict, min_contexts: int = 5) -> dict[int, float]:
    """Feature index → the share of its top contexts whose firing token is its most common one (features with
    at least `min_contexts` top contexts)."""
    out = {}
    for f in meta["features"]:
        centres = [c["tokens"][c["center"]] for c in f["contexts"] if c["tokens"]]
        if len(centres) >= min_contexts:
            out[f["index"]] = Counter(centres).most_common(1)[0][1] / len(centres)
    return out


GOOD = 0.9


def reading(recovery: dict, metas: list[dict], splice: dict | None = None) -> list[str]:
    """A few sentences on the toy run, every number measured in this run.

    From toy eval: each state's best feature (F1).  From the dashboards' pass (features.json):
    a *state detector* fires where its state was just completed and nowhere else (F1 ≥ 0.9); a
    *broad* feature catches ≥ 90% of one state's completions but fewer than half of its firings
    are that state; digit purity says whether it fires on one digit (the state's last) regardless.
    From splice-eval (`splice`, optional): FVU and loss recovered, to say whether an SAE whose
    state F1 is no better than a raw neuron's reconstructs badly or only answers another question.
    """
    by_kind = {d["kind"]: d for d in recovery.get("dictionaries", [])}
    lines = []
    cb, sae = by_kind.get("codebook"), next((by_kind[k] for k in ("topk", "batchtopk", "relu") if k in by_kind), None)
    if cb and sae:
        lines.append(
            f"FSM states: the best codebook code per state reaches mean F1 {cb['mean_best_f1']:.2f} "
            f"({cb['share_states_f1_ge_0.9']:.0%} of states ≥ {GOOD}), the best {sae['kind']} latent {sae['mean_best_f1']:.2f} "
            f"({sae['share_states_f1_ge_0.9']:.0%}), the best single neuron {recovery['neuron_mean_best_f1']:.2f}.")
    for m in metas:
        live = [f for f in m["features"] if f.get("fsm_state", -1) >= 0]
        if not live:
            continue
        det = [f for f in live if f["fsm_f1"] >= GOOD]
        broad = [f for f in live if f.get("fsm_recall", 0) >= GOOD and f.get("fsm_precision", 1) < 0.5]
        pur = digit_purity(m)
        judged = [f for f in broad if f["index"] in pur]
        one_digit = sum(pur[f["index"]] >= GOOD for f in judged)
        line = (f"{m['kind']} ({len(live)} of {m['d_dict']} features fired): {len(det)} are state detectors (F1 ≥ {GOOD}, "
                f"{len({f['fsm_state'] for f in det})} distinct states); {len(broad)} catch ≥ 90% of a state's completions "
                "but fewer than half of their firings are that state")
        if judged:
            line += f", and {one_digit} of those {len(judged)} fire on a single digit in ≥ 90% of their top contexts"
        lines.append(line + ".")
    if sae and sae["mean_best_f1"] < recovery["neuron_mean_best_f1"] + 0.1:
        lines.append(_sae_like_a_neuron(sae, cb, recovery["neuron_mean_best_f1"], splice))
    if cb and sae:
        better = cb["mean_best_f1"] > sae["mean_best_f1"]
        lines.append(
            ("Why (our reading of these numbers): " if better else "Here, unlike the usual outcome, the codebook does not win; ") +
            "a codebook with k=1 rebuilds each activation from one code, so a code has to stand for a whole state; "
            f"the {sae['kind']} SAE sums several latents per token, and parts shared across states (which digit ends the "
            "state) reconstruct as well at lower cost, so many of its latents come out digit-level.")
    return lines


def _sae_like_a_neuron(sae: dict, cb: dict | None, neuron: float, splice: dict | None) -> str:
    """Why an SAE's best latent per state scores about a raw neuron: state F1 asks one unit to be one state."""
    line = (f"The {sae['kind']} SAE's best latent per state scores about the best raw neuron ({sae['mean_best_f1']:.2f} vs {neuron:.2f}): "
            "state F1 rewards a unit that fires for one state and no other, and a latent (or neuron) that fires on a digit shared by "
            "many states has low precision for each of them")
    rows = {Path(r["dict"]).name: r for r in (splice or {}).get("dictionaries", [])}
    mine, theirs = rows.get(Path(sae.get("path", "")).name), rows.get(Path(cb.get("path", "")).name) if cb else None
    if mine and theirs:
        fits = "better" if mine["fvu"] < theirs["fvu"] else "worse"
        line += (f". It is not a failed fit: it reconstructs {fits} than the codebook (FVU {mine['fvu']:.3f} vs {theirs['fvu']:.3f}, "
                 f"loss recovered against mean ablation {mine['loss_recovered_mean']:.2f} vs {theirs['loss_recovered_mean']:.2f})")
    return line + "."


def next_steps(cfg: PipelineConfig, res: PipelineResult, metas: list[dict]) -> list[str]:
    """`next:` lines: commands that continue from this run's own files."""
    steps = []
    for a in res.analyses:
        steps.append(f"open {a / 'dashboard.html'}   (features, contexts, histograms; density: {a / 'density.png'})")
    cb = next((m for m in metas if m["kind"] == "codebook" and m.get("fsm")), None)
    if cb is not None:
        best = max(cb["features"], key=lambda f: f.get("fsm_f1", 0.0))
        if best.get("fsm_f1", 0) > 0:
            prompt = "0123"
            try:  # a legal two-state walk, so only the steering breaks the FSM's rules
                from saekit.toy.fsm import load_fsm

                fsm = load_fsm(cfg.model)
                prompt = "".join(f"{s:0{fsm.digits}d}" for s in (0, int(fsm.successors[0][0])))
            except SaekitError:
                pass
            steps.append(f"saekit steer --dict {cb['dictionary']} --feature {best['id']} --strength 1 --samples 8 --prompt {prompt}   "
                         f"(code {best['id']} tracks state {best['fsm_state']}, F1 {best['fsm_f1']:.2f})")
    steps.append(f"saekit splice-eval --model {cfg.model} --store {res.store} --dict {res.dictionaries[0]}   (again, or on your own dictionaries)")
    steps.append("saekit pipeline --model DIR --data FILE --out runs/mine   (your model and text; `saekit --help` lists every stage)")
    return steps
