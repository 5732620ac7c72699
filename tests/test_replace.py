"""Dictionaries that replace a computation (transcoders, crosscoders, CLTs) spliced into a model.

The model is a tiny GPT-2 whose MLP is `relu(x W_fc + b_fc) W_proj + b_proj`, so a transcoder
with the MLP's own weights is exact.  Every splice is checked against a hand-written
`transformers` forward hook doing the same replacement.  The dictionaries are small test-only
classes implementing the shared hook interface (`in_hooks`, `out_hooks`, `encode_hooks`,
`decode_hooks`) with given weights, so these tests do not depend on how a kind is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError
from saekit.models import load_model
from saekit.splice import evaluate, mean_activations, resolve_target, logits_with
from saekit.tokens import PAD

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 2


def mlp_in(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_in"


def mlp_out(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


# --- test-only dictionaries implementing the hook interface ----------------------------------------

class Transcoder(Dictionary):
    """f = ReLU(x W_enc + b_enc) from the IN hook, prediction f W_dec + b_dec at the OUT hook (original units)."""

    def __init__(self, cfg, prov, W_enc, b_enc, W_dec, b_dec):
        super().__init__(cfg, prov)
        for name, v in dict(enc_w=W_enc, enc_b=b_enc, dec_w=W_dec, dec_b=b_dec).items():
            self.register_buffer(name, v.detach().clone().float())

    @property
    def W_dec(self):
        return self.dec_w

    def encode_hooks(self, inputs):
        return F.relu(inputs[self.in_hooks[0]] @ self.enc_w + self.enc_b)

    def decode_hooks(self, codes):
        return {self.out_hooks[0]: codes @ self.dec_w + self.dec_b}


class CLT(Dictionary):
    """Cross-layer transcoder: layer l's latents ReLU(x_l E_l + c_l) from MLP input l write to every MLP output l' >= l."""

    def __init__(self, cfg, prov, enc, enc_b, dec, dec_b):
        super().__init__(cfg, prov)
        self.m = enc[0].shape[1]
        self.enc = torch.nn.ParameterList([torch.nn.Parameter(e.float()) for e in enc])
        self.enc_b = torch.nn.ParameterList([torch.nn.Parameter(b.float()) for b in enc_b])
        self.dec = torch.nn.ParameterDict({f"{a}_{b}": torch.nn.Parameter(w.float()) for (a, b), w in dec.items()})
        self.dec_b = torch.nn.ParameterList([torch.nn.Parameter(b.float()) for b in dec_b])

    def encode_hooks(self, inputs):
        n = next(iter(inputs.values())).shape[0]
        parts = []
        for layer, hook in enumerate(self.in_hooks):
            x = inputs.get(hook)
            parts.append(torch.zeros(n, self.m) if x is None else F.relu(x @ self.enc[layer] + self.enc_b[layer]))
        return torch.cat(parts, 1)

    def decode_hooks(self, codes):
        per = codes.split(self.m, 1)
        return {hook: sum(per[a] @ self.dec[f"{a}_{b}"] for a in range(b + 1)) + self.dec_b[b]
                for b, hook in enumerate(self.out_hooks)}


class Crosscoder(Dictionary):
    """Acausal crosscoder: f = ReLU(Σ_h x_h E_h + c), prediction f D_h + d_h at every hook h."""

    def __init__(self, cfg, prov, enc, b_enc, dec, dec_b):
        super().__init__(cfg, prov)
        self.enc = torch.nn.ParameterList([torch.nn.Parameter(e.float()) for e in enc])
        self.b_enc = torch.nn.Parameter(b_enc.float())
        self.dec = torch.nn.ParameterList([torch.nn.Parameter(d.float()) for d in dec])
        self.dec_b = torch.nn.ParameterList([torch.nn.Parameter(b.float()) for b in dec_b])

    def encode_hooks(self, inputs):
        pre = sum(inputs[h] @ self.enc[i] for i, h in enumerate(self.in_hooks) if h in inputs)
        return F.relu(pre + self.b_enc)

    def decode_hooks(self, codes):
        return {h: codes @ self.dec[i] + self.dec_b[i] for i, h in enumerate(self.out_hooks)}


def prov_for(model, ins, outs):
    return Provenance(hook=ins[0], model=model.info.to_dict(), in_hooks=list(ins), out_hooks=list(outs))


def exact_transcoder(model, hf, layer, scale_dec=1.0):
    """The MLP itself as a transcoder (scale_dec != 1: a lossy one)."""
    mlp = hf.transformer.h[layer].mlp
    cfg = DictConfig(kind="relu", d_in=mlp.c_fc.weight.shape[0], d_dict=mlp.c_fc.weight.shape[1])
    return Transcoder(cfg, prov_for(model, [mlp_in(layer)], [mlp_out(layer)]), mlp.c_fc.weight, mlp.c_fc.bias,
                      mlp.c_proj.weight * scale_dec, mlp.c_proj.bias)


def random_clt(model, m=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, n = model.info.d_model, model.info.n_layers
    enc = [torch.randn(d, m, generator=g) / d**0.5 for _ in range(n)]
    enc_b = [torch.randn(m, generator=g) * 0.1 for _ in range(n)]
    dec = {(a, b): torch.randn(m, d, generator=g) / m**0.5 for b in range(n) for a in range(b + 1)}
    dec_b = [torch.randn(d, generator=g) * 0.1 for _ in range(n)]
    cfg = DictConfig(kind="relu", d_in=d, d_dict=m * n)
    ins, outs = [mlp_in(i) for i in range(n)], [mlp_out(i) for i in range(n)]
    return CLT(cfg, prov_for(model, ins, outs), enc, enc_b, dec, dec_b)


def random_crosscoder(model, hooks, m=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    d = model.info.d_model
    enc = [torch.randn(d, m, generator=g) / d**0.5 for _ in hooks]
    dec = [torch.randn(m, d, generator=g) / m**0.5 for _ in hooks]
    dec_b = [torch.randn(d, generator=g) * 0.1 for _ in hooks]
    cfg = DictConfig(kind="relu", d_in=d, d_dict=m)
    return Crosscoder(cfg, prov_for(model, hooks, hooks), enc, torch.randn(m, generator=g) * 0.1, dec, dec_b)


# --- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    """The tiny GPT-2 with a ReLU MLP whose weights are scaled up (at init scale the MLPs barely change the loss)."""
    from conftest import write_tiny_gpt2
    from transformers import GPT2LMHeadModel

    path = write_tiny_gpt2(tmp_path_factory.mktemp("relu-gpt2"), n_layer=N_LAYERS, seed=3)
    m = GPT2LMHeadModel.from_pretrained(path)
    m.config.activation_function = "relu"
    with torch.no_grad():
        for block in m.transformer.h:
            block.mlp.c_fc.weight.mul_(6.0)
            block.mlp.c_proj.weight.mul_(6.0)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(relu_dir):
    return load_model(relu_dir)


@pytest.fixture(scope="module")
def hf(relu_dir):
    from transformers import GPT2LMHeadModel

    m = GPT2LMHeadModel.from_pretrained(relu_dir).eval()
    assert m.config.activation_function == "relu"
    return m


@pytest.fixture(scope="module")
def tokens():
    """6 sequences of 20 tokens starting with BOS, one right-padded."""
    g = torch.Generator().manual_seed(5)
    t = torch.randint(2, 41, (6, 20), generator=g)
    t[:, 0] = 0
    t[3, 12:] = PAD
    return t


def means_for(model, tokens, hooks):
    return mean_activations(model, tokens, hooks, batch_size=3)


# --- the hand-written reference: plain `transformers` forward hooks ---------------------------------------

def block_of(hf, hook: str):
    """The HF module whose output is `hook` (and, for an MLP hook, whose input is the MLP input)."""
    layer = int(hook.split(".")[1])
    return hf.transformer.h[layer].mlp if "mlp" in hook else hf.transformer.h[layer]


@torch.no_grad()
def hf_capture(hf, inp, hooks):
    """Clean activations by HF module hooks: MLP inputs (post-LayerNorm), MLP outputs, block outputs."""
    got = {}

    def make(h):
        def fn(mod, args, out):
            got[h] = args[0] if h.endswith("mlp.hook_in") else (out[0] if isinstance(out, tuple) else out)
        return fn

    handles = [block_of(hf, h).register_forward_hook(make(h)) for h in hooks]
    try:
        hf(inp)
    finally:
        for x in handles:
            x.remove()
    return got


@torch.no_grad()
def hf_spliced(hf, tokens, d, mode="running"):
    """Logits with `d`'s out hooks replaced (positions ≥ 1, real tokens) by its prediction, by hand.

    running: the MLP's (or block's) own input in this forward feeds the encoder, codes of
    inputs seen so far; clean: the inputs from a clean forward."""
    inp = torch.where(tokens == PAD, torch.zeros_like(tokens), tokens)
    keep = (tokens != PAD)
    keep[:, 0] = False
    clean = hf_capture(hf, inp, d.in_hooks) if mode == "clean" else None
    seen = {}

    def replace(hook, out):
        new = out.clone()
        ins = clean if clean is not None else seen
        pred = d.decode_hooks(d.encode_hooks({h: x[keep] for h, x in ins.items()}))[hook]
        new[keep] = pred
        return new

    def make(hook):
        def fn(mod, args, out):
            if hook in d.in_hooks and clean is None and hook.endswith("mlp.hook_in"):
                seen[hook] = args[0]
            return out
        return fn

    handles = []
    for h in d.in_hooks:  # MLP inputs are read by a hook on the MLP, before its output is replaced
        if h.endswith("mlp.hook_in"):
            handles.append(block_of(hf, h).register_forward_hook(make(h)))
    for h in d.out_hooks:
        def write(mod, args, out, h=h):
            if h in d.in_hooks and clean is None:
                seen[h] = out[0] if isinstance(out, tuple) else out
            if isinstance(out, tuple):
                return (replace(h, out[0]), *out[1:])
            return replace(h, out)
        handles.append(block_of(hf, h).register_forward_hook(write))
    try:
        return hf(inp).logits
    finally:
        for x in handles:
            x.remove()


def hf_ce_kl(hf, tokens, logits):
    """Mean next-token CE of `logits` and KL(clean ‖ logits) over real next tokens."""
    inp = torch.where(tokens == PAD, torch.zeros_like(tokens), tokens)
    target = tokens[:, 1:].clone()
    target[(tokens[:, :-1] == PAD) | (tokens[:, 1:] == PAD)] = -100
    with torch.no_grad():
        clean = hf(inp).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100).item()
    lp, lq = clean[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[target != -100].mean().item()
    return ce, kl


def target_for(model, d, name="d"):
    return resolve_target(name, d, model)


# --- transcoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["running", "clean"])
def test_exact_transcoder_recovers_everything(model, hf, tokens, mode):
    t = target_for(model, exact_transcoder(model, hf, 1))
    res = evaluate(model, [t], tokens, means_for(model, tokens, [mlp_out(1)]), batch_size=4, mode=mode)
    r = res["dictionaries"][0]
    assert r["hooks"] == [mlp_out(1)] and r["in_hooks"] == [mlp_in(1)] and r["mode"] == mode
    # The baselines differ from clean, so a recovery of 1 is a measurement, not 0/0.
    assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-3 and abs(r["ce_mean"] - r["ce_clean"]) > 1e-4
    assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-3)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6) and r["acc_spliced"] == r["acc_clean"]
    assert r["fvu_per_hook"][mlp_out(1)] == pytest.approx(0.0, abs=1e-9) and r["fvu"] == r["fvu_per_hook"][mlp_out(1)]
    assert r["l0"] > 0 and 0 <= r["dead_frac"] < 1
    # The hand-written HF hook with the same weights leaves the model's loss as it was.
    ref_ce, ref_kl = hf_ce_kl(hf, tokens, hf_spliced(hf, tokens, t.dictionary, mode))
    assert r["ce_spliced"] == pytest.approx(ref_ce, abs=1e-5) and ref_kl == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["running", "clean"])
def test_lossy_transcoder_equals_handwritten_hook(model, hf, tokens, mode):
    d = exact_transcoder(model, hf, 0, scale_dec=0.6)
    t = target_for(model, d)
    ref = hf_spliced(hf, tokens, d, mode)
    ours = logits_with(model, [t], tokens, mode=mode)
    real = tokens != PAD
    assert torch.allclose(ours[real], ref[real], atol=1e-5)
    res = evaluate(model, [t], tokens, means_for(model, tokens, [mlp_out(0)]), batch_size=4, mode=mode)["dictionaries"][0]
    ref_ce, ref_kl = hf_ce_kl(hf, tokens, ref)
    assert ref_kl > 1e-4  # the lossy transcoder changes the output, so agreement means something
    assert res["ce_spliced"] == pytest.approx(ref_ce, abs=1e-5) and res["kl"] == pytest.approx(ref_kl, abs=1e-6)
    assert 0 < res["fvu"] < 1


def test_exact_transcoders_all_at_once(model, hf, tokens):
    ts = [target_for(model, exact_transcoder(model, hf, layer), f"tc{layer}") for layer in range(N_LAYERS)]
    means = means_for(model, tokens, [mlp_out(i) for i in range(N_LAYERS)])
    for mode in ("running", "clean"):
        a = evaluate(model, ts, tokens, means, batch_size=4, mode=mode)["all"]
        assert a["hooks"] == [mlp_out(0), mlp_out(1)] and a["mode"] == mode
        assert a["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and a["kl"] == pytest.approx(0.0, abs=1e-6)


def test_running_and_clean_differ_when_errors_compound(model, hf, tokens):
    """Two lossy transcoders at once: in running mode layer 1 reads the input layer 0's error made."""
    ts = [target_for(model, exact_transcoder(model, hf, layer, 0.5), f"tc{layer}") for layer in range(N_LAYERS)]
    run = logits_with(model, ts, tokens, mode="running")
    clean = logits_with(model, ts, tokens, mode="clean")
    real = tokens != PAD
    assert (run[real] - clean[real]).abs().max() > 1e-3
    # Clean mode by hand: each MLP output from the clean MLP input of its layer.
    inp = torch.where(tokens == PAD, torch.zeros_like(tokens), tokens)
    keep = real.clone()
    keep[:, 0] = False
    xs = hf_capture(hf, inp, [mlp_in(i) for i in range(N_LAYERS)])
    handles = []
    for layer, t in enumerate(ts):
        pred = t.dictionary.predict({mlp_in(layer): xs[mlp_in(layer)][keep]})[mlp_out(layer)]

        def fn(mod, args, out, pred=pred):
            new = out.clone()
            new[keep] = pred
            return new
        handles.append(hf.transformer.h[layer].mlp.register_forward_hook(fn))
    try:
        with torch.no_grad():
            ref = hf(inp).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(clean[real], ref[real], atol=1e-5)


# --- CLT and crosscoder -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["running", "clean"])
def test_clt_equals_handwritten_hooks(model, hf, tokens, mode):
    d = random_clt(model)
    t = target_for(model, d)
    assert [h.name for h in t.writes] == [mlp_out(0), mlp_out(1)]
    ref = hf_spliced(hf, tokens, d, mode)
    ours = logits_with(model, [t], tokens, mode=mode)
    real = tokens != PAD
    assert torch.allclose(ours[real], ref[real], atol=1e-5)
    res = evaluate(model, [t], tokens, means_for(model, tokens, t.dictionary.out_hooks), batch_size=4, mode=mode)
    r = res["dictionaries"][0]
    ref_ce, ref_kl = hf_ce_kl(hf, tokens, ref)
    assert r["mode"] == mode  # a CLT's layer-l output needs no later input: it can read the running model
    assert r["ce_spliced"] == pytest.approx(ref_ce, abs=1e-5) and r["kl"] == pytest.approx(ref_kl, abs=1e-6)
    assert set(r["fvu_per_hook"]) == {mlp_out(0), mlp_out(1)}
    assert r["fvu"] == pytest.approx(sum(r["fvu_per_hook"].values()) / 2)
    # Both MLP outputs are ablated together for the baselines: more loss than ablating either alone.
    one = evaluate(model, [target_for(model, exact_transcoder(model, hf, 1))], tokens,
                   means_for(model, tokens, [mlp_out(1)]), batch_size=4)["dictionaries"][0]
    assert r["ce_zero"] != pytest.approx(one["ce_zero"], abs=1e-4)


def test_clt_running_differs_from_clean(model, tokens):
    t = target_for(model, random_clt(model))
    real = tokens != PAD
    run = logits_with(model, [t], tokens, mode="running")
    clean = logits_with(model, [t], tokens, mode="clean")
    assert (run[real] - clean[real]).abs().max() > 1e-3


def test_crosscoder_replaces_all_hooks_from_clean_inputs(model, hf, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    d = random_crosscoder(model, hooks)
    t = target_for(model, d)
    ref = hf_spliced(hf, tokens, d, "clean")
    real = tokens != PAD
    for mode in ("running", "clean"):  # acausal: block 0's prediction needs block 1's input, so always clean
        ours = logits_with(model, [t], tokens, mode=mode)
        assert torch.allclose(ours[real], ref[real], atol=1e-5)
    r = evaluate(model, [t], tokens, means_for(model, tokens, hooks), batch_size=4, mode="running")["dictionaries"][0]
    assert r["mode"] == "clean" and r["hooks"] == hooks
    assert r["ce_spliced"] == pytest.approx(hf_ce_kl(hf, tokens, ref)[0], abs=1e-5)


def test_mixed_all_at_once_row(model, hf, tokens):
    """A crosscoder and a transcoder spliced together: each row keeps its own mode, the all row says mixed."""
    d1 = random_crosscoder(model, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    ts = [target_for(model, d1, "xc"), target_for(model, exact_transcoder(model, hf, 1), "tc")]
    res = evaluate(model, ts, tokens, means_for(model, tokens, [*d1.out_hooks, mlp_out(1)]), batch_size=6)
    assert [r["mode"] for r in res["dictionaries"]] == ["clean", "running"] and res["all"]["mode"] == "mixed"
    assert res["all"]["hooks"] == [*d1.out_hooks, mlp_out(1)]
    # Clean inputs: each dictionary sees the same activations alone and together, so the L0s add up.
    clean = evaluate(model, ts, tokens, means_for(model, tokens, [*d1.out_hooks, mlp_out(1)]), batch_size=6, mode="clean")
    assert clean["all"]["mode"] == "clean"
    assert clean["all"]["l0"] == pytest.approx(sum(r["l0"] for r in clean["dictionaries"]))
    # Running: the transcoder reads the MLP input computed from the crosscoder's block-0 replacement.
    assert res["all"]["l0"] != pytest.approx(clean["all"]["l0"], abs=1e-3)


# --- refusals -----------------------------------------------------------------------------------------

def test_refusals(model, hf):
    d = exact_transcoder(model, hf, 1)
    d.prov.in_hooks = ["blocks.7.mlp.hook_in"]
    with pytest.raises(SaekitError, match=r"has no hook 'blocks.7.mlp.hook_in'"):
        resolve_target("tc", d, model)
    wide = exact_transcoder(model, hf, 1)
    wide.dec_w, wide.dec_b = wide.dec_w[:, :-1], wide.dec_b[:-1]
    with pytest.raises(SaekitError, match=r"writes width 31 at blocks.1.hook_mlp_out .* has width 32"):
        resolve_target("tc", wide, model)
    narrow = exact_transcoder(model, hf, 1)
    narrow.cfg.d_in, narrow.enc_w = 30, narrow.enc_w[:30]
    with pytest.raises(SaekitError, match=r"reads width 30 at blocks.1.mlp.hook_in .* has width 32"):
        resolve_target("tc", narrow, model)
    other = exact_transcoder(model, hf, 1)
    other.prov.model = {**model.info.to_dict(), "fingerprint": "0" * 16, "name": "other-model"}
    with pytest.raises(SaekitError, match=r"different models"):
        resolve_target("tc", other, model)


# --- the command line -----------------------------------------------------------------------------------

def run_cli(args, capsys, monkeypatch):
    """Run `saekit ARGS` in-process; returns (exit code, stdout, stderr)."""
    import sys

    from saekit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_transcoder(model, hf, relu_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    """`saekit splice-eval --dict TC --input clean|running`: the JSON layout, and one-line refusals (exit 2).

    The folder's loader is replaced by the test-only transcoder (the real kinds load from disk after
    the merge with the training side)."""
    import saekit.interop

    folder = tmp_path / "tc"
    folder.mkdir()
    loaded = {"tc": exact_transcoder(model, hf, 1)}
    monkeypatch.setattr(saekit.interop, "load", lambda path, device="cpu": loaded[Path(path).name])
    base = ["splice-eval", "--model", relu_dir, "--dict", str(folder), "--data", tiny_text_file, "--max-tokens", "200",
            "--context-size", "16"]
    for mode in ("clean", "running"):
        out = tmp_path / f"{mode}.json"
        code, stdout, err = run_cli([*base, "--input", mode, "--json", str(out)], capsys, monkeypatch)
        assert code == 0, err
        assert "blocks.1.mlp.hook_in → blocks.1.hook_mlp_out" in stdout
        res = json.loads(out.read_text())
        r = res["dictionaries"][0]
        assert (r["mode"], r["hooks"], r["in_hooks"], res["eval"]["input"]) == (mode, [mlp_out(1)], [mlp_in(1)], mode)
        assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and list(r["fvu_per_hook"]) == [mlp_out(1)]
    code, _, err = run_cli([*base, "--input", "sideways"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error:") and "running or clean" in err and len(err.strip().splitlines()) == 1
    loaded["tc"].prov.out_hooks = ["blocks.9.hook_mlp_out"]
    code, _, err = run_cli(base, capsys, monkeypatch)
    assert code == 2 and "has no hook 'blocks.9.hook_mlp_out'" in err and len(err.strip().splitlines()) == 1
    loaded["tc"] = exact_transcoder(model, hf, 1)
    loaded["tc"].prov.model = {**model.info.to_dict(), "fingerprint": "f" * 16}
    code, _, err = run_cli(base, capsys, monkeypatch)
    assert code == 2 and "different models" in err and len(err.strip().splitlines()) == 1


# --- analyze and steer ------------------------------------------------------------------------------------

STORE_HOOKS = [mlp_in(1), mlp_out(1), "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def relu_store(relu_dir, tiny_text_file, tmp_path_factory):
    from saekit.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("relu-store") / "s"
    cfg = HarvestConfig(model=relu_dir, hooks=STORE_HOOKS, data=tiny_text_file, context_size=24, packing="doc",
                        tokens=900, batch_size=16, out=str(out), holdout=0.1, dtype="float32")
    return str(harvest(cfg, progress=False))


def stored_rows(store_dir, hooks):
    from saekit.store import ActivationStore

    st = ActivationStore(store_dir)
    toks = st.read_tokens(0, st.n_sequences)
    mask = torch.from_numpy(st.row_mask(toks))
    return {h: torch.from_numpy(st.read_acts(h, 0, st.n_sequences))[mask].float() for h in hooks}


def analyze_with(d, store_dir, out, monkeypatch):
    """`analyze` on a test-only dictionary (the folder's loader returns it)."""
    import saekit.interop
    from saekit.analysis.analyze import AnalyzeConfig, analyze, load_analysis

    folder = out.parent / f"{out.name}-dict"
    folder.mkdir()
    monkeypatch.setattr(saekit.interop, "load", lambda path, device="cpu": d)
    analyze(AnalyzeConfig(dict=str(folder), store=store_dir, out=str(out), top_n=3, window=2, explain=False))
    return load_analysis(out)


def unembed_ref(lm, dirs):
    """A residual-stream direction's logit effect as `analyze` defines it: centred, times ln_f's weight, @ W_U."""
    gamma = dict(lm.bridge.ln_final.named_parameters())["_original_component.weight"]
    return ((dirs - dirs.mean(-1, keepdim=True)) * gamma) @ lm.bridge.W_U


def test_analyze_transcoder_reads_input_writes_output(model, hf, relu_store, tmp_path, monkeypatch):
    d = exact_transcoder(model, hf, 1)
    a = analyze_with(d, relu_store, tmp_path / "a", monkeypatch)
    rows = stored_rows(relu_store, [mlp_in(1), mlp_out(1)])
    codes = d.encode_hooks({mlp_in(1): rows[mlp_in(1)]})
    # Firing counts and top activations are those of the MLP input hook's rows.
    assert torch.equal(a.tensors["count"], (codes > 0).sum(0))
    i = int((codes > 0).sum(0).argmax())
    assert a.feature(a.meta["features"][i]["id"])["max"] == pytest.approx(float(codes[:, i].max()), rel=1e-3)
    assert (a.meta["hook"], a.meta["in_hooks"], a.meta["out_hooks"]) == (mlp_in(1), [mlp_in(1)], [mlp_out(1)])
    # Logit effects go through the decoder into hook_mlp_out (the residual stream).
    ref = unembed_ref(model, d.dec_w[:4])
    n = a.tensors["promote_ids"].shape[1]
    assert torch.equal(a.tensors["promote_ids"][:4], torch.topk(ref, n, dim=1).indices)
    html = (tmp_path / "a" / "dashboard.html").read_text()
    assert f"reads {mlp_in(1)} → writes {mlp_out(1)}" in html
    # A store without the input hook is refused, naming it.
    d.prov.in_hooks = ["blocks.0.mlp.hook_in"]
    with pytest.raises(SaekitError, match=r"reads blocks.0.mlp.hook_in, but the store has only"):
        analyze_with(d, relu_store, tmp_path / "b", monkeypatch)


def test_analyze_crosscoder_reads_all_hooks(model, relu_store, tmp_path, monkeypatch):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    d = random_crosscoder(model, hooks)
    a = analyze_with(d, relu_store, tmp_path / "a", monkeypatch)
    rows = stored_rows(relu_store, hooks)
    with torch.no_grad():
        both = d.encode_hooks(rows)
        first = d.encode_hooks({hooks[0]: rows[hooks[0]]})
    assert torch.equal(a.tensors["count"], (both > 0).sum(0))
    assert not torch.equal((first > 0).sum(0), (both > 0).sum(0))  # one hook alone would give other contexts
    # Logit effects: the decoder direction at the last residual-stream hook, the one the unembedding reads.
    ref = unembed_ref(model, d.dec[1].detach()[:4])
    n = a.tensors["promote_ids"].shape[1]
    assert torch.equal(a.tensors["promote_ids"][:4], torch.topk(ref, n, dim=1).indices)
    assert "blocks.1.hook_resid_post" in a.meta["logit_note"]


def hf_greedy(hf, ids, steps, adds):
    """Greedy continuation with `adds` {module path: vector added to its output} applied by hand."""
    handles = []
    for path, v in adds.items():
        def fn(mod, args, out, v=v):
            return (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        handles.append(hf.get_submodule(path).register_forward_hook(fn))
    try:
        seq = ids
        with torch.no_grad():
            for _ in range(steps):
                seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    finally:
        for h in handles:
            h.remove()
    return seq[0, ids.shape[1]:].tolist()


def test_steer_transcoder_and_crosscoder_write_at_out_hooks(model, hf):
    from saekit.analysis.steer import SteerConfig, steer

    tok = model.tokenizer
    ids = torch.tensor([[model.bos_id] + tok.encode("the cat", add_special_tokens=False)])
    text = lambda seq: "".join(tok.decode([i]) for i in seq)  # noqa: E731  (the character tokenizer has no decoder)
    tc = exact_transcoder(model, hf, 1)
    res = steer(SteerConfig(feature=["1.3", "1.5"], prompt="the cat", strength=30.0, max_new_tokens=6, temperature=0),
                model=model, dictionary=tc)
    ref = hf_greedy(hf, ids, 6, {"transformer.h.1.mlp": 30.0 * (tc.dec_w[3] + tc.dec_w[5])})
    assert res.steered[0] == text(ref) and res.steered != res.unsteered
    assert any(f"writes {mlp_out(1)}" in line for line in res.about)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    xc = random_crosscoder(model, hooks)
    res = steer(SteerConfig(feature=["0.2"], prompt="the cat", strength=20.0, max_new_tokens=6, temperature=0),
                model=model, dictionary=xc)
    v = [xc.dec[k].detach()[2] * 20.0 for k in range(2)]
    ref = hf_greedy(hf, ids, 6, {"transformer.h.0": v[0], "transformer.h.1": v[1]})
    assert res.steered[0] == text(ref) and res.steered != res.unsteered
    # Adding at one hook only would be another intervention (so the check above can fail).
    assert text(hf_greedy(hf, ids, 6, {"transformer.h.1": v[1]})) != res.steered[0] or \
        text(hf_greedy(hf, ids, 6, {"transformer.h.0": v[0]})) != res.steered[0]


def test_clt_logit_directions_sum_its_writes(model):
    """A CLT latent of layer a writes to every MLP output b >= a: its direct effect is the sum of those decoders."""
    from saekit.analysis.analyze import logit_directions, residual_directions
    from saekit.analysis.multihook import decoder_matrix, hook_deltas

    d = random_clt(model, m=8)
    got, note = logit_directions(model.bridge, d)
    assert got.shape == (16, model.info.d_model) and "summed" in note
    with torch.no_grad():
        layer0 = d.dec["0_0"] + d.dec["0_1"]  # latents 0..7
        layer1 = d.dec["1_1"]  # latents 8..15
    ref, _ = residual_directions(model.bridge, mlp_out(0), torch.cat([layer0, layer1]))
    assert torch.allclose(got, ref, atol=1e-5)
    # Steering latent 9 (layer 1) writes nothing at layer 0's MLP output.
    deltas = hook_deltas(d, [9], 2.0)
    assert torch.count_nonzero(deltas[mlp_out(0)]) == 0
    assert torch.allclose(deltas[mlp_out(1)], 2.0 * d.dec["1_1"].detach()[1], atol=1e-6)
    # Neighbours are taken over the directions at every out hook side by side.
    assert decoder_matrix(d).shape == (16, 2 * model.info.d_model)


def test_store_gives_tokens_and_means_of_the_replaced_hooks(model, hf, relu_store, monkeypatch):
    """With --store: the eval split's tokens, and the store's mean of the OUT hook for mean-ablation."""
    import saekit.interop
    from saekit.splice import SpliceConfig, splice_eval, store_tokens
    from saekit.store import ActivationStore

    d = exact_transcoder(model, hf, 1, scale_dec=0.8)
    monkeypatch.setattr(saekit.interop, "load", lambda path, device="cpu": d)
    res = splice_eval(SpliceConfig(dicts=[relu_store], store=relu_store, batch_size=4, input="clean"))
    st = ActivationStore(relu_store)
    mean = torch.from_numpy(st.stats(mlp_out(1))["mean"]).float()
    tokens = store_tokens(st, 32768)
    assert not torch.allclose(mean, means_for(model, tokens, [mlp_out(1)])[mlp_out(1)], atol=1e-4)
    ref = evaluate(model, [target_for(model, d)], tokens, {mlp_out(1): mean}, batch_size=4, mode="clean")
    r, q = res["dictionaries"][0], ref["dictionaries"][0]
    assert r["ce_mean"] == pytest.approx(q["ce_mean"], abs=1e-6) and r["ce_spliced"] == pytest.approx(q["ce_spliced"], abs=1e-6)
    assert res["source"] == {"store": relu_store, "split": "eval"} and r["mode"] == "clean"


# --- the real kinds (saekit.dictionaries.coders), saved and loaded from their folders ------------------------

def real_coder(model, kind, ins, outs, act="relu", d_dict=128, k=None, seed=2):
    from saekit.dictionaries import build

    w = model.info.d_model
    cfg = DictConfig(kind=kind, activation=act, d_in=w * len(ins), d_out=w * len(outs), d_dict=d_dict, k=k,
                     in_widths=[w] * len(ins), out_widths=[w] * len(outs))
    d = build(cfg, prov_for(model, ins, outs))
    d.reset_parameters(torch.Generator().manual_seed(seed))
    return d


def test_real_exact_transcoder_from_its_folder(model, hf, relu_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    """A `transcoder` (relu) holding the MLP's own weights, saved, then spliced by the CLI from its folder: loss recovered 1."""
    tc = real_coder(model, "transcoder", [mlp_in(1)], [mlp_out(1)], d_dict=hf.transformer.h[1].mlp.c_fc.weight.shape[1])
    mlp = hf.transformer.h[1].mlp
    with torch.no_grad():
        tc.W_enc.copy_(mlp.c_fc.weight)
        tc.b_enc.copy_(mlp.c_fc.bias)
        tc._parameters["W_dec"].copy_(mlp.c_proj.weight)
        tc.b_dec.copy_(mlp.c_proj.bias)
        tc.b_in.zero_()
    folder = tc.save(tmp_path / "tc")
    for mode in ("clean", "running"):
        out = tmp_path / f"{mode}.json"
        code, stdout, err = run_cli(["splice-eval", "--model", relu_dir, "--dict", str(folder), "--data", tiny_text_file,
                                     "--max-tokens", "200", "--context-size", "16", "--input", mode, "--json", str(out)],
                                    capsys, monkeypatch)
        assert code == 0, err
        r = json.loads(out.read_text())["dictionaries"][0]
        assert (r["mode"], r["hooks"], r["in_hooks"]) == (mode, [mlp_out(1)], [mlp_in(1)])
        assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and r["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind, mode", [("clt", "running"), ("clt", "clean"), ("crosscoder", "clean"), ("skip-transcoder", "clean")])
def test_real_kinds_equal_handwritten_hooks(model, hf, tokens, kind, mode):
    """The trained kinds' classes, spliced by saekit, give the logits of hand-written HF hooks calling `predict`."""
    n = model.info.n_layers
    if kind == "clt":
        d = real_coder(model, kind, [mlp_in(i) for i in range(n)], [mlp_out(i) for i in range(n)], act="topk", k=8)
    elif kind == "crosscoder":
        hooks = [f"blocks.{i}.hook_resid_post" for i in range(n)]
        d = real_coder(model, kind, hooks, hooks, act="topk", k=8)
    else:
        d = real_coder(model, kind, [mlp_in(0)], [mlp_out(0)], act="topk", k=8)
        with torch.no_grad():
            d.W_skip.copy_(torch.randn(d.W_skip.shape, generator=torch.Generator().manual_seed(9)) * 0.3)

    class ByPredict:  # the reference splices predict() (a skip transcoder's skip term is not in its codes)
        in_hooks, out_hooks = d.in_hooks, d.out_hooks

        def encode_hooks(self, x):
            return x

        def decode_hooks(self, x):
            return d.predict(x)

    ours = logits_with(model, [target_for(model, d)], tokens, mode=mode)
    ref = hf_spliced(hf, tokens, ByPredict(), mode)
    real = tokens != PAD
    assert (ours[real] - ref[real]).abs().max() < 1e-5
