"""An analysis's features in Neuronpedia's upload layout: `batch-N.json` files.

The layout follows SAEDashboard's Neuronpedia converter (`NeuronpediaDashboardBatch` /
`NeuronpediaDashboardFeature` / `NeuronpediaDashboardActivation` in
`sae_dashboard/neuronpedia/`, read at jbloomAus/SAEDashboard 03a615f7): a batch is
`{model_id, layer, sae_set, features: [...]}`; a feature carries `feature_index`, logit
effects as `pos_str/pos_values/neg_str/neg_values`, `frac_nonzero`, the activation
histogram as parallel `freq_hist_data_bar_values` (bin centres) and
`freq_hist_data_bar_heights` (counts), and `activations`: token strings and values per
context, with `bin_min/bin_max/bin_contains` (−1, max, −1 for the top contexts; the
interval and its share of firings for sampled ones).  Fields saekit does not compute
(neuron alignment, correlated neurons/features, logit histogram, decoder weight
distribution) are written empty, as the converter does when it lacks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BATCH = 256


def _strs(vocab: dict, ids) -> list[str]:
    return [vocab.get(str(int(t)), "?") for t in ids]


def feature_record(f: dict, vocab: dict, dataset: str) -> dict:
    """One feature of features.json → Neuronpedia's feature record."""
    bins = len(f["hist"])
    width = f["hist_max"] / bins if bins else 0.0
    acts = [{"bin_min": -1, "bin_max": f["max"], "bin_contains": -1, "tokens": _strs(vocab, c["tokens"]), "values": c["acts"]}
            for c in f["contexts"]]
    for g in f.get("quantiles", []):
        acts += [{"bin_min": g["lo"], "bin_max": g["hi"], "bin_contains": g["share"], "tokens": _strs(vocab, c["tokens"]),
                  "values": c["acts"]} for c in g["contexts"]]
    return {
        "feature_index": f["index"],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": _strs(vocab, [t for t, _ in f.get("suppresses", [])]), "neg_values": [v for _, v in f.get("suppresses", [])],
        "pos_str": _strs(vocab, [t for t, _ in f.get("promotes", [])]), "pos_values": [v for _, v in f.get("promotes", [])],
        "frac_nonzero": f["frequency"],
        "freq_hist_data_bar_values": [round((b + 0.5) * width, 6) for b in range(bins)],
        "freq_hist_data_bar_heights": list(f["hist"]),
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": 0, "n_tokens_in_prompt": 0, "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": acts,
    }


def batches(meta: dict, batch_size: int = BATCH, model_id: str | None = None, sae_set: str | None = None) -> list[dict]:
    """features.json content → Neuronpedia batches of `batch_size` features."""
    vocab = meta["vocab"]
    model_id = model_id or str(meta.get("model") or "")
    sae_set = sae_set or f"saekit-{meta['kind']}"
    recs = [feature_record(f, vocab, str(meta.get("store", ""))) for f in meta["features"]]
    return [{"model_id": model_id, "layer": meta["layer"], "sae_set": sae_set, "features": recs[a : a + batch_size]}
            for a in range(0, len(recs), batch_size)]


def write_neuronpedia(meta: dict, folder: str | os.PathLike, batch_size: int = BATCH) -> list[Path]:
    """Write `batch-0.json`, `batch-1.json`, ... into `folder` (each under a temporary name first)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("batch-*.json"):
        old.unlink()
    paths = []
    for n, b in enumerate(batches(meta, batch_size)):
        p = out / f"batch-{n}.json"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(b), encoding="utf-8")
        os.replace(tmp, p)
        paths.append(p)
    return paths
