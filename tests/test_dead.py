"""One definition of "dead": not fired in a stated window of tokens, and every report says its window."""

from __future__ import annotations

import json

import pytest
import torch

from saekit import metrics


def test_one_definition_two_counters():
    """The eval count (fires over the window) and training's running counter (tokens since the last fire) agree."""
    fires = torch.tensor([0, 3, 0, 1])
    assert metrics.dead_fraction(fires) == 0.5
    since = torch.tensor([5000, 10, 1001, 999])
    assert metrics.dead_mask(since, 1000).tolist() == [True, False, True, False]


def test_the_wording_names_the_window():
    assert metrics.dead_note(0.2345, 3810, "eval") == "dead 23.4% (not fired in 3,810 eval tokens)"
    assert metrics.dead_note(0.083, 1_000_000, "training", last=True) == "dead 8.3% (not fired in the last 1,000,000 training tokens)"
    assert metrics.dead_window(76_200, "analysed") == "not fired in 76,200 analysed tokens"
    assert metrics.dead_note(None, 10**6, "training", last=True) == "dead – (not fired in the last 1,000,000 training tokens; fewer seen so far)"


def test_train_writes_the_window_beside_every_dead_fraction(tmp_path):
    """metrics.jsonl rows (training window) and the summary (eval window) both carry dead_window_tokens."""
    from saekit.config import from_flags
    from saekit.dictionaries import Provenance
    from saekit.interop import load
    from saekit.train import HookSource, Trainer, TrainConfig, tensor_batches

    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    cfg = from_flags(TrainConfig, kind="topk", d_dict=32, k=[2], tokens=8 * 128, batch_size=128, init_rows=256, log_every=2,
                     checkpoint_every=0, dead_tokens=256, out=str(tmp_path / "o"), device="cpu")
    t = Trainer(cfg, {"h": HookSource(8, Provenance(hook="h"))}, tensor_batches({"h": x}, 128), progress=False)
    t.fit()
    [path] = t.save(t.evaluate([{"h": x[:300]}], 300))
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["dead_window_tokens"] == 256 for r in rows)
    assert all((r["dead_fraction"] is None) == (r["tokens"] <= 256) for r in rows)  # a window not yet filled says so
    assert "not fired in the last 256 training tokens" in t.progress_info(rows[-1])
    s = load(path).summary
    assert s["eval_tokens"] == 300 and s["dead_window_tokens"] == 300


def test_default_window_is_a_tenth_of_the_run_within_50k_and_1m():
    """dead_tokens 0 resolves from the run's length, so AuxK can act in a run shorter than 1M tokens."""
    assert metrics.dead_window_tokens(0, 2_000_000) == 200_000
    assert metrics.dead_window_tokens(0, 100_000_000) == 1_000_000
    assert metrics.dead_window_tokens(0, 100_000) == 50_000
    assert metrics.dead_window_tokens(3_000, 500_000) == 3_000  # a window the user gave is kept


def test_train_resolves_the_default_window_and_records_it(tmp_path, monkeypatch):
    """A run left at dead_tokens 0 uses (and logs, and saves) its resolved window."""
    from saekit.config import from_flags
    from saekit.dictionaries import Provenance
    from saekit.interop import load
    from saekit.train import HookSource, Trainer, TrainConfig, tensor_batches

    monkeypatch.setattr(metrics, "DEAD_WINDOW", (0, 0.1, 1_000_000))  # no floor, so a small run fills its window
    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0))
    cfg = from_flags(TrainConfig, kind="topk", d_dict=32, k=[2], tokens=20 * 128, batch_size=128, init_rows=256, log_every=2,
                     checkpoint_every=0, out=str(tmp_path / "o"), device="cpu")
    assert cfg.dead_tokens == 0
    t = Trainer(cfg, {"h": HookSource(8, Provenance(hook="h"))}, tensor_batches({"h": x}, 128), progress=False)
    t.fit()
    [path] = t.save()
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["dead_window_tokens"] == 256 for r in rows)
    assert any(r["dead_fraction"] is not None for r in rows)  # the window filled within the run
    assert load(path).train_config["dead_tokens"] == 256


def test_checkpoint_of_the_old_fixed_window_resumes_where_the_default_resolves_to_it(tmp_path, monkeypatch):
    """A checkpoint written with dead_tokens = the cap (the old fixed default) resumes under the new
    default 0 when the run's window resolves to that cap; another window is still refused."""
    from saekit.config import from_flags
    from saekit.dictionaries import Provenance
    from saekit.errors import SaekitError
    from saekit.train import HookSource, Trainer, TrainConfig, tensor_batches

    monkeypatch.setattr(metrics, "DEAD_WINDOW", (0, 0.1, 256))  # the cap plays the old 1M default
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(0))

    def trainer(out, tokens, dead, resume=False):
        cfg = from_flags(TrainConfig, kind="topk", d_dict=32, k=[2], tokens=tokens, batch_size=128, init_rows=256,
                         log_every=2, checkpoint_every=4, dead_tokens=dead, out=str(out), device="cpu", resume=resume)
        return Trainer(cfg, {"h": HookSource(8, Provenance(hook="h"))}, tensor_batches({"h": x}, 128), progress=False)

    trainer(tmp_path / "a", 8 * 128, 256).fit()
    t = trainer(tmp_path / "a", 24 * 128, 0, resume=True)  # resolves to 256 = the cap
    t.fit()
    assert t.step == 24 and t.dead_tokens == 256
    trainer(tmp_path / "b", 8 * 128, 128).fit()
    with pytest.raises(SaekitError, match="dead_tokens"):
        trainer(tmp_path / "b", 24 * 128, 0, resume=True).fit()
