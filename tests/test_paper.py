"""Codebook Features' own objective (issue 18): the LM loss reaches the codes, LayerNorm'd inputs, every-layer
k = 1 codebooks trained with the model from scratch, the paper presets, and the commitment drift."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saekit.config import from_flags
import torch

from saekit.dictionaries import DictConfig
from saekit.dictionaries.codebook import Codebook, group_layer_norm
from saekit.inmodel import finetune as ft
from saekit.inmodel.codebooks import InModelCodebook, build_codebook, parse_spec, reconstruction
from saekit.inmodel.finetune import PAPER_CODEBOOKS, FinetuneConfig, finetune, with_preset
from saekit.interop import load
from saekit.toy import train as toy_train
from saekit.toy.fsm import FSM, generate

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the codebook layer ----------------------------------------------------------------------------

def _layer(objective: str, input_norm: str = "scale", groups: int = 2, seed: int = 0) -> InModelCodebook:
    cfg = DictConfig(kind="codebook", d_in=8, d_dict=groups * 6, k=1, groups=groups, input_norm=input_norm)
    d = Codebook(cfg)
    with torch.no_grad():
        d.codebook.copy_(torch.randn(d.codebook.shape, generator=torch.Generator().manual_seed(seed)))
    return InModelCodebook(d, objective)


@pytest.mark.parametrize("input_norm", ["scale", "layernorm"])
def test_lm_gradient_reaches_the_chosen_codes_only_with_the_paper_objective(input_norm):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(2, 5, 8)
    grads = {}
    for objective in ("paper", "commit"):
        layer = _layer(objective, input_norm)
        out = layer(x)
        (out * w).sum().backward()  # a stand-in for the LM loss, without the codebook's own term
        grads[objective] = layer.d.codebook.grad
        x.grad = None
    g = grads["paper"]
    assert g is not None and g.abs().sum() > 0
    fired = layer.last_fired.view(g.shape[:2]) > 0
    assert torch.all(g[~fired] == 0)  # only the chosen codes get the LM gradient
    assert torch.all(g[fired].abs().sum(-1) > 0)
    assert grads["commit"] is None or torch.all(grads["commit"] == 0)  # the old objective: the output is detached


def test_paper_layer_outputs_the_codes_and_passes_the_gradient_straight_through():
    torch.manual_seed(0)
    layer = _layer("paper", "layernorm")
    x = torch.randn(1, 4, 8, requires_grad=True)
    out = layer(x)
    d = layer.d
    codes = d.decode(d.encode(x.detach().reshape(-1, 8))).view(1, 4, 8)
    assert torch.allclose(out, codes, atol=1e-6)  # the activation IS the chosen code vectors (LayerNorm space)
    w = torch.randn(1, 4, 8)
    (out * w).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)  # straight-through: ∂/∂x of <LN(x), w>
    (group_layer_norm(x2.view(-1, 8), d.ln_weight, d.ln_bias).view(1, 4, 8) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_reconstruction_term_is_the_summed_squared_error_to_the_codes_only():
    x_in = torch.randn(6, 4, requires_grad=True)
    x_hat = torch.randn(6, 4, requires_grad=True)
    reconstruction(x_hat, x_in).mean().backward()
    assert x_in.grad is None or torch.all(x_in.grad == 0)
    assert torch.allclose(x_hat.grad, 2 * (x_hat - x_in).detach() / 6)


@pytest.mark.parametrize("objective", ["paper", "commit"])
def test_fvu_is_the_reconstruction_term_without_the_inputs_scale(objective):
    """A LayerNorm gain that grows c× (with codes that follow it) multiplies the term by c² and leaves the FVU as it was."""
    from saekit import metrics

    torch.manual_seed(0)
    layer = _layer(objective, "layernorm", groups=1)
    x = torch.randn(2, 16, 8)
    layer(x)
    term, fvu = float(layer.last_commit), float(layer.last_fvu)
    d = layer.d
    x_in = group_layer_norm(x.reshape(-1, 8), d.ln_weight, d.ln_bias).detach()
    assert fvu == pytest.approx(metrics.fvu(x_in, d.decode(d.encode(x.reshape(-1, 8))).detach()), rel=1e-4)
    with torch.no_grad():
        for p in (d.ln_weight, d.ln_bias, d.codebook):
            p.mul_(3.0)
    layer(x)
    assert float(layer.last_commit) == pytest.approx(9 * term, rel=1e-4)
    assert float(layer.last_fvu) == pytest.approx(fvu, rel=1e-4)


def test_layernorm_codebook_saves_and_loads_with_its_norm(tmp_path):
    layer = _layer("paper", "layernorm")
    with torch.no_grad():
        layer.d.ln_weight.uniform_(0.5, 2.0)
        layer.d.ln_bias.normal_()
    x = torch.randn(9, 8)
    back = load(layer.d.save(tmp_path / "cb"))
    assert back.cfg.input_norm == "layernorm"
    assert torch.equal(back.encode(x), layer.d.encode(x))
    assert torch.allclose(back.decode(back.encode(x)), layer.d.decode(layer.d.encode(x)))


# --- presets --------------------------------------------------------------------------------------

def test_toy_paper_preset_builds_the_papers_model_and_fsm():
    cfg = toy_train.with_preset(toy_train.ToyTrainConfig(preset="paper", out="x"))
    model = toy_train.build_model(cfg)
    c = model.config
    assert type(model).__name__ == "GPTNeoXForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (4, 128, 512, 4)
    assert c.max_position_embeddings == 128 and c.vocab_size == 11
    assert c.rope_parameters["partial_rotary_factor"] == 0.25
    fsm = toy_train.make_fsm(cfg)
    assert (fsm.n_states, fsm.out_degree, fsm.digits, fsm.seed) == (100, 10, 2, 42)
    # what the user sets wins over the preset; no preset keeps today's defaults
    assert toy_train.with_preset(from_flags(toy_train.ToyTrainConfig, preset="paper", n_layer=2)).lm.n_layer == 2
    assert toy_train.with_preset(toy_train.ToyTrainConfig()).arch == "gpt2"
    with pytest.raises(ValueError, match="preset"):
        toy_train.ToyTrainConfig(preset="papr")


def test_finetune_paper_preset_puts_k1_codebooks_of_1000_codes_at_every_layer():
    cfg = with_preset(FinetuneConfig(preset="paper", batch_size=64))
    assert (cfg.objective, cfg.input_norm, cfg.code_init, cfg.lr, cfg.codebook_lr) == ("paper", "layernorm", "normal", 1e-3, 1e-3)
    assert cfg.codebook_weight_decay == 0.01 and cfg.batch_size == 64 and not cfg.skip_bos
    specs = parse_spec(cfg.codebooks, 4)
    assert [s.hook for s in specs] == [f"blocks.{i}.attn.hook_z" for i in range(4)] + [f"blocks.{i}.hook_mlp_out" for i in range(4)]
    attn = build_codebook(specs[0], [4, 32], input_norm=cfg.input_norm)
    mlp = build_codebook(specs[4], [128], input_norm=cfg.input_norm)
    assert (attn.cfg.groups, attn.cfg.d_dict, attn.cfg.k, tuple(attn.codebook.shape)) == (4, 4000, 1, (4, 1000, 32))
    assert (mlp.cfg.groups, mlp.cfg.d_dict, mlp.cfg.k, tuple(mlp.codebook.shape)) == (1, 1000, 1, (1, 1000, 128))
    assert tuple(attn.ln_weight.shape) == (4, 32)
    assert FinetuneConfig().objective == "commit" and with_preset(FinetuneConfig()) == FinetuneConfig()
    assert with_preset(FinetuneConfig(preset="paper")).codebooks == PAPER_CODEBOOKS
    assert with_preset(FinetuneConfig(preset="paper", codebooks="mlp:k=2")).codebooks == "mlp:k=2"  # the user's value wins


# --- a tiny FSM model trained from scratch with codebooks at every layer --------------------------------

@pytest.fixture(scope="module")
def tiny_fsm(tmp_path_factory):
    """A 2-layer GPT-NeoX on a 12-state two-digit FSM, its training text and held-out labelled walks."""
    root = tmp_path_factory.mktemp("fsm")
    cfg = from_flags(toy_train.ToyTrainConfig, out=str(root / "model"), arch="gpt-neox", n_states=12, out_degree=3, digits=2, fsm_seed=3,
                                   n_layer=2, d_model=32, n_head=2, d_mlp=64, ctx=33, steps=1, eval_seqs=4, batch_size=2)
    model_dir, _ = toy_train.train_toy(cfg)
    fsm = toy_train.make_fsm(cfg)
    tokens, _ = generate(fsm, 3000, 33, seed=[5])
    (root / "train.txt").write_text("".join("".join(str(t) for t in row[1:]) + "\n" for row in tokens))
    return str(model_dir), str(root / "train.txt"), fsm, root


def _codes_at(model_dir: str, cb_dirs: list, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Chosen code id (group 0) per token at each codebook, with every codebook in the forward pass."""
    from saekit.inmodel.model import load_in_model, spliced_logits
    from saekit.inmodel.sites import Splicer

    dicts = {d.prov.hook: d for d in (load(p) for p in cb_dirs)}
    im = load_in_model(model_dir, list(dicts), torch.device("cpu"))
    seen: dict[str, np.ndarray] = {}

    def keep(h: str, layer: InModelCodebook):
        def fn(x):
            seen[h] = layer.d.encode(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1).argmax(-1).numpy()
            return layer(x)

        return fn

    fns = {h: keep(h, InModelCodebook(d, "paper")) for h, d in dicts.items()}
    with torch.no_grad(), Splicer(im.hf, list(im.sites.values())).active(fns):
        im.hf(input_ids=torch.as_tensor(tokens, dtype=torch.long))
    return seen


def _mean_best_f1(codes: np.ndarray, state: np.ndarray, where: np.ndarray) -> float:
    """For every state, the best F1 of any single code as a detector of 'this state was just completed'."""
    c, s = codes[where], state[where]
    f1s = []
    for st in np.unique(s):
        pos = s == st
        best = 0.0
        for code in np.unique(c[pos]):
            fired = c == code
            tp = float((fired & pos).sum())
            best = max(best, 2 * tp / (fired.sum() + pos.sum()))
        f1s.append(best)
    return float(np.mean(f1s))


def test_tiny_fsm_model_with_codebooks_at_every_layer_trains_from_scratch_and_codes_find_states(tiny_fsm):
    model_dir, text, fsm, root = tiny_fsm
    cfg = from_flags(FinetuneConfig, model=model_dir, data=text, packing="doc", preset="paper", from_scratch=True, seq_len=33,
                         codebooks="attn:k=1,codes=24,groups=heads;mlp:k=1,codes=24", batch_size=32, steps=300, lr=3e-3,
                         codebook_lr=3e-3, eval_sequences=64, baseline=False, log_every=50, out=str(root / "ft"))
    res = finetune(cfg, progress=False)
    assert len(res.codebooks) == 4  # attn and mlp of both layers
    rows = {r["model"]: r for r in res.table}
    # trained from random weights: the codebook model beats its own random start by far
    assert rows["codebook model"]["loss"] < rows["original"]["loss"] - 0.3
    # and its sampled walks follow the FSM far more often than the random start's (chance: 3 of 12 successors)
    assert rows["codebook model"]["transition_accuracy"] > rows["original"]["transition_accuracy"] + 0.2, rows
    tokens, labels = generate(fsm, 200, 33, seed=[11])
    codes = _codes_at(str(res.model), res.codebooks, tokens)
    f1 = {h: _mean_best_f1(c, labels.state, labels.complete) for h, c in codes.items()}
    # chance: the same codes scored against the states shuffled over the scored positions
    shuffled = labels.state.copy()
    shuffled[labels.complete] = np.random.default_rng(0).permutation(shuffled[labels.complete])
    chance = max(_mean_best_f1(c, shuffled, labels.complete) for c in codes.values())
    assert max(f1.values()) > 0.45 and max(f1.values()) > 2.5 * chance, (f1, chance)


# --- drift -----------------------------------------------------------------------------------------

def _commit_curve(model_dir, text, out, **kw) -> list[float]:
    cfg = from_flags(FinetuneConfig, model=model_dir, data=text, packing="doc", seq_len=33, batch_size=16, eval_sequences=16, baseline=False,
                         log_every=10, out=str(out), **kw)
    finetune(cfg, progress=False)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    assert all(any(k.startswith("fvu/") for k in r) for r in rows)  # the scale-free twin is logged beside the term
    return [float(np.mean([v for k, v in r.items() if k.startswith("commit/")])) for r in rows]


def test_drift_old_schedule_grows_paper_objective_stays_bounded(tiny_fsm, tmp_path):
    """The old schedule (codes from the commitment alone, activations in fixed-scale units) lets the term climb as the
    model's activations grow; the paper's objective (LayerNorm'd input, codes trained by the LM loss too) does not."""
    model_dir, text, _, _ = tiny_fsm
    spec = "mlp:k=1,codes=24"
    old = _commit_curve(model_dir, text, tmp_path / "old", codebooks=spec, steps=200, lr=1e-2, codebook_lr=1e-3)
    new = _commit_curve(model_dir, text, tmp_path / "new", codebooks=spec, steps=200, lr=1e-2, codebook_lr=1e-3, objective="paper",
                        input_norm="layernorm", code_init="kmeans")
    q = len(old) // 4
    assert np.mean(old[-q:]) > 2 * np.mean(old[:q]), old
    assert max(new[q:]) < 1.5 * np.mean(new[:q]), new


# --- the shipped TokFSM codebook model ---------------------------------------------------------------

def test_shipped_paper_model_runs_with_its_codebooks_at_every_layer():
    from saekit.inmodel.model import load_in_model
    from saekit.inmodel.sites import Splicer
    from saekit.models import fingerprint, resolve_model_path
    from saekit.toy import paper_dir
    from saekit.toy.fsm import load_fsm

    dicts = [load(p) for p in sorted((paper_dir() / "codebooks").iterdir())]
    hooks = [d.prov.hook for d in dicts]
    assert sorted(hooks) == sorted([f"blocks.{i}.attn.hook_z" for i in range(4)] + [f"blocks.{i}.hook_mlp_out" for i in range(4)])
    model_dir = resolve_model_path("toy-paper")
    for d in dicts:
        assert (d.cfg.k, d.cfg.d_dict // d.cfg.groups, d.cfg.input_norm) == (1, 1000, "layernorm")
        assert d.prov.model["fingerprint"] == fingerprint(model_dir)  # the codebooks name this very model
    im = load_in_model("toy-paper", hooks, torch.device("cpu"))
    assert im.hf.config.num_hidden_layers == 4 and type(im.hf).__name__ == "GPTNeoXForCausalLM"
    layers = {d.prov.hook: InModelCodebook(d, "paper") for d in dicts}
    fsm = load_fsm(model_dir)
    with_codes = ft.fsm_score(im.hf, fsm, 0, Splicer(im.hf, list(im.sites.values())), layers)
    shipped = json.loads((paper_dir() / "report.json").read_text())
    row = next(r for r in shipped["table"] if r["model"] == "codebook model")
    # the walks are sampled with the same seed as the report's: the shipped files reproduce its number
    assert with_codes["transition_accuracy"] == pytest.approx(row["transition_accuracy"], abs=0.02)
    assert with_codes["transition_accuracy"] > 3 * 0.1  # chance: 10 successors of 100 states


def test_dead_codes_are_not_replaced_in_the_last_interval(tiny_fsm, tmp_path, monkeypatch):
    """A replaced k = 1 code is at once the nearest code of its inputs: the run must not end on codes the model never trained
    with, so replacement stops `replace_every` steps before the end."""
    model_dir, text, _, _ = tiny_fsm
    seen = []
    real = ft._replace_dead
    monkeypatch.setattr(ft, "_replace_dead", lambda ph, cfg: (seen.append(ph.step), real(ph, cfg)))
    cfg = from_flags(FinetuneConfig, model=model_dir, data=text, packing="doc", seq_len=33, batch_size=8, eval_sequences=8, baseline=False,
                     codebooks="mlp[0]:k=1,codes=16", steps=30, replace_every=10, out=str(tmp_path / "ft"))
    finetune(cfg, progress=False)
    assert seen == [10, 20]


@pytest.mark.parametrize("groups", [1, 4])
def test_group_layer_norm_is_each_groups_layer_norm_with_its_affine(groups):
    """The fused paths (one group: F.layer_norm's affine; several: addcmul) against each group's nn.LayerNorm."""
    torch.manual_seed(groups)
    d_g = 8
    xn = torch.randn(5, groups * d_g, requires_grad=True)
    weight, bias = torch.randn(groups, d_g, requires_grad=True), torch.randn(groups, d_g, requires_grad=True)
    got = group_layer_norm(xn, weight, bias)
    g_out = torch.randn_like(got)
    grads = torch.autograd.grad((got * g_out).sum(), (xn, weight, bias))
    parts = [torch.nn.functional.layer_norm(xn[:, g * d_g : (g + 1) * d_g], (d_g,), weight[g], bias[g], eps=1e-5) for g in range(groups)]
    want = torch.cat(parts, 1)
    want_grads = torch.autograd.grad((want * g_out).sum(), (xn, weight, bias))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
