"""The demo's ending: a reading of its numbers (each one taken from the run's results) and next steps."""

from __future__ import annotations

from pathlib import Path


def _meta(kind, centres_per_feature, f1s, dictionary="runs/demo/dicts/h/x"):
    feats = []
    for i, (centres, f1) in enumerate(zip(centres_per_feature, f1s)):
        feats.append({"id": f"1.{i}", "index": i, "contexts": [{"tokens": [9, c, 9], "center": 1} for c in centres],
                      "fsm_state": i if f1 > 0 else -1, "fsm_f1": f1})
    return {"kind": kind, "d_dict": len(feats), "features": feats, "fsm": True, "dictionary": dictionary}


def test_digit_purity_counts_the_most_common_firing_token():
    from saekit.pipeline import digit_purity

    m = _meta("topk", [[3] * 5, [3, 3, 3, 4, 5], [1, 2]], [0.1, 0.2, 0.0])
    assert digit_purity(m) == [1.0, 0.6]  # the third has too few contexts to judge


def test_reading_quotes_the_measured_numbers():
    from saekit.pipeline import reading

    recovery = {"neuron_mean_best_f1": 0.51, "dictionaries": [
        {"kind": "topk", "mean_best_f1": 0.536, "share_states_f1_ge_0.9": 0.02},
        {"kind": "codebook", "mean_best_f1": 0.987, "share_states_f1_ge_0.9": 0.97}]}
    metas = [_meta("topk", [[3] * 6, [4] * 6, [5] * 5 + [6]], [0.2, 0.3, 0.4]),
             _meta("codebook", [[1, 2, 3, 4, 5, 6], [7, 8, 9, 0, 1, 2]], [0.99, 0.97])]
    lines = reading(recovery, metas)
    text = " ".join(lines)
    assert "mean F1 0.99 (97% of states ≥ 0.9)" in text and "topk latent 0.54 (2%)" in text and "neuron 0.51" in text
    assert "topk (3 features): 67% of its 3 live features fire on one digit" in text and "averages 0.30" in text
    assert "codebook (2 features): 0% of its 2 live features" in text and "averages 0.98" in text
    assert lines[-1].startswith("Why: ")
    recovery["dictionaries"][1]["mean_best_f1"] = 0.3  # the usual outcome reversed: the text must not claim it
    assert reading(recovery, metas)[-1].startswith("Here, unlike the usual outcome")


def test_next_steps_steer_the_best_state_code():
    from saekit.pipeline import PipelineConfig, PipelineResult, next_steps

    res = PipelineResult(Path("runs/demo/store"), [Path("runs/demo/dicts/h/topk-k8")], {}, None,
                         [Path("runs/demo/analysis/topk-k8")])
    metas = [_meta("codebook", [[1] * 5, [2] * 5], [0.5, 0.97], dictionary="runs/demo/dicts/h/codebook-k1")]
    steps = next_steps(PipelineConfig(), res, metas)
    assert steps[0].startswith("open runs/demo/analysis/topk-k8/dashboard.html")
    assert any("saekit steer --dict runs/demo/dicts/h/codebook-k1 --feature 1.1" in s and "state 1, F1 0.97" in s for s in steps)
