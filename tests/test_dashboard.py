"""The dashboard in a real headless browser (Debian's chromium + chromedriver, driven by selenium).

Skipped only when chromium or selenium is not installed (`.ci/run` installs both); the
page itself is built from a hand-made analysis so the test needs no model.
"""

from __future__ import annotations

import json
import shutil

import pytest

from saekit.analysis.dashboard import density_plot, render_dashboard


def _meta():
    """A small analysis record: 6 SAE features, one dead, one dense, with contexts and logits."""
    vocab = {"0": "<bos>", "1": " the", "2": " cat", "3": " sat", "4": " mat", "5": "<script>", "6": " dog"}
    feats = []
    freqs = [0.02, 0.3, 0.0, 0.005, 0.08, 0.0011]
    for i, fq in enumerate(freqs):
        ctxs = []
        if fq > 0:
            for j in range(3):
                ctxs.append({"seq": j, "pos": 2, "value": 2.0 - j * 0.5, "center": 2,
                             "tokens": [1, 2, 3 + (i % 4), 4, 5], "acts": [0, 0.2, 2.0 - j * 0.5, 0.1, 0]})
        quantiles = [] if not fq else [
            {"quantile": [0.5, 1.0], "lo": 1.0, "hi": 2.0, "share": 0.5, "contexts": ctxs[:2]},
            {"quantile": [0.0, 0.5], "lo": 0.1, "hi": 0.9, "share": 0.5,
             "contexts": [{**ctxs[-1], "value": 0.1, "acts": [0, 0, 0.1, 0, 0]}]},
        ]
        feats.append({
            "id": f"3.{i}", "index": i, "frequency": fq, "count": int(fq * 1000), "mean": 1.0, "max": 2.0 if fq else 0.0,
            "hist": [5, 3, 1, 0] if fq else [0, 0, 0, 0], "hist_max": 2.5 if fq else 0.0, "contexts": ctxs,
            "promotes": [[6, 1.5], [2, 0.7]], "suppresses": [[1, -0.9], [4, -0.2]], "quantiles": quantiles,
            "neighbours": [[(i + 1) % len(freqs), 0.8], [(i + 2) % len(freqs), 0.3]],
            "fsm_state": 10 + i if fq else -1, "fsm_f1": 0.9 if fq else 0.0,
        })
    return {
        "format": "saekit-analysis", "version": 1, "dictionary": "d", "store": "s", "split": "all",
        "hook": "blocks.3.hook_resid_post", "layer": 3, "kind": "topk", "d_dict": 6, "groups": 1, "n_rows": 1000,
        "top_n": 3, "window": 2, "dense_threshold": 0.1, "logit_note": "direction @ W_U",
        "dead": ["3.2"], "dense": ["3.1"], "vocab": vocab, "features": feats, "model": "toy", "fsm": True,
    }


def test_neuronpedia_batches_follow_the_upload_layout(tmp_path):
    from saekit.analysis.neuronpedia import write_neuronpedia

    meta = _meta()
    paths = write_neuronpedia(meta, tmp_path / "np", batch_size=4)
    assert [p.name for p in paths] == ["batch-0.json", "batch-1.json"] and not list((tmp_path / "np").glob("*.tmp"))
    b0 = json.loads(paths[0].read_text())
    assert (b0["model_id"], b0["layer"], b0["sae_set"]) == ("toy", 3, "saekit-topk") and len(b0["features"]) == 4
    f = b0["features"][0]
    assert f["feature_index"] == 0 and f["frac_nonzero"] == 0.02
    assert f["pos_str"] == [" dog", " cat"] and f["pos_values"] == [1.5, 0.7] and f["neg_str"] == [" the", " mat"]
    # parallel histogram arrays: one bin centre per count
    assert len(f["freq_hist_data_bar_values"]) == len(f["freq_hist_data_bar_heights"]) == 4
    assert f["freq_hist_data_bar_values"][0] == 2.5 / 8
    top = [a for a in f["activations"] if a["bin_min"] == -1]
    assert len(top) == 3 and top[0]["bin_max"] == 2.0 and top[0]["tokens"] == [" the", " cat", " sat", " mat", "<script>"]
    sampled = [a for a in f["activations"] if a["bin_min"] != -1]
    assert [a["bin_contains"] for a in sampled] == [0.5, 0.5, 0.5] and sampled[-1]["bin_min"] == 0.1
    for key in ("neuron_alignment_indices", "correlated_features_indices", "logits_hist_data_bar_heights", "decoder_weights_dist",
                "n_prompts_total", "n_tokens_in_prompt", "dataset"):
        assert key in f


def test_render_escapes_script_text():
    page = render_dashboard(_meta())
    assert "<script>\"" not in page and "\\u003cscript\\u003e" in page
    data = page.split('type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["features"][0]["id"] == "3.0"


def test_density_plot(tmp_path):
    p = density_plot(_meta(), tmp_path / "d.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp*"))


def _driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,800"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


@pytest.mark.slow
def test_dashboard_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = tmp_path / "dashboard.html"
    page.write_text(render_dashboard(_meta()), encoding="utf-8")
    drv = _driver()
    try:
        drv.get(page.as_uri())
        rows = lambda: [r.get_attribute("data-id") for r in drv.find_elements(By.CSS_SELECTOR, "#list .row[data-id]")]  # noqa: E731
        # Default sort: frequency descending.
        assert rows() == ["3.1", "3.4", "3.0", "3.3", "3.5", "3.2"]
        Select(drv.find_element(By.ID, "sort")).select_by_value("freq-asc")
        assert rows() == ["3.2", "3.5", "3.3", "3.0", "3.4", "3.1"]
        # Flags: the dead and dense features carry them.
        assert "dead" in drv.find_element(By.CSS_SELECTOR, '#list .row[data-id="3.2"]').text
        assert "dense" in drv.find_element(By.CSS_SELECTOR, '#list .row[data-id="3.1"]').text
        # Search by id, then by token (" sat" fires for features 0 and 4, whose centre token is id 3).
        box = drv.find_element(By.ID, "search")
        box.send_keys("3.4")
        assert rows() == ["3.4"]
        box.clear()
        box.send_keys("sat")
        assert sorted(rows()) == ["3.0", "3.4"]
        box.send_keys("\b" * 3)  # back to an empty query: everything listed again
        assert len(rows()) == 6
        box.send_keys("state 13")  # toy model: the features tracking an FSM state
        assert rows() == ["3.3"]
        box.send_keys("\b" * 8)
        assert len(rows()) == 6
        # Selecting a feature shows its contexts, the firing token highlighted, and its logit effects.
        drv.find_element(By.CSS_SELECTOR, '#list .row[data-id="3.0"]').click()
        assert drv.find_element(By.CSS_SELECTOR, "#detail h2").text.startswith("3.0")
        ctx = drv.find_elements(By.CSS_SELECTOR, "#contexts .ctx")
        assert len(ctx) == 3
        fire = ctx[0].find_element(By.CSS_SELECTOR, "span.fire")
        assert fire.text.strip() == "sat" and "rgba" in fire.get_attribute("style")
        assert "<script>" in ctx[0].text  # token text shown as text, not run as markup
        assert "dog" in drv.find_element(By.ID, "detail").text  # promoted token listed
        assert len(drv.find_elements(By.CSS_SELECTOR, "svg.hist rect")) == 4
        axes = [t.text for t in drv.find_elements(By.CSS_SELECTOR, "svg.hist text.axis")]
        assert axes == ["activation", "tokens"]
        assert "tracks FSM state 10" in drv.find_element(By.ID, "fsm").text
        heads = [h.text for h in drv.find_elements(By.CSS_SELECTOR, "#quantiles .qhead")]
        assert len(heads) == 2 and heads[0].startswith("activation 1–2") and "50–100%" in heads[0]
        assert len(drv.find_elements(By.CSS_SELECTOR, "#quantiles .ctx")) == 3
        drv.save_screenshot(str(tmp_path / "dashboard.png"))  # look at it when changing the page
        # The selected feature is in the address; a neighbour's link opens it; a link opens the page at a feature.
        assert drv.current_url.endswith("#3.0")
        drv.find_element(By.CSS_SELECTOR, '#neighbours a[href="#3.1"]').click()
        assert drv.find_element(By.CSS_SELECTOR, "#detail h2").text.startswith("3.1") and drv.current_url.endswith("#3.1")
        drv.get(page.as_uri() + "#3.4")
        drv.refresh()
        assert drv.find_element(By.CSS_SELECTOR, "#detail h2").text.startswith("3.4")
        assert drv.find_element(By.CSS_SELECTOR, "#list .row.sel").get_attribute("data-id") == "3.4"
        errors = [e for e in drv.get_log("browser") if e.get("level") == "SEVERE"]
        assert errors == [], errors
    finally:
        drv.quit()
