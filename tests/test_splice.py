"""splice-eval: splicing identity/zero/mean dictionaries, agreement with a hand-written `transformers` hook,
the restart-from-cache fast path, the CLI, its errors and the sweep frontier."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saekit.dictionaries.base import DictConfig, Dictionary, Provenance
from saekit.errors import SaekitError
from saekit.models import load_model, resolve_hooks
from saekit.tokens import PAD
from saekit.splice import Runner, SpliceConfig, Target, evaluate, format_table, frontier_points, splice_eval


# --- test-local dictionaries --------------------------------------------------------------------

class Identity(Dictionary):
    """codes = x, x̂ = codes: an exact reconstruction."""

    def encode_n(self, xn):
        return xn

    def decode_n(self, f):
        return f


class Zero(Dictionary):
    """Every code 0, x̂ = 0: the same as zero-ablating the hook."""

    def encode_n(self, xn):
        return torch.zeros(xn.shape[0], self.cfg.d_dict, dtype=xn.dtype)

    def decode_n(self, f):
        return torch.zeros(f.shape[0], self.cfg.d_in, dtype=f.dtype)


class Constant(Dictionary):
    """x̂ = a fixed vector (set to the hook's mean: the same as mean-ablation)."""

    def __init__(self, cfg, prov, value):
        super().__init__(cfg, prov)
        self.register_buffer("value", value.float())

    def encode_n(self, xn):
        return torch.ones(xn.shape[0], 1, dtype=xn.dtype)

    def decode_n(self, f):
        return f * self.value * self.scale


class Halve(Dictionary):
    """x̂ = x / 2 + c: a lossy map whose effect on the loss is known only by running the model."""

    def __init__(self, cfg, prov):
        super().__init__(cfg, prov)
        self.register_buffer("c", torch.linspace(-0.5, 0.5, cfg.d_in))

    def encode_n(self, xn):
        return xn

    def decode_n(self, f):
        return f / 2 + self.c


def make(cls, model, hook, *args, d_dict=None):
    spec = resolve_hooks(model, [hook])[0]
    cfg = DictConfig(kind="relu", d_in=spec.width, d_dict=d_dict or spec.width)
    prov = Provenance(hook=hook, model=model.info.to_dict(), hook_shape=spec.shape)
    return Target(name=f"{cls.__name__}@{hook}", dictionary=cls(cfg, prov, *args), hook=spec)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tokens():
    """8 sequences of 24 tokens starting with BOS, two of them right-padded with PAD."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(2, 41, (8, 24), generator=g)
    t[:, 0] = 0
    t[2, 15:] = PAD
    t[5, 7:] = PAD
    return t


def means_for(model, tokens, hooks):
    from saekit.splice import mean_activations

    return mean_activations(model, tokens, hooks, batch_size=4)


# --- library -----------------------------------------------------------------------------------

@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z"])
def test_identity_recovers_everything(model, tokens, hook):
    t = make(Identity, model, hook)
    res = evaluate(model, [t], tokens, means_for(model, tokens, [hook]), batch_size=3)
    r = res["dictionaries"][0]
    # Ablating must change the loss (random weights: not necessarily for the worse), or recovery is 0/0.
    assert abs(r["ce_zero"] - r["ce_clean"]) > 2e-5 and abs(r["ce_mean"] - r["ce_clean"]) > 2e-5
    assert r["ce_spliced"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["acc_spliced"] == r["acc_clean"]
    assert r["fvu"] == pytest.approx(0.0, abs=1e-10)
    # The count of scored positions: every position whose next token is real.
    real = tokens != PAD
    assert res["eval"]["scored_positions"] == int((real[:, :-1] & real[:, 1:]).sum())
    assert res["all"]["loss_recovered_mean"] == r["loss_recovered_mean"]


def test_zero_dictionary_equals_zero_ablation(model, tokens):
    hook = "blocks.1.hook_resid_pre"
    res = evaluate(model, [make(Zero, model, hook)], tokens, means_for(model, tokens, [hook]), batch_size=4)
    r = res["dictionaries"][0]
    assert r["ce_spliced"] == pytest.approx(r["ce_zero"], abs=1e-6)
    assert r["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-5)
    assert r["l0"] == 0 and r["dead_frac"] == 1.0
    assert r["fvu"] > 1.0  # x̂ = 0 leaves all of Σ‖x‖² unexplained, more than the variance about the mean


def test_mean_dictionary_equals_mean_ablation(model, tokens):
    hook = "blocks.0.hook_mlp_out"
    means = means_for(model, tokens, [hook])
    t = make(Constant, model, hook, means[hook], d_dict=1)
    r = evaluate(model, [t], tokens, means, batch_size=4)["dictionaries"][0]
    assert r["ce_spliced"] == pytest.approx(r["ce_mean"], abs=1e-5)
    assert r["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-4)
    assert r["fvu"] == pytest.approx(1.0, abs=1e-5)  # predicting the mean explains no variance, by definition


def hf_reference(model_dir, tokens, module_path, fn, splice_bos=False):
    """CE clean and spliced by hand: a `transformers` forward hook replaces a module's output."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    inp = torch.where(tokens == PAD, torch.zeros_like(tokens), tokens)
    target = tokens[:, 1:].clone()
    target[(tokens[:, :-1] == PAD) | (tokens[:, 1:] == PAD)] = -100  # ignored by cross_entropy
    first = 0 if splice_bos else 1

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100).item()

    module = hf.get_submodule(module_path)

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        new = hidden.clone()
        new[:, first:] = fn(hidden[:, first:])
        return (new, *out[1:]) if isinstance(out, tuple) else new

    with torch.no_grad():
        clean = ce(hf(inp).logits)
        h = module.register_forward_hook(hook)
        try:
            spliced = ce(hf(inp).logits)
        finally:
            h.remove()
    return clean, spliced


@pytest.mark.parametrize(
    "hook, module_path", [("blocks.0.hook_resid_post", "transformer.h.0"), ("blocks.1.hook_mlp_out", "transformer.h.1.mlp")]
)
def test_matches_handwritten_transformers_hook(model, tiny_model_dir, tokens, hook, module_path):
    t = make(Halve, model, hook)
    c = t.dictionary.c
    ref_clean, ref_spliced = hf_reference(tiny_model_dir, tokens, module_path, lambda h: h / 2 + c)
    res = evaluate(model, [t], tokens, means_for(model, tokens, [hook]), batch_size=3)
    r = res["dictionaries"][0]
    assert abs(ref_spliced - ref_clean) > 1e-3  # the splice changes the loss, so agreement means something
    assert r["ce_clean"] == pytest.approx(ref_clean, abs=1e-5)
    assert r["ce_spliced"] == pytest.approx(ref_spliced, abs=1e-5)


def test_splice_bos_matches_reference(model, tiny_model_dir, tokens):
    hook = "blocks.0.hook_resid_post"
    t = make(Halve, model, hook)
    c = t.dictionary.c
    _, ref = hf_reference(tiny_model_dir, tokens, "transformer.h.0", lambda h: h / 2 + c, splice_bos=True)
    r = evaluate(model, [t], tokens, means_for(model, tokens, [hook]), splice_bos=True)["dictionaries"][0]
    assert r["ce_spliced"] == pytest.approx(ref, abs=1e-5)


def test_restart_from_cache_matches_full_forward(model, tokens):
    """The fast path (start_at_layer + skipped lower blocks) gives the full forward's logits, with a hook on."""
    bridge = model.bridge
    inp = torch.where(tokens == PAD, torch.zeros_like(tokens), tokens)
    runner = Runner(bridge, {1})
    logits, _, resid = runner.clean(inp, ["blocks.1.hook_mlp_out"])
    assert runner._tuple_output is not None
    hooks = [("blocks.1.hook_mlp_out", lambda act, hook: act * 0.3)]
    full = bridge.run_with_hooks(inp, fwd_hooks=hooks)
    first = runner.run(inp, resid, hooks)  # checks itself against a full forward
    assert runner.fast is True
    fast = runner.run(inp, resid, hooks)
    assert torch.allclose(first, full) and torch.allclose(fast, full, atol=1e-5)
    assert not torch.allclose(fast, logits, atol=1e-3)  # the hook really ran in the restarted pass
    # The lower blocks are restored afterwards: a plain forward still equals the clean one.
    assert torch.allclose(bridge(inp), logits, atol=1e-6)


def test_all_at_once(model, tokens):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    means = means_for(model, tokens, hooks)
    both_identity = evaluate(model, [make(Identity, model, h) for h in hooks], tokens, means, batch_size=4)
    a = both_identity["all"]
    assert a["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4) and a["kl"] == pytest.approx(0.0, abs=1e-6)
    assert a["l0"] == pytest.approx(sum(r["l0"] for r in both_identity["dictionaries"]))
    # Zero-ablating both hooks at once is exactly what two zero dictionaries spliced at once do.
    zeros = evaluate(model, [make(Zero, model, h) for h in hooks], tokens, means, batch_size=4)
    assert zeros["all"]["ce_spliced"] == pytest.approx(zeros["all"]["ce_zero"], abs=1e-6)
    assert zeros["all"]["ce_zero"] != pytest.approx(zeros["dictionaries"][0]["ce_zero"], abs=1e-4)
    # Two dictionaries on one hook cannot be spliced together.
    same = evaluate(model, [make(Identity, model, hooks[0]), make(Zero, model, hooks[0])], tokens, means)
    assert same["all"] is None and len(same["dictionaries"]) == 2


def test_no_scored_tokens_is_refused(model):
    t = make(Identity, model, "blocks.0.hook_resid_post")
    with pytest.raises(SaekitError, match="no evaluation tokens"):
        evaluate(model, [t], torch.tensor([[0, PAD, PAD]]), {})


def test_frontier_points():
    rows = [{"l0": 10, "loss_recovered_mean": 0.9}, {"l0": 5, "loss_recovered_mean": 0.95},
            {"l0": 20, "loss_recovered_mean": 0.99}, {"l0": 30, "loss_recovered_mean": 0.97}]
    assert [r["l0"] for r in frontier_points(rows)] == [5, 20]


def test_config_validation():
    with pytest.raises(ValueError, match="not both"):
        SpliceConfig(data="a.txt", store="s")
    with pytest.raises(ValueError, match="batch_size"):
        SpliceConfig(batch_size=0)


# --- saved dictionaries, the CLI and its errors --------------------------------------------------

def save_identity_sae(model, hook, out, *, model_info=None, width=None, compat=None):
    """A ReLU SAE with W_enc = [I, −I], W_dec = [I; −I]: ReLU(x) − ReLU(−x) = x, so it reconstructs exactly."""
    from saekit.dictionaries.sae import ReluSAE

    spec = resolve_hooks(model, [hook])[0]
    w = width or spec.width
    info = dict(model_info or model.info.to_dict())
    if compat is not None:
        info["compat"] = compat
    sae = ReluSAE(DictConfig(kind="relu", d_in=w, d_dict=2 * w), Provenance(hook=hook, model=info, hook_shape=spec.shape if w == spec.width else [w]))
    eye = torch.eye(w)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.save(out)


def run_cli(args, capsys, monkeypatch):
    """Run `saekit ARGS` in-process; returns (exit code, stdout, stderr)."""
    from saekit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *args])
    capsys.readouterr()  # drop what the test itself printed before
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dicts")
    return {
        "resid": save_identity_sae(model, "blocks.0.hook_resid_post", root / "sweep" / "resid"),
        "z": save_identity_sae(model, "blocks.1.attn.hook_z", root / "sweep" / "z"),
    }


def test_cli_end_to_end(tiny_model_dir, tiny_text_file, saved, tmp_path, capsys, monkeypatch):
    out = tmp_path / "res.json"
    code, stdout, err = run_cli(
        ["splice-eval", "--model", tiny_model_dir, "--dict", str(saved["resid"]), "--dict", str(saved["z"]),
         "--data", tiny_text_file, "--json", str(out), "--max-tokens", "600", "--context-size", "32"],
        capsys, monkeypatch,
    )
    assert code == 0, err
    assert "all at once" in stdout and "blocks.1.attn.hook_z" in stdout
    res = json.loads(out.read_text())
    assert [r["dict"] for r in res["dictionaries"]] == [str(saved["resid"]), str(saved["z"])]
    keys = {"ce_clean", "ce_spliced", "ce_zero", "ce_mean", "loss_recovered_zero", "loss_recovered_mean", "delta_ce",
            "kl", "acc_clean", "acc_spliced", "l0", "fvu", "dead_frac", "hooks", "mode", "fvu_per_hook",
            "dead_window_tokens"}
    assert set(res["all"]) == keys and all(set(r) == keys | {"dict", "hook", "in_hooks"} for r in res["dictionaries"])
    assert [(r["hooks"], r["in_hooks"], r["mode"]) for r in res["dictionaries"]] == [
        ([h], [h], "running") for h in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_z")]
    assert res["dictionaries"][1]["fvu_per_hook"] == {"blocks.1.attn.hook_z": res["dictionaries"][1]["fvu"]}
    for r in [*res["dictionaries"], res["all"]]:
        assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4) and r["kl"] == pytest.approx(0, abs=1e-6)
    assert 600 <= res["eval"]["tokens"] < 600 + 32
    assert res["eval"]["restart_from_cache"] is True
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_sweep_writes_frontier(tiny_model_dir, tiny_text_file, saved, capsys, monkeypatch):
    sweep = Path(saved["resid"]).parent
    code, stdout, err = run_cli(
        ["splice-eval", "--model", tiny_model_dir, "--sweep", str(sweep), "--data", tiny_text_file, "--max-tokens", "200",
         "--context-size", "32"], capsys, monkeypatch,
    )
    assert code == 0, err
    rows = list(csv.DictReader(open(sweep / "frontier.csv")))
    assert sorted(r["dict"] for r in rows) == sorted(str(p) for p in saved.values())
    assert (sweep / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def message_lines(err: str) -> list[str]:
    """stderr without the progress bars transformers draws while loading weights (tqdm: '...%|...it/s]')."""
    return [line for line in err.splitlines() if line.strip() and not ("%|" in line and "it/s]" in line)]


def expect_error(args, capsys, monkeypatch, *needles):
    code, _, err = run_cli(args, capsys, monkeypatch)
    lines = message_lines(err)
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_cli_errors(model, tiny_model_dir, tiny_text_file, saved, tmp_path, capsys, monkeypatch):
    from conftest import write_tiny_gpt2

    base = ["splice-eval", "--model", tiny_model_dir, "--data", tiny_text_file, "--max-tokens", "100", "--context-size", "16"]
    # A dictionary trained for another model: both fingerprints named.
    other = write_tiny_gpt2(tmp_path / "other-model", seed=1)
    other_info = load_model(other).info.to_dict()
    foreign = save_identity_sae(model, "blocks.0.hook_resid_post", tmp_path / "foreign", model_info=other_info)
    expect_error([*base, "--dict", str(foreign)], capsys, monkeypatch, other_info["fingerprint"], model.info.fingerprint)
    # Another weight processing.
    compat = save_identity_sae(model, "blocks.0.hook_resid_post", tmp_path / "compat", compat=True)
    expect_error([*base, "--dict", str(compat)], capsys, monkeypatch, "compat=True", "--compat")
    # A hook the model lacks.
    wrong_hook = save_identity_sae(model, "blocks.0.hook_resid_post", tmp_path / "hook")
    cfg = json.loads((wrong_hook / "config.json").read_text())
    cfg["provenance"]["hook"] = "blocks.7.hook_resid_post"
    (wrong_hook / "config.json").write_text(json.dumps(cfg))
    expect_error([*base, "--dict", str(wrong_hook)], capsys, monkeypatch, "blocks.7.hook_resid_post")
    # Width ≠ hook width: both numbers.
    narrow = save_identity_sae(model, "blocks.0.hook_resid_post", tmp_path / "narrow", width=16)
    expect_error([*base, "--dict", str(narrow)], capsys, monkeypatch, "width 16", f"width {model.info.d_model}")
    # No evaluation tokens.
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = ["splice-eval", "--model", tiny_model_dir, "--dict", str(saved["resid"])]
    expect_error([*args, "--data", str(empty)], capsys, monkeypatch, "no evaluation tokens")
    expect_error(args, capsys, monkeypatch, "--data", "--store")
    expect_error([*args, "--data", tiny_text_file, "--store", str(tmp_path)], capsys, monkeypatch, "not both")
    expect_error(["splice-eval", "--model", tiny_model_dir, "--data", tiny_text_file], capsys, monkeypatch, "--dict")
    expect_error([*base, "--dict", str(tmp_path / "nope")], capsys, monkeypatch, "does not exist")


@pytest.mark.slow
def test_cli_subprocess_error_has_no_traceback(tiny_model_dir, tiny_text_file, saved, tmp_path):
    """The installed console script, as a user runs it: one line on stderr, exit 2."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    exe = Path(sys.executable).with_name("saekit")
    p = subprocess.run([str(exe), "splice-eval", "--model", tiny_model_dir, "--dict", str(saved["resid"]), "--data", str(empty)],
                       capture_output=True, text=True, timeout=120)
    lines = message_lines(p.stderr)
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no evaluation tokens"), p.stderr
    assert "Traceback" not in p.stderr


def test_format_table_lists_every_row(model, tokens):
    from rich.console import Console

    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    res = evaluate(model, [make(Identity, model, h) for h in hooks], tokens, means_for(model, tokens, hooks))
    console = Console(width=250, record=True)
    console.print(format_table(res))
    text = console.export_text()
    assert all(h in text for h in hooks) and "all at once" in text


# --- evaluation tokens from an activation store --------------------------------------------------

@pytest.fixture(scope="module")
def eval_store(tiny_model_dir, tiny_text_file, tmp_path_factory):
    from saekit.harvest import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("store")
    common = dict(model=tiny_model_dir, hooks=["blocks.0.hook_resid_post"], data=tiny_text_file, context_size=16,
                  packing="doc", tokens=16 * 24, dtype="float32")
    with_eval = harvest(HarvestConfig(**common, holdout=0.25, out=str(root / "s")), progress=False)
    no_eval = harvest(HarvestConfig(**common, holdout=0.0, out=str(root / "s0")), progress=False)
    return with_eval, no_eval


def test_store_eval_split_and_store_means(model, saved, eval_store):
    from saekit.interop import load
    from saekit.splice import Target
    from saekit.store import ActivationStore

    path, _ = eval_store
    store = ActivationStore(path)
    hook = "blocks.0.hook_resid_post"
    split = store.split("eval")
    res = splice_eval(SpliceConfig(dicts=[str(saved["resid"])], store=str(path), batch_size=4))  # model from the store
    assert res["eval"]["sequences"] == len(split) > 0
    eval_tokens = torch.from_numpy(store.read_tokens(split.start, split.stop)).long()
    assert (eval_tokens == PAD).any()  # doc packing: padding is present and must be skipped
    assert res["eval"]["tokens"] == int((eval_tokens != PAD).sum())
    # Mean-ablation uses the store's statistics, not a mean of the eval tokens (they differ).
    t = Target(str(saved["resid"]), load(saved["resid"]), resolve_hooks(model, [hook])[0])
    store_mean = torch.from_numpy(store.stats(hook)["mean"])
    own_mean = means_for(model, eval_tokens, [hook])[hook]
    assert not torch.allclose(store_mean, own_mean, atol=1e-4)
    ref = evaluate(model, [t], eval_tokens, {hook: store_mean}, batch_size=4)["dictionaries"][0]
    r = res["dictionaries"][0]
    assert r["ce_mean"] == pytest.approx(ref["ce_mean"], abs=1e-6) and r["ce_clean"] == pytest.approx(ref["ce_clean"], abs=1e-6)
    assert r["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)


def test_store_errors(tiny_model_dir, saved, eval_store, tmp_path, capsys, monkeypatch):
    path, no_eval = eval_store
    args = ["splice-eval", "--model", tiny_model_dir, "--dict", str(saved["resid"])]
    expect_error([*args, "--store", str(no_eval)], capsys, monkeypatch, "no evaluation tokens", "--holdout")
    from conftest import write_tiny_gpt2

    other = write_tiny_gpt2(tmp_path / "other", seed=3)
    expect_error(["splice-eval", "--model", other, "--dict", str(saved["resid"]), "--store", str(path)],
                 capsys, monkeypatch, "store", "fingerprint")


# --- --finetuned: the talk's table from a `saekit finetune` folder ----------------------------------

@pytest.fixture(scope="module")
def finetuned(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """A tiny finetune run (two codebooks, baseline on): its report.json is the reference."""
    from saekit.inmodel.finetune import FinetuneConfig, finetune
    from saekit.config import from_flags

    out = tmp_path_factory.mktemp("ft") / "run"
    cfg = from_flags(FinetuneConfig, model=tiny_model_dir, data=tiny_text_file, out=str(out),
                            codebooks="attn[0]:k=1,groups=heads,codes=8;mlp[1]:k=2,codes=16", steps=4, batch_size=4,
                            seq_len=16, eval_sequences=8, init_rows=256, checkpoint_every=0, lr=1e-2, codebook_lr=1e-2)
    finetune(cfg, progress=False)
    return out


def test_finetuned_table_matches_the_finetune_report(tiny_model_dir, finetuned, tmp_path, capsys, monkeypatch):
    """splice-eval (bridge, splice's own code) on the run's held-out tokens reproduces finetune's table (HF forward)."""
    out = tmp_path / "ft.json"
    code, stdout, err = run_cli(["splice-eval", "--finetuned", str(finetuned), "--json", str(out)], capsys, monkeypatch)
    assert code == 0, err
    res = json.loads(out.read_text())
    report = json.loads((finetuned / "report.json").read_text())
    got = {r["model"]: r for r in res["finetuned"]["table"]}
    assert list(got) == [r["model"] for r in report["table"]]
    for ref in report["table"]:
        assert got[ref["model"]]["loss"] == pytest.approx(ref["loss"], abs=1e-4), ref["model"]
        assert got[ref["model"]]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6), ref["model"]
    # The rows are different models: fine-tuning at lr 1e-2 moved the loss; the codebooks change it again.
    losses = [r["loss"] for r in res["finetuned"]["table"]]
    assert len({round(v, 5) for v in losses}) == len(losses)
    # The codebook model's per-codebook splice rows are there too, and the printed table names every row.
    assert sorted(r["hook"] for r in res["dictionaries"]) == ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]
    assert res["eval"]["scored_positions"] == report["table"][0]["tokens"]
    for name in got:
        assert name in stdout


def test_finetuned_freeze_model_and_errors(tiny_model_dir, tiny_text_file, finetuned, tmp_path, capsys, monkeypatch):
    from saekit.inmodel.finetune import FinetuneConfig, finetune
    from saekit.config import from_flags
    from saekit.inmodel.report import finetuned_eval

    frozen = tmp_path / "frozen"
    finetune(from_flags(FinetuneConfig, model=tiny_model_dir, data=tiny_text_file, out=str(frozen), codebooks="mlp[1]:k=2,codes=16",
                                  steps=2, batch_size=4, seq_len=16, eval_sequences=8, init_rows=256, checkpoint_every=0,
                                  freeze_model=True), progress=False)
    res = finetuned_eval(SpliceConfig(finetuned=str(frozen)))
    report = json.loads((frozen / "report.json").read_text())
    assert [r["model"] for r in res["finetuned"]["table"]] == ["original", "codebook model"]
    for r, ref in zip(res["finetuned"]["table"], report["table"]):
        assert r["loss"] == pytest.approx(ref["loss"], abs=1e-4)

    expect_error(["splice-eval", "--finetuned", str(tmp_path / "nope")], capsys, monkeypatch, "does not exist")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    expect_error(["splice-eval", "--finetuned", str(unfinished)], capsys, monkeypatch, "report.json", "--resume")
    expect_error(["splice-eval", "--finetuned", str(finetuned), "--dict", str(frozen / "codebooks")], capsys, monkeypatch,
                 "drop --dict")
