"""Each codebook's reconstruction, raw and as FVU, in a codebook model (a `saekit finetune --out` folder).

    python benchmarks/codebook_fvu.py FOLDER [FOLDER ...] [--data toy-train.txt --sequences 64] [--json OUT]

With a learnt LayerNorm before the codes (`--input-norm layernorm`, the paper preset) the
reconstruction term ‖x̂ − x_in‖² grows with the LayerNorm's gain, which the LM loss is free to
raise; the FVU (`saekit.metrics.fvu`, the same rows, in the codebook's own input space) does not.
Run on two folders of one recipe trained for different lengths (toy-codebooks at 3,000 steps and
the same run at 6,000), the pair says whether a growing term means codes that no longer follow
the activations or only a larger scale.  Rows: every replaced position of the run's held-out
sequences (its first `eval_sequences` walks) with every codebook active, as the model runs.
"""

from __future__ import annotations

import argparse
import json

import torch

from saekit import metrics
from saekit.analysis.codebook_model import CodebookModel
from saekit.inmodel.data import load_tokens
from saekit.tokens import row_mask
from saekit.toy import codebook_model_dir


def measure(folder: str, sequences: int | None, data_file: str | None = None) -> dict:
    from pathlib import Path

    root = Path(codebook_model_dir(folder))
    cbm = CodebookModel.load(folder)
    c = json.loads((root / "report.json").read_text())["config"]
    data = load_tokens(data_file or c.get("data", ""), c.get("store", ""), cbm.tokenizer, cbm.bos_id, int(c.get("seq_len", 128)), 1,
                       sequences or int(c.get("eval_sequences", 64)), c.get("text_field", "text"), packing=c.get("packing", "concat"))
    tokens = torch.as_tensor(data.eval, dtype=torch.long)
    _, rec = cbm.run(tokens, record=True)
    keep = row_mask(tokens.to(cbm.device), cbm.skip_bos).reshape(-1)
    out = {"folder": folder, "steps": c.get("steps"), "rows": int(keep.sum()), "sites": {}}
    for h, d in cbm.codebooks.items():
        x = rec.inputs[h].reshape(-1, d.cfg.d_in)[keep].float()
        scale = float(d.scale)
        x_in = d.normalise_n(x * scale)
        x_hat = d.decode(rec.codes[h].reshape(-1, d.cfg.d_dict)[keep].float()) * scale
        term = (x_hat - x_in).pow(2).sum(-1).mean().item()
        gain = float(d.ln_weight.pow(2).mean().sqrt()) if hasattr(d, "ln_weight") else None
        out["sites"][h] = {"term": term, "fvu": metrics.fvu(x_in, x_hat), "input_sq_norm": x_in.pow(2).sum(-1).mean().item(),
                           "ln_gain_rms": gain}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--sequences", type=int, default=0, help="held-out sequences (0: the run's eval_sequences)")
    ap.add_argument("--data", default=None, help="the runs' text (default: each run's own --data)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    res = [measure(f, a.sequences, a.data) for f in a.folders]
    for r in res:
        print(f"{r['folder']} ({r['steps']} steps, {r['rows']:,} rows)")
        for h, s in r["sites"].items():
            gain = f"{s['ln_gain_rms']:.2f}" if s["ln_gain_rms"] is not None else "-"
            print(f"  {h:24s} term {s['term']:8.2f}  ‖x_in‖² {s['input_sq_norm']:8.2f}  LayerNorm gain (rms) {gain:>5s}  FVU {s['fvu']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
