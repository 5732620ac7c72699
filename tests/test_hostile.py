"""Damaged files, hostile folders and odd options, generated systematically: each must end in one line.

Every case runs the real entry point in-process (`saekit_cli.main.main`) and asserts exit
code 2, exactly one output line, starting `error:`, no traceback, and no damaged output
(the --out folder is absent afterwards, or unchanged).  Property-style tests mutate
configs and manifests at random (seeded) and require each result to be either a clean
load or that one line, never another exception.  Nothing here loads a model except the
pickle-folder cases.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from saekit.dictionaries import DictConfig, Provenance, build

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_DICT, K = 8, 32, 4
HOOK = "blocks.1.hook_resid_post"


# --- running the CLI and judging its output ------------------------------------------------------

def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`saekit ARGS` in-process: (exit code, stdout + stderr)."""
    from saekit_cli.main import main

    monkeypatch.setattr(sys, "argv", ["saekit", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out + err


def assert_one_line(code: int, text: str, needle: str | None = None) -> None:
    lines = text.strip().splitlines()
    assert code == 2, f"exit {code}: {text[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-2000:]
    assert "Traceback" not in text
    if needle:
        assert needle.lower() in lines[0].lower(), lines[0]


def snapshot(folder: Path) -> dict | None:
    """Names and bytes of everything under `folder` (None when it does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


# --- fixtures: one dictionary in each format, one small store --------------------------------------

def _dictionary(kind="topk"):
    g = torch.Generator().manual_seed(0)
    prov = Provenance(hook=HOOK, hook_shape=[D_IN], scale=0.5, model={"name": "toy", "fingerprint": "abc", "compat": False})
    d = build(DictConfig(kind=kind, d_in=D_IN, d_dict=D_DICT, k=K if kind != "relu" else None), prov)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return d


def make_saekit(folder: Path) -> Path:
    return _dictionary().save(folder)


def make_saelens(folder: Path) -> Path:
    from saekit.interop.saelens import export_saelens

    folder = export_saelens(_dictionary("relu"), folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 2.0}))
    return folder


def make_sparsify(folder: Path) -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_DICT, "k": K, "d_in": D_IN,
                                                 "transcode": False, "skip_connection": False, "normalize_decoder": True}))
    save_file({"encoder.weight": torch.randn(D_DICT, D_IN, generator=g), "encoder.bias": torch.zeros(D_DICT),
               "W_dec": torch.randn(D_DICT, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}, str(folder / "sae.safetensors"))
    return folder


def make_saelens_transcoder(folder: Path) -> Path:
    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.interop.saelens import export_saelens

    d = build(DictConfig(kind="skip-transcoder", d_in=D_IN, d_out=D_IN, d_dict=D_DICT, activation="relu"),
              Provenance(hook="blocks.0.mlp.hook_in", in_hooks=["blocks.0.mlp.hook_in"], out_hooks=["blocks.0.hook_mlp_out"]))
    d.reset_parameters(torch.Generator().manual_seed(1))
    return export_saelens(d, folder)


def make_sparsify_transcoder(folder: Path) -> Path:
    make_sparsify(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"transcode": True}))
    return folder


FORMATS = {
    "saekit": (make_saekit, "config.json", "weights.safetensors"),
    "saelens": (make_saelens, "cfg.json", "sae_weights.safetensors"),
    "sparsify": (make_sparsify, "cfg.json", "sae.safetensors"),
    "saelens-transcoder": (make_saelens_transcoder, "cfg.json", "sae_weights.safetensors"),
    "sparsify-transcoder": (make_sparsify_transcoder, "cfg.json", "sae.safetensors"),
}


@pytest.fixture(scope="module")
def store_dir(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    from saekit.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("hostile") / "store"
    cfg = HarvestConfig(model=tiny_model_dir, hooks=[HOOK], data=tiny_text_file, context_size=16, tokens=16 * 40,
                        batch_size=8, shard_tokens=16 * 20, out=str(out), holdout=0.1)
    return Path(harvest(cfg, progress=False))


def copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --- dictionary folders: corruptions × formats × commands ------------------------------------------

def _set(path: Path, keys: tuple, value) -> None:
    raw = json.loads(path.read_text())
    obj = raw
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = value
    path.write_text(json.dumps(raw))


def _delete(path: Path, keys: tuple) -> None:
    raw = json.loads(path.read_text())
    obj = raw
    for k in keys[:-1]:
        obj = obj[k]
    del obj[keys[-1]]
    path.write_text(json.dumps(raw))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _header(path: Path, edit) -> None:
    """Rewrite a safetensors header (keeping the data bytes) after `edit(header_dict)`."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def _first_matrix(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)


WEIGHT_DAMAGE = {
    "truncated half": lambda p: _truncate(p, 0.5),
    "truncated last byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "only 4 bytes": lambda p: _truncate(p, 0.0) or p.write_bytes(b"\x10\x00\x00\x00"),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(300)),
    "header length huge": lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + p.read_bytes()[8:]),
    "header not json": lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{{{{{" + p.read_bytes()[8:]),
    "shape claims 1e12": lambda p: _header(p, lambda h: h[_first_matrix(h)].__setitem__("shape", [10**6, 10**6])),
    "tensor renamed": lambda p: _header(p, lambda h: h.__setitem__("renamed", h.pop(_first_matrix(h)))),
    "int dtype": lambda p: _header(p, lambda h: h[_first_matrix(h)].__setitem__("dtype", "I32")),
    "shape transposed": lambda p: _header(p, lambda h: h[_first_matrix(h)].__setitem__("shape", h[_first_matrix(h)]["shape"][::-1])),
}

CONFIG_DAMAGE = {
    "saekit": {
        "not json": lambda p: p.write_text("{not json"),
        "a list": lambda p: p.write_text("[1, 2]"),
        "format wrong": lambda p: _set(p, ("format",), "other"),
        "arch missing": lambda p: _delete(p, ("arch",)),
        "arch a list": lambda p: _set(p, ("arch",), [1]),
        "d_dict 1e12": lambda p: _set(p, ("arch", "d_dict"), 10**12),
        "d_dict 4e7": lambda p: _set(p, ("arch", "d_dict"), 4 * 10**7),
        "d_in 0": lambda p: _set(p, ("arch", "d_in"), 0),
        "d_in missing": lambda p: _delete(p, ("arch", "d_in")),
        "d_in string": lambda p: _set(p, ("arch", "d_in"), "8"),
        "d_in float": lambda p: _set(p, ("arch", "d_in"), 8.5),
        "k true": lambda p: _set(p, ("arch", "k"), True),
        "k 0": lambda p: _set(p, ("arch", "k"), 0),
        "k above d_dict": lambda p: _set(p, ("arch", "k"), D_DICT + 1),
        "kind unknown": lambda p: _set(p, ("arch", "kind"), "gated"),
        "groups 0": lambda p: _set(p, ("arch", "groups"), 0),
        "unknown arch field": lambda p: _set(p, ("arch", "bogus"), 1),
        "provenance a list": lambda p: _set(p, ("provenance",), []),
        "scale 0": lambda p: _set(p, ("provenance", "scale"), 0),
        "scale string": lambda p: _set(p, ("provenance", "scale"), "1"),
        "scale infinity": lambda p: p.write_text(p.read_text().replace('"scale": 0.5', '"scale": Infinity')),
        "hook a number": lambda p: _set(p, ("provenance", "hook"), 3),
    },
    "saelens": {
        "not json": lambda p: p.write_text("{"),
        "d_sae missing": lambda p: _delete(p, ("d_sae",)),
        "d_sae 1e12": lambda p: _set(p, ("d_sae",), 10**12),
        "d_in string": lambda p: _set(p, ("d_in",), "8"),
        "d_in true": lambda p: _set(p, ("d_in",), True),
        "metadata a list": lambda p: _set(p, ("metadata",), [1, 2]),
        "hook_name a number": lambda p: _set(p, ("metadata", "hook_name"), 7),
        "apply_b_dec_to_input a string": lambda p: _set(p, ("apply_b_dec_to_input",), "yes"),
        "architecture unknown": lambda p: _set(p, ("architecture",), "gated"),
        "architecture a number": lambda p: _set(p, ("architecture",), 1),
        "topk without k": lambda p: _set(p, ("architecture",), "topk"),
        "scaler infinity": lambda p: (p.parent / "activation_scaler.json").write_text('{"scaling_factor": Infinity}'),
        "scaler zero": lambda p: (p.parent / "activation_scaler.json").write_text('{"scaling_factor": 0}'),
        "scaler a string": lambda p: (p.parent / "activation_scaler.json").write_text('{"scaling_factor": "2"}'),
        "scaler not json": lambda p: (p.parent / "activation_scaler.json").write_text("2,"),
    },
    "sparsify": {
        "not json": lambda p: p.write_text("]"),
        "d_in missing": lambda p: _delete(p, ("d_in",)),
        "d_in string": lambda p: _set(p, ("d_in",), "8"),
        "k true": lambda p: _set(p, ("k",), True),
        "k a string": lambda p: _set(p, ("k",), "4"),
        "k above latents": lambda p: _set(p, ("k",), D_DICT),
        "num_latents 1e12": lambda p: _set(p, ("num_latents",), 10**12),
        "num_latents float": lambda p: _set(p, ("num_latents",), 32.0),
        "transcode a string": lambda p: _set(p, ("transcode",), "no"),
        "activation groupmax": lambda p: _set(p, ("activation",), "groupmax"),
        "activation a number": lambda p: _set(p, ("activation",), 3),
    },
}

DICT_CASES = [(fmt, "config", name) for fmt, table in CONFIG_DAMAGE.items() for name in table] + \
             [(fmt, "weights", name) for fmt in FORMATS for name in WEIGHT_DAMAGE] + \
             [(fmt, "files", name) for fmt in FORMATS for name in ("config missing", "weights missing", "weights a folder")]


def damaged_dictionary(tmp_path: Path, fmt: str, part: str, name: str) -> Path:
    make, cfg_name, w_name = FORMATS[fmt]
    folder = make(tmp_path / f"{fmt}-dict")
    if part == "config":
        CONFIG_DAMAGE[fmt][name](folder / cfg_name)
    elif part == "weights":
        WEIGHT_DAMAGE[name](folder / w_name)
    elif name == "config missing":
        (folder / cfg_name).unlink()
    elif name == "weights missing":
        (folder / w_name).unlink()
    else:
        (folder / w_name).unlink()
        (folder / w_name).mkdir()
    return folder


@pytest.mark.parametrize("fmt,part,name", DICT_CASES, ids=[f"{f}-{p}-{n}" for f, p, n in DICT_CASES])
def test_damaged_dictionary_export(fmt, part, name, tmp_path, monkeypatch, capsys):
    folder = damaged_dictionary(tmp_path, fmt, part, name)
    out = tmp_path / "export"
    code, text = run(monkeypatch, capsys, "export", "--dict", folder, "--out", out)
    assert_one_line(code, text)
    assert not out.exists()


DICT_ANALYZE = [c for c in DICT_CASES if c[2] in ("d_dict 1e12", "d_sae 1e12", "num_latents 1e12", "truncated half", "k true", "not json")]


@pytest.mark.parametrize("fmt,part,name", DICT_ANALYZE, ids=[f"{f}-{p}-{n}" for f, p, n in DICT_ANALYZE])
def test_damaged_dictionary_analyze(fmt, part, name, store_dir, tmp_path, monkeypatch, capsys):
    folder = damaged_dictionary(tmp_path, fmt, part, name)
    out = tmp_path / "analysis"
    code, text = run(monkeypatch, capsys, "analyze", "--dict", folder, "--store", store_dir, "--out", out)
    assert_one_line(code, text)
    assert not out.exists()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_valid_dictionaries_still_load(fmt, tmp_path):
    from saekit import load

    d = load(FORMATS[fmt][0](tmp_path / fmt))
    assert d.cfg.d_in == D_IN and d.cfg.d_dict == D_DICT


def test_valid_sparsify_folder_is_analysed(store_dir, tmp_path, monkeypatch, capsys):
    """sparsify records only the model's name (in the run's config.json): analyze used to fail with a TypeError."""
    from saekit.store import ActivationStore

    st = ActivationStore(store_dir)
    run_dir = tmp_path / "run"
    make_sparsify(run_dir / "layers.1")
    _set(run_dir / "layers.1" / "cfg.json", ("d_in",), st.hook_width(HOOK))
    g = torch.Generator().manual_seed(2)
    w = st.hook_width(HOOK)
    save_file({"encoder.weight": torch.randn(D_DICT, w, generator=g), "encoder.bias": torch.zeros(D_DICT),
               "W_dec": torch.randn(D_DICT, w, generator=g), "b_dec": torch.zeros(w)}, str(run_dir / "layers.1" / "sae.safetensors"))
    (run_dir / "config.json").write_text(json.dumps({"model": st.model.name}))
    code, text = run(monkeypatch, capsys, "analyze", "--dict", run_dir / "layers.1", "--store", store_dir, "--out", tmp_path / "a", "--no-logits")
    assert code == 0, text
    assert json.loads((tmp_path / "a" / "features.json").read_text()) is not None
    (run_dir / "config.json").write_text(json.dumps({"model": "some/other-model"}))
    code, text = run(monkeypatch, capsys, "analyze", "--dict", run_dir / "layers.1", "--store", store_dir, "--out", tmp_path / "b", "--no-logits")
    assert_one_line(code, text, "some/other-model")


# --- property-style: random mutations of dictionary configs --------------------------------------

def _paths(obj, prefix=()):
    for k, v in obj.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


SWAPS = [True, False, "8", 8.5, -1, 0, 10**15, [], {}, None, [8]]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_random_config_mutations_load_or_refuse(fmt, tmp_path):
    """200 random deletions / type swaps per format: each loads or raises SaekitError (never another exception)."""
    from saekit import load
    from saekit.errors import SaekitError

    make, cfg_name, _ = FORMATS[fmt]
    base = make(tmp_path / "base")
    original = json.loads((base / cfg_name).read_text())
    paths = [p for p in _paths(original) if p[0] not in ("summary", "train")]
    rng = random.Random(21)
    refused = 0
    for i in range(200):
        raw = json.loads(json.dumps(original))
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            obj = raw
            try:
                for k in path[:-1]:
                    obj = obj[k]
                if rng.random() < 0.3:
                    obj.pop(path[-1], None)
                else:
                    obj[path[-1]] = rng.choice(SWAPS)
            except (KeyError, TypeError, AttributeError):
                continue  # an earlier mutation replaced a parent
        (base / cfg_name).write_text(json.dumps(raw))
        try:
            d = load(base)
        except SaekitError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert d.cfg.d_in == D_IN and d.cfg.d_dict == D_DICT  # what loads is what the weights hold
    print(f"{fmt}: {refused}/200 mutated configs refused, the rest loaded with the weights' shapes")
    assert refused > 100  # most mutations break something (and were refused, not crashed on)


# --- store manifests: corruptions × commands --------------------------------------------------------

def _edit_manifest(store: Path, fn) -> None:
    m = json.loads((store / "manifest.json").read_text())
    fn(m)
    (store / "manifest.json").write_text(json.dumps(m))


def _flip_shard_byte(store: Path) -> None:
    p = store / "shard-00000.h5"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


MANIFEST_DAMAGE = {
    "not json": lambda s: (s / "manifest.json").write_text("{"),
    "a list": lambda s: (s / "manifest.json").write_text("[]"),
    "hooks a list": lambda s: _edit_manifest(s, lambda m: m.__setitem__("hooks", list(m["hooks"]))),
    "hooks missing": lambda s: _edit_manifest(s, lambda m: m.pop("hooks")),
    "width edited": lambda s: _edit_manifest(s, lambda m: m["hooks"][HOOK].__setitem__("width", 16)),
    "width and shape edited": lambda s: _edit_manifest(s, lambda m: m["hooks"][HOOK].update(width=16, shape=[16])),
    "width a string": lambda s: _edit_manifest(s, lambda m: m["hooks"][HOOK].__setitem__("width", "32")),
    "context_size -1": lambda s: _edit_manifest(s, lambda m: m.__setitem__("context_size", -1)),
    "context_size 0": lambda s: _edit_manifest(s, lambda m: m.__setitem__("context_size", 0)),
    "context_size edited": lambda s: _edit_manifest(s, lambda m: m.__setitem__("context_size", 8)),
    "dtype int8": lambda s: _edit_manifest(s, lambda m: m.__setitem__("dtype", "int8")),
    "shard outside the store": lambda s: _edit_manifest(s, lambda m: m["shards"][0].__setitem__("file", "../other/shard-00000.h5")),
    "shard absolute path": lambda s: _edit_manifest(s, lambda m: m["shards"][0].__setitem__("file", "/etc/passwd")),
    "shard n_seq edited": lambda s: _edit_manifest(s, lambda m: m["shards"][0].__setitem__("n_seq", m["shards"][0]["n_seq"] + 1)),
    "shard n_seq negative": lambda s: _edit_manifest(s, lambda m: m["shards"][0].__setitem__("n_seq", -5)),
    "shards a dict": lambda s: _edit_manifest(s, lambda m: m.__setitem__("shards", {})),
    "stats mean short": lambda s: _edit_manifest(s, lambda m: m["stats"][HOOK].__setitem__("mean", [0.0])),
    "stats scale infinity": lambda s: (s / "manifest.json").write_text((s / "manifest.json").read_text().replace('"scale":', '"scale": Infinity, "x":', 1)),
    "model d_model a string": lambda s: _edit_manifest(s, lambda m: m["model"].__setitem__("d_model", "32")),
    "holdout 2": lambda s: _edit_manifest(s, lambda m: m.__setitem__("holdout", {"fraction": 2})),
    "shard missing": lambda s: (s / "shard-00001.h5").unlink(),
    "shard byte flipped": _flip_shard_byte,
    "shard truncated": lambda s: _truncate(s / "shard-00000.h5", 0.5),
}
PASSES_PLAIN_INFO = {"shard byte flipped", "shard truncated", "shard missing", "shard n_seq edited", "context_size edited"}
"""Damage that only reading the shards reveals: plain `info` reads the manifest alone and rightly prints it."""

STORE_CASES = [(name, cmd) for name in MANIFEST_DAMAGE for cmd in ("info", "verify", "train")
               if not (cmd == "info" and name in PASSES_PLAIN_INFO)]


@pytest.mark.parametrize("name,cmd", STORE_CASES, ids=[f"{n}-{c}" for n, c in STORE_CASES])
def test_damaged_store(name, cmd, store_dir, tmp_path, monkeypatch, capsys):
    store = copy_store(store_dir, tmp_path / "store")
    MANIFEST_DAMAGE[name](store)
    out = tmp_path / "dicts"
    args = {"info": ["info", store], "verify": ["info", store, "--verify"],
            "train": ["train", "--store", store, "--hooks", HOOK, "--k", 4, "--expansion", 2, "--batch-size", 64,
                      "--tokens", 640, "--init-rows", 64, "--out", out]}[cmd]
    code, text = run(monkeypatch, capsys, *args)
    assert_one_line(code, text)
    assert not out.exists()
    if name == "shard byte flipped" and cmd == "train":
        assert "shard-00000.h5" in text and "damaged" in text


def test_train_verifies_each_shard_once_per_run(store_dir, tmp_path, monkeypatch):
    import saekit.store.format as fmt
    from saekit.store import ActivationStore

    store = copy_store(store_dir, tmp_path / "store")
    calls = []
    real = fmt.sha256_file
    monkeypatch.setattr(fmt, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    for _ in range(2):
        st = ActivationStore(store)
        for _ in st.iter_sequences(HOOK, split="all", batch_seqs=7):
            pass
        st.close()
    assert sorted(calls) == sorted(s["file"] for s in st.manifest["shards"])  # each once, though read twice


@pytest.mark.parametrize("seed", range(4))
def test_random_manifest_mutations_read_or_refuse(seed, store_dir, tmp_path):
    """50 random field deletions / type swaps / range breaks per seed: reading raises SaekitError or reads exactly."""
    from saekit.errors import SaekitError
    from saekit.store import ActivationStore

    store = copy_store(store_dir, tmp_path / "store")
    original = json.loads((store / "manifest.json").read_text())
    reference = ActivationStore(store_dir).read_acts(HOOK, 0, 3)
    paths = [p for p in _paths(original) if p[0] not in ("config", "text", "config_hash")]
    rng = random.Random(seed)
    refused = 0
    for _ in range(50):
        raw = json.loads(json.dumps(original))
        path = rng.choice(paths)
        obj = raw
        for k in path[:-1]:
            obj = obj[k]
        if rng.random() < 0.3:
            obj.pop(path[-1])
        else:
            obj[path[-1]] = rng.choice(SWAPS)
        (store / "manifest.json").write_text(json.dumps(raw))
        try:
            st = ActivationStore(store)
            got = st.read_acts(HOOK, 0, 3)
            st.close()
        except SaekitError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert (got == reference).all()  # a mutation that passes must not change what is read
    print(f"seed {seed}: {refused}/50 mutated manifests refused, the rest read the same activations")
    assert refused > 20


# --- options --------------------------------------------------------------------------------------

OPTION_CASES = {
    "k repeated": (["train", "--k", "8,8"], "--k"),
    "l1 repeated": (["train", "--kind", "relu", "--l1", "1,1.0"], "--l1"),
    "hooks repeated (train)": (["train", "--hooks", f"{HOOK},{HOOK}"], "--hooks"),
    "lr negative": (["train", "--lr", "-1"], "--lr"),
    "lr nan": (["train", "--lr", "nan"], "--lr"),
    "lr inf": (["train", "--lr", "inf"], "--lr"),
    "eval-tokens -1": (["train", "--eval-tokens", "-1"], "--eval-tokens"),
    "batch-size 0": (["train", "--batch-size", "0"], "--batch-size"),
    "tokens negative": (["train", "--tokens", "-100"], "--tokens"),
    "k 0": (["train", "--k", "0"], "--k"),
    "grad-clip nan": (["train", "--grad-clip", "nan"], "--grad-clip"),
    "lr a word": (["train", "--lr", "fast"], None),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_odd_train_options(name, store_dir, tmp_path, monkeypatch, capsys):
    args, flag = OPTION_CASES[name]
    out = tmp_path / "o"
    code, text = run(monkeypatch, capsys, *args, "--store", store_dir, "--out", out)
    if name == "lr a word":  # Typer's own parser refuses it (its usage box, exit 2)
        assert code == 2 and "Traceback" not in text and not out.exists()
        return
    assert_one_line(code, text)
    assert flag in text or flag.strip("-").replace("-", "_") in text  # named as the option or as the config field
    assert not out.exists()


OTHER_OPTIONS = {  # (args, what the line must name: the option, so another early error cannot pass for it)
    "harvest hooks repeated": (["harvest", "--model", "toy", "--hooks", f"{HOOK},{HOOK}", "--data", "x.txt"], "--hooks"),
    "harvest holdout 1.5": (["harvest", "--model", "toy", "--hooks", HOOK, "--data", "x.txt", "--holdout", "1.5"], "holdout"),
    "harvest context-size -1": (["harvest", "--model", "toy", "--hooks", HOOK, "--data", "x.txt", "--context-size", "-1"], "context"),
    "steer strength nan": (["steer", "--dict", "d", "--feature", "1.3", "--strength", "nan"], "--strength"),
    "steer samples 0": (["steer", "--dict", "d", "--feature", "1.3", "--samples", "0"], "samples"),
    "steer feature repeated": (["steer", "--dict", "d", "--feature", "1.3,1.3"], "--feature"),
    "analyze top-n 0": (["analyze", "--dict", "d", "--store", "s", "--top-n", "0"], "top"),
    "analyze dense-threshold inf": (["analyze", "--dict", "d", "--store", "s", "--dense-threshold", "inf"], "threshold"),
    "splice max-tokens -5": (["splice-eval", "--dict", "d", "--max-tokens", "-5"], "max_tokens"),
    "finetune lr -1": (["finetune", "--model", "toy", "--lr", "-1"], "lr"),
}


@pytest.mark.parametrize("name", list(OTHER_OPTIONS))
def test_odd_options_other_commands(name, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    args, needle = OTHER_OPTIONS[name]
    args = args + (["--out", out] if args[0] in ("harvest", "analyze", "finetune") else [])
    code, text = run(monkeypatch, capsys, *args)
    assert_one_line(code, text, needle)
    assert not out.exists()


@pytest.mark.parametrize("text", ["1.٣", "1_0", "1. 5", "1.-2", "+1.2", "1..2", "1.2.", " ", "1.2e0", "0x1.2"])
def test_feature_ids_parse_strictly(text):
    from saekit.analysis.ids import parse_feature_id
    from saekit.errors import SaekitError

    d = _dictionary()
    with pytest.raises(SaekitError, match="feature id"):
        parse_feature_id(d, text)
    assert parse_feature_id(d, "1.5") == 5 and parse_feature_id(d, " 1.31 ") == 31


# --- output folders --------------------------------------------------------------------------------

def _live_lock(folder: Path, host: str | None = None) -> subprocess.Popen:
    """A lock in `folder` held by a live process (a sleeping child)."""
    from saekit.outdir import LOCK, _start_time

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": proc.pid, "host": host or socket.gethostname(), "start_ticks": _start_time(proc.pid),
                                           "started": "2026-01-01T00:00:00+00:00", "command": "train"}))
    return proc


def _commands(store_dir: Path, dict_dir: Path, out: Path) -> dict[str, list]:
    return {
        "train": ["train", "--store", store_dir, "--hooks", HOOK, "--k", 4, "--expansion", 2, "--batch-size", 64, "--tokens", 640, "--out", out],
        "analyze": ["analyze", "--dict", dict_dir, "--store", store_dir, "--out", out, "--no-logits"],
        "export": ["export", "--dict", dict_dir, "--out", out],
        "harvest": ["harvest", "--model", "toy", "--hooks", HOOK, "--data", "x.txt", "--out", out],
    }


OUT_CASES = [(c, p) for c in ("train", "analyze", "export", "harvest") for p in ("a file", "under /proc", "under a file", "locked", "locked elsewhere")]


@pytest.mark.parametrize("cmd,problem", OUT_CASES, ids=[f"{c}-{p}" for c, p in OUT_CASES])
def test_bad_output_folders(cmd, problem, store_dir, tmp_path, monkeypatch, capsys):
    dict_dir = make_saekit(tmp_path / "dict")
    out = {"a file": tmp_path / "file", "under /proc": Path("/proc/saekit-x/y"), "under a file": tmp_path / "file" / "sub",
           "locked": tmp_path / "busy", "locked elsewhere": tmp_path / "busy"}[problem]
    (tmp_path / "file").write_text("keep me")
    holder = _live_lock(out, host="elsewhere" if "elsewhere" in problem else None) if "locked" in problem else None
    before = snapshot(out)
    try:
        code, text = run(monkeypatch, capsys, *_commands(store_dir, dict_dir, out)[cmd])
    finally:
        if holder:
            holder.kill()
            holder.wait()
    needle = {"a file": "is a file", "under /proc": "saekit-x", "under a file": "not a directory",
              "locked": f"PID {holder.pid}" if holder else "", "locked elsewhere": "elsewhere"}[problem]
    assert_one_line(code, text, needle)
    assert snapshot(out) == before and (tmp_path / "file").read_text() == "keep me"


def test_stale_lock_is_taken_over_and_released(tmp_path, monkeypatch, capsys):
    from saekit.outdir import LOCK

    dict_dir = make_saekit(tmp_path / "dict")
    out = tmp_path / "out"
    holder = _live_lock(out)
    holder.kill()
    holder.wait()  # the holder is gone: its lock is stale
    code, text = run(monkeypatch, capsys, "export", "--dict", dict_dir, "--out", out)
    assert code == 0, text
    assert (out / "cfg.json").is_file() and not (out / LOCK).exists()


def test_claim_is_reentrant_and_refuses_a_second_process(tmp_path):
    from saekit.errors import SaekitError
    from saekit.outdir import LOCK, claim

    with claim(tmp_path / "o", "outer"):
        with claim(tmp_path / "o", "inner"):  # a pipeline's stage inside the pipeline's own claim
            pass
        assert (tmp_path / "o" / LOCK).exists()
        code = ("import sys; from saekit.outdir import claim\n"
                f"try:\n    claim({str(tmp_path / 'o')!r}, 'second').__enter__()\nexcept Exception as e:\n    print(e); sys.exit(3)")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 3 and f"PID {os.getpid()}" in res.stdout
    assert not (tmp_path / "o" / LOCK).exists()
    with pytest.raises(SaekitError, match="is a file"):
        with claim(_file(tmp_path), "x"):
            pass


def _file(tmp_path: Path) -> Path:
    p = tmp_path / "plain"
    p.write_text("x")
    return p


def test_disk_full_while_exporting_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import saekit.interop.saelens as sl

    def full(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(sl, "save_file", full)
    out = tmp_path / "out"
    code, text = run(monkeypatch, capsys, "export", "--dict", make_saekit(tmp_path / "dict"), "--out", out)
    assert_one_line(code, text, "disk full")
    assert not (out / "sae_weights.safetensors").exists() and not (out / "cfg.json").exists()


# --- model folders and Ctrl-C ------------------------------------------------------------------------

def test_pickle_only_model_folder_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from transformers import GPT2LMHeadModel

    folder = tmp_path / "pickled"
    folder.mkdir()
    for f in Path(tiny_model_dir).iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    torch.save(GPT2LMHeadModel.from_pretrained(tiny_model_dir).state_dict(), folder / "pytorch_model.bin")
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    capsys.readouterr()  # transformers' own loading bar above is not the command's output
    monkeypatch.setenv("SAEKIT_ALLOW_PICKLE", "0")  # restored (removed) after the test, also once --allow-pickle set it
    code, text = run(monkeypatch, capsys, "hooks", "--model", folder)
    assert_one_line(code, text, "--allow-pickle")
    assert "pytorch_model.bin" in text and "safe_serialization" in text
    code, text = run(monkeypatch, capsys, "--allow-pickle", "hooks", "--model", folder)
    assert code == 0 and "hook_resid_post" in text, text


def test_ctrl_c_prints_the_command_to_resume(tmp_path, monkeypatch, capsys):
    import saekit.interop

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(saekit.interop, "export", interrupted)  # the CLI imports it when the command runs
    code, text = run(monkeypatch, capsys, "export", "--dict", "some dir", "--out", tmp_path / "o")
    assert code == 130
    assert text.strip().splitlines() == [f"error: interrupted; rerun `saekit export --dict 'some dir' --out {tmp_path / 'o'}` to resume"]


@pytest.mark.parametrize("target", ["under /proc", "under a file", "a folder"])
def test_splice_json_target_checked_before_the_evaluation(target, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("keep me")
    path = {"under /proc": "/proc/saekit-x/r.json", "under a file": tmp_path / "file" / "r.json", "a folder": tmp_path}[target]
    code, text = run(monkeypatch, capsys, "splice-eval", "--dict", tmp_path / "no-such-dict", "--json", path)
    assert_one_line(code, text, "--json")  # refused before the (missing) dictionary is even looked at


def test_claim_turns_library_disk_errors_into_one_line(tmp_path):
    """safetensors and HDF5 name the errno only in their messages; a failed write in a claimed folder is still one line."""
    from safetensors import SafetensorError

    from saekit.errors import SaekitError
    from saekit.outdir import LOCK, claim

    for exc, needle in [(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "disk full"),
                        (RuntimeError("Can't write data (file write failed: errno = 30, error message = 'Read-only file system')"), "read-only"),
                        (PermissionError(13, "Permission denied", str(tmp_path / "x")), "permission denied")]:
        with pytest.raises(SaekitError, match=needle):
            with claim(tmp_path / "o", "train"):
                raise exc
        assert not (tmp_path / "o").exists() or not (tmp_path / "o" / LOCK).exists()
    with pytest.raises(ValueError):  # not a disk error: a bug, passed through untouched
        with claim(tmp_path / "o", "train"):
            raise ValueError("bug")


def test_resume_command_adds_resume_where_the_command_needs_it():
    from saekit_cli.main import resume_command

    assert resume_command(["train", "--store", "s", "--out", "o"]) == "saekit train --store s --out o --resume"
    assert resume_command(["--allow-pickle", "finetune", "--model", "m m"]) == "saekit --allow-pickle finetune --model 'm m' --resume"
    assert resume_command(["train", "--resume", "--out", "o"]) == "saekit train --resume --out o"
    assert resume_command(["harvest", "--out", "o"]) == "saekit harvest --out o"  # harvest resumes by itself


@pytest.mark.parametrize("cmd", ["train", "analyze", "export"])
def test_empty_out_is_refused_not_taken_as_the_current_folder(cmd, store_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["" if str(a) == "OUT" else a for a in _commands(store_dir, make_saekit(tmp_path / "dict"), Path("OUT"))[cmd]]
    code, text = run(monkeypatch, capsys, *args)
    assert_one_line(code, text, "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict"]
