"""Does SAELens itself read saekit's exports and reconstruct what saekit does?

Two halves, run in two environments (SAELens needs transformer-lens < 4, saekit 4):

1. `--make DIR` (saekit's venv): build random dictionaries of every exportable kind with a
   non-trivial input scale, export each with `saekit.interop.saelens.export_saelens` to
   DIR/<case>/, and save inputs x with saekit's reconstructions and codes beside it in
   DIR/<case>/io.safetensors.
2. `--check DIR` (SAELens's venv, see setup_saelens.sh; imports no saekit): load every
   DIR/<case>/ with `SAE.load_from_disk`, run `sae.encode` / `sae(x)` on the saved inputs
   and report the largest differences from saekit's outputs, relative to their scale.

And the other way round:

3. `--make-saelens DIR` (SAELens's venv): SAELens's own classes (standard with
   apply_b_dec_to_input off, topk with rescale_acts_by_decoder_norm, jumprelu as in Gemma
   Scope) with random weights, written by `SAE.save_model`, and their outputs.
4. `--check-import DIR` (saekit's venv): `saekit.load` each folder and compare.

Without flags it does all four: the saekit halves here, the SAELens halves in one
subprocess with --saelens-python (default $SAELENS_VENV/bin/python or
/work/venv-saelens/bin/python).  Exit status 0 only if every case agrees to float
tolerance (relative error < 1e-5) with the same active latents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOL = 1e-5
D_IN, D_DICT = 32, 128
# (case name, kind, hook, per-position hook shape)
CASES = [
    ("relu", "relu", "blocks.1.hook_resid_post", [D_IN]),
    ("topk", "topk", "blocks.1.hook_resid_post", [D_IN]),
    ("batchtopk", "batchtopk", "blocks.1.hook_resid_post", [D_IN]),
    ("relu_hook_z", "relu", "blocks.0.attn.hook_z", [4, 8]),
]


def make(out: Path) -> None:
    from saekit.dictionaries import DictConfig, Provenance, build
    from saekit.interop.saelens import export_saelens

    for case, kind, hook, shape in CASES:
        g = torch.Generator().manual_seed(len(case))
        prov = Provenance(hook=hook, hook_shape=shape, scale=0.37, model={"name": "toy", "compat": False})
        d = build(DictConfig(kind=kind, d_in=D_IN, d_dict=D_DICT, k=8 if kind != "relu" else None), prov)
        with torch.no_grad():
            for p in d.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if kind == "batchtopk":
                d.threshold.fill_(0.5)
        folder = export_saelens(d, out / case)
        x = (torch.randn(256, D_IN, generator=g) + d.b_dec.detach()) / 0.37  # hook-scale inputs
        with torch.no_grad():
            res = d(x)
        save_file({"x": x, "x_hat": res.x_hat.contiguous(), "codes": res.codes.contiguous()}, str(folder / "io.safetensors"))
        print(f"made {case}: {kind} → {json.loads((folder / 'cfg.json').read_text())['architecture']}, L0 {(res.codes > 0).sum(-1).float().mean():.1f}")


def make_saelens(out: Path) -> None:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = dict(model_name="gpt2", hook_name="blocks.3.hook_resid_pre")
    saes = {
        "sl_standard_nobdec": StandardSAE(StandardSAEConfig(D_IN, D_DICT, apply_b_dec_to_input=False, metadata=SAEMetadata(**meta))),
        "sl_topk_rescaled": TopKSAE(TopKSAEConfig(D_IN, D_DICT, k=8, rescale_acts_by_decoder_norm=True, metadata=SAEMetadata(**meta))),
        "sl_jumprelu_nobdec": JumpReLUSAE(JumpReLUSAEConfig(D_IN, D_DICT, apply_b_dec_to_input=False, metadata=SAEMetadata(**meta))),
    }
    for i, (case, sae) in enumerate(saes.items()):
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 if name == "threshold" else torch.randn(p.shape, generator=g) * 0.3)
        sae.save_model(out / case)
        x = torch.randn(256, D_IN, generator=g) + sae.b_dec.detach()
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae(x)
        save_file({"x": x, "x_hat": x_hat.contiguous(), "codes": codes.contiguous()}, str(out / case / "io.safetensors"))
        print(f"SAELens made {case}: {type(sae).__name__}, L0 {(codes > 0).sum(-1).float().mean():.1f}")


def compare(name: str, kind: str, codes, x_hat, io) -> bool:
    err_x = float((x_hat - io["x_hat"]).abs().max() / io["x_hat"].abs().max())
    err_f = float((codes - io["codes"]).abs().max() / io["codes"].abs().max().clamp_min(1e-12))
    same_support = bool(torch.equal(codes > 0, io["codes"] > 0))
    good = err_x < TOL and err_f < TOL and same_support
    print(
        f"{name:20s} {kind:12s} rel.err x̂ {err_x:.2e}  codes {err_f:.2e}  "
        f"same active latents {same_support}  {'OK' if good else 'DISAGREE'}"
    )
    return good


def check_import(root: Path) -> bool:
    import saekit

    ok = True
    for folder in sorted(p for p in root.iterdir() if (p / "io.safetensors").is_file()):
        io = load_file(str(folder / "io.safetensors"))
        d = saekit.load(folder)
        with torch.no_grad():
            res = d(io["x"])
        ok &= compare(folder.name, f"saekit {d.cfg.kind}", res.codes, res.x_hat, io)
    return ok


def check(root: Path) -> bool:
    import sae_lens
    from sae_lens import SAE

    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
    ok = True
    for folder in sorted(p for p in root.iterdir() if (p / "io.safetensors").is_file()):
        io = load_file(str(folder / "io.safetensors"))
        sae = SAE.load_from_disk(str(folder), device="cpu")
        x = io["x"]
        if sae.cfg.reshape_activations == "hook_z":
            x = x.reshape(x.shape[0], 4, -1)  # SAELens reads hook_z as (..., n_heads, d_head)
        with torch.no_grad():
            codes = sae.encode(x)
            x_hat = sae(x).reshape(io["x_hat"].shape)
        ok &= compare(folder.name, type(sae).__name__, codes, x_hat, io)
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make", type=Path, help="write exports + io.safetensors here (saekit venv)")
    ap.add_argument("--check", type=Path, help="load the exports with SAELens and compare (SAELens venv)")
    ap.add_argument("--make-saelens", type=Path, help="write SAELens-made SAEs + io.safetensors here (SAELens venv)")
    ap.add_argument("--check-import", type=Path, help="load SAELens-made SAEs with saekit and compare (saekit venv)")
    ap.add_argument("--saelens-python", default=os.path.join(os.environ.get("SAELENS_VENV", "/work/venv-saelens"), "bin", "python"))
    a = ap.parse_args()
    if a.make or a.check or a.make_saelens or a.check_import:
        ok = True
        if a.make:
            make(a.make)
        if a.check:
            ok &= check(a.check)
        if a.make_saelens:
            make_saelens(a.make_saelens)
        if a.check_import:
            ok &= check_import(a.check_import)
        return 0 if ok else 1
    if not Path(a.saelens_python).is_file():
        print(f"no SAELens python at {a.saelens_python}; run benchmarks/peers/setup_saelens.sh first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exports, imports = Path(tmp) / "exports", Path(tmp) / "imports"
        print("== saekit → SAELens: exports loaded by SAE.load_from_disk; then SAELens writes SAEs with SAE.save_model", flush=True)
        make(exports)
        # one SAELens process for both of its halves (importing sae_lens takes most of the time)
        out_ok = subprocess.call([a.saelens_python, __file__, "--check", str(exports), "--make-saelens", str(imports)]) == 0
        print("== SAELens → saekit: those folders loaded by saekit.load", flush=True)
        in_ok = check_import(imports)
        print("all agree" if out_ok and in_ok else "DISAGREEMENT")
        return 0 if out_ok and in_ok else 1


if __name__ == "__main__":
    sys.exit(main())
