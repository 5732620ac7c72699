"""`saekit harvest`, `info` and `hooks` on the tiny fixture GPT-2, checked against plain `transformers`."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.harvest import HarvestConfig, harvest
from saekit.store import MANIFEST, ActivationStore, sha256_file

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]


def run_cli(args, capsys, monkeypatch):
    """Run the real entry point in-process: (exit code, stdout, stderr)."""
    from saekit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def hf_reference(model_dir, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The same hooks from a plain transformers forward (no TransformerLens involved)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    got = {}
    h1 = hf.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: got.__setitem__("mlp1", o))
    # attn.hook_z is the per-head attention output before the output projection (c_proj), heads merged.
    h2 = hf.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, i: got.__setitem__("z0", i[0]))
    try:
        with torch.no_grad():
            inp = torch.from_numpy(np.where(tokens == -1, 0, tokens)).long()
            out = hf(inp, output_hidden_states=True)
    finally:
        h1.remove()
        h2.remove()
    return {
        "blocks.0.hook_resid_post": out.hidden_states[1].numpy(),
        "blocks.1.hook_mlp_out": got["mlp1"].numpy(),
        "blocks.0.attn.hook_z": got["z0"].numpy(),
    }


def test_float32_store_equals_transformers(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = HarvestConfig(
        model=tiny_model_dir, hooks=HOOKS, data=tiny_text_file, context_size=32, tokens=600,
        batch_size=8, dtype="float32", shard_tokens=256, out=str(tmp_path / "s"),
    )
    path = harvest(cfg, progress=False)
    st = ActivationStore(path)
    assert st.n_sequences == 19  # 600 tokens rounded up to whole 32-token sequences
    assert len(st.manifest["shards"]) == 3 and st.manifest["complete"]
    assert st.hook_shape("blocks.0.attn.hook_z") == [4, 8] and st.hook_width("blocks.0.attn.hook_z") == 32
    assert st.manifest["model"]["compat"] is False and st.manifest["text"]["packing"] == "concat"
    tokens = st.read_tokens(0, 19)
    assert (tokens[:, 0] == 0).all() and (tokens != -1).all()
    ref = hf_reference(tiny_model_dir, tokens)
    for h in HOOKS:
        np.testing.assert_allclose(st.read_acts(h, 0, 19), ref[h], atol=1e-5, rtol=1e-5, err_msg=h)
    # Manifest statistics agree with the stored rows (BOS excluded).
    rows = st.read_acts(HOOKS[0], 0, 19)[:, 1:].reshape(-1, 32).astype(np.float64)
    s = st.stats(HOOKS[0])
    assert s["count"] == len(rows)
    np.testing.assert_allclose(s["mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
    assert s["scale"] == pytest.approx(np.sqrt(32 / (rows**2).sum(1).mean()), rel=1e-6)


def test_doc_packing_float16_early_hook(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = HarvestConfig(
        model=tiny_model_dir, hooks=["blocks.0.hook_resid_post"], data=tiny_text_file, context_size=64,
        packing="doc", tokens=64 * 10, batch_size=4, out=str(tmp_path / "s"),
    )
    st = ActivationStore(harvest(cfg, progress=False))
    tokens = st.read_tokens(0, st.n_sequences)
    assert st.n_sequences == 10 and st.dtype == "float16"
    lines = [l for l in Path(tiny_text_file).read_text().splitlines() if l.strip()][:10]
    lengths = (tokens != -1).sum(1)
    assert lengths.tolist() == [min(64, 1 + len(l)) for l in lines]  # character-level tokenizer: one token per char
    assert (tokens[lengths < 64, -1] == -1).all()  # short documents are padded with -1
    acts = st.read_acts("blocks.0.hook_resid_post", 0, 10)
    ref = hf_reference(tiny_model_dir, tokens)["blocks.0.hook_resid_post"]
    mask = st.row_mask(tokens)
    np.testing.assert_allclose(acts[mask], ref[mask], rtol=2e-3, atol=2e-3)


RESUME_SCRIPT = """
import sys, time
import saekit.harvest as h
_capture = h.capture
def slow(*a, **k):  # slows the forward so the test can kill the run between shards
    time.sleep(0.1)
    return _capture(*a, **k)
h.capture = slow
from saekit_cli.main import main
sys.argv = ["saekit", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_resume_after_sigkill_equals_clean_run(tiny_model_dir, tiny_text_file, tmp_path):
    opts = dict(
        model=tiny_model_dir, hooks=HOOKS[:2], data=tiny_text_file, context_size=32, batch_size=4,
        shard_tokens=256, tokens=32 * 64,
    )
    killed = tmp_path / "killed"
    args = ["harvest", "--quiet", "--out", str(killed)]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", ",".join(v) if isinstance(v, list) else str(v)]
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    n_listed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n_listed = len(json.loads((killed / MANIFEST).read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            n_listed = 0
        if n_listed >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((killed / MANIFEST).read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < 8

    from saekit.models import load_model

    lm = load_model(tiny_model_dir)  # loaded once for both runs below (saves time; same weights)
    harvest(HarvestConfig(**opts, out=str(killed)), progress=False, model=lm)  # the same command again
    harvest(HarvestConfig(**opts, out=str(tmp_path / "clean")), progress=False, model=lm)
    a, b = ActivationStore(killed), ActivationStore(tmp_path / "clean")
    assert a.complete and a.n_sequences == b.n_sequences == 64
    np.testing.assert_array_equal(a.read_tokens(0, 64), b.read_tokens(0, 64))
    for h in HOOKS[:2]:
        np.testing.assert_array_equal(a.read_acts(h, 0, 64), b.read_acts(h, 0, 64))
        assert a.stats(h)["count"] == b.stats(h)["count"]
        np.testing.assert_allclose(a.stats(h)["mean"], b.stats(h)["mean"], rtol=1e-6)
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in killed.iterdir()}
    harvest(HarvestConfig(**opts, out=str(killed)), progress=False)  # complete: a no-op
    assert {p.name: p.stat().st_mtime_ns for p in killed.iterdir()} == before


@pytest.fixture(scope="module")
def small_store(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    cfg = HarvestConfig(model=tiny_model_dir, hooks=HOOKS[:2], data=tiny_text_file, context_size=16, tokens=16 * 24, shard_tokens=16 * 8, out=str(out))
    harvest(cfg, progress=False)
    return out, cfg


def test_different_config_refused_nothing_touched(small_store, capsys, monkeypatch):
    out, cfg = small_store
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in out.iterdir()}
    code, _, err = run_cli(
        ["harvest", "--model", cfg.model, "--hooks", ",".join(cfg.hooks), "--data", cfg.data, "--context-size", 32, "--out", out],
        capsys, monkeypatch,
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "different config" in err and "context_size" in err and "another --out" in err
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in out.iterdir()} == before


def test_info_and_verify(small_store, tmp_path, capsys, monkeypatch):
    import shutil

    out, cfg = small_store
    code, text, _ = run_cli(["info", out, "--verify"], capsys, monkeypatch)
    assert code == 0
    for word in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "float16", "24 × 16", "shards", "all shards ok"):
        assert word in text, word
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    shard = damaged / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["info", damaged, "--verify"], capsys, monkeypatch)
    assert code == 2 and "shard-00001.h5" in err and "shard-00000.h5" not in err and err.count("\n") == 1


def test_hooks_command(tiny_model_dir, capsys, monkeypatch):
    code, text, _ = run_cli(["hooks", "--model", tiny_model_dir], capsys, monkeypatch)
    assert code == 0 and "blocks.{L}.hook_resid_post" in text and "blocks.{L}.attn.hook_z" in text and "0..1" in text


def _bad_data(tmp_path: Path, kind: str) -> str:
    if kind == "empty":
        p = tmp_path / "empty.txt"
        p.write_text("\n  \n\n")
    elif kind == "latin1":
        p = tmp_path / "latin1.txt"
        p.write_bytes("ok line\nna\xefve\n".encode("latin-1"))
    else:
        p = tmp_path / "missing.txt"
    return str(p)


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("empty", [], "no text in"),
        ("latin1", [], "latin1.txt line 2 is not UTF-8"),
        ("missing", [], "missing.txt does not exist"),
        ("ok", ["--context-size", "65"], "larger than the model's context (64)"),
        ("ok", ["--hooks", "blocks.0.hook_resid_pots"], "did you mean blocks.0.hook_resid_post"),
        ("ok", ["--dtype", "float8"], "dtype 'float8' is not one of"),
    ],
)
def test_cli_errors_are_one_line(case, extra, expected, tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    data = tiny_text_file if case == "ok" else _bad_data(tmp_path, case)
    args = ["harvest", "--quiet", "--model", tiny_model_dir, "--hooks", HOOKS[0], "--data", data, "--context-size", 16, "--out", tmp_path / "s", *extra]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    if case != "latin1":  # refused before anything was written
        assert not (tmp_path / "s").exists()


def test_inline_and_background_threads_write_the_same_store(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """With no core free for them (can_overlap False), tokenising and writing run in the caller: same files."""
    import saekit.harvest as hv

    stores = {}
    for overlap in (True, False):
        monkeypatch.setattr(hv, "can_overlap", lambda device, o=overlap: o)
        cfg = HarvestConfig(model=tiny_model_dir, hooks=HOOKS[:2], data=tiny_text_file, context_size=16, tokens=16 * 40,
                            batch_size=4, shard_tokens=16 * 16, out=str(tmp_path / f"o{overlap}"))
        stores[overlap] = Path(harvest(cfg, progress=False))
    a, b = (json.loads((stores[o] / MANIFEST).read_text()) for o in (True, False))
    assert len(a["shards"]) == 3 and a["shards"] == b["shards"] and a["stats"] == b["stats"]  # sha256 per shard included


@pytest.mark.parametrize("overlap", [True, False])
def test_unwritable_and_full_disk(overlap, tiny_model_dir, tiny_text_file, tmp_path, capsys, monkeypatch):
    import saekit.harvest as hv
    import saekit.store.writer as store_mod  # the module that opens shards

    monkeypatch.setattr(hv, "can_overlap", lambda device: overlap)  # False: the writer runs in the caller's thread

    args = ["harvest", "--quiet", "--model", tiny_model_dir, "--hooks", HOOKS[0], "--data", tiny_text_file, "--context-size", 16, "--tokens", 160]

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", denied)
        code, _, err = run_cli([*args, "--out", tmp_path / "ro"], capsys, monkeypatch)
    assert code == 2 and "permission denied" in err and "ro" in err and err.count("\n") == 1

    real_file = store_mod.h5py.File

    def full(name, mode="r", *a, **k):
        if mode == "w":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(name, mode, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(store_mod.h5py, "File", full)
        code, _, err = run_cli([*args, "--out", tmp_path / "full"], capsys, monkeypatch)
    assert code == 2 and "disk full" in err and "shard-00000.h5.tmp" in err and err.count("\n") == 1
    manifest = json.loads((tmp_path / "full" / MANIFEST).read_text())
    assert manifest["shards"] == [] and sorted(p.name for p in (tmp_path / "full").iterdir()) == [MANIFEST]
