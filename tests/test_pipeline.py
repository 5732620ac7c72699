"""The demo's ending: a reading of its numbers (each one taken from the run's results) and next steps."""

from __future__ import annotations

from pathlib import Path


def _meta(kind, centres_per_feature, fsm, dictionary="runs/demo/dicts/h/x"):
    """fsm: per feature (state, f1, precision, recall); state −1 = never fired."""
    feats = []
    for i, (centres, (state, f1, prec, rec)) in enumerate(zip(centres_per_feature, fsm)):
        feats.append({"id": f"1.{i}", "index": i, "contexts": [{"tokens": [9, c, 9], "center": 1} for c in centres],
                      "fsm_state": state, "fsm_f1": f1, "fsm_precision": prec, "fsm_recall": rec})
    return {"kind": kind, "d_dict": len(feats) + 1, "features": feats, "fsm": True, "dictionary": dictionary}


def test_digit_purity_counts_the_most_common_firing_token():
    from saekit.pipeline import digit_purity

    m = _meta("topk", [[3] * 5, [3, 3, 3, 4, 5], [1, 2]], [(1, 0.1, 0.1, 0.1)] * 3)
    assert digit_purity(m) == {0: 1.0, 1: 0.6}  # the third has too few contexts to judge


def test_reading_quotes_the_measured_numbers():
    from saekit.pipeline import reading

    recovery = {"neuron_mean_best_f1": 0.51, "dictionaries": [
        {"kind": "topk", "mean_best_f1": 0.536, "share_states_f1_ge_0.9": 0.02},
        {"kind": "codebook", "mean_best_f1": 0.987, "share_states_f1_ge_0.9": 0.97}]}
    topk = _meta("topk", [[3] * 6, [4] * 6, [5] * 5 + [6], [7] * 5, []],
                 [(3, 0.95, 0.95, 0.95), (4, 0.3, 0.2, 0.95), (5, 0.3, 0.3, 0.92), (6, 0.2, 0.6, 0.95), (-1, 0, 0, 0)])
    cb = _meta("codebook", [[1, 2, 3, 4, 5, 6], [7] * 6, [8] * 6], [(10, 0.99, 0.99, 0.99), (11, 0.97, 0.98, 0.96), (11, 0.91, 0.9, 0.92)])
    lines = reading(recovery, [topk, cb])
    text = " ".join(lines)
    assert "mean F1 0.99 (97% of states ≥ 0.9)" in text and "topk latent 0.54 (2%)" in text and "neuron 0.51" in text
    assert ("topk (4 of 6 features fired): 1 are state detectors (F1 ≥ 0.9, 1 distinct states); 2 catch ≥ 90% of a state's "
            "completions but fewer than half of their firings are that state, and 1 of those 2 fire on a single digit") in text
    assert "codebook (3 of 4 features fired): 3 are state detectors (F1 ≥ 0.9, 2 distinct states); 0 catch" in text
    assert lines[-1].startswith("Why (our reading of these numbers): ")
    recovery["dictionaries"][1]["mean_best_f1"] = 0.3  # the usual outcome reversed: the text must not claim it
    assert reading(recovery, [topk, cb])[-1].startswith("Here, unlike the usual outcome")


def test_reading_says_why_an_sae_scores_like_a_neuron():
    """TopK's state F1 next to the best neuron's: explained, with splice-eval's numbers when the run has them."""
    from saekit.pipeline import reading

    recovery = {"neuron_mean_best_f1": 0.511, "dictionaries": [
        {"kind": "topk", "path": "d/h/topk-k8", "mean_best_f1": 0.503, "share_states_f1_ge_0.9": 0.06},
        {"kind": "codebook", "path": "d/h/codebook-k1", "mean_best_f1": 0.986, "share_states_f1_ge_0.9": 0.97}]}
    splice = {"dictionaries": [{"dict": "d/h/topk-k8", "fvu": 0.009, "loss_recovered_mean": 0.963},
                               {"dict": "d/h/codebook-k1", "fvu": 0.042, "loss_recovered_mean": 0.659}]}
    text = " ".join(reading(recovery, [], splice))
    assert "scores about the best raw neuron (0.50 vs 0.51)" in text
    assert "reconstructs better than the codebook (FVU 0.009 vs 0.042, loss recovered against mean ablation 0.96 vs 0.66)" in text
    splice["dictionaries"][0]["fvu"] = 0.1  # a worse fit must not be called better
    assert "reconstructs worse than the codebook (FVU 0.100" in " ".join(reading(recovery, [], splice))
    recovery["dictionaries"][0]["mean_best_f1"] = 0.8  # clearly above the neuron: nothing to explain
    assert "raw neuron (" not in " ".join(reading(recovery, [], splice))


def test_next_steps_steer_the_best_state_code():
    from saekit.pipeline import PipelineConfig, PipelineResult, next_steps

    res = PipelineResult(Path("runs/demo/store"), [Path("runs/demo/dicts/h/topk-k8")], {}, None,
                         [Path("runs/demo/analysis/topk-k8")])
    metas = [_meta("codebook", [[1] * 5, [2] * 5], [(0, 0.5, 0.5, 0.5), (1, 0.97, 0.97, 0.97)], dictionary="runs/demo/dicts/h/codebook-k1")]
    steps = next_steps(PipelineConfig(), res, metas)
    assert steps[0].startswith("open runs/demo/analysis/topk-k8/dashboard.html")
    assert any("saekit steer --dict runs/demo/dicts/h/codebook-k1 --feature 1.1" in s and "state 1, F1 0.97" in s for s in steps)
