"""Hostile inputs from outside: every command, odd options and damaged files, each in a fresh process.

    .venv/bin/python scripts/hostile.py [--only SUBSTRING] [--json OUT]

A case passes when the command exits 2 with exactly one line on stderr starting `error:`,
no traceback anywhere, and (for cases with an --out) nothing left under that name.  The
fixtures (a small synthetic store, a dictionary trained on it, a toy corpus) are built
once in a temporary folder.  Prints one line per failing case and the count handled
cleanly; exits 1 when any case fails.  Slow on purpose (one interpreter per case): run it
by hand, the unit tests in tests/test_hostile.py cover the same promise in-process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SAEKIT = [sys.executable, "-m", "saekit_cli.main"]
HOOK = "synth"


def saekit(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SAEKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def fixtures(root: Path) -> dict[str, Path]:
    """A 4k-row synthetic store, one TopK dictionary trained on it, a toy corpus and a TOML file."""
    store, dicts = root / "store", root / "dicts"
    r = saekit("synth", "--out", store, "--n-features", 32, "--d", 16, "--rows", 4096, "--l0", 3)
    assert r.returncode == 0, r.stderr
    r = saekit("train", "--store", store, "--kind", "topk", "--k", 4, "--d-dict", 64, "--tokens", 2048, "--batch-size", 256,
               "--init-rows", 512, "--eval-tokens", 256, "--out", dicts)
    assert r.returncode == 0, r.stderr
    [d] = [p.parent for p in dicts.rglob("config.json")]
    r = saekit("toy", "data", "--out", root / "toy.txt", "--n-seq", 20)
    assert r.returncode == 0, r.stderr
    return {"store": store, "dict": d, "toy": root / "toy.txt"}


def damaged_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _json_edit(name: str, fn):
    def edit(folder: Path):
        p = folder / name
        data = json.loads(p.read_text())
        fn(data)
        p.write_text(json.dumps(data))
    return edit


def _truncate(name: str, keep: float):
    def edit(folder: Path):
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return edit


def _header_len(name: str, n: int):
    def edit(folder: Path):
        p = folder / name
        data = p.read_bytes()
        p.write_bytes(struct.pack("<Q", n) + data[8:])
    return edit


def cases(fx: dict[str, Path], tmp: Path) -> dict[str, list]:
    """name → argv (after `saekit`); `{out}` is replaced by a fresh path that must not exist afterwards."""
    st, d, toy = fx["store"], fx["dict"], fx["toy"]
    toml = tmp / "c.toml"
    c: dict[str, list] = {}
    # -- train: options of this session (nested arch, automatic lr) and old ones ----------------------
    for name, extra in {
        "lr 0": ["--lr", "0"], "lr -1": ["--lr", "-1"], "lr nan": ["--lr", "nan"], "lr 1e400": ["--lr", "1e400"],
        "kind unknown": ["--kind", "transcoderx"], "similarity odd": ["--kind", "codebook", "--similarity", "euclid"],
        "d-dict negative": ["--d-dict", "-64"], "groups 0": ["--kind", "codebook", "--groups", "0"],
        "groups without codebook": ["--groups", "2"], "groups not dividing": ["--kind", "codebook", "--groups", "3", "--d-dict", "64"],
        "k >= d-dict": ["--d-dict", "8", "--k", "8"], "k repeated": ["--k", "4,4"], "k empty": ["--k", ","],
        "k word": ["--k", "four"], "l1 negative": ["--kind", "relu", "--l1", "-1"], "l1 repeated": ["--kind", "relu", "--l1", "1,1.0"],
        "expansion 0": ["--expansion", "0"], "passes 0": ["--passes", "0"], "passes nan": ["--passes", "nan"],
        "placement odd": ["--placement", "rows"], "objective odd": ["--objective", "online"], "hooks missing": ["--hooks", "nope"],
        "hooks empty": ["--hooks", ","], "batch-size 0": ["--batch-size", "0"], "tokens 0": ["--tokens", "0"],
        "aux-coef inf": ["--aux-coef", "inf"], "dead-tokens -1": ["--dead-tokens", "-1"], "l1-warmup 2": ["--l1-warmup", "2"],
        "device odd": ["--device", "tpu"], "e2e without hooks": ["--objective", "e2e"],
    }.items():
        c[f"train {name}"] = ["train", "--store", st, "--out", "{out}", *extra]
    c["train store missing"] = ["train", "--store", tmp / "nowhere", "--out", "{out}"]
    c["train store is a file"] = ["train", "--store", toy, "--out", "{out}"]
    c["train out is a file"] = ["train", "--store", st, "--out", toy]
    toml_cases = {
        "toml arch not a table": 'arch = "relu"\n', "toml arch unknown key": '[arch]\nkinds = "relu"\n',
        "toml arch groups a word": '[arch]\ngroups = "two"\n', "toml arch.k set": '[arch]\nk = 8\n',
        "toml arch.d_in set": '[arch]\nd_in = 16\n', "toml not toml": 'kind = relu\n', "toml lr 0": 'lr = 0\n',
        "toml unknown field": 'batchsize = 3\n', "toml k a table": '[k]\nx = 1\n', "toml kind a list": 'kind = ["relu"]\n',
    }
    for name, text in toml_cases.items():
        path = tmp / f"{name.replace(' ', '_')}.toml"
        path.write_text(text)
        c[f"train {name}"] = ["train", "--store", st, "--out", "{out}", "--config", path]
    bad_utf8 = tmp / "bad.toml"
    bad_utf8.write_bytes(b"kind = '\xff\xfe'\n")
    c["train toml not utf-8"] = ["train", "--store", st, "--out", "{out}", "--config", bad_utf8]
    c["train toml a folder"] = ["train", "--store", st, "--out", "{out}", "--config", tmp]
    toml.write_text("")
    # -- damaged dictionaries, through every reader ---------------------------------------------------
    damages = {
        "config not json": lambda f: (f / "config.json").write_text("{nope"),
        "config empty": lambda f: (f / "config.json").write_text(""),
        "config a list": lambda f: (f / "config.json").write_text("[]"),
        "arch missing": _json_edit("config.json", lambda c: c.pop("arch")),
        "arch kind odd": _json_edit("config.json", lambda c: c["arch"].update(kind="sparse")),
        "arch d_dict huge": _json_edit("config.json", lambda c: c["arch"].update(d_dict=10**12)),
        "arch d_dict a string": _json_edit("config.json", lambda c: c["arch"].update(d_dict="64")),
        "arch k true": _json_edit("config.json", lambda c: c["arch"].update(k=True)),
        "arch k nan": _json_edit("config.json", lambda c: c["arch"].update(k=float("nan"))),
        "arch groups 0": _json_edit("config.json", lambda c: c["arch"].update(groups=0)),
        "arch extra field": _json_edit("config.json", lambda c: c["arch"].update(width=3)),
        "provenance scale inf": _json_edit("config.json", lambda c: c["provenance"].update(scale=float("inf"))),
        "provenance hook a number": _json_edit("config.json", lambda c: c["provenance"].update(hook=7)),
        "weights truncated": _truncate("weights.safetensors", 0.5),
        "weights empty": _truncate("weights.safetensors", 0.0),
        "weights header huge": _header_len("weights.safetensors", 1 << 40),
        "weights missing": lambda f: (f / "weights.safetensors").unlink(),
        "weights a folder": lambda f: ((f / "weights.safetensors").unlink(), (f / "weights.safetensors").mkdir()),
    }
    for name, edit in damages.items():
        bad = damaged_copy(d, tmp / "dmg" / name.replace(" ", "_"), edit)
        c[f"export dict {name}"] = ["export", "--dict", bad, "--out", "{out}"]
        c[f"analyze dict {name}"] = ["analyze", "--dict", bad, "--store", st, "--out", "{out}", "--no-logits"]
        c[f"truth dict {name}"] = ["eval", "truth", "--truth", st, "--dict", bad]
    # -- damaged stores --------------------------------------------------------------------------------
    store_damage = {
        "manifest not json": lambda f: (f / "manifest.json").write_text("{"),
        "manifest missing": lambda f: (f / "manifest.json").unlink(),
        "manifest hooks a list": _json_edit("manifest.json", lambda m: m.update(hooks=[HOOK])),
        "manifest context -1": _json_edit("manifest.json", lambda m: m.update(context_size=-1)),
        "manifest width edited": _json_edit("manifest.json", lambda m: next(iter(m["hooks"].values())).update(
            shape=[3]) if isinstance(m.get("hooks"), dict) else None),
    }
    for name, edit in store_damage.items():
        bad = damaged_copy(st, tmp / "sdmg" / name.replace(" ", "_"), edit)
        c[f"train store {name}"] = ["train", "--store", bad, "--out", "{out}", "--tokens", 512, "--batch-size", 256]
        c[f"info store {name}"] = ["info", bad, "--verify"]
        c[f"truth store {name}"] = ["eval", "truth", "--truth", bad, "--dict", d]
    # -- other commands' odd options ---------------------------------------------------------------------
    c.update({
        "synth rows 0": ["synth", "--out", "{out}", "--rows", "0"],
        "synth d -3": ["synth", "--out", "{out}", "--d", "-3"],
        "synth correlation 2": ["synth", "--out", "{out}", "--correlation", "2"],
        "synth noise nan": ["synth", "--out", "{out}", "--noise", "nan"],
        "synth magnitude odd": ["synth", "--out", "{out}", "--magnitude", "cauchy"],
        "synth out exists": ["synth", "--out", st],
        "store import missing": ["store", "import", "--acts", tmp / "none.npy", "--hook", "h", "--out", "{out}"],
        "store import not npy": ["store", "import", "--acts", toy, "--hook", "h", "--out", "{out}"],
        "toy data n-seq 0": ["toy", "data", "--out", "{out}", "--n-seq", "0"],
        "toy train lr 0": ["toy", "train", "--out", "{out}", "--lr", "0"],
        "toy train n-head not dividing": ["toy", "train", "--out", "{out}", "--d-model", "30", "--n-head", "4"],
        "toy train ctx too short": ["toy", "train", "--out", "{out}", "--ctx", "2"],
        "toy train fsm missing": ["toy", "train", "--out", "{out}", "--fsm", tmp / "none.npy"],
        "toy train steps -1": ["toy", "train", "--out", "{out}", "--steps", "-1"],
        "pycode train vocab 10": ["pycode", "train", "--out", "{out}", "--vocab-size", "10"],
        "pycode train n-layer 0": ["pycode", "train", "--out", "{out}", "--n-layer", "0"],
        "pycode train threads -2": ["pycode", "train", "--out", "{out}", "--threads", "-2"],
        "finetune codebooks empty": ["finetune", "--model", "toy", "--codebooks", "", "--out", "{out}"],
        "finetune codebooks odd site": ["finetune", "--model", "toy", "--codebooks", "foo:k=2", "--out", "{out}"],
        "finetune log-every 0": ["finetune", "--model", "toy", "--codebooks", "mlp:k=2", "--log-every", "0", "--out", "{out}"],
        "finetune checkpoint-every -1": ["finetune", "--model", "toy", "--codebooks", "mlp:k=2", "--checkpoint-every", "-1", "--out", "{out}"],
        "finetune data and store": ["finetune", "--model", "toy", "--codebooks", "mlp:k=2", "--data", toy, "--store", st, "--out", "{out}"],
        "splice dict missing": ["splice-eval", "--model", "toy", "--dict", tmp / "none"],
        "splice dict above dicts": ["splice-eval", "--model", "toy", "--dict", tmp, "--store", st],
        "splice wrong model": ["splice-eval", "--model", "toy", "--dict", d, "--store", st],
        "steer strength inf": ["steer", "--model", "toy", "--dict", d, "--feature", "1.3", "--strength", "inf"],
        "steer feature odd": ["steer", "--model", "toy", "--dict", d, "--feature", "1.x"],
        "steer feature out of range": ["steer", "--model", "toy", "--dict", d, "--feature", "1.9999"],
        "hooks model missing": ["hooks", "--model", tmp / "nomodel"],
        "harvest data missing": ["harvest", "--model", "toy", "--hooks", "blocks.0.hook_resid_post", "--data", tmp / "none.txt", "--out", "{out}"],
        "harvest hook odd": ["harvest", "--model", "toy", "--hooks", "blocks.9.hook_x", "--data", toy, "--out", "{out}"],
        "harvest model pickle-only": ["harvest", "--model", "{pickle_model}", "--hooks", "blocks.0.hook_resid_post", "--data", toy, "--out", "{out}"],
        "pipeline expansion 0": ["pipeline", "--out", "{out}", "--expansion", "0"],
        "pipeline train-tokens -1": ["pipeline", "--out", "{out}", "--train-tokens", "-1"],
        "export format odd": ["export", "--dict", d, "--out", "{out}", "--format", "onnx"],
        "intervene dicts missing": ["intervene", "--dicts", tmp / "none"],
        "truth not a synth store": ["eval", "truth", "--truth", tmp, "--dict", d],
    })
    return c


def judge(r: subprocess.CompletedProcess, out: Path | None) -> str | None:
    """None when the case was handled cleanly, else what went wrong."""
    text = r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    if "Traceback" in text:
        return "traceback: " + text.strip().splitlines()[-1][:160]
    if r.returncode != 2:
        return f"exit {r.returncode}: " + (lines[-1][:160] if lines else text.strip()[-160:])
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return f"{len(lines)} lines: " + " | ".join(lines)[:200]
    if out is not None and out.exists():
        return f"left {out} behind"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--json", default="", help="write {case: verdict} here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="saekit-hostile-") as t:
        tmp = Path(t)
        fx = fixtures(tmp)
        pickle_model = tmp / "pickle-model"
        pickle_model.mkdir()
        (pickle_model / "config.json").write_text('{"model_type": "gpt2"}')
        (pickle_model / "pytorch_model.bin").write_bytes(b"never unpickled")
        todo = {n: v for n, v in cases(fx, tmp).items() if a.only in n}
        verdicts = {}
        for i, (name, argv) in enumerate(todo.items()):
            out = tmp / "outs" / f"o{i}"
            argv = [str(x).replace("{out}", str(out)).replace("{pickle_model}", str(pickle_model)) for x in argv]
            try:
                r = saekit(*argv)
                bad = judge(r, out if str(out) in argv else None)
            except subprocess.TimeoutExpired:
                bad = "timed out"
            verdicts[name] = bad or "clean"
            if bad:
                print(f"FAIL {name}: {bad}", flush=True)
        clean = sum(v == "clean" for v in verdicts.values())
        print(f"{clean}/{len(verdicts)} cases handled cleanly (one line, exit 2, no traceback, nothing left under --out)")
        if a.json:
            Path(a.json).write_text(json.dumps(verdicts, indent=1))
    return 0 if clean == len(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
