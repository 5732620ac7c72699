"""Text sources and packing: pure functions on small lists, plus the tiny fixture tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from saekit.errors import SaekitError
from saekit.tokens import PAD
from saekit.text import data_files, iter_documents, pack_concat, pack_doc, sequences


def test_pack_concat_cuts_stream_and_prepends_bos():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    seqs = list(pack_concat(docs, context_size=4, bos_id=0, eos_id=99))
    stream = [1, 2, 3, 99, 4, 5, 99, 6, 7, 8, 9, 99]  # 12 tokens → 4 pieces of 3
    assert [s.tolist() for s in seqs] == [[0, *stream[i : i + 3]] for i in range(0, 12, 3)]
    assert all(s.dtype == np.int32 for s in seqs)


def test_pack_concat_pads_the_last_piece():
    seqs = list(pack_concat([[1, 2, 3, 4]], context_size=4, bos_id=0, eos_id=9))
    assert [s.tolist() for s in seqs] == [[0, 1, 2, 3], [0, 4, 9, PAD]]


def test_pack_doc_one_doc_per_sequence():
    seqs = list(pack_doc([[1, 2], [], [3, 4, 5, 6, 7]], context_size=4, bos_id=0))
    assert [s.tolist() for s in seqs] == [[0, 1, 2, PAD], [0, 3, 4, 5]]


def test_documents_from_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second one\n\n  \nthird\r\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "first"}) + "\n" + json.dumps({"body": ""}) + "\n")
    (tmp_path / "skip.md").write_text("not read")
    files = data_files(tmp_path)
    assert [f.name for f in files] == ["a.jsonl", "b.txt"]
    assert list(iter_documents(files, text_field="body")) == ["first", "second one", "third"]


def test_data_errors(tmp_path):
    with pytest.raises(SaekitError, match="does not exist"):
        data_files(tmp_path / "nope.txt")
    with pytest.raises(SaekitError, match="no data given"):
        data_files("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaekitError, match="no .txt or .jsonl"):
        data_files(tmp_path / "empty")
    bad = tmp_path / "bad.txt"
    bad.write_bytes("fine\nalso fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(SaekitError, match=r"bad\.txt line 3 is not UTF-8.*column 4"):
        list(iter_documents([bad]))
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "ok"}\n{"content": "no"}\n')
    with pytest.raises(SaekitError, match=r"x\.jsonl line 2 has no field 'text' \(has: content\).*--text-field"):
        list(iter_documents([j]))
    j.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SaekitError, match=r"line 2 is not valid JSON"):
        list(iter_documents([j]))


def test_sequences_with_fixture_tokenizer(tiny_model_dir, tiny_text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lines = [l for l in open(tiny_text_file).read().splitlines() if l.strip()]
    seqs = list(sequences(tiny_text_file, tok, 16, bos_id=0, eos_id=0, packing="concat"))
    body = np.concatenate([s[1:] for s in seqs])
    body = body[body != PAD]
    want = []
    for line in lines:
        want += tok(line, add_special_tokens=False)["input_ids"] + [0]
    assert body.tolist() == want  # nothing lost, nothing reordered, no special tokens added
    assert all(s[0] == 0 for s in seqs)
    docs = list(sequences(tiny_text_file, tok, 16, bos_id=0, eos_id=0, packing="doc"))
    assert len(docs) == len(lines)
    first = tok(lines[0], add_special_tokens=False)["input_ids"][:15]
    assert docs[0][1 : 1 + len(first)].tolist() == first
