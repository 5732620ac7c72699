"""saekit.runs (atomic writes, checkpoints with fallback), saekit.progress (plain lines), saekit.tokens."""

import json
import warnings

import numpy as np
import pytest
import torch

from saekit import runs, tokens
from saekit.errors import SaekitError
from saekit.progress import Progress


def test_atomic_leaves_old_file_on_error(tmp_path):
    p = tmp_path / "a.json"
    runs.write_json(p, {"v": 1})
    with pytest.raises(RuntimeError):
        with runs.atomic(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(p.read_text()) == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]


def test_damaged_checkpoint_falls_back_to_previous(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        runs.save_checkpoint(root, step, {"w": torch.full((4,), float(step))}, {"identity": "x"})
    assert runs.checkpoint_steps(root) == [2, 3]  # the last two are kept
    f = runs.checkpoint_dir(root, 3) / runs.STATE_TENSORS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: safetensors still parses, the checksum does not match
    f.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-00000003 is damaged"):
        step, t, meta = runs.latest_checkpoint(root)
    assert step == 2 and torch.equal(t["w"], torch.full((4,), 2.0)) and meta["identity"] == "x"
    (runs.checkpoint_dir(root, 2) / runs.STATE_JSON).write_text("{")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SaekitError, match="every checkpoint"):
            runs.latest_checkpoint(root)


def test_metrics_log_truncate(tmp_path):
    log = runs.MetricsLog(tmp_path / "m.jsonl")
    log.start()
    for s in (5, 10, 15):
        log.append({"step": s})
    log.truncate(10)
    assert [json.loads(ln)["step"] for ln in log.path.read_text().splitlines()] == [5, 10]


def test_plain_progress_lines(capsys):
    bar = Progress(tty=False, interval=0.0, unit="tokens")
    bar.add("train h/topk-k4", total=1000)
    bar.update(0, done=250, info="loss=0.5")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train h/topk-k4: 250/1,000 tokens (25%)") and "tokens/s ETA" in lines[0]
    assert lines[0].endswith("loss=0.5")
    quiet = Progress(tty=False, interval=60.0)
    quiet.add("x", total=10)
    quiet.update(0, done=5)
    quiet.close()
    assert capsys.readouterr().err == ""  # a job shorter than the interval prints nothing


def test_row_mask_positions_numpy_and_torch():
    t = np.array([[10, 1, 2, tokens.PAD], [10, 3, tokens.PAD, tokens.PAD]])
    want = np.array([[False, True, True, False], [False, True, False, False]])
    assert (tokens.row_mask(t, skip_bos=True) == want).all()
    assert torch.equal(tokens.row_mask(torch.as_tensor(t), skip_bos=False), torch.as_tensor(t != tokens.PAD))
    assert (tokens.model_input(torch.as_tensor(t), 10) >= 0).all()


def test_atomic_files_get_the_users_normal_permissions(tmp_path):
    """safetensors writes owner-only files; what saekit writes gets the mode the user's umask gives (like the JSON beside it)."""
    import os

    import torch
    from safetensors.torch import save_file

    from saekit import runs

    with runs.atomic(tmp_path / "w.safetensors") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    runs.write_text(tmp_path / "c.json", "{}")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "w.safetensors") == mode(tmp_path / "c.json") == mode(plain) == runs.FILE_MODE
